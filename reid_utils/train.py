"""The classic re-ID training loop, written to be read.

``python -m reid_utils.train --gpu_ids 0 --name ft_ResNet50 --train_all --batchsize 32 --data_dir <prepared>``

``train_one_phase`` is the inner loop of the classic ``train.py``: one pass over the training or the
validation images. ``train`` runs it for every epoch (``train`` phase, then ``val``) with SGD and the
step schedule, redraws the loss/error curves after every epoch, and every ``save_every`` epochs (and at the
end) saves a checkpoint into the run folder (``reid_utils.runs``).

What only makes training faster or spreads it over several GPUs -- mixed precision (``speed``), the
fast data path (``fastdata``), DistributedDataParallel (``distributed``) -- and the warm-up of
``losses`` are wrapped around the loop, never written into it.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from reid_utils import distributed
from reid_utils.data import (
    ClassicData,
    CorruptImageError,
    build_dataloaders,
    display_path,
    error_line,
    find_dataset,
)
from reid_utils.fastdata import CachedData
from reid_utils.files import DISK_FULL, free_space, remove_stale_temporaries, size_text, write_problem
from reid_utils.losses import ReIDLoss, WarmUp
from reid_utils.model import BACKBONES, build_model, check_weights_fit, parameter_groups, select_device, unwrap
from reid_utils.runs import (
    LAST_CHECKPOINT,
    THIS_MACHINE,
    WHERE,
    DamagedCheckpointError,
    RunLock,
    TrainError,
    TrainOptions,
    check_checkpoint_matches,
    checkpoint_epoch,
    checkpoint_name,
    checkpoints_newest_first,
    foreign_files,
    latest_checkpoint,
    load_checkpoint,
    load_options,
    remove_run_files,
    remove_unused_run,
    resume_options,
    run_dir,
    save_checkpoint,
    save_options,
)
from reid_utils.speed import Autocast, ScaledLoss, ScaledOptimizer, choose_precision, reuse_freed_memory
from reid_utils.visualize import TrainingCurves

# How the notebooks from 03 on train: a CPU demo on the embedded set (the default without a GPU), a two-minute
# check that a laptop runs the whole series (numbers that mean little), and the real baseline.
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


def seed_everything(seed: int) -> None:
    """Same seed, same run (on CPU): Python, NumPy and torch draw the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


# --------------------------------------------------------------------------- the loop


class PhaseResult(NamedTuple):
    """What one pass over a loader adds up: summed loss, correct predictions, images used, batches skipped."""

    running_loss: float
    running_corrects: int
    seen: int
    skipped: int

    @property
    def loss(self) -> float:
        return self.running_loss / self.seen

    @property
    def accuracy(self) -> float:
        return self.running_corrects / self.seen


def train_one_phase(model, loader, phase, criterion, optimizer, device) -> PhaseResult:
    """One pass over ``loader``: ``"train"`` updates the model, ``"val"`` only measures it."""
    model.train(phase == "train")  # dropout and BatchNorm behave differently when training
    running_loss, running_corrects, seen, skipped = 0.0, 0, 0, 0
    for inputs, labels in loader:
        now_batch_size = inputs.size(0)
        # Skip the last, incomplete training batch: a tiny batch gives BatchNorm poor statistics
        # (a batch of one even fails) and its averaged loss would count each image more.
        if phase == "train" and now_batch_size < loader.batch_size:
            skipped += 1
            continue
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if phase == "train":
            optimizer.zero_grad()
        with torch.set_grad_enabled(phase == "train"):  # val: no graph is built
            outputs = model(inputs)
            preds = outputs.argmax(dim=1)
            loss = criterion(outputs, labels)
        if phase == "train":
            loss.backward()
            optimizer.step()
        running_loss += loss.item() * now_batch_size
        running_corrects += (preds == labels).sum().item()
        seen += now_batch_size
    return PhaseResult(running_loss, running_corrects, seen, skipped)


class Counted:
    """A loader that moves a progress bar by the images of every batch it hands out, skipped ones included."""

    def __init__(self, loader, bar: tqdm) -> None:
        self.loader = loader
        self.bar = bar
        self.batch_size = loader.batch_size

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            yield batch
            self.bar.update(len(batch[1]))


def images_per_epoch(loader) -> int:
    """How many images one pass over a loader hands out (this process's share under torchrun)."""
    sampler = getattr(loader, "sampler", None)
    return len(sampler) if sampler is not None else len(loader.dataset)


def images_to_come(loaders: dict, epochs: range) -> int:
    """All the images the loaders hand out over ``epochs`` (a P x K epoch's count depends on its shuffle)."""
    total = 0
    for epoch in epochs:
        loaders["train"].sampler.set_epoch(epoch)
        total += images_per_epoch(loaders["train"]) + images_per_epoch(loaders["val"])
    return total


# --------------------------------------------------------------------------- a whole run


def data_backend(opts: TrainOptions, device: torch.device):
    """The data path of a run: the classic ``DataLoader``, or the cached fast path (on the training device)."""
    if opts.fast_data:
        return CachedData(opts.channels_last, device, num_threads=opts.num_workers or None)
    return ClassicData(opts.num_workers)


@dataclass
class RunProgress:
    """How far a call of ``train`` got: what an interruption or a failed write reports."""

    total_epoch: int
    save_every: int
    epoch: int = 0  # the epoch running now (1-based); 0: not started yet
    newest: Path | None = None  # the newest checkpoint of this run (written now, or resumed from)
    replacing: bool = False  # an earlier run of the name is still in the folder, untouched

    def what_is_kept(self, folder: Path) -> str:
        """``the newest checkpoint is ...`` / ``no checkpoint ... yet; the earlier run ... is unchanged``."""
        if self.newest is not None:
            return f"the newest checkpoint is {display_path(self.newest)}"
        first = min(self.save_every, self.total_epoch)
        kept = f"; the earlier run in {display_path(folder)} is unchanged" if self.replacing else ""
        return f"no checkpoint of this run was written yet (the first comes after epoch {first}){kept}"

    def next_step(self, resume: str, again: str) -> str:
        """What to do to go on: ``resume`` when there is a checkpoint to continue from, else ``again``."""
        return f"{resume} to continue from it" if self.newest is not None else f"{again} to start over"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or Jupyter's stop button during ``train``: where it stopped, what is kept, how to go on.

    A ``KeyboardInterrupt`` still (anything that stops on Ctrl-C stops on it), with a message instead of
    the torch internals the interrupt happened to land in; Jupyter shows only that line
    (``_render_traceback_``, IPython's hook for exceptions that render themselves).
    """

    def __init__(self, folder: Path, progress: RunProgress) -> None:
        self.folder, self.progress = folder, progress
        again = "call train(options, resume='auto') again"  # what notebook 03's cell does when run again
        super().__init__(f"training {self.line(again, again)}")

    def line(self, resume: str, again: str) -> str:
        """``interrupted in epoch 3 of 12; <what is kept>. <What to do>.``"""
        stage = f"in epoch {self.progress.epoch} of {self.progress.total_epoch}" if self.progress.epoch else (
            "before the first epoch")  # fmt: skip
        step = self.progress.next_step(resume, again)
        return f"interrupted {stage}; {self.progress.what_is_kept(self.folder)}. {step[0].upper()}{step[1:]}."

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


def train(
    opts: TrainOptions,
    resume: bool | str = False,
    overwrite: bool = False,
    quiet: bool = False,
    return_model: bool = False,
    given: set[str] | None = None,
):
    """Train (or resume) a run; returns the history of losses, errors and skipped batches (and the model).

    ``overwrite`` replaces an earlier run of the same name; without it or ``resume`` an existing run is an
    error, so checkpoints of two runs never mix, and a run folder in use by another training is refused.
    The earlier run stays whole until the new one has written its first checkpoint: a new run that fails
    or is stopped before that loses nothing. ``resume`` continues the newest readable checkpoint of the
    folder ``opts`` points to; ``given`` names the options the user gave for it (``None``: all of ``opts``;
    see ``runs.resume_options``). ``resume="auto"`` continues a run of these same options that stopped
    early, and otherwise starts afresh as ``overwrite`` does (what a notebook cell run again wants).
    Ctrl-C raises ``TrainingInterrupted``, which says what is kept. Under ``torchrun`` every process runs
    this function; only rank 0 prints, draws and writes files.
    """
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', not {resume!r}")
    opts.check()
    rank, world_size = distributed.distributed_context()
    folder = run_dir(opts)
    created = not folder.exists()
    if not created and not holds_checkpoints(folder) and foreign_files(folder):
        raise TrainError(
            f"{folder} is not a run folder (it holds {', '.join(foreign_files(folder)[:3])}): training would write "
            f"its files among them. Choose another --name or --model_dir."
        )
    lock, problem = RunLock(folder), None
    if rank == 0:  # the first write into the folder: an unwritable one is found before any work
        try:
            lock.acquire()
        except TrainError as err:
            problem = err
    if distributed.sum_over_processes([problem is not None])[0]:  # all processes stop together
        raise problem or TrainError(f"the first process could not take {folder}: see its message.")
    progress = RunProgress(opts.total_epoch, opts.save_every)
    try:
        return _train_in(folder, opts, resume, overwrite, quiet or rank != 0, return_model, given, rank, world_size,
                         progress)  # fmt: skip
    except KeyboardInterrupt:
        if rank == 0 and created:
            remove_unused_run(folder)
        raise TrainingInterrupted(folder, progress) from None
    except BaseException:
        if rank == 0 and created:
            remove_unused_run(folder)  # a run that never wrote a checkpoint leaves no folder behind
        raise
    finally:
        lock.release()


def holds_checkpoints(folder: Path) -> bool:
    """Whether ``folder`` holds any checkpoint, readable or not (then it is a run folder)."""
    return bool(checkpoints_newest_first(folder))


def auto_resume(folder: Path, found: list, opts: TrainOptions) -> tuple[bool, str]:
    """For ``resume="auto"``: whether to continue the run in ``folder``, and a notice saying why not.

    Continued: a run of these same options (the machine's settings and the epoch count aside) that has not
    finished. Started afresh: a finished run (training again is what a cell run again asks for), or one with
    other options (the new options are what the user wants now).
    """
    readable = [(path, epoch) for path, epoch in found if epoch is not None]
    if not readable:
        return False, ""
    newest, epoch = readable[0]
    if epoch >= opts.total_epoch and newest.name == LAST_CHECKPOINT:
        return False, ""
    try:
        saved = load_options(folder)
    except TrainError as err:
        return False, f"Note: {err} Training {opts.name} afresh."
    changed = [
        f"{key} {getattr(saved, key)} -> {getattr(opts, key)}"
        for key in (f.name for f in fields(TrainOptions))
        if key not in (*WHERE, *THIS_MACHINE, "num_classes") and getattr(saved, key) != getattr(opts, key)
    ]
    if changed:
        return False, (
            f"Note: {display_path(folder)} holds a run stopped after epoch {epoch} with other options "
            f"({', '.join(changed[:4])}): training afresh; that run stays until this one's first checkpoint."
        )
    return True, ""


def checkpoint_bytes(model: nn.Module) -> int:
    """About how large one checkpoint of ``model`` is: its weights and buffers, and SGD's momentum per weight."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int((state + momentum) * 1.01) + 100_000  # pickled names, the history, the random state


def check_free_space(folder: Path, model: nn.Module, opts: TrainOptions, epochs: range, quiet: bool) -> None:
    """Refuse a run whose next checkpoint cannot fit on the disk (before hours of work), warn when later ones won't."""
    size, free = checkpoint_bytes(model), free_space(folder)
    if free < size:
        raise TrainError(
            f"the disk holding {folder} has {size_text(free)} free, and a checkpoint of this run takes about "
            f"{size_text(size)}. Free some space, or choose a --model_dir on another disk."
        )
    count = sum(1 for e in epochs if (e + 1) % opts.save_every == 0) + 1  # and net_last.pth
    if free < count * size and not quiet:
        print(f"Note: this run writes {count} checkpoints of about {size_text(size)}, and the disk holding {folder} "
              f"has {size_text(free)} free: it fills up before the end unless space is freed.")  # fmt: skip


def write_failed(err: OSError, folder: Path, progress: RunProgress) -> TrainError | None:
    """A full disk, read-only or unwritable folder while saving, as one line with what to do then."""
    problem = write_problem(err)
    if problem is None:
        return None
    kept = progress.what_is_kept(folder)
    fix = "free some space" if err.errno in DISK_FULL else "make the folder writable (or move the run elsewhere)"
    step = progress.next_step("run the same command with --resume", "run the same command again")
    return TrainError(f"{problem}. {kept[0].upper()}{kept[1:]}: {fix}, then {step}.")


def _train_in(folder, opts, resume, overwrite, quiet, return_model, given, rank, world_size, progress):
    """``train`` once the run folder is held: options, data, model, the epochs, the checkpoints."""
    main_process = rank == 0  # only it prints, draws and saves
    if main_process:
        remove_stale_temporaries(folder)  # half-written checkpoints of killed runs
    found = checkpoints_newest_first(folder)
    if resume == "auto":
        resume, notice = auto_resume(folder, found, opts)
        overwrite = overwrite or not resume
        if notice and not quiet:
            print(notice)
    checkpoint, requested = None, opts
    if resume:
        if not found:
            raise TrainError(f"--resume: no checkpoint in {folder}. Start the run without --resume.")
        opts, notice = resume_options(load_options(folder), opts, given)
        opts.check()
        progress.total_epoch, progress.save_every = opts.total_epoch, opts.save_every
        if notice and not quiet:
            print(notice)
        checkpoint, resumed_from = newest_readable_checkpoint(found, quiet)
        progress.newest = resumed_from
        check_checkpoint_matches(checkpoint, opts, resumed_from)
        if opts.total_epoch < checkpoint["epoch"]:
            raise TrainError(
                f"--total_epoch {opts.total_epoch} is less than the {checkpoint['epoch']} epochs {opts.name} has "
                f"done: give a larger --total_epoch to go on, or leave it out."
            )
    elif found:
        if not overwrite:
            raise TrainError(f"{folder} already holds a run. Pass --resume to continue it, or choose another --name.")
        progress.replacing = True  # its files go when this run has written its first checkpoint
    if world_size > 1:
        device = torch.device(f"cuda:{distributed.local_rank()}" if torch.cuda.is_available() else "cpu")
        gpu_ids: list[int] = []
        distributed.barrier()  # every process has read the folder before the first one writes into it
    else:
        device, gpu_ids = select_device(opts.gpu_ids, quiet=quiet)
    if len(gpu_ids) > 1 and opts.triplet_weight > 0:
        raise TrainError(
            "the triplet loss needs the features of a whole batch in one process, which --gpu_ids with several "
            "GPUs (DataParallel) splits up. Use torchrun --nproc_per_node=N instead."
        )
    # Each process its own seed: different dropout masks and augmentations (DDP copies rank 0's initial weights).
    seed_everything(opts.seed + rank)
    if opts.fast_data and device.type == "cpu":
        reuse_freed_memory()  # the CPU fast path: no fresh pages for every step's activations and gradients
    loaders, sizes, class_names = build_dataloaders(
        opts.data_dir, opts.batchsize, opts.train_all, opts.height, opts.width, opts.erasing_p, opts.color_jitter,
        opts.seed, instances=opts.instances if opts.triplet_weight > 0 else 0, skip_corrupt=opts.skip_corrupt,
        shard=(rank, world_size), backend=data_backend(opts, device),
    )  # fmt: skip
    if opts.num_classes not in (0, len(class_names)):
        raise TrainError(
            f"run {opts.name} was trained on {opts.num_classes} identities, {opts.data_dir} has "
            f"{len(class_names)}. Resume with the same --data_dir, or start a new --name."
        )
    opts.num_classes = requested.num_classes = len(class_names)  # filled in for the caller too, resumed or not
    check_batches_fit(loaders, opts)

    model = build_model(opts, pretrained=opts.pretrained and not resume, quiet=quiet).to(device)
    criterion = ReIDLoss(opts.label_smoothing, opts.triplet_weight, opts.triplet_margin).watch(model)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif len(gpu_ids) > 1:
        model = nn.DataParallel(model, device_ids=gpu_ids)  # splits each batch over the GPUs
    optimizer = build_optimizer(model, opts.lr)
    scheduler = build_scheduler(optimizer, opts.total_epoch, opts.cosine)
    if opts.compile:
        model = torch.compile(model)

    # Around the loop: mixed precision (the model, the criterion and the optimiser get wrapped) and warm-up.
    step_optimizer, scaler = optimizer, None
    dtype, notice = choose_precision(device, opts.fp16, opts.bf16, unwrap(model), (opts.height, opts.width))
    if notice and not quiet:
        print(notice)
    if dtype is not None:
        model, criterion = Autocast(model, device.type, dtype), Autocast(criterion, device.type, dtype)
    warm_up = None
    if opts.warm_epoch > 0:  # this process's steps per epoch: its share of the images under torchrun
        steps_per_epoch = max(1, images_per_epoch(loaders["train"]) // opts.batchsize)
        warm_up = criterion = WarmUp(criterion, steps_per_epoch * opts.warm_epoch)
    if dtype == torch.float16:  # float16 needs loss scaling; bfloat16 does not
        scaler = torch.amp.GradScaler(device.type)
        criterion, step_optimizer = ScaledLoss(criterion, scaler), ScaledOptimizer(optimizer, scaler)

    history = {"train_loss": [], "train_err": [], "val_loss": [], "val_err": [], "skipped": [], "seconds": []}
    start_epoch = 0
    if checkpoint is not None:
        try:
            check_weights_fit(unwrap(model), checkpoint["model"], str(resumed_from))
        except ValueError as err:
            raise TrainError(str(err)) from None
        unwrap(model).load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history, start_epoch = checkpoint["history"], checkpoint["epoch"]
        if warm_up is not None:
            warm_up.factor = checkpoint["state"]["warm_up"]
        rng = checkpoint["rng"]
        per_process = rng.get("processes", [rng])
        if len(per_process) != world_size and not quiet:
            print(f"Note: {resumed_from.name} was saved by {len(per_process)} process(es), this run has {world_size}: "
                  "it continues correctly, but not with the same random numbers as an uninterrupted run.")  # fmt: skip
        rng = per_process[rank] if len(per_process) == world_size else per_process[0]
        torch.set_rng_state(rng["torch"])  # dropout; the data's random numbers follow from (seed, epoch)
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)  # dropout on the GPU draws from here
        if scaler is not None and checkpoint.get("scaler"):  # empty when the saving run did not scale its loss
            scaler.load_state_dict(checkpoint["scaler"])  # the float16 loss scale reached so far
        if not quiet:
            print(f"Resuming {opts.name} from {resumed_from.name} (epoch {start_epoch} of {opts.total_epoch}).")
    curves = TrainingCurves(folder / "train.jpg", live=False if quiet else None)  # quiet: no live figure
    curves.updates = history.get("curve_updates", 0)  # a resumed run counts the redraws before it too
    if main_process:
        check_free_space(folder, unwrap(model), opts, range(start_epoch, opts.total_epoch), quiet)
        if not progress.replacing:  # a replaced run's opts.yaml goes with its checkpoints, not before
            _saving(folder, progress, save_options, opts, folder)
        if checkpoint is not None and start_epoch == opts.total_epoch and resumed_from.name != LAST_CHECKPOINT:
            # the run ended, but net_last.pth is missing (killed while it was copied): put it in place now
            _saving(folder, progress, save_checkpoint, checkpoint, folder / LAST_CHECKPOINT, resumed_from)
    bar = None
    if not quiet:  # one bar for the whole run, counting images; it ends at 100 %
        total = images_to_come(loaders, range(start_epoch, opts.total_epoch))
        bar = tqdm(total=total, unit="img", desc=opts.name, leave=True)

    try:
        for epoch in range(start_epoch, opts.total_epoch):
            progress.epoch = epoch + 1
            started = time.perf_counter()
            loaders["train"].sampler.set_epoch(epoch)  # this epoch's order and augmentation follow from it
            for phase in ("train", "val"):
                loader = loaders[phase] if bar is None else Counted(loaders[phase], bar)
                result = train_one_phase(model, loader, phase, criterion, step_optimizer, device)
                if phase == "train":  # every process saw its own share: add them up
                    result = PhaseResult(*distributed.sum_over_processes(result))
                if result.seen == 0:
                    raise TrainError(
                        f"no {phase} batch was used: --batchsize {opts.batchsize} is larger than the {phase} set "
                        f"({sizes[phase]} images). Use a smaller --batchsize."
                    )
                if not math.isfinite(result.loss):
                    raise diverged(folder, opts, epoch + 1, result.loss, progress.newest)
                history[f"{phase}_loss"].append(result.loss)
                history[f"{phase}_err"].append(1.0 - result.accuracy)
                if phase == "train":
                    history["skipped"].append(int(result.skipped))
            scheduler.step()
            history["seconds"].append(time.perf_counter() - started)
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{history['train_loss'][-1]:.3f}",
                                val_err=f"{history['val_err'][-1]:.3f}")  # fmt: skip
            done = epoch + 1
            checkpoint_due = done % opts.save_every == 0 or done == opts.total_epoch
            if checkpoint_due:
                rng = {"torch": torch.get_rng_state()}
                if device.type == "cuda":
                    rng["cuda"] = torch.cuda.get_rng_state(device)
                if world_size > 1:  # every process's random state, so a resumed run draws what it would have
                    rng = {**rng, "processes": distributed.gather_from_processes(rng)}
                if main_process:
                    history["curve_updates"] = curves.updates + 1  # this save's redraw included
                    checkpoint = {
                        "epoch": done, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "history": history, "rng": rng,
                        "state": {"warm_up": warm_up.factor if warm_up is not None else 1.0},
                        "scaler": scaler.state_dict() if scaler is not None else {}, "options": asdict(opts),
                    }  # fmt: skip
                    _saving(folder, progress, save_epoch, checkpoint, folder, opts, progress)
            # Watched, the curves are redrawn after every epoch, as layumi's train.py does (its tutorial says every
            # 10); a quiet run (an ablation, a test) draws train.jpg with each checkpoint only.
            if main_process and (checkpoint_due or not quiet):
                _saving(folder, progress, curves.update, history)
    finally:
        if bar is not None:
            bar.close()  # also on errors and Ctrl-C: the message then starts on its own line
    history["curve_updates"] = curves.updates
    if return_model:
        return history, unwrap(model)
    return history


def check_batches_fit(loaders: dict, opts: TrainOptions) -> None:
    """A ``--batchsize`` larger than the training set: said before the first batch, not after a wasted pass.

    Every batch would be short and skipped (BatchNorm needs full batches). Under torchrun the count is this
    process's share of the images.
    """
    images = images_per_epoch(loaders["train"])
    if images < opts.batchsize:
        fits = f"Use --batchsize {images} or less." if images >= 2 else "Add images to the training set."
        raise TrainError(
            f"--batchsize {opts.batchsize} is larger than the training set ({images} images per epoch"
            f"{' in this process' if distributed.is_distributed() else ''}): every batch would be short and "
            f"skipped. {fits}"
        )


def save_epoch(checkpoint: dict, folder: Path, opts: TrainOptions, progress: RunProgress) -> None:
    """This epoch's checkpoint(s): ``net_XXX.pth`` every ``save_every`` epochs, ``net_last.pth`` at the end.

    The first checkpoint of a run that replaces an earlier one takes the earlier run's place: its
    checkpoints, curves and features are deleted, and this run's ``opts.yaml`` written, only once the new
    checkpoint is complete on the disk (right before it is renamed into place).
    """
    done = checkpoint["epoch"]

    def replace_the_earlier_run() -> None:
        save_options(opts, folder)  # first: a failure here leaves the earlier run whole
        remove_run_files(folder)
        progress.replacing = False

    retire = replace_the_earlier_run if progress.replacing else None
    numbered = None
    if done % opts.save_every == 0:
        numbered = save_checkpoint(checkpoint, folder / checkpoint_name(done), before_replace=retire)
        progress.newest, retire = numbered, None
    if done == opts.total_epoch:
        progress.newest = save_checkpoint(checkpoint, folder / LAST_CHECKPOINT, saved_as=numbered,
                                          before_replace=retire)  # fmt: skip


def _saving(folder: Path, progress: RunProgress, write, *args):
    """``write(*args)``; a full disk or an unwritable folder becomes one ``TrainError`` line with what to do."""
    try:
        return write(*args)
    except OSError as err:
        problem = write_failed(err, folder, progress)
        if problem is None:
            raise
        raise problem from None


def newest_readable_checkpoint(found: list[tuple[Path, int | None]], quiet: bool = False) -> tuple[dict, Path]:
    """The newest checkpoint that loads; each damaged newer one is named in a notice and passed over."""
    damaged = [f"{path} cannot be read (empty or cut short)." for path, epoch in found if epoch is None]
    for path, epoch in found:
        if epoch is None:  # its epoch is unknown: it may have been the newest, so it was named above
            continue
        try:
            checkpoint = load_checkpoint(path)
        except DamagedCheckpointError as err:
            damaged.append(str(err))
            continue
        if damaged and not quiet:
            print(f"Note: {' '.join(damaged)} Resuming from {path.name}, the newest checkpoint that can be read.")
        return checkpoint, path
    raise TrainError(f"no checkpoint of this run can be read: {' '.join(damaged)} Start the run again.")


def diverged(folder: Path, opts: TrainOptions, epoch: int, loss: float, newest: Path | None) -> TrainError:
    """The error for a loss that became NaN or infinite: no checkpoint of the broken weights is written.

    ``newest``: this run's newest checkpoint (an earlier run being replaced may have newer-looking ones).
    """
    where = f"the last good checkpoint is {newest.name}" if newest else "no checkpoint was written yet"
    return TrainError(
        f"the training loss became {loss} in epoch {epoch}: the run diverged and was stopped; {where}. "
        f"Train again with a smaller --lr (now {opts.lr}) or with --warm_epoch."
    )


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


# --------------------------------------------------------------------------- the command line


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
    p.add_argument("--linear_num", type=int, default=d.linear_num, help="size of the embedding (the test feature)")
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--label_smoothing", type=float, default=d.label_smoothing, help="e.g. 0.1")
    p.add_argument("--bnneck", action="store_true", help="BNNeck head instead of the ClassBlock")
    p.add_argument("--triplet_weight", type=float, default=d.triplet_weight, help="> 0 adds a triplet loss")
    p.add_argument("--triplet_margin", type=float, default=d.triplet_margin)
    p.add_argument("--instances", type=int, default=d.instances, help="K images per identity (triplet)")
    p.add_argument("--fast_data", action="store_true", help="decode images once into (GPU) memory, batch augmentation")
    p.add_argument("--channels_last", action="store_true", help="NHWC memory layout for the convolutions")
    p.add_argument("--fp16", action="store_true", help="float16 mixed precision with loss scaling (GPU)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (GPU; CPUs with native bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--skip_corrupt", action="store_true", help="leave unreadable images out (with a notice)")
    p.add_argument("--no_pretrained", action="store_true", help="start from random weights")
    p.add_argument("--save_every", type=int, default=d.save_every, help="a checkpoint every N epochs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (with --fast_data: threads)")
    p.add_argument("--resume", action="store_true", help="continue <model_dir>/<name> from its last checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run of the same name (it stays until this run saves its first checkpoint)",
    )
    return p


def named_on_the_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options the user typed (argparse fills in defaults only for missing names)."""
    unset = object()
    dests = vars(parser.parse_args(argv))
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {dest for dest, value in vars(probe).items() if value is not unset}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = named_on_the_command_line(parser, argv)
    given = {"pretrained" if dest == "no_pretrained" else dest for dest in given}
    values = {f.name: getattr(args, f.name) for f in fields(TrainOptions) if getattr(args, f.name, None) is not None}
    opts = TrainOptions(**values, pretrained=not args.no_pretrained)
    if not Path(opts.data_dir).is_dir():
        print(f"train: error: --data_dir {opts.data_dir} does not exist.", file=sys.stderr)
        return 2
    try:
        history = train(opts, resume=args.resume, overwrite=args.overwrite, given=given)
        rank = distributed.rank()
        distributed.shutdown()
        if rank != 0:
            return 0  # rank 0 reports for everyone
    except (TrainError, FileNotFoundError, ValueError) as err:
        hint = " Or pass --skip_corrupt to leave unreadable images out." if isinstance(err, CorruptImageError) else ""
        print(f"train: error: {error_line(err)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # exit code 130 = 128 + SIGINT, what shells report for Ctrl-C
        if isinstance(stop, TrainingInterrupted):
            line = stop.line("run the same command with --resume", "run the same command again")
        else:  # before training had begun: nothing was written
            line = "interrupted before training began; nothing was written. Run the same command again."
        print(f"\ntrain: {line}", file=sys.stderr)
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
