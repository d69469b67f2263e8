"""Scale-out: two CPU processes under torchrun (gloo) train one model, stay identical, and resume exactly."""

import json
import shutil
import subprocess
import sys
import textwrap

import torch

JOB = """
import json
import sys

import torch
import torch.distributed as dist

from reid_utils.train import TrainOptions, train

data_dir, model_dir, out, changes, resume = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
settings = dict(name="ddp", data_dir=data_dir, model_dir=model_dir, gpu_ids="", backbone="resnet18", height=32,
                width=16, batchsize=4, total_epoch=1, save_every=1, pretrained=False, lr=0.002)
options = TrainOptions(**{**settings, **changes})
history, model = train(options, resume=resume == "resume", quiet=True, return_model=True)
rank = dist.get_rank()
torch.save({"model": model.state_dict(), "history": history, "world": dist.get_world_size()}, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def run_two_processes(tmp_path, data_dir, model_dir, changes: dict, resume: bool = False) -> list[dict]:
    """Start the job under torchrun with 2 processes; return what each rank saw at the end."""
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(JOB))
    arguments = [str(data_dir), str(model_dir), str(tmp_path), json.dumps(changes), "resume" if resume else "new"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(job)]
    command += arguments
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key  # gradients were averaged: the same model
    # metrics reduced over both processes: both report the same loss over all the images they used together
    assert ranks[0]["history"]["train_loss"] == ranks[1]["history"]["train_loss"]
    return ranks


def test_two_gloo_processes_stay_identical_and_resume_exactly(tiny_prepared, tmp_path):
    # the fast data path with P x K batches: both are dealt out between the processes
    # (the classic path's DistributedSampler is checked in tests/test_data.py)
    changes = {"total_epoch": 2, "fast_data": True, "triplet_weight": 1.0, "instances": 2, "warm_epoch": 1}
    ranks = run_two_processes(tmp_path, tiny_prepared, tmp_path / "model", changes)
    assert ranks[0]["history"]["skipped"] == [0, 0]  # P x K batches are always full
    run = tmp_path / "model" / "ddp"
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

    # Resume from epoch 1 in a copy of the run: both processes continue with their own random numbers,
    # so the run ends with exactly the weights of the uninterrupted one.
    copy = tmp_path / "resumed" / "ddp"
    shutil.copytree(run, copy)
    for later in ("net_002.pth", "net_last.pth"):
        (copy / later).unlink()
    resumed = run_two_processes(tmp_path, tiny_prepared, tmp_path / "resumed", changes, resume=True)
    for key, value in ranks[0]["model"].items():
        assert torch.equal(resumed[0]["model"][key], value), key
    assert resumed[0]["history"]["train_loss"] == ranks[0]["history"]["train_loss"]
