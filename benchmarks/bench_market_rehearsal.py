"""A Market-scale rehearsal on the CPU: every step of the evaluation side at the real data set's size.

On the Market-sized synthetic set (``python -m reid_utils.synthetic --scale market``: 12,936 training images,
3,368 queries, 19,732 gallery images) it times each step and records its peak memory:

1. generate the set (once; reused afterwards), 2. prepare it, 3. extract flip-averaged features of the
23,100 query and gallery images with the demo network (the ``cpu-demo`` run of notebook 03, trained here on the
demo set if it is missing), with the classic DataLoader and with ``--fast_data``'s cached path, 4. evaluate
(CMC and mAP), 5. re-rank (k-reciprocal, from features).

Peak memory is the process's resident high-water mark during the step (Linux: ``VmHWM``, reset before each
step through ``/proc/self/clear_refs``), minus what the process held when the step started. Run from the
repository root::

    python benchmarks/bench_market_rehearsal.py                 # ~5 minutes on 2 cores the first time
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from reid_utils.data import default_data_root, find_dataset
from reid_utils.fastdata import CachedData
from reid_utils.metrics import evaluate
from reid_utils.prepare import prepare_market
from reid_utils.profiles import trained_run
from reid_utils.rerank import rerank_features
from reid_utils.synthetic import generate_market, read_summary
from reid_utils.test import evaluation_loader, extract_features, load_trained_model


def _status(field: str) -> int:
    """A /proc/self/status value in bytes (0 where there is no such file)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measured(name: str, step: Callable[[], object], rows: list) -> object:
    """Run one step; record its seconds and the resident memory it added at its peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to what is resident now
    except OSError:
        pass
    before = _status("VmRSS")
    started = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - started
    peak = max(_status("VmHWM") - before, 0)
    rows.append((name, seconds, peak))
    print(f"{name:<42} {seconds:8.1f} s   peak +{peak / 2**30:5.2f} GiB", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=Path("build/market-rehearsal"))
    parser.add_argument("--batchsize", type=int, default=64, help="extraction batch size")
    args = parser.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    rows: list[tuple[str, float, int]] = []
    market = args.work_dir / "Market-sized"
    if read_summary(market) is None:
        measured("1. generate the Market-sized set", lambda: generate_market(market, scale="market"), rows)
    else:
        print(f"1. the Market-sized set is in {market} already (generated before)")
    prepared = measured(
        "2. prepare", lambda: prepare_market(market, args.work_dir / "prepared", quiet=True).root, rows
    )  # fmt: skip

    demo = find_dataset(quiet=True)  # the demo network: notebook 03's run (trained here if missing)
    demo_prepared = prepare_market(demo.path, default_data_root() / "prepared" / demo.path.name, quiet=True).root
    model, options = load_trained_model(trained_run(demo_prepared, args.work_dir / "model", "cpu-demo"))
    print(f"demo network: {options.backbone} at {options.height}x{options.width}")

    features = {}
    for label, backend in (("classic DataLoader", None), ("--fast_data cache", CachedData())):

        def extract(backend=backend):
            return {split: extract_features(model, evaluation_loader(prepared / split, options.height, options.width,
                                                                     args.batchsize, backend))
                    for split in ("query", "gallery")}  # fmt: skip

        features[label] = measured(f"3. extract 23,100 images, {label}", extract, rows)
    seconds = {label: s for label, s, _ in rows if label.startswith("3.")}
    images = sum(len(s.paths) for s in features["classic DataLoader"].values())
    print("   " + ", ".join(f"{label.split(', ')[1]}: {images / s:.0f} img/s" for label, s in seconds.items()))
    same = all(torch.equal(features["classic DataLoader"][s].features, features["--fast_data cache"][s].features)
               for s in ("query", "gallery"))  # fmt: skip
    print(f"   identical features from both paths: {same}")
    q, g = features["--fast_data cache"]["query"], features["--fast_data cache"]["gallery"]
    result = measured("4. evaluate (CMC, mAP)", lambda: evaluate(q.features, q.pids, q.cams, g.features, g.pids,
                                                                 g.cams), rows)  # fmt: skip
    print(f"   {result.summary()}")
    measured("5. re-rank (k-reciprocal, from features)", lambda: rerank_features(q.features, g.features), rows)
    print("\nstep | seconds | peak memory above the step's start")
    for name, s, peak in rows:
        print(f"{name} | {s:.1f} | {peak / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
