"""The training profiles of notebooks 03-06, and the trained run the notebooks after 03 start from.

A profile is a set of ``TrainOptions``: a CPU demo on the embedded set (the default without a GPU), a
two-minute check that a laptop runs the whole series (numbers that mean little), and the real baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from reid_utils.data import display_path, find_dataset
from reid_utils.runs import (
    LAST_CHECKPOINT,
    TrainError,
    TrainOptions,
    checkpoint_epoch,
    latest_checkpoint,
    load_options,
    run_dir,
)
from reid_utils.train import train

# The demo's lr is 0.02: the classic 0.05 suits an ImageNet-pretrained backbone; from random weights it makes the
# val loss jump to ~80 in epoch 2 (BatchNorm's running statistics lag behind the fast-moving weights).
PROFILES = {
    "cpu-demo": {
        "name": "cpu_demo", "backbone": "resnet18", "height": 64, "width": 32, "batchsize": 32, "total_epoch": 12,
        "lr": 0.02, "train_all": False, "gpu_ids": "", "save_every": 10,
    },
    "cpu-quick": {
        "name": "cpu_quick", "backbone": "resnet18", "height": 32, "width": 16, "batchsize": 32, "total_epoch": 4,
        "lr": 0.02, "train_all": False, "gpu_ids": "", "save_every": 2,
    },
    "market-gpu": {
        "name": "ft_ResNet50", "backbone": "resnet50", "height": 256, "width": 128, "batchsize": 32, "total_epoch": 60,
        "lr": 0.05, "train_all": True, "gpu_ids": "0", "save_every": 10,
        "fast_data": True, "channels_last": True, "bf16": True,  # the GPU fast path (benchmarks/RESULTS.md)
    },
}  # fmt: skip


def pick_profile(profile: str | None = None) -> str:
    """The profile asked for, else ``market-gpu`` when a GPU and Market-1501 are both here, else ``cpu-demo``."""
    if profile is not None:
        if profile not in PROFILES:
            raise TrainError(f"unknown profile '{profile}': choose one of {', '.join(PROFILES)}.")
        return profile
    real_data = not find_dataset(quiet=True).synthetic
    return "market-gpu" if torch.cuda.is_available() and real_data else "cpu-demo"


def trained_run(prepared: str | Path, model_dir: str | Path, profile: str = "cpu-demo") -> Path:
    """The run notebook 03 trains with ``profile``; finished here with the same code (and said so) when it is not.

    Lets every notebook after 03 run on its own, in a fresh kernel, in any order. A run that notebook 03 began
    and did not finish (stopped, or the kernel died) is continued from its newest checkpoint, never trained
    again from the start.
    """
    options = TrainOptions(data_dir=str(prepared), model_dir=str(model_dir), **PROFILES[profile])
    run = run_dir(options)
    if (run / LAST_CHECKPOINT).is_file():
        print(f"Using the model trained in notebook 03: {display_path(run)}/{LAST_CHECKPOINT}")
        return run
    newest = latest_checkpoint(run)
    if newest is None:
        print(f"No trained model in {display_path(run)}: training it now with the settings of notebook 03.")
        train(options)
    else:
        done, total = checkpoint_epoch(newest), load_options(run).total_epoch
        print(f"Notebook 03's training in {display_path(run)} stopped after epoch {done} of {total}: "
              f"continuing it from {newest.name}.")  # fmt: skip
        train(options, resume=True, given={"name", "model_dir", "data_dir"})  # the run's own options otherwise
    return run
