"""Time ``reid_utils.metrics.evaluate`` against the bare float32 product of the same features, on well-separated
and on hard features, at Market-1501 or MSMT17 size; at Market size also against the per-query loop.

The features are synthetic but shaped like the real test splits. Market-1501 (Zheng et al., ICCV 2015):
3,368 queries of 750 identities (one per identity and camera, at least two cameras per identity), and a
19,732-image gallery of 6 cameras holding 13,120 images of those identities, 2,793 distractors (pid 0)
and 3,819 junk boxes (pid -1). MSMT17 (Wei et al., CVPR 2018): 11,659 queries of 3,060 identities and an
82,161-image gallery of 15 cameras. Each identity has a random centre in 512-d; an image is its centre
plus a camera shift plus noise of a per-image strength (so some true matches are hard), L2-normalised,
float32. Two kinds of features (``--features``): "separated" (noise 2: mAP ~69 % at Market size, a trained
network) and "hard" (noise 3.3: mAP ~5 %, what an untrained or barely trained network gives, where most true
matches sit deep in the ranking among many near-ties).

Every round times, for each kind, the plain float32 product ``qf @ gf.T`` (the arithmetic floor: every score,
in blocks of ``PAIRS_PER_CHUNK`` pairs into one reused buffer; the full matrix would be 3.8 GB at MSMT17 size)
and ``evaluate`` right after it, so each ratio compares two runs side by side. At Market size the per-query
loop ``evaluate_naive`` runs on the first ``--naive_queries`` queries too, its time scaled to all queries (it
does the same work for every query: one pass over the gallery and one sort). With ``--busy`` every round is
run twice, on the idle machine and with a second process spinning on one core (``python -c "while True:
pass"``, started and stopped by this script). Medians over the rounds are reported. Results must be identical
bit for bit to the loop's (CMC and AP arrays, both AP conventions) on the loop's queries. At MSMT17 size the
script also measures the peak memory of one ``evaluate`` call in a fresh process that holds nothing else but
the features: peak resident memory (``VmHWM``, reset just before the call) above the resident memory before it.
``--old REV`` also times ``evaluate`` as it was at git revision REV (``reid_utils/metrics.py`` and ``fastrank.py``
loaded from git) right after the current one in every round, and checks that both give the same results.

Run from the repository root (take the lock so benchmarks do not overlap)::

    flock /tmp/bench.lock python benchmarks/bench_evaluate.py --busy
    flock /tmp/bench.lock python benchmarks/bench_evaluate.py --size msmt
    flock /tmp/bench.lock python benchmarks/bench_evaluate.py --old bc45723   # against an older evaluate
    python benchmarks/bench_evaluate.py --shrink 20          # a quick look at 1/20 of the size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import reid_utils  # noqa: F401  first, before numpy: it sets how numpy's BLAS threads wait (see its __init__.py)

# isort: split

import numpy as np

from reid_utils.metrics import PAIRS_PER_CHUNK, Evaluation, evaluate, evaluate_naive

MARKET = {"num_ids": 750, "num_queries": 3368, "num_identity_images": 13120, "num_distractors": 2793,
          "num_junk": 3819, "num_cams": 6}  # fmt: skip
MSMT = {"num_ids": 3060, "num_queries": 11659, "num_identity_images": 82161, "num_distractors": 0,
        "num_junk": 0, "num_cams": 15}  # fmt: skip
# noise strength of each kind of features: mAP ~69 % and ~5 % at Market size
FEATURE_KINDS = {"separated": 2.0, "hard": 3.3}


@dataclass(frozen=True)
class FakeSplit:
    query_features: np.ndarray
    query_pids: np.ndarray
    query_cams: np.ndarray
    gallery_features: np.ndarray
    gallery_pids: np.ndarray
    gallery_cams: np.ndarray

    def inputs(self, num_queries: int | None = None) -> tuple:
        """``evaluate``'s first six arguments, for the first ``num_queries`` queries (all by default)."""
        keep = slice(None, num_queries)
        return (self.query_features[keep], self.query_pids[keep], self.query_cams[keep],
                self.gallery_features, self.gallery_pids, self.gallery_cams)  # fmt: skip


def make_market_like(
    seed: int = 0,
    num_ids: int = 750,
    num_queries: int = 3368,
    num_identity_images: int = 13120,
    num_distractors: int = 2793,
    num_junk: int = 3819,
    num_cams: int = 6,
    dim: int = 512,
    noise: float = 2.0,
    spread: float = 0.1,
) -> FakeSplit:
    """Random features with the given counts and Market-1501's id/camera structure, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)

    # Cameras per identity: 2..num_cams, nudged until there is exactly one query per (identity, camera).
    cams_per_id = rng.integers(2, num_cams + 1, size=num_ids)
    while cams_per_id.sum() != num_queries:
        i = rng.integers(num_ids)
        step = 1 if cams_per_id.sum() < num_queries else -1
        cams_per_id[i] = np.clip(cams_per_id[i] + step, 2, num_cams)
    pairs = np.array(
        [
            (pid, cam)
            for pid, n in enumerate(cams_per_id, 1)
            for cam in rng.choice(np.arange(1, num_cams + 1), size=n, replace=False)
        ]
    )
    query_pids, query_cams = pairs[:, 0], pairs[:, 1]

    # Gallery images of those identities: at least one per (identity, camera), the rest spread at random.
    per_pair = 1 + rng.multinomial(num_identity_images - len(pairs), np.full(len(pairs), 1 / len(pairs)))
    id_pids, id_cams = np.repeat(query_pids, per_pair), np.repeat(query_cams, per_pair)

    centres = rng.standard_normal((num_ids + 1, dim)).astype(np.float32) / np.float32(np.sqrt(dim))
    cam_shift = 0.5 * rng.standard_normal((num_cams + 1, dim)).astype(np.float32) / np.float32(np.sqrt(dim))

    def images(centre_vectors: np.ndarray, cams: np.ndarray) -> np.ndarray:
        """Centre + camera shift + noise of a per-image strength, L2-normalised."""
        strength = rng.lognormal(mean=np.log(noise), sigma=spread, size=(len(cams), 1)).astype(np.float32)
        jitter = rng.standard_normal((len(cams), dim)).astype(np.float32) / np.float32(np.sqrt(dim))
        x = centre_vectors + cam_shift[cams] + strength * jitter
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    distractor_cams = rng.integers(1, num_cams + 1, size=num_distractors)
    distractor_centres = rng.standard_normal((num_distractors, dim)).astype(np.float32) / np.float32(np.sqrt(dim))
    junk_cams = rng.integers(1, num_cams + 1, size=num_junk)
    junk_source = rng.integers(1, num_ids + 1, size=num_junk)  # partial boxes still look like somebody
    gallery_features = np.concatenate(
        [
            images(centres[id_pids], id_cams),
            images(distractor_centres, distractor_cams),  # false alarms: background, nobody in particular
            images(centres[junk_source], junk_cams),
        ]
    )
    gallery_pids = np.concatenate([id_pids, np.zeros(num_distractors, np.int64), np.full(num_junk, -1)])
    gallery_cams = np.concatenate([id_cams, distractor_cams, junk_cams])
    shuffle = rng.permutation(len(gallery_pids))  # real galleries are not grouped by identity
    return FakeSplit(
        query_features=images(centres[query_pids], query_cams),
        query_pids=query_pids,
        query_cams=query_cams,
        gallery_features=gallery_features[shuffle],
        gallery_pids=gallery_pids[shuffle],
        gallery_cams=gallery_cams[shuffle],
    )


def shrunk(sizes: dict[str, int], factor: int) -> dict[str, int]:
    """The same split at 1/factor of the size (at least two cameras' worth of queries per identity)."""
    out = {key: max(1, value // factor) for key, value in sizes.items()}
    out["num_cams"] = sizes["num_cams"]
    out["num_queries"] = max(out["num_queries"], 2 * out["num_ids"])
    out["num_identity_images"] = max(out["num_identity_images"], out["num_queries"])
    return out


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def machine_cpu_seconds() -> float | None:
    """CPU time the whole machine has spent busy since boot (all processes, all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    """One timed call: wall time, CPU time of this process (all its threads), cores other processes kept busy."""

    wall: float
    cpu: float
    other_cores: float | None


def measure(fn: Callable, *args, neighbour_cpu: Callable[[], float] = lambda: 0.0) -> tuple[object, Measured]:
    """Time one call. OpenBLAS threads spin for ~0.1 s after a product before they sleep: wait that out first,
    so neither the wall time nor the CPU time of this call includes what the previous one left behind."""
    time.sleep(0.2)
    machine, own, neighbour, start = machine_cpu_seconds(), time.process_time(), neighbour_cpu(), time.perf_counter()
    result = fn(*args)
    wall, cpu = time.perf_counter() - start, time.process_time() - own
    after = machine_cpu_seconds()
    others = None if machine is None or after is None else after - machine - cpu - (neighbour_cpu() - neighbour)
    return result, Measured(wall, cpu, None if others is None else max(0.0, others) / wall)


def identical(a: Evaluation, b: Evaluation) -> bool:
    """Bit for bit: the same queries evaluated, the same CMC curve, the same AP of every query."""
    return (
        np.array_equal(a.evaluated_mask, b.evaluated_mask)
        and np.array_equal(a.cmc, b.cmc)
        and np.array_equal(a.ap, b.ap)
        and a.mAP == b.mAP
    )


@contextmanager
def busy_neighbour():
    """A second process keeping one core busy for the duration of the block; yields a reader of its CPU time."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def cpu_seconds() -> float:
        try:
            with open(f"/proc/{spinner.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except OSError:
            return 0.0

    try:
        time.sleep(0.3)  # let it get scheduled
        yield cpu_seconds
    finally:
        spinner.kill()
        spinner.wait()


def median(values: list[float]) -> float:
    return statistics.median(values)


def check_identical(data: FakeSplit, num_queries: int, label: str) -> bool:
    ok = True
    for ap in ("market", "step"):
        inputs = data.inputs(num_queries)
        same = identical(evaluate(*inputs, ap=ap), evaluate_naive(*inputs, ap=ap))
        print(f"{label}: identical to the loop on the first {num_queries:,} queries, {ap} AP: {same}")
        ok &= same
    return ok


@contextmanager
def _nothing():
    yield None


def plain_product(query_features: np.ndarray, gallery_features: np.ndarray, rows: int) -> None:
    """The arithmetic floor: every float32 score, ``rows`` queries at a time, into one reused buffer."""
    buffer = np.empty((rows, len(gallery_features)), dtype=np.float32)
    for start in range(0, len(query_features), rows):
        block = query_features[start : start + rows]
        np.matmul(block, gallery_features.T, out=buffer[: len(block)])


@dataclass
class Round:
    """One side-by-side measurement: the product, ``evaluate``, and (Market size) the loop, scaled."""

    product: Measured
    fast: Measured
    naive: Measured | None
    old: Measured | None = None

    def line(self) -> str:
        text = (
            f"product {self.product.wall:6.3f} s (cpu {self.product.cpu:5.2f})   evaluate {self.fast.wall:6.3f} s "
            f"(cpu {self.fast.cpu:5.2f}): {self.fast.wall / self.product.wall:4.2f}x the product"
        )
        if self.old:
            text += f"   old {self.old.wall:6.3f} s: {self.old.wall / self.fast.wall:4.2f}x evaluate"
        if self.naive:
            text += f"   loop {self.naive.wall:6.2f} s (scaled): {self.naive.wall / self.fast.wall:5.1f}x evaluate"
        if self.fast.other_cores is not None:
            text += f"   others {self.fast.other_cores:.1f} cores"
        return text


def measure_round(
    data: FakeSplit, product_rows: int, naive_queries: int | None, neighbour: dict, old_evaluate: Callable | None
) -> Round:
    qf, gf = data.query_features, data.gallery_features
    _, product = measure(plain_product, qf, gf, product_rows, **neighbour)
    _, fast = measure(evaluate, *data.inputs(), **neighbour)
    old = measure(old_evaluate, *data.inputs(), **neighbour)[1] if old_evaluate else None
    naive = None
    if naive_queries:
        _, n = measure(evaluate_naive, *data.inputs(naive_queries), **neighbour)
        scale = len(qf) / naive_queries
        naive = Measured(n.wall * scale, n.cpu * scale, n.other_cores)
    return Round(product, fast, naive, old)


def summary(label: str, rounds: list[Round], result: Evaluation, naive_queries: int | None) -> str:
    ratio = median([r.fast.wall / r.product.wall for r in rounds])
    cpu_ratio = median([r.fast.cpu / r.product.cpu for r in rounds])
    text = (
        f"{label} (median of {len(rounds)}): product {median([r.product.wall for r in rounds]):.3f} s, "
        f"evaluate {median([r.fast.wall for r in rounds]):.3f} s: {ratio:.2f}x the product "
        f"(CPU seconds: {cpu_ratio:.2f}x)"
    )
    if rounds[0].old:
        text += f"; the old evaluate takes {median([r.old.wall / r.fast.wall for r in rounds]):.2f}x"
    if naive_queries:
        loop = median([r.naive.wall / r.fast.wall for r in rounds])
        cpu = median([r.naive.cpu / r.fast.cpu for r in rounds])
        text += f"; per-query loop (scaled from {naive_queries:,} queries): {loop:.1f}x evaluate"
        text += f" (CPU seconds: {cpu:.1f}x)"
    return text + f"   [mAP {100 * result.mAP:.1f}%, rank-1 {100 * result.rank(1):.1f}%]"


def run(args: argparse.Namespace) -> int:
    base = MARKET if args.size == "market" else MSMT
    sizes = shrunk(base, args.shrink) if args.shrink > 1 else base
    datasets = {}
    for kind in args.features:
        data, seconds = timed(make_market_like, seed=args.seed, noise=FEATURE_KINDS[kind], **sizes)
        datasets[kind] = data
    qf, gf = data.query_features, data.gallery_features
    flop = 2 * qf.shape[0] * gf.shape[0] * qf.shape[1]
    product_rows = max(1, min(len(qf), PAIRS_PER_CHUNK // len(gf)))
    naive_queries = min(args.naive_queries, len(qf))
    print(
        f"data: {len(qf):,} queries x {len(gf):,} gallery, {qf.shape[1]}-d {qf.dtype} "
        f"({(data.gallery_pids == 0).sum():,} distractors, {(data.gallery_pids == -1).sum():,} junk), "
        f"{len(datasets)} kind(s) of features ({', '.join(datasets)}), {seconds:.1f} s each to make; "
        f"the product is {flop / 1e12:.3f} TFLOP, {product_rows:,} queries at a time"
    )
    ok = all(check_identical(data, naive_queries, kind) for kind, data in datasets.items())
    old_evaluate = None
    if args.old:
        old_evaluate = load_old_evaluate(args.old)
        for kind, data in datasets.items():
            same = identical(old_evaluate(*data.inputs()), evaluate(*data.inputs()))
            print(f"{kind}: the old evaluate ({args.old}) gives the same results on all queries: {same}")
            ok &= same
    timed_naive = naive_queries if args.size == "market" else None
    if timed_naive:
        scale = len(qf) / naive_queries
        print(f"the loop runs on the first {naive_queries:,} queries; its time is scaled by {scale:.2f}")
    print(
        "per round: wall times, the CPU time of this process (all threads), and the cores other processes kept "
        "busy meanwhile (the spinner of a busy round not counted): above ~0.1 the machine was not quiet"
    )
    conditions = ["idle", "busy"] if args.busy else ["idle"]
    rounds: dict[tuple[str, str], list[Round]] = {(k, c): [] for k in datasets for c in conditions}
    for round_number in range(1, args.repeats + 1):
        for kind, data in datasets.items():
            for condition in conditions:
                with busy_neighbour() if condition == "busy" else _nothing() as spinner_cpu:
                    neighbour = {"neighbour_cpu": spinner_cpu} if spinner_cpu else {}
                    measured = measure_round(data, product_rows, timed_naive, neighbour, old_evaluate)
                rounds[kind, condition].append(measured)
                print(f"round {round_number} {kind:>9} {condition:>4}: {measured.line()}")
    for kind, data in datasets.items():
        result = evaluate(*data.inputs())
        for condition in conditions:
            print(summary(f"{kind} {condition}", rounds[kind, condition], result, timed_naive))
    if args.size == "msmt":
        for kind, data in datasets.items():
            memory = peak_memory(data)
            print(
                f"{kind}: memory of one evaluate call above the features ({memory['features'] / 2**20:.0f} MiB): "
                f"peak resident +{memory['rss_peak_above'] / 2**20:.0f} MiB, "
                f"peak of numpy allocations (tracemalloc) {memory['traced_peak'] / 2**20:.0f} MiB"
            )
    return 0 if ok else 1


def load_old_evaluate(revision: str) -> Callable:
    """``evaluate`` as it was at a git revision: ``reid_utils/metrics.py`` and, where the revision has it, the
    ``reid_utils/fastrank.py`` it imports (the fast path since it moved there), loaded under names of their own."""
    root = Path(__file__).resolve().parents[1]

    def load(path: str, name: str) -> types.ModuleType | None:
        shown = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True, cwd=root)
        if shown.returncode != 0:
            return None
        module = types.ModuleType(name)
        sys.modules[name] = module  # dataclasses look their module up
        exec(compile(shown.stdout, f"{revision}:{path}", "exec"), module.__dict__)
        return module

    current = sys.modules["reid_utils.fastrank"]
    old_fastrank = load("reid_utils/fastrank.py", "fastrank_old")
    try:  # the old metrics.py's ``from reid_utils.fastrank import ...`` finds the old module
        sys.modules["reid_utils.fastrank"] = old_fastrank or current
        old_metrics = load("reid_utils/metrics.py", "metrics_old")
    finally:
        sys.modules["reid_utils.fastrank"] = current
    if old_metrics is None:
        raise SystemExit(f"--old {revision}: git has no reid_utils/metrics.py at that revision.")
    return old_metrics.evaluate


def memory_child(path: str) -> None:
    """Run in a fresh process: load the features, reset the peak, evaluate once, print the peak above start."""
    import tracemalloc

    arrays = np.load(path)
    inputs = [arrays[key] for key in ("qf", "qp", "qc", "gf", "gp", "gc")]

    def status(field: str) -> int:
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    before = status("VmRSS")
    tracemalloc.start()
    evaluate(*inputs)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"rss_peak_above": status("VmHWM") - before, "traced_peak": traced_peak,
                      "features": int(inputs[0].nbytes + inputs[3].nbytes)}))  # fmt: skip


def peak_memory(data: FakeSplit) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "features.npz")
        np.savez(path, qf=data.query_features, qp=data.query_pids, qc=data.query_cams,
                 gf=data.gallery_features, gp=data.gallery_pids, gc=data.gallery_cams)  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                          os.environ.get("PYTHONPATH")]))}  # fmt: skip
        out = subprocess.run(
            [sys.executable, __file__, "--memory_child", path], capture_output=True, text=True, check=True, env=env
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["market", "msmt"], default="market")
    parser.add_argument("--features", nargs="+", choices=list(FEATURE_KINDS), default=list(FEATURE_KINDS),
                        help="kinds of features to time (default: both)")  # fmt: skip
    parser.add_argument("--busy", action="store_true", help="also time every round beside a busy process")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--naive_queries", type=int, default=None,
                        help="queries the loop runs on (default 500 for market, 100 for msmt)")  # fmt: skip
    parser.add_argument("--shrink", type=int, default=1, help="divide every count by this (quick looks, tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old", help="also time evaluate as it was at this git revision")
    parser.add_argument("--memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    if args.naive_queries is None:
        args.naive_queries = 500 if args.size == "market" else 100
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
