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
(distance 0) comes first.

Difference from popular code: some implementations square the distances and divide each row by its
maximum before re-ranking; we use the distances exactly as given, as the paper writes the formulas, so
``lambda_value=1`` returns the original distances unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
DEFAULT_MAX_MEMORY_BYTES = 4 * 1024**3

# Temporary arrays are built in slices of about this many elements (64 MB of float32).
_WORK_ELEMENTS = 1 << 24


def rerank_memory_bytes(num_query: int, num_gallery: int, k1: int = 20, k2: int = 6) -> int:
    """Rough peak memory of re-ranking, in bytes.

    Dominated by the pairwise distances of the whole pool in float32, ``4 * (Q + G)**2`` -- O((Q+G)^2),
    about 2.1 GB for Market-1501 (3,368 + 19,732 images) -- plus the Q x G Jaccard and result matrices and
    the sparse neighbour vectors.
    """
    n = num_query + num_gallery
    sparse = 24 * n * max(k2, 1) * (k1 + 1)
    return 4 * n * n + 8 * num_query * num_gallery + sparse


def check_rerank_memory(
    num_query: int,
    num_gallery: int,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    k1: int = 20,
    k2: int = 6,
) -> None:
    """Raise ``MemoryError`` *before* allocating anything if re-ranking would need too much memory."""
    need = rerank_memory_bytes(num_query, num_gallery, k1, k2)
    if need > max_memory_bytes:
        n = num_query + num_gallery
        raise MemoryError(
            f"re-ranking {num_query:,} queries against {num_gallery:,} gallery images needs about "
            f"{need / 2**30:.1f} GiB (the {n:,} x {n:,} pairwise distances in float32 dominate), more than "
            f"max_memory_bytes = {max_memory_bytes / 2**30:.1f} GiB. Re-rank fewer images or raise the limit."
        )


def _as_float32(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(x, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


# --------------------------------------------------------------------------------------------------
# Steps of the method
# --------------------------------------------------------------------------------------------------


def _pool_rows(q_q: np.ndarray, q_g: np.ndarray, g_g: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the (N, N) pool distance matrix [[q_q, q_g], [q_g.T, g_g]], built on demand."""
    num_query = len(q_q)
    parts = []
    if start < num_query:
        a, b = start, min(stop, num_query)
        parts.append(np.hstack([q_q[a:b], q_g[a:b]]))
    if stop > num_query:
        a, b = max(start, num_query) - num_query, stop - num_query
        parts.append(np.hstack([q_g[:, a:b].T, g_g[a:b]]))
    return np.vstack(parts)


def _pair_distances(
    q_q: np.ndarray, q_g: np.ndarray, g_g: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Pool distances d(rows[i], cols[i]) looked up in whichever block holds them."""
    num_query = len(q_q)
    out = np.empty(len(rows), dtype=np.float64)
    row_q, col_q = rows < num_query, cols < num_query
    for mask, block, r, c in (
        (row_q & col_q, q_q, rows, cols),
        (row_q & ~col_q, q_g, rows, cols - num_query),
        (~row_q & col_q, q_g, cols, rows - num_query),  # q_g.T
        (~row_q & ~col_q, g_g, rows - num_query, cols - num_query),
    ):
        out[mask] = block[r[mask], c[mask]]
    return out


def _nearest_neighbours(q_q: np.ndarray, q_g: np.ndarray, g_g: np.ndarray, count: int) -> np.ndarray:
    """(N, count) indices of each pool item's nearest items, closest first, ties by index.

    ``argpartition`` finds the ``count`` smallest without sorting whole rows; only they get sorted. (Which
    of several items tied exactly at the cut-off distance gets in is up to ``argpartition``.)
    """
    n = len(q_q) + len(g_g)
    out = np.empty((n, count), dtype=np.int64)
    step = max(1, _WORK_ELEMENTS // n)
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = _pool_rows(q_q, q_g, g_g, start, stop)
        if count < n:
            candidates = np.argpartition(block, count - 1, axis=1)[:, :count]
        else:
            candidates = np.broadcast_to(np.arange(n), block.shape).copy()
        candidates.sort(axis=1)  # index order first, so the stable sort below breaks ties by index
        order = np.argsort(np.take_along_axis(block, candidates, axis=1), axis=1, kind="stable")
        out[start:stop] = np.take_along_axis(candidates, order, axis=1)
    return out


def _reciprocal_mask(neighbours: np.ndarray) -> np.ndarray:
    """``mask[p, m]``: is p also among the neighbours of its m-th neighbour? True marks R(p, k)."""
    n, k = neighbours.shape
    mask = np.empty((n, k), dtype=bool)
    step = max(1, _WORK_ELEMENTS // (k * k))
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
    owner, position = _segments(_indptr(rows, n), neighbours.ravel())
    new_rows = owner // k2  # neighbours.ravel() lists k2 entries per pool item
    keys, inverse = np.unique(new_rows * n + cols[position], return_inverse=True)
    summed = np.bincount(inverse, weights=vals[position]) / k2
    return keys // n, keys % n, summed


def _jaccard_distance(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, num_query: int, num_gallery: int
) -> np.ndarray:
    """(Q, G) Jaccard distance between query and gallery vectors, 1 - sum(min) / sum(max).

    Rows sum to 1, so sum(max) = 2 - sum(min) and only the overlap is needed: for every column j, the
    query entries at j meet the gallery entries at j (an inverted index over the sparse vectors).
    """
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
    step = max(1, min(_WORK_ELEMENTS // (4 * num_gallery), _WORK_ELEMENTS // most_pairs))

    out = np.empty((num_query, num_gallery), dtype=np.float32)
    for start in range(0, num_query, step):
        stop = min(start + step, num_query)
        entries = slice(query_ptr[start], query_ptr[stop])
        owner, position = _segments(column_ptr, q_cols[entries])
        overlap = np.minimum(q_vals[entries][owner], g_vals[position])
        target = (q_rows[entries][owner] - start) * num_gallery + g_rows[position]
        shared = np.bincount(target, weights=overlap, minlength=(stop - start) * num_gallery)
        shared = shared.reshape(stop - start, num_gallery)
        out[start:stop] = 1.0 - shared / (2.0 - shared)
    return np.clip(out, 0.0, 1.0, out=out)


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
    ``max_memory_bytes`` (default 4 GiB; Market-1501 needs about 2.7 GB).
    """
    q_g_shape, q_q_shape, g_g_shape = np.shape(q_g_dist), np.shape(q_q_dist), np.shape(g_g_dist)
    if len(q_g_shape) != 2:
        raise ValueError(f"q_g_dist must be 2-D (num_query, num_gallery), got shape {q_g_shape}")
    num_query, num_gallery = q_g_shape
    if tuple(q_q_shape) != (num_query, num_query):
        raise ValueError(f"q_q_dist must have shape {(num_query, num_query)}, got {q_q_shape}")
    if tuple(g_g_shape) != (num_gallery, num_gallery):
        raise ValueError(f"g_g_dist must have shape {(num_gallery, num_gallery)}, got {g_g_shape}")
    if int(k1) < 1 or int(k2) < 1:
        raise ValueError(f"k1 and k2 must be at least 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    check_rerank_memory(num_query, num_gallery, max_memory_bytes, k1, k2)

    q_g = _as_float32(q_g_dist, "q_g_dist")
    q_q = _as_float32(q_q_dist, "q_q_dist")
    g_g = _as_float32(g_g_dist, "g_g_dist")
    n = num_query + num_gallery
    if num_query == 0 or num_gallery == 0:
        return q_g.copy()

    k1 = min(int(k1), n - 1)
    k_half = min(int(round(k1 / 2)), n - 1)
    k2 = min(int(k2), n)
    neighbours = _nearest_neighbours(q_q, q_g, g_g, max(k1 + 1, k2))

    near, half = neighbours[:, : k1 + 1], neighbours[:, : k_half + 1]
    rows, cols = _expanded_sets(near, _reciprocal_mask(near), half, _reciprocal_mask(half))
    vals = _kernel_vectors(rows, _pair_distances(q_q, q_g, g_g, rows, cols), n)
    if k2 > 1:
        rows, cols, vals = _query_expansion(rows, cols, vals, neighbours[:, :k2])

    final = _jaccard_distance(rows, cols, vals, num_query, num_gallery)
    final *= 1.0 - lambda_value
    final += lambda_value * q_g
    return final


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
    """
    q_shape, g_shape = np.shape(query_features), np.shape(gallery_features)
    if len(q_shape) != 2 or len(g_shape) != 2 or q_shape[1] != g_shape[1]:
        raise ValueError(f"features must be 2-D with the same feature size, got {q_shape} and {g_shape}")
    check_rerank_memory(q_shape[0], g_shape[0], max_memory_bytes, k1, k2)

    def unit(x: ArrayLike, name: str) -> np.ndarray:
        x = _as_float32(x, name)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    qf, gf = unit(query_features, "query_features"), unit(gallery_features, "gallery_features")

    def squared_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = a @ b.T  # in place from here on: g_g alone is 1.6 GB on Market-1501
        d *= -2.0
        d += 2.0
        return np.maximum(d, 0.0, out=d)  # rounding can dip just below 0

    q_q, g_g = squared_distance(qf, qf), squared_distance(gf, gf)
    np.fill_diagonal(q_q, 0.0)
    np.fill_diagonal(g_g, 0.0)
    return k_reciprocal_rerank(
        squared_distance(qf, gf), q_q, g_g, k1, k2, lambda_value, max_memory_bytes=max_memory_bytes
    )
