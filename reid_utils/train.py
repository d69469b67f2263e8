"""The classic re-ID training loop, written to be read.

``python -m reid_utils.train --gpu_ids 0 --name ft_ResNet50 --train_all --batchsize 32 --data_dir <prepared>``

``train_one_phase`` is the inner loop of the classic ``train.py``: one pass over the training or the
validation images. ``train`` runs it for every epoch (``train`` phase, then ``val``) with SGD and the
step schedule, and every ``save_every`` epochs (and at the end) saves a checkpoint, the options and the
loss/error curves into the run folder (``reid_utils.runs``).

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
from dataclasses import asdict, fields
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
from reid_utils.files import remove_stale_temporaries
from reid_utils.losses import ReIDLoss, WarmUp
from reid_utils.model import BACKBONES, build_model, check_weights_fit, parameter_groups, select_device, unwrap
from reid_utils.runs import (
    LAST_CHECKPOINT,
    DamagedCheckpointError,
    RunLock,
    TrainError,
    TrainOptions,
    check_checkpoint_matches,
    checkpoint_name,
    checkpoints,
    checkpoints_newest_first,
    latest_checkpoint,
    load_checkpoint,
    load_options,
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


def train(
    opts: TrainOptions,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    return_model: bool = False,
    given: set[str] | None = None,
):
    """Train (or resume) a run; returns the history of losses, errors and skipped batches (and the model).

    ``overwrite`` deletes an earlier run of the same name; without it or ``resume`` an existing run is an
    error, so checkpoints of two runs never mix, and a run folder in use by another training is refused.
    ``resume`` continues the newest readable checkpoint of the folder ``opts`` points to; ``given`` names the
    options the user gave for it (``None``: all of ``opts``; see ``runs.resume_options``). Under ``torchrun``
    every process runs this function; only rank 0 prints, draws and writes files.
    """
    opts.check()
    rank, world_size = distributed.distributed_context()
    folder = run_dir(opts)
    created = not folder.exists()
    lock, problem = RunLock(folder), None
    if rank == 0:  # the first write into the folder: an unwritable one is found before any work
        try:
            lock.acquire()
        except TrainError as err:
            problem = err
    if distributed.sum_over_processes([problem is not None])[0]:  # all processes stop together
        raise problem or TrainError(f"the first process could not take {folder}: see its message.")
    try:
        return _train_in(folder, opts, resume, overwrite, quiet or rank != 0, return_model, given, rank, world_size)
    except BaseException:
        if rank == 0 and created:
            remove_unused_run(folder)  # a run that never wrote a checkpoint leaves no folder behind
        raise
    finally:
        lock.release()


def _train_in(folder, opts, resume, overwrite, quiet, return_model, given, rank, world_size):
    """``train`` once the run folder is held: options, data, model, the epochs, the checkpoints."""
    main_process = rank == 0  # only it prints, draws and saves
    if main_process:
        remove_stale_temporaries(folder)  # half-written checkpoints of killed runs
    found = checkpoints_newest_first(folder)
    checkpoint = None
    if resume:
        if not found:
            raise TrainError(f"--resume: no checkpoint in {folder}. Start the run without --resume.")
        opts, notice = resume_options(load_options(folder), opts, given)
        opts.check()
        if notice and not quiet:
            print(notice)
        checkpoint, resumed_from = newest_readable_checkpoint(found, quiet)
        check_checkpoint_matches(checkpoint, opts, resumed_from)
        if opts.total_epoch < checkpoint["epoch"]:
            raise TrainError(
                f"--total_epoch {opts.total_epoch} is less than the {checkpoint['epoch']} epochs {opts.name} has "
                f"done: give a larger --total_epoch to go on, or leave it out."
            )
    elif found:
        if not overwrite:
            raise TrainError(f"{folder} already holds a run. Pass --resume to continue it, or choose another --name.")
        if main_process:
            for old in [*checkpoints(folder), *(folder / f for f in (LAST_CHECKPOINT, "train.jpg", "features.pt"))]:
                old.unlink(missing_ok=True)
    if world_size > 1:
        device = torch.device(f"cuda:{distributed.local_rank()}" if torch.cuda.is_available() else "cpu")
        gpu_ids: list[int] = []
        distributed.barrier()  # nobody starts before the old run is cleared away
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
    opts.num_classes = len(class_names)

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
    if main_process:
        save_options(opts, folder)
    curves = TrainingCurves(folder / "train.jpg", live=False if quiet else None)  # quiet: no live figure
    progress = None
    if not quiet:  # one bar for the whole run, counting images; it ends at 100 %
        total = images_to_come(loaders, range(start_epoch, opts.total_epoch))
        progress = tqdm(total=total, unit="img", desc=opts.name, leave=True)

    try:
        for epoch in range(start_epoch, opts.total_epoch):
            started = time.perf_counter()
            loaders["train"].sampler.set_epoch(epoch)  # this epoch's order and augmentation follow from it
            for phase in ("train", "val"):
                loader = loaders[phase] if progress is None else Counted(loaders[phase], progress)
                result = train_one_phase(model, loader, phase, criterion, step_optimizer, device)
                if phase == "train":  # every process saw its own share: add them up
                    result = PhaseResult(*distributed.sum_over_processes(result))
                if result.seen == 0:
                    raise TrainError(
                        f"no {phase} batch was used: --batchsize {opts.batchsize} is larger than the {phase} set "
                        f"({sizes[phase]} images). Use a smaller --batchsize."
                    )
                if not math.isfinite(result.loss):
                    raise diverged(folder, opts, epoch + 1, result.loss)
                history[f"{phase}_loss"].append(result.loss)
                history[f"{phase}_err"].append(1.0 - result.accuracy)
                if phase == "train":
                    history["skipped"].append(int(result.skipped))
            scheduler.step()
            history["seconds"].append(time.perf_counter() - started)
            if progress is not None:
                progress.set_postfix(epoch=epoch + 1, loss=f"{history['train_loss'][-1]:.3f}",
                                     val_err=f"{history['val_err'][-1]:.3f}")  # fmt: skip
            done = epoch + 1
            if done % opts.save_every == 0 or done == opts.total_epoch:
                rng = {"torch": torch.get_rng_state()}
                if device.type == "cuda":
                    rng["cuda"] = torch.cuda.get_rng_state(device)
                if world_size > 1:  # every process's random state, so a resumed run draws what it would have
                    rng = {**rng, "processes": distributed.gather_from_processes(rng)}
                if main_process:
                    checkpoint = {
                        "epoch": done, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "history": history, "rng": rng,
                        "state": {"warm_up": warm_up.factor if warm_up is not None else 1.0},
                        "scaler": scaler.state_dict() if scaler is not None else {}, "options": asdict(opts),
                    }  # fmt: skip
                    numbered = None
                    if done % opts.save_every == 0:
                        numbered = save_checkpoint(checkpoint, folder / checkpoint_name(done))
                    if done == opts.total_epoch:
                        save_checkpoint(checkpoint, folder / LAST_CHECKPOINT, saved_as=numbered)
                    curves.update(history)
    finally:
        if progress is not None:
            progress.close()  # also on errors and Ctrl-C: the message then starts on its own line
    history["curve_updates"] = curves.updates
    if return_model:
        return history, unwrap(model)
    return history


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


def diverged(folder: Path, opts: TrainOptions, epoch: int, loss: float) -> TrainError:
    """The error for a loss that became NaN or infinite: no checkpoint of the broken weights is written."""
    newest = latest_checkpoint(folder)
    where = f"the last good checkpoint is {newest.name}" if newest else "no checkpoint was written yet"
    return TrainError(
        f"the training loss became {loss} in epoch {epoch}: the run diverged and was stopped; {where}. "
        f"Train again with a smaller --lr (now {opts.lr}) or with --warm_epoch."
    )


def trained_run(prepared: str | Path, model_dir: str | Path, profile: str = "cpu-demo") -> Path:
    """The run notebook 03 trains with ``profile``; trained here with the same code (and said so) when missing.

    Lets every notebook after 03 run on its own, in a fresh kernel, in any order.
    """
    options = TrainOptions(data_dir=str(prepared), model_dir=str(model_dir), **PROFILES[profile])
    run = run_dir(options)
    if (run / LAST_CHECKPOINT).is_file():
        print(f"Using the model trained in notebook 03: {display_path(run)}/{LAST_CHECKPOINT}")
    else:
        print(f"No trained model in {display_path(run)}: training it now with the settings of notebook 03.")
        train(options, overwrite=True)
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
    p.add_argument("--save_every", type=int, default=d.save_every, help="checkpoint + curves every N epochs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (with --fast_data: threads)")
    p.add_argument("--resume", action="store_true", help="continue <model_dir>/<name> from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run of the same name first")
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
