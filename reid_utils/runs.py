"""A run folder, ``<model_dir>/<name>/``: what training writes and evaluation reads.

::

    opts.yaml      every option of the run (``TrainOptions``): evaluation rebuilds the same network from it
    net_010.pth    a checkpoint every ``save_every`` epochs: weights, optimiser, schedule, random state
    net_last.pth   the checkpoint of the last epoch
    train.jpg      the loss and error curves
    features.pt    what ``python -m reid_utils.test`` extracted

Training (``reid_utils.train``) and evaluation (``reid_utils.test``) both go through this module, so
neither needs the other to find a run's options or its newest checkpoint.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import yaml

from reid_utils.files import atomic_write
from reid_utils.model import BACKBONES

OPTIONS_FILE = "opts.yaml"
LAST_CHECKPOINT = "net_last.pth"


class TrainError(Exception):
    """A problem the user can fix (bad option, missing data, existing run...)."""


@dataclass
class TrainOptions:
    """Every knob of a run; saved as ``opts.yaml`` so evaluation can rebuild the same model."""

    name: str = "ft_ResNet50"
    data_dir: str = "data/prepared/Market"
    model_dir: str = "model"
    gpu_ids: str = "0"
    train_all: bool = False
    batchsize: int = 32
    lr: float = 0.05
    total_epoch: int = 60
    warm_epoch: int = 0
    cosine: bool = False
    erasing_p: float = 0.0
    color_jitter: bool = False
    backbone: str = "resnet50"
    stride: int = 2
    droprate: float = 0.5
    linear_num: int = 512
    height: int = 256
    width: int = 128
    pretrained: bool = True
    save_every: int = 10
    seed: int = 0
    num_workers: int | None = None
    label_smoothing: float = 0.0
    bnneck: bool = False
    triplet_weight: float = 0.0  # > 0 adds a batch-hard triplet loss and samples P identities x K images
    triplet_margin: float = 0.3
    instances: int = 4  # K, images per identity in a batch when the triplet loss is on
    skip_corrupt: bool = False  # leave unreadable images out instead of stopping
    fast_data: bool = False  # decode images once into a uint8 cache, augment whole batches (on the GPU when there)
    channels_last: bool = False  # NHWC memory layout: faster convolutions on recent GPUs (and some CPUs)
    fp16: bool = False  # float16 autocast with loss scaling (GPUs)
    bf16: bool = False  # bfloat16 autocast: on GPUs; on CPUs with native bf16
    compile: bool = False  # torch.compile the model (minutes of compilation, then faster steps)
    num_classes: int = 0  # filled in from the data

    def check(self) -> None:
        """Reject options that can only fail later, deep inside torch."""
        if self.total_epoch < 1:
            raise TrainError(f"--total_epoch must be at least 1, got {self.total_epoch}.")
        if self.batchsize < 2:
            raise TrainError(f"--batchsize must be at least 2 (BatchNorm needs 2 images), got {self.batchsize}.")
        if self.lr <= 0:
            raise TrainError(f"--lr must be positive, got {self.lr}.")
        if self.save_every < 1:
            raise TrainError(f"--save_every must be at least 1, got {self.save_every}.")
        if self.backbone not in BACKBONES:
            raise TrainError(f"--backbone {self.backbone} is unknown: choose one of {', '.join(BACKBONES)}.")
        if self.stride not in (1, 2):
            raise TrainError(f"--stride must be 1 or 2, got {self.stride}.")
        if not 0 <= self.droprate < 1 or not 0 <= self.erasing_p <= 1:
            raise TrainError("--droprate must be in [0, 1) and --erasing_p in [0, 1].")
        if not 0 <= self.label_smoothing < 1:
            raise TrainError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.linear_num < 1:
            raise TrainError(f"--linear_num must be at least 1, got {self.linear_num}.")
        if self.triplet_weight < 0:
            raise TrainError(f"--triplet_weight must be >= 0, got {self.triplet_weight}.")
        if self.triplet_weight > 0 and not 2 <= self.instances <= self.batchsize // 2:
            raise TrainError(
                f"--instances {self.instances}: the triplet loss needs batches of P identities x K images with "
                f"K >= 2 and P >= 2 (here --batchsize {self.batchsize})."
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise TrainError(f"--name '{self.name}' may only use letters, digits, '_', '-' and '.'.")


def run_dir(opts: TrainOptions) -> Path:
    """Where a run lives: ``<model_dir>/<name>``."""
    return Path(opts.model_dir) / opts.name


def save_options(opts: TrainOptions, folder: str | os.PathLike) -> Path:
    text = yaml.safe_dump(asdict(opts), sort_keys=False)
    return atomic_write(Path(folder) / OPTIONS_FILE, lambda tmp: tmp.write_text(text))


def load_options(folder: str | os.PathLike) -> TrainOptions:
    """The options a run was trained with (from its ``opts.yaml``)."""
    path = Path(folder) / OPTIONS_FILE
    if not path.is_file():
        raise TrainError(f"{path} not found: is '{Path(folder).name}' the --name of a finished or running training?")
    saved = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in saved.items() if k in known})


def checkpoint_name(epoch: int) -> str:
    return f"net_{epoch:03d}.pth"


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The numbered checkpoints of a run, oldest first."""
    return sorted(Path(folder).glob("net_[0-9][0-9][0-9].pth"))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """``net_last.pth`` when present (the end of a run), else the highest-numbered one."""
    folder = Path(folder)
    if (folder / LAST_CHECKPOINT).is_file():
        return folder / LAST_CHECKPOINT
    numbered = checkpoints(folder)
    return numbered[-1] if numbered else None


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file: a crash never leaves a half-written checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint, on the CPU (``load_state_dict`` moves weights where the model is; RNG states must stay)."""
    return torch.load(path, map_location="cpu", weights_only=False)
