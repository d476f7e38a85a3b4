"""retrieval_ranking (one product pass) against a stable-sort NumPy ranking and exact_knn."""

import numpy as np
import pytest
import tensorflow as tf

from kdml.evaluation import exact_knn, retrieval_metrics, retrieval_ranking
from kdml.evaluation import ranking as ranking_module


def _stable_ranking(queries, gallery, exclude_self):
    """Full float64 similarity, stable sort: ties -> lower gallery index first."""
    sims = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    return order[:, : len(gallery) - int(exclude_self)]


def _first_positive(order, query_labels, gallery_labels):
    """Position of the first same-class item in each row of `order`, -1 if none."""
    matches = gallery_labels[order] == query_labels[:, None]
    return np.where(matches.any(axis=1), matches.argmax(axis=1), -1)


def _tied_data(rng, n, dim=3):
    # small integers: exact inner products, so exact ties everywhere
    return rng.integers(-2, 3, size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("budget", [1, 3 * 4 * 64, 2**30])  # 1, 3 and all rows per block
def test_leave_one_out_ranks_and_top_k_equal_stable_sort_with_ties(rng, budget):
    x = _tied_data(rng, 61)
    labels = rng.integers(0, 15, size=61)
    got = retrieval_ranking(x, labels, top_k=9, similarity="inner_product",
                            max_memory_bytes=budget)
    order = _stable_ranking(x, x, exclude_self=True)
    np.testing.assert_array_equal(got.first_positive_rank, _first_positive(order, labels, labels))
    np.testing.assert_array_equal(got.top_k, order[:, :9])
    assert got.first_positive_rank.dtype == np.int64 and got.top_k.dtype == np.int64
    # not vacuous: ties inside the lists, and queries without a positive (-1)
    sims = np.take_along_axis(x @ x.T, order[:, :9], axis=1)
    assert np.any(sims[:, 1:] == sims[:, :-1])
    assert np.any(got.first_positive_rank == -1) and np.any(got.first_positive_rank > 3)


@pytest.mark.parametrize("top_k", [0, 1, 4, 40])
def test_query_vs_gallery_equals_stable_sort(rng, top_k):
    queries, gallery = _tied_data(rng, 23), _tied_data(rng, 47)
    query_labels, gallery_labels = rng.integers(0, 12, 23), rng.integers(0, 10, 47)
    got = retrieval_ranking(queries, query_labels, gallery, gallery_labels, top_k=top_k,
                            similarity="inner_product", max_memory_bytes=4 * 4 * 48)
    order = _stable_ranking(queries, gallery, exclude_self=False)
    want = _first_positive(order, query_labels, gallery_labels)
    np.testing.assert_array_equal(got.first_positive_rank, want)
    assert np.any(want == -1)  # classes 10, 11 are not in the gallery
    if top_k:
        np.testing.assert_array_equal(got.top_k, order[:, :top_k])
    else:
        assert got.top_k is None


@pytest.mark.filterwarnings("ignore:.*R = 0")
def test_counting_recall_equals_top_k_recall_for_every_k(rng):
    # Recall@K by counting (one pass) == Recall@K from exact_knn's full neighbour lists,
    # for every K from 1 to N - 1, on cosine data with exact ties (duplicated rows).
    x = _tied_data(rng, 40, dim=2)  # 2-D integer vectors: many duplicate directions
    labels = rng.integers(0, 8, size=40)
    ks = tuple(range(1, 40))
    got = retrieval_metrics(x, labels, ks=ks, nmi=False, max_memory_bytes=5 * 4 * 40)
    neighbours, sims = exact_knn(x, k=39)
    hits = np.cumsum(labels[neighbours] == labels[:, None], axis=1) > 0
    for k in ks:
        assert got[f"recall@{k}"] == pytest.approx(hits[:, k - 1].mean(), abs=1e-12), k
    assert np.any(np.isclose(sims[:, 1:], sims[:, :-1], atol=0))  # ties decided by index


def test_float_data_matches_exact_knn(rng):
    centres = rng.normal(size=(30, 32))
    labels = rng.integers(0, 30, size=300)
    x = (centres[labels] + 2.0 * rng.normal(size=(300, 32))).astype(np.float32)
    got = retrieval_ranking(x, labels, top_k=12, max_memory_bytes=7 * 4 * 300)
    neighbours, _ = exact_knn(x, k=299)
    np.testing.assert_array_equal(got.top_k, neighbours[:, :12])
    np.testing.assert_array_equal(got.first_positive_rank,
                                  _first_positive(neighbours, labels, labels))
    assert 0.1 < np.mean(got.first_positive_rank == 0) < 0.95


def test_group_selection_keeps_the_top_k(rng):
    # groups of G columns: the top k must survive any group size (G = 1 ... 64)
    x = _tied_data(rng, 300, dim=4)
    labels = rng.integers(0, 50, size=300)
    order = _stable_ranking(x, x, exclude_self=True)
    for top_k in (1, 2, 7, 30, 299):
        got = retrieval_ranking(x, labels, top_k=top_k, similarity="inner_product")
        np.testing.assert_array_equal(got.top_k, order[:, :top_k])
    assert ranking_module._group_size(11, 60_502) == 64
    assert ranking_module._group_size(1000, 60_502) == 8
    assert ranking_module._group_size(0, 60_502) == 64  # the count's groups


def test_strategy_shards_queries_with_identical_results(mirrored, rng):
    x = rng.normal(size=(53, 8)).astype(np.float32)
    labels = rng.integers(0, 9, size=53)
    want = retrieval_ranking(x, labels, top_k=5, max_memory_bytes=5 * 4 * 56)
    got = retrieval_ranking(x, labels, top_k=5, max_memory_bytes=5 * 4 * 56, strategy=mirrored)
    np.testing.assert_array_equal(got.first_positive_rank, want.first_positive_rank)
    np.testing.assert_array_equal(got.top_k, want.top_k)


def test_block_step_traced_once(rng):
    x = rng.normal(size=(29, 5)).astype(np.float32)
    labels = rng.integers(0, 4, size=29)
    retrieval_ranking(x, labels, top_k=3, max_memory_bytes=4 * 4 * 32)
    traces = ranking_module._strip_ranking.experimental_get_tracing_count()
    retrieval_ranking(x + 1.0, labels, top_k=3, max_memory_bytes=4 * 4 * 32)  # 8 blocks
    assert ranking_module._strip_ranking.experimental_get_tracing_count() == traces


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y: retrieval_ranking(x, y, top_k=5), r"top_k.*\[0, 4\].*top_k=5"),
        (lambda x, y: retrieval_ranking(x, y, top_k=-1), "top_k=-1"),
        (lambda x, y: retrieval_ranking(x, y[:3]), "one label per row"),
        (lambda x, y: retrieval_ranking(x, y.astype(float)), "integer"),
        (lambda x, y: retrieval_ranking(x, y, x[:, :1], y), "same embedding dimension"),
        (lambda x, y: retrieval_ranking(x, y, x[:3], y[:3], exclude_self=True), "exclude_self"),
        (lambda x, y: retrieval_ranking(x, y, gallery_labels=y), "without `gallery`"),
        (lambda x, y: retrieval_ranking(x, y, similarity="l2"), "similarity"),
        (lambda x, y: retrieval_ranking(x, y, max_memory_bytes=0), "max_memory_bytes"),
    ],
)
def test_invalid_inputs_raise(call, message):
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    with pytest.raises(ValueError, match=message):
        call(x, np.array([0, 0, 1, 1, 2]))


@pytest.mark.parametrize("width, budget", [(60_544, 256 * 2**20), (60_544, 2**30),
                                           (60_544, 50 * 2**20), (1_000, 10**6), (64, 1),
                                           (100, 3 * 8 * 100), (100, 70 * 8 * 100)])
def test_block_rows_fill_the_memory_budget(width, budget):
    # the most rows whose two float32 (rows, width) strips fit the budget, a multiple of
    # 64 from 64 rows on, within [1, 256]
    copies = ranking_module._LIVE_STRIP_COPIES
    rows = ranking_module._block_rows(10**6, width, budget)
    assert 1 <= rows <= 256
    assert rows == 1 or copies * 4 * width * rows <= budget
    step = 64 if rows >= 64 else 1
    assert rows == 256 or copies * 4 * width * (rows + step) > budget
    assert rows < 64 or rows % 64 == 0


def test_block_rows_at_sop_size_and_small_query_sets():
    # SOP, default budget: 256 MiB // (2 * 4 * 60,544) = 554 rows, capped at 256
    assert ranking_module._block_rows(60_502, 60_544, 256 * 2**20) == 256
    assert ranking_module._block_rows(60_502, 60_544, 100 * 2**20) == 192  # 216 -> 192
    assert ranking_module._block_rows(37, 60_544, 2**40) == 37  # never above Q


def test_64_row_blocks_with_a_padded_last_block_equal_stable_sort(rng):
    # 203 tie-heavy items in blocks of 64 rows (the last one padded), the gallery padded
    # by one zero column to a multiple of the group size: first-positive ranks, top-k
    # and every Recall@K from counting equal the stable sort's lists
    x = _tied_data(rng, 203, dim=3)
    labels = rng.integers(0, 90, size=203)
    width = 204  # groups of 4 columns for top_k = 9
    assert ranking_module._group_size(9, 203) == 4
    budget = 64 * ranking_module._LIVE_STRIP_COPIES * 4 * width
    assert ranking_module._block_rows(203, width, budget) == 64
    got = retrieval_ranking(x, labels, top_k=9, similarity="inner_product",
                            max_memory_bytes=budget)
    order = _stable_ranking(x, x, exclude_self=True)
    first = _first_positive(order, labels, labels)
    np.testing.assert_array_equal(got.first_positive_rank, first)
    np.testing.assert_array_equal(got.top_k, order[:, :9])
    hits = np.cumsum(labels[order] == labels[:, None], axis=1) > 0  # top-K lists
    rank = got.first_positive_rank
    for k in range(1, 203):  # Recall@K by counting == from the top-K lists, every K
        np.testing.assert_array_equal((rank >= 0) & (rank < k), hits[:, k - 1])
    assert np.any(first > 9) and np.any(first == -1)
    # not vacuous: best positives below 0, where the padded column's 0 ranks before them
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    best = np.where(labels[None, :] == labels[:, None], sims, -np.inf).max(axis=1)
    assert np.any((best < 0) & (best > -np.inf))


@pytest.mark.parametrize("exclude_self", [False, True])
def test_all_negative_scores_with_a_padded_gallery(rng, exclude_self):
    # Every score below 0: the padded columns (zero vectors, score 0) would rank first
    # and take a top group if the count and the group selection did not set them aside
    # (with exclude_self, query i is gallery column i, left out: one more group).
    gallery = -rng.integers(1, 4, size=(1001, 4)).astype(np.float32)
    queries = rng.integers(0, 3, size=(1001 if exclude_self else 40, 4)).astype(np.float32)
    gallery_labels = rng.integers(0, 50, 1001)
    query_labels = rng.integers(0, 50, len(queries))
    got = retrieval_ranking(queries, query_labels, gallery, gallery_labels, top_k=5,
                            exclude_self=exclude_self, similarity="inner_product",
                            max_memory_bytes=16 * 8 * 1024)
    assert ranking_module._round_up(1001, ranking_module._group_size(5, 1001)) > 1001
    order = _stable_ranking(queries, gallery, exclude_self=exclude_self)
    np.testing.assert_array_equal(got.top_k, order[:, :5])
    np.testing.assert_array_equal(got.first_positive_rank,
                                  _first_positive(order, query_labels, gallery_labels))
    assert (queries @ gallery.T <= 0).all() and np.any(queries @ gallery.T < 0)


def test_padded_group_never_takes_a_needed_groups_place():
    # One strip row, groups of 2, 9 gallery columns + 1 padded column (score 0, above
    # every real score). The query is column 0, the best real score. The 3 best group
    # maxima are the padded group, the query's own and column 2's: k = 2 needs a 4th
    # group (column 4's), which only the padded group's extra pick brings in.
    strip = np.full((1, 10), -1.0, np.float32)
    strip[0, [0, 2, 4, 6, 9]] = [-0.1, -0.2, -0.3, -0.4, 0.0]
    bias = np.zeros(10, np.float32)
    bias[9] = -np.inf
    ranks, top_k, _, _ = ranking_module._strip_ranking(
        tf.constant(strip), tf.constant([0], tf.int32), tf.constant([[6]], tf.int32),
        tf.constant(bias), 2, 2, 4, 1, 1)  # k = 2, groups of 2, 4 picked, tier 1, 1 padded
    assert ranking_module._picked_groups(2, 5, 1) == 5  # at least 12 in use: all of them
    assert top_k.numpy().tolist() == [[2, 4]]
    assert ranks.numpy().tolist() == [2]  # columns 2 and 4 before column 6


@pytest.mark.parametrize("tier_rows", [32, 1, 7])
def test_rows_beyond_the_picked_groups_are_counted_over_whole_rows(rng, monkeypatch, tier_rows):
    # Rows whose best positive has more groups at or above its score than the 12 picked
    # (first positive ranked after about 12 items) are counted over the whole row, a tier
    # of rows per loop step (7: the last tier's start clamped into the 64-row block).
    # Every tier size gives the stable sort's ranks.
    monkeypatch.setattr(ranking_module, "_TIER_ROWS", tier_rows)
    x = _tied_data(rng, 300, dim=4)
    labels = rng.integers(0, 40, size=300)
    budget = 64 * ranking_module._LIVE_STRIP_COPIES * 4 * 300
    got = retrieval_ranking(x, labels, similarity="inner_product",
                            max_memory_bytes=budget)
    order = _stable_ranking(x, x, exclude_self=True)
    np.testing.assert_array_equal(got.first_positive_rank, _first_positive(order, labels, labels))
    # not vacuous: in NumPy, rows with more than 12 groups (of 4 columns) reaching the
    # best positive's score: more than one tier in a 64-row block, not every row
    sims = x @ x.T
    best = np.where((labels[None, :] == labels[:, None]) & ~np.eye(300, dtype=bool), sims,
                    -np.inf).max(axis=1)
    assert ranking_module._group_size(0, 300) == 4
    reached = (sims.reshape(300, 75, 4).max(axis=2) >= best[:, None]).sum(axis=1)
    unsettled = (reached > 12) & (best > -np.inf)
    assert 7 < unsettled[:64].sum() < 64


def test_unsettled_rows_count_equals_a_numpy_stable_sort(rng):
    # One 8-row strip, groups of 4 columns, 2 picked: most rows are unsettled and counted
    # over their whole row (tiers of 3 rows); every rank equals a NumPy stable sort.
    strip = rng.integers(-3, 4, size=(8, 64)).astype(np.float32)
    positive_columns = np.stack([8 + rng.choice(56, 3, replace=False) for _ in range(8)])
    positive_columns = positive_columns.astype(np.int32)
    positive_columns[0] = -1  # no positive: rank -1
    self_index = np.arange(8, dtype=np.int32)
    ranks, _, _, _ = ranking_module._strip_ranking(
        tf.constant(strip), tf.constant(self_index), tf.constant(positive_columns),
        tf.constant(np.zeros(64, np.float32)), 0, 4, 2, 3)  # tiers of 3 rows
    want = []
    for row in range(8):
        if (positive_columns[row] < 0).all():
            want.append(-1)
            continue
        scores = np.where(np.arange(64) == self_index[row], -np.inf, strip[row])
        order = np.argsort(-scores, kind="stable")
        want.append(int(np.flatnonzero(np.isin(order, positive_columns[row]))[0]))
    np.testing.assert_array_equal(ranks.numpy(), want)
    assert max(want) > 8  # rows beyond 2 groups of 4 columns: unsettled


def test_full_ranking_budget_counts_one_strip_per_positive(rng, monkeypatch):
    # full_ranking compares every score with each positive's at once: the block budget
    # holds 2 + P strips (P: the largest class), so blocks shrink with the class size
    calls = []
    block_rows = ranking_module._block_rows
    monkeypatch.setattr(ranking_module, "_block_rows",
                        lambda *args: calls.append(args) or block_rows(*args))
    x = rng.normal(size=(40, 4)).astype(np.float32)
    labels = np.repeat(np.arange(8), 5)
    budget = 64 * 7 * 4 * 40
    retrieval_ranking(x, labels, max_memory_bytes=budget)
    retrieval_ranking(x, labels, max_memory_bytes=budget, full_ranking=True)
    assert [args[3] for args in calls] == [2, 2 + 5]
    assert block_rows(10**6, 40, budget, 7) == 64 and block_rows(10**6, 40, budget, 2) == 192  # 224 -> 192
