"""The real path on a GPU, in a few minutes: train, extract, evaluate, and resume a killed run.

Run it whenever a machine with a GPU is at hand and copy its last lines into ``benchmarks/RESULTS.md``::

    python benchmarks/gpu_check.py                 # Market-sized synthetic set, market-gpu profile, 3 epochs

What it does, with the very functions the notebooks and the command line use:

1. the card, torch, CUDA and whether the GPU computes bfloat16;
2. a Market-sized synthetic set (``python -m reid_utils.synthetic --scale market``: 12,936 training images of
   751 identities, 3,368 queries, 19,732 gallery images), generated once into ``--work_dir`` and prepared;
3. ``--epochs`` epochs of the ``market-gpu`` profile (ResNet-50, 256x128, the fast data path on the GPU,
   channels_last, bf16) with ``reid_utils.train.train``: images per second after the first epoch (which also
   decodes the cache);
4. flip-averaged features of query and gallery (``reid_utils.test``, the cached path on the GPU): images per
   second; then CMC/mAP (``reid_utils.metrics.evaluate``) and its time. On a synthetic set with random
   initial weights the accuracy itself means little; that it runs at this scale is the point;
5. the same run started again as ``python -m reid_utils.train``, killed after its first checkpoint, and
   ``--resume``-d: whether it ends with the uninterrupted run's weights (on GPUs cuDNN may make them close
   rather than identical; the largest difference is printed).

``--smoke`` runs the same steps on a tiny set with ResNet-18 at 48x24 on whatever device there is, in
seconds: what the test suite does to keep this script working.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from reid_utils.fastdata import CachedData
from reid_utils.metrics import evaluate
from reid_utils.prepare import prepare_market
from reid_utils.profiles import PROFILES
from reid_utils.runs import load_checkpoint
from reid_utils.synthetic import generate_market, read_summary
from reid_utils.test import evaluation_loader, extract_features, load_trained_model
from reid_utils.train import TrainOptions, train
from reid_utils.train import main as train_command

# 48x24: layer4's output is one pixel wide, where oneDNN's bfloat16 weight gradients went wrong (speed.needs_float32)
SMOKE = {"backbone": "resnet18", "height": 48, "width": 24, "batchsize": 16, "lr": 0.01}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
        return f"{name} ({memory:.0f} GiB), CUDA {torch.version.cuda}, bfloat16: {bf16}"
    return f"CPU ({platform.processor() or platform.machine()}), no GPU"


def data_set(work: Path, smoke: bool) -> Path:
    """The synthetic set, generated once (the Market-sized one takes about a minute on 2 cores), prepared."""
    market = work / ("Market-tiny" if smoke else "Market-sized")
    summary = read_summary(market)
    if smoke and summary is None:
        generate_market(market, seed=0, train_ids=8, test_ids=6)
    elif not smoke and (summary is None or summary.scale != "market"):
        print("generating the Market-sized synthetic set (once)...", flush=True)
        generate_market(market, scale="market", overwrite=summary is not None)
    return prepare_market(market, work / f"prepared-{market.name}", quiet=True).root


def command_line(options: TrainOptions, **changes) -> list[str]:
    """The flags of ``python -m reid_utils.train`` that give these options."""
    flags = []
    for field in fields(TrainOptions):
        value = changes.get(field.name, getattr(options, field.name))
        if field.name == "num_classes" or value is None:
            continue
        if field.name == "pretrained":
            flags += [] if value else ["--no_pretrained"]
        elif isinstance(value, bool):
            flags += [f"--{field.name}"] if value else []
        else:
            flags += [f"--{field.name}", str(value)]
    return flags


def killed_and_resumed(options: TrainOptions, work: Path) -> Path:
    """The run again, as a command, killed right after its first checkpoint, then resumed; returns its folder.

    The killed run is a process of its own (SIGKILL: nothing of it gets to clean up); the resume runs in
    this process, as ``python -m reid_utils.train ... --resume`` would. Both compute with this process's
    thread count, so on a CPU the comparison with the uninterrupted run is exact.
    """
    name = options.name + "_resumed"
    flags = [*command_line(options, name=name, save_every=1), "--overwrite"]
    first = work / "runs" / name / "net_001.pth"
    first.unlink(missing_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen([sys.executable, "-m", "reid_utils.train", *flags], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=environment)  # fmt: skip
    while not first.exists():
        if process.poll() is not None:
            raise SystemExit(f"the training command failed:\n{process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        code = train_command([*flags[:-1], "--resume"])
    if code != 0:
        raise SystemExit(f"--resume failed:\n{said.getvalue()[-2000:]}")
    return work / "runs" / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=Path("build/gpu-check"), help="data and runs go here")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny set and model, on any device, in seconds")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {describe_device(device)}; torch {torch.__version__}")
    if device.type != "cuda" and not args.smoke:
        print("gpu_check: no GPU here; run it on a GPU machine, or pass --smoke for the tiny check.", file=sys.stderr)
        return 2
    prepared = data_set(args.work_dir, args.smoke)
    changes = {**SMOKE, "fast_data": True, "channels_last": False} if args.smoke else {}
    settings = {**PROFILES["market-gpu"], **changes, "name": "gpu_check", "total_epoch": args.epochs, "save_every": 1}
    options = TrainOptions(**settings, data_dir=str(prepared), model_dir=str(args.work_dir / "runs"))

    history = train(options, overwrite=True, quiet=True)
    images = len(list((prepared / "train_all").rglob("*.jpg")))
    later = history["seconds"][1:] or history["seconds"]
    rate = images * len(later) / sum(later)
    print(f"train: {images} images per epoch, first epoch {history['seconds'][0]:.1f} s (cache included), "
          f"then {rate:.0f} img/s; final train loss {history['train_loss'][-1]:.3f}")  # fmt: skip

    model, _ = load_trained_model(args.work_dir / "runs" / options.name, device)
    features, seconds, count = {}, 0.0, 0
    for split in ("query", "gallery"):
        loader = evaluation_loader(prepared / split, options.height, options.width, 64, CachedData(device=device))
        tic = time.perf_counter()
        features[split] = extract_features(model, loader, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - tic
        count += len(features[split].paths)
    print(f"extract: {count} images (flip-averaged) at {count / seconds:.0f} img/s")
    tic = time.perf_counter()
    q, g = features["query"], features["gallery"]
    result = evaluate(q.features, q.pids, q.cams, g.features, g.pids, g.cams)
    print(f"evaluate: {time.perf_counter() - tic:.1f} s; {result.summary()}")

    resumed = killed_and_resumed(options, args.work_dir)
    reference = load_checkpoint(args.work_dir / "runs" / options.name / "net_last.pth")["model"]
    again = load_checkpoint(resumed / "net_last.pth")["model"]
    difference = max((again[key].float() - value.float()).abs().max().item() for key, value in reference.items())
    exact = "exact" if difference == 0 else f"not exact (largest weight difference {difference:.2e})"
    print(f"resume of a killed run: {exact}")
    print(f"gpu_check: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
