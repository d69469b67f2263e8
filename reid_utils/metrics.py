"""Re-ID evaluation: CMC curve and mAP under the Market-1501 protocol.

Protocol (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015, and the
official Market-1501 evaluation code): rank the gallery by similarity to each query; for that query,
gallery items with the same pid *and* the same camera are junk (finding yourself in the same camera
is too easy), and so are boxes with pid -1 (partial boxes, "no impact on accuracy"). Junk is removed
from the ranking; distractors (pid 0) stay in as wrong answers. A query with no true match left is
skipped and counted, as torchreid does, instead of being scored as zero.

Two AP conventions are in use:

* ``"market"`` -- the official Market-1501 code and layumi/Person_reID_baseline_pytorch
  ``evaluate.py`` (issues #16, #37): a trapezoid between the precision just before and at each hit.
* ``"step"`` -- torchreid ``eval_market1501`` and fast-reid: non-interpolated, the mean of the
  precisions at the hits. fast-reid issue #18 notes it reads 0.5-1.0 points above the official script
  on Market-1501.

``evaluate`` is the fast, chunked implementation; ``evaluate_naive`` is the classic one-query-at-a-time
loop, kept as a readable reference that the tests and ``benchmarks/bench_evaluate.py`` compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
APConvention = Literal["market", "step"]
AP_CONVENTIONS = ("market", "step")

# Working memory per chunk is about 20 bytes per (query, gallery) pair (float64 keys, their sorted copy,
# a boolean mask), so 256 queries x 19,732 gallery images (Market-1501) is roughly 100 MB.
DEFAULT_CHUNK_SIZE = 256


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


def _check_options(ap: str, max_rank: int, chunk_size: int) -> None:
    if ap not in AP_CONVENTIONS:
        raise ValueError(f"ap must be one of {AP_CONVENTIONS}, got {ap!r}")
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")


def _labels(pids: ArrayLike, cams: ArrayLike, count: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """pids and cameras as 1-D int64 arrays with one entry per row of the features."""
    out = []
    for name, values in ((f"{side}_pids", pids), (f"{side}_cams", cams)):
        array = _as_array(values, np.int64)
        if array.ndim != 1 or len(array) != count:
            raise ValueError(f"{name} must be 1-D with {count} entries (one per {side} row), got shape {array.shape}")
        out.append(array)
    return out[0], out[1]


def _features(features: ArrayLike, name: str) -> np.ndarray:
    """2-D float64 features.

    Scores are computed in float64 on purpose: a float32 matrix product rounds differently depending on
    how BLAS blocks it (that is, on the chunk size), by about 1e-7, which is enough to swap near-tied
    gallery items. In float64 the rankings no longer depend on the chunk size.
    """
    array = _as_array(features, np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_items, feature_dim), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _prepare(query_features, query_pids, query_cams, gallery_features, gallery_pids, gallery_cams):
    qf = _features(query_features, "query_features")
    gf = _features(gallery_features, "gallery_features")
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
# The vectorised core: one block of queries at a time
# --------------------------------------------------------------------------------------------------


def _searchsorted_rows(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray, side: str) -> np.ndarray:
    """``np.searchsorted(sorted_rows[r], v, side)`` for many ``(r, v)`` pairs at once.

    numpy has no batched searchsorted, so this is a binary search run on all pairs together: ``pos``
    grows by powers of two while the entry just before the candidate position is still ``< v``
    (``<= v`` for ``side="right"``). About log2(width) steps of cheap fancy indexing.
    """
    width = sorted_rows.shape[1]
    pos = np.zeros(len(values), dtype=np.int64)
    step = 1 << (width.bit_length() - 1) if width else 0
    while step:
        candidate = pos + step
        inside = candidate <= width
        probe = sorted_rows[rows, np.minimum(candidate, width) - 1]
        moves = inside & ((probe < values) if side == "left" else (probe <= values))
        pos[moves] = candidate[moves]
        step >>= 1
    return pos


def _equal_before(
    keys: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, budget: int = 1 << 22
) -> np.ndarray:
    """How many items in row ``r`` before column ``c`` have exactly the key ``v`` (ties, broken by index).

    Only called for true matches whose score is tied with another item, which real features rarely
    produce; the pairs go through in batches of ``budget`` compared elements to bound memory.
    """
    width = keys.shape[1]
    columns = np.arange(width)
    out = np.empty(len(rows), dtype=np.int64)
    step = max(1, budget // max(width, 1))
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        equal = keys[rows[part]] == values[part, None]
        equal &= columns < cols[part, None]
        out[part] = equal.sum(axis=1)
    return out


class _GalleryIndex(NamedTuple):
    """Gallery labels arranged for lookups.

    ``by_pid`` sorts the columns by pid (stable), so all columns of one pid form a contiguous run of
    ``sorted_pids``.
    """

    cams: np.ndarray
    by_pid: np.ndarray
    sorted_pids: np.ndarray

    @classmethod
    def build(cls, pids: np.ndarray, cams: np.ndarray) -> _GalleryIndex:
        by_pid = np.argsort(pids, kind="stable")
        return cls(cams=cams, by_pid=by_pid, sorted_pids=pids[by_pid])

    def same_pid_pairs(self, query_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (query row, gallery column) pair with equal pids, grouped by query row.

        A query's same-pid columns are the run ``sorted_pids[lo:hi]``: two binary searches per query
        instead of comparing the query with every gallery pid.
        """
        lo = np.searchsorted(self.sorted_pids, query_pids, side="left")
        counts = np.searchsorted(self.sorted_pids, query_pids, side="right") - lo
        rows = np.repeat(np.arange(len(query_pids)), counts)
        offsets = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
        return rows, self.by_pid[lo[rows] + offsets]


def _block_results(
    keys: np.ndarray,
    query_pids: np.ndarray,
    query_cams: np.ndarray,
    gallery: _GalleryIndex,
    ap: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate one block of queries from its (block, G) ranking keys, smaller = better (overwritten).

    The keys are ``-similarity`` or a distance; the gallery has no pid -1 items left (see
    ``_evaluate_blocks``). We never need the full ranking of the gallery, only where each true match lands
    in it. A true match's 0-based rank among the non-junk items is the number of non-junk items with a
    smaller key, plus the tied ones with a smaller gallery index -- exactly what
    ``np.argsort(keys, kind="stable")`` followed by junk removal gives. Sorting the key *values* (no
    argsort) and binary-searching each true match's key in its sorted row gets those counts several times
    faster than a stable argsort of every row.

    Returns ``(evaluated, ap_values, first_hit)``: a bool per query, and for the evaluated queries their
    AP and the 0-based rank of their first true match.
    """
    # Same-pid pairs are few (tens per query), so they are split into junk and true matches as lists.
    rows, cols = gallery.same_pid_pairs(query_pids)
    same_cam = query_cams[rows] == gallery.cams[cols]
    # Junk gets +inf: it sorts last and never precedes a true match, so counting "keys smaller than
    # mine" counts non-junk items only.
    keys[rows[same_cam], cols[same_cam]] = np.inf
    rows, cols = rows[~same_cam], cols[~same_cam]
    values = keys[rows, cols]
    # Items behind a query's last true match cannot change any count we need; as +inf they make the
    # sort below cheaper (typically twice as fast).
    last = np.full(len(keys), -np.inf)
    np.maximum.at(last, rows, values)
    np.putmask(keys, keys > last[:, None], np.inf)

    sorted_keys = np.sort(keys, axis=1)
    ranks = _searchsorted_rows(sorted_keys, rows, values, "left")
    tied = _searchsorted_rows(sorted_keys, rows, values, "right") - ranks > 1  # someone else has my key
    if tied.any():
        ranks[tied] += _equal_before(keys, rows[tied], cols[tied], values[tied])

    # Put each query's hits in rank order; i is the 1-based hit number, r the 0-based rank.
    order = np.lexsort((ranks, rows))
    rows, r = rows[order], ranks[order]
    n_good = np.bincount(rows, minlength=len(keys))
    starts = np.cumsum(n_good) - n_good
    i = np.arange(1, len(rows) + 1) - starts[rows]

    precision_at = i / (r + 1)
    if ap == "step":
        per_hit = precision_at
    else:  # "market": trapezoid with the precision just before the hit (1 when the hit is first)
        precision_before = np.where(r > 0, (i - 1) / np.maximum(r, 1), 1.0)
        per_hit = (precision_before + precision_at) / 2
    ap_sums = np.bincount(rows, weights=per_hit, minlength=len(keys))

    evaluated = n_good > 0
    return evaluated, ap_sums[evaluated] / n_good[evaluated], r[starts[evaluated]]


def _kept_columns(gallery_pids: np.ndarray) -> np.ndarray:
    """Gallery columns worth ranking.

    pid -1 boxes are junk for every query, so they are dropped once, up front: less to multiply and
    sort, and the order of the remaining columns (which breaks ties) is unchanged.
    """
    return np.flatnonzero(gallery_pids != -1)


def _evaluate_blocks(
    key_block: Callable[[int, int], np.ndarray],
    query_pids: np.ndarray,
    query_cams: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_cams: np.ndarray,
    num_gallery: int,
    ap: str,
    max_rank: int,
    chunk_size: int,
) -> Evaluation:
    """Shared driver of ``evaluate`` and ``evaluate_from_distance``.

    ``key_block(start, stop)`` returns a fresh float64 block of ranking keys (smaller = better) for
    queries ``start:stop`` against the kept gallery columns, whose pids and cameras are given here.
    ``num_gallery`` is the full gallery size, which caps the length of the CMC curve.
    """
    length = min(int(max_rank), num_gallery)
    gallery = _GalleryIndex.build(gallery_pids, gallery_cams)
    cmc_counts = np.zeros(length, dtype=np.float64)
    evaluated_parts, ap_parts = [], []
    for start in range(0, len(query_pids), int(chunk_size)):
        stop = min(start + int(chunk_size), len(query_pids))
        evaluated, ap_values, first_hit = _block_results(
            key_block(start, stop),
            query_pids[start:stop],
            query_cams[start:stop],
            gallery,
            ap,
        )
        cmc_counts += np.bincount(first_hit[first_hit < length], minlength=length)
        evaluated_parts.append(evaluated)
        ap_parts.append(ap_values)
    cmc_counts = np.cumsum(cmc_counts)  # first hit at rank r counts for every k >= r
    evaluated = np.concatenate(evaluated_parts) if evaluated_parts else np.zeros(0, dtype=bool)
    ap_values = np.concatenate(ap_parts) if ap_parts else np.zeros(0)
    return _make_evaluation(cmc_counts, ap_values, evaluated, ap)


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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Evaluation:
    """CMC and mAP of a query set against a gallery, Market-1501 protocol (see the module docstring).

    Similarity is the dot product of the features as given, so L2-normalise them first to rank by cosine
    similarity. Equal scores keep gallery order (``np.argsort(-scores, kind="stable")``).

    AP for one query with ``n_good`` true matches, the ``i``-th (1-based) at 0-based rank ``r`` after
    junk removal:

    * ``ap="market"`` (official Market-1501 code, layumi ``evaluate.py``):
      ``AP = sum_i 1/n_good * (precision_before + precision_at) / 2`` with ``precision_at = i / (r + 1)``
      and ``precision_before = (i - 1) / r`` (1 when ``r = 0``).
    * ``ap="step"`` (torchreid ``eval_market1501``, fast-reid): ``AP = 1/n_good * sum_i i / (r + 1)``.

    The work is vectorised and done ``chunk_size`` queries at a time, which bounds memory to about
    ``20 * chunk_size * num_gallery`` bytes.
    """
    _check_options(ap, max_rank, chunk_size)
    qf, qp, qc, gf, gp, gc = _prepare(
        query_features, query_pids, query_cams, gallery_features, gallery_pids, gallery_cams
    )
    kept = _kept_columns(gp)
    negated_gallery = -gf[kept]  # keys = query @ (-gallery).T = -similarity, without a pass over the block

    def key_block(start: int, stop: int) -> np.ndarray:
        return qf[start:stop] @ negated_gallery.T

    return _evaluate_blocks(key_block, qp, qc, gp[kept], gc[kept], len(gp), ap, max_rank, chunk_size)


def evaluate_from_distance(
    dist: ArrayLike,
    query_pids: ArrayLike,
    query_cams: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_cams: ArrayLike,
    ap: APConvention = "market",
    max_rank: int = 50,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Evaluation:
    """Like ``evaluate``, from a precomputed (num_query, num_gallery) *distance* matrix (smaller = closer).

    Use it for distances that are not a dot product, e.g. the output of
    ``reid_utils.rerank.k_reciprocal_rerank``. It runs the same code as ``evaluate``, ranking by ``dist``
    where ``evaluate`` ranks by ``-similarity``, so ties again keep gallery order.
    """
    _check_options(ap, max_rank, chunk_size)
    d = _as_array(dist, None)  # kept in its own precision; blocks are converted to float64 one at a time
    if d.ndim != 2:
        raise ValueError(f"dist must be 2-D (num_query, num_gallery), got shape {d.shape}")
    if d.shape[1] == 0:
        raise ValueError("the gallery is empty")
    if not np.isfinite(d).all():
        raise ValueError("dist contains NaN or infinite values")
    qp, qc = _labels(query_pids, query_cams, d.shape[0], "query")
    gp, gc = _labels(gallery_pids, gallery_cams, d.shape[1], "gallery")
    kept = _kept_columns(gp)

    def key_block(start: int, stop: int) -> np.ndarray:
        return d[start:stop, kept].astype(np.float64, copy=False)  # fancy indexing already copied

    return _evaluate_blocks(key_block, qp, qc, gp[kept], gc[kept], len(gp), ap, max_rank, chunk_size)


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
    _check_options(ap, max_rank, 1 if chunk_size is None else chunk_size)
    qf, qp, qc, gf, gp, gc = _prepare(
        query_features, query_pids, query_cams, gallery_features, gallery_pids, gallery_cams
    )
    length = min(int(max_rank), len(gf))
    cmc_counts = np.zeros(length)
    ap_values = []
    evaluated = np.zeros(len(qf), dtype=bool)
    junk_everywhere = np.flatnonzero(gp == -1)
    for q in range(len(qf)):
        score = gf @ qf[q]
        index = np.argsort(-score, kind="stable")  # best first, ties in gallery order

        same_pid = np.flatnonzero(gp == qp[q])
        same_cam = np.flatnonzero(gc == qc[q])
        junk_index = np.union1d(np.intersect1d(same_pid, same_cam), junk_everywhere)
        good_index = np.setdiff1d(np.setdiff1d(same_pid, same_cam), junk_index)
        if good_index.size == 0:
            continue  # no true match left: skipped, not scored as zero
        evaluated[q] = True

        index = index[np.isin(index, junk_index, invert=True)]
        hit_ranks = np.flatnonzero(np.isin(index, good_index))  # 0-based ranks of the true matches

        cmc = np.zeros(length)
        cmc[hit_ranks[0] :] = 1
        cmc_counts += cmc

        query_ap = 0.0
        n_good = len(good_index)
        for i, r in enumerate(hit_ranks, start=1):
            precision_at = i / (r + 1)
            if ap == "step":
                query_ap += precision_at / n_good
            else:
                precision_before = (i - 1) / r if r > 0 else 1.0
                query_ap += (precision_before + precision_at) / 2 / n_good
        ap_values.append(query_ap)
    return _make_evaluation(cmc_counts, np.array(ap_values), evaluated, ap)


@dataclass(frozen=True)
class RankedGallery:
    """One query's ranking after junk removal: what CMC and AP look at, ready to draw."""

    order: np.ndarray  # gallery indices, most similar first, junk removed
    is_match: np.ndarray  # True where the ranked item is the query's person from another camera
    scores: np.ndarray  # the similarity of each ranked item


def rank_gallery(
    query_feature: ArrayLike,
    query_pid: int,
    query_cam: int,
    gallery_features: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_cams: ArrayLike,
) -> RankedGallery:
    """Rank the gallery for one query by dot product, dropping the same protocol's junk.

    Removed: gallery pid -1, and the query's person seen by the query's own camera.
    Distractors (pid 0) stay and count as wrong. Ties keep gallery order.
    """
    qf = _as_array(query_feature, np.float64).reshape(-1)
    gf = _as_array(gallery_features, np.float64)
    gp, gc = _labels(gallery_pids, gallery_cams, len(gf), "gallery")
    scores = gf @ qf
    order = np.argsort(-scores, kind="stable")
    junk = (gp[order] == -1) | ((gp[order] == query_pid) & (gc[order] == query_cam))
    order = order[~junk]
    return RankedGallery(order=order, is_match=gp[order] == query_pid, scores=scores[order])
