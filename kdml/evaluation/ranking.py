"""Ranking statistics of every query in one blocked product pass: no neighbour lists.

`retrieval_ranking` computes, for each query, the rank of its first positive (the
gallery items of its class) and, when asked, its `top_k` nearest gallery items, from one
pass of `(B, M)` strips `S = Q_b G^T` (one `tf.linalg.matmul` per block of B query rows
against the whole gallery, stored transposed as `(d, M)`; cosine or inner product),
never the `(Q, M)` matrix and never a top-K list per K:

- Recall@K for every K needs one number per query: the rank of its first positive =
  the items ranked before its best positive `p` (score `s_p`): `S > s_p`, or
  `S == s_p` and a lower gallery index than `p`. The query is a hit at K iff
  `rank < K`, for every K at once. No other positive can be ranked before `p` (it is
  the best, and the lowest index among equals), so the count needs no class mask: only
  the query itself (leave-one-out) is taken back out, from its own score.
- `s_p` and `p` (the lowest-index positive among those tied at the maximum) are
  gathered from the same strip at the query's positive columns: the count compares
  the very floats that rank the items, whatever the matmul's summation order.
- One read of the strip takes its maxima over groups of `G` columns, and `top_k` over
  them picks each row's `K` best groups (`K = max(k + 1, 12)`, one more when the
  gallery is zero-padded to a multiple of `G`, for the padded columns' 0 in the last
  group). Both the count and the top-k read only those `K G` scores where they can:
  - The count: an item ranked before `p` lies in a group whose maximum reaches `s_p`,
    and those are a row's best groups; when there are at most `K` of them (the first
    positive within about `K` items: most queries of a useful embedding), they are all
    among the picked ones. The other rows are counted over their whole row, in tiers
    of 32 rows, as many tiers as there are such rows.
  - MAP@R and R-Precision need only the R nearest (R the class size; `top_k = max R`,
    11 for SOP), Precision@K the K nearest. `tf.math.top_k` over M scores per row
    costs as much as the product here; the top k items lie in the `k + 1` best groups
    (the `+ 1` for the query's own group when it is in the gallery): every group ranked
    after them has `k` items other than the query ranked before each of its items.
  `G` is a power of two near `sqrt(M / K)`: 64 for SOP.

Ties: exactly as `kdml.evaluation.knn.exact_knn`: equal scores are ordered by lower
gallery index (`tf.math.top_k` keeps the lower position first; the chosen groups are
sorted by index before the final `top_k`). The result equals ranking by a stable sort.

Memory: the `(d, M)` gallery (and, unless leave-one-out, the `(Q, d)` queries) on the
device, plus the `(B, M)` float32 strip and the program's temporaries (two 32-row
tiers; with `full_ranking`, one strip-sized comparison per positive). The budget counts
two strips per block (`2 + P` with `full_ranking`): `B = max_memory_bytes // (8 M)`, at
most 256 rows (a multiple of 64 from 64 on): 256 rows for SOP at the default 256 MiB, a
whole-process peak of 1.48 GB (`tools/bench_eval.py`: TensorFlow, tensorflow-similarity
and the data included). The gallery is normalised and transposed in slices of rows,
concatenated once. Under a `tf.distribute` strategy the query blocks are dealt to the
replicas, each with its own gallery copy, as in `exact_knn`.

Speed: each block is TensorFlow's `tf.linalg.matmul` (oneDNN on CPU), outside XLA, then
one XLA program reads the strip once for the group maxima and then only the picked
groups and the unsettled rows. XLA's own CPU dot was the slow part when the product was
inside that program (a quarter of SOP, 64-row blocks: 2.1 s for the XLA product pass
against 1.25 s), and blocks of 256 rows run the product at its peak: at SOP size the
bare pass took the same time with 256 and 512 rows, and larger blocks took kdml's
process past 1.5 GB. The product is `Q_b @ G^T` with `G^T` stored, not `matmul(...,
transpose_b=True)` (about half the speed on CPU for these shapes). Measured cost at SOP
size: `docs/evaluation.md`.
"""

import collections
import math

import numpy as np
import tensorflow as tf

from kdml.evaluation.knn import (
    _as_float32_matrix,
    _full_float32_matmul,
    _group_size as _tile_group_size,
    _replica_devices,
    _replica_rounds,
)

RetrievalRanking = collections.namedtuple(
    "RetrievalRanking", ["first_positive_rank", "top_k", "average_precision", "ndcg"],
    defaults=(None, None))
RetrievalRanking.__doc__ = """Result of `retrieval_ranking`.

`first_positive_rank`: `(Q,)` int64, the number of gallery items ranked before the
query's first positive (0 = the nearest is a positive), -1 when the query has none.
`top_k`: `(Q, top_k)` int64 gallery indices in decreasing similarity (ties: lower
index first), or `None` when `top_k=0`.
`average_precision`: `(Q,)` float64 AP over the whole ranking (NaN without positives),
with `full_ranking=True`, else None. `ndcg`: `(Q, len(ndcg_ks))` float64 NDCG@K
(binary relevance; NaN without positives), or None.
"""

# Rows per block at most. SOP size, 2 cores: the bare product pass takes about the same
# time with 256 and 512 rows, and with 384 or 512-row blocks kdml's process peaked at
# 1.59 and 1.62 GB (the 1.5 GB target: 1.48 GB with 256 rows).
_MAX_BLOCK_ROWS = 256
# float32 (B, M) arrays the budget counts per block: the strip, and as much again for
# the temporaries (the whole-row count's tiers, XLA's buffers); with `full_ranking`, one
# more per positive (the comparisons with every positive score are materialised).
_LIVE_STRIP_COPIES = 2
# Blocks of more rows are rounded down to a multiple of this (the product's register tiles).
_ROW_MULTIPLE = 64
_NO_CLASS = -2  # a query whose class has no gallery item
# Groups taken per row at least: the count reads them alone for a query whose best
# positive has at most this many groups reaching its score (its first positive ranks
# within about as many items).
_MIN_PICKED_GROUPS = 12
# Rows per step of the whole-row count of unsettled rows (its temporaries: two
# `(_TIER_ROWS, M)` float32 arrays).
_TIER_ROWS = 32


def retrieval_ranking(queries, query_labels, gallery=None, gallery_labels=None, *, top_k=0,
                      exclude_self=None, similarity="cosine", max_memory_bytes=256 * 2**20,
                      strategy=None, full_ranking=False, ndcg_ks=()):
    """Rank of each query's first positive and its `top_k` neighbours, in one pass.

    Args:
        queries: `(Q, d)` real array.
        query_labels: `(Q,)` integer classes.
        gallery: `(M, d)` real array, or `None` for leave-one-out (`M = Q`).
        gallery_labels: `(M,)` integer classes (`None` with `gallery=None`).
        top_k: neighbours to return per query, `0 <= top_k <= M` (`M - 1` without
            the query itself); 0 returns none and skips the top-k selection.
        exclude_self: whether query i is gallery item i and never its own neighbour;
            `None`: `True` for leave-one-out, else `False`.
        similarity: `"cosine"` (rows L2-normalised) or `"inner_product"`.
        max_memory_bytes: budget of the block's `(B, M)` float32 arrays, two of them
            (`2 + P` with `full_ranking`, P the largest class): query rows per block
            `B = max_memory_bytes // (8 M)`, between 1 and 256, rounded down to a
            multiple of 64 from 64 rows on (256 rows for SOP).
        strategy: optional `tf.distribute.Strategy`; its replicas score disjoint
            query blocks, each against its own copy of the gallery.
        full_ranking: also the rank of every positive, counted in the same strip
            (one comparison per score and positive, fused with the first count), and
            from them each query's average precision over the whole ranking
            `(1/R) sum_j j / (rank_j + 1)` (rank_j: 0-based rank of its j-th positive)
            and its NDCG@K for each K of `ndcg_ks`: `sum_{rank_j < K} 1 / log2(rank_j + 2)`
            over the ideal `sum_{i < min(K, R)} 1 / log2(i + 2)`.
        ndcg_ks: the K of NDCG@K (needs `full_ranking=True`).

    Returns:
        `RetrievalRanking(first_positive_rank (Q,) int64, top_k (Q, top_k) int64 or
        None, average_precision (Q,) or None, ndcg (Q, len(ndcg_ks)) or None)`.

    Example:

    >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> retrieval_ranking(x, np.array([0, 1, 1, 0])).first_positive_rank.tolist()
    [1, 2, 1, 2]

    (Query 0's positive, item 3, comes after item 1 (cosine 0.99) and before item 2
    (cosine 0): one item is ranked before it.)
    """
    if similarity not in ("cosine", "inner_product"):
        raise ValueError("Expected `similarity` to be 'cosine' or 'inner_product'. "
                         f"Received: similarity={similarity!r}")
    queries = _as_float32_matrix(queries, "queries")
    query_labels = _as_labels(query_labels, "query_labels", len(queries))
    if gallery is None:
        if gallery_labels is not None:
            raise ValueError("`gallery_labels` was given without `gallery`. Pass both or neither.")
        gallery_matrix, gallery_labels = queries, query_labels
        exclude_self = True if exclude_self is None else bool(exclude_self)
    else:
        gallery_matrix = _as_float32_matrix(gallery, "gallery")
        gallery_labels = _as_labels(gallery_labels, "gallery_labels", len(gallery_matrix))
        exclude_self = False if exclude_self is None else bool(exclude_self)
    num_queries, dim = queries.shape
    num_gallery = len(gallery_matrix)
    if gallery_matrix.shape[1] != dim:
        raise ValueError(
            "Expected `queries` and `gallery` of the same embedding dimension. Received: "
            f"queries.shape={queries.shape}, gallery.shape={gallery_matrix.shape}")
    if exclude_self and num_queries != num_gallery:
        raise ValueError(
            "`exclude_self=True` needs query i to be gallery item i (as many rows). "
            f"Received: queries.shape={queries.shape}, gallery.shape={gallery_matrix.shape}")
    limit = num_gallery - int(exclude_self)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not (
            0 <= top_k <= limit):
        raise ValueError(f"Expected `top_k` to be an integer in [0, {limit}] (the gallery "
                         f"size{' minus the query itself' if exclude_self else ''}). "
                         f"Received: top_k={top_k!r}")
    if (isinstance(max_memory_bytes, bool) or not isinstance(max_memory_bytes, (int, np.integer))
            or max_memory_bytes <= 0):
        raise ValueError("Expected `max_memory_bytes` to be a positive integer. "
                         f"Received: max_memory_bytes={max_memory_bytes!r}")
    top_k = int(top_k)
    ndcg_ks = tuple(int(k) for k in ndcg_ks)
    if ndcg_ks and not full_ranking:
        raise ValueError("`ndcg_ks` needs `full_ranking=True` (NDCG comes from the rank of "
                         f"every positive). Received: ndcg_ks={ndcg_ks}")
    if any(k < 1 for k in ndcg_ks):
        raise ValueError(f"Expected every K of `ndcg_ks` >= 1. Received: {ndcg_ks}")
    full_ranking = bool(full_ranking)

    # Dense class ids: gallery classes 0..C-1, query classes absent from the gallery -2.
    classes, gallery_class = np.unique(gallery_labels, return_inverse=True)
    position = np.minimum(np.searchsorted(classes, query_labels), len(classes) - 1)
    query_class = np.where(classes[position] == query_labels, position, _NO_CLASS)
    group = _group_size(top_k, num_gallery)
    width = _round_up(num_gallery, group)
    gallery_class = gallery_class.astype(np.int32)
    picked = _picked_groups(top_k, width // group, width - num_gallery)

    # each query's positives: its class's gallery items (class-sorted order), -1 padded
    gallery_order = np.argsort(gallery_class, kind="stable").astype(np.int32)
    class_start = np.searchsorted(gallery_class[gallery_order], np.arange(len(classes)))
    class_size = np.bincount(gallery_class, minlength=len(classes))
    max_positives = int(class_size.max())
    # full_ranking compares every score with each of the P positive scores at once
    block = _block_rows(num_queries, width, int(max_memory_bytes),
                        _LIVE_STRIP_COPIES + (max_positives if full_ranking else 0))

    def positive_columns(query_rows, class_ids):
        known = class_ids >= 0
        sizes = np.where(known, class_size[np.maximum(class_ids, 0)], 0)
        slots = np.arange(max_positives)
        index = np.where(known, class_start[np.maximum(class_ids, 0)], 0)[:, None] + slots
        columns = np.where(slots < sizes[:, None],
                           gallery_order[np.minimum(index, num_gallery - 1)], -1)
        if exclude_self:
            columns[columns == query_rows[:, None]] = -1
        return columns.astype(np.int32)

    devices = _replica_devices(strategy)
    first_rank = np.empty(num_queries, np.int64)
    neighbours = np.empty((num_queries, top_k), np.int64) if top_k else None
    average_precision = np.empty(num_queries, np.float64) if full_ranking else None
    ndcg = np.empty((num_queries, len(ndcg_ks)), np.float64) if full_ranking else None
    # padded columns score -inf in the count and the group maxima
    column_bias = np.zeros(width, np.float32)
    column_bias[num_gallery:] = -np.inf
    leave_one_out = gallery_matrix is queries
    step = dict(top_k=top_k, group=group, picked=picked, tier_rows=min(_TIER_ROWS, block),
                padding=width - num_gallery, full_ranking=full_ranking, ndcg_ks=ndcg_ks)
    with _full_float32_matmul():
        per_device = []
        for device in devices:
            with tf.device(device):
                gallery_t = _normalised_transposed(gallery_matrix, similarity, width)
                # leave-one-out: the query blocks are read from the gallery's columns
                query_tensor = None if leave_one_out else _normalised(queries, similarity)
                per_device.append((query_tensor, gallery_t, tf.constant(column_bias)))
        for blocks in _replica_rounds(num_queries, block, len(devices)):
            outputs = []
            for replica, start, stop in blocks:
                device = devices[replica]
                query_tensor, gallery_t, bias = per_device[replica]
                classes_here = np.full(block, _NO_CLASS, np.int32)
                classes_here[: stop - start] = query_class[start:stop]
                self_index = (np.arange(start, start + block, dtype=np.int32) if exclude_self
                              else np.full(block, -1, np.int32))
                if exclude_self:
                    self_index[stop - start:] = -1
                with tf.device(device):
                    if leave_one_out:
                        query_block = tf.transpose(gallery_t[:, start:stop])
                    else:
                        query_block = query_tensor[start:stop]
                    if stop - start < block:  # keep the traced shape: zero-pad the last block
                        query_block = tf.pad(query_block, [[0, block - (stop - start)], [0, 0]])
                    result = _block_ranking(
                        query_block, tf.constant(self_index),
                        tf.constant(positive_columns(np.arange(start, start + block),
                                                     classes_here)),
                        gallery_t, bias, **step)
                outputs.append((start, stop, result))
            # ops were dispatched to every replica before any result is read back
            for start, stop, (ranks, found, ap, gains) in outputs:
                first_rank[start:stop] = ranks.numpy()[: stop - start]
                if top_k:
                    neighbours[start:stop] = found.numpy()[: stop - start]
                if full_ranking:
                    average_precision[start:stop] = ap.numpy()[: stop - start]
                    ndcg[start:stop] = gains.numpy()[: stop - start]
    return RetrievalRanking(first_rank, neighbours, average_precision, ndcg)


def _block_ranking(query_block, self_index, positive_columns, gallery_t, column_bias, **step):
    """The `(B, M)` strip `S = Q_b G^T` by TensorFlow's matmul (outside XLA: its CPU dot
    is slower), then `_strip_ranking` on it: `(ranks, top_k, ap, ndcg)`, dispatched
    without waiting for the results."""
    strip = tf.linalg.matmul(query_block, gallery_t)  # (B, M)
    return _strip_ranking(strip, self_index, positive_columns, column_bias, **step)


@tf.function(jit_compile=True, autograph=False)
def _strip_ranking(strip, self_index, positive_columns, column_bias, top_k, group, picked,
                   tier_rows, padding=0, full_ranking=False, ndcg_ks=()):
    """First-positive ranks `(B,)` int32 (-1: no positive) and top-k `(B, top_k)` int32
    of one query block, from its `(B, M)` strip `S = Q_b G^T`, in one XLA program.

    `column_bias`: `(M,)` 0, or -inf on the `padding` last columns (zero gallery
    columns: their scores are exactly 0). `positive_columns`: `(B, P)` gallery indices
    of each query's positives (the query itself left out), -1 padded. `self_index`:
    `(B,)` the query's own gallery column, -1 when it is not in the gallery. `top_k`,
    `group`, `picked` (groups taken per row, `_picked_groups`), `tier_rows` (rows per
    step of the whole-row count, at most B) and `padding` are Python ints (trace keys).

    One read of the strip gives the maxima of its groups of `group` columns. An item can
    rank before the best positive `p` only in a group whose maximum reaches `s_p`; those
    groups are the row's best ones, so when they are no more than the `K` best groups
    taken for the top-k, the count reads those `K G` scores alone. The other rows
    ("unsettled": the first positive ranked after about `K` items) are counted over
    their whole row, `tier_rows` rows at a time, for as many tiers as there are such
    rows (a loop of data-dependent length: no strip-sized temporary, no work for rows
    the groups settled).
    """
    best, best_index, positive, has_column = _best_positive(strip, positive_columns)
    rows, width = strip.shape
    num_groups = width // group
    grouped = tf.reshape(strip, [rows, num_groups, group])
    group_max = tf.reduce_max(grouped, axis=2)  # (B, M / G)
    _, top_groups = tf.math.top_k(group_max, k=picked, sorted=False)  # (B, K)
    top_groups = tf.sort(top_groups, axis=1)  # increasing gallery order: the tie rule
    scores, columns = _group_scores(grouped, top_groups, column_bias)  # (B, K, G) each
    count = _count_before_in(scores, columns, best, best_index)
    # rows with more groups at or above s_p than were picked: count their whole row
    reached = tf.reduce_sum(tf.cast(group_max >= best[:, None], tf.int32), axis=1)
    unsettled = (reached > picked) & (best > -np.inf)
    count = _count_unsettled_rows(strip, unsettled, count, best, best_index, tier_rows,
                                  padding)
    ranks, self_score = _without_self(strip, self_index, best, best_index, count)
    if full_ranking:
        ap, gains = _whole_ranking(strip, column_bias, positive, positive_columns, has_column,
                                   self_index, self_score, ndcg_ks)
    else:
        ap, gains = tf.zeros([rows], tf.float64), tf.zeros([rows, 0], tf.float64)
    found = (_top_k_in_groups(scores, columns, self_index, top_k) if top_k
             else tf.zeros([rows, 0], tf.int32))
    return ranks, found, ap, gains


def _count_unsettled_rows(strip, unsettled, count, best, best_index, tier, padding):
    """`count` `(B,)` with each unsettled row's entry replaced by its whole-row count:
    the unsettled rows first, `tier` per loop step, only as many steps as they need (the
    last tier's start is clamped into the block, so it may count rows again: the same
    value)."""
    rows = strip.shape[0]
    num_unsettled = tf.reduce_sum(tf.cast(unsettled, tf.int32))
    _, order = tf.math.top_k(tf.cast(unsettled, tf.float32), k=rows)  # unsettled first

    def count_tier(step, count):
        part = tf.slice(order, [tf.minimum(step * tier, rows - tier)], [tier])
        whole = _count_before(tf.gather(strip, part), padding, tf.gather(best, part),
                              tf.gather(best_index, part))
        whole = tf.where(tf.gather(unsettled, part), whole, tf.gather(count, part))
        return step + 1, tf.tensor_scatter_nd_update(count, part[:, None], whole)

    _, count = tf.while_loop(lambda step, _: step * tier < num_unsettled, count_tier,
                             (tf.constant(0), count), maximum_iterations=-(-rows // tier))
    return count


def _best_positive(strip, positive_columns):
    """Best positive score `s_p` `(B,)` (-inf without positives) and its column `p`
    `(B,)` (the lowest index among those tied at the maximum), read from the strip
    itself: the same floats the count compares. Also the `(B, P)` positive scores and
    their validity mask."""
    has_column = positive_columns >= 0
    positive = tf.gather(strip, tf.maximum(positive_columns, 0), batch_dims=1)
    positive = tf.where(has_column, positive, -np.inf)
    best = tf.reduce_max(positive, axis=1)
    best_index = tf.reduce_min(
        tf.where(has_column & (positive == best[:, None]), positive_columns, tf.int32.max), axis=1)
    return best, best_index, positive, has_column


def _without_self(strip, self_index, best, best_index, count):
    """Ranks `(B,)` from counts that include the query's own column when it ranks
    before `p` (leave-one-out): taken back out; -1 without positives. Also the query's
    own score `(B,)`."""
    is_self = self_index >= 0
    self_score = tf.gather(strip, tf.maximum(self_index, 0)[:, None], batch_dims=1)[:, 0]
    self_before = is_self & _ranked_before(self_score, self_index, best, best_index)
    return tf.where(best == -np.inf, -1, count - tf.cast(self_before, tf.int32)), self_score


def _whole_ranking(strip, column_bias, positive, positive_columns, has_column, self_index,
                   self_score, ndcg_ks):
    """Average precision `(B,)` and NDCG@K `(B, len(ndcg_ks))` (float64; NaN without
    positives) from the rank of every positive: the items ranked before it (a higher
    score, or the same score and a lower index; the query itself not counted), counted
    in the strip by one compare-and-sum per positive column (XLA on CPU materialises the
    `(B, P, M)` comparison: the block budget counts it)."""
    scores = strip + column_bias[None, :]
    columns = tf.range(tf.shape(strip)[1], dtype=tf.int32)
    count = _count_true(_ranked_before(scores[:, None, :], columns[None, None, :],
                                       positive[:, :, None], positive_columns[:, :, None]),
                        axis=2)
    is_self = (self_index >= 0)[:, None]
    self_before = is_self & _ranked_before(self_score[:, None], self_index[:, None], positive,
                                           positive_columns)
    rank = tf.cast(count - tf.cast(self_before, tf.int32), tf.float64)  # (B, P), 0-based
    num_positives = tf.reduce_sum(tf.cast(has_column, tf.float64), axis=1)
    ordered = tf.sort(tf.where(has_column, rank, np.inf), axis=1)
    position = tf.cast(tf.range(1, tf.shape(rank)[1] + 1), tf.float64)[None, :]
    precision = tf.where(tf.math.is_finite(ordered), position / (ordered + 1.0), 0.0)
    undefined = tf.constant(np.nan, tf.float64)
    ap = tf.where(num_positives > 0, tf.reduce_sum(precision, axis=1)
                  / tf.maximum(num_positives, 1.0), undefined)
    discount = 1.0 / (tf.math.log(rank + 2.0) / np.log(2.0))
    ideal = tf.math.cumsum(1.0 / (tf.math.log(position + 1.0) / np.log(2.0)), axis=1)[0]
    gains = []
    for k in ndcg_ks:
        dcg = tf.reduce_sum(tf.where(has_column & (rank < k), discount, 0.0), axis=1)
        best = tf.gather(ideal, tf.cast(tf.minimum(num_positives, float(k)), tf.int32) - 1)
        gains.append(tf.where(num_positives > 0, dcg / best, undefined))
    gains = tf.stack(gains, axis=1) if gains else tf.zeros([tf.shape(strip)[0], 0], tf.float64)
    return ap, gains


def _count_before(strip, padding, best, best_index):
    """`(B,)` int32 items ranked before the best positive (a higher score, or the same
    score and a lower gallery index; padded columns never) over whole strip rows.

    The `padding` last columns are zero gallery columns, scored exactly 0: they are
    taken back out where 0 ranks before the positive (`best < 0`; their index is above
    every gallery index).
    """
    columns = tf.range(strip.shape[1], dtype=tf.int32)
    count = _count_true(_ranked_before(strip, columns[None, :], best[:, None],
                                       best_index[:, None]), axis=1)
    if padding:
        count -= tf.where(best < 0.0, padding, 0)
    return count


def _group_scores(grouped, groups, column_bias):
    """Scores `(B, K, G)` of the chosen groups `(B, K)` of a `(B, M / G, G)` strip,
    padded columns at -inf, and their gallery columns `(B, K, G)`."""
    group = grouped.shape[2]
    columns = groups[:, :, None] * group + tf.range(group)[None, None, :]
    return tf.gather(grouped, groups, batch_dims=1) + tf.gather(column_bias, columns), columns


def _count_before_in(scores, columns, best, best_index):
    """`(B,)` items ranked before the best positive among `(B, K, G)` scores of the
    gallery `columns` (padded columns at -inf)."""
    before = _ranked_before(scores, columns, best[:, None, None], best_index[:, None, None])
    return tf.reduce_sum(tf.cast(before, tf.int32), axis=[1, 2])


def _ranked_before(score, column, reference, reference_column):
    """Whether an item ranks before a reference item, the tie rule of this module: a
    higher score, or the same score and a lower gallery column. Broadcasts."""
    return (score > reference) | ((score == reference) & (column < reference_column))


def _count_true(before, axis):
    """int32 count of True along `axis` of a row's comparisons: sums 1.0s in float32
    (XLA vectorises it better than int32), exact below 2^24 per row, else int32."""
    if before.shape[axis] is not None and before.shape[axis] < 2**24:
        return tf.cast(tf.reduce_sum(tf.where(before, 1.0, 0.0), axis=axis), tf.int32)
    return tf.reduce_sum(tf.cast(before, tf.int32), axis=axis)


def _top_k_in_groups(scores, columns, self_index, top_k):
    """Top-k columns `(B, top_k)` of a strip from the `(B, K, G)` scores of its best
    groups, in gallery order (module doc: `K >= k + 1`, and one more when the last
    group holds padded columns, at -inf there): the query's own column set to -inf,
    then `top_k` over them (ties: the lower position, hence the lower index)."""
    rows = tf.shape(scores)[0]
    scores = tf.reshape(scores, [rows, -1])
    columns = tf.reshape(columns, [rows, -1])
    scores = tf.where(columns == self_index[:, None], tf.constant(-np.inf, tf.float32), scores)
    _, position = tf.math.top_k(scores, k=top_k, sorted=True)
    return tf.gather(columns, position, batch_dims=1)


def _picked_groups(top_k, num_groups, padding):
    """Groups taken per row: `k + 1` for the top-k (the query's own column may hold a
    place), one more when the last group holds padded columns, and at least
    `_MIN_PICKED_GROUPS` for the count; at most all of them."""
    return min(num_groups, max(top_k + 1, _MIN_PICKED_GROUPS) + int(padding > 0))


def _block_rows(num_queries, width, max_memory_bytes, copies=_LIVE_STRIP_COPIES):
    """Query rows per block: the most whose `copies` `(B, width)` float32 arrays fit in
    `max_memory_bytes`, within [1, 256] (a multiple of 64 from 64 rows on)."""
    rows = max_memory_bytes // (copies * 4 * width)
    if rows >= _ROW_MULTIPLE:
        rows = rows // _ROW_MULTIPLE * _ROW_MULTIPLE
    return int(max(1, min(num_queries, _MAX_BLOCK_ROWS, rows)))


def _normalised(matrix, similarity):
    tensor = tf.constant(matrix)
    return tf.math.l2_normalize(tensor, axis=1) if similarity == "cosine" else tensor


# Gallery rows normalised and transposed per slice of 4,096 rows (8 MiB at d = 512).
_TRANSPOSE_ROWS = 4096


def _normalised_transposed(matrix, similarity, width):
    """`(d, width)` float32 tensor: the gallery's rows normalised (cosine), as columns,
    then zero columns up to `width`. The slices are concatenated once by TensorFlow: the
    gallery's bytes are written twice (slices, then the tensor), never through a NumPy
    copy (at SOP size, in a fresh process: about 0.35 s against 0.8 s through NumPy)."""
    columns = _cosine_columns if similarity == "cosine" else _columns
    parts = [columns(matrix[start:start + _TRANSPOSE_ROWS])
             for start in range(0, len(matrix), _TRANSPOSE_ROWS)]
    if width > len(matrix):
        parts.append(tf.zeros((matrix.shape[1], width - len(matrix)), tf.float32))
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)


@tf.function(autograph=False, input_signature=[tf.TensorSpec([None, None], tf.float32)])
def _cosine_columns(rows):
    return tf.transpose(tf.math.l2_normalize(rows, axis=1))


@tf.function(autograph=False, input_signature=[tf.TensorSpec([None, None], tf.float32)])
def _columns(rows):
    return tf.transpose(rows)


def _group_size(top_k, width):
    """Columns per group: a power of two near sqrt(M / K) for the `K ~ k` groups taken
    per row (at least `_MIN_PICKED_GROUPS`), which balances the `M / G` group maxima and
    the `K G` scores read from the chosen groups."""
    return _tile_group_size(width, max(top_k, _MIN_PICKED_GROUPS - 1))


def _round_up(value, multiple):
    return int(math.ceil(value / multiple) * multiple)


def _as_labels(labels, name, count):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Expected `{name}` to be a 1-D integer array. "
                         f"Received: shape={labels.shape}, dtype={labels.dtype}")
    if len(labels) != count:
        raise ValueError(f"Expected one label per row. Received: {name}.shape={labels.shape} "
                         f"for {count} rows")
    return labels.astype(np.int64)
