"""Peak memory and time of k-reciprocal re-ranking at Market-1501 size, before and after blockwise distances.

Each measurement runs in a fresh Python process: the features are made, the process's peak-RSS counter is
reset (``/proc/self/clear_refs``), then one re-ranking call is timed, and its peak RSS above the resident
size just before the call is reported (``VmHWM - VmRSS``). The features are those of
``bench_evaluate.make_market_like`` (3,368 queries and 19,732 gallery images, 750 identities over 6
cameras plus distractors and junk, 512-d, here as float32), so neighbourhoods have realistic sizes.

Paths measured:

* ``features`` -- ``rerank_features(query_features, gallery_features)``;
* ``distances`` -- the three float32 distance matrices built from the same features, then
  ``k_reciprocal_rerank`` (the matrices count towards its peak, as they did inside the old
  ``rerank_features``).

``--old REV`` also runs ``reid_utils/rerank.py`` as it was at git revision REV (default: the last
commit before blockwise distances) and checks that the results are identical. Run from the repository
root, not alongside other benchmarks::

    flock /tmp/bench.lock python benchmarks/bench_rerank.py
    python benchmarks/bench_rerank.py --queries 500 --gallery 3000 --old none   # quick look
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import reid_utils  # noqa: F401  first, before numpy: it sets how numpy's BLAS threads wait (see its __init__.py)

# isort: split

import numpy as np

from reid_utils.metrics import evaluate_from_distance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_evaluate import make_market_like  # noqa: E402

OLD_REVISION = "fc20c22"  # reid_utils/rerank.py with the whole (N, N) matrix, before blockwise distances
GIB = 2**30


def market_like(num_queries: int, num_gallery: int, seed: int):
    """Market-shaped synthetic split; smaller sizes keep the proportions of its parts."""
    if (num_queries, num_gallery) == (3368, 19732):
        return make_market_like(seed=seed)
    scale = num_gallery / 19732
    num_distractors, num_junk = round(2793 * scale), round(3819 * scale)
    num_ids = max(2, round(750 * num_queries / 3368))
    return make_market_like(
        seed=seed,
        num_ids=num_ids,
        num_queries=max(num_queries, 2 * num_ids),
        num_identity_images=num_gallery - num_distractors - num_junk,
        num_distractors=num_distractors,
        num_junk=num_junk,
    )


def status_bytes(key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def load_module(source: str) -> ModuleType:
    """``reid_utils.rerank`` itself, or a rerank.py file (an older revision) loaded under its own name."""
    if source == "current":
        import reid_utils.rerank

        return reid_utils.rerank
    spec = importlib.util.spec_from_file_location("rerank_under_test", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(args: argparse.Namespace) -> None:
    """One timed call in this (fresh) process; prints one JSON line and saves the result."""
    rerank = load_module(args.module)
    data = market_like(args.queries, args.gallery, args.seed)
    qf = np.ascontiguousarray(data.query_features, dtype=np.float32)  # extracted features are float32
    gf = np.ascontiguousarray(data.gallery_features, dtype=np.float32)
    del data
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    baseline = status_bytes("VmRSS")
    options = {"k1": 20, "k2": 6, "lambda_value": 0.3}

    start = time.perf_counter()
    if args.worker == "features":
        final = rerank.rerank_features(qf, gf, **options)
    else:

        def squared(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            d = a @ b.T
            d *= -2.0
            d += 2.0
            return np.maximum(d, 0.0, out=d)

        qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
        gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
        q_q, g_g = squared(qn, qn), squared(gn, gn)
        np.fill_diagonal(q_q, 0.0)
        np.fill_diagonal(g_g, 0.0)
        final = rerank.k_reciprocal_rerank(squared(qn, gn), q_q, g_g, **options)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM") - baseline
    np.save(args.out, final)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak": peak,
                "baseline": baseline,
                "hwm_reset": reset,
                "features": qf.nbytes + gf.nbytes,
            }
        )
    )


def estimates(module: ModuleType, num_query: int, num_gallery: int, dim: int) -> dict[str, int]:
    """The module's own memory estimates (older ones know no ``feature_dim``)."""
    try:
        return {
            "features": module.rerank_memory_bytes(num_query, num_gallery, feature_dim=dim),
            "distances": module.rerank_memory_bytes(num_query, num_gallery),
        }
    except TypeError:
        both = module.rerank_memory_bytes(num_query, num_gallery)
        return {"features": both, "distances": both}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=19732)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", default="features,distances", help="comma-separated: features, distances")
    parser.add_argument("--old", default=OLD_REVISION, help="git revision to compare with, or 'none'")
    parser.add_argument("--repeats", type=int, default=1, help="processes per measurement (best time, max peak)")
    parser.add_argument("--worker", choices=("features", "distances"), help=argparse.SUPPRESS)
    parser.add_argument("--module", default="current", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    data = market_like(args.queries, args.gallery, args.seed)
    num_query, num_gallery, dim = len(data.query_pids), len(data.gallery_pids), data.query_features.shape[1]
    n = num_query + num_gallery
    print(f"sizes: {num_query:,} queries + {num_gallery:,} gallery = {n:,} pool images, {dim}-d float32 features")
    print(
        f"  features {4 * n * dim / 1e6:.0f} MB; (N, N) float32 distances {4 * n * n / 1e9:.2f} GB; "
        f"(Q, G) float32 result {4 * num_query * num_gallery / 1e6:.0f} MB"
    )

    work = Path(tempfile.mkdtemp(prefix="bench_rerank_"))
    implementations = {"new": "current"}
    if args.old != "none":
        old_file = work / "rerank_old.py"
        source = subprocess.run(
            ["git", "show", f"{args.old}:reid_utils/rerank.py"], capture_output=True, text=True, check=True
        ).stdout
        old_file.write_text(source)
        implementations = {f"old ({args.old})": str(old_file), **implementations}

    rows, outputs = [], {}
    for label, module in implementations.items():
        estimate = estimates(load_module(module), num_query, num_gallery, dim)
        for path in args.paths.split(","):
            runs = []
            for repeat in range(max(1, args.repeats)):
                out = work / f"{len(rows)}_{repeat}.npy"
                command = [sys.executable, __file__, "--worker", path, "--module", module, "--out", str(out)]
                command += ["--queries", str(args.queries), "--gallery", str(args.gallery), "--seed", str(args.seed)]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    print(result.stderr, file=sys.stderr)
                    return 1
                runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
            outputs[(label, path)] = np.load(out)
            seconds, peak = min(r["seconds"] for r in runs), max(r["peak"] for r in runs)
            rows.append((label, path, seconds, peak, estimate[path], runs[0]))
            print(
                f"{label:>16} {path:<9}: {seconds:6.1f} s   peak above baseline {peak / 1e9:5.2f} GB "
                f"({peak / GIB:.2f} GiB)   estimate {estimate[path] / 1e9:5.2f} GB   "
                f"[baseline RSS {runs[0]['baseline'] / 1e9:.2f} GB, features {runs[0]['features'] / 1e6:.0f} MB"
                f"{'' if runs[0]['hwm_reset'] else ', VmHWM not reset: peak includes setup'}]",
                flush=True,
            )

    labels = (data.query_pids, data.query_cams, data.gallery_pids, data.gallery_cams)
    reference_key = next(iter(outputs))
    reference = outputs[reference_key]
    print(f"\nresults compared with {reference_key[0]} {reference_key[1]}:")
    for key, final in outputs.items():
        same = final.dtype == reference.dtype and np.array_equal(final, reference)
        worst = float(np.abs(final.astype(np.float64) - reference).max())
        evaluation = evaluate_from_distance(final, *labels)
        print(f"{key[0]:>16} {key[1]:<9}: identical {same}  (max |diff| {worst:.3g})   {evaluation}")
    raw = 2 - 2 * (data.query_features @ data.gallery_features.T)
    print(f"{'no re-ranking':>26}: {evaluate_from_distance(raw, *labels)}")
    for path in args.paths.split(","):
        old_rows = [r for r in rows if r[0] != "new" and r[1] == path]
        new_rows = [r for r in rows if r[0] == "new" and r[1] == path]
        if old_rows and new_rows:
            (_, _, t0, p0, e0, _), (_, _, t1, p1, e1, _) = old_rows[0], new_rows[0]
            print(
                f"{path}: time {t0:.1f} -> {t1:.1f} s, peak {p0 / 1e9:.2f} -> {p1 / 1e9:.2f} GB, "
                f"estimate {e0 / 1e9:.2f} -> {e1 / 1e9:.2f} GB"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
