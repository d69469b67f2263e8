"""Time ``reid_utils.metrics.evaluate`` against the classic per-query loop at Market-1501 scale.

The features are synthetic but shaped like Market-1501's test split (Zheng et al., ICCV 2015): 3,368
queries of 750 identities (one per identity and camera, at least two cameras per identity), and a
19,732-image gallery of 6 cameras holding 13,120 images of those identities, 2,793 distractors (pid 0)
and 3,819 junk boxes (pid -1). Each identity has a random centre in 512-d; an image is its centre
plus a camera shift plus noise of a per-image strength (so some true matches are hard), L2-normalised,
float32.

Run from the repository root::

    python benchmarks/bench_evaluate.py               # full size; the naive loop takes a while
    python benchmarks/bench_evaluate.py --queries 300 # quick look
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from reid_utils.metrics import Evaluation, evaluate, evaluate_naive


@dataclass(frozen=True)
class FakeSplit:
    query_features: np.ndarray
    query_pids: np.ndarray
    query_cams: np.ndarray
    gallery_features: np.ndarray
    gallery_pids: np.ndarray
    gallery_cams: np.ndarray


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
    """Random features with Market-1501's counts and id/camera structure, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)

    # Cameras per identity: 2..6, nudged until there is exactly one query per (identity, camera).
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

    centres = rng.standard_normal((num_ids + 1, dim)).astype(np.float32) / np.sqrt(dim)
    cam_shift = 0.5 * rng.standard_normal((num_cams + 1, dim)).astype(np.float32) / np.sqrt(dim)

    def images(centre_vectors: np.ndarray, cams: np.ndarray) -> np.ndarray:
        """Centre + camera shift + noise of a per-image strength, L2-normalised."""
        strength = rng.lognormal(mean=np.log(noise), sigma=spread, size=(len(cams), 1)).astype(np.float32)
        jitter = rng.standard_normal((len(cams), dim)).astype(np.float32) / np.sqrt(dim)
        x = centre_vectors + cam_shift[cams] + strength * jitter
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    distractor_cams = rng.integers(1, num_cams + 1, size=num_distractors)
    distractor_centres = rng.standard_normal((num_distractors, dim)).astype(np.float32) / np.sqrt(dim)
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
        gallery_features=np.ascontiguousarray(gallery_features[shuffle]),
        gallery_pids=gallery_pids[shuffle],
        gallery_cams=gallery_cams[shuffle],
    )


def timed(fn, *args, **kwargs) -> tuple[Evaluation, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def same_result(a: Evaluation, b: Evaluation) -> bool:
    return (
        np.array_equal(a.evaluated_mask, b.evaluated_mask)
        and np.allclose(a.cmc, b.cmc, rtol=0, atol=1e-6)
        and np.allclose(a.ap, b.ap, rtol=0, atol=1e-6)
        and abs(a.mAP - b.mAP) <= 1e-6
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=None, help="evaluate only the first N queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast version (best is reported)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = make_market_like(seed=args.seed)
    keep = slice(None, args.queries)
    inputs = (
        data.query_features[keep],
        data.query_pids[keep],
        data.query_cams[keep],
        data.gallery_features,
        data.gallery_pids,
        data.gallery_cams,
    )
    num_query, dim = inputs[0].shape
    distractors, junk = (data.gallery_pids == 0).sum(), (data.gallery_pids == -1).sum()
    print(
        f"data: {num_query:,} queries x {len(data.gallery_pids):,} gallery, {dim}-d float32 "
        f"({distractors:,} distractors, {junk:,} junk), made in {time.perf_counter() - start:.1f} s"
    )

    fast_times = []
    for _ in range(max(1, args.repeats)):
        fast, seconds = timed(evaluate, *inputs)
        fast_times.append(seconds)
    fast_time = min(fast_times)
    print(f"evaluate        (vectorised): {fast_time:8.3f} s   (best of {len(fast_times)})")
    naive, naive_time = timed(evaluate_naive, *inputs)
    print(f"evaluate_naive  (per query):  {naive_time:8.3f} s")
    print(f"speed-up: {naive_time / fast_time:.1f}x")

    agree = same_result(fast, naive)
    print(f"identical results: {agree}")
    print(f"market AP: {fast}")
    print(f"step AP:   {evaluate(*inputs, ap='step')}")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
