"""Scale-out: two CPU processes under torchrun (gloo) train one model and stay identical."""

import subprocess
import sys
import textwrap

import torch

JOB = """
import sys

import torch
import torch.distributed as dist

from reid_utils.train import TrainOptions, train

data_dir, model_dir, out = sys.argv[1:4]
options = TrainOptions(name="ddp", data_dir=data_dir, model_dir=model_dir, gpu_ids="", backbone="resnet18",
                       height=32, width=16, batchsize=4, total_epoch=1, save_every=1, pretrained=False, lr=0.002)
history, model = train(options, quiet=True, return_model=True)
rank = dist.get_rank()
torch.save({"model": model.state_dict(), "history": history, "world": dist.get_world_size()}, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_gloo_processes_hold_identical_weights_and_rank_0_saves(tiny_prepared, tmp_path):
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(JOB))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(job), str(tiny_prepared), str(tmp_path / "model"), str(tmp_path)]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key  # gradients were averaged: the same model
    # metrics reduced over both processes: both report the same loss over all the images they used together
    assert ranks[0]["history"]["train_loss"] == ranks[1]["history"]["train_loss"]
    assert ranks[0]["history"]["skipped"][0] <= 2
    saved = torch.load(tmp_path / "model" / "ddp" / "net_last.pth", weights_only=False)  # written by rank 0
    assert saved["epoch"] == 1
    for key, value in saved["model"].items():
        assert torch.equal(value, ranks[0]["model"][key]), key
