"""Tests for reid_utils.metrics: hand-worked cases for both AP conventions, the fast path against the
per-query reference, input handling.

In the hand-worked cases the query feature is the 1-d vector [1.0], so each gallery item's score is
simply its own 1-d feature value, and the rankings can be read off the tables below.
"""

import dataclasses
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from reid_utils import fastrank, metrics
from reid_utils.metrics import (
    Evaluation,
    evaluate,
    evaluate_from_distance,
    evaluate_naive,
    junk_mask,
    rank_gallery,
    rank_gallery_by_distance,
)

BOTH = pytest.mark.parametrize("fn", [evaluate, evaluate_naive], ids=["evaluate", "naive"])


def run(fn, gallery, query_pid=1, query_cam=1, **kwargs) -> Evaluation:
    """Evaluate one query (feature [1.0]) against a gallery given as (pid, cam, score) rows."""
    pids, cams, scores = (np.array(column) for column in zip(*gallery, strict=True))
    return fn(np.ones((1, 1)), [query_pid], [query_cam], scores[:, None], pids, cams, **kwargs)


# Query: pid 1, camera 1.
# idx  pid  cam  score
#  0    1    1   0.9   same pid AND same camera -> junk, removed (although it is ranked first)
#  1    0    2   0.8   distractor -> stays, a wrong answer
#  2   -1    3   0.7   junk box -> removed
#  3    1    2   0.6   true match
#  4    2    3   0.5   wrong
#  5    1    3   0.4   true match
#  6    3    1   0.3   wrong
# Ranking after junk removal: [1, 3, 4, 5, 6]; hits (i = 1, 2) at 0-based ranks r = 1, 3; n_good = 2.
# First hit at rank 1: rank-1 = 0, rank-2 onwards = 1.
# step:   (1/2 + 2/4) / 2 = 1/2
# market: hit 1: before 0/1, at 1/2 -> 1/4;  hit 2: before 1/3, at 2/4 -> 5/12;  (1/4 + 5/12) / 2 = 1/3
CASE_JUNK = [(1, 1, 0.9), (0, 2, 0.8), (-1, 3, 0.7), (1, 2, 0.6), (2, 3, 0.5), (1, 3, 0.4), (3, 1, 0.3)]

# Query: pid 1, camera 1. Hits at r = 0 and r = 2 (the camera-1 copy of pid 1 at idx 3 is junk).
# idx  pid  cam  score
#  0    1    2   0.9   true match, r = 0
#  1    5    2   0.8   wrong,      r = 1
#  2    1    3   0.7   true match, r = 2
#  3    1    1   0.6   junk
#  4    6    4   0.5   wrong,      r = 3
# step:   (1/1 + 2/3) / 2 = 5/6
# market: hit 1: before 1 (r = 0), at 1/1 -> 1;  hit 2: before 1/2, at 2/3 -> 7/12;  (1 + 7/12) / 2 = 19/24
CASE_TOP = [(1, 2, 0.9), (5, 2, 0.8), (1, 3, 0.7), (1, 1, 0.6), (6, 4, 0.5)]


@BOTH
@pytest.mark.parametrize(("ap", "expected"), [("market", Fraction(1, 3)), ("step", Fraction(1, 2))])
def test_junk_and_distractor_hand_computed(fn, ap, expected):
    result = run(fn, CASE_JUNK, ap=ap)
    assert result.mAP == pytest.approx(float(expected), abs=1e-12)
    np.testing.assert_allclose(result.ap, [float(expected)])
    np.testing.assert_array_equal(result.cmc, [0, 1, 1, 1, 1, 1, 1])  # length = gallery size (7 < 50)
    assert result.rank(1) == 0.0 and result.rank(2) == 1.0
    assert (result.num_queries_evaluated, result.num_queries_skipped) == (1, 0)


@BOTH
@pytest.mark.parametrize(("ap", "expected"), [("market", Fraction(19, 24)), ("step", Fraction(5, 6))])
def test_first_hit_on_top_hand_computed(fn, ap, expected):
    result = run(fn, CASE_TOP, ap=ap)
    assert result.mAP == pytest.approx(float(expected), abs=1e-12)
    np.testing.assert_array_equal(result.cmc, [1, 1, 1, 1, 1])


@BOTH
def test_distractor_above_the_match_counts_as_wrong(fn):
    # A pid-0 distractor scored 0.9 beats the only match (0.8): first hit at rank 1, AP step = 1/2.
    result = run(fn, [(0, 2, 0.9), (1, 2, 0.8)], ap="step")
    np.testing.assert_array_equal(result.cmc, [0, 1])
    assert result.mAP == pytest.approx(0.5)


@BOTH
def test_minus_one_pid_is_removed_not_wrong(fn):
    # The same gallery with the 0.9 item as pid -1: it is junk, so the match is first. AP = 1.
    result = run(fn, [(-1, 2, 0.9), (1, 2, 0.8)], ap="step")
    np.testing.assert_array_equal(result.cmc, [1, 1])
    assert result.mAP == 1.0


@BOTH
@pytest.mark.parametrize("ap", ["market", "step"])
def test_ties_keep_gallery_order(fn, ap):
    # Equal scores are ranked by gallery index (stable sort).
    wrong_first = run(fn, [(2, 2, 0.5), (1, 2, 0.5), (3, 2, 0.1)], ap=ap)
    np.testing.assert_array_equal(wrong_first.cmc, [0, 1, 1])
    # one hit at r = 1: step 1/2; market (0/1 + 1/2) / 2 = 1/4
    assert wrong_first.mAP == pytest.approx(0.5 if ap == "step" else 0.25)

    match_first = run(fn, [(1, 2, 0.5), (2, 2, 0.5), (3, 2, 0.1)], ap=ap)
    np.testing.assert_array_equal(match_first.cmc, [1, 1, 1])
    assert match_first.mAP == 1.0

    # A tie with a junk item changes nothing: junk is removed before ranking.
    with_junk = run(fn, [(1, 1, 0.5), (1, 2, 0.5), (3, 2, 0.1)], ap=ap)
    assert with_junk.rank(1) == 1.0 and with_junk.mAP == 1.0


# Three queries, all with feature [1.0], on one gallery (so one score order for all):
# idx  pid  cam  score
#  0    1    2   0.9
#  1    2    1   0.8
#  2    3    1   0.7
#  3    1    3   0.6
#  4    2    2   0.5
# A: pid 1, cam 1 -> nothing junk; hits at r = 0, 3.
#    step (1 + 2/4) / 2 = 3/4;  market ((1 + 1)/2 + (1/3 + 2/4)/2) / 2 = (1 + 5/12) / 2 = 17/24
# B: pid 3, cam 1 -> its only gallery image (idx 2) is in its own camera: junk, no match left, skipped.
# C: pid 2, cam 2 -> idx 4 is junk; ranking [0, 1, 2, 3], hit at r = 1.
#    step 1/2;  market (0/1 + 1/2) / 2 = 1/4
# CMC over A and C: first hits at 0 and 1 -> [1/2, 1, 1, 1, 1].
SHARED_GALLERY = [(1, 2, 0.9), (2, 1, 0.8), (3, 1, 0.7), (1, 3, 0.6), (2, 2, 0.5)]


@BOTH
@pytest.mark.parametrize(
    ("ap", "expected"),
    [("market", [Fraction(17, 24), Fraction(1, 4)]), ("step", [Fraction(3, 4), Fraction(1, 2)])],
)
def test_query_without_match_is_skipped_and_counted(fn, ap, expected):
    pids, cams, scores = (np.array(column) for column in zip(*SHARED_GALLERY, strict=True))
    result = fn(np.ones((3, 1)), [1, 3, 2], [1, 1, 2], scores[:, None], pids, cams, ap=ap)

    assert (result.num_queries_evaluated, result.num_queries_skipped) == (2, 1)
    np.testing.assert_array_equal(result.evaluated_mask, [True, False, True])
    np.testing.assert_allclose(result.ap, [float(x) for x in expected], rtol=0, atol=1e-12)
    assert result.mAP == pytest.approx(float(sum(expected) / 2), abs=1e-12)  # 23/48 or 5/8: B is not a zero
    np.testing.assert_allclose(result.cmc, [0.5, 1, 1, 1, 1])
    assert "1 queries skipped" in str(result)


@BOTH
def test_only_skipped_queries_raise(fn):
    with pytest.raises(ValueError, match="no query has a true match"):
        run(fn, [(1, 1, 0.9), (2, 2, 0.8)])


def test_max_rank_and_summary():
    result = run(evaluate, CASE_JUNK, max_rank=3)
    np.testing.assert_array_equal(result.cmc, [0, 1, 1])
    assert result.rank(10) == 1.0  # beyond the curve every evaluated query has found its match
    text = str(result)
    assert re.fullmatch(r"Rank@1: 0\.00%  Rank@5: 100\.00%  Rank@10: 100\.00%  mAP: 33\.33%", text), text
    assert text == result.summary()


def test_result_is_frozen():
    result = run(evaluate, CASE_JUNK)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.mAP = 1.0
    with pytest.raises(ValueError):
        result.cmc[0] = 1.0  # read-only array


def random_split(seed: int, quantised: bool):
    """Random queries/gallery with junk, distractors and skipped queries; quantised features force ties."""
    rng = np.random.default_rng(seed)
    nq, ng, dim = 23, 61, 4
    if quantised:  # small integers: dot products are exact, so equal scores are truly equal
        qf, gf = rng.integers(-2, 3, (nq, dim)), rng.integers(-2, 3, (ng, dim))
    else:
        qf, gf = rng.standard_normal((nq, dim)), rng.standard_normal((ng, dim))
    query_pids = rng.integers(1, 7, nq)
    query_pids[:2] = 8  # not in the gallery at all: skipped
    return (
        qf.astype(np.float32),
        query_pids,
        rng.integers(1, 4, nq),
        gf.astype(np.float32),
        rng.integers(-1, 7, ng),
        rng.integers(1, 4, ng),
    )


def assert_same(a: Evaluation, b: Evaluation) -> None:
    np.testing.assert_array_equal(a.evaluated_mask, b.evaluated_mask)
    np.testing.assert_allclose(a.cmc, b.cmc, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.ap, b.ap, rtol=0, atol=1e-6)
    assert a.mAP == pytest.approx(b.mAP, abs=1e-6)
    assert (a.num_queries_evaluated, a.num_queries_skipped) == (
        b.num_queries_evaluated,
        b.num_queries_skipped,
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quantised", [True, False], ids=["ties", "continuous"])
@pytest.mark.parametrize("ap", ["market", "step"])
def test_fast_matches_naive(seed, quantised, ap):
    data = random_split(seed, quantised)
    reference = evaluate_naive(*data, ap=ap)
    assert reference.num_queries_skipped >= 2  # the data does exercise skipping
    for chunk_size in (1, 7, 1000):
        assert_same(evaluate(*data, ap=ap, chunk_size=chunk_size), reference)
    assert_same(evaluate(*data, ap=ap, max_rank=5), evaluate_naive(*data, ap=ap, max_rank=5))


def test_from_distance_matches_features():
    qf, qp, qc, gf, gp, gc = random_split(1, quantised=True)
    scores = qf.astype(np.float64) @ gf.T.astype(np.float64)
    for ap in ("market", "step"):
        assert_same(evaluate_from_distance(-scores, qp, qc, gp, gc, ap=ap), evaluate(qf, qp, qc, gf, gp, gc, ap=ap))
        assert_same(
            evaluate_from_distance(10.0 - scores, qp, qc, gp, gc, ap=ap, chunk_size=4),  # any shift: same ranks
            evaluate(qf, qp, qc, gf, gp, gc, ap=ap),
        )


def test_torch_and_numpy_inputs_agree():
    data = random_split(2, quantised=False)
    tensors = [torch.from_numpy(np.asarray(x)) for x in data]
    assert_same(evaluate(*tensors), evaluate(*data))
    assert_same(evaluate_naive(*tensors), evaluate(*data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ap": "mean"}, r"ap must be one of \('market', 'step'\)"),
        ({"query_features": np.ones(3)}, "query_features must be 2-D"),
        ({"gallery_features": np.ones((4, 3))}, "feature sizes differ"),
        ({"gallery_pids": np.ones(3)}, "gallery_pids must be 1-D with 4 entries"),
        ({"query_cams": np.ones((3, 1))}, "query_cams must be 1-D with 3 entries"),
        ({"max_rank": 0}, "max_rank"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"query_features": np.full((3, 2), np.nan)}, "NaN"),
    ],
)
@BOTH
def test_bad_inputs_raise(fn, change, message):
    kwargs = {
        "query_features": np.ones((3, 2)),
        "query_pids": [1, 2, 3],
        "query_cams": [1, 1, 1],
        "gallery_features": np.ones((4, 2)),
        "gallery_pids": [1, 2, 3, 4],
        "gallery_cams": [2, 2, 2, 2],
    }
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        fn(**kwargs)


def test_bad_distance_matrix_raises():
    with pytest.raises(ValueError, match="dist must be 2-D"):
        evaluate_from_distance(np.ones(3), [1], [1], [1, 2, 3], [2, 2, 2])
    with pytest.raises(ValueError, match="gallery_pids must be 1-D with 3 entries"):
        evaluate_from_distance(np.ones((1, 3)), [1], [1], [1, 2], [2, 2, 2])


def test_rank_gallery_drops_junk_and_marks_matches():
    # scores 0.9 (same pid, same camera: junk), 0.8 (distractor), 0.7 (pid -1), 0.6 (match, other camera)
    query = np.array([1.0, 0.0])
    gallery = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    ranked = rank_gallery(query, 7, 1, gallery, [7, 0, -1, 7], [1, 2, 3, 2])
    assert ranked.order.tolist() == [1, 3]
    assert ranked.is_match.tolist() == [False, True]
    assert ranked.scores.tolist() == pytest.approx([0.8, 0.6])


# --------------------------------------------------------------------------------------------------
# The junk rule, written once
# --------------------------------------------------------------------------------------------------


def test_junk_mask_rule():
    pids = np.array([7, 7, 0, -1, 3, 7])
    cams = np.array([1, 2, 1, 2, 1, 1])
    # query: person 7, camera 1 -> own person in own camera (0, 5) and the pid -1 box (3) are junk
    np.testing.assert_array_equal(junk_mask(7, 1, pids, cams), [True, False, False, True, False, True])
    # a distractor-free view: person 3 in camera 2 only loses the pid -1 box
    np.testing.assert_array_equal(junk_mask(3, 2, pids, cams), [False, False, False, True, False, False])
    # elementwise on (query, item) pairs, and from tensors
    pairs = junk_mask(np.array([7, 7, 3]), np.array([1, 1, 2]), np.array([7, 7, -1]), np.array([1, 2, 2]))
    np.testing.assert_array_equal(pairs, [True, False, True])
    from_tensors = junk_mask(torch.tensor(7), torch.tensor(1), torch.from_numpy(pids), torch.from_numpy(cams))
    np.testing.assert_array_equal(from_tensors, junk_mask(7, 1, pids, cams))
    # broadcasting: several queries (a column) against the gallery (a row) at once
    table = junk_mask(np.array([[7], [3]]), np.array([[1], [2]]), pids, cams)
    np.testing.assert_array_equal(table, [junk_mask(7, 1, pids, cams), junk_mask(3, 2, pids, cams)])


def test_rank_gallery_by_distance_uses_the_same_rule_and_ties():
    # distances 0.1 (junk: same pid, same camera), 0.2 (distractor), 0.3 (pid -1), 0.4 twice (wrong, then match)
    ranked = rank_gallery_by_distance([0.1, 0.2, 0.3, 0.4, 0.4], 7, 1, [7, 0, -1, 5, 7], [1, 2, 3, 2, 2])
    assert ranked.order.tolist() == [1, 3, 4]  # the tie keeps gallery order
    assert ranked.is_match.tolist() == [False, False, True]
    assert ranked.scores.tolist() == pytest.approx([0.2, 0.4, 0.4])


def ap_from_ranking(is_match: np.ndarray) -> float:
    """Market-1501 AP of one junk-free ranking, straight from the definition."""
    hits = np.flatnonzero(is_match)
    terms = [((i - 1) / r if r > 0 else 1.0) / 2 + i / (r + 1) / 2 for i, r in enumerate(hits, start=1)]
    return float(np.mean(terms))


def test_rank_gallery_orders_agree_with_evaluate():
    qf, qp, qc, gf, gp, gc = random_split(3, quantised=True)  # ties everywhere
    result = evaluate(qf, qp, qc, gf, gp, gc)
    distances = -(qf.astype(np.float64) @ gf.T.astype(np.float64))  # exact: small integers
    aps = []
    for q in np.flatnonzero(result.evaluated_mask):
        ranked = rank_gallery(qf[q], qp[q], qc[q], gf, gp, gc)
        by_distance = rank_gallery_by_distance(distances[q], qp[q], qc[q], gp, gc)
        np.testing.assert_array_equal(ranked.order, by_distance.order)
        aps.append(ap_from_ranking(ranked.is_match))
    np.testing.assert_allclose(result.ap, aps, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# evaluate (float32 scores + exact re-check of close calls) must equal the float64 loop bit for bit
# --------------------------------------------------------------------------------------------------


def assert_identical(a: Evaluation, b: Evaluation) -> None:
    np.testing.assert_array_equal(a.evaluated_mask, b.evaluated_mask)
    np.testing.assert_array_equal(a.cmc, b.cmc)
    np.testing.assert_array_equal(a.ap, b.ap)
    assert a.mAP == b.mAP


def market_like(seed: int, nq: int = 40, ng: int = 300, dim: int = 64, num_ids: int = 12):
    """A small Market-like split: identities seen by several cameras, distractors (0) and junk (-1)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids + 1, dim))
    qp, qc = rng.integers(1, num_ids + 1, nq), rng.integers(1, 7, nq)
    gp, gc = rng.integers(-1, num_ids + 1, ng), rng.integers(1, 7, ng)
    qf = centres[qp] + 1.5 * rng.standard_normal((nq, dim))
    gf = centres[np.maximum(gp, 0)] + 1.5 * rng.standard_normal((ng, dim))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(qf), qp, qc, unit(gf), gp, gc


def near_ties(seed: int, precision: type = np.float32, step: float | None = None, cancel: bool = False):
    """Every true match has a wrong "twin" just before it in the gallery whose exact score is a hair lower.

    The twin is the match with one coordinate moved against the query: by one float32 ulp, or by ``step``
    (relative) for float64 features. float32 scores cannot tell such pairs apart -- they come out equal
    (gallery order then puts the twin first) or in either order -- while float64 can. Queries and pairs are
    scaled by powers of two from 1/4 to 4, so the features are not unit-norm (the bound must use the norms).
    With ``cancel`` the matches are nearly orthogonal to their query: a small score made of large terms, so
    float32 rounding errs by many of the score's own ulps (far more than a tie).
    """
    rng = np.random.default_rng(seed)
    nq, per_query, dim = 12, 3, 128
    qf = rng.standard_normal((nq, dim)) * 2.0 ** rng.integers(-2, 3, (nq, 1))
    qf = qf.astype(precision)
    rows, pids = [], []
    for q in range(nq):
        for _ in range(per_query):
            match = qf[q] + 0.8 * rng.standard_normal(dim)
            if cancel:
                query = qf[q].astype(np.float64)
                match = match - (match @ query / (query @ query) - 0.01) * query
            match = (match * 2.0 ** rng.integers(-2, 3)).astype(precision)
            k = int(np.argmax(np.abs(qf[q])))
            twin, direction = match.copy(), -np.sign(qf[q, k])
            if step is None:
                twin[k] = np.nextafter(twin[k], precision(direction * np.inf))
            else:
                twin[k] += direction * step * abs(twin[k])
            rows += [twin, match]
            pids += [100 + q, q + 1]  # a wrong person, then the query's person
    cams = np.full(len(rows), 2)
    return qf, np.arange(1, nq + 1), np.ones(nq, dtype=int), np.array(rows, dtype=precision), np.array(pids), cams


def twins_after_matches(data) -> bool:
    """In the float64 ranking, does every match come before its twin (the item just before it)?"""
    qf, qp, qc, gf, gp, gc = data
    for q in range(len(qf)):
        position = np.argsort(rank_gallery(qf[q], qp[q], qc[q], gf, gp, gc).order)
        matches = np.flatnonzero(gp == qp[q])
        if not (position[matches] < position[matches - 1]).all():
            return False
    return True


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ap", ["market", "step"])
def test_evaluate_equals_naive_exactly(seed, ap):
    data = market_like(seed)
    reference = evaluate_naive(*data, ap=ap)
    for chunk_size in (None, 1, 7):
        assert_identical(evaluate(*data, ap=ap, chunk_size=chunk_size), reference)
    for quantised in (True, False):
        small = random_split(seed, quantised)
        assert_identical(evaluate(*small, ap=ap), evaluate_naive(*small, ap=ap))


NEAR_TIES = pytest.mark.parametrize(
    ("precision", "step", "cancel"),
    [
        (np.float32, None, False),
        (np.float32, None, True),
        (np.float64, 1e-7, True),
        (np.float64, 1e-10, False),
        (np.float64, 1e-13, False),
    ],
    ids=["f32-ulp", "f32-ulp-cancel", "f64-1e-7-cancel", "f64-1e-10", "f64-1e-13"],
)


@NEAR_TIES
def test_near_ties_are_ranked_in_float64(precision, step, cancel):
    data = near_ties(0, precision, step, cancel)
    assert twins_after_matches(data)
    reference = evaluate_naive(*data)
    for chunk_size in (None, 5):
        assert_identical(evaluate(*data, chunk_size=chunk_size), reference)


def test_near_ties_fool_float32_alone(monkeypatch):
    """The test above can fail: break either half of the re-check and the twins are misranked.

    Without the error bound (only float32 ties get a second look), the cancelling case goes wrong; with the
    bound but a float32 re-check (both its BLAS and its einsum dot products), the plain case does.
    """
    cancelling = near_ties(0, np.float32, cancel=True)
    with monkeypatch.context() as patch:
        patch.setattr(fastrank, "_gamma", lambda n, unit_roundoff: 0.0)
        assert not np.array_equal(evaluate(*cancelling).ap, evaluate_naive(*cancelling).ap)
    plain = near_ties(0, np.float32)
    with monkeypatch.context() as patch:

        def in_float32(left, right):
            return np.einsum("ij,ij->i", left.astype(np.float32), right.astype(np.float32)).astype(np.float64)

        patch.setattr(fastrank, "_dot_pairs", in_float32)
        patch.setattr(fastrank, "_blas_dot_pairs", in_float32)
        assert not np.array_equal(evaluate(*plain).ap, evaluate_naive(*plain).ap)


def test_exact_ties_keep_gallery_order():
    """Duplicated gallery rows score exactly equal, wherever they sit (also among BLAS's last rows)."""
    qf, qp, qc, gf, gp, gc = market_like(4, ng=203)
    rng = np.random.default_rng(4)
    copies = rng.integers(0, len(gf), 60)
    gf = np.concatenate([gf, gf[copies]])  # the same rows again at the end, under other labels
    gp = np.concatenate([gp, rng.integers(-1, 13, 60)])
    gc = np.concatenate([gc, rng.integers(1, 7, 60)])
    for ap in ("market", "step"):
        assert_identical(evaluate(qf, qp, qc, gf, gp, gc, ap=ap), evaluate_naive(qf, qp, qc, gf, gp, gc, ap=ap))
    scores = metrics._dot_rows(gf.astype(np.float64), qf[0].astype(np.float64))
    np.testing.assert_array_equal(scores[len(gf) - 60 :], scores[copies])


def test_dot_pairs_round_like_dot_rows():
    """evaluate re-scores pairs with _dot_pairs; the loop scores rows with _dot_rows: the same bits."""
    rng = np.random.default_rng(5)
    gallery, queries = rng.standard_normal((257, 512)), rng.standard_normal((3, 512))
    for q in range(3):
        full = metrics._dot_rows(gallery, queries[q])
        picked = rng.integers(0, len(gallery), 50)
        pairs = fastrank._dot_pairs(gallery[picked], np.repeat(queries[q : q + 1], 50, axis=0))
        np.testing.assert_array_equal(pairs, full[picked])
        np.testing.assert_array_equal(metrics._dot_rows(gallery[picked], queries[q]), full[picked])


@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1e6, 1e30, 1e150])
def test_extreme_feature_magnitudes(magnitude):
    """float32 cannot hold these products; evaluate rescales by powers of two and still matches float64."""
    qf, qp, qc, gf, gp, gc = market_like(6)
    rng = np.random.default_rng(6)
    gf = gf.astype(np.float64) * magnitude * rng.uniform(0.5, 2.0, (len(gf), 1))
    qf = qf.astype(np.float64) * rng.uniform(0.5, 2.0, (len(qf), 1)) / np.sqrt(magnitude)
    assert_identical(evaluate(qf, qp, qc, gf, gp, gc), evaluate_naive(qf, qp, qc, gf, gp, gc))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distances_rank_exactly(dtype):
    """evaluate_from_distance on the loop's own float64 scores, near-ties and ties included, equals the loop."""
    for data in (near_ties(1, np.float64, 1e-13), market_like(7), random_split(7, quantised=True)):
        qf, qp, qc, gf, gp, gc = data
        scores = np.stack([metrics._dot_rows(gf.astype(np.float64), q) for q in qf.astype(np.float64)])
        if dtype == np.float32:  # float32 distances are ranked as given: compare with the loop on those
            scores = scores.astype(np.float32).astype(np.float64)
            reference = evaluate_from_distance(-scores, qp, qc, gp, gc, chunk_size=3)
        else:
            reference = evaluate_naive(*data)
        assert_identical(evaluate_from_distance((-scores).astype(dtype), qp, qc, gp, gc), reference)


def test_distance_magnitudes_do_not_matter():
    """Scaling distances by a power of two changes no comparison; far-out ones are rescaled before float32."""
    qf, qp, qc, gf, gp, gc = near_ties(2, np.float64, 1e-12)
    dist = -(qf @ gf.T)
    reference = evaluate_from_distance(dist, qp, qc, gp, gc)
    for exponent in (-900, -100, 100, 900):
        assert_identical(evaluate_from_distance(np.ldexp(dist, exponent), qp, qc, gp, gc), reference)


@BOTH
def test_identities_that_are_not_whole_numbers_are_refused(fn):
    """A float label 1.5 used to become 1 without a word, and match the identity 1."""
    gallery = np.array([[0.9], [0.5]])
    assert fn(np.ones((1, 1)), [1.0], [1.0], gallery, [1.0, 2.0], [2, 2]).rank(1) == 1.0  # whole floats: fine
    for query_pids, gallery_pids in (([1.5], [1, 2]), ([1], [1.5, 2]), ([np.nan], [1, 2])):
        with pytest.raises(ValueError, match="whole numbers"):
            fn(np.ones((1, 1)), query_pids, [1], gallery, gallery_pids, [2, 2])


def test_rank_gallery_refuses_a_nan_query_and_float_ids():
    gallery, pids, cams = np.array([[0.9], [0.5]]), np.array([1, 2]), np.array([2, 2])
    with pytest.raises(ValueError, match="NaN"):
        rank_gallery(np.array([np.nan]), 1, 1, gallery, pids, cams)
    with pytest.raises(ValueError, match="NaN"):
        rank_gallery(np.ones(1), 1, 1, np.array([[np.nan], [0.5]]), pids, cams)
    with pytest.raises(ValueError, match="whole numbers"):
        rank_gallery(np.ones(1), 1.5, 1, gallery, pids, cams)
    assert rank_gallery(np.ones(1), 1, 1, gallery, pids, cams).order.tolist() == [0, 1]


# --------------------------------------------------------------------------------------------------
# Hard features (an untrained network: true matches deep in the ranking among many near-ties)
# --------------------------------------------------------------------------------------------------


def hard_split(seed: int, nq: int = 30, ng: int = 2000, dim: int = 32, num_ids: int = 150):
    """Nearly random features: mAP of a few %, most true matches far down, many items close to each."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids + 1, dim))
    qp, qc = rng.integers(1, num_ids + 1, nq), rng.integers(1, 7, nq)
    gp, gc = rng.integers(-1, num_ids + 1, ng), rng.integers(1, 7, ng)
    qf = 0.1 * centres[qp] + rng.standard_normal((nq, dim))
    gf = 0.1 * centres[np.maximum(gp, 0)] + rng.standard_normal((ng, dim))
    gf[::7] = gf[3::7][: len(gf[::7])] if ng > 10 else gf[::7]  # duplicated rows: exact ties
    gf[5::11] = np.round(gf[5::11], 1)  # coarse values: more ties
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(qf), qp, qc, unit(gf), gp, gc


@pytest.mark.parametrize("seed", range(3))
def test_hard_features_equal_naive_exactly(seed, monkeypatch):
    data = hard_split(seed)
    reference = {ap: evaluate_naive(*data, ap=ap) for ap in ("market", "step")}
    assert reference["market"].mAP < 0.5  # hard indeed
    for ap in ("market", "step"):
        for chunk_size in (None, 1, 7):
            assert_identical(evaluate(*data, ap=ap, chunk_size=chunk_size), reference[ap])
    # several passes per chunk and coarse bins (many items in each): still the same ranks
    monkeypatch.setattr(fastrank, "_PAIRS_PER_PASS", 3000)
    monkeypatch.setattr(fastrank, "_MIN_BINS", 16)
    monkeypatch.setattr(fastrank, "_bins_per_row", lambda width: 16)
    for ap in ("market", "step"):
        assert_identical(evaluate(*data, ap=ap), reference[ap])


def test_hard_features_sort_only_the_near_ties(monkeypatch):
    """The histogram counts the items certainly before each match; only those close to a match are sorted.

    Sorting every item up to a row's worst match (what a rank needs without the histogram) would sort most of
    the gallery here: the true matches of hard features sit deep in the ranking.
    """
    data = hard_split(3, nq=40, ng=3000)
    sorted_keys = []
    original = fastrank._sort_row_runs

    def counting(packed, per_row):
        sorted_keys.append(len(packed))
        original(packed, per_row)

    monkeypatch.setattr(fastrank, "_sort_row_runs", counting)
    assert_identical(evaluate(*data), evaluate_naive(*data))
    pairs = len(data[0]) * len(data[3])
    assert sum(sorted_keys) < 0.1 * pairs, (sum(sorted_keys), pairs)


def test_row_bins_never_disagree_with_the_keys():
    """bin(x) < bin(t) must mean x < t, and bin(x) > bin(t) x > t, for any row of keys and any threshold,
    with every bin inside its row's range: rows of extreme, tiny, equal and signed-zero keys included."""
    rng = np.random.default_rng(8)
    big, tiny = np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal
    rows = [
        rng.standard_normal(50),
        np.full(50, 0.7),
        np.r_[np.full(25, 0.9), np.full(25, np.nextafter(np.float32(0.9), np.float32(1)))],
        np.r_[rng.choice([-big, big], 10), rng.standard_normal(40)],
        np.r_[[-0.0, 0.0, tiny, -tiny], rng.standard_normal(46) * 1e-40],
        rng.standard_normal(50) * 1e30 + 3e37,
        np.r_[[1e-30], rng.standard_normal(49) * 1e-33 + 1.0],
    ]
    keys = np.array(rows, dtype=np.float32)
    per_row = 16
    bins = fastrank._RowBins.fit(keys.min(axis=1), keys.max(axis=1), per_row)
    item_bins = bins.of_rows(keys, np.empty_like(keys), np.empty(keys.shape, dtype=np.int32))
    starts = np.arange(len(keys))[:, None] * per_row
    assert (item_bins >= starts).all() and (item_bins < starts + per_row).all()
    neighbours = np.nextafter(keys, np.float32(0))  # one float32 step toward zero: finite everywhere
    thresholds = np.concatenate([keys, neighbours, np.full((len(keys), 3), [-big, 0.0, big])], 1)
    for r in range(len(keys)):
        t = thresholds[r].astype(np.float32)
        t_bins = bins.of(t, np.full(len(t), r))
        x, x_bins = keys[r][:, None], item_bins[r][:, None]
        assert not ((x_bins < t_bins) & ~(x < t)).any()
        assert not ((x_bins > t_bins) & ~(x > t)).any()


def test_near_ties_trust_blas_only_within_its_bound(monkeypatch):
    """Items close to a match, and the matches, are placed by BLAS dot products, whose rounding may differ from
    the reference's einsum by up to ``close``: off by half of that they still rank right, but not when trusted
    without the bound (so the test can fail)."""
    data = near_ties(0, np.float64, 1e-13)
    reference = evaluate_naive(*data)
    original = fastrank._blas_dot_pairs

    def off_by(fraction):
        """BLAS scores off by ``fraction`` of their bound: down for the matches, up for the items close to them
        (the first call of an evaluation scores the matches, the next ones the items), so items gain on matches."""
        calls = []

        def dot(left, right):
            calls.append(len(left))
            norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
            bound = 2 * fastrank._gamma(left.shape[1], 2.0**-53) * norms
            return original(left, right) + (-1 if len(calls) == 1 else 1) * fraction * bound

        return dot

    def unbounded(self, queries, columns):
        return self._pairs_in_gallery_order(queries, columns, fastrank._blas_dot_pairs), np.zeros(len(queries))

    # one ranking thread: with several, each scores its own matches and then its items, in any interleaving,
    # and ``off_by`` would move some matches up instead of down (the test then failed about every other run)
    monkeypatch.setattr(fastrank, "_ranking_threads", lambda: 1)
    with monkeypatch.context() as patch:
        patch.setattr(fastrank, "_blas_dot_pairs", off_by(0.5))
        assert_identical(evaluate(*data), reference)
    with monkeypatch.context() as patch:  # the same values, trusted without their bound
        patch.setattr(fastrank, "_blas_dot_pairs", off_by(0.5))
        patch.setattr(fastrank.FeatureKeys, "nearly", unbounded)
        assert not np.array_equal(evaluate(*data).ap, reference.ap)


@pytest.mark.parametrize("share", [0.0, 2.0], ids=["histogram", "sort"])
def test_both_ways_of_counting_give_the_loops_ranks(share, monkeypatch):
    """A pass counts the items before each match by a histogram (many candidates: hard features) or by sorting
    the candidates (few: trained features); forced either way, on either kind of data, the ranks are the loop's."""
    monkeypatch.setattr(fastrank, "_CANDIDATE_SHARE", share)
    for data in (market_like(8), hard_split(8), random_split(8, quantised=True), near_ties(3)):
        for ap in ("market", "step"):
            assert_identical(evaluate(*data, ap=ap, chunk_size=5), evaluate_naive(*data, ap=ap))


@pytest.mark.parametrize("threads", [1, 3])
def test_any_number_of_ranking_threads_gives_the_loops_ranks(threads, monkeypatch):
    """The passes and the near-ties of a chunk are shared out among threads; how many changes nothing."""
    monkeypatch.setattr(fastrank, "_ranking_threads", lambda: threads)
    monkeypatch.setattr(fastrank, "_PAIRS_PER_PASS", 2000)  # several passes a chunk
    for data in (hard_split(9), market_like(9)):
        assert_identical(evaluate(*data), evaluate_naive(*data))
