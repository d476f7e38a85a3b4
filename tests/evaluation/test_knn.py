"""exact_knn against a brute-force NumPy full-matrix ranking."""

import numpy as np
import pytest
import tensorflow as tf

from kdml.evaluation import exact_knn
from kdml.evaluation import knn as knn_module


def _budget_for_rows(rows, num_gallery, k):
    """A max_memory_bytes that yields `rows` query rows per block: 4 float32 copies of a
    (rows, chunk + k) tile, the chunk being the whole (small) gallery."""
    return rows * 4 * 4 * (num_gallery + k)


def _brute_force(queries, gallery, k, exclude_self, cosine=True):
    """Full (Q, N) similarity matrix in float64, stable sort: ties -> lower index first."""
    q = np.asarray(queries, np.float64)
    g = np.asarray(gallery, np.float64)
    if cosine:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = q @ g.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def test_block_size_follows_memory_budget():
    assert knn_module._rows_per_block(37, 53, _budget_for_rows(5, 53, 0)) == 5
    assert knn_module._rows_per_block(37, 53, _budget_for_rows(5, 53, 0) + 7) == 5
    assert knn_module._rows_per_block(37, 53, 1) == 1  # never below one row
    assert knn_module._rows_per_block(37, 53, 2**40) == 37  # never above Q


@pytest.mark.parametrize("k", [1, 4, 17])
def test_matches_brute_force_with_gallery(rng, k):
    queries = rng.normal(size=(37, 8)).astype(np.float32)
    gallery = rng.normal(size=(53, 8)).astype(np.float32)
    # 5 rows per block: 7 full blocks and a last partial block of 2 rows.
    indices, sims = exact_knn(
        queries, gallery, k=k, max_memory_bytes=_budget_for_rows(5, 53, k)
    )
    want_indices, want_sims = _brute_force(queries, gallery, k, exclude_self=False)
    assert indices.shape == (37, k) and indices.dtype == np.int64
    assert sims.shape == (37, k) and sims.dtype == np.float32
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 40])
def test_matches_brute_force_leave_one_out(rng, k):
    x = rng.normal(size=(41, 6)).astype(np.float32)
    indices, sims = exact_knn(x, k=k, max_memory_bytes=_budget_for_rows(4, 41, k))
    want_indices, want_sims = _brute_force(x, x, k, exclude_self=True)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert not np.any(indices == np.arange(41)[:, None])  # never its own neighbour


def test_full_k_leave_one_out_returns_every_other_item(rng):
    x = rng.normal(size=(9, 3)).astype(np.float32)
    indices, _ = exact_knn(x, k=8, max_memory_bytes=_budget_for_rows(2, 9, 8))
    for i, row in enumerate(indices):
        assert sorted(row.tolist()) == [j for j in range(9) if j != i]


def test_top_k_breaks_ties_by_lower_index():
    # The property exact_knn relies on, checked on TensorFlow itself.
    row = tf.constant([[0.5, 1.0, 0.5, 1.0, 0.2, 1.0, 0.5]])
    _, order = tf.math.top_k(row, k=7)
    assert order.numpy().tolist() == [[1, 3, 5, 0, 2, 6, 4]]


def test_ties_ordered_by_lower_gallery_index(rng):
    # Small integer vectors: inner products are exact, so ties are exact and frequent.
    queries = rng.integers(-1, 2, size=(23, 3)).astype(np.float32)
    gallery = rng.integers(-1, 2, size=(30, 3)).astype(np.float32)
    indices, sims = exact_knn(
        queries,
        gallery,
        k=12,
        similarity="inner_product",
        max_memory_bytes=_budget_for_rows(3, 30, 12),
    )
    want_indices, want_sims = _brute_force(queries, gallery, 12, False, cosine=False)
    np.testing.assert_array_equal(sims, want_sims.astype(np.float32))
    np.testing.assert_array_equal(indices, want_indices)
    # The data really has ties inside the returned lists.
    assert np.any(sims[:, 1:] == sims[:, :-1])


def test_ties_leave_one_out_and_hand_example():
    # Gallery rows 1, 2 and 4 all have inner product 1 with the query [1, 0];
    # row 0 (inner product 2) comes first, then the ties in index order.
    gallery = np.array([[2, 0], [1, 0], [1, 5], [0, 1], [1, -5]], np.float32)
    indices, sims = exact_knn(
        np.array([[1, 0]], np.float32), gallery, k=5, similarity="inner_product"
    )
    assert indices.tolist() == [[0, 1, 2, 4, 3]]
    assert sims.tolist() == [[2, 1, 1, 1, 0]]


def test_duplicates_retrieve_each_other():
    # Items 0, 2 and 5 are the same vector: each retrieves the other two first (cosine
    # 1, lower index first) although the query's own index is excluded.
    a, b, c, d = [1.0, 2.0, 2.0], [0.0, 1.0, -1.0], [-3.0, 0.0, 1.0], [1.0, 2.0, -2.0]
    x = np.array([a, b, a, d, c, a], np.float32)
    indices, sims = exact_knn(x, k=2, max_memory_bytes=_budget_for_rows(4, 6, 2))
    assert indices[0].tolist() == [2, 5]
    assert indices[2].tolist() == [0, 5]
    assert indices[5].tolist() == [0, 2]
    np.testing.assert_allclose(sims[[0, 2, 5]], 1.0, atol=1e-6)


def test_explicit_gallery_keeps_self_unless_asked(rng):
    x = rng.normal(size=(12, 4)).astype(np.float32)
    indices, sims = exact_knn(x, x, k=2)
    assert indices[:, 0].tolist() == list(range(12))  # each item is its own best match
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-6)
    loo, _ = exact_knn(x, k=2)
    explicit, _ = exact_knn(x, x, k=2, exclude_self=True)
    np.testing.assert_array_equal(explicit, loo)
    np.testing.assert_array_equal(loo[:, 0], indices[:, 1])


def test_cosine_ignores_norm_inner_product_does_not():
    query = np.array([[1.0, 0.0]], np.float32)
    gallery = np.array([[0.6, 0.8], [3.0, 4.1], [0.9, 0.1]], np.float32)
    cos_indices, cos_sims = exact_knn(query, gallery, k=3)
    # cosines: 0.6, 3 / sqrt(25.81) = 0.59051, 0.9 / sqrt(0.82) = 0.99388
    assert cos_indices.tolist() == [[2, 0, 1]]
    want = [[0.9 / np.sqrt(0.82), 0.6, 3.0 / np.sqrt(25.81)]]
    np.testing.assert_allclose(cos_sims, want, rtol=1e-6)
    ip_indices, ip_sims = exact_knn(query, gallery, k=3, similarity="inner_product")
    assert ip_indices.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(ip_sims, [[3.0, 0.9, 0.6]], rtol=1e-6)


def test_block_step_traced_once_per_shape(rng):
    x = rng.normal(size=(29, 5)).astype(np.float32)
    budget = _budget_for_rows(4, 29, 3)  # 8 blocks, the last one padded to 4 rows
    before = knn_module._block_top_k.experimental_get_tracing_count()
    exact_knn(x, k=3, max_memory_bytes=budget)
    traces = knn_module._block_top_k.experimental_get_tracing_count()
    assert traces <= before + 1  # the padded block reuses the full blocks' trace
    exact_knn(x + 1.0, k=3, max_memory_bytes=budget)
    assert knn_module._block_top_k.experimental_get_tracing_count() == traces


def test_tensor_float_32_off_during_search_and_restored(monkeypatch, rng):
    seen = []
    real_step = knn_module._block_top_k

    def spy(*args, **kwargs):
        seen.append(tf.config.experimental.tensor_float_32_execution_enabled())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(knn_module, "_block_top_k", spy)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    try:
        tf.config.experimental.enable_tensor_float_32_execution(True)
        exact_knn(x, k=2, max_memory_bytes=_budget_for_rows(2, 6, 2))
        assert seen == [False, False, False]
        assert tf.config.experimental.tensor_float_32_execution_enabled()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(previous)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: exact_knn(x[0], k=1), "2-D"),
        (lambda x: exact_knn(x, np.zeros((4, 3), np.float32), k=1), "same embedding dim"),
        (lambda x: exact_knn(x, k=5), "k=5"),
        (lambda x: exact_knn(x, k=0), "k=0"),
        (lambda x: exact_knn(x, x, k=7), "k=7"),
        (lambda x: exact_knn(x, k=2.0), "positive integer"),
        (lambda x: exact_knn(x, x[:3], k=1, exclude_self=True), "exclude_self"),
        (lambda x: exact_knn(x, k=1, similarity="l2"), "similarity"),
        (lambda x: exact_knn(x, k=1, max_memory_bytes=0), "max_memory_bytes"),
        (lambda x: exact_knn(np.where(x > 0, np.nan, x), k=1), "finite"),
        (lambda x: exact_knn(x.astype(str), k=1), "real numbers"),
    ],
)
def test_invalid_inputs_raise(call, message):
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    with pytest.raises(ValueError, match=message):
        call(x)


def test_k_error_names_gallery_size():
    x = np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match=r"1 <= k <= 4.*k=5, gallery size=5"):
        exact_knn(x, k=5)
    exact_knn(x, x, k=5)  # with self included, k = N is allowed


# --- blocked tiles, running top-k merge, bfloat16 pass, strategy ----------------------


@pytest.mark.parametrize("rows, chunk", [(1, 1), (3, 4), (7, 16), (64, 5), (64, 1000)])
def test_tiles_equal_brute_force_for_any_block_and_chunk(rows, chunk):
    # small integers: exact products, many exact ties across chunk boundaries
    rng = np.random.default_rng(rows * 100 + chunk)
    x = rng.integers(-1, 2, size=(45, 4)).astype(np.float32)
    k = 9
    indices, sims = exact_knn(x, k=k, similarity="inner_product", gallery_chunk=chunk,
                              max_memory_bytes=rows * 16 * (min(chunk, 45) + k))
    want_indices, want_sims = _brute_force(x, x, k, exclude_self=True, cosine=False)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(sims, want_sims.astype(np.float32))
    assert np.any(sims[:, 1:] == sims[:, :-1])  # ties were decided by index


@pytest.mark.parametrize("budget", [1, 5_000, 50_000, 2**30])
def test_memory_budget_changes_nothing_but_speed(rng, budget):
    queries = rng.normal(size=(70, 12)).astype(np.float32)
    gallery = rng.normal(size=(90, 12)).astype(np.float32)
    want, want_sims = _brute_force(queries, gallery, 6, exclude_self=False)
    indices, sims = exact_knn(queries, gallery, k=6, max_memory_bytes=budget, gallery_chunk=32)
    np.testing.assert_array_equal(indices, want)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)


def test_rows_per_block_follows_budget_with_chunks():
    # 4 float32 copies of a (rows, chunk + k) tile per block
    assert knn_module._rows_per_block(10_000, 8192 + 1000, 256 * 2**20) == (
        256 * 2**20 // (16 * 9192))
    # the bfloat16 re-scoring gather is counted per row
    assert knn_module._rows_per_block(10_000, 100, 10_000, extra_bytes_per_row=8400) == 1


def test_deterministic_bit_for_bit(rng):
    x = rng.normal(size=(300, 16)).astype(np.float32)
    first = exact_knn(x, k=20, max_memory_bytes=40_000, gallery_chunk=64)
    second = exact_knn(x, k=20, max_memory_bytes=40_000, gallery_chunk=64)
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1].tobytes() == second[1].tobytes()


def test_bfloat16_pass_has_float32_top1_on_separable_data(rng):
    centres = rng.normal(size=(40, 64))
    labels = np.repeat(np.arange(40), 5)
    x = (centres[labels] + 0.3 * rng.normal(size=(200, 64))).astype(np.float32)
    f32, f32_sims = exact_knn(x, k=5)
    bf16, bf16_sims = exact_knn(x, k=5, precision="bfloat16", gallery_chunk=48)
    np.testing.assert_array_equal(bf16[:, 0], f32[:, 0])
    # similarities are re-scored in float32, not bfloat16 (8-bit mantissa: ~4e-3)
    np.testing.assert_allclose(bf16_sims[:, 0], f32_sims[:, 0], atol=1e-5)
    assert bf16_sims.dtype == np.float32


def test_bfloat16_rescoring_keeps_the_lower_index_tie_rule():
    x = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [2, 0], [0, 1]], np.float32)
    indices, sims = exact_knn(x, k=3, precision="bfloat16", extra_candidates=2)
    assert indices[0].tolist() == [1, 3, 4]
    assert indices[4].tolist() == [0, 1, 3]
    np.testing.assert_allclose(sims[0], [1, 1, 1], atol=1e-6)


def test_strategy_shards_queries_with_identical_results(mirrored, rng):
    assert mirrored.num_replicas_in_sync == 2
    x = rng.normal(size=(53, 8)).astype(np.float32)
    want = exact_knn(x, k=7, max_memory_bytes=16 * (53 + 7) * 5)  # 5-row blocks
    got = exact_knn(x, k=7, max_memory_bytes=16 * (53 + 7) * 5, strategy=mirrored)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


# --- group-maxima selection inside each tile ------------------------------------------


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("k, chunk, exclude_self", [(1, 512, False), (3, 512, True),
                                                    (10, 2048, False), (10, 300, True)])
def test_group_selection_equals_stable_sort_with_ties(monkeypatch, k, chunk, exclude_self,
                                                      compiled):
    # 2,003 items (not a multiple of any group size: a group mixes gallery and padded
    # columns), 3-valued vectors: exact products and ties everywhere, chunks of 16-32
    # column groups; the merge by TensorFlow ops, or as one XLA program (CPU).
    monkeypatch.setattr(knn_module, "_MIN_COMPILED_TILE", 0 if compiled else 2**62)
    rng = np.random.default_rng(k * 1000 + chunk)
    x = rng.integers(-1, 2, size=(2003, 5)).astype(np.float32)
    assert knn_module._group_size(chunk, k) > 1
    queries = x if exclude_self else x[:300]
    indices, sims = exact_knn(queries, None if exclude_self else x, k=k,
                              similarity="inner_product", gallery_chunk=chunk)
    want_indices, want_sims = _brute_force(queries, x, k, exclude_self, cosine=False)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(sims, want_sims.astype(np.float32))


def test_group_selection_with_a_zero_similarity_padding_group():
    # All similarities negative: a padded column (zero vector, score 0) would beat every
    # item if its group were not masked.
    rng = np.random.default_rng(7)
    gallery = -np.abs(rng.normal(size=(1001, 4))).astype(np.float32)
    queries = np.abs(rng.normal(size=(20, 4))).astype(np.float32)
    indices, sims = exact_knn(queries, gallery, k=5, gallery_chunk=512)
    want_indices, want_sims = _brute_force(queries, gallery, 5, exclude_self=False)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert (sims < 0).all()


@pytest.mark.parametrize("plain_merge", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_compiled_and_plain_merges_equal_stable_sort_with_ties(monkeypatch, plain_merge,
                                                               exclude_self):
    # The CPU merges each tile in one XLA program, a GPU with TensorFlow's kernels:
    # both equal a NumPy stable sort on tie-heavy data, over several chunks and blocks.
    if plain_merge:
        monkeypatch.setattr(knn_module, "_on_cpu", lambda devices: False)
    else:  # compiled for tiles of any size
        monkeypatch.setattr(knn_module, "_MIN_COMPILED_TILE", 0)
    rng = np.random.default_rng(11 + exclude_self)
    x = rng.integers(-1, 2, size=(1500, 4)).astype(np.float32)
    queries = x if exclude_self else x[:130]
    calls = []
    monkeypatch.setattr(knn_module, "_merge_tile_compiled", _recording(
        knn_module._merge_tile_compiled, calls))
    indices, sims = exact_knn(queries, None if exclude_self else x, k=7,
                              similarity="inner_product", gallery_chunk=400,
                              max_memory_bytes=64 * 16 * (400 + 7))
    want_indices, want_sims = _brute_force(queries, x, 7, exclude_self, cosine=False)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(sims, want_sims.astype(np.float32))
    assert np.any(sims[:, 1:] == sims[:, :-1])  # ties were decided by index
    assert bool(calls) != plain_merge  # the path under test was the one taken


def _recording(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("budget", [1, 10**6, 64 * 2**20, 256 * 2**20, 2**32])
@pytest.mark.parametrize("on_cpu", [True, False])
def test_tile_shape_within_the_budget(budget, on_cpu):
    # 1,000,000 x 128, k = 10: 4 float32 (rows, chunk + k) copies within max_memory_bytes
    # (one row at least); on CPU a tile of at most 64 MiB (64 rows at least)
    rows, chunk, group = knn_module._tile_shape(10_000, 1_000_000, 10, budget, on_cpu)
    assert chunk == (16384 if on_cpu else 8192) and chunk % group == 0
    assert rows == 1 or 4 * 4 * rows * (chunk + 10) <= budget
    assert 4 * 4 * (rows + 1) * (chunk + 10) > budget or rows == 10_000 or (
        on_cpu and rows == 64 * 2**20 // (4 * chunk))
    if on_cpu and rows > 64:
        assert 4 * rows * chunk <= 64 * 2**20


def test_cpu_tiles_at_the_default_budget():
    # 256 MiB // (16 * (16,384 + 10)) = 1,023 rows of 16,384 columns, groups of 32
    # (2 ** round(log2(sqrt(16,384 / 10))))
    assert knn_module._tile_shape(10_000, 1_000_000, 10, 256 * 2**20, True) == (1023, 16384, 32)
    assert knn_module._tile_shape(10_000, 1_000_000, 10, 256 * 2**20, False)[1:] == (8192, 32)
