"""Time training and feature extraction on the CPU: the classic DataLoader path against the cached tensor path.

Ways to feed the same model the same kind of batches, all trained by the trainer's own
``reid_utils.train.train_one_phase`` (SGD from ``build_optimizer``, cross-entropy loss):

* ``classic``         -- ``reid_utils.data.build_dataloaders``: ``ImageFolder`` + PIL decode, resize and augment
  every image of every epoch, ``default_num_workers()`` worker processes (0 on a 2-core machine);
* ``cached``          -- ``build_dataloaders(..., backend=fastdata.CachedData())``: decoded once, batches augmented
                         as tensors;
* ``cached+CL``       -- the same, with the model and its inputs in ``channels_last`` memory format;
* ``cached+fused``    -- ``cached`` with ``build_optimizer``'s SGD built with ``fused=True`` (same numbers, one
  kernel per parameter). Not a data-path change: it shows what else a CPU step can save;
* ``cached+CL+fused`` -- both;
* ``cached+CL+bf16``  -- both, with bfloat16 autocast: the whole fast path of the ``market-gpu`` profile. On a
  CPU it runs only where the CPU computes bfloat16 natively (AVX-512 BF16 or AMX), else it is left out.

``--device cuda`` runs the same comparison on a GPU (the cached paths then keep their uint8 cache on the GPU
and augment there; the classic path uses DataLoader worker processes) and adds what 60 epochs of Market-1501
would take at the measured speed -- the figure the GPU fast path was designed for.

The script also times the data alone (no model) and prints what saving that time predicts (Amdahl's law: the
model's share of the step stays); the measured gain can be a little larger or smaller.

Two configurations: ``demo`` (ResNet-18, 64x32, the ``cpu-demo`` profile) and ``baseline`` (ResNet-50, 256x128;
slow on a CPU, so only ``--baseline_batches`` batches are timed). Each path starts from the same initial
weights. The paths take turns in short rounds (in alternating order), so a machine whose speed drifts -- other
programs, turbo, a shared host -- slows all of them alike; the rates are total images over total time, and the
median of the per-round ratios is printed too. Warm-up steps are not timed; neither is decoding the cache,
which is reported on its own line (it happens once per run, or never with a disk cache).

``--busy`` asks another question: how much of its speed the demo profile keeps when another program keeps one of
the two cores busy (a browser, a video call; here ``python -c "while True: pass"``). Each run is the command line
``python -m reid_utils.train`` with the ``cpu-demo`` profile's options in a fresh process (or a fresh Jupyter
kernel running ``reid_utils.train.main`` with them, as a notebook does), started in each of the ways of
``STARTS`` (OpenMP reads how its threads wait when torch loads, so only a fresh process can change it); rounds
alternate an idle machine and a busy one, and the training rate (images of the train and val phases over the
epoch times the run saved, its first epoch left out) is compared per way of starting.

Run from the repository root::

    python benchmarks/bench_train.py                          # both configurations, ~2 minutes on 2 cores
    python benchmarks/bench_train.py --configs demo --train_ids 150
    python benchmarks/bench_train.py --erasing_p 0.5 --color_jitter   # the augmentation-heavy recipe
    python benchmarks/bench_train.py --device cuda --configs baseline --train_ids 751 --baseline_batches 200
    python benchmarks/bench_train.py --busy                   # idle against one busy core, ~6 minutes
    python benchmarks/bench_train.py --busy --starts "torch first" "as shipped" passive --spins 3000 30000
    python benchmarks/bench_train.py --busy --starts "kernel, torch first" kernel   # in a Jupyter kernel
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from reid_utils.data import build_dataloaders, default_num_workers
from reid_utils.fastdata import CachedData, CachedLoader, TensorAugment
from reid_utils.losses import ReIDLoss
from reid_utils.model import ReIDNet
from reid_utils.prepare import prepare_market
from reid_utils.profiles import PROFILES
from reid_utils.speed import cpu_has_bf16, float32_on_tiny_maps, reuse_freed_memory
from reid_utils.synthetic import generate_market, read_summary
from reid_utils.test import evaluation_loader, extract_features
from reid_utils.train import build_optimizer, train_one_phase


@dataclass(frozen=True)
class Config:
    name: str
    backbone: str
    height: int
    width: int
    batch_size: int
    extract_folder: str  # the baseline extracts the (smaller) query set to keep the run short


# path -> what it changes: the loader, the memory format, the optimiser kernel
PATHS = {
    "classic": "ImageFolder + DataLoader, PIL every step",
    "cached": "CachedLoader (decoded once, batched tensor augmentation)",
    "cached+CL": "CachedLoader, model and inputs channels_last",
    "cached+fused": "CachedLoader, build_optimizer's SGD with fused=True (not a data-path change)",
    "cached+CL+fused": "both",
    "cached+CL+bf16": "CachedLoader, channels_last, fused SGD, bfloat16 autocast (the market-gpu fast path)",
}
MARKET_TRAIN_IMAGES = 12936  # bounding_box_train of Market-1501 (reid-facts.md)

CONFIGS = {
    "demo": Config("demo", "resnet18", 64, 32, 32, "gallery"),
    "baseline": Config("baseline", "resnet50", 256, 128, 32, "query"),
}


# --busy: ways of starting the demo's command line (each a fresh process)
STARTS = {
    "torch first": "torch loaded before reid_utils: OpenMP's own default, threads spin a while before they sleep",
    "as shipped": "python -m reid_utils.train: reid_utils sets how OpenMP threads wait before torch loads",
    "1 thread": "the same with OMP_NUM_THREADS=1 (for comparison: one thread sums in another order)",
    "passive": "the same with OMP_WAIT_POLICY=passive alone: waiting threads sleep at once (0 spins)",
    "kernel": "a Jupyter kernel, as the notebooks run: import reid_utils first, then reid_utils.train.main(...)",
    "kernel, torch first": "a Jupyter kernel that loads torch before reid_utils: OpenMP's own default",
}
DEFAULT_STARTS = ["torch first", "as shipped", "1 thread"]


def describe(start: str) -> str:
    """What a way of starting does; ``--spins N`` adds "N spins": a user's GOMP_SPINCOUNT=N (reid_utils keeps it)."""
    return STARTS.get(start) or f"the same with GOMP_SPINCOUNT={start.split()[0]}: waiting threads spin that long"


ROOT = Path(__file__).resolve().parents[1]


@dataclass
class PathTimes:
    """What one data path did during the timed rounds."""

    images: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # the mean loss of each round
    round_rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class Extraction:
    images: int
    cache_seconds: float  # decoding the folder once
    max_difference: float  # between the classic and the cached features (same model)
    rates: dict[str, float]  # images/s per path


class FirstBatches:
    """The first ``n`` batches of a loader (a fresh epoch each time), with the loader's ``dataset``.

    Lets the trainer's ``train_one_phase`` time a part of an epoch on the slow configuration.
    """

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n, self.dataset, self.batch_size = loader, n, loader.dataset, loader.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index, batch in enumerate(self.loader):
            if index == self.n:
                return
            yield batch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_data(work: Path, train_ids: int, test_ids: int) -> Path:
    """A synthetic Market-1501 in ``work`` (reused when it is already there with these settings), prepared."""
    market = work / "Market"
    summary = read_summary(market)
    if summary is None or (summary.seed, summary.train_ids, summary.test_ids) != (0, train_ids, test_ids):
        generate_market(market, seed=0, train_ids=train_ids, test_ids=test_ids, overwrite=True)
    return prepare_market(market, work / "prepared", quiet=True).root


def plain_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The classic loop's SGD: ``build_optimizer``'s groups and settings without the fused kernel it now uses."""
    reference = build_optimizer(model, lr)
    groups = [{**group, "fused": None} for group in reference.param_groups]
    return torch.optim.SGD(groups, **{**reference.defaults, "fused": None})


def fused_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """``build_optimizer``'s SGD -- same parameter groups and hyper-parameters -- with ``fused=True``.

    Not part of the data path: a one-argument change to ``reid_utils.train.build_optimizer`` that this benchmark
    measures separately. The fused kernel updates each parameter in one pass instead of four elementwise ops,
    and gives the same numbers (identical parameters after 10 steps in our check on torch 2.14).
    """
    reference = build_optimizer(model, lr)
    groups = [{**group, "foreach": None, "fused": True} for group in reference.param_groups]
    return torch.optim.SGD(groups, **{**reference.defaults, "foreach": None, "fused": True})


def synchronize(device: torch.device) -> None:
    """Wait for the GPU to finish its queued work, so the clock measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def data_only_ms(loader, batches: int, device: torch.device) -> float:
    """Milliseconds per batch to produce ``batches`` batches on ``device``, with no model: the data path's own cost."""
    synchronize(device)
    start = time.perf_counter()
    seen = 0
    for images, _ in FirstBatches(loader, batches):
        images.to(device)  # the classic path's batches still have to reach the GPU
        seen += 1
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / max(seen, 1)


def time_training(
    config: Config, prepared: Path, args: argparse.Namespace
) -> tuple[dict[str, PathTimes], float, dict[str, nn.Module]]:
    """Train every path in turns; returns their times, the cache build time and the trained models."""
    c = config
    device = torch.device(args.device)
    classic, sizes, names = build_dataloaders(
        prepared, c.batch_size, False, c.height, c.width, args.erasing_p, args.color_jitter, args.seed
    )
    started = time.perf_counter()
    cached, cached_sizes, cached_names = build_dataloaders(
        prepared, c.batch_size, False, c.height, c.width, args.erasing_p, args.color_jitter, args.seed,
        backend=CachedData(device=device),
    )  # fmt: skip
    synchronize(device)
    cache_seconds = time.perf_counter() - started
    assert cached_sizes == sizes and cached_names == names
    train_set = cached["train"].dataset
    print(
        f"  cache: decoded {sizes['train'] + sizes['val']} images (train + val) once in {cache_seconds:.2f} s "
        f"({train_set.nbytes / 2**20:.1f} MiB of uint8 for train; Market-1501's 12,936 would take "
        f"{12936 * 3 * c.height * c.width / 2**20:.0f} MiB)"
    )
    augment = cached["train"].transform
    channels_last_loader = CachedLoader(
        train_set,
        c.batch_size,
        TensorAugment(augment.pad, augment.flip, augment.color_jitter, augment.erasing_p, channels_last=True),
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        device=device,
    )
    epoch = len(classic["train"])
    data_batches = epoch if c.name == "demo" else min(epoch, 20)
    data_ms = {
        "classic": data_only_ms(classic["train"], data_batches, device),
        "cached": data_only_ms(cached["train"], data_batches, device),
    }
    print(f"  data only (no model): classic {data_ms['classic']:.2f} ms/batch, cached {data_ms['cached']:.2f} ms/batch")
    # path -> (loader, channels_last, fused SGD, bfloat16 autocast)
    specs = {
        "classic": (classic["train"], False, False, False),
        "cached": (cached["train"], False, False, False),
        "cached+CL": (channels_last_loader, True, False, False),
        "cached+fused": (cached["train"], False, True, False),
        "cached+CL+fused": (channels_last_loader, True, True, False),
        "cached+CL+bf16": (channels_last_loader, True, True, True),
    }
    specs = {path: spec for path, spec in specs.items() if path in args.paths or path == "classic"}
    if "cached+CL+bf16" in specs and device.type == "cpu" and not cpu_has_bf16():
        print("  cached+CL+bf16 left out: this CPU has no native bfloat16 (AVX-512 BF16 or AMX)")
        del specs["cached+CL+bf16"]
    torch.manual_seed(args.seed)
    initial = ReIDNet(len(names), c.backbone, pretrained=False, quiet=True)
    models, optimizers = {}, {}
    for path, (_, channels_last, fused, _) in specs.items():
        model = copy.deepcopy(initial).to(device)
        models[path] = model.to(memory_format=torch.channels_last) if channels_last else model
        if specs[path][3] and device.type == "cpu":
            float32_on_tiny_maps(models[path])  # as the trainer does for CPU bfloat16 (speed.needs_float32)
        optimizers[path] = (fused_optimizer if fused else plain_optimizer)(models[path], args.lr)
    criterion = ReIDLoss()  # plain cross-entropy: no label smoothing, no triplet term

    def run(path: str, batches: int) -> tuple[float, int, float]:
        loader = FirstBatches(specs[path][0], batches)
        dtype = torch.bfloat16 if specs[path][3] else None  # bfloat16 autocast in the loop (no loss scaling)
        synchronize(device)
        start = time.perf_counter()
        result = train_one_phase(models[path], loader, "train", criterion, optimizers[path], device, dtype)
        synchronize(device)
        return result.loss, result.seen, time.perf_counter() - start

    if c.name == "demo":
        per_round, rounds, warmup = epoch, args.demo_epochs, 3  # a round = one whole epoch
    elif device.type == "cuda":  # fast enough for rounds of several batches; more warm-up for cuDNN's autotuning
        per_round, rounds, warmup = 10, max(1, args.baseline_batches // 10), 5
    else:
        per_round, rounds, warmup = 1, args.baseline_batches, 1
    for path in specs:
        run(path, warmup)
    times = {path: PathTimes() for path in specs}
    order = list(specs)
    for index in range(rounds):
        for path in order if index % 2 == 0 else reversed(order):  # ABC CBA ABC ...: no path always goes first
            loss, seen, seconds = run(path, per_round)
            times[path].images += seen
            times[path].seconds += seconds
            times[path].losses.append(loss)
            times[path].round_rates.append(seen / seconds)
    # Amdahl: a faster data path saves the data time of each step; the model's time stays.
    step_ms = 1000 * c.batch_size / times["classic"].rate
    estimate = step_ms / (step_ms - data_ms["classic"] + data_ms["cached"])
    print(
        f"  classic step {step_ms:.1f} ms/batch, of which data alone {data_ms['classic']:.1f} ms: saving that time "
        f"predicts x{estimate:.2f} (measured below; it can differ, as data and model share the CPU's caches)"
    )
    return times, cache_seconds, models


def time_extraction(
    config: Config, prepared: Path, models: dict[str, nn.Module], repeats: int, device: torch.device
) -> Extraction:
    """Flip-averaged feature extraction in eval mode, images/s, with ``reid_utils.test.extract_features``."""
    c = config
    folder = prepared / c.extract_folder
    classic = evaluation_loader(folder, c.height, c.width, batch_size=64)
    started = time.perf_counter()
    cached = evaluation_loader(folder, c.height, c.width, batch_size=64, backend=CachedData(device=device))
    synchronize(device)
    cache_seconds = time.perf_counter() - started
    channels_last = CachedLoader(cached.dataset, 64, TensorAugment(channels_last=True), device=device)
    runs = {
        "classic": (models["classic"], classic),
        "cached": (models["classic"], cached),
        "cached+CL": (copy.deepcopy(models["classic"]).to(memory_format=torch.channels_last), channels_last),
    }
    seconds = dict.fromkeys(runs, 0.0)
    features = {}
    for model, loader in runs.values():  # warm-up: one batch each
        extract_features(model, FirstBatches(loader, 1), device=device)
    for index in range(repeats):
        for path in list(runs) if index % 2 == 0 else reversed(list(runs)):
            model, loader = runs[path]
            start = time.perf_counter()
            features[path] = extract_features(model, loader, device=device).features  # ends on the CPU: synced
            seconds[path] += time.perf_counter() - start
    n = len(cached.dataset)
    return Extraction(
        images=n,
        cache_seconds=cache_seconds,
        max_difference=float((features["classic"] - features["cached"]).abs().max()),
        rates={path: n * repeats / seconds[path] for path in runs},
    )


@contextlib.contextmanager
def busy_core():
    """Another program keeping one core busy for the duration of the block."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it get scheduled
        yield
    finally:
        spinner.kill()
        spinner.wait()


def demo_command(start: str, prepared: Path, model_dir: Path, name: str, epochs: int) -> tuple[list[str], dict]:
    """The command line and environment that train the ``cpu-demo`` profile, started the way ``start`` says."""
    profile = PROFILES["cpu-demo"]
    options = ["--data_dir", str(prepared), "--model_dir", str(model_dir), "--name", name, "--no_pretrained",
               "--total_epoch", str(epochs), "--save_every", str(epochs), "--gpu_ids", "", "--lr", str(profile["lr"]),
               "--backbone", profile["backbone"], "--height", str(profile["height"]), "--width", str(profile["width"]),
               "--batchsize", str(profile["batchsize"])]  # fmt: skip
    # the user's machine: none of the test suite's thread settings
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OMP_", "GOMP_", "MKL_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if start == "1 thread":
        env["OMP_NUM_THREADS"] = "1"
    if start == "passive":
        env["OMP_WAIT_POLICY"] = "passive"
    if start.endswith(" spins"):
        env["GOMP_SPINCOUNT"] = start.split()[0]
    if start == "torch first":
        load = "import torch, runpy; runpy.run_module('reid_utils.train', run_name='__main__', alter_sys=True)"
        return [sys.executable, "-c", load, *options], env
    if start.startswith("kernel"):  # the code a notebook cell would run
        first = "import torch\n" if start.endswith("torch first") else ""
        return [f"{first}import reid_utils\nfrom reid_utils.train import main\nmain({options!r})"], env
    return [sys.executable, "-m", "reid_utils.train", *options], env


def run_in_kernel(code: str, env: dict) -> None:
    """Run ``code`` in a fresh Jupyter kernel (the environment ``env``), as a notebook cell would."""
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", env=env, stderr=subprocess.DEVNULL)  # its failures: below
    try:
        reply = client.execute_interactive(code, timeout=900, output_hook=lambda message: None)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the kernel failed: {reply['content'].get('ename')}: {reply['content'].get('evalue')}")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def demo_rate(start: str, prepared: Path, work: Path, epochs: int) -> float:
    """Training images per second of one fresh run (train and val phases, epochs after the first)."""
    name = f"busy_{time.monotonic_ns()}"
    command, env = demo_command(start, prepared, work, name, epochs)
    if start.startswith("kernel"):
        run_in_kernel(command[0], env)
    else:
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    history = torch.load(work / name / "net_last.pth", map_location="cpu", weights_only=False)["history"]
    images = sum(1 for phase in ("train", "val") for _ in (prepared / phase).rglob("*.jpg"))
    return images * (epochs - 1) / sum(history["seconds"][1:])


def busy_comparison(prepared: Path, work: Path, starts: list[str], rounds: int, epochs: int) -> list[str]:
    """Rounds of (idle, busy) x each way of starting, in alternating orders; per start, the medians as a line."""
    rates: dict[tuple[str, str], list[float]] = {(s, c): [] for s in starts for c in ("idle", "busy")}
    for round_number in range(1, rounds + 1):
        forward = round_number % 2 == 1
        for condition in ("idle", "busy") if forward else ("busy", "idle"):
            with busy_core() if condition == "busy" else contextlib.nullcontext():
                for start in starts if forward else starts[::-1]:
                    rate = demo_rate(start, prepared, work, epochs)
                    rates[start, condition].append(rate)
                    print(f"  round {round_number} {condition}: {start:<12} {rate:6.1f} img/s   load {load_average()}")
    lines = []
    reference = statistics.median(rates[starts[0], "idle"])
    for start in starts:
        idle, busy = statistics.median(rates[start, "idle"]), statistics.median(rates[start, "busy"])
        kept = statistics.median(b / i for b, i in zip(rates[start, "busy"], rates[start, "idle"], strict=True))
        lines.append(
            f"{start:<12} idle {idle:6.1f} img/s, busy {busy:6.1f} img/s: keeps {100 * kept:.0f}% beside a busy "
            f"core (median of rounds); idle {idle / reference:.2f}x {starts[0]}   [{describe(start)}]"
        )
    return lines


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="classic always runs")
    parser.add_argument("--train_ids", type=int, default=48, help="identities of the synthetic training set")
    parser.add_argument("--test_ids", type=int, default=48)
    parser.add_argument("--work_dir", default=None, help="keep (and reuse) the synthetic set here; default: temp")
    parser.add_argument("--demo_epochs", type=int, default=8, help="timed epochs per path for the demo")
    parser.add_argument("--baseline_batches", type=int, default=4, help="timed batches per path for the baseline")
    parser.add_argument("--extract_repeats", type=int, default=3, help="extraction passes per path (demo)")
    parser.add_argument("--erasing_p", type=float, default=0.0)
    parser.add_argument("--color_jitter", action="store_true")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to time the GPU fast path")
    parser.add_argument(
        "--allocator", choices=["default", "reuse"], default="default",
        help="reuse: keep freed memory in the process, as --fast_data does on a CPU (a per-process setting: "
        "bench_cpu_fast_path.py compares the two in separate processes)",
    )  # fmt: skip
    parser.add_argument("--busy", action="store_true", help="the demo's command line, idle against one busy core")
    parser.add_argument("--busy_rounds", type=int, default=4, help="rounds of --busy (each: idle and busy runs)")
    parser.add_argument("--starts", nargs="+", default=DEFAULT_STARTS, choices=list(STARTS), help="--busy: starts")
    parser.add_argument("--spins", nargs="+", type=int, default=[], help="--busy: also start with GOMP_SPINCOUNT=N")
    parser.add_argument("--busy_epochs", type=int, default=3, help="epochs per --busy run (the first is not timed)")
    args = parser.parse_args(argv)
    if args.busy:
        args.starts = [*args.starts, *(f"{n} spins" for n in args.spins)]
        return main_busy(args)
    if args.allocator == "reuse" and not reuse_freed_memory():
        parser.error("--allocator reuse needs Linux with glibc.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU (torch.cuda.is_available() is False).")

    wall = time.perf_counter()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"DataLoader workers: {default_num_workers()}; allocator: {args.allocator}; "
          f"load average {load_average()}")  # fmt: skip
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}")
    for path in dict.fromkeys(["classic", *args.paths]):  # classic first and once
        print(f"  {path:<16} {PATHS[path]}")
    augmentation = f"erasing_p={args.erasing_p}, color_jitter={args.color_jitter}"
    summary = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        started = time.perf_counter()
        prepared = make_data(work, args.train_ids, args.test_ids)
        print(f"Synthetic Market ({args.train_ids} train ids, {args.test_ids} test ids) ready in "
              f"{time.perf_counter() - started:.1f} s; augmentation: {augmentation}")  # fmt: skip
        for name in args.configs:
            c = CONFIGS[name]
            print(f"\n[{name}] {c.backbone}, {c.height}x{c.width}, batch {c.batch_size}")
            times, cache_seconds, models = time_training(c, prepared, args)
            base = times["classic"]
            for path, t in times.items():
                median_ratio = statistics.median(r / b for r, b in zip(t.round_rates, base.round_rates, strict=True))
                print(
                    f"  train {path:<16} {t.rate:7.1f} img/s  x{t.rate / base.rate:.2f} "
                    f"(median round x{median_ratio:.2f})  {t.images} images in {t.seconds:.1f} s, "
                    f"mean loss {statistics.fmean(t.losses):.3f} (per round: {' '.join(f'{x:.2f}' for x in t.losses)})"
                )
            repeats = args.extract_repeats if name == "demo" else 1
            extraction = time_extraction(c, prepared, models, repeats, torch.device(args.device))
            rates = extraction.rates
            print(
                f"  extract: {extraction.images} {c.extract_folder} images, flip-averaged, eval mode; cache decoded "
                f"in {extraction.cache_seconds:.2f} s; features differ by at most {extraction.max_difference:.1e}"
            )
            for path, rate in rates.items():
                print(f"  extract {path:<16} {rate:7.1f} img/s  x{rate / rates['classic']:.2f}")
            data_paths = [p for p in ("cached", "cached+CL") if p in times]
            best = max(data_paths, key=lambda p: times[p].rate) if data_paths else "classic"
            line = (
                f"{name}: data path ({best}) x{times[best].rate / base.rate:.2f} "
                f"({times[best].rate:.1f} vs {base.rate:.1f} img/s)"
            )
            fused = [p for p in ("cached+fused", "cached+CL+fused") if p in times]
            if fused:
                best_fused = max(fused, key=lambda p: times[p].rate)
                line += f", with fused SGD ({best_fused}) x{times[best_fused].rate / base.rate:.2f}"
            if "cached+CL+bf16" in times:
                line += f", whole fast path with bf16 x{times['cached+CL+bf16'].rate / base.rate:.2f}"
            fastest = max(times, key=lambda p: times[p].rate)
            minutes = 60 * MARKET_TRAIN_IMAGES / times[fastest].rate / 60
            line += (
                f"; at {times[fastest].rate:.0f} img/s ({fastest}) 60 epochs of Market-1501's "
                f"{MARKET_TRAIN_IMAGES:,} training images would take {minutes:.0f} min (training steps only)"
            )
            best_extract = max(rates["cached"], rates["cached+CL"])
            line += f"; cache build {cache_seconds:.2f} s; extraction x{best_extract / rates['classic']:.2f}"
            summary.append(line)
    print("\nSummary")
    for line in summary:
        print(f"  {line}")
    print(f"Wall time: {time.perf_counter() - wall:.1f} s; load average {load_average()}")
    return 0


def main_busy(args: argparse.Namespace) -> int:
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); torch {torch.__version__}; load average {load_average()}")
    for start in args.starts:
        print(f"  {start:<12} {describe(start)}")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        prepared = make_data(work, args.train_ids, args.test_ids)
        with tempfile.TemporaryDirectory(prefix="runs-", dir=work) as runs:
            lines = busy_comparison(prepared, Path(runs), args.starts, args.busy_rounds, args.busy_epochs)
    print("\nSummary (cpu-demo profile, python -m reid_utils.train or its main() in a kernel)")
    for line in lines:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
