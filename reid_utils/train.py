"""The classic re-ID training loop, written to be read.

``python -m reid_utils.train --gpu_ids 0 --name ft_ResNet50 --train_all --batchsize 32 --data_dir <prepared>``

Each epoch has a ``train`` and a ``val`` phase. Every ``save_every`` epochs (and at the end)
the model, optimiser, scheduler and random-number state go to
``<model_dir>/<name>/net_XXX.pth`` (and ``net_last.pth``), the options to ``opts.yaml``,
and the loss/error curves to ``train.jpg``.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from reid_utils.data import build_dataloaders, display_path
from reid_utils.model import BACKBONES, ReIDNet, check_weights_fit, parameter_groups
from reid_utils.visualize import TrainingCurves


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
    amp: bool = True  # mixed precision on CUDA (and bf16 on CPUs that have it, with --bf16)
    label_smoothing: float = 0.0
    bnneck: bool = False
    triplet_weight: float = 0.0  # > 0 adds a batch-hard triplet loss and samples P identities x K images
    triplet_margin: float = 0.3
    instances: int = 4  # K, images per identity in a batch when the triplet loss is on
    skip_corrupt: bool = False  # leave unreadable images out instead of stopping
    fast_data: bool = False  # decode images once into a uint8 cache, augment whole batches (on the GPU when there)
    channels_last: bool = False  # NHWC memory layout: faster convolutions on recent GPUs (and some CPUs)
    bf16: bool = False  # bfloat16 autocast: on CUDA instead of float16; on CPUs with native bf16 instead of float32
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
        if self.triplet_weight < 0:
            raise TrainError(f"--triplet_weight must be >= 0, got {self.triplet_weight}.")
        if self.triplet_weight > 0 and not 2 <= self.instances <= self.batchsize // 2:
            raise TrainError(
                f"--instances {self.instances}: the triplet loss needs batches of P identities x K images with "
                f"K >= 2 and P >= 2 (here --batchsize {self.batchsize})."
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise TrainError(f"--name '{self.name}' may only use letters, digits, '_', '-' and '.'.")


# The two ways the notebooks run: a CPU demo on the embedded set, and the real baseline.
PROFILES = {
    "cpu-demo": {
        "name": "cpu_demo", "backbone": "resnet18", "height": 64, "width": 32, "batchsize": 32, "total_epoch": 20,
        "lr": 0.05, "train_all": False, "gpu_ids": "", "save_every": 10,
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
    from reid_utils.data import find_dataset

    real_data = not find_dataset(quiet=True).synthetic
    return "market-gpu" if torch.cuda.is_available() and real_data else "cpu-demo"


def seed_everything(seed: int) -> None:
    """Same seed, same run (on CPU): Python, NumPy and torch draw the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def distributed_context() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` normally; under ``torchrun`` it joins the process group first.

    ``torchrun --nproc_per_node=N -m reid_utils.train ...`` starts N copies of this program and tells
    each its rank through environment variables. Each process trains a full copy of the model on
    its own share of every epoch (``DistributedSampler``); ``DistributedDataParallel`` averages the
    gradients after every backward pass, so all copies stay identical. NCCL connects GPUs, gloo CPUs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():  # before NCCL starts: each process talks through its own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world_size


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux), or ``None`` where that file does not exist."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), so that bf16 autocast pays there.

    oneDNN's own query also says yes on AVX-512 CPUs without these instructions, where bfloat16 is emulated
    and slower than float32; so on Linux the CPU's flags decide.
    """
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without this query: assume not, train in float32
        return False


def reuse_freed_memory() -> bool:
    """Make this process keep the memory it frees for reuse, instead of handing it back to the OS at every step.

    A CPU training step allocates and frees the same large blocks each time (activations, gradients: tens of
    MB). glibc gives big freed blocks back to the operating system, which then has to map in and zero fresh
    pages on the next step. Raising glibc's two thresholds (``mallopt``) keeps them in the process: about 7 %
    faster training of the demo model on our 2-core machine, the very same numbers. The price: the process
    holds on to its peak memory until it ends. ``--fast_data`` on a CPU switches it on. Linux with glibc only;
    returns whether it took effect. (Starting Python with jemalloc or tcmalloc preloaded does the same.)
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (e.g. musl): leave it alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def choose_precision(opts: TrainOptions, device: torch.device) -> tuple[bool, str | None]:
    """Whether to autocast, and a one-line notice when ``--bf16`` cannot be honoured (``opts.bf16`` is then unset).

    CUDA: autocast unless ``amp`` is off -- bfloat16 with ``--bf16`` (float16 with loss scaling on GPUs
    without it), else float16. CPU: float32, unless ``--bf16`` on a CPU with native bfloat16, where it
    pays for large models (ResNet-50 at 256x128 trained ~3x faster on our 2-core test machine; the small
    demo model gains nothing). bfloat16 keeps float32's range, so it needs no loss scaling anywhere.
    """
    if device.type == "cuda":
        if opts.amp and opts.bf16 and not torch.cuda.is_bf16_supported():
            opts.bf16 = False
            return True, "This GPU has no bfloat16: mixed precision uses float16 with loss scaling instead."
        return opts.amp, None
    if opts.amp and opts.bf16:
        if cpu_has_bf16():
            return True, None
        opts.bf16 = False
        return False, "This CPU has no native bfloat16 (AVX-512 BF16 or AMX): training in float32 instead."
    return False, None


def select_device(gpu_ids: str, quiet: bool = False) -> tuple[torch.device, list[int]]:
    """``"0"`` -> cuda:0; ``"0,1"`` -> DataParallel over both; ``""`` -> CPU.

    Asking for a GPU on a machine without CUDA is not an error: the run falls back to the
    CPU and says so, because the same command should work on a laptop.
    """
    try:
        ids = [int(part) for part in str(gpu_ids).replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise TrainError(
            f"--gpu_ids '{gpu_ids}' is not a comma-separated list of GPU numbers (e.g. 0 or 0,1)."
        ) from None
    ids = [i for i in ids if i >= 0]  # the classic scripts use -1 for "no GPU"
    if not ids:
        return torch.device("cpu"), []
    if not torch.cuda.is_available():
        if not quiet:
            print(f"No CUDA GPU found: running on the CPU instead of GPU {','.join(map(str, ids))}.")
        return torch.device("cpu"), []
    missing = [i for i in ids if i >= torch.cuda.device_count()]
    if missing:
        raise TrainError(
            f"--gpu_ids names GPU {missing[0]}, but this machine has {torch.cuda.device_count()} "
            f"(numbered from 0). Check nvidia-smi."
        )
    return torch.device(f"cuda:{ids[0]}"), ids


def build_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum and weight decay, backbone at 0.1x the new layers' rate.

    ``fused=True`` updates all parameters in one kernel (same numbers, ~10 % faster CPU steps here);
    older PyTorch versions without it fall back to the plain loop over parameters.
    """
    settings = {"lr": lr, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    try:
        return torch.optim.SGD(parameter_groups(model, lr), fused=True, **settings)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(parameter_groups(model, lr), **settings)


def lr_factor(epoch: int, total_epoch: int, cosine: bool = False) -> float:
    """Step decay x0.1 after 2/3 of the epochs (epoch 40 of 60), or a cosine curve to zero."""
    if cosine:
        return 0.5 * (1 + math.cos(math.pi * epoch / total_epoch))
    return 0.1 if epoch >= round(total_epoch * 2 / 3) else 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, total_epoch: int, cosine: bool = False):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, total_epoch, cosine))


def run_dir(opts: TrainOptions) -> Path:
    return Path(opts.model_dir) / opts.name


def _atomic_save(obj: object, path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_options(opts: TrainOptions) -> Path:
    path = run_dir(opts) / "opts.yaml"
    tmp = path.with_name(".opts.yaml.tmp")
    tmp.write_text(yaml.safe_dump(asdict(opts), sort_keys=False))
    os.replace(tmp, path)
    return path


def load_options(run: str | os.PathLike) -> TrainOptions:
    """The options a run was trained with (from its ``opts.yaml``)."""
    path = Path(run) / "opts.yaml"
    if not path.is_file():
        raise TrainError(f"{path} not found: is '{Path(run).name}' the --name of a finished or running training?")
    saved = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in saved.items() if k in known})


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The numbered checkpoints of a run, oldest first."""
    return sorted(Path(folder).glob("net_[0-9][0-9][0-9].pth"))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """``net_last.pth`` when present (the end of a run), else the highest-numbered one."""
    folder = Path(folder)
    if (folder / "net_last.pth").is_file():
        return folder / "net_last.pth"
    numbered = checkpoints(folder)
    return numbered[-1] if numbered else None


class ReIDLoss(nn.Module):
    """Cross-entropy over the training identities (optionally label-smoothed) [+ a batch-hard triplet term].

    Label smoothing gives the true identity 1 - eps + eps/C and every other identity eps/C, so the
    network is never pushed towards infinitely confident scores on a few hundred training people.
    The triplet term pulls the features of one person together and pushes others away directly,
    which is what retrieval needs; it only applies in training, where batches hold K images per person.
    """

    def __init__(self, label_smoothing: float = 0.0, triplet_weight: float = 0.0, margin: float = 0.3) -> None:
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.triplet_weight = triplet_weight
        self.margin = margin

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None):
        loss = self.cross_entropy(logits, labels)
        if self.triplet_weight > 0 and features is not None:
            from reid_utils.losses import batch_hard_triplet_loss

            loss = loss + self.triplet_weight * batch_hard_triplet_loss(features, labels, margin=self.margin)
        return loss


def run_epoch_phase(model, loader, phase, device, criterion, optimizer, opts, state, scaler, use_amp, progress):
    """One pass over ``loader``; returns (mean loss, top-1 accuracy, images used, batches skipped)."""
    model.train(phase == "train")
    running_loss, running_corrects, seen, skipped = 0.0, 0, 0, 0
    for inputs, labels in loader:
        batch = inputs.size(0)
        # Skip the last, incomplete training batch: a tiny batch gives BatchNorm poor statistics
        # (a batch of one even fails) and its averaged loss would count each image more.
        if phase == "train" and batch < opts.batchsize:
            skipped += 1
            continue
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if phase == "train":
            optimizer.zero_grad()
        half = torch.bfloat16 if opts.bf16 else None  # None: float16 on CUDA
        with torch.set_grad_enabled(phase == "train"), torch.autocast(device.type, half, enabled=use_amp):
            outputs, features = model(inputs, with_features=True)
            preds = outputs.argmax(dim=1)
            loss = criterion(outputs, labels, features if phase == "train" else None)
        if phase == "train":
            if state["warm_up"] < 1.0:  # warm-up: scale the loss from 0.1 up to 1 over warm_epoch epochs
                state["warm_up"] = min(1.0, state["warm_up"] + 0.9 / state["warm_iterations"])
                loss = loss * state["warm_up"]
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        running_loss += loss.item() * batch
        running_corrects += (preds == labels).sum().item()
        seen += batch
        if progress is not None:
            progress.update(batch)
    if phase == "train" and dist.is_initialized():  # every process saw its own share: add them up
        totals = torch.tensor([running_loss, running_corrects, seen, skipped], dtype=torch.float64)
        dist.all_reduce(totals)
        running_loss, running_corrects, seen, skipped = totals[0].item(), *(int(v) for v in totals[1:].tolist())
    if seen == 0:
        raise TrainError(
            f"no {phase} batch was used: --batchsize {opts.batchsize} is larger than the {phase} set "
            f"({len(loader.dataset)} images). Use a smaller --batchsize."
        )
    return running_loss / seen, running_corrects / seen, seen, skipped


def train(
    opts: TrainOptions, resume: bool = False, overwrite: bool = False, quiet: bool = False, return_model: bool = False
):
    """Train (or resume) a run; returns the history of losses, errors and skipped batches (and the model).

    ``overwrite`` deletes an earlier run of the same name; without it or ``resume`` an
    existing run is an error, so checkpoints of two runs never mix. Under ``torchrun`` every
    process runs this function; only rank 0 prints, draws and writes files.
    """
    folder = run_dir(opts)
    existing = latest_checkpoint(folder) if folder.is_dir() else None
    if resume:
        if existing is None:
            raise TrainError(f"--resume: no checkpoint in {folder}. Start the run without --resume.")
        total_epoch = opts.total_epoch  # the one thing a resumed run may change: how long it goes on
        opts = load_options(folder)
        opts.total_epoch = total_epoch
    opts.check()
    rank, world_size = distributed_context()
    main_process = rank == 0  # only it prints, draws and saves
    quiet = quiet or not main_process
    if not resume and existing is not None:
        if not overwrite:
            raise TrainError(f"{folder} already holds a run. Pass --resume to continue it, or choose another --name.")
        if main_process:
            for old in [*checkpoints(folder), *(folder / f for f in ("net_last.pth", "train.jpg", "features.pt"))]:
                old.unlink(missing_ok=True)
    if world_size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device, gpu_ids = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"), []
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives (e.g. all_gather_object) use the current device
        dist.barrier()  # nobody starts before the old run is cleared away
    else:
        device, gpu_ids = select_device(opts.gpu_ids, quiet=quiet)
    # Each process its own seed: different dropout masks and augmentations (DDP copies rank 0's initial weights).
    seed_everything(opts.seed + rank)
    if opts.fast_data and device.type == "cpu":
        reuse_freed_memory()  # the CPU fast path: no fresh pages for every step's activations and gradients
    instances = opts.instances if opts.triplet_weight > 0 else 0
    if opts.fast_data:
        from reid_utils.fastdata import build_cached_loaders

        loaders, sizes, class_names = build_cached_loaders(
            opts.data_dir, opts.batchsize, opts.train_all, opts.height, opts.width, opts.erasing_p,
            opts.color_jitter, opts.seed, instances=instances, channels_last=opts.channels_last,
            device=device, shard=(rank, world_size),
        )  # fmt: skip
    else:
        loaders, sizes, class_names = build_dataloaders(
            opts.data_dir, opts.batchsize, opts.train_all, opts.height, opts.width, opts.erasing_p,
            opts.color_jitter, opts.num_workers, opts.seed, instances=instances, skip_corrupt=opts.skip_corrupt,
            shard=(rank, world_size),
        )  # fmt: skip
    if opts.num_classes not in (0, len(class_names)):
        raise TrainError(
            f"run {opts.name} was trained on {opts.num_classes} identities, {opts.data_dir} has "
            f"{len(class_names)}. Resume with the same --data_dir, or start a new --name."
        )
    opts.num_classes = len(class_names)
    model = ReIDNet(
        opts.num_classes, opts.backbone, opts.droprate, opts.stride, opts.linear_num,
        pretrained=opts.pretrained and not resume, quiet=quiet, bnneck=opts.bnneck,
    ).to(device)  # fmt: skip
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif len(gpu_ids) > 1:
        model = nn.DataParallel(model, device_ids=gpu_ids)  # splits each batch over the GPUs
    optimizer = build_optimizer(model, opts.lr)
    scheduler = build_scheduler(optimizer, opts.total_epoch, opts.cosine)
    # The options as this machine runs them (--bf16 may fall back); opts.yaml keeps what was asked for.
    step_opts = replace(opts)
    use_amp, notice = choose_precision(step_opts, device)
    if notice and not quiet:
        print(notice)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and not step_opts.bf16)  # bf16: no loss scaling
    if opts.compile:
        model = torch.compile(model)
    criterion = ReIDLoss(opts.label_smoothing, opts.triplet_weight, opts.triplet_margin)
    history = {"train_loss": [], "train_err": [], "val_loss": [], "val_err": [], "skipped": [], "seconds": []}
    warm_iterations = max(1, sizes["train"] // opts.batchsize) * opts.warm_epoch
    state = {"warm_up": 0.1 if opts.warm_epoch > 0 else 1.0, "warm_iterations": warm_iterations}
    start_epoch = 0
    if resume:
        checkpoint = torch.load(existing, map_location="cpu", weights_only=False)  # load_state_dict moves weights
        try:
            check_weights_fit(_unwrap(model), checkpoint["model"], str(existing))
        except ValueError as err:
            raise TrainError(str(err)) from None
        _unwrap(model).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history, state, start_epoch = checkpoint["history"], checkpoint["state"], checkpoint["epoch"]
        rng = checkpoint["rng"]
        per_process = rng.get("processes", [rng])
        if len(per_process) != world_size and not quiet:
            print(f"Note: {existing.name} was saved by {len(per_process)} process(es), this run has {world_size}: "
                  "it continues correctly, but not with the same random numbers as an uninterrupted run.")  # fmt: skip
        rng = per_process[rank] if len(per_process) == world_size else per_process[0]
        torch.set_rng_state(rng["torch"])
        loaders["train"].generator.set_state(rng["loader"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)  # dropout on the GPU draws from here
        if checkpoint.get("scaler"):  # empty when the saving run did not scale its loss
            scaler.load_state_dict(checkpoint["scaler"])  # the float16 loss scale reached so far
        if not quiet:
            print(f"Resuming {opts.name} from {existing.name} (epoch {start_epoch} of {opts.total_epoch}).")
    folder.mkdir(parents=True, exist_ok=True)
    if main_process:
        save_options(opts)
    curves = TrainingCurves(folder / "train.jpg", live=False if quiet else None)  # quiet: no live figure
    progress = None
    if not quiet:
        total = (opts.total_epoch - start_epoch) * (sizes["train"] + sizes["val"])
        progress = tqdm(total=total, unit="img", desc=opts.name, leave=True)

    try:
        for epoch in range(start_epoch, opts.total_epoch):
            started = time.perf_counter()
            if hasattr(loaders["train"].sampler, "set_epoch"):
                loaders["train"].sampler.set_epoch(epoch)  # the P x K sampler reshuffles per epoch, reproducibly
            for phase in ("train", "val"):
                loss, acc, _, skipped = run_epoch_phase(
                    model, loaders[phase], phase, device, criterion, optimizer, step_opts, state, scaler, use_amp,
                    progress,
                )  # fmt: skip
                history[f"{phase}_loss"].append(loss)
                history[f"{phase}_err"].append(1.0 - acc)
                if phase == "train":
                    history["skipped"].append(skipped)
            scheduler.step()
            history["seconds"].append(time.perf_counter() - started)
            if progress is not None:
                progress.set_postfix(epoch=epoch + 1, loss=f"{history['train_loss'][-1]:.3f}",
                                     val_err=f"{history['val_err'][-1]:.3f}")  # fmt: skip
            done = epoch + 1
            if done % opts.save_every == 0 or done == opts.total_epoch:
                rng = {"torch": torch.get_rng_state(), "loader": loaders["train"].generator.get_state()}
                if device.type == "cuda":
                    rng["cuda"] = torch.cuda.get_rng_state(device)
                if world_size > 1:  # every process's random state, so a resumed run draws what it would have
                    processes = [None] * world_size
                    dist.all_gather_object(processes, rng)
                    rng = {**rng, "processes": processes}
            if main_process and (done % opts.save_every == 0 or done == opts.total_epoch):
                checkpoint = {
                    "epoch": done, "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "history": history, "state": state, "rng": rng,
                    "scaler": scaler.state_dict(), "options": asdict(opts),
                }  # fmt: skip
                if done % opts.save_every == 0:
                    _atomic_save(checkpoint, folder / f"net_{done:03d}.pth")
                if done == opts.total_epoch:
                    _atomic_save(checkpoint, folder / "net_last.pth")
                curves.update(history)
    finally:
        if progress is not None:
            progress.close()  # also on errors and Ctrl-C: the message then starts on its own line
    history["curve_updates"] = curves.updates
    if return_model:
        return history, _unwrap(model)
    return history


def _unwrap(model: nn.Module) -> nn.Module:
    """The network itself, out of a DataParallel or DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.DataParallel | DistributedDataParallel) else model


def build_parser() -> argparse.ArgumentParser:
    d = TrainOptions()
    p = argparse.ArgumentParser(prog="python -m reid_utils.train", description="Train the re-ID baseline.")
    p.add_argument("--name", default=d.name, help="run name: checkpoints go to <model_dir>/<name>/")
    p.add_argument("--data_dir", required=True, help="a prepared folder (see python -m reid_utils.prepare)")
    p.add_argument("--model_dir", default=d.model_dir)
    p.add_argument("--gpu_ids", default=d.gpu_ids, help="e.g. 0, or 0,1 for DataParallel; -1 or '' for CPU")
    p.add_argument("--train_all", action="store_true", help="train on train_all/ (val images included)")
    p.add_argument("--batchsize", type=int, default=d.batchsize)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of the new layers (backbone: 0.1x)")
    p.add_argument("--total_epoch", type=int, default=None, help=f"default {d.total_epoch}; with --resume: as saved")
    p.add_argument("--warm_epoch", type=int, default=d.warm_epoch)
    p.add_argument("--cosine", action="store_true", help="cosine learning-rate decay instead of a step")
    p.add_argument("--erasing_p", type=float, default=d.erasing_p)
    p.add_argument("--color_jitter", action="store_true")
    p.add_argument("--backbone", default=d.backbone, choices=BACKBONES)
    p.add_argument("--stride", type=int, default=d.stride, choices=[1, 2])
    p.add_argument("--droprate", type=float, default=d.droprate)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--label_smoothing", type=float, default=d.label_smoothing, help="e.g. 0.1")
    p.add_argument("--bnneck", action="store_true", help="BNNeck head instead of the ClassBlock")
    p.add_argument("--triplet_weight", type=float, default=d.triplet_weight, help="> 0 adds a triplet loss")
    p.add_argument("--triplet_margin", type=float, default=d.triplet_margin)
    p.add_argument("--instances", type=int, default=d.instances, help="K images per identity (triplet)")
    p.add_argument("--fast_data", action="store_true", help="decode images once into (GPU) memory, batch augmentation")
    p.add_argument("--channels_last", action="store_true", help="NHWC memory layout for the convolutions")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU; CPUs with native bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--skip_corrupt", action="store_true", help="leave unreadable images out (with a notice)")
    p.add_argument("--no_pretrained", action="store_true", help="start from random weights")
    p.add_argument("--save_every", type=int, default=d.save_every, help="checkpoint + curves every N epochs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue <model_dir>/<name> from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run of the same name first")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(TrainOptions) if getattr(args, f.name, None) is not None}
    opts = TrainOptions(**given, pretrained=not args.no_pretrained)
    if args.total_epoch is None and args.resume and (run_dir(opts) / "opts.yaml").is_file():
        opts.total_epoch = load_options(run_dir(opts)).total_epoch
    if not Path(opts.data_dir).is_dir():
        print(f"train: error: --data_dir {opts.data_dir} does not exist.", file=sys.stderr)
        return 2
    try:
        history = train(opts, resume=args.resume, overwrite=args.overwrite)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            dist.destroy_process_group()
        if rank != 0:
            return 0  # rank 0 reports for everyone
    except (TrainError, FileNotFoundError, ValueError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        newest = latest_checkpoint(run_dir(opts)) if run_dir(opts).is_dir() else None
        where = f"the newest checkpoint is {display_path(newest)}" if newest else "no checkpoint was written yet"
        print(f"\ntrain: interrupted; {where}. Run the same command with --resume to continue.", file=sys.stderr)
        return 130
    folder = run_dir(opts)
    if history["train_loss"]:
        print(
            f"Done: {len(history['train_loss'])} epochs, train loss {history['train_loss'][-1]:.3f}, "
            f"val error {history['val_err'][-1]:.3f}. Checkpoints and train.jpg in {display_path(folder)}/"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
