"""The classic re-ID training loop, written to be read.

``python -m reid_utils.train --gpu_ids 0 --name ft_ResNet50 --train_all --batchsize 32 --data_dir <prepared>``

``train_one_phase`` is the inner loop of the classic ``train.py``: one pass over the training or the
validation images. ``train_model`` is its epoch loop (``train`` phase, then ``val``, the step schedule,
a checkpoint every ``save_every`` epochs and at the end, the curves redrawn after every epoch), in the
classic order. ``train`` builds the run's parts (``build_run``), resumes a checkpoint (its format and
the resume checks are ``reid_utils.runs``'s) and runs the loop.

Mixed precision is written as layumi and nanoGPT write it: an autocast context and a ``GradScaler`` that
is switched on for float16 only (``speed`` decides which). The warm-up is one visible line. The fast
data path (``fastdata``) and several GPUs (``distributed``) change how batches arrive and gradients are
added up, not the loop.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from reid_utils import distributed
from reid_utils.data import ClassicData, CorruptImageError, build_dataloaders, display_path, error_line
from reid_utils.fastdata import CachedData
from reid_utils.files import DISK_FULL, free_space, remove_stale_temporaries, size_text, write_problem
from reid_utils.losses import ReIDLoss, WarmUp
from reid_utils.model import BACKBONES, build_model, check_weights_fit, parameter_groups, select_device, unwrap
from reid_utils.runs import (
    LAST_CHECKPOINT,
    RunLock,
    TrainError,
    TrainOptions,
    checkpoint_name,
    checkpoints_newest_first,
    foreign_files,
    random_state,
    remove_run_files,
    remove_unused_run,
    restore_random_state,
    restore_training,
    run_dir,
    save_checkpoint,
    save_options,
    starting_point,
    training_checkpoint,
)
from reid_utils.speed import choose_precision, float32_on_tiny_maps, reuse_freed_memory
from reid_utils.visualize import TrainingCurves


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


def train_one_phase(model, loader, phase, criterion, optimizer, device, dtype=None, scaler=None, warm_up=None):
    """One pass over ``loader``: ``"train"`` updates the model, ``"val"`` only measures it; a ``PhaseResult``.

    Optional, as in layumi's and nanoGPT's loops: ``dtype``, mixed precision (``torch.bfloat16`` or
    ``torch.float16``; ``None``: float32); ``scaler``, float16's loss scaling (a ``torch.amp.GradScaler``;
    ``None``: none); ``warm_up``, the first epochs' growing loss factor (``losses.WarmUp``).
    """
    model.train(phase == "train")  # dropout and BatchNorm behave differently when training
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)  # switched off: scale/step do nothing more
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
        with torch.set_grad_enabled(phase == "train"), torch.autocast(device.type, dtype, enabled=dtype is not None):
            outputs = model(inputs)  # a triplet run, in training: (scores, features)
            preds = (outputs[0] if isinstance(outputs, tuple) else outputs).argmax(dim=1)
            loss = criterion(outputs, labels)
            if phase == "train" and warm_up is not None:
                loss = loss * warm_up.step()  # warm-up: the loss grows from 0.1x to 1x over the first epochs
        if phase == "train":
            scaler.scale(loss).backward()  # float16: the loss scaled up, so that small gradients do not vanish
            scaler.step(optimizer)  # float16: the gradients scaled back first; a step with inf/NaN is skipped
            scaler.update()
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


@dataclass
class Run:
    """Everything one training is made of, built by ``build_run``: what the classic script keeps in variables."""

    opts: TrainOptions
    device: torch.device
    loaders: dict
    sizes: dict
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dtype: torch.dtype | None = None  # mixed precision (None: float32)
    scaler: torch.amp.GradScaler | None = None  # float16's loss scaling (switched off otherwise)
    warm_up: WarmUp | None = None


def train_model(run: Run, folder: Path, progress: RunProgress, history: dict, start_epoch: int,
                curves: TrainingCurves, quiet: bool) -> dict:  # fmt: skip
    """The classic epoch loop, the one notebook 03's ``train_model`` writes; returns the history.

    ::

        for epoch in range(start_epoch, total_epoch):
            set_epoch(epoch)                       # this epoch's shuffle and augmentation
            for phase in ("train", "val"):
                train_one_phase(...)               # -> history: loss and error of the phase
            scheduler.step()                       # once per epoch, after its optimiser steps
            save_network(...)                      # every save_every epochs, and after the last
            draw_curve(...)                        # every epoch (a quiet run: with the checkpoints)

    Under torchrun each process trains on its share, and the training phase's sums are added up; only the
    first process draws and saves.
    """
    opts, main_process = run.opts, distributed.rank() == 0
    bar = None
    if not quiet:  # one bar for the whole run, counting images; it ends at 100 %
        bar = tqdm(total=images_to_come(run.loaders, range(start_epoch, opts.total_epoch)), unit="img",
                   desc=opts.name, leave=True)  # fmt: skip
    try:
        for epoch in range(start_epoch, opts.total_epoch):
            progress.epoch = epoch + 1
            started = time.perf_counter()
            run.loaders["train"].sampler.set_epoch(epoch)  # this epoch's order and augmentation follow from it
            for phase in ("train", "val"):
                loader = run.loaders[phase] if bar is None else Counted(run.loaders[phase], bar)
                result = train_one_phase(run.model, loader, phase, run.criterion, run.optimizer, run.device,
                                         run.dtype, run.scaler, run.warm_up)  # fmt: skip
                if phase == "train":  # every process saw its own share: add them up
                    result = PhaseResult(*distributed.sum_over_processes(result))
                check_phase(result, phase, run, folder, progress)
                history[f"{phase}_loss"].append(result.loss)
                history[f"{phase}_err"].append(1.0 - result.accuracy)
                if phase == "train":
                    history["skipped"].append(int(result.skipped))
            run.scheduler.step()
            history["seconds"].append(time.perf_counter() - started)
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{history['train_loss'][-1]:.3f}",
                                val_err=f"{history['val_err'][-1]:.3f}")  # fmt: skip
            done = epoch + 1
            saved = done % opts.save_every == 0 or done == opts.total_epoch
            if saved:
                save_network(run, done, history, curves, folder, progress)
            # Watched, the curves are redrawn after every epoch, as layumi's train.py does (its tutorial says every
            # 10); a quiet run (an ablation, a test) draws train.jpg with each checkpoint only.
            if main_process and (saved or not quiet):
                draw_curve(curves, history, folder, progress)
    finally:
        if bar is not None:
            bar.close()  # also on errors and Ctrl-C: the message then starts on its own line
    return history


def check_phase(result: PhaseResult, phase: str, run: Run, folder: Path, progress: RunProgress) -> None:
    """Stop a run whose phase used no batch, or whose loss became NaN or infinite (before it is saved)."""
    if result.seen == 0:
        raise TrainError(
            f"no {phase} batch was used: --batchsize {run.opts.batchsize} is larger than the {phase} set "
            f"({run.sizes[phase]} images). Use a smaller --batchsize."
        )
    if not math.isfinite(result.loss):
        raise diverged(folder, run.opts, progress.epoch, result.loss, progress.newest)


def draw_curve(curves: TrainingCurves, history: dict, folder: Path, progress: RunProgress) -> None:
    """Redraw the loss and error curves (``train.jpg``, and the live figure of a watched run)."""
    _saving(folder, progress, curves.update, history)


def save_network(run: Run, done: int, history: dict, curves: TrainingCurves, folder: Path,
                 progress: RunProgress) -> None:  # fmt: skip
    """The checkpoint after epoch ``done`` (``runs.training_checkpoint``), written by the first process."""
    rng = random_state(run.device)  # every process takes part under torchrun
    if distributed.rank() == 0:
        history["curve_updates"] = curves.updates + 1  # the redraw right after this save included
        checkpoint = training_checkpoint(done, run.model, run.optimizer, run.scheduler, run.scaler, run.warm_up,
                                         history, rng, run.opts)  # fmt: skip
        _saving(folder, progress, save_epoch, checkpoint, folder, run.opts, progress)


# --------------------------------------------------------------------------- a whole run


def data_backend(opts: TrainOptions, device: torch.device):
    """The data path of a run: the classic ``DataLoader``, or the cached fast path (on the training device)."""
    if opts.fast_data:
        return CachedData(opts.channels_last, device, num_threads=opts.num_workers or None)
    return ClassicData(opts.num_workers)


def build_run(opts: TrainOptions, rank: int, world_size: int, quiet: bool, resuming: bool) -> Run:
    """The parts of a run, as the classic script builds them: device, data, network, loss, SGD, schedule.

    Then the extras around them: several GPUs (DataParallel, or DDP under torchrun), ``torch.compile``,
    mixed precision (``speed.choose_precision``) and the warm-up.
    """
    if world_size > 1:
        device = torch.device(f"cuda:{distributed.local_rank()}" if torch.cuda.is_available() else "cpu")
        gpu_ids: list[int] = []
    else:
        device, gpu_ids = select_device(opts.gpu_ids, quiet=quiet)
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
    opts.num_classes = len(class_names)
    check_batches_fit(loaders, opts)

    model = build_model(opts, pretrained=opts.pretrained and not resuming, quiet=quiet).to(device)
    criterion = ReIDLoss(opts.label_smoothing, opts.triplet_weight, opts.triplet_margin)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif len(gpu_ids) > 1:
        model = nn.DataParallel(model, device_ids=gpu_ids)  # splits each batch over the GPUs, gathers the outputs
    optimizer = build_optimizer(model, opts.lr)
    scheduler = build_scheduler(optimizer, opts.total_epoch, opts.cosine)
    if opts.compile:
        model = torch.compile(model)

    dtype, notice = choose_precision(device, opts.fp16, opts.bf16, unwrap(model), (opts.height, opts.width))
    if notice and not quiet:
        print(notice)
    if dtype == torch.bfloat16 and device.type == "cpu":
        float32_on_tiny_maps(unwrap(model))  # oneDNN's bfloat16 fails on one-pixel maps (speed.needs_float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # float16 needs loss scaling
    warm_up = None
    if opts.warm_epoch > 0:  # this process's steps per epoch: its share of the images under torchrun
        steps_per_epoch = max(1, images_per_epoch(loaders["train"]) // opts.batchsize)
        warm_up = WarmUp(steps_per_epoch * opts.warm_epoch)
    return Run(opts, device, loaders, sizes, model, criterion, optimizer, scheduler, dtype, scaler, warm_up)


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
        history, model = _train_in(folder, opts, resume, overwrite, quiet or rank != 0, given, rank, world_size,
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
    return (history, model) if return_model else history


def _train_in(folder: Path, requested: TrainOptions, resume, overwrite: bool, quiet: bool, given, rank: int,
              world_size: int, progress: RunProgress):  # fmt: skip
    """``train`` once the run folder is held: where to start, the run's parts, then the epoch loop."""
    main_process = rank == 0  # only it prints, draws and saves
    if main_process:
        remove_stale_temporaries(folder)  # half-written checkpoints of killed runs
    opts, checkpoint, resumed_from, progress.replacing = starting_point(folder, requested, resume, overwrite,
                                                                        given, quiet)  # fmt: skip
    progress.total_epoch, progress.save_every, progress.newest = opts.total_epoch, opts.save_every, resumed_from
    distributed.barrier()  # every process has read the folder before the first one writes into it
    run = build_run(opts, rank, world_size, quiet, resuming=checkpoint is not None)
    requested.num_classes = opts.num_classes  # filled in for the caller too, resumed or not
    history = {"train_loss": [], "train_err": [], "val_loss": [], "val_err": [], "skipped": [], "seconds": []}
    start_epoch = 0
    if checkpoint is not None:
        try:
            check_weights_fit(unwrap(run.model), checkpoint["model"], str(resumed_from))
        except ValueError as err:
            raise TrainError(str(err)) from None
        history, start_epoch = restore_training(checkpoint, run.model, run.optimizer, run.scheduler, run.scaler,
                                                run.warm_up)  # fmt: skip
        notice = restore_random_state(checkpoint["rng"], run.device, rank, world_size, resumed_from)
        if notice and not quiet:
            print(notice)
        if not quiet:
            print(f"Resuming {opts.name} from {resumed_from.name} (epoch {start_epoch} of {opts.total_epoch}).")
    curves = TrainingCurves(folder / "train.jpg", live=False if quiet else None)  # quiet: no live figure
    curves.updates = history.get("curve_updates", 0)  # a resumed run counts the redraws before it too
    if main_process:
        check_free_space(folder, unwrap(run.model), opts, range(start_epoch, opts.total_epoch), quiet)
        if not progress.replacing:  # a replaced run's opts.yaml goes with its checkpoints, not before
            _saving(folder, progress, save_options, opts, folder)
        if checkpoint is not None and start_epoch == opts.total_epoch and resumed_from.name != LAST_CHECKPOINT:
            # the run ended, but net_last.pth is missing (killed while it was copied): put it in place now
            _saving(folder, progress, save_checkpoint, checkpoint, folder / LAST_CHECKPOINT, resumed_from)

    train_model(run, folder, progress, history, start_epoch, curves, quiet)
    history["curve_updates"] = curves.updates
    return history, unwrap(run.model)


def holds_checkpoints(folder: Path) -> bool:
    """Whether ``folder`` holds any checkpoint, readable or not (then it is a run folder)."""
    return bool(checkpoints_newest_first(folder))


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


def diverged(folder: Path, opts: TrainOptions, epoch: int, loss: float, newest: Path | None) -> TrainError:
    """The error for a loss that became NaN or infinite: no checkpoint of the broken weights is written.

    ``newest``: this run's newest checkpoint (an earlier run being replaced may have newer-looking ones).
    """
    where = f"the last good checkpoint is {newest.name}" if newest else "no checkpoint was written yet"
    return TrainError(
        f"the training loss became {loss} in epoch {epoch}: the run diverged and was stopped; {where}. "
        f"Train again with a smaller --lr (now {opts.lr}) or with --warm_epoch."
    )


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
