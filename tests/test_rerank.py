"""Tests for reid_utils.rerank: a hand-worked case, a plain-loop reference, basic properties, blockwise
distances (same results, bounded memory), memory guard."""

import math
import re
import tracemalloc

import numpy as np
import pytest
import torch

import reid_utils.rerank as rerank_module
from reid_utils.metrics import evaluate_from_distance
from reid_utils.rerank import (
    check_rerank_memory,
    k_reciprocal_rerank,
    rerank_features,
    rerank_memory_bytes,
)


def blocks(points_query: np.ndarray, points_gallery: np.ndarray):
    """(q_g, q_q, g_g) Euclidean distances between points."""
    pool = np.concatenate([points_query, points_gallery]).astype(np.float64)
    dist = np.linalg.norm(pool[:, None] - pool[None], axis=-1)
    q = len(points_query)
    return dist[:q, q:], dist[:q, :q], dist[q:, q:]


def random_blocks(seed: int, num_query: int = 6, num_gallery: int = 30, dim: int = 8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_query + num_gallery, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return blocks(x[:num_query], x[num_query:])


def reference_rerank(q_g, q_q, g_g, k1, k2, lambda_value):
    """Zhong et al. step by step with plain loops and dense vectors (slow; for checking only)."""
    dist = np.block([[q_q, q_g], [q_g.T, g_g]])
    n, num_query = len(dist), len(q_q)
    ranking = np.argsort(dist, axis=1, kind="stable")

    def k_reciprocal(p, k):
        return {g for g in ranking[p, : k + 1] if p in ranking[g, : k + 1]}

    vectors = np.zeros((n, n))
    for p in range(n):
        r = k_reciprocal(p, k1)
        expanded = set(r)
        for q in r:
            r_half = k_reciprocal(q, round(k1 / 2))
            if len(r_half & r) > 2 / 3 * len(r_half):
                expanded |= r_half
        members = sorted(expanded)
        weights = np.exp(-dist[p, members])
        vectors[p, members] = weights / weights.sum()
    if k2 > 1:
        vectors = np.stack([vectors[ranking[p, :k2]].mean(axis=0) for p in range(n)])
    jaccard = np.empty(q_g.shape)
    for i in range(num_query):
        for j in range(q_g.shape[1]):
            a, b = vectors[i], vectors[num_query + j]
            jaccard[i, j] = 1 - np.minimum(a, b).sum() / np.maximum(a, b).sum()  # no min-sum shortcut
    return (1 - lambda_value) * jaccard + lambda_value * q_g


def test_hand_worked_case_lifts_the_true_match():
    # Points on a line. Query q at 0; gallery: true match t at 1.0, a look-alike d at -0.8 that sits in
    # a tight group with b1 (-1.05) and b2 (-1.15). Raw distances rank d (0.8) above t (1.0).
    # With k1 = 2 (N(p, 2) = p and its 2 nearest):
    #   N(q) = {q, d, t}   N(t) = {t, q, d}   N(d) = {d, b1, b2}   N(b1) = {b1, b2, d}   N(b2) = {b2, b1, d}
    #   R(q, 2) = {q, t}: t has q among its neighbours, d does not.     R(t, 2) = {t, q}
    #   k1/2 = 1: R(q, 1) = {q}, R(t, 1) = {t}, so the expansion adds nothing: R*(q) = {q, t}, R*(t) = {t, q}.
    #   R*(d) = {d, b1, b2}: no overlap with R*(q) -> Jaccard(q, d) = 1.
    #   V_q = (1, e^-1) / (1 + e^-1) on (q, t); V_t the same on (t, q).
    #   sum(min) = 2 e^-1 / (1 + e^-1) = 2 / (e + 1);  Jaccard(q, t) = 1 - m / (2 - m) = 1 - 1/e.
    # k2 = 1 (no query expansion), lambda = 0.3:
    #   d*(q, t) = 0.7 (1 - 1/e) + 0.3 * 1.0 = 0.7425...   d*(q, d) = 0.7 * 1 + 0.3 * 0.8 = 0.94
    q_g, q_q, g_g = blocks(np.array([[0.0]]), np.array([[1.0], [-0.8], [-1.05], [-1.15]]))
    assert np.argmin(q_g[0]) == 1  # before: the look-alike wins

    final = k_reciprocal_rerank(q_g, q_q, g_g, k1=2, k2=1, lambda_value=0.3)

    expected = [0.7 * (1 - 1 / math.e) + 0.3 * 1.0, 0.7 + 0.3 * 0.8, 0.7 + 0.3 * 1.05, 0.7 + 0.3 * 1.15]
    np.testing.assert_allclose(final[0], expected, rtol=1e-6)
    assert np.argmin(final[0]) == 0  # after: the true match is first


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("k1", "k2"), [(20, 6), (4, 3), (3, 1), (1, 1), (5, 9)])
def test_matches_plain_loop_reference(seed, k1, k2):
    q_g, q_q, g_g = random_blocks(seed)
    expected = reference_rerank(q_g, q_q, g_g, min(k1, 35), k2, 0.3)
    np.testing.assert_allclose(k_reciprocal_rerank(q_g, q_q, g_g, k1, k2, 0.3), expected, atol=1e-5)


def test_output_shape_type_and_range():
    q_g, q_q, g_g = random_blocks(0, num_query=5, num_gallery=17)
    final = k_reciprocal_rerank(q_g, q_q, g_g)
    assert final.shape == (5, 17) and final.dtype == np.float32
    assert np.isfinite(final).all() and (final >= 0).all()
    jaccard_part = (final - 0.3 * q_g) / 0.7
    assert (jaccard_part >= -1e-6).all() and (jaccard_part <= 1 + 1e-6).all()


def test_lambda_one_returns_the_original_distance():
    q_g, q_q, g_g = random_blocks(1)
    np.testing.assert_array_equal(k_reciprocal_rerank(q_g, q_q, g_g, lambda_value=1.0), q_g.astype(np.float32))


def test_large_distances_do_not_underflow():
    # exp(-d) of distances in the thousands is 0 in float64; the kernel must still give proper weights.
    q_g, q_q, g_g = random_blocks(2)
    final = k_reciprocal_rerank(1000 * q_g, 1000 * q_q, 1000 * g_g)
    assert np.isfinite(final).all()


def test_rerank_features_uses_squared_euclidean_of_unit_features():
    rng = np.random.default_rng(4)
    qf, gf = rng.standard_normal((4, 6)) * 3, rng.standard_normal((12, 6)) * 3  # not unit length
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)

    def squared(a, b):
        return ((a[:, None] - b[None]) ** 2).sum(-1)

    np.testing.assert_allclose(rerank_features(qf, gf, lambda_value=1.0), squared(qn, gn), atol=1e-5)
    np.testing.assert_allclose(
        rerank_features(torch.from_numpy(qf), torch.from_numpy(gf), k1=5, k2=2),
        k_reciprocal_rerank(squared(qn, gn), squared(qn, qn), squared(gn, gn), k1=5, k2=2),
        atol=1e-5,
    )


def test_reranking_helps_on_clustered_data():
    # Identities as tight-ish clusters with a few far-off images: re-ranking should not lose mAP here.
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(1, 9), 6)
    cams = np.tile(np.arange(1, 7), 8)
    centres = rng.standard_normal((9, 16))
    x = centres[ids] + 0.9 * rng.standard_normal((len(ids), 16))
    is_query = cams == 1
    qf, gf = x[is_query], x[~is_query]
    raw = rerank_features(qf, gf, k1=4, k2=2, lambda_value=1.0)
    reranked = rerank_features(qf, gf, k1=4, k2=2)
    args = (ids[is_query], cams[is_query], ids[~is_query], cams[~is_query])
    before, after = evaluate_from_distance(raw, *args), evaluate_from_distance(reranked, *args)
    assert after.mAP > before.mAP
    assert after.num_queries_evaluated == before.num_queries_evaluated  # re-ranking drops no query


def test_memory_limit_is_checked_before_allocating():
    # Broadcast views of a single float: enormous shapes, no memory behind them.
    q, g = 50_000, 200_000
    fake = np.broadcast_to(np.float32(0), (1, 1))
    with pytest.raises(MemoryError, match="max_memory_bytes"):
        k_reciprocal_rerank(np.broadcast_to(fake, (q, g)), np.broadcast_to(fake, (q, q)), np.broadcast_to(fake, (g, g)))
    with pytest.raises(MemoryError):
        rerank_features(np.broadcast_to(fake, (q, 512)), np.broadcast_to(fake, (g, 512)))
    with pytest.raises(MemoryError):
        check_rerank_memory(q, g)
    assert rerank_memory_bytes(3368, 19732) < 4 * 1024**3  # Market-1501 fits the default limit
    q_g, q_q, g_g = random_blocks(0)
    with pytest.raises(MemoryError):
        k_reciprocal_rerank(q_g, q_q, g_g, max_memory_bytes=1000)  # the limit is configurable


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"q_q_dist": np.zeros((2, 2))}, "q_q_dist must have shape"),
        ({"g_g_dist": np.zeros((3, 3))}, "g_g_dist must have shape"),
        ({"q_g_dist": np.zeros(4)}, "q_g_dist must be 2-D"),
        ({"k1": 0}, "k1 and k2"),
        ({"lambda_value": 1.5}, "lambda_value"),
        ({"q_g_dist": np.full((6, 30), np.nan)}, "NaN"),
    ],
)
def test_bad_inputs_raise(kwargs, message):
    q_g, q_q, g_g = random_blocks(0)
    arguments = {"q_g_dist": q_g, "q_q_dist": q_q, "g_g_dist": g_g, **kwargs}
    with pytest.raises(ValueError, match=message):
        k_reciprocal_rerank(**arguments)


# --------------------------------------------------------------------------------------------------
# Blockwise distances: results, memory, the memory guard
# --------------------------------------------------------------------------------------------------


def force_blocks(monkeypatch, elements: int) -> None:
    """Shrink the work blocks so that a small pool goes through the blockwise code (many blocks)."""
    monkeypatch.setattr(rerank_module, "_WORK_ELEMENTS", elements)
    monkeypatch.setattr(rerank_module, "_SPARSE_ENTRIES", max(1, elements // 16))


def clustered_features(seed: int, num_query: int = 12, num_gallery: int = 60, dim: int = 32):
    """Features of a few identities, float32, with pids and camera ids (queries: camera 1)."""
    rng = np.random.default_rng(seed)
    num_ids = 6
    pids = np.concatenate([np.arange(num_query) % num_ids, rng.integers(0, num_ids, num_gallery)])
    x = rng.standard_normal((num_ids, dim))[pids] + 0.8 * rng.standard_normal((len(pids), dim))
    cams = np.concatenate([np.ones(num_query, int), rng.integers(2, 7, num_gallery)])
    return x[:num_query].astype(np.float32), x[num_query:].astype(np.float32), pids + 1, cams


def squared_unit_blocks(qf: np.ndarray, gf: np.ndarray):
    """(q_g, q_q, g_g) squared distances of the L2-normalised features, in float32 as rerank_features has them."""
    qn = qf / np.maximum(np.linalg.norm(qf, axis=1, keepdims=True), 1e-12)
    gn = gf / np.maximum(np.linalg.norm(gf, axis=1, keepdims=True), 1e-12)

    def squared(a, b):
        return np.maximum(2.0 - 2.0 * (a @ b.T), 0.0).astype(np.float32)

    q_q, g_g = squared(qn, qn), squared(gn, gn)
    np.fill_diagonal(q_q, 0.0)
    np.fill_diagonal(g_g, 0.0)
    return squared(qn, gn), q_q, g_g


@pytest.mark.parametrize("elements", [500, 3000])
@pytest.mark.parametrize(("k1", "k2"), [(20, 6), (4, 3), (5, 9)])
def test_blockwise_feature_path_equals_matrix_path(monkeypatch, elements, k1, k2):
    qf, gf, pids, cams = clustered_features(k1 + k2)
    q_g, q_q, g_g = squared_unit_blocks(qf, gf)
    whole = k_reciprocal_rerank(q_g, q_q, g_g, k1, k2, 0.3)
    assert np.array_equal(rerank_features(qf, gf, k1=k1, k2=k2), whole)  # pool of 72 < 4,096: one piece
    force_blocks(monkeypatch, elements)  # 72 x 72 > elements: blocks of 6 or 41 rows, features never squared whole
    blockwise = rerank_features(qf, gf, k1=k1, k2=k2)

    # Only the matrix products' rounding may differ (BLAS kernels can depend on the block's shape).
    np.testing.assert_allclose(blockwise, whole, rtol=0, atol=1e-6)
    assert np.array_equal(np.argsort(blockwise, axis=1, kind="stable"), np.argsort(whole, axis=1, kind="stable"))
    args = (pids[:12], cams[:12], pids[12:], cams[12:])
    before, after = evaluate_from_distance(whole, *args), evaluate_from_distance(blockwise, *args)
    assert before.mAP == after.mAP and np.array_equal(before.cmc, after.cmc)


def exact_features(seed: int, count: int, dim: int = 12) -> np.ndarray:
    """Vectors with four entries of +-1: unit length 2, so every product and distance is exact in float32.

    Any order of summation gives the same bits, and many distances tie exactly, so the results can be
    compared bit for bit whatever the BLAS, ties at the neighbour cut-off included.
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((count, dim), dtype=np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return x


@pytest.mark.parametrize("seed", range(3))
def test_blockwise_path_is_bit_identical_on_exact_distances_with_ties(monkeypatch, seed):
    qf, gf = exact_features(seed, 9), exact_features(seed + 10, 40)
    whole = rerank_features(qf, gf, k1=6, k2=3)
    q_g, q_q, g_g = squared_unit_blocks(qf, gf)
    assert len(np.unique(q_g)) < q_g.size / 10  # plenty of exact ties
    # Ties at the cut-off of N(p, k) go to the lower index, as in the plain-loop reference (stable sort).
    np.testing.assert_allclose(whole, reference_rerank(q_g, q_q, g_g, 6, 3, 0.3), atol=1e-6)
    for elements in (49 * 2, 49 * 7, 2000):  # blocks of 2, 7 and 40 rows
        force_blocks(monkeypatch, elements)
        np.testing.assert_array_equal(rerank_features(qf, gf, k1=6, k2=3), whole)
        np.testing.assert_array_equal(k_reciprocal_rerank(q_g, q_q, g_g, 6, 3), whole)


@pytest.mark.parametrize("seed", range(3))
def test_block_and_slice_sizes_do_not_change_the_matrix_path(monkeypatch, seed):
    q_g, q_q, g_g = random_blocks(seed, num_query=7, num_gallery=45)
    whole = k_reciprocal_rerank(q_g, q_q, g_g, 8, 4)
    for elements in (52, 52 * 5, 3000):
        force_blocks(monkeypatch, elements)
        np.testing.assert_array_equal(k_reciprocal_rerank(q_g, q_q, g_g, 8, 4), whole)


def test_feature_path_never_holds_the_pool_distance_matrix(monkeypatch):
    qf, gf, _, _ = clustered_features(7, num_query=40, num_gallery=760, dim=16)
    n = len(qf) + len(gf)
    force_blocks(monkeypatch, 4 * n)  # 4 rows of the 800 x 800 pool at a time
    tracemalloc.start()
    try:
        rerank_features(qf, gf, k1=4, k2=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * n * n / 4  # a quarter of the float32 (N, N) matrix; the dense path needs all of it


def test_memory_estimate_covers_what_the_feature_path_allocates():
    qf, gf, _, _ = clustered_features(3, num_query=300, num_gallery=4000, dim=64)  # pool 4,300: two blocks
    tracemalloc.start()
    try:
        rerank_features(qf, gf)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= rerank_memory_bytes(300, 4000, feature_dim=64)


def test_memory_estimate_is_monotonic_and_consistent_with_the_check():
    market = {"num_query": 3368, "num_gallery": 19732, "k1": 20, "k2": 6}
    for feature_dim in (None, 128, 2048):
        sizes = [0, 1, 10, 100, 1000, 4000, 20000]
        grid = [[rerank_memory_bytes(q, g, feature_dim=feature_dim) for g in sizes] for q in sizes]
        assert (np.diff(grid, axis=0) >= 0).all() and (np.diff(grid, axis=1) >= 0).all()
        estimate = rerank_memory_bytes(**market, feature_dim=feature_dim)
        for key, bigger in (("num_query", 3369), ("num_gallery", 20000), ("k1", 30), ("k2", 7)):
            assert rerank_memory_bytes(**{**market, key: bigger}, feature_dim=feature_dim) >= estimate
        assert estimate >= 4 * 3368 * 19732  # the float32 result alone
        check_rerank_memory(3368, 19732, estimate, feature_dim=feature_dim)  # exactly at the limit: fine
        with pytest.raises(MemoryError):
            check_rerank_memory(3368, 19732, estimate - 1, feature_dim=feature_dim)
    from_features = rerank_memory_bytes(3368, 19732, feature_dim=512)
    from_distances = rerank_memory_bytes(3368, 19732)
    assert from_features < 1.5e9  # measured peak: about 0.6 GB (benchmarks/bench_rerank.py)
    three_matrices = 4 * (3368**2 + 19732**2 + 3368 * 19732)  # float32 q_q, g_g, q_g
    assert from_distances - from_features == three_matrices - 8 * 23100 * 512  # the matrices instead of features
    assert rerank_memory_bytes(3368, 19732, feature_dim=1024) > from_features


def test_memory_error_states_the_limit_and_what_fits():
    fake = np.broadcast_to(np.float32(0), (1, 1))
    limit = 2 * 1024**3
    with pytest.raises(MemoryError) as raised:
        rerank_features(
            np.broadcast_to(fake, (50_000, 512)), np.broadcast_to(fake, (200_000, 512)), max_memory_bytes=limit
        )
    message = str(raised.value)
    assert "max_memory_bytes = 2.0 GiB" in message and "the result is 50,000 x 200,000 float32" in message
    fits = int(re.search(r"at most ([\d,]+) queries fit", message).group(1).replace(",", ""))
    assert 0 < fits < 50_000
    assert rerank_memory_bytes(fits, 200_000, feature_dim=512) <= limit
    assert rerank_memory_bytes(fits + 1, 200_000, feature_dim=512) > limit

    with pytest.raises(MemoryError, match="Not even one query fits"):
        check_rerank_memory(1, 10_000_000, feature_dim=512)  # the features alone are too many

    q = 30_000
    with pytest.raises(MemoryError, match=r"max_memory_bytes = 4\.0 GiB.*rerank_features\(query_features"):
        k_reciprocal_rerank(np.broadcast_to(fake, (q, q)), np.broadcast_to(fake, (q, q)), np.broadcast_to(fake, (q, q)))


def test_similarities_passed_as_distances_are_refused():
    """Similarities have the shapes of distances, and re-ranking them returned a normal-looking matrix whose
    ranking is wrong (rank-1 fell from 68.75 % to 12.50 % in the issue's example), without a word."""
    qf, gf, _, _ = clustered_features(0)
    q_g, q_q, g_g = squared_unit_blocks(qf, gf)

    def similarity(distance):
        return 1 - distance / 2  # the cosine similarity of unit features

    k_reciprocal_rerank(q_g, q_q, g_g)  # distances: accepted
    k_reciprocal_rerank(-similarity(q_g), -similarity(q_q), -similarity(g_g))  # negated similarities rank alike
    with pytest.raises(ValueError, match="q_q_dist looks like similarities"):
        k_reciprocal_rerank(similarity(q_g), similarity(q_q), similarity(g_g))
    with pytest.raises(ValueError, match="g_g_dist looks like similarities"):
        k_reciprocal_rerank(q_g, q_q, similarity(g_g))
