"""Checkers for the exercises of notebooks 01-06.

Each notebook asks the learner to write one small function; ``check_<name>(fn)`` runs it on a few cases and
prints exactly one line, ``✓ <name>: all N cases pass`` or ``✗ not yet: <hint>``, and returns True or False.
The hint names the failing input, the expected value and the returned one, and where the answer matches a
typical mistake it says which. The learner's exceptions become a ``✗ not yet:`` line, never a traceback.

The expected values come from the library wherever it has them (``parse_market_name``, the real
``ClassBlock``, ``metrics.evaluate``, the training loop ``train.train_one_phase``, and a short run of
``train.train`` itself for the epoch loop); k-reciprocal neighbours come from a plain reference below. The
checkers use fixed inputs and leave the global random state alone, so their output is the same on every run.
Where a wrong answer is a known variant -- the blog's loop, say, which is faithful to layumi's tutorial but not the
loop of this series -- the hint names the variant instead of only the number that differs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import random
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

PASSED = "✓"
NOT_YET = "✗ not yet:"
STILL_A_STUB = f"{NOT_YET} write the function body (it still raises NotImplementedError)"


class _Raised:
    """What a call raised instead of returning."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __str__(self) -> str:
        message = _one_line(str(self.error), 160)
        return f"{type(self.error).__name__}: {message}" if message else type(self.error).__name__


def _run(name: str, fn: Any, cases: Sequence, call: Callable, judge: Callable, passed: str | None = None) -> bool:
    """Call ``fn`` on each case; ``judge(case, outcome)`` returns None when right, else the hint.

    ``passed`` is what the ✓ line says after the name (default: all N cases pass)."""
    if not callable(fn):
        print(f"{NOT_YET} pass the function itself, e.g. check_{name}({name}), not {type(fn).__name__} {_shown(fn)}")
        return False
    for case in cases:
        try:
            outcome = call(fn, case)
        except NotImplementedError:
            print(STILL_A_STUB)
            return False
        except Exception as error:  # the learner's bug becomes a hint, not a traceback
            outcome = _Raised(error)
        hint = judge(case, outcome)
        if hint is not None:
            print(f"{NOT_YET} {hint}")
            return False
    print(f"{PASSED} {name}: {passed or f'all {len(cases)} cases pass'}")
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A value as the hint prints it; numpy scalars as plain numbers, so the line reads the same everywhere."""
    if isinstance(value, _Raised):
        return f"it raised {value}"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, set | frozenset):
        items = [v.item() if isinstance(v, np.generic) else v for v in value]
        try:
            items = sorted(items)
        except TypeError:
            pass
        return _one_line("{" + ", ".join(repr(v) for v in items) + "}" if items else "set()")
    return _one_line(repr(value))


def _one_line(text: str, limit: int = 80) -> str:
    """Whitespace collapsed (an array's repr spans lines) and cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- 01 · parse_name

PARSE_NAME_CASES = (
    "0002_c1s1_000451_03.jpg",
    "1501_c6s4_001902_01.jpg",
    "-1_c3s2_012345_02.jpg",
    "0000_c5s3_015240_04.jpg",
    "Market-1501-v15.09.15/bounding_box_test/0871_c4s2_103427_02.jpg",
    "holiday_photo.jpg",
    "0002_c1s1.jpg",
)


def _expected_name(filename: str) -> tuple[int, int] | None:
    """(pid, camera) from the library's parser, or None where it rejects the name."""
    from reid_utils.data import parse_market_name

    try:
        parsed = parse_market_name(filename)
    except ValueError:
        return None
    return parsed.pid, parsed.camera


def _judge_name(filename: str, outcome: Any) -> str | None:
    expected = _expected_name(filename)
    call = f"parse_name({filename!r})"
    if expected is None:
        if isinstance(outcome, _Raised) and isinstance(outcome.error, ValueError):
            return None
        if isinstance(outcome, _Raised):
            return f"{call} should raise ValueError (not a Market-1501 name), but {_shown(outcome)}"
        return (
            f"{call} should raise ValueError: it is not a Market-1501 name (PPPP_cCsS_FFFFFF_BB.jpg), "
            f"but it returned {_shown(outcome)}"
        )
    pid, camera = expected
    if isinstance(outcome, _Raised):
        if pid == -1:
            why = " — junk boxes have the pid -1, two characters instead of four digits"
        elif "/" in filename:
            why = " — look at the file name only, without its folders: Path(filename).name"
        else:
            why = ""
        return f"{call} should return {expected}, but {_shown(outcome)}{why}"
    if isinstance(outcome, tuple) and len(outcome) == 2 and tuple(outcome) == expected:
        if all(_is_int(v) for v in outcome):
            return None
    why = ""
    if isinstance(outcome, tuple | list) and len(outcome) == 2:
        if any(isinstance(v, str) for v in outcome):
            why = " — convert the parts to int"
        elif tuple(outcome) == (camera, pid):
            why = " — the order is (pid, camera)"
        elif isinstance(outcome, list):
            why = " — return a tuple, not a list"
    return f"{call} should return {expected}, got {_shown(outcome)}{why}"


def check_parse_name(fn: Callable[[str], tuple[int, int]]) -> bool:
    """Notebook 01: ``parse_name(filename) -> (pid, camera)``; ValueError for a name that is not Market-1501."""
    return _run("parse_name", fn, PARSE_NAME_CASES, lambda f, name: f(name), _judge_name)


# --------------------------------------------------------------------------- 02 · classblock_parameters

# (in_features, linear_num, num_classes): ResNet-50 on Market-1501, the ResNet-18 CPU demo, DukeMTMC, CUHK03, ...
CLASSBLOCK_CASES = (
    (2048, 512, 751),
    (512, 512, 48),
    (2048, 256, 702),
    (2048, 512, 767),
    (1024, 128, 1000),
    (10, 4, 3),
)


def _classblock_truth(in_features: int, linear_num: int, num_classes: int) -> int:
    """Build the real ClassBlock and count its parameters (the global random state is left as it was)."""
    import torch

    from reid_utils.model import ClassBlock, count_parameters

    with torch.random.fork_rng(devices=[]):
        block = ClassBlock(in_features, num_classes, linear_num=linear_num)
    return count_parameters(block)


def _judge_classblock(case: tuple[int, int, int], outcome: Any) -> str | None:
    in_features, linear_num, num_classes = case
    expected = _classblock_truth(*case)
    call = f"classblock_parameters(in_features={in_features}, linear_num={linear_num}, num_classes={num_classes})"
    if isinstance(outcome, _Raised):
        return f"{call} should return {expected:,}, but {_shown(outcome)}"
    if _is_int(outcome) and outcome == expected:
        return None
    if _is_real(outcome) and outcome == expected:
        return f"{call} should return the int {expected:,}, got {_shown(outcome)} — a count is an int"
    if not _is_real(outcome):
        return f"{call} should return the int {expected:,}, got {_shown(outcome)}"
    difference = int(outcome) - expected
    known = {
        2 * linear_num: "BatchNorm's running_mean and running_var are buffers, not parameters (nothing trains them)",
        2 * linear_num + 1: "BatchNorm's running_mean, running_var and num_batches_tracked are buffers, not parameters",
        -(linear_num + num_classes): "both Linear layers have a bias too",
        -2 * linear_num: "BatchNorm1d has a weight and a bias per feature",
        -num_classes: "the classifier Linear(linear_num→num_classes) has a bias too",
        -linear_num: "you are linear_num short: the first Linear's bias, or half of BatchNorm's weight + bias?",
    }
    why = f" — {known[difference]}" if difference in known else f" ({difference:+,} off)"
    return f"{call} should return {expected:,}, got {int(outcome):,}{why}"


def check_classblock_parameters(fn: Callable[[int, int, int], int]) -> bool:
    """Notebook 02: ``classblock_parameters(in_features, linear_num, num_classes)`` against the real ClassBlock."""
    return _run("classblock_parameters", fn, CLASSBLOCK_CASES, lambda f, case: f(*case), _judge_classblock)


# --------------------------------------------------------------------------- 03 · run_phase


class _Batches(list):
    """Fixed batches with the ``batch_size`` their loader was made with, as a DataLoader hands them out; its
    ``dataset`` has as many items as the batches hold images, so ``len(loader.dataset)`` works as on a loader."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> None:
        super().__init__(batches)
        self.batch_size = batch_size
        self.dataset = range(sum(len(labels) for _, labels in batches))


def _phase_setup(seed: int = 0) -> dict[str, Any]:
    """A tiny network with BatchNorm and dropout (so the train/eval switch matters), SGD with momentum, and
    loaders whose last training batch is short -- made the same way for the learner's loop and the library's."""
    generator = torch.Generator().manual_seed(seed)

    def batches(sizes: Sequence[int], batch_size: int) -> _Batches:
        return _Batches(
            [(torch.randn(n, 3, 2, 2, generator=generator), torch.randint(0, 5, (n,), generator=generator))
             for n in sizes],
            batch_size,
        )  # fmt: skip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 5)
        )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {
        "model": model, "optimizer": optimizer, "criterion": nn.CrossEntropyLoss(),
        "loaders": {"train": batches((4, 4, 4, 4, 2), 4), "val": batches((4, 4, 3), 4)},
    }  # fmt: skip


def _one_epoch(step: Callable, seed: int) -> dict[str, Any]:
    """One epoch (train, then val) with ``step(setup, phase, y_loss, y_err) -> (loss, accuracy)``, dropout seeded."""
    setup = _phase_setup(seed)
    y_loss: dict[str, list] = {"train": [], "val": []}
    y_err: dict[str, list] = {"train": [], "val": []}
    returned = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        for phase in ("train", "val"):
            returned[phase] = step(setup, phase, y_loss, y_err)
    weights = [p.detach().clone() for p in setup["model"].parameters()]
    buffers = [b.detach().clone() for b in setup["model"].buffers()]
    return {"returned": returned, "y_loss": y_loss, "y_err": y_err, "weights": weights, "buffers": buffers}


def _library_step(setup: dict, phase: str, y_loss: dict, y_err: dict) -> tuple[float, float]:
    """The truth: ``reid_utils.train.train_one_phase``, with the classic script's bookkeeping of the history."""
    from reid_utils.train import train_one_phase

    result = train_one_phase(
        setup["model"], setup["loaders"][phase], phase, setup["criterion"], setup["optimizer"], torch.device("cpu")
    )
    y_loss[phase].append(result.loss)
    y_err[phase].append(1.0 - result.accuracy)
    return result.loss, result.accuracy


def _variant_step(*, skip: bool = True, switch: bool = True, zero_grad: bool = True, val_step: bool = False,
                  divide_by_all: bool = False, skip_val: bool = False) -> Callable:  # fmt: skip
    """The loop with one typical mistake, only to name it in a hint (the truth is the library's loop)."""

    def step(setup: dict, phase: str, y_loss: dict, y_err: dict) -> tuple[float, float]:
        model, loader = setup["model"], setup["loaders"][phase]
        if switch:
            model.train(phase == "train")
        running_loss, running_corrects, seen, total = 0.0, 0, 0, 0
        for inputs, labels in loader:
            total += len(labels)
            if skip and (phase == "train" or skip_val) and len(labels) < loader.batch_size:
                continue
            if phase == "train" and zero_grad:
                setup["optimizer"].zero_grad()
            with torch.set_grad_enabled(phase == "train" or val_step):
                outputs = model(inputs)
                loss = setup["criterion"](outputs, labels)
            if phase == "train" or val_step:
                loss.backward()
                setup["optimizer"].step()
            running_loss += loss.item() * len(labels)
            running_corrects += (outputs.argmax(dim=1) == labels).sum().item()
            seen += len(labels)
        count = total if divide_by_all else seen
        y_loss[phase].append(running_loss / count)
        y_err[phase].append(1.0 - running_corrects / count)
        return running_loss / count, running_corrects / count

    return step


# The blog's loop (layumi's tutorial and train.py) skips a short last batch in both phases and divides by
# dataset_sizes[phase]: a faithful copy of it is no mistake, but it is not the loop of this series.
BLOG_LOOP = (
    "that is the blog's loop, which skips the short last batch in val too and divides by dataset_sizes, "
    "the skipped images included; here validation measures every image (skip only in training) and the "
    "sums are divided by the images actually used"
)
VAL_SKIPPED = (
    "that skips the short last batch in val too, as the blog's loop does; here validation measures "
    'every image: skip only when phase == "train"'
)
DIVIDED_BY_ALL = (
    "divide the sums by the images actually used, not by all the images of the loader (the blog "
    "divides by dataset_sizes[phase], which counts the skipped batch)"
)
_PHASE_MISTAKES = (
    (dict(skip_val=True, divide_by_all=True), BLOG_LOOP),
    (dict(skip_val=True), VAL_SKIPPED),
    (dict(skip=False), "skip the short last training batch (fewer images than loader.batch_size): "
                       "`if phase == \"train\" and inputs.size(0) < loader.batch_size: continue`"),
    (dict(divide_by_all=True), DIVIDED_BY_ALL),
    (dict(switch=False), "switch the mode first: model.train(phase == \"train\") -- in val, dropout must be off and "
                         "BatchNorm must use its running statistics"),
    (dict(val_step=True), "only the train phase calls loss.backward() and optimizer.step(): val only measures"),
    (dict(zero_grad=False), "call optimizer.zero_grad() before each training step: otherwise every step adds "
                            "the gradients of all the steps before"),
)  # fmt: skip

RUN_PHASE_SEEDS = (0, 1, 2)


def _close(a: Any, b: Any, tolerance: float = 1e-6) -> bool:
    return _is_real(a) and _is_real(b) and math.isclose(float(a), float(b), rel_tol=0, abs_tol=tolerance)


def _same_run(learner: dict, truth: dict) -> str | None:
    """What differs between two epochs, in words (naming the call), or None."""
    for phase in ("train", "val"):
        call = f"run_phase(..., phase={phase!r}, ...)"
        returned = learner["returned"][phase]
        expected = truth["returned"][phase]
        if not (isinstance(returned, tuple | list) and len(returned) == 2):
            return f"{call} should return (loss, accuracy), got {_shown(returned)}"
        for what, got, want in (("loss", returned[0], expected[0]), ("accuracy", returned[1], expected[1])):
            if not _close(got, want):
                return f"{call} should give the {what} {want:.6f}, got {_shown(got)}"
        for name, history, value in (("y_loss", learner["y_loss"], expected[0]),
                                     ("y_err", learner["y_err"], 1 - expected[1])):  # fmt: skip
            if len(history[phase]) != 1 or not _close(history[phase][0], value):
                got = _shown(history[phase])
                return f"{call} should append {value:.6f} to {name}[{phase!r}] (the epoch's value), got {got}"
    for mine, right in zip(learner["weights"] + learner["buffers"], truth["weights"] + truth["buffers"], strict=True):
        if not torch.allclose(mine, right, atol=1e-6):
            return (
                "run_phase(..., phase='train', ...) should leave the weights the library's loop leaves: loss and "
                "accuracy agree, the weights do not"
            )
    return None


def _epoch_of(fn: Callable, seed: int) -> dict[str, Any]:
    """One epoch (train, then val) of the learner's ``run_phase`` on the checker's network and batches."""

    def step(setup: dict, phase: str, y_loss: dict, y_err: dict) -> Any:
        return fn(setup["model"], setup["loaders"][phase], phase, setup["criterion"], setup["optimizer"],
                  torch.device("cpu"), y_loss, y_err)  # fmt: skip

    return _one_epoch(step, seed)


def _judge_run_phase(seed: int, outcome: Any) -> str | None:
    if isinstance(outcome, _Raised):
        return f"run_phase(..., phase='train', ...) should run an epoch, but {_shown(outcome)}"
    problem = _same_run(outcome, _one_epoch(_library_step, seed))
    if problem is None:
        return None
    for changes, hint in _PHASE_MISTAKES:
        if _same_run(outcome, _one_epoch(_variant_step(**changes), seed)) is None:
            return f"{problem} — {hint}"
    return problem


def check_run_phase(fn: Callable) -> bool:
    """Notebook 03: ``run_phase(model, loader, phase, criterion, optimizer, device, y_loss, y_err)``, one phase of
    one epoch as the classic ``train.py`` writes it, against ``reid_utils.train.train_one_phase`` on the same
    seeds, network and batches (loss and accuracy equal to 1e-6, the same weights afterwards)."""
    return _run("run_phase", fn, RUN_PHASE_SEEDS, _epoch_of, _judge_run_phase)


# --------------------------------------------------------------------------- 03 · train_model

# The short run the checker trains twice, with the package's train() and with the learner's loop: a ResNet-18 (the
# smallest backbone train() builds) at 16x8 pixels, three epochs, so that the rate drops (x0.1 after 2/3 of them:
# in the last epoch) and a numbered checkpoint (epoch 2) and net_last (epoch 3) are both written. Five people,
# three training and two val images each, batches of four: both phases end with a short batch.
TRAIN_MODEL_RUN = {"epochs": 3, "save_every": 2, "people": 5, "train_images": 3, "val_images": 2}
TRAIN_MODEL_SEEDS = (0,)
_TRAIN_MODEL_OPTIONS = {"name": "truth", "gpu_ids": "", "backbone": "resnet18", "height": 16, "width": 8,
                        "batchsize": 4, "lr": 0.01, "pretrained": False, "num_workers": 0}  # fmt: skip


class _Run(NamedTuple):
    """What a training loop left: its history, the weights it saved (label, state), what each redraw saw, and the
    epochs it started (``set_epoch``)."""

    returned: Any
    saves: list[tuple[str, dict[str, torch.Tensor]]]
    draws: list[tuple[int, ...]]
    epochs_set: list[int]


@contextlib.contextmanager
def _own_random_state():
    """The runs seed Python, NumPy and torch (``seed_everything``): give the learner's session its state back."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # e.g. PyTorch's "scheduler.step() before optimizer.step()" warning: the checker's hint says it
            warnings.simplefilter("ignore")
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _write_images(root: Path, seed: int) -> Path:
    """A prepared folder (``train/<pid>/``, ``val/<pid>/``) of tiny images, each person a colour plus noise."""
    rng = np.random.default_rng(seed)
    run = TRAIN_MODEL_RUN
    for pid in range(1, run["people"] + 1):
        colour = rng.integers(30, 226, 3)
        for split, count in (("train", run["train_images"]), ("val", run["val_images"])):
            folder = root / split / f"{pid:04d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 30, (32, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{pid:04d}_c{i + 1}s1_{i:06d}_01.jpg")
    return root


def _options(data_dir: Path, model_dir: Path, seed: int):
    from reid_utils.train import TrainOptions

    run = {"total_epoch": TRAIN_MODEL_RUN["epochs"], "save_every": TRAIN_MODEL_RUN["save_every"], "seed": seed}
    return TrainOptions(**_TRAIN_MODEL_OPTIONS, **run, data_dir=str(data_dir), model_dir=str(model_dir))


@functools.lru_cache(maxsize=len(TRAIN_MODEL_SEEDS))
def _package_run(seed: int) -> _Run:
    """The truth: ``reid_utils.train.train`` itself on the short run, read back from its checkpoints."""
    from reid_utils.runs import LAST_CHECKPOINT, checkpoint_name, load_checkpoint
    from reid_utils.train import train

    epochs, every = TRAIN_MODEL_RUN["epochs"], TRAIN_MODEL_RUN["save_every"]
    with tempfile.TemporaryDirectory() as tmp, _own_random_state():
        options = _options(_write_images(Path(tmp) / "data", seed), Path(tmp) / "model", seed)
        history = train(options, quiet=True)
        folder = Path(tmp) / "model" / options.name
        saves = [(str(done), load_checkpoint(folder / checkpoint_name(done))["model"])
                 for done in range(every, epochs + 1, every)]  # fmt: skip
        saves.append(("last", load_checkpoint(folder / LAST_CHECKPOINT)["model"]))
    returned = ({phase: history[f"{phase}_loss"] for phase in ("train", "val")},
                {phase: history[f"{phase}_err"] for phase in ("train", "val")})  # fmt: skip
    # A watched train() redraws its curve after every epoch's val phase (a quiet one only with its checkpoints).
    draws = [(epoch,) * 4 for epoch in range(1, epochs + 1)]
    return _Run(returned, saves, draws, list(range(epochs)))


def _loop_run(fn: Callable, seed: int) -> _Run:
    """Run a learner-style ``train_model`` on the short run, built exactly as ``train`` builds it."""
    from reid_utils.data import ClassicData, build_dataloaders
    from reid_utils.model import build_model
    from reid_utils.train import build_optimizer, build_scheduler, seed_everything

    saves: list[tuple[str, dict]] = []
    draws: list[tuple[int, ...]] = []
    epochs_set: list[int] = []

    def save_network(network: nn.Module, epoch_label: Any) -> None:
        saves.append((str(epoch_label), {k: v.detach().clone() for k, v in network.state_dict().items()}))

    def draw_curve(y_loss: dict, y_err: dict) -> None:
        draws.append(tuple(len(history[phase]) for history in (y_loss, y_err) for phase in ("train", "val")))

    with tempfile.TemporaryDirectory() as tmp, _own_random_state():
        options = _options(_write_images(Path(tmp) / "data", seed), Path(tmp) / "model", seed)
        seed_everything(options.seed)
        loaders, _, classes = build_dataloaders(
            options.data_dir, options.batchsize, False, options.height, options.width, seed=options.seed,
            backend=ClassicData(0),
        )  # fmt: skip
        options.num_classes = len(classes)
        model = build_model(options, pretrained=False)
        optimizer = build_optimizer(model, options.lr)
        scheduler = build_scheduler(optimizer, options.total_epoch)
        sampler, start_epoch = loaders["train"].sampler, loaders["train"].sampler.set_epoch

        def set_epoch(epoch: int) -> None:  # noted, then done
            epochs_set.append(epoch)
            start_epoch(epoch)

        sampler.set_epoch = set_epoch
        returned = fn(model, loaders, nn.CrossEntropyLoss(), optimizer, scheduler, torch.device("cpu"),
                      options.total_epoch, save_network, draw_curve, options.save_every)  # fmt: skip
    return _Run(returned, saves, draws, epochs_set)


def _variant_loop(*, skip_val: bool = False, divide_by_all: bool = False, scheduler: str = "after") -> Callable:
    """The epoch loop with one variant, only to name it in a hint (the truth is ``train`` itself)."""
    phase_step = _variant_step(skip_val=skip_val, divide_by_all=divide_by_all)

    def train_model(model, loaders, criterion, optimizer, lr_scheduler, device, num_epochs, save_network,
                    draw_curve, save_every=10):  # fmt: skip
        setup = {"model": model, "loaders": loaders, "criterion": criterion, "optimizer": optimizer}
        y_loss: dict[str, list] = {"train": [], "val": []}
        y_err: dict[str, list] = {"train": [], "val": []}
        for epoch in range(num_epochs):
            loaders["train"].sampler.set_epoch(epoch)
            for phase in ("train", "val"):
                if scheduler == "first" and phase == "train" or scheduler == "each phase":
                    lr_scheduler.step()
                phase_step(setup, phase, y_loss, y_err)
            if scheduler == "after":
                lr_scheduler.step()
        return y_loss, y_err

    return train_model


_LOOP_VARIANTS = (
    (dict(skip_val=True, divide_by_all=True, scheduler="first"),
     "that is the blog's loop as train.py wrote it then: it skips the short last batch in val too, divides by "
     "dataset_sizes (the skipped images included) and steps the scheduler at the start of the train phase; here "
     "validation measures every image, the sums are divided by the images used, and scheduler.step() follows the "
     "epoch's optimizer steps"),
    (dict(scheduler="first"), "scheduler.step() comes once per epoch *after* the epoch's optimizer steps; stepped "
                              "before them (at the start of the train phase, as train.py did before PyTorch 1.1 "
                              "moved it), the rate drops one epoch early"),
    (dict(skip_val=True, divide_by_all=True), BLOG_LOOP),
    (dict(skip_val=True), VAL_SKIPPED),
    (dict(divide_by_all=True), DIVIDED_BY_ALL),
    (dict(scheduler="never"), "call scheduler.step() once per epoch, after the train and val phases: without it the "
                              "rate never drops (x0.1 after 2/3 of the epochs)"),
    (dict(scheduler="each phase"), "call scheduler.step() once per epoch, not once per phase"),
)  # fmt: skip
SET_EPOCH = (
    'start each epoch with loaders["train"].sampler.set_epoch(epoch): the epoch\'s shuffle and augmentation '
    "follow from the seed and the epoch (what lets a run resume exactly; the classic DataLoader reshuffles "
    "by itself)"
)


@functools.lru_cache(maxsize=2 * len(_LOOP_VARIANTS))
def _variant_run(seed: int, variant: int) -> _Run:
    return _loop_run(_variant_loop(**_LOOP_VARIANTS[variant][0]), seed)


def _returns_two_histories(learner: _Run) -> str | None:
    returned = learner.returned
    if isinstance(returned, tuple | list) and len(returned) == 2 and all(isinstance(h, dict) for h in returned):
        return None
    call = f"train_model(..., num_epochs={TRAIN_MODEL_RUN['epochs']}, ...)"
    return f"{call} should return (y_loss, y_err), two dicts of lists, got {_shown(returned)}"


def _same_history(learner: _Run, truth: _Run) -> str | None:
    """What differs between two runs' ``(y_loss, y_err)``, in words (naming the epoch), or None."""
    call = f"train_model(..., num_epochs={TRAIN_MODEL_RUN['epochs']}, ...)"
    returned = learner.returned
    for name, mine, right in zip(("y_loss", "y_err"), returned, truth.returned, strict=True):
        for phase in ("train", "val"):
            got, want = mine.get(phase), right[phase]
            if not isinstance(got, list) or len(got) != len(want):
                return f"{call} should give {name}[{phase!r}] one value per epoch ({len(want)}), got {_shown(got)}"
            for epoch, (value, expected) in enumerate(zip(got, want, strict=True), start=1):
                if not _close(value, expected):
                    return (f"{call} should give {name}[{phase!r}] {expected:.6f} in epoch {epoch} (as train() "
                            f"does), got {_shown(value)}")  # fmt: skip
    return None


def _same_checkpoints(learner: _Run, truth: _Run) -> str | None:
    labels, expected = [label for label, _ in learner.saves], [label for label, _ in truth.saves]
    call = f"train_model(..., num_epochs={TRAIN_MODEL_RUN['epochs']}, save_every={TRAIN_MODEL_RUN['save_every']})"
    if labels != expected:
        numbered = [label for label in expected if label != "last"]
        if "last" not in labels:
            why = 'after the last epoch, save_network(model, "last") saves the final weights (net_last.pth)'
        elif labels[: len(numbered)] == [str(int(label) - 1) for label in numbered]:
            why = (
                "a checkpoint's label is the number of epochs done, epoch + 1: net_10.pth after the tenth epoch "
                "(the blog's save_network(model, epoch) calls it net_9.pth)"
            )
        else:
            why = 'save every save_every epochs, when (epoch + 1) % save_every == 0, then once more as "last"'
        return f"{call} should call save_network with the labels {expected}, got {labels} — {why}"
    for (label, mine), (_, right) in zip(learner.saves, truth.saves, strict=True):
        if mine.keys() != right.keys() or not all(torch.allclose(mine[k].float(), right[k].float(), atol=1e-6)
                                                  for k in right):  # fmt: skip
            return (
                f"{call}: save_network(model, {label!r}) should save the weights train() saved at that point "
                "(after the epoch's val phase), and it saved others"
            )
    return None


def _same_draws(learner: _Run, truth: _Run) -> str | None:
    call = f"train_model(..., num_epochs={TRAIN_MODEL_RUN['epochs']}, ...)"
    if learner.draws == truth.draws:
        return None
    every = TRAIN_MODEL_RUN["save_every"]
    if not learner.draws:
        why = "call draw_curve(y_loss, y_err) after every epoch's val phase"
    elif all(draw[0] % every == 0 or draw[0] == TRAIN_MODEL_RUN["epochs"] for draw in learner.draws):
        why = (
            "draw after every epoch, as layumi's train.py does, not only with the checkpoints (the blog's text "
            "says every 10 epochs): a live curve that moves once in ten epochs is a progress bar"
        )
    elif any(draw[1] < draw[0] for draw in learner.draws):
        why = "draw after the val phase, when both phases of the epoch are in the history"
    else:
        why = "draw_curve(y_loss, y_err) once per epoch, after its val phase"
    saw = ", ".join(f"{draw[0]}/{draw[1]}" for draw in learner.draws) or "no call"
    return f"{call} should redraw {len(truth.draws)} times, once per epoch, got {saw} (train/val entries seen) — {why}"


def _judge_train_model(seed: int, outcome: Any) -> str | None:
    if isinstance(outcome, _Raised):
        return f"train_model(..., num_epochs={TRAIN_MODEL_RUN['epochs']}, ...) should train, but {_shown(outcome)}"
    shape = _returns_two_histories(outcome)
    if shape is not None:
        return shape
    truth = _package_run(seed)
    problem = _same_history(outcome, truth)
    if problem is not None and outcome.epochs_set != truth.epochs_set:
        return f"{problem} — {SET_EPOCH}; it was called with {outcome.epochs_set or 'no epoch'}"
    if problem is not None:
        for variant, (_, hint) in enumerate(_LOOP_VARIANTS):
            if _same_history(outcome, _variant_run(seed, variant)) is None:
                return f"{problem} — {hint}"
        return problem
    return _same_checkpoints(outcome, truth) or _same_draws(outcome, truth)


def check_train_model(fn: Callable) -> bool:
    """Notebook 03: ``train_model(model, loaders, criterion, optimizer, scheduler, device, num_epochs, save_network,
    draw_curve, save_every=10)``, the classic epoch loop, against ``reid_utils.train.train`` on a short run from the
    same seed: every epoch's losses and errors equal to 1e-6, the same checkpoints, one redraw per epoch."""
    epochs = TRAIN_MODEL_RUN["epochs"]
    passed = f"the same {epochs} epochs, checkpoints and redraws as the package's train()"
    return _run("train_model", fn, TRAIN_MODEL_SEEDS, lambda f, seed: _loop_run(f, seed), _judge_train_model, passed)


# --------------------------------------------------------------------------- 04 · average_precision

AVERAGE_PRECISION_CASES = (
    (True,),
    (False, True),
    (True, False, True),
    (False, True, False, True, False),
    (True, True, False, False),
    (False, False, False, True, True, False),
    (False,) * 9 + (True,),
    (True, False, False, True, False, True, False, False),
)


def ranking_case(is_match: Sequence[bool]) -> dict[str, np.ndarray]:
    """Features and labels for one query whose junk-removed ranking is exactly ``is_match``.

    As in notebook 04: the query is [1, 0] (person 7, camera 1) and the gallery holds unit vectors whose dot
    product with it falls item by item. Two junk items are mixed in, a pid -1 box and person 7 seen by camera 1,
    which the protocol must remove; the wrong answers are other people and a distractor (pid 0).
    """
    rows: list[tuple[int, int]] = [(-1, 3)]  # a junk box, ranked first
    for r, match in enumerate(is_match):
        rows.append((7, 2 + r % 5) if match else (0 if r == 0 else 100 + r, 2 + r % 5))
        if r == 0:
            rows.append((7, 1))  # the query's person in the query's own camera: junk
    scores = np.linspace(0.95, 0.05, len(rows))
    return {
        "query_features": np.array([[1.0, 0.0]]),
        "query_pids": np.array([7]),
        "query_cams": np.array([1]),
        "gallery_features": np.stack([scores, np.sqrt(1 - scores**2)], axis=1),
        "gallery_pids": np.array([pid for pid, _ in rows]),
        "gallery_cams": np.array([cam for _, cam in rows]),
    }


def _library_ap(is_match: Sequence[bool], convention: str = "market") -> float:
    from reid_utils.metrics import evaluate

    return float(evaluate(**ranking_case(is_match), ap=convention).mAP)


def _ap_variant(is_match: Sequence[bool], variant: str) -> float | None:
    """The typical wrong answers, to say which one a result matches (None where a variant divides by zero)."""
    hits = [r for r, match in enumerate(is_match) if match]
    terms = []
    for i, r in enumerate(hits, start=1):
        if variant == "one-based":  # r taken as the 1-based position in formulas written for 0-based ranks
            terms.append(((i - 1) / (r + 1) + i / (r + 2)) / 2)
        elif variant == "before-zero-at-top":  # the precision before a hit at rank 0 taken as 0 instead of 1
            terms.append(((i - 1) / r if r else 0.0) / 2 + i / (r + 1) / 2)
        else:
            terms.append(((i - 1) / r if r else 1.0) / 2 + i / (r + 1) / 2)
    if variant == "not-divided":
        return sum(terms)
    return sum(terms) / len(hits)


_AP_HINTS = (
    ("step", "that is the step AP (mean of the precisions at the hits); the Market-1501 AP averages, at each hit, "
             "the precision just before it, (i-1)/r, with the precision at it, i/(r+1)"),
    ("not-divided", "you added the per-hit terms but did not divide by the number of hits"),
    ("one-based", "off by one in the rank: r is 0-based, the top of the list is r = 0 with precision i/(r+1) = 1"),
    ("before-zero-at-top", "for a hit at r = 0 the precision before it is 1 by convention, not 0"),
)  # fmt: skip


def _judge_ap(is_match: tuple[bool, ...], outcome: Any) -> str | None:
    expected = _library_ap(is_match)
    call = f"average_precision({list(is_match)})"
    if isinstance(outcome, _Raised):
        why = ""
        if isinstance(outcome.error, ZeroDivisionError):
            why = " — ranks are 0-based here: for a hit at r = 0 the precision before it is 1, and at it 1/(0+1)"
        return f"{call} should return {expected:.4f}, but {_shown(outcome)}{why}"
    if not _is_real(outcome):
        return f"{call} should return the float {expected:.4f}, got {_shown(outcome)}"
    if math.isclose(outcome, expected, rel_tol=0, abs_tol=1e-6):
        return None
    why = ""
    for variant, hint in _AP_HINTS:
        value = _library_ap(is_match, "step") if variant == "step" else _ap_variant(is_match, variant)
        if math.isclose(outcome, value, rel_tol=0, abs_tol=1e-6):
            why = f" — {hint}"
            break
    return f"{call} should return {expected:.4f}, got {_shown(float(outcome))}{why}"


def check_average_precision(fn: Callable[[list[bool]], float]) -> bool:
    """Notebook 04: ``average_precision(is_match)``, Market-1501 convention, against ``metrics.evaluate``."""
    return _run("average_precision", fn, AVERAGE_PRECISION_CASES, lambda f, case: f(list(case)), _judge_ap)


# --------------------------------------------------------------------------- 05 · k_reciprocal

# (kind, n, i, k); each kind is a symmetric distance matrix with zeros on the diagonal.
K_RECIPROCAL_CASES = (
    ("points", 6, 0, 1),
    ("points", 8, 3, 3),
    ("points", 10, 7, 4),
    ("uniform", 12, 5, 5),
    ("uniform", 7, 2, 7),
    ("ties", 9, 4, 3),
    ("points", 15, 14, 6),
    ("uniform", 20, 0, 8),
)


def distance_matrix(kind: str, n: int) -> np.ndarray:
    """A fixed symmetric (n, n) distance matrix, zero on the diagonal and positive elsewhere.

    ``points``: Euclidean distances of random points; ``uniform``: random symmetric values; ``ties``: the
    values 1, 2 and 3 only, so that a stable sort (ties by index) matters.
    """
    rng = np.random.default_rng(n)
    if kind == "points":
        x = rng.standard_normal((n, 4))
        dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
    else:
        raw = rng.uniform(0.1, 1.0, (n, n)) if kind == "uniform" else rng.integers(1, 4, (n, n)).astype(float)
        dist = np.triu(raw, 1) + np.triu(raw, 1).T
    np.fill_diagonal(dist, 0.0)
    return dist


def reference_k_reciprocal(dist: np.ndarray, i: int, k: int) -> set[int]:
    """j with j among the k nearest of i and i among the k nearest of j; a row's own index comes first."""

    def nearest(row: int) -> list[int]:
        return [int(j) for j in np.argsort(dist[row], kind="stable")[:k]]

    return {j for j in nearest(i) if i in nearest(j)}


def _judge_k_reciprocal(case: tuple[str, int, int, int], outcome: Any) -> str | None:
    kind, n, i, k = case
    dist = distance_matrix(kind, n)
    expected = reference_k_reciprocal(dist, i, k)
    call = f"k_reciprocal(distance_matrix({kind!r}, {n}), i={i}, k={k})"  # importable, to rebuild the case
    if isinstance(outcome, _Raised):
        return f"{call} should return {_shown(expected)}, but {_shown(outcome)}"
    if not isinstance(outcome, set | frozenset):
        return f"{call} should return the set {_shown(expected)}, got {type(outcome).__name__} {_shown(outcome)}"
    if outcome == expected:
        return None
    forward = {int(j) for j in np.argsort(dist[i], kind="stable")[:k]}
    if outcome == expected - {i}:
        why = "i itself belongs to the set: it is its own nearest neighbour (distance 0), among the k nearest of i"
    elif outcome == forward:
        why = "that is every j among the k nearest of i; keep only those that also have i among their k nearest"
    elif outcome == reference_k_reciprocal(dist, i, k + 1):
        why = "that uses k + 1 nearest; the k nearest of a row include the row itself"
    elif k > 1 and outcome == reference_k_reciprocal(dist, i, k - 1):
        why = "that uses k - 1 nearest; the k nearest of a row include the row itself"
    elif kind == "ties":
        why = "this matrix has equal distances: break ties by index, np.argsort(dist[row], kind='stable')"
    else:
        why = ""
    why = f" — {why}" if why else ""
    return f"{call} should return {_shown(expected)}, got {_shown(outcome)}{why}"


def _call_k_reciprocal(fn: Callable, case: tuple[str, int, int, int]) -> Any:
    kind, n, i, k = case
    return fn(distance_matrix(kind, n), i, k)  # a fresh matrix: the learner may change it in place


def check_k_reciprocal(fn: Callable[[np.ndarray, int, int], set[int]]) -> bool:
    """Notebook 05: ``k_reciprocal(dist, i, k)`` against a plain reference on fixed random distance matrices."""
    return _run("k_reciprocal", fn, K_RECIPROCAL_CASES, _call_k_reciprocal, _judge_k_reciprocal)


# --------------------------------------------------------------------------- 06 · smoothed_target

SMOOTHED_TARGET_CASES = (
    (4, 0, 0.0),
    (4, 2, 0.1),
    (10, 9, 0.1),
    (751, 17, 0.1),
    (3, 1, 0.3),
)


def _library_smoothed_loss(num_classes: int, true_class: int, eps: float, logits: torch.Tensor) -> float:
    """The truth, from PyTorch itself: cross-entropy with ``label_smoothing``."""
    return nn.functional.cross_entropy(logits, torch.tensor([true_class]), label_smoothing=eps).item()


def _judge_smoothed(case: tuple[int, int, float], outcome: Any) -> str | None:
    num_classes, true_class, eps = case
    call = f"smoothed_target(num_classes={num_classes}, true_class={true_class}, eps={eps})"
    if isinstance(outcome, _Raised):
        return f"{call} should return {num_classes} probabilities, but {_shown(outcome)}"
    try:
        if np.ndim(outcome) != 1:
            raise TypeError
        target = torch.as_tensor(np.asarray(outcome, dtype=np.float64), dtype=torch.float64)
    except (TypeError, ValueError):
        return f"{call} should return a list of {num_classes} floats, got {_shown(outcome)}"
    if target.numel() != num_classes:
        return f"{call} should return {num_classes} values (one per class), got {target.numel()}"
    if abs(target.sum().item() - 1) > 1e-6:
        return f"{call} should return probabilities that sum to 1, yours sum to {target.sum().item():.4f}"
    generator = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(1, num_classes, generator=generator, dtype=torch.float64)
    yours = -(target * nn.functional.log_softmax(logits, dim=1)[0]).sum().item()
    if abs(yours - _library_smoothed_loss(num_classes, true_class, eps, logits)) < 1e-6:
        return None
    wrong_mass = eps / (num_classes - 1)
    if abs(target[(true_class + 1) % num_classes].item() - wrong_mass) < 1e-9:
        why = "PyTorch spreads eps over *all* classes (eps/C each, the true one included), not over the C-1 others"
    elif abs(target[true_class].item() - (1 - eps)) < 1e-9:
        why = "the true class gets 1 - eps *plus* its share eps/C"
    else:
        why = "the target is (1 - eps) on the true class plus eps/C on every class"
    return f"{call} should give the loss of nn.CrossEntropyLoss(label_smoothing={eps}), yours differs — {why}"


def check_smoothed_target(fn: Callable[[int, int, float], list[float]]) -> bool:
    """Notebook 06: ``smoothed_target(num_classes, true_class, eps)``, the target label smoothing trains towards."""
    return _run("smoothed_target", fn, SMOOTHED_TARGET_CASES, lambda f, case: f(*case), _judge_smoothed)
