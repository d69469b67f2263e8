"""Scale-out: two CPU processes under torchrun (gloo) train one model, stay identical, and resume exactly."""

import json
import subprocess
import sys
import textwrap

import torch

# One torchrun launch (each costs three Python starts): the job trains, then, as a run killed after epoch 1
# would be, resumes a copy of the run from its epoch-1 checkpoint in the same two processes.
JOB = """
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from reid_utils.train import TrainOptions, train

data_dir, model_dir, out, changes = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
settings = dict(name="ddp", data_dir=data_dir, gpu_ids="", backbone="resnet18", height=32, width=16, batchsize=8,
                total_epoch=1, save_every=1, pretrained=False, lr=0.002)
for step, folder in (("trained", model_dir / "first"), ("resumed", model_dir / "resumed")):
    if step == "resumed":
        if dist.get_rank() == 0:
            shutil.copytree(model_dir / "first" / "ddp", folder / "ddp")
            for later in ("net_002.pth", "net_last.pth"):  # the run died after epoch 1
                (folder / "ddp" / later).unlink()
        dist.barrier()
    options = TrainOptions(**{**settings, **changes, "model_dir": str(folder)})
    history, model = train(options, resume=step == "resumed", quiet=True, return_model=True)
    state = {"model": model.state_dict(), "history": history, "world": dist.get_world_size()}
    torch.save(state, out / f"{step}-rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


def check_the_processes_agree(ranks: list[dict]) -> None:
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key  # gradients were averaged: the same model
    # metrics reduced over both processes: both report the same loss over all the images they used together
    assert ranks[0]["history"]["train_loss"] == ranks[1]["history"]["train_loss"]


def test_two_gloo_processes_stay_identical_and_resume_exactly(tiny_prepared, tmp_path):
    # the fast data path with P x K batches: both are dealt out between the processes
    # (the classic path's DistributedSampler is checked in tests/test_data.py)
    changes = {"total_epoch": 2, "fast_data": True, "triplet_weight": 1.0, "instances": 2, "warm_epoch": 1}
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(JOB))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(job),
               str(tiny_prepared), str(tmp_path / "model"), str(tmp_path), json.dumps(changes)]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"trained-rank{r}.pt", weights_only=False) for r in (0, 1)]
    check_the_processes_agree(ranks)
    assert ranks[0]["history"]["skipped"] == [0, 0]  # P x K batches are always full
    run = tmp_path / "model" / "first" / "ddp"
    saved = torch.load(run / "net_last.pth", weights_only=False)  # written by rank 0
    assert saved["epoch"] == 2 and saved["options"]["fast_data"]
    for key, value in saved["model"].items():
        assert torch.equal(value, ranks[0]["model"][key]), key
    first = torch.load(run / "net_001.pth", weights_only=False)
    # warm-up counts each process's own steps: after warm_epoch = 1 epoch the loss is at full weight (counting
    # the whole set's steps, as before, it would stop about halfway with two processes)
    assert abs(first["state"]["warm_up"] - 1.0) < 1e-9
    processes = first["rng"]["processes"]  # every process's random state, not only rank 0's
    assert len(processes) == 2 and not torch.equal(processes[0]["torch"], processes[1]["torch"])

    # The copy resumed from epoch 1: both processes continue with their own random numbers (restored from the
    # checkpoint, not left over from the first run), so it ends with exactly the uninterrupted run's weights.
    resumed = [torch.load(tmp_path / f"resumed-rank{r}.pt", weights_only=False) for r in (0, 1)]
    check_the_processes_agree(resumed)
    for key, value in ranks[0]["model"].items():
        assert torch.equal(resumed[0]["model"][key], value), key
    assert resumed[0]["history"]["train_loss"] == ranks[0]["history"]["train_loss"]
    assert torch.load(tmp_path / "model" / "resumed" / "ddp" / "net_last.pth", weights_only=False)["epoch"] == 2
