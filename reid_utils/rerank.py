"""k-reciprocal re-ranking, written from the paper.

Zhong, Zheng, Cao and Li, "Re-ranking Person Re-identification with k-reciprocal Encoding", CVPR 2017
(defaults k1 = 20, k2 = 6, lambda = 0.3, as in the paper).

The idea: a true match of a query usually has the query among *its* nearest neighbours too, while a
look-alike stranger often does not. So each image p is described by its k-reciprocal neighbours
``R(p, k1) = {g in N(p, k1) : p in N(g, k1)}``, grown by the ``R(q, k1/2)`` of each member q that mostly
lies inside ``R(p, k1)`` (more than 2/3 of it), giving ``R*(p)``. That set becomes a vector ``V_p`` with
Gaussian-kernel weights ``exp(-d(p, g))`` on ``R*(p)`` (zero elsewhere), normalised to sum to 1; ``V_p``
is then averaged with the vectors of p's ``k2`` nearest neighbours (local query expansion). Two images
are compared by the Jaccard distance of their vectors, and the final distance blends it with the
original one: ``d* = (1 - lambda) * d_J + lambda * d``.

Everything is computed over the pool of queries *and* gallery images together (N = Q + G), as the
public implementations do. ``N(p, k)`` is the first ``k + 1`` entries of p's ranking, because p itself
(distance 0) comes first; equal distances rank by index.

Memory: the method only needs each item's nearest neighbours, the distances inside the small sets R*(p)
and the (Q, G) result, so the (N, N) pool distances are only ever looked at a block of rows at a time.
``rerank_features`` computes those blocks from the features and never holds the whole matrix (about
0.6 GB at Market-1501 size instead of 2.6 GB); ``k_reciprocal_rerank`` is given the matrix by its caller.

Difference from popular code: some implementations square the distances and divide each row by its
maximum before re-ranking; we use the distances exactly as given, as the paper writes the formulas, so
``lambda_value=1`` returns the original distances unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
DEFAULT_MAX_MEMORY_BYTES = 4 * 1024**3

# Blocks of pool distances hold about this many elements (64 MB of float32) ...
_WORK_ELEMENTS = 1 << 24
# ... and the sparse steps work on slices of about this many entries (8 MB per int64 or float64 array).
_SPARSE_ENTRIES = _WORK_ELEMENTS // 16


def _memory_parts(num_query: int, num_gallery: int, k1: int, k2: int, feature_dim: int | None) -> dict[str, int]:
    """What re-ranking holds at its peak, in bytes, by part (calibrated on ``benchmarks/bench_rerank.py``)."""
    n = num_query + num_gallery
    parts = {
        "result": 4 * num_query * num_gallery,  # the (Q, G) float32 output, written from the first pass on
        "working set": 16 * min(n * n, _WORK_ELEMENTS),  # blocks of distances; slices of the sparse steps
        "neighbour vectors": 16 * n * max(k2, 1) * (k1 + 1),  # R*(p) after query expansion, and their keys
    }
    if feature_dim is None:  # the caller's three matrices: the (N, N) pool matrix less its copy of q_g.T
        parts["distance matrices"] = 4 * (num_query**2 + num_gallery**2 + num_query * num_gallery)
    else:  # float32 unit features, plus the copies that make them
        parts["features"] = 8 * n * feature_dim
    return parts


def rerank_memory_bytes(
    num_query: int, num_gallery: int, k1: int = 20, k2: int = 6, *, feature_dim: int | None = None
) -> int:
    """Rough peak memory of re-ranking, in bytes, for ``check_rerank_memory`` to refuse hopeless sizes.

    From features (``feature_dim`` given: ``rerank_features``) the pool's distances are made a block at a
    time, so the peak is the (Q, G) float32 result, the features and a bounded working set: about 0.7 GB
    for Market-1501 (3,368 + 19,732 images, 512-d; measured 0.54 GB). From distance matrices
    (``feature_dim=None``: ``k_reciprocal_rerank``) the three float32 matrices come on top -- O((Q + G)^2),
    1.9 GB for Market-1501 -- whether they are the caller's arrays or our float32 copies of them.
    """
    return sum(_memory_parts(num_query, num_gallery, k1, k2, feature_dim).values())


def _largest_query_count(num_gallery: int, max_memory_bytes: int, k1: int, k2: int, feature_dim: int | None) -> int:
    """How many queries fit under the limit against this gallery (the estimate grows with them)."""
    low, high = 0, max(1, 2 * max_memory_bytes // (4 * max(num_gallery, 1)))
    while low < high:
        middle = (low + high + 1) // 2
        if rerank_memory_bytes(middle, num_gallery, k1, k2, feature_dim=feature_dim) <= max_memory_bytes:
            low = middle
        else:
            high = middle - 1
    return low


def check_rerank_memory(
    num_query: int,
    num_gallery: int,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    k1: int = 20,
    k2: int = 6,
    *,
    feature_dim: int | None = None,
) -> None:
    """Raise ``MemoryError`` *before* allocating anything if re-ranking would need too much memory.

    ``feature_dim=None`` checks ``k_reciprocal_rerank`` (distance matrices in), an int checks
    ``rerank_features`` (features in); see ``rerank_memory_bytes``. The message names the limit, the
    parts of the estimate, how many queries would fit, and what to change.
    """
    parts = _memory_parts(num_query, num_gallery, k1, k2, feature_dim)
    need = sum(parts.values())
    if need <= max_memory_bytes:
        return
    gib = 2**30
    source = "distance matrices" if feature_dim is None else f"{feature_dim}-d features"
    breakdown = ", ".join(f"{name} {size / gib:.2f}" for name, size in sorted(parts.items(), key=lambda p: -p[1]))
    message = (
        f"re-ranking {num_query:,} queries against {num_gallery:,} gallery images from {source} needs about "
        f"{need / gib:.1f} GiB ({breakdown} GiB; the result is {num_query:,} x {num_gallery:,} float32), "
        f"more than max_memory_bytes = {max_memory_bytes / gib:.1f} GiB. "
    )
    fits = _largest_query_count(num_gallery, max_memory_bytes, k1, k2, feature_dim)
    if fits > 0:
        message += f"With this gallery at most {fits:,} queries fit under the limit. "
    else:
        message += "Not even one query fits under the limit with this gallery. "
    if feature_dim is None:
        from_features = rerank_memory_bytes(num_query, num_gallery, k1, k2, feature_dim=512)
        message += (
            "If these are squared distances of L2-normalised features, rerank_features(query_features, "
            "gallery_features) gives the same re-ranking without the matrices (about "
            f"{from_features / gib:.1f} GiB with 512-d features). "
        )
    message += (
        "Raise max_memory_bytes if the machine has the memory, or re-rank a smaller set (each set is then "
        "re-ranked within its own pool of queries and gallery, so its distances differ a little)."
    )
    raise MemoryError(message)


def _as_float32(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(x, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _check_distances(square: np.ndarray, name: str) -> None:
    """Refuse similarities passed as distances: re-ranking them returns a normal-looking, wrong matrix.

    Every item is nearest to itself, so a distance matrix's diagonal is the smallest value of its row; in
    a similarity matrix it is the largest.
    """
    if len(square) < 2:
        return
    tolerance = 1e-4 * max(float(np.abs(square).max()), 1e-12)  # float32 rounding of a computed zero
    if np.any(np.diagonal(square) > square.min(axis=1) + tolerance):
        raise ValueError(
            f"{name} looks like similarities, not distances: an item against itself (the diagonal) is not the "
            f"smallest value of its row. Pass distances (smaller = closer), e.g. 2 - 2 * cosine similarity, or "
            f"call rerank_features with the features."
        )


# --------------------------------------------------------------------------------------------------
# Where the pool's distances come from
# --------------------------------------------------------------------------------------------------


def _blocks(n: int, step: int) -> Iterator[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of ``step`` rows; every pass over the pool uses these same ranges."""
    for start in range(0, n, step):
        yield start, min(start + step, n)


class _MatrixPool:
    """The pool's (N, N) distances [[q_q, q_g], [q_g.T, g_g]] held as the caller's three blocks."""

    def __init__(self, q_q: np.ndarray, q_g: np.ndarray, g_g: np.ndarray) -> None:
        self.q_q, self.q_g, self.g_g = q_q, q_g, g_g
        self.num_query, self.n = len(q_q), len(q_q) + len(g_g)
        self.step = max(1, _WORK_ELEMENTS // self.n)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the pool matrix, assembled on demand (a new array)."""
        num_query = self.num_query
        out = np.empty((stop - start, self.n), dtype=np.float32)
        if start < num_query:
            a, b = start, min(stop, num_query)
            out[: b - a, :num_query], out[: b - a, num_query:] = self.q_q[a:b], self.q_g[a:b]
        if stop > num_query:
            a, b = max(start, num_query) - num_query, stop - num_query
            out[stop - start - (b - a) :, :num_query] = self.q_g[:, a:b].T
            out[stop - start - (b - a) :, num_query:] = self.g_g[a:b]
        return out

    def pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Distances d(rows[i], cols[i]) looked up in whichever block holds them."""
        num_query = self.num_query
        out = np.empty(len(rows), dtype=np.float64)
        row_q, col_q = rows < num_query, cols < num_query
        for mask, block, r, c in (
            (row_q & col_q, self.q_q, rows, cols),
            (row_q & ~col_q, self.q_g, rows, cols - num_query),
            (~row_q & col_q, self.q_g, cols, rows - num_query),  # q_g.T
            (~row_q & ~col_q, self.g_g, rows - num_query, cols - num_query),
        ):
            out[mask] = block[r[mask], c[mask]]
        return out


def _squared_from_dot(dot: np.ndarray) -> np.ndarray:
    """``||a - b||^2 = 2 - 2 a.b`` for unit a, b, in place, clipped at 0 (rounding can dip just below)."""
    dot *= -2.0  # the same float32 operations, in the same order, wherever a distance is needed
    dot += 2.0
    return np.maximum(dot, 0.0, out=dot)


class _FeaturePool:
    """The pool's squared Euclidean distances of unit features, computed a block of rows at a time.

    The (N, N) matrix never exists. A later pass recomputes the blocks with the same matrix product on the
    same row ranges (``_blocks``), so a distance read then is bit for bit the one the neighbour search saw.
    """

    def __init__(self, features: np.ndarray, num_query: int) -> None:
        self.features, self.num_query, self.n = features, num_query, len(features)
        self.step = max(1, _WORK_ELEMENTS // self.n)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the pool's distances (a new array), zero on the diagonal."""
        d = _squared_from_dot(self.features[start:stop] @ self.features.T)
        local = np.arange(stop - start)
        d[local, local + start] = 0.0
        return d

    def pairs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Distances d(rows[i], cols[i]) for ``rows`` sorted ascending: one more pass of matrix products.

        That costs a second product of the pool with itself but gives exactly the values the neighbour
        search ranked by (a dot product per pair would round differently); only the entries needed are
        turned into distances.
        """
        out = np.empty(len(rows), dtype=np.float64)
        for start, stop in _blocks(self.n, self.step):
            low, high = np.searchsorted(rows, [start, stop])
            if low < high:
                r, c = rows[low:high], cols[low:high]
                dot = (self.features[start:stop] @ self.features.T)[r - start, c]
                out[low:high] = np.where(r == c, 0.0, _squared_from_dot(dot))
        return out


_DistanceSource = _MatrixPool | _FeaturePool


# --------------------------------------------------------------------------------------------------
# Steps of the method
# --------------------------------------------------------------------------------------------------


def _smallest_in_rows(block: np.ndarray, count: int) -> np.ndarray:
    """(b, count) column indices of each row's ``count`` smallest values, in index order.

    ``torch.topk`` takes the ``count + 1`` smallest (several times faster than ``np.argpartition``). When
    the last of them is strictly larger than the others, the first ``count`` are the answer whatever the
    order of equal values; otherwise the row has ties at the cut-off, and the lowest indices among the
    tied entries get the remaining places, so those ties are settled by index like every other tie.
    """
    num_rows, n = block.shape
    if count >= n:
        return np.broadcast_to(np.arange(n), (num_rows, n)).copy()
    values, indices = torch.topk(torch.from_numpy(block), count + 1, dim=1, largest=False, sorted=True)
    values, indices = values.numpy(), indices.numpy()
    candidates = np.sort(indices[:, :count], axis=1)
    for row in np.flatnonzero(values[:, count] == values[:, count - 1]):  # rare: needs exactly equal floats
        cut = values[row, count - 1]
        below = np.flatnonzero(block[row] < cut)
        at_cut = np.flatnonzero(block[row] == cut)[: count - len(below)]
        candidates[row] = np.sort(np.concatenate([below, at_cut]))
    return candidates


def _first_pass(pool: _DistanceSource, count: int, lambda_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Each pool item's ``count`` nearest items (closest first, ties by index), and ``lambda * q_g``.

    The (Q, G) part of the result is written while its rows go by, so no pass is needed for it later.
    """
    neighbours = np.empty((pool.n, count), dtype=np.int64)
    final = np.empty((pool.num_query, pool.n - pool.num_query), dtype=np.float32)
    for start, stop in _blocks(pool.n, pool.step):
        block = pool.rows(start, stop)
        candidates = _smallest_in_rows(block, count)  # in index order, so the stable sort breaks ties by it
        order = np.argsort(np.take_along_axis(block, candidates, axis=1), axis=1, kind="stable")
        neighbours[start:stop] = np.take_along_axis(candidates, order, axis=1)
        if start < pool.num_query:
            query_rows = min(stop, pool.num_query) - start
            np.multiply(block[:query_rows, pool.num_query :], lambda_value, out=final[start : start + query_rows])
    return neighbours, final


def _reciprocal_mask(neighbours: np.ndarray) -> np.ndarray:
    """``mask[p, m]``: is p also among the neighbours of its m-th neighbour? True marks R(p, k)."""
    n, k = neighbours.shape
    mask = np.empty((n, k), dtype=bool)
    step = max(1, _SPARSE_ENTRIES // (k * k))
    for start in range(0, n, step):
        near = neighbours[start : start + step]
        own = np.arange(start, start + len(near))[:, None, None]
        mask[start : start + step] = (neighbours[near] == own).any(axis=2)
    return mask


def _expanded_sets(
    near: np.ndarray, near_mask: np.ndarray, half: np.ndarray, half_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """R*(p) for every pool item p, as sorted (row, column) pairs.

    R*(p) = R(p, k1) united with R(q, k1/2) for each q in R(p, k1) whose R(q, k1/2) has more than 2/3 of
    its members inside R(p, k1): that adds true matches that the strict reciprocal test missed, while a
    candidate whose own neighbourhood mostly lies elsewhere is left out.
    """
    n, k_near = near.shape
    k_half = half.shape[1]
    rows, cols = [], []
    step = max(1, _WORK_ELEMENTS // (k_near * k_half * k_near))
    for start in range(0, n, step):
        block, block_mask = near[start : start + step], near_mask[start : start + step]
        cand_sets, cand_masks = half[block], half_mask[block]  # (b, k_near, k_half): R(q, k1/2) of each q
        members = block[:, None, None, :]
        inside = ((cand_sets[..., None] == members) & block_mask[:, None, None, :]).any(axis=3)
        shared = (inside & cand_masks).sum(axis=2)
        accepted = block_mask & (3 * shared > 2 * cand_masks.sum(axis=2))

        r, m = np.nonzero(block_mask)  # R(p, k1) itself
        rows.append(r + start)
        cols.append(block[r, m])
        r, m, h = np.nonzero(accepted[:, :, None] & cand_masks)  # members of accepted R(q, k1/2)
        rows.append(r + start)
        cols.append(cand_sets[r, m, h])
    pairs = np.unique(np.concatenate(rows) * n + np.concatenate(cols))  # drop repeats, sort by row
    return pairs // n, pairs % n


def _segments(indptr: np.ndarray, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand CSR segments: for each requested segment, every position inside it.

    Returns ``(owner, position)``: ``owner[j]`` is the index into ``segment_ids`` that position j came from.
    """
    starts, lengths = indptr[segment_ids], indptr[segment_ids + 1] - indptr[segment_ids]
    owner = np.repeat(np.arange(len(segment_ids)), lengths)
    first = np.cumsum(lengths) - lengths
    return owner, starts[owner] + np.arange(len(owner)) - first[owner]


def _indptr(rows: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])


def _kernel_vectors(rows: np.ndarray, dist: np.ndarray, n: int) -> np.ndarray:
    """Weights exp(-d) normalised to sum 1 per row (what makes the min-sum Jaccard trick work).

    The row's smallest distance is subtracted first; it cancels in the normalisation and keeps exp()
    from underflowing to 0 when distances are large.
    """
    row_min = np.full(n, np.inf)
    np.minimum.at(row_min, rows, dist)
    weights = np.exp(-(dist - row_min[rows]))
    return weights / np.bincount(rows, weights=weights, minlength=n)[rows]


def _query_expansion(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, neighbours: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local query expansion: V_p becomes the mean of V_q over p's k2 nearest neighbours q (p included)."""
    n, k2 = neighbours.shape
    indptr = _indptr(rows, n)
    gathered = np.diff(indptr)[neighbours].sum(axis=1)  # entries each pool item collects
    step = max(1, _SPARSE_ENTRIES // max(1, int(gathered.max())))
    keys, summed = [], []
    for start, stop in _blocks(n, step):  # whole rows per slice: the same sums, in the same order
        owner, position = _segments(indptr, neighbours[start:stop].ravel())
        new_rows = start + owner // k2  # the slice lists k2 entries per pool item
        slice_keys, inverse = np.unique(new_rows * n + cols[position], return_inverse=True)
        keys.append(slice_keys)
        summed.append(np.bincount(inverse, weights=vals[position]) / k2)
    all_keys = np.concatenate(keys)
    return all_keys // n, all_keys % n, np.concatenate(summed)


def _add_jaccard_distance(
    final: np.ndarray, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, weight: float
) -> None:
    """Add ``weight`` times the (Q, G) Jaccard distance of query and gallery vectors to ``final``, in place.

    The Jaccard distance is 1 - sum(min) / sum(max). Rows sum to 1, so sum(max) = 2 - sum(min) and only
    the overlap is needed: for every column j, the query entries at j meet the gallery entries at j (an
    inverted index over the sparse vectors). Slices of query rows keep the temporaries small; no second
    (Q, G) array is made.
    """
    num_query, num_gallery = final.shape
    n = num_query + num_gallery
    is_gallery = rows >= num_query
    g_rows, g_cols, g_vals = rows[is_gallery] - num_query, cols[is_gallery], vals[is_gallery]
    by_column = np.argsort(g_cols, kind="stable")
    g_rows, g_vals = g_rows[by_column], g_vals[by_column]
    column_ptr = _indptr(g_cols, n)

    q_rows, q_cols, q_vals = rows[~is_gallery], cols[~is_gallery], vals[~is_gallery]
    query_ptr = _indptr(q_rows, num_query)
    pairs_per_query = np.bincount(q_rows, weights=np.diff(column_ptr)[q_cols], minlength=num_query)
    most_pairs = max(1, int(pairs_per_query.max(initial=0)))
    step = max(1, min(_WORK_ELEMENTS // (4 * num_gallery), _SPARSE_ENTRIES // most_pairs))

    for start, stop in _blocks(num_query, step):
        entries = slice(query_ptr[start], query_ptr[stop])
        owner, position = _segments(column_ptr, q_cols[entries])
        overlap = np.minimum(q_vals[entries][owner], g_vals[position])
        target = (q_rows[entries][owner] - start) * num_gallery + g_rows[position]
        shared = np.bincount(target, weights=overlap, minlength=(stop - start) * num_gallery)
        shared = shared.reshape(stop - start, num_gallery)
        ratio = 2.0 - shared  # 1 - shared / (2 - shared), with one temporary
        np.divide(shared, ratio, out=ratio)
        jaccard = np.subtract(1.0, ratio, out=ratio).astype(np.float32)
        np.clip(jaccard, 0.0, 1.0, out=jaccard)
        jaccard *= weight
        final[start:stop] += jaccard


def _check_options(k1: int, k2: int, lambda_value: float) -> None:
    if int(k1) < 1 or int(k2) < 1:
        raise ValueError(f"k1 and k2 must be at least 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")


def _rerank(pool: _DistanceSource, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """The method over a pool whose distances come from ``pool``; both public functions end here."""
    n, lambda_value = pool.n, float(lambda_value)
    k1 = min(int(k1), n - 1)
    k_half = min(int(round(k1 / 2)), n - 1)
    k2 = min(int(k2), n)
    neighbours, final = _first_pass(pool, max(k1 + 1, k2), lambda_value)

    near, half = neighbours[:, : k1 + 1], neighbours[:, : k_half + 1]
    rows, cols = _expanded_sets(near, _reciprocal_mask(near), half, _reciprocal_mask(half))
    vals = _kernel_vectors(rows, pool.pairs(rows, cols), n)
    if k2 > 1:
        rows, cols, vals = _query_expansion(rows, cols, vals, neighbours[:, :k2])

    _add_jaccard_distance(final, rows, cols, vals, 1.0 - lambda_value)
    return final


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def k_reciprocal_rerank(
    q_g_dist: ArrayLike,
    q_q_dist: ArrayLike,
    g_g_dist: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> np.ndarray:
    """Re-ranked (Q, G) distance matrix, Zhong et al. CVPR 2017 (see the module docstring for the steps).

    Takes the query-gallery, query-query and gallery-gallery distances (smaller = closer, zero on the
    diagonals) and returns ``(1 - lambda_value) * jaccard + lambda_value * q_g_dist`` as float32. Feed it
    to ``reid_utils.metrics.evaluate_from_distance``.

    Memory is O((Q + G)^2): the three blocks together are the pool's full distance matrix (float32 inputs
    avoid a converted copy). ``MemoryError`` is raised before any work if ``rerank_memory_bytes`` exceeds
    ``max_memory_bytes`` (default 4 GiB; Market-1501 needs about 2.5 GB this way). For squared distances of
    L2-normalised features, ``rerank_features`` gives the same result from the features, without the matrices.
    """
    q_g_shape, q_q_shape, g_g_shape = np.shape(q_g_dist), np.shape(q_q_dist), np.shape(g_g_dist)
    if len(q_g_shape) != 2:
        raise ValueError(f"q_g_dist must be 2-D (num_query, num_gallery), got shape {q_g_shape}")
    num_query, num_gallery = q_g_shape
    if tuple(q_q_shape) != (num_query, num_query):
        raise ValueError(f"q_q_dist must have shape {(num_query, num_query)}, got {q_q_shape}")
    if tuple(g_g_shape) != (num_gallery, num_gallery):
        raise ValueError(f"g_g_dist must have shape {(num_gallery, num_gallery)}, got {g_g_shape}")
    _check_options(k1, k2, lambda_value)
    check_rerank_memory(num_query, num_gallery, max_memory_bytes, k1, k2)

    q_g = _as_float32(q_g_dist, "q_g_dist")
    q_q = _as_float32(q_q_dist, "q_q_dist")
    g_g = _as_float32(g_g_dist, "g_g_dist")
    _check_distances(q_q, "q_q_dist")
    _check_distances(g_g, "g_g_dist")
    if num_query == 0 or num_gallery == 0:
        return q_g.copy()
    return _rerank(_MatrixPool(q_q, q_g, g_g), k1, k2, lambda_value)


def rerank_features(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
) -> np.ndarray:
    """Re-ranked (Q, G) distances straight from features.

    The features are L2-normalised here, and the distance is the squared Euclidean distance between
    them, ``||a - b||^2 = 2 - 2 cos(a, b)`` (in [0, 4]; the same ordering as cosine similarity).

    The pool's (N, N) distances are computed a block of rows at a time and never held whole, so memory
    is the (Q, G) result plus a bounded working set: about 0.6 GB at Market-1501 size (512-d), where the
    whole matrix alone would be 2.1 GB. A pool small enough to be one block (N^2 <= 2^24, N <= 4,096)
    is computed as one piece, as before. ``MemoryError`` (see ``check_rerank_memory``) is raised before
    any work if the estimate exceeds ``max_memory_bytes``.
    """
    q_shape, g_shape = np.shape(query_features), np.shape(gallery_features)
    if len(q_shape) != 2 or len(g_shape) != 2 or q_shape[1] != g_shape[1]:
        raise ValueError(f"features must be 2-D with the same feature size, got {q_shape} and {g_shape}")
    _check_options(k1, k2, lambda_value)
    num_query, num_gallery = q_shape[0], g_shape[0]
    check_rerank_memory(num_query, num_gallery, max_memory_bytes, k1, k2, feature_dim=q_shape[1])

    def unit(x: ArrayLike, name: str) -> np.ndarray:
        x = _as_float32(x, name)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    qf, gf = unit(query_features, "query_features"), unit(gallery_features, "gallery_features")
    n = num_query + num_gallery
    if num_query == 0 or num_gallery == 0:
        return np.zeros((num_query, num_gallery), dtype=np.float32)
    if n * n > _WORK_ELEMENTS:
        features = np.concatenate([qf, gf])
        del qf, gf
        return _rerank(_FeaturePool(features, num_query), k1, k2, lambda_value)

    # One block would hold the whole pool anyway: the three products as before, so that small sets keep
    # exactly their earlier results (a BLAS may round a product of another shape differently).
    q_q, g_g = _squared_from_dot(qf @ qf.T), _squared_from_dot(gf @ gf.T)
    np.fill_diagonal(q_q, 0.0)
    np.fill_diagonal(g_g, 0.0)
    return _rerank(_MatrixPool(q_q, _squared_from_dot(qf @ gf.T), g_g), k1, k2, lambda_value)
