"""The fast path of ``metrics.evaluate``: exact CMC and AP at about the cost of one float32 matrix product.

``metrics`` holds the protocol (``junk_mask``), the per-query loop a student reads (``evaluate_naive``) and the
entry points; this module only makes ``evaluate`` and ``evaluate_from_distance`` fast. Their results are those
of the per-query float64 loop, bit for bit, ties included (``tests/test_metrics.py``). How: float32 scores by
one matrix product per chunk of queries, a rigorous bound on their rounding, float64 re-checks of the few
near-ties, and counting instead of sorting (the comments below). How close it comes to the bare product:
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Protocol

import numpy as np
import torch

# chunk_size=None (the default): each float32 matrix product covers as many queries as PAIRS_PER_CHUNK (query,
# gallery) pairs allow, 256 MB of scores: all 3,368 queries x 15,913 kept gallery columns of Market-1501, 816 x
# 82,161 for MSMT17. Fewer, larger products: each packs the whole gallery once and wakes OpenBLAS's threads once
# (without reid_utils' OPENBLAS_THREAD_TIMEOUT they then spin ~0.1 s on the ranking's cores). One buffer, reused.
PAIRS_PER_CHUNK = 1 << 26
# Past a few threads numpy's work between its GIL releases would keep them waiting for each other.
_MAX_RANKING_THREADS = 4
# The ranking work after each product goes through the scores this many pairs at a time: its temporaries (9 bytes
# a pair) stay in cache. At most _BINS_PER_PASS histogram bins a pass keeps bin numbers exact in float32.
_PAIRS_PER_PASS = 1 << 19
_BINS_PER_PASS = 1 << 21
_MIN_BINS = 16
# Below this share of a pass's items up to the last window of their row, those are sorted (~25 ns each; trained
# features: ~3 %), else counted by a histogram of the whole block (~2.5 ns an item; hard features: ~50 %).
_CANDIDATE_SHARE = 0.1
# Sorting a few hundred keys at a time (whole rows) stays in cache: 3-7x faster per key than one long sort.
_SORT_RUN = 1 << 9
# Near-ties re-scored in float64 this many pairs at a time (8 MB of gathered rows): fewer Python steps for the ranking
# threads to share the GIL over. On hard MSMT17-size features 256 was 5 % slower overall, 4,096 9 % slower.
_PAIRS_PER_RESCORE = 1 << 10
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _dot_pairs(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """float64 dot product of each row of ``left`` with the same row of ``right``: ``_dot_rows`` pair by pair."""
    return np.einsum("ij,ij->i", left, right)


def _blas_dot_pairs(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``_dot_pairs`` by BLAS, one dot product a pair: faster, but the rounding may depend on where rows sit."""
    return np.matmul(left[:, None, :], right[:, :, None]).reshape(-1)


# --------------------------------------------------------------------------------------------------
# The vectorised core: float32 scores, an error bound, and exact float64 checks of the near-ties
# --------------------------------------------------------------------------------------------------
#
# A true match's rank is the number of non-junk items whose exact key (``-score``, or a distance) is smaller
# than its own, plus those with an equal key and a smaller gallery index. The keys are computed in float32 by
# one matrix product per chunk, with a per-query bound ``tol`` on |float32 key - exact key| (see
# ``FeatureKeys``). For a match with exact key ``e``, an item whose float32 key is below ``e - tol`` certainly
# comes first, one above ``e + tol`` certainly after; only the items in between (its window) need a closer
# look, in float64. So the result is the float64 ranking, bit for bit, at float32 speed.
#
# Only the ranks of the true matches matter, so nothing sorts the gallery: a histogram of per-row bins counts the
# items certainly before each match (``_ranks_in_pass``), and only the few items of the bins a window touches are
# sorted. Hard features (an untrained network: true matches deep in the ranking, each with many near-ties) then
# cost about what well-separated ones do.


def _gamma(n: int, unit_roundoff: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error bound of a length-n dot product, any summation order."""
    nu = n * unit_roundoff
    return nu / (1 - nu) if nu < 0.5 else np.inf


def _shift_exponents(max_abs: np.ndarray) -> np.ndarray:
    """Powers of two that bring far-out magnitudes back near 1, so float32 neither overflows nor underflows.

    0 (no scaling) for anything between 2**-20 and 2**20, which covers any sensible feature; scaling by a
    power of two does not change the order of a query's keys.
    """
    exponent = np.frexp(max_abs)[1]
    return np.where((max_abs > 0) & (np.abs(exponent) > 20), -exponent, 0)


def _norm_bounds(rows: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Upper bounds on the L2 norms of the float64 rows ``rows * 2**shift`` (one shift per row).

    Squares that underflow lose at most 2**-1074 each; adding that back keeps it a bound. The few ulps of
    rounding left are covered by the 1 % margin of the tolerances that use it.
    """
    if shift.any():
        rows = np.ldexp(rows, shift[:, None])
    return np.sqrt(np.einsum("ij,ij->i", rows, rows) + rows.shape[1] * 2.0**-1073)


def _float32_norm_bound(rows: np.ndarray) -> float:
    """An upper bound on the largest L2 norm of the real values that float32 ``rows`` were rounded from.

    The float32 sums of squares err by at most gamma_d of themselves (all terms are positive) plus 2**-150 per
    square lost to underflow; each element is within a factor (1 + u) (+ 2**-150) of the value it rounds.
    """
    if rows.size == 0:
        return 0.0
    dim = rows.shape[1]
    largest = float(np.einsum("ij,ij->i", rows, rows).max())
    sum_bound = (largest + dim * 2.0**-149) / (1 - _gamma(dim, 2.0**-24))
    return (np.sqrt(sum_bound) + np.sqrt(dim) * 2.0**-149) * (1 + 2.0**-23)


class _KeySource(Protocol):
    def block(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Write float32 keys of queries ``start:stop`` x kept columns into ``out``; return each row's tolerance."""

    def exact(self, queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Exact float64 keys of (query, kept column) pairs -- the values the reference ranks by -- in the scale of
        ``block``'s keys (times the row's power of two, so order and ties are the reference's)."""

    def nearly(self, queries: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float64 keys of (query, kept column) pairs, queries sorted, within a bound (returned per pair) of
        ``exact``'s: cheaper to compute, and enough to place an item against a match unless they nearly tie."""


class FeatureKeys:
    """Keys ``-query . gallery`` for ``evaluate``: float32 blocks by matrix product, exact values by ``_dot_rows``.

    The bound: with u = 2**-24, a float32 dot product of length d, whatever its summation order and with the
    rounding of float64 inputs to float32 included, errs by at most gamma_(d+2) * sum_k |q_k g_k| <=
    gamma_(d+2) |q| |g| (Cauchy-Schwarz; gamma_n = n u / (1 - n u), Higham, "Accuracy and Stability of
    Numerical Algorithms", ch. 3). The float64 reference errs by at most gamma_d |q| |g| with u = 2**-53.
    Subnormal results add an absolute error of at most 2**-150 (float32) or 2**-1075 (float64) per rounding,
    covered by the absolute terms. With the largest gallery norm in place of |g|, and 1 % on top for the
    rounding of the bound itself, ``tol`` bounds |float32 key - exact key| for every item of the query's row.
    Likewise ``close`` bounds |BLAS float64 key - exact key|: two float64 sums of the same terms in any orders
    differ by at most 2 gamma_d |q| |g| (u = 2**-53).
    """

    def __init__(self, queries: np.ndarray, gallery: np.ndarray, kept: np.ndarray):
        self.queries, self.gallery, self.kept = queries, gallery, kept
        self.queries64 = queries.astype(np.float64, copy=False)  # small; the re-check gathers rows of it
        dim = queries.shape[1]
        self.query_shift = _shift_exponents(np.abs(queries).max(axis=1, initial=0).astype(np.float64))
        if gallery.dtype == np.float32:
            self.gallery32 = np.ascontiguousarray(gallery if len(kept) == len(gallery) else gallery[kept])
            largest = max(float(self.gallery32.max(initial=0)), -float(self.gallery32.min(initial=0)))
            self.gallery_shift = int(_shift_exponents(np.array(largest)))
            if self.gallery_shift:
                self.gallery32 = np.ldexp(self.gallery32, self.gallery_shift).astype(np.float32)
        else:
            largest = max(
                float(np.abs(gallery[start : start + 8192]).max(initial=0)) for start in range(0, len(gallery), 8192)
            )
            self.gallery_shift = int(_shift_exponents(np.array(largest)))
            self.gallery32 = np.empty((len(kept), dim), dtype=np.float32)
            for start in range(0, len(kept), 8192):
                rows = gallery[kept[start : start + 8192]]
                self.gallery32[start : start + 8192] = (
                    np.ldexp(rows, self.gallery_shift) if self.gallery_shift else rows
                )

        query_norms = _norm_bounds(self.queries64, self.query_shift)
        gallery_norm = _float32_norm_bound(self.gallery32)
        relative = _gamma(dim + 2, 2.0**-24) + _gamma(dim, 2.0**-53)
        underflow = 2.0**-148 * (np.sqrt(dim) * (query_norms + gallery_norm) + dim)
        underflow64 = np.ldexp(float(dim), self.query_shift + self.gallery_shift - 1074)
        self.tolerance = 1.01 * (relative * query_norms * gallery_norm + underflow + underflow64)
        self.close = 1.01 * (2 * _gamma(dim, 2.0**-53) * query_norms * gallery_norm + 2 * underflow64)

    def block(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        queries = self.queries64[start:stop]
        if self.query_shift[start:stop].any():
            queries = np.ldexp(queries, self.query_shift[start:stop, None])
        # keys = -score, smaller = better; negating is exact
        np.matmul(np.negative(queries).astype(np.float32, copy=False), self.gallery32.T, out=out)
        return self.tolerance[start:stop]

    def exact(self, queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
        return self._pairs_in_gallery_order(queries, columns, _dot_pairs)

    def nearly(self, queries: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """BLAS dot products: several times faster than ``exact``'s einsum, but their rounding depends on the
        data around (see ``_dot_rows``), hence the bound ``close``."""
        return self._pairs_in_gallery_order(queries, columns, _blas_dot_pairs), self.close[queries]

    def _pairs_in_gallery_order(self, queries: np.ndarray, columns: np.ndarray, dot: Callable) -> np.ndarray:
        """Keys of (query, column) pairs from ``dot(gallery rows, query rows)`` in float64, the pairs visited in
        gallery order, ``_PAIRS_PER_RESCORE`` at a time: the gallery, larger than the caches, is read in one sweep
        instead of one random read a pair, and the float64 copies stay in cache."""
        out = np.empty(len(queries))
        order = np.argsort(columns, kind="stable")
        for start in range(0, len(order), _PAIRS_PER_RESCORE):
            part = order[start : start + _PAIRS_PER_RESCORE]
            gallery_rows = self.gallery[self.kept[columns[part]]].astype(np.float64, copy=False)
            out[part] = dot(gallery_rows, self.queries64[queries[part]])
        # in the scale of the float32 keys (a power of two: exact, and the same order and ties)
        return np.ldexp(np.negative(out, out=out), self.query_shift[queries] + self.gallery_shift)


class DistanceKeys:
    """Keys from a distance matrix for ``evaluate_from_distance``: the distances themselves are exact.

    float32 distances go through as they are (tolerance 0: only equal values need a look at the gallery order);
    other dtypes are rounded to float32, which errs by at most 2**-24 |d| (+ 2**-150 if subnormal).
    """

    def __init__(self, dist: np.ndarray, kept: np.ndarray):
        self.dist, self.kept = dist, kept
        self.shift = np.zeros(len(dist), dtype=np.int64)  # each row's power-of-two scaling, set by ``block``

    def block(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        rows = self.dist[start:stop]
        if rows.dtype == np.float32:
            np.take(rows, self.kept, axis=1, out=out)
            return np.zeros(stop - start)
        tolerance = np.empty(stop - start)
        step = max(1, _PAIRS_PER_PASS // max(len(self.kept), 1))
        for first in range(0, stop - start, step):
            part = slice(first, first + step)
            values = rows[part][:, self.kept].astype(np.float64, copy=False)
            max_abs = np.abs(values).max(axis=1, initial=0)
            shift = _shift_exponents(max_abs)
            if shift.any():
                values = np.ldexp(values, shift[:, None])
            out[part] = values
            self.shift[start + first : start + first + len(shift)] = shift
            # rounding to float32: 2**-24 relative, or 2**-150 when subnormal (+ 2**-1075 if the scaling was)
            tolerance[part] = 1.01 * (2.0**-24 * np.ldexp(max_abs, shift) + 2.0**-149)
        return tolerance

    def exact(self, queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
        return np.ldexp(self.dist[queries, self.kept[columns]].astype(np.float64), self.shift[queries])

    def nearly(self, queries: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.exact(queries, columns), np.zeros(len(queries))


def _float32_outward(values: np.ndarray, up: bool) -> np.ndarray:
    """float32 values at or beyond the float64 ``values`` (rounded up or down, never toward them).

    Clipped to the finite range, where every float32 key lies.
    """
    rounded = np.clip(values, -_FLOAT32_MAX, _FLOAT32_MAX).astype(np.float32)
    wrong = rounded < values if up else rounded > values
    rounded[wrong] = np.nextafter(rounded[wrong], np.float32(np.inf if up else -np.inf))
    return np.clip(rounded, -_FLOAT32_MAX, _FLOAT32_MAX)


def _ordered_bits(values: np.ndarray) -> np.ndarray:
    """Codes in [0, 2**32) of float32 values that sort as the values do (-0.0 made +0.0 first: they are equal).

    As int32, a float's bits already sort right for positive values; flipping all but the sign bit of the
    negative ones reverses their order, and adding 2**31 makes every code non-negative.
    """
    bits = (values + np.float32(0)).view(np.int32)
    bits ^= (bits >> 31) & np.int32(0x7FFFFFFF)
    return bits.astype(np.int64) + (1 << 31)


def _sort_row_runs(packed: np.ndarray, per_row: np.ndarray) -> None:
    """Sort keys in place that are already grouped by row in row order, a few hundred keys (whole rows) at a time."""
    ends = np.cumsum(per_row)
    total = int(ends[-1]) if len(ends) else 0
    cuts = np.unique(ends[np.searchsorted(ends, np.arange(_SORT_RUN, total, _SORT_RUN))])
    start = 0
    for end in [*cuts.tolist(), total]:
        if end > start:
            packed[start:end].sort()
        start = end


def _bins_per_row(items: int) -> int:
    """Histogram bins per row for ``items`` a row: about four a bin, a power of two from ``_MIN_BINS`` to 2**20."""
    return max(_MIN_BINS, 1 << min(20, max(0, (items // 4).bit_length() - 1)))


class _RowBins(NamedTuple):
    """A non-decreasing map from each row's float32 keys to integer bins; row ``r`` owns bins ``r * per_row ...``.

    ``bin(x) = int(((x - mid) * scale) + base)``, every step in float32. Each step rounds monotonically, so
    ``bin(x) < bin(t)`` proves ``x < t`` and ``bin(x) > bin(t)`` proves ``x > t``: a histogram of the bins counts,
    for any threshold, the items certainly below it, and only the items of the threshold's own bin need to be
    looked at. ``scale`` brings the row's keys within ``per_row / 2 - 4`` bins of ``base``, the middle of the
    row's bins, with room to spare for rounding (``base`` stays below 2**22, where float32 steps are at most 1/2).
    Thresholds are clipped to the row's key range first: outside it there is nothing to tell apart.
    """

    mid: np.ndarray
    scale: np.ndarray
    base: np.ndarray
    lowest: np.ndarray
    highest: np.ndarray
    per_row: int

    @classmethod
    def fit(cls, lowest: np.ndarray, highest: np.ndarray, per_row: int) -> _RowBins:
        """Bins for rows whose keys lie in ``[lowest, highest]`` (float32, one pair per row)."""
        mid = ((lowest.astype(np.float64) + highest) / 2).astype(np.float32)
        span = np.maximum(highest - mid.astype(np.float64), mid - lowest.astype(np.float64)) * (1 + 2.0**-20)
        scale = np.zeros(len(lowest))
        np.divide(per_row / 2 - 4, span, out=scale, where=span > 0)
        scale = np.minimum(scale, _FLOAT32_MAX).astype(np.float32)  # a huge scale only coarsens the bins
        base = (np.arange(len(lowest)) * per_row + per_row // 2).astype(np.float32)
        return cls(mid, scale, base, lowest, highest, per_row)

    def of_rows(self, keys: np.ndarray, work: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Bins of a whole block of keys, computed in ``work`` (float32) and written to ``out`` (int32)."""
        np.subtract(keys, self.mid[:, None], out=work)
        np.multiply(work, self.scale[:, None], out=work)
        np.add(work, self.base[:, None], out=work)
        np.copyto(out, work, casting="unsafe")
        return out

    def of(self, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Bins of float32 thresholds, each in its own row: the very operations ``of_rows`` does."""
        work = np.clip(values, self.lowest[rows], self.highest[rows])
        work = (work - self.mid[rows]) * self.scale[rows] + self.base[rows]
        return work.astype(np.int32)


def _window(keys: np.ndarray, tolerance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 bounds ``low <= key - tol`` and ``high >= key + tol`` around the matches' float64 keys.

    With ``tol`` the bound on an item's float32 key's error plus that on the match's key's, an item whose float32
    key is below ``low`` is certainly before the match, one above ``high`` certainly after it. One float64 ulp
    outward covers the rounding of the sums.
    """
    low, high = keys - tolerance, keys + tolerance
    widened = tolerance > 0
    low[widened] = np.nextafter(low[widened], -np.inf)
    high[widened] = np.nextafter(high[widened], np.inf)
    return _float32_outward(low, up=False), _float32_outward(high, up=True)


def _flat_member(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.isin`` for a sorted haystack: True where ``values`` occur in ``sorted_values``."""
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return sorted_values[at] == values


def _ranks_in_pass(
    keys: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    junk: tuple[np.ndarray, np.ndarray],
    tolerance: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of the true matches ``(rows, cols)`` among the non-junk items of their rows, but for near-ties.

    ``keys`` are float32 keys within ``tolerance[row]`` of the exact keys, so an item more than twice that below
    a match certainly comes first (its window: twice the tolerance around the match's float32 key); ``junk``
    lists the (row, column) pairs that do not count. Only items up to the last window of their row can come
    before a match. When they are few (trained features: true matches near the top) they are sorted, row, key
    and column packed into one int64, and binary search counts those below each window. When they are many
    (hard features: matches deep in the ranking), ``_histogram_counts`` counts those in bins below each window
    instead, and only the items of the bins a window touches are sorted. The gallery is never sorted.

    Returns those counts and the near-ties left to settle: ``(match, column, float32 key)``, an item of the
    match's window (other than the match) each -- see ``_near_tie_ranks``. Most windows of trained features hold
    the match alone: then nothing is left.
    """
    n, width = keys.shape
    if len(rows) == 0:  # only queries without a true match: nothing to rank
        nothing = np.zeros(0, dtype=np.int64)
        return nothing, nothing, nothing, np.zeros(0, dtype=np.float32)
    col_bits = max(1, (width - 1).bit_length())
    low, high = _window(keys[rows, cols].astype(np.float64), 2 * tolerance[rows])
    limit = np.full(n, -np.inf, dtype=np.float32)
    np.maximum.at(limit, rows, high)
    below = keys <= limit[:, None]
    junk_flat = np.sort(junk[0] * width + junk[1])
    if np.count_nonzero(below) < _CANDIDATE_SHARE * below.size:
        ranks, selected, low_bin, bins = np.zeros(len(rows), dtype=np.int64), np.flatnonzero(below), None, None
    else:
        ranks, selected, low_bin, bins = _histogram_counts(keys, rows, low, high, junk_flat)
    selected = selected[~_flat_member(junk_flat, selected)]
    sel_rows = selected // width
    packed = _ordered_bits(keys.reshape(-1)[selected])
    packed += sel_rows << 32
    packed <<= col_bits
    packed |= selected - sel_rows * width
    _sort_row_runs(packed, np.bincount(sel_rows, minlength=n))

    col_mask = (1 << col_bits) - 1
    row_base = rows << (32 + col_bits)
    low_pos = np.searchsorted(packed, row_base | (_ordered_bits(low) << col_bits), side="left")
    high_pos = np.searchsorted(packed, row_base | (_ordered_bits(high) << col_bits) | col_mask, side="right")
    if bins is None:  # sorted items below the window, less those of earlier rows
        ranks += low_pos - np.searchsorted(packed, row_base, side="left")
    else:  # the same, less those the histogram counted (bins below low's; bins grow with the key, as packed)
        ranks += low_pos - np.searchsorted(np.sort(bins.reshape(-1)[selected]), low_bin, side="left")

    window = high_pos - low_pos  # the window's items, the match itself included
    crowded = np.flatnonzero(window > 1)
    sizes = window[crowded]
    match = np.repeat(crowded, sizes)
    item_cols = packed[np.arange(len(match)) - np.repeat(np.cumsum(sizes) - sizes - low_pos[crowded], sizes)]
    item_cols &= col_mask
    other = item_cols != cols[match]
    match, item_cols = match[other], item_cols[other]
    return ranks, match, item_cols, keys[rows[match], item_cols]


def _histogram_counts(
    keys: np.ndarray, rows: np.ndarray, low: np.ndarray, high: np.ndarray, junk_flat: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each match, the non-junk items in bins below its window's low end (``_RowBins``: certainly below it),
    and the flat positions of the items in the bins its window touches, which need a look one by one.

    Also returns the bins of the windows' low ends and of every item, for the caller's bookkeeping.
    """
    n, width = keys.shape
    bins = _RowBins.fit(keys.min(axis=1), keys.max(axis=1), _bins_per_row(width))
    total = n * bins.per_row
    item_bins = bins.of_rows(keys, np.empty_like(keys), np.empty(keys.shape, dtype=np.int32)).reshape(-1)
    low_bin, high_bin = bins.of(low, rows), bins.of(high, rows)
    # the two passes over every item by torch: its bincount takes ~0.5 ns an item where numpy's takes ~1.2 (and two
    # threads of numpy's run barely faster than one), its index_select ~0.5 where np.take takes ~0.7
    every_item = torch.from_numpy(item_bins)
    counts = torch.bincount(every_item, minlength=total).numpy() - np.bincount(item_bins[junk_flat], minlength=total)
    before_bin = np.cumsum(counts) - counts  # items in all earlier bins, earlier rows included
    ranks = before_bin[low_bin] - before_bin[rows * bins.per_row]  # the row's items in bins below low's
    edges = np.bincount(low_bin, minlength=total + 1) - np.bincount(high_bin + 1, minlength=total + 1)
    touched = torch.from_numpy(np.cumsum(edges[:total]) > 0)
    return ranks, np.flatnonzero(touched.index_select(0, every_item).numpy()), low_bin, item_bins


def _near_tie_ranks(
    near_ties: tuple[np.ndarray, np.ndarray, np.ndarray],
    rows: np.ndarray,
    cols: np.ndarray,
    tolerance: np.ndarray,
    source: _KeySource,
) -> np.ndarray:
    """How many of the near-ties ``(match, item column, item float32 key)`` come before their match, per match.

    The matches with near-ties get float64 keys from ``source.nearly``, within a bound of their exact ones: the
    window around that is half as wide (an item's float32 error only), and the items outside it are placed by
    their float32 keys. Those inside get float64 keys too; only where an item's and its match's are within their
    bounds of each other are the exact keys needed, and equal exact keys go by gallery order.
    """
    match, item_cols, item_keys = near_ties
    crowded, match_of = np.unique(match, return_inverse=True)
    match_near, match_bound = source.nearly(rows[crowded], cols[crowded])
    low, high = _window(match_near, tolerance[rows[crowded]] + match_bound)
    before = item_keys < low[match_of]
    inside = np.flatnonzero(~before & (item_keys <= high[match_of]))
    match, match_of, item_cols = match[inside], match_of[inside], item_cols[inside]

    item_rows = rows[match]
    unique, which = np.unique(item_rows * (int(item_cols.max(initial=0)) + 1) + item_cols, return_inverse=True)
    first = np.zeros(len(unique), dtype=np.int64)
    first[which] = np.arange(len(which))
    near, bound = source.nearly(item_rows[first], item_cols[first])
    gap = near[which] - match_near[match_of]
    slack = bound[which] + match_bound[match_of]
    decided = gap < -slack
    unsure = np.flatnonzero(np.abs(gap) <= slack)
    if len(unsure):
        item_exact = source.exact(item_rows[unsure], item_cols[unsure])
        match_exact = source.exact(rows[match[unsure]], cols[match[unsure]])
        ties_before = item_cols[unsure] < cols[match[unsure]]
        decided[unsure] = (item_exact < match_exact) | ((item_exact == match_exact) & ties_before)
    before[inside] = decided
    return np.bincount(near_ties[0][before], minlength=len(rows))


class _GalleryIndex(NamedTuple):
    """Gallery labels arranged for lookups.

    ``by_pid`` sorts the columns by pid (stable), so all columns of one pid form a contiguous run of
    ``sorted_pids``. ``junk``: the protocol's rule (``metrics.junk_mask``), for (query, item) pairs.
    """

    pids: np.ndarray
    cams: np.ndarray
    by_pid: np.ndarray
    sorted_pids: np.ndarray
    junk: Callable

    @classmethod
    def build(cls, pids: np.ndarray, cams: np.ndarray, junk: Callable) -> _GalleryIndex:
        by_pid = np.argsort(pids, kind="stable")
        return cls(pids=pids, cams=cams, by_pid=by_pid, sorted_pids=pids[by_pid], junk=junk)

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


class _FromRow(NamedTuple):
    """A key source seen from query row ``first`` on: what the work on a chunk of the queries asks for."""

    source: _KeySource
    first: int

    def exact(self, queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
        return self.source.exact(self.first + queries, columns)

    def nearly(self, queries: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.source.nearly(self.first + queries, columns)


def _block_results(
    keys: np.ndarray,
    tolerance: np.ndarray,
    query_pids: np.ndarray,
    query_cams: np.ndarray,
    gallery: _GalleryIndex,
    ap: str,
    source: _KeySource,
    pool: ThreadPoolExecutor,
    threads: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate one block of queries from its (block, G) float32 keys (``source`` counts rows from the block's).

    The passes over the keys, and then the near-ties, are shared out among ``pool``'s ``threads`` (numpy lets go
    of the GIL in its heavy loops). Returns ``(evaluated, ap_values, first_hit)``: a bool per query, and for the
    evaluated queries their AP and the 0-based rank of their first true match.
    """
    # Same-pid pairs are few (tens per query), so they are split into junk and true matches as lists.
    rows, cols = gallery.same_pid_pairs(query_pids)
    junk = gallery.junk(query_pids[rows], query_cams[rows], gallery.pids[cols], gallery.cams[cols])
    junk_rows, junk_cols = rows[junk], cols[junk]
    rows, cols = rows[~junk], cols[~junk]

    width = keys.shape[1]
    step = max(1, min(_PAIRS_PER_PASS // max(width, 1), _BINS_PER_PASS // _bins_per_row(width)))
    firsts = range(0, len(keys), step)

    def one_pass(first: int) -> tuple[np.ndarray, ...]:
        last = min(first + step, len(keys))
        lo, hi = np.searchsorted(rows, [first, last])
        junk_lo, junk_hi = np.searchsorted(junk_rows, [first, last])
        ranks, match, item_cols, item_keys = _ranks_in_pass(
            keys[first:last],
            rows[lo:hi] - first,
            cols[lo:hi],
            (junk_rows[junk_lo:junk_hi] - first, junk_cols[junk_lo:junk_hi]),
            tolerance[first:last],
        )
        return ranks, lo + match, item_cols, item_keys

    parts = list(pool.map(one_pass, firsts))
    ranks = np.concatenate([part[0] for part in parts]) if parts else np.zeros(0, dtype=np.int64)
    match, item_cols, item_keys = (np.concatenate([part[k] for part in parts]) for k in (1, 2, 3))
    # the near-ties in a few parts of whole matches (they come in match order), one a thread
    cuts = np.searchsorted(match, np.linspace(0, len(rows), threads + 1).astype(np.int64)[1:-1])
    pieces = [(m, c, k) for m, c, k in zip(*(np.split(a, cuts) for a in (match, item_cols, item_keys)), strict=True)]
    for extra in pool.map(lambda piece: _near_tie_ranks(piece, rows, cols, tolerance, source), pieces):
        ranks += extra

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


def rank_blocks(
    source: _KeySource,
    query_pids: np.ndarray,
    query_cams: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_cams: np.ndarray,
    num_gallery: int,
    ap: str,
    max_rank: int,
    chunk_size: int | None,
    junk: Callable,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared driver of ``evaluate`` and ``evaluate_from_distance``: one float32 key block per chunk of queries.

    Returns the CMC counts (cumulative, over ranks), the AP of each evaluated query and which queries were
    evaluated. ``junk(query_pids, query_cams, gallery_pids, gallery_cams)`` is the protocol's ``junk_mask``.

    ``gallery_pids`` / ``gallery_cams`` label the kept columns; ``num_gallery`` is the full gallery size,
    which caps the length of the CMC curve. BLAS computes the keys of a chunk on every core, then a few threads
    rank it, one after the other: ranking beside the product instead would slow BLAS's threads unevenly (they
    split the work in fixed shares), and the quick ones spin waiting for the slow. One key buffer, reused; the
    result does not depend on the chunking.
    """
    length = min(int(max_rank), num_gallery)
    width = len(gallery_pids)
    num_queries = len(query_pids)
    gallery = _GalleryIndex.build(gallery_pids, gallery_cams, junk)
    rows_per_chunk = int(chunk_size) if chunk_size is not None else _default_chunk_rows(num_queries, width)
    # the packed sort keys (int64) hold the row in the bits left over by 32 key bits and the column
    rows_per_chunk = max(1, min(rows_per_chunk, num_queries, 1 << (31 - max(1, (width - 1).bit_length()))))
    buffer = np.empty((min(rows_per_chunk, num_queries), width), dtype=np.float32)  # reused: fresh pages are dear
    threads = _ranking_threads()
    results = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, num_queries, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_queries)
            keys = buffer[: stop - start]
            tolerance = source.block(start, stop, keys)
            chunk = (query_pids[start:stop], query_cams[start:stop], gallery, ap, _FromRow(source, start))
            results.append(_block_results(keys, tolerance, *chunk, pool, threads))

    cmc_counts = np.zeros(length, dtype=np.float64)
    for _, _, first_hit in results:
        cmc_counts += np.bincount(first_hit[first_hit < length], minlength=length)
    cmc_counts = np.cumsum(cmc_counts)  # first hit at rank r counts for every k >= r
    evaluated = np.concatenate([part[0] for part in results]) if results else np.zeros(0, dtype=bool)
    ap_values = np.concatenate([part[1] for part in results]) if results else np.zeros(0)
    return cmc_counts, ap_values, evaluated


def _ranking_threads() -> int:
    """Threads that rank a chunk: one a core this process may use, at most ``_MAX_RANKING_THREADS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_RANKING_THREADS))


def _default_chunk_rows(num_queries: int, width: int) -> int:
    """Queries per chunk when none is asked for: all of them, up to ``PAIRS_PER_CHUNK`` pairs."""
    return max(1, min(num_queries, PAIRS_PER_CHUNK // max(width, 1)))
