"""The whole CPU fast path of ``--fast_data`` against the plain classic loop, each in its own processes.

Our trainer with ``--fast_data`` on a CPU differs from the plain classic loop in three ways: the decoded uint8
cache with batched augmentation, ``reid_utils.speed.reuse_freed_memory`` (glibc keeps freed memory instead of
handing it back to the OS every step), and the fused SGD update (``build_optimizer`` uses it with or without
``--fast_data``). The last one is a setting of the whole process, so
``bench_train.py`` -- which interleaves all its paths in one process -- cannot show it next to a plain classic
loop. This script runs ``bench_train.py --configs demo --paths cached+fused`` alternately with
``--allocator default`` and ``--allocator reuse`` (D R R D D R ...), and compares:

* the plain classic loop: the ``classic`` path of the default-allocator processes;
* the fast path: the ``cached+fused`` path of the reuse processes.

Each process also measures both paths, so the table shows what the allocator does to each. Run from the
repository root::

    python benchmarks/bench_cpu_fast_path.py              # 4 processes of each kind, about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).with_name("bench_train.py")


def one_process(allocator: str, args: argparse.Namespace) -> dict[str, float]:
    """img/s of the classic and cached+fused paths in one ``bench_train.py`` process."""
    command = [sys.executable, str(SCRIPT), "--configs", "demo", "--paths", "cached+fused", "--allocator", allocator,
               "--demo_epochs", str(args.demo_epochs), "--extract_repeats", "1"]  # fmt: skip
    command += ["--work_dir", str(args.work_dir)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"bench_train.py failed:\n{finished.stderr[-2000:]}")
    rates = {}
    for path in ("classic", "cached+fused"):
        match = re.search(rf"train {re.escape(path)} +([\d.]+) img/s", finished.stdout)
        if match is None:
            raise SystemExit(f"no '{path}' line in bench_train.py's output:\n{finished.stdout[-2000:]}")
        rates[path] = float(match.group(1))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="processes of each kind")
    parser.add_argument("--demo_epochs", type=int, default=4, help="timed epochs per path in each process")
    parser.add_argument("--work_dir", type=Path, default=Path("build/bench-data"), help="the synthetic set, reused")
    args = parser.parse_args(argv)
    wall = time.perf_counter()
    runs: dict[str, list[dict[str, float]]] = {"default": [], "reuse": []}
    order = [
        kind for pair in range(args.pairs) for kind in (("default", "reuse") if pair % 2 == 0 else ("reuse", "default"))
    ]
    print("process  allocator  classic img/s  cached+fused img/s")
    for index, allocator in enumerate(order):
        rates = one_process(allocator, args)
        runs[allocator].append(rates)
        print(f"{index + 1:7d}  {allocator:<9}  {rates['classic']:13.1f}  {rates['cached+fused']:18.1f}")
    mean = {kind: {path: statistics.fmean(r[path] for r in rs) for path in ("classic", "cached+fused")}
            for kind, rs in runs.items()}  # fmt: skip
    plain, fast = mean["default"]["classic"], mean["reuse"]["cached+fused"]
    pairs = [r["cached+fused"] / d["classic"] for d, r in zip(runs["default"], runs["reuse"], strict=True)]
    print(f"\nallocator alone: classic x{mean['reuse']['classic'] / plain:.2f}, "
          f"cached+fused x{fast / mean['default']['cached+fused']:.2f}")  # fmt: skip
    print(f"fast path (cached+fused, reuse) {fast:.1f} img/s vs plain classic loop (classic, default) "
          f"{plain:.1f} img/s: x{fast / plain:.2f}")  # fmt: skip
    print(f"per pair of processes: {' '.join(f'x{p:.2f}' for p in pairs)}; median x{statistics.median(pairs):.2f}")
    print(f"Wall time: {time.perf_counter() - wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
