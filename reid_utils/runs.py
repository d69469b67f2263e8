"""A run folder, ``<model_dir>/<name>/``: what training writes and evaluation reads.

::

    opts.yaml      every option of the run (``TrainOptions``): evaluation rebuilds the same network from it
    net_010.pth    a checkpoint every ``save_every`` epochs: weights, optimiser, schedule, random state
    net_last.pth   the checkpoint of the last epoch
    train.jpg      the loss and error curves
    features.pt    what ``python -m reid_utils.test`` extracted
    .lock          held by the training that writes the folder, so that a second one is refused

Training (``reid_utils.train``) and evaluation (``reid_utils.test``) both go through this module, so
neither needs the other to find a run's options or its newest checkpoint. A run folder belongs to the
user: it may be copied, moved or resumed from another directory, and the files in it may be damaged; every
function here says which file is the problem and what to do, in one line.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from torch import nn

from reid_utils import distributed
from reid_utils.data import display_path
from reid_utils.files import atomic_write, lock_file
from reid_utils.model import BACKBONES, unwrap

OPTIONS_FILE = "opts.yaml"
LAST_CHECKPOINT = "net_last.pth"
LOCK_FILE = ".lock"
MAX_IMAGE_SIDE = 2048  # pixels; Market-1501 crops are 128x64 and the recipe trains at 256x128


class TrainError(Exception):
    """A problem the user can fix (bad option, missing data, existing run...)."""

    def _render_traceback_(self) -> list[str]:
        """In Jupyter the message alone (IPython's hook), as the command line prints it: the problem and the fix,
        not the package's insides that found it."""
        return [f"{type(self).__name__}: {self}"]


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
        """Reject options that can only fail later, deep inside torch, or train a useless model."""
        if self.total_epoch < 1:
            raise TrainError(f"--total_epoch must be at least 1, got {self.total_epoch}.")
        if self.batchsize < 2:
            raise TrainError(f"--batchsize must be at least 2 (BatchNorm needs 2 images), got {self.batchsize}.")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise TrainError(f"--lr must be a positive number, got {self.lr}.")
        if self.save_every < 1:
            raise TrainError(f"--save_every must be at least 1, got {self.save_every}.")
        if self.warm_epoch < 0:
            raise TrainError(f"--warm_epoch must be 0 (no warm-up) or more, got {self.warm_epoch}.")
        if self.backbone not in BACKBONES:
            raise TrainError(f"--backbone {self.backbone} is unknown: choose one of {', '.join(BACKBONES)}.")
        if self.stride not in (1, 2):
            raise TrainError(f"--stride must be 1 or 2, got {self.stride}.")
        for flag, value, low, high in (("--height", self.height, 16, MAX_IMAGE_SIDE),
                                       ("--width", self.width, 8, MAX_IMAGE_SIDE)):  # fmt: skip
            if not low <= value <= high:
                raise TrainError(f"{flag} must be between {low} and {high} pixels, got {value}.")
        for flag, value, inclusive in (("--droprate", self.droprate, False), ("--erasing_p", self.erasing_p, True),
                                       ("--label_smoothing", self.label_smoothing, False)):  # fmt: skip
            if not (0 <= value <= 1 if inclusive else 0 <= value < 1):
                raise TrainError(f"{flag} must be in [0, 1{']' if inclusive else ')'}, got {value}.")
        if self.linear_num < 1:
            raise TrainError(f"--linear_num must be at least 1, got {self.linear_num}.")
        if not math.isfinite(self.triplet_weight) or self.triplet_weight < 0:
            raise TrainError(f"--triplet_weight must be 0 or more, got {self.triplet_weight}.")
        if not math.isfinite(self.triplet_margin) or self.triplet_margin < 0:
            raise TrainError(f"--triplet_margin must be 0 or more, got {self.triplet_margin}.")
        if self.triplet_weight > 0:
            if not 2 <= self.instances <= self.batchsize // 2:
                raise TrainError(
                    f"--instances {self.instances}: the triplet loss needs batches of P identities x K images with "
                    f"K >= 2 and P >= 2 (here --batchsize {self.batchsize})."
                )
            if self.batchsize % self.instances:
                raise TrainError(
                    f"--batchsize {self.batchsize} is not a multiple of --instances {self.instances}: a batch of "
                    f"P identities x K images would split one identity. Use e.g. --batchsize "
                    f"{self.batchsize // self.instances * self.instances}."
                )
        if not 0 <= self.seed <= 2**31:
            raise TrainError(f"--seed must be between 0 and 2**31, got {self.seed}.")
        if self.num_workers is not None and self.num_workers < 0:
            raise TrainError(f"--num_workers must be 0 (load in the main process) or more, got {self.num_workers}.")
        check_run_name(self.name)


def check_run_name(name: str) -> None:
    """A run's name is one plain folder inside ``--model_dir``: never ``..`` (its parent) or ``.`` (itself)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise TrainError(f"--name '{name}' may only use letters, digits, '_', '-' and '.'.")
    if name.startswith("."):  # "..", "." and hidden names (the tools' own temporaries start with a dot)
        raise TrainError(f"--name '{name}' may not start with '.': it would name another folder. Use e.g. --name run1.")


# What a resumed run takes from the command line: where it is, where its data is, how long it goes on, and
# how this machine runs it. Everything else defines the run itself and stays as saved.
WHERE = ("name", "model_dir")
THIS_MACHINE = ("data_dir", "total_epoch", "gpu_ids", "num_workers", "skip_corrupt", "save_every", "compile")
NETWORK = ("backbone", "stride", "linear_num", "bnneck", "height", "width")  # the checkpoint's weights and inputs


def resume_options(saved: TrainOptions, requested: TrainOptions, given: set[str] | None = None):
    """The options a resumed run goes on with, and a one-line notice of what the command line changed or could not.

    The run folder is where ``--name`` and ``--model_dir`` point *now* (a copied or moved folder is resumed
    in place), ``--data_dir`` and the machine's settings given now win, a changed network is refused (the
    checkpoint would not fit, or evaluation would rebuild another network), and any other option keeps the
    run's own value and is named. ``given``: the options named on the command line (``None``: all of them).
    """
    given = {f.name for f in fields(TrainOptions)} if given is None else given
    merged = TrainOptions(**asdict(saved))
    changed, ignored = [], []
    for field in fields(TrainOptions):
        key = field.name
        new, old = getattr(requested, key), getattr(saved, key)
        if key == "num_classes" or key not in given or new == old:
            continue
        if key in WHERE:
            setattr(merged, key, new)
        elif key in THIS_MACHINE:
            setattr(merged, key, new)
            if key not in ("data_dir", "total_epoch"):
                changed.append(f"--{key} {new} (the run had {old})")
        elif key in NETWORK:
            raise TrainError(
                f"--{key} {new} differs from the run's {old}: a resumed run keeps its network. "
                f"Leave --{key} out, or start a new run with another --name."
            )
        else:
            ignored.append(f"--{key} {new} (the run's: {old})")
    parts = []
    if ignored:
        parts.append("a resumed run keeps its own options, so these are ignored: " + ", ".join(ignored))
    if changed:
        parts.append("resuming with " + ", ".join(changed))
    return merged, ("Note: " + "; ".join(parts) + ".") if parts else ""


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
    try:
        saved = yaml.safe_load(path.read_text()) or {}
        if not isinstance(saved, dict):
            raise ValueError("not a list of options")
        known = {f.name for f in fields(TrainOptions)}
        return TrainOptions(**{k: v for k, v in saved.items() if k in known})
    except (yaml.YAMLError, ValueError, TypeError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())[:120]
        raise TrainError(
            f"{path} is damaged ({reason}). Fix it by hand, or copy it from a backup of the run."
        ) from None


# --------------------------------------------------------------------------- checkpoints


def checkpoint_name(epoch: int) -> str:
    return f"net_{epoch:03d}.pth"


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The numbered checkpoints of a run, oldest first."""
    return sorted(Path(folder).glob("net_[0-9][0-9][0-9].pth"))


class DamagedCheckpointError(TrainError):
    """A checkpoint file that cannot be read: empty, cut short, or not a checkpoint."""


def save_checkpoint(
    checkpoint: dict, path: str | os.PathLike, saved_as: Path | None = None, before_replace=None
) -> Path:
    """``torch.save`` through a synced temporary file: a crash never leaves a half-written or empty checkpoint.

    ``saved_as``: a file this very checkpoint was just saved to (the last epoch's numbered one), copied
    instead of serialised again. A copy, not a link: a later write to one file never changes the other.
    ``before_replace``: see ``files.atomic_write`` (an older run's files go only once this one is written).
    """
    if saved_as is not None:
        return atomic_write(path, lambda tmp: shutil.copyfile(saved_as, tmp), before_replace)
    return save_torch(checkpoint, path, before_replace)


def save_torch(obj, path: str | os.PathLike, before_replace=None) -> Path:
    """``torch.save`` through ``atomic_write``, a full disk reported as the ``OSError`` (ENOSPC) it is.

    ``torch.save`` reports a disk that fills up in the middle of a file as ``RuntimeError: [enforce fail
    at inline_container.cc:672] . unexpected pos``. Writing into a Python file object opened here, the
    write's own ``OSError`` is raised first, and is found behind that ``RuntimeError``.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            try:
                torch.save(obj, file)
            except RuntimeError as err:
                if isinstance(err.__context__, OSError):  # the write that failed, then torch closing the archive
                    raise err.__context__ from None
                raise

    return atomic_write(path, write, before_replace)


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A checkpoint, on the CPU (``load_state_dict`` moves weights where the model is; RNG states must stay).

    ``mmap=True`` reads tensors only when they are used: cheap when only the epoch is wanted.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        size = path.stat().st_size if path.exists() else 0
        what = "it is empty" if size == 0 else f"{size:,} bytes, cut short or not a checkpoint"
        raise DamagedCheckpointError(f"{path} cannot be read ({what}: {type(err).__name__}).") from None
    if not isinstance(checkpoint, dict) or not {"epoch", "model"} <= set(checkpoint):
        raise DamagedCheckpointError(f"{path} cannot be read (not a checkpoint of this series).")
    return checkpoint


def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint was saved after: from the name ``net_XXX.pth``, else read from the file."""
    match = re.fullmatch(r"net_(\d{3})\.pth", path.name)
    if match:
        return int(match[1])
    return int(load_checkpoint(path, mmap=True)["epoch"])


def checkpoints_newest_first(folder: str | os.PathLike) -> list[tuple[Path, int | None]]:
    """Every checkpoint with its epoch, the highest epoch first (``net_last.pth`` first among equals).

    The newest is the one with the highest epoch *inside*: a ``net_last.pth`` left from before a run was
    extended is older than the ``net_004.pth`` of the extension. An unreadable ``net_last.pth`` comes last
    with epoch ``None``, so callers can name it and go on with the others.
    """
    folder = Path(folder)
    found = [(path, checkpoint_epoch(path)) for path in checkpoints(folder)]
    last = folder / LAST_CHECKPOINT
    damaged = []
    if last.is_file():
        try:
            found.append((last, checkpoint_epoch(last)))
        except DamagedCheckpointError:
            damaged.append((last, None))
    found.sort(key=lambda item: (item[1], item[0].name == LAST_CHECKPOINT), reverse=True)
    return found + damaged


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest epoch inside (``None`` when there is none)."""
    found = checkpoints_newest_first(folder) if Path(folder).is_dir() else []
    return found[0][0] if found and found[0][1] is not None else None


def check_checkpoint_matches(checkpoint: dict, opts: TrainOptions, path: Path) -> None:
    """Refuse a checkpoint written by another run than the one ``opts.yaml`` describes (a folder mixing runs)."""
    own = checkpoint.get("options") or {}
    for key in (*NETWORK, "num_classes"):
        if key in own and own[key] != getattr(opts, key):
            raise TrainError(
                f"{path} was trained with {key} = {own[key]}, but {OPTIONS_FILE} beside it says {getattr(opts, key)}: "
                f"the folder mixes two runs. Restore the run's own {OPTIONS_FILE} or train it again."
            )


# --------------------------------------------------------------------------- the checkpoint format


def training_checkpoint(epoch: int, model: nn.Module, optimizer, scheduler, scaler, warm_up, history: dict,
                        rng: dict, opts: TrainOptions) -> dict:  # fmt: skip
    """A checkpoint of a training run: the one format, written here and read back in ``restore_training``.

    All that a resumed run needs to continue exactly as if it had never stopped: the weights, SGD's momentum,
    the schedule, how far the warm-up got, float16's loss scale (``{}`` without loss scaling), every process's
    random state (``random_state``) and the history so far. Evaluation reads only ``model`` and ``options``.
    """
    return {
        "epoch": epoch, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "history": history, "rng": rng,
        "state": {"warm_up": warm_up.factor if warm_up is not None else 1.0},
        "scaler": scaler.state_dict(), "options": asdict(opts),
    }  # fmt: skip


def restore_training(checkpoint: dict, model: nn.Module, optimizer, scheduler, scaler, warm_up) -> tuple[dict, int]:
    """Put a checkpoint's training state back into a freshly built run; returns its history and its epoch."""
    unwrap(model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if warm_up is not None:
        warm_up.factor = checkpoint["state"]["warm_up"]
    if checkpoint.get("scaler"):  # empty when the saving run did not scale its loss
        scaler.load_state_dict(checkpoint["scaler"])  # the float16 loss scale reached so far
    return checkpoint["history"], checkpoint["epoch"]


def random_state(device: torch.device) -> dict:
    """The random state to save: dropout's generator (and the GPU's), and under torchrun every process's.

    The data's random numbers need none: shuffling and augmentation follow from (seed, epoch, image).
    """
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    if distributed.is_distributed():  # every process's, so a resumed run draws what it would have
        rng = {**rng, "processes": distributed.gather_from_processes(rng)}
    return rng


def restore_random_state(rng: dict, device: torch.device, rank: int, world_size: int, path: Path) -> str:
    """Put this process's saved random state back; a notice when the run was saved by another process count."""
    per_process = rng.get("processes", [rng])
    notice = ""
    if len(per_process) != world_size:
        notice = (f"Note: {path.name} was saved by {len(per_process)} process(es), this run has {world_size}: it "
                  "continues correctly, but not with the same random numbers as an uninterrupted run.")  # fmt: skip
    own = per_process[rank] if len(per_process) == world_size else per_process[0]
    torch.set_rng_state(own["torch"])
    if "cuda" in own and device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"], device)  # dropout on the GPU draws from here
    return notice


# --------------------------------------------------------------------------- where a training starts


class StartingPoint(NamedTuple):
    """Where a training in a run folder starts: the options it goes on with, and the checkpoint it resumes."""

    opts: TrainOptions
    checkpoint: dict | None = None  # None: a new run
    path: Path | None = None  # the checkpoint resumed from
    replacing: bool = False  # an earlier run is in the folder: it stays until this one's first checkpoint


def starting_point(folder: Path, opts: TrainOptions, resume: bool | str, overwrite: bool, given: set[str] | None,
                   quiet: bool) -> StartingPoint:  # fmt: skip
    """The resume checks: a new run, a replaced one, or the newest readable checkpoint with the run's own options.

    ``resume="auto"`` continues a run of these same options that stopped early (``auto_resume``), and else
    replaces it. Without ``resume`` or ``overwrite`` an existing run is an error, so two runs never mix.
    """
    found = checkpoints_newest_first(folder)
    if resume == "auto":
        resume, notice = auto_resume(folder, found, opts)
        overwrite = overwrite or not resume
        if notice and not quiet:
            print(notice)
    if not resume:
        if found and not overwrite:
            raise TrainError(f"{folder} already holds a run. Pass --resume to continue it, or choose another --name.")
        return StartingPoint(opts, replacing=bool(found))  # the earlier run's files go with this one's first save
    if not found:
        raise TrainError(f"--resume: no checkpoint in {folder}. Start the run without --resume.")
    opts, notice = resume_options(load_options(folder), opts, given)
    opts.check()
    if notice and not quiet:
        print(notice)
    checkpoint, path = newest_readable_checkpoint(found, quiet)
    check_checkpoint_matches(checkpoint, opts, path)
    if opts.total_epoch < checkpoint["epoch"]:
        raise TrainError(
            f"--total_epoch {opts.total_epoch} is less than the {checkpoint['epoch']} epochs {opts.name} has "
            f"done: give a larger --total_epoch to go on, or leave it out."
        )
    return StartingPoint(opts, checkpoint, path)


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


# --------------------------------------------------------------------------- one writer at a time


class RunLock:
    """Holds a run folder for one training: a second writer is refused, a killed one leaves nothing stuck.

    The lock is the operating system's record lock on the file ``.lock`` (``lockf``; ``msvcrt.locking`` on
    Windows), which the kernel releases when the process ends in any way -- no stale lock files to delete by
    hand -- and which DataLoader worker processes forked from the training do not inherit. Such a lock is
    the whole process's, so the folders this process holds are also remembered here, and a second training
    in the same process (a notebook kernel) is refused too. Taking the lock is also the first write into the
    folder, so an unwritable folder is found before any work.
    """

    _held: set[Path] = set()  # folders held by this process (the OS lock cannot tell two holders in one process)

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the folder (creating it), or raise ``TrainError`` naming the problem."""
        if self.folder.resolve() in RunLock._held:  # checked before opening: closing the file would unlock it
            raise self._in_use(f"{os.getpid()}, this one")
        if self.folder.exists() and not self.folder.is_dir():
            raise TrainError(f"{self.folder} is a file, not a folder: choose another --name or --model_dir.")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            raise TrainError(
                f"--model_dir: a file stands where a folder of {self.folder} should be. Choose another --model_dir."
            ) from None
        except OSError as err:
            raise TrainError(
                f"cannot write to {self.folder} ({err.strerror}): choose a --model_dir you can write to."
            ) from None
        try:
            lock_file(fd, wait=False)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise self._in_use(holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        RunLock._held.add(self.folder.resolve())

    def _in_use(self, holder: str) -> TrainError:
        return TrainError(
            f"{self.folder} is in use by another training (process {holder}). Wait for it to finish, "
            f"or train under another --name."
        )

    def release(self) -> None:
        if self._fd is not None:
            RunLock._held.discard(self.folder.resolve())
            os.close(self._fd)  # closing releases the lock
            self._fd = None


RUN_FILES = (OPTIONS_FILE, LAST_CHECKPOINT, "train.jpg", "features.pt", LOCK_FILE)


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Names in ``folder`` that no tool of the series writes into a run folder (a user's own files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = re.compile(r"net_\d{3}\.pth|\..+\.(tmp|old)-\d+")
    return sorted(p.name for p in folder.iterdir() if p.name not in RUN_FILES and not ours.fullmatch(p.name))


def remove_run_files(folder: str | os.PathLike) -> None:
    """Delete a run's checkpoints, curves and features (what a new run of the same name replaces).

    ``opts.yaml`` is left for the new run to overwrite, and files of the user's are never touched.
    """
    folder = Path(folder)
    for old in [*checkpoints(folder), *(folder / name for name in (LAST_CHECKPOINT, "train.jpg", "features.pt"))]:
        old.unlink(missing_ok=True)


def remove_unused_run(folder: str | os.PathLike) -> None:
    """Remove a run folder that a failed start left without a checkpoint: only what training itself puts there."""
    folder = Path(folder)
    if not folder.is_dir() or checkpoints(folder) or (folder / LAST_CHECKPOINT).exists():
        return
    for name in (OPTIONS_FILE, "train.jpg", LOCK_FILE):
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()  # only when nothing else (of the user's) is in it
    except OSError:
        pass
