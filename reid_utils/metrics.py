"""Re-ID evaluation: CMC curve and mAP under the Market-1501 protocol.

Protocol (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015, and the
official Market-1501 evaluation code): rank the gallery by similarity to each query; for that query,
gallery items with the same pid *and* the same camera are junk (finding yourself in the same camera
is too easy), and so are boxes with pid -1 (partial boxes, "no impact on accuracy"). Junk is removed
from the ranking; distractors (pid 0) stay in as wrong answers. A query with no true match left is
skipped and counted, as torchreid does, instead of being scored as zero. ``junk_mask`` is that rule,
written once; every function here uses it.

Two AP conventions are in use:

* ``"market"`` -- the official Market-1501 code and layumi/Person_reID_baseline_pytorch
  ``evaluate.py`` (issues #16, #37): a trapezoid between the precision just before and at each hit.
* ``"step"`` -- torchreid ``eval_market1501`` and fast-reid: non-interpolated, the mean of the
  precisions at the hits. fast-reid issue #18 notes it reads 0.5-1.0 points above the official script
  on Market-1501.

``evaluate_naive`` is the classic one-query-at-a-time loop, the one to read; ``evaluate`` gives the very same
results fast (its machinery is ``reid_utils.fastrank``), and the tests and ``benchmarks/bench_evaluate.py``
compare the two. Both rank by the same float64 scores (``_dot_rows``), so they agree bit for bit, ties included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from reid_utils.fastrank import PAIRS_PER_CHUNK, DistanceKeys, FeatureKeys, rank_blocks  # noqa: F401  (re-exported)

ArrayLike = np.ndarray | torch.Tensor
APConvention = Literal["market", "step"]
AP_CONVENTIONS = ("market", "step")
JUNK_PID = -1  # partial boxes: junk for every query

DEFAULT_CHUNK_SIZE: int | None = None  # as many queries a chunk as PAIRS_PER_CHUNK pairs allow (fastrank)


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Result of one evaluation; the arrays are read-only so the object really is frozen.

    ``cmc[k]`` is the fraction of evaluated queries whose first true match is within the top ``k + 1``
    (``cmc[0]`` is rank-1, ``cmc[4]`` rank-5). ``ap`` holds one AP per *evaluated* query, in query order;
    ``evaluated_mask`` says which queries those are.
    """

    cmc: np.ndarray
    mAP: float
    ap: np.ndarray
    num_queries_evaluated: int
    num_queries_skipped: int
    evaluated_mask: np.ndarray
    ap_convention: str = "market"

    def rank(self, k: int) -> float:
        """CMC at rank ``k`` (1-based); beyond the gallery size every evaluated query has its match."""
        if k < 1:
            raise ValueError(f"rank k is 1-based, got {k}")
        return float(self.cmc[min(k, len(self.cmc)) - 1])

    def summary(self) -> str:
        """One line in the style papers report: ``Rank@1: 88.84%  Rank@5: ...  mAP: 71.59%``."""
        parts = [f"Rank@{k}: {100 * self.rank(k):.2f}%" for k in (1, 5, 10)]
        parts.append(f"mAP: {100 * self.mAP:.2f}%")
        line = "  ".join(parts)
        if self.num_queries_skipped:
            line += f"  ({self.num_queries_skipped} queries skipped: no true match in the gallery)"
        return line

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------------------------------
# Input checks shared by every entry point
# --------------------------------------------------------------------------------------------------


def _as_array(x: ArrayLike, dtype: type | None) -> np.ndarray:
    """numpy array of ``dtype`` from a numpy array or a (possibly GPU, possibly bfloat16) tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _check_options(ap: str, max_rank: int, chunk_size: int | None) -> None:
    if ap not in AP_CONVENTIONS:
        raise ValueError(f"ap must be one of {AP_CONVENTIONS}, got {ap!r}")
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")


def _labels(pids: ArrayLike, cams: ArrayLike, count: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """pids and cameras as 1-D int64 arrays with one entry per row of the features."""
    out = []
    for name, values in ((f"{side}_pids", pids), (f"{side}_cams", cams)):
        _check_whole_numbers(values, name)
        array = _as_array(values, np.int64)
        if array.ndim != 1 or len(array) != count:
            raise ValueError(f"{name} must be 1-D with {count} entries (one per {side} row), got shape {array.shape}")
        out.append(array)
    return out[0], out[1]


def _check_whole_numbers(values: ArrayLike, name: str) -> None:
    """Identities and cameras are whole numbers: a float label such as 1.5 would be cut to 1 without a word."""
    array = _as_array(values, None)
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
        raise ValueError(f"{name} must hold whole numbers (identity and camera ids), got {array.ravel()[:5]} ...")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold whole numbers (identity and camera ids), got dtype {array.dtype}")


def _features(features: ArrayLike, name: str, keep_float32: bool = False) -> np.ndarray:
    """2-D float features: float64, or float32 as given when ``keep_float32`` (``evaluate`` needs no copy)."""
    array = _as_array(features, None)
    if not (keep_float32 and array.dtype == np.float32):
        array = array.astype(np.float64, copy=False)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_items, feature_dim), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _prepare(query_features, query_pids, query_cams, gallery_features, gallery_pids, gallery_cams, keep_float32=False):
    qf = _features(query_features, "query_features", keep_float32)
    gf = _features(gallery_features, "gallery_features", keep_float32)
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"query and gallery feature sizes differ: {qf.shape[1]} vs {gf.shape[1]}")
    if len(gf) == 0:
        raise ValueError("the gallery is empty")
    qp, qc = _labels(query_pids, query_cams, len(qf), "query")
    gp, gc = _labels(gallery_pids, gallery_cams, len(gf), "gallery")
    return qf, qp, qc, gf, gp, gc


def _make_evaluation(cmc_counts: np.ndarray, ap_values: np.ndarray, evaluated: np.ndarray, ap: str) -> Evaluation:
    """Average the per-query results; refuse to report a metric over zero queries."""
    num_evaluated = int(evaluated.sum())
    if num_evaluated == 0:
        raise ValueError("no query has a true match in the gallery (after junk removal): nothing to evaluate")
    cmc = cmc_counts / num_evaluated
    ap_values = np.asarray(ap_values, dtype=np.float64)
    for array in (cmc, ap_values, evaluated):
        array.setflags(write=False)
    return Evaluation(
        cmc=cmc,
        mAP=float(ap_values.mean()),
        ap=ap_values,
        num_queries_evaluated=num_evaluated,
        num_queries_skipped=int(len(evaluated) - num_evaluated),
        evaluated_mask=evaluated,
        ap_convention=ap,
    )


# --------------------------------------------------------------------------------------------------
# The protocol's two primitives: which items are junk, and the score every function ranks by
# --------------------------------------------------------------------------------------------------


def junk_mask(
    query_pid: ArrayLike | int, query_cam: ArrayLike | int, gallery_pids: ArrayLike, gallery_cams: ArrayLike
) -> np.ndarray:
    """True where a gallery item is junk for the query: pid -1, or the query's person seen by the query's camera.

    Junk is removed from the ranking before CMC and AP are computed (it is neither right nor wrong).
    Broadcasts like a numpy comparison: one query against a whole gallery, or (query, item) pairs elementwise.
    """
    gallery_pids = _as_array(gallery_pids, None)
    same_camera = _as_array(gallery_cams, None) == _as_array(query_cam, None)
    return (gallery_pids == JUNK_PID) | ((gallery_pids == _as_array(query_pid, None)) & same_camera)


def _dot_rows(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """float64 ``rows @ vector``, each row rounded the same way wherever it sits.

    A BLAS matrix-vector product does not: OpenBLAS treats the last rows of a matrix with another kernel, so
    two identical gallery rows can score 1 ulp apart and lose their tie, and a row's score changes with the
    rows passed alongside it. ``np.einsum`` reduces every row with the same loop (the same one as
    ``_dot_pairs``), so ``evaluate`` can re-score a handful of pairs and get exactly the values the per-query
    loop ranks by; ``tests/test_metrics.py`` checks that the two agree bit for bit.
    """
    return np.einsum("ij,j->i", rows, vector)


def _kept_columns(gallery_pids: np.ndarray, gallery_cams: np.ndarray) -> np.ndarray:
    """Gallery columns that are not junk for every query, so worth scoring at all.

    Asking ``junk_mask`` on behalf of a pid -1 query isolates the part of the rule that does not depend on the
    query (its "same person" is pid -1 again). Dropping those columns once, up front, leaves less to multiply
    and sort, and keeps the order of the remaining columns (which breaks ties).
    """
    return np.flatnonzero(~junk_mask(JUNK_PID, 0, gallery_pids, gallery_cams))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def evaluate(
    query_features: ArrayLike,
    query_pids: ArrayLike,
    query_cams: ArrayLike,
    gallery_features: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_cams: ArrayLike,
    ap: APConvention = "market",
    max_rank: int = 50,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Evaluation:
    """CMC and mAP of a query set against a gallery, Market-1501 protocol (see the module docstring).

    Similarity is the dot product of the features as given, so L2-normalise them first to rank by cosine
    similarity. The ranking is that of float64 scores, equal scores in gallery order -- exactly what
    ``evaluate_naive`` computes -- but the scores are computed in float32 (one fast matrix product per chunk),
    only the items whose float32 score is too close to a true match's for float32 to tell them apart are
    re-scored in float64 (see ``fastrank.FeatureKeys`` for the bound), and the gallery is never sorted: the ranks
    of the true matches are counted (``reid_utils.fastrank``).

    AP for one query with ``n_good`` true matches, the ``i``-th (1-based) at 0-based rank ``r`` after
    junk removal:

    * ``ap="market"`` (official Market-1501 code, layumi ``evaluate.py``):
      ``AP = sum_i 1/n_good * (precision_before + precision_at) / 2`` with ``precision_at = i / (r + 1)``
      and ``precision_before = (i - 1) / r`` (1 when ``r = 0``).
    * ``ap="step"`` (torchreid ``eval_market1501``, fast-reid): ``AP = 1/n_good * sum_i i / (r + 1)``.

    The work is done ``chunk_size`` queries at a time (default: as many as ``PAIRS_PER_CHUNK`` query-gallery
    pairs allow, 256 MB of float32 scores), which bounds memory: one chunk of float32 scores plus its near-ties
    (~0.5 GB in all at MSMT17 size). The result does not depend on it.
    """
    _check_options(ap, max_rank, chunk_size)
    qf, qp, qc, gf, gp, gc = _prepare(
        query_features, query_pids, query_cams, gallery_features, gallery_pids, gallery_cams, keep_float32=True
    )
    kept = _kept_columns(gp, gc)
    ranked = rank_blocks(FeatureKeys(qf, gf, kept), qp, qc, gp[kept], gc[kept], len(gp), ap, max_rank, chunk_size,
                         junk_mask)  # fmt: skip
    return _make_evaluation(*ranked, ap)


def evaluate_from_distance(
    dist: ArrayLike,
    query_pids: ArrayLike,
    query_cams: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_cams: ArrayLike,
    ap: APConvention = "market",
    max_rank: int = 50,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Evaluation:
    """Like ``evaluate``, from a precomputed (num_query, num_gallery) *distance* matrix (smaller = closer).

    Use it for distances that are not a dot product, e.g. the output of
    ``reid_utils.rerank.k_reciprocal_rerank``. It runs the same code as ``evaluate``, ranking by ``dist``
    where ``evaluate`` ranks by ``-similarity``, so ties again keep gallery order. The distances are ranked
    exactly as given (float64 ones through float32 with the same exact re-check of close calls).
    """
    _check_options(ap, max_rank, chunk_size)
    d = _as_array(dist, None)
    if d.ndim != 2:
        raise ValueError(f"dist must be 2-D (num_query, num_gallery), got shape {d.shape}")
    if d.shape[1] == 0:
        raise ValueError("the gallery is empty")
    if d.dtype not in (np.float32, np.float64):
        d = d.astype(np.float64)
    if not np.isfinite(d).all():
        raise ValueError("dist contains NaN or infinite values")
    qp, qc = _labels(query_pids, query_cams, d.shape[0], "query")
    gp, gc = _labels(gallery_pids, gallery_cams, d.shape[1], "gallery")
    kept = _kept_columns(gp, gc)
    ranked = rank_blocks(DistanceKeys(d, kept), qp, qc, gp[kept], gc[kept], len(gp), ap, max_rank, chunk_size,
                         junk_mask)  # fmt: skip
    return _make_evaluation(*ranked, ap)


def evaluate_naive(
    query_features: ArrayLike,
    query_pids: ArrayLike,
    query_cams: ArrayLike,
    gallery_features: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_cams: ArrayLike,
    ap: APConvention = "market",
    max_rank: int = 50,
    chunk_size: int | None = None,
) -> Evaluation:
    """The classic one-query-at-a-time evaluation loop, as in layumi's ``evaluate.py``.

    Easy to check line by line, slow on a full data set; ``evaluate`` must give the same numbers.
    ``chunk_size`` is accepted only so the two functions can be swapped; it is ignored.
    """
    _check_options(ap, max_rank, chunk_size)
    qf, qp, qc, gf, gp, gc = _prepare(
        query_features, query_pids, query_cams, gallery_features, gallery_pids, gallery_cams
    )
    length = min(int(max_rank), len(gf))
    cmc_counts = np.zeros(length)
    ap_values = []
    evaluated = np.zeros(len(qf), dtype=bool)
    for q in range(len(qf)):
        score = _dot_rows(gf, qf[q])
        index = np.argsort(-score, kind="stable")  # best first, ties in gallery order

        junk = junk_mask(qp[q], qc[q], gp, gc)
        good = (gp == qp[q]) & ~junk  # the query's person, seen by another camera
        if not good.any():
            continue  # no true match left: skipped, not scored as zero
        evaluated[q] = True

        index = index[~junk[index]]
        hit_ranks = np.flatnonzero(good[index])  # 0-based ranks of the true matches

        cmc = np.zeros(length)
        cmc[hit_ranks[0] :] = 1
        cmc_counts += cmc

        total = 0.0  # summed hit by hit, then divided: the very operations evaluate does, so equal bit for bit
        for i, r in enumerate(hit_ranks, start=1):
            precision_at = i / (r + 1)
            if ap == "step":
                total += precision_at
            else:
                precision_before = (i - 1) / r if r > 0 else 1.0
                total += (precision_before + precision_at) / 2
        ap_values.append(total / len(hit_ranks))
    return _make_evaluation(cmc_counts, np.array(ap_values), evaluated, ap)


@dataclass(frozen=True)
class RankedGallery:
    """One query's ranking after junk removal: what CMC and AP look at, ready to draw."""

    order: np.ndarray  # gallery indices, best first, junk removed
    is_match: np.ndarray  # True where the ranked item is the query's person from another camera
    scores: np.ndarray  # what each ranked item was ranked by: similarity, or distance for rank_gallery_by_distance


def _ranked(
    keys: np.ndarray, values: np.ndarray, query_pid: int, query_cam: int, gp: np.ndarray, gc: np.ndarray
) -> RankedGallery:
    """Sort by ``keys`` (smaller first, ties in gallery order) and drop the query's junk."""
    order = np.argsort(keys, kind="stable")
    order = order[~junk_mask(query_pid, query_cam, gp[order], gc[order])]
    return RankedGallery(order=order, is_match=gp[order] == query_pid, scores=values[order])


def rank_gallery(
    query_feature: ArrayLike,
    query_pid: int,
    query_cam: int,
    gallery_features: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_cams: ArrayLike,
) -> RankedGallery:
    """Rank the gallery for one query by dot product, dropping the protocol's junk (``junk_mask``).

    Removed: gallery pid -1, and the query's person seen by the query's own camera.
    Distractors (pid 0) stay and count as wrong. Ties keep gallery order; the scores are the ones
    ``evaluate`` ranks by, so the order is the one it scores.
    """
    qf = _features(_as_array(query_feature, np.float64).reshape(1, -1), "query_feature")[0]
    gf = _features(gallery_features, "gallery_features")
    _check_whole_numbers([query_pid, query_cam], "query_pid and query_cam")
    gp, gc = _labels(gallery_pids, gallery_cams, len(gf), "gallery")
    scores = _dot_rows(gf, qf)
    return _ranked(-scores, scores, query_pid, query_cam, gp, gc)


def rank_gallery_by_distance(
    distance_row: ArrayLike,
    query_pid: int,
    query_cam: int,
    gallery_pids: ArrayLike,
    gallery_cams: ArrayLike,
) -> RankedGallery:
    """``rank_gallery`` for one row of a distance matrix (smaller = closer), e.g. re-ranked distances.

    Same junk rule, same tie order as ``evaluate_from_distance``; ``scores`` holds the distances.
    """
    d = _as_array(distance_row, np.float64).reshape(-1)
    gp, gc = _labels(gallery_pids, gallery_cams, len(d), "gallery")
    return _ranked(d, d, query_pid, query_cam, gp, gc)
