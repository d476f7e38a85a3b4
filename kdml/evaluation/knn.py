"""Exact k-nearest-neighbour search by blocked matrix products with a running top-k.

`exact_knn` ranks a gallery by cosine (or raw inner-product) similarity for every query.
The similarity matrix is never materialised: queries are cut into row blocks and the
gallery into column chunks, stored transposed `(C, d, W)`; for each `(block, chunk)`
tile the step computes `S = Q_b G_c^T` (`tf.linalg.matmul(Q_b, G_c^T)` with `G_c^T`
stored: on CPU, `transpose_b=True` ran at about half the speed for these shapes) and
merges the tile's best columns into the block's running top-k, inside one
`tf.while_loop` over the chunks. On CPU the merge of a large tile (2^20 scores or more)
is one XLA program (`jit_compile`: the tile is read once), the product TensorFlow's
matmul outside it. `tf.math.top_k` over every column of every tile would
cost more than the product, so it runs on far fewer: the tile's maxima over groups of
`G` columns (`G` a power of two near `sqrt(W / k')`, `k'` the candidates kept), then
the columns of the `k' + 2` best groups, merged with the running top-k. The tile's top
k' lie in those groups: an item of a group ranked after `k' + 2` others is beaten by
each of their maxima (a higher score, or the same score and a lower index, as groups
are contiguous), and at most two of those maxima are not gallery items it must yield
to: the query's own column (leave-one-out) and a padded column of the one group that
mixes gallery and zero-padded columns (groups of padded columns only are masked).
Tested equal to a NumPy stable sort with ties across groups and chunks.

Speed (float32, CPU, 1,000,000 x 128 gallery, k = 10, 2,000 queries,
`tools/bench_index.py`, 2 cores): 886, 970 and 819 queries/s in three runs, against
faiss' `IndexFlatIP`'s 781, 885 and 863 in the same runs (1.13x, 1.10x, 0.95x), with
the same neighbour lists (ties aside); the previous tiles answered 185 on an idle
machine. On a CPU the tiles are 16,384 columns by up to 1,024 rows (64 MiB): large enough for
the matmul to run at its peak, the merge fused by XLA (2,048 x 512 tiles merged by
TensorFlow ops, the previous default, gave about half the queries/s); on a GPU the chunks are 8,192 columns, the rows follow
`max_memory_bytes` alone and the merge is TensorFlow's kernels.

Memory: the largest intermediates are a few `(block, chunk + k)` float32 tiles whose
size follows `max_memory_bytes` (4 copies counted; at the default 256 MiB on CPU:
1,023 x 16,384 tiles), so Stanford Online Products (60,502 x 512, k = 1000) and a 10x
larger query set run in well under 2 GB.

Device: the step runs where TensorFlow places it, on the first GPU when one is visible
and on the CPU otherwise. Under a `tf.distribute` strategy (`strategy=`), each replica
scores its own query block against its own copy of the gallery (the queries are
sharded, the gallery is replicated).

Precision: float32 by default, exact: TensorFloat-32 is switched off during the
search on GPUs that default to it. `precision="bfloat16"` is an opt-in fast pass for
accelerators with bfloat16 matrix units: the tiles are scored in bfloat16 and the
`k + extra_candidates` best candidates of each query are re-scored in float32, so the
returned similarities are float32 and the order is exact unless a true neighbour fell
outside the candidates (bfloat16 keeps 8 bits of mantissa, a relative error of ~4e-3).
On CPUs without bfloat16 units it is slower than float32.

Ties: equal similarities are ordered by lower gallery index first, reproducibly bit
for bit. `tf.math.top_k` puts the lower position first among equal values; the running
top-k always precedes the tile's columns in the merge and holds only lower gallery
indices (the chunks are visited in increasing order), the chosen groups are sorted by
index before their columns are gathered, and the bfloat16 candidates are sorted by
gallery index before their float32 re-scoring, so position order is gallery order.
"""

import contextlib
import math

import numpy as np
import tensorflow as tf

_SIMILARITIES = ("cosine", "inner_product")
_PRECISIONS = ("float32", "bfloat16")

# (block, chunk + k) float32/int32 arrays alive at once inside the tile step: the tile,
# its masked copy, the merged values and the merged indices.
_LIVE_TILE_COPIES = 4
_BYTES_PER_FLOAT32 = 4
# Gallery columns per chunk (at least 4 k): 8,192 on a GPU; 16,384 on a CPU, with at
# most _CPU_TILE_BYTES per (rows, chunk) tile (at least _MIN_CPU_ROWS rows). Large tiles
# keep TensorFlow's matmul at its peak; the selection reads each tile once, in one
# XLA-compiled step (1,000,000 x 128, k = 10, 2 busy cores: 1,024 x 16,384 tiles about
# 2x the queries/s of 512 x 2,048).
_MIN_GALLERY_CHUNK = 8192
_CPU_GALLERY_CHUNK = 16384
_CPU_TILE_BYTES = 64 * 2**20
_MIN_CPU_ROWS = 64
# Tiles of fewer elements are merged by TensorFlow ops: XLA's compilation (a fraction
# of a second per shape) would cost more than it saves on small searches.
_MIN_COMPILED_TILE = 2**20
_DEFAULT_EXTRA_CANDIDATES = 32


def exact_knn(
    queries,
    gallery=None,
    *,
    k,
    max_memory_bytes=256 * 2**20,
    exclude_self=None,
    similarity="cosine",
    precision="float32",
    extra_candidates=None,
    gallery_chunk=None,
    strategy=None,
):
    """Exact k nearest neighbours of each query by blocked cosine similarity.

    Args:
        queries: `(Q, d)` array-like of real numbers.
        gallery: `(N, d)` array-like, or `None` for leave-one-out search of the
            queries among themselves (then `N = Q`).
        k: number of neighbours to return, `1 <= k <= N` (`k <= N - 1` when the query
            itself is excluded).
        max_memory_bytes: budget for the tile intermediates (`--max_memory`); the
            query rows per block are `max_memory_bytes // (4 * 4 * (chunk + k'))`
            (plus `4 * k' * d` per row for the bfloat16 re-scoring gather), at least
            1 and at most Q, with `k'` the candidates kept; on CPU also at most what
            keeps a `(rows, chunk)` tile within 64 MiB (at least 64 rows). The inputs,
            their normalised, transposed on-device copies and the `(Q, k)` outputs are
            not counted.
        exclude_self: whether query `i` may not return gallery item `i`. `None`
            (default) means `True` when `gallery is None` and `False` otherwise. `True`
            with an explicit gallery requires `Q == N` (query `i` is gallery item `i`).
            The exclusion is by index, not by similarity value, so duplicated
            embeddings still retrieve each other.
        similarity: `"cosine"` (rows are L2-normalised first; a zero row has
            similarity 0 to everything) or `"inner_product"` (rows used as given).
        precision: `"float32"` (exact) or `"bfloat16"` (bfloat16 scoring pass, then
            float32 re-scoring of the `k + extra_candidates` best candidates).
        extra_candidates: candidates kept beyond `k` by the bfloat16 pass (default
            `max(32, k // 4)`); ignored for float32.
        gallery_chunk: gallery columns per tile (default `min(N, max(W, 4 k'))`,
            `W` = 16384 on CPU, 8192 on GPU), rounded up to a multiple of the group size.
        strategy: optional `tf.distribute.Strategy`; its replicas score disjoint query
            blocks in parallel. Results are identical to the single-device search.

    Returns:
        `(indices, similarities)`: NumPy arrays of shape `(Q, k)`, `int64` gallery
        indices and `float32` similarities, each row in decreasing similarity, ties
        broken by lower gallery index.

    Example:

    >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> indices, _ = exact_knn(x, k=1)
    >>> indices[:, 0].tolist()
    [1, 0, 1]
    """
    indices, similarities = _knn(
        queries, gallery, k=k, max_memory_bytes=max_memory_bytes, exclude_self=exclude_self,
        similarity=similarity, precision=precision, extra_candidates=extra_candidates,
        gallery_chunk=gallery_chunk, strategy=strategy,
    )
    return indices.astype(np.int64), similarities


def _knn(queries, gallery=None, *, k, max_memory_bytes=256 * 2**20, exclude_self=None,
         similarity="cosine", precision="float32", extra_candidates=None,
         gallery_chunk=None, strategy=None, return_similarities=True):
    """`exact_knn` with int32 indices (half the memory: 242 MB for SOP at k = 1000)."""
    if similarity not in _SIMILARITIES:
        raise ValueError(
            f"Expected `similarity` to be one of {_SIMILARITIES}. "
            f"Received: similarity={similarity!r}"
        )
    if precision not in _PRECISIONS:
        raise ValueError(
            f"Expected `precision` to be one of {_PRECISIONS}. Received: precision={precision!r}"
        )
    queries = _as_float32_matrix(queries, "queries")
    if gallery is None:
        gallery_matrix = queries
        if exclude_self is None:
            exclude_self = True
    else:
        gallery_matrix = _as_float32_matrix(gallery, "gallery")
        if exclude_self is None:
            exclude_self = False
    exclude_self = bool(exclude_self)
    num_queries, dim = queries.shape
    num_gallery, gallery_dim = gallery_matrix.shape
    if gallery_dim != dim:
        raise ValueError(
            "Expected `queries` and `gallery` to have the same embedding dimension. "
            f"Received: queries.shape={queries.shape}, "
            f"gallery.shape={gallery_matrix.shape}"
        )
    if exclude_self and num_queries != num_gallery:
        raise ValueError(
            "`exclude_self=True` with an explicit gallery needs query i to be gallery "
            "item i, so the same number of rows. Received: "
            f"queries.shape={queries.shape}, gallery.shape={gallery_matrix.shape}. "
            "Pass gallery=None for leave-one-out search, or exclude_self=False."
        )
    _check_k(k, num_gallery, exclude_self)
    for name, value in (("max_memory_bytes", max_memory_bytes),
                        ("gallery_chunk", gallery_chunk), ("extra_candidates", extra_candidates)):
        if value is None and name != "max_memory_bytes":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(
                f"Expected `{name}` to be a positive integer. Received: {name}={value!r}"
            )
    k = int(k)
    limit = num_gallery - 1 if exclude_self else num_gallery
    if precision == "bfloat16":
        extra = extra_candidates if extra_candidates is not None else max(
            _DEFAULT_EXTRA_CANDIDATES, k // 4)
        candidates = min(limit, k + int(extra))
    else:
        candidates = k
    devices = _replica_devices(strategy)
    replicas = len(devices)
    on_cpu = _on_cpu(devices)
    rescore_bytes = _BYTES_PER_FLOAT32 * candidates * dim if precision == "bfloat16" else 0
    block, chunk, group = _tile_shape(num_queries, num_gallery, candidates,
                                      int(max_memory_bytes), on_cpu, gallery_chunk,
                                      rescore_bytes)
    num_chunks = math.ceil(num_gallery / chunk)
    step_options = dict(k=k, candidates=candidates, exclude_self=exclude_self,
                        bfloat16=precision == "bfloat16", group=group,
                        compiled_merge=on_cpu and block * chunk >= _MIN_COMPILED_TILE)

    indices = np.empty((num_queries, k), dtype=np.int32)
    similarities = np.empty((num_queries, k), dtype=np.float32) if return_similarities else None
    with _full_float32_matmul():
        per_device = [
            _prepare_gallery(gallery_matrix, device, similarity, chunk, num_chunks, group,
                             precision == "bfloat16")
            for device in devices
        ]
        query_tensor = tf.constant(queries)
        if similarity == "cosine":
            query_tensor = tf.math.l2_normalize(query_tensor, axis=1)
        num_gallery_tensor = tf.constant(num_gallery, dtype=tf.int32)
        for blocks in _replica_rounds(num_queries, block, replicas):
            outputs = []
            for replica, start, stop in blocks:
                with tf.device(devices[replica]):
                    query_block = query_tensor[start:stop]
                    if stop - start < block:  # keep the traced shape: zero-pad the last block
                        query_block = tf.pad(query_block, [[0, block - (stop - start)], [0, 0]])
                    values, found = _block_top_k(
                        query_block, *per_device[replica],
                        tf.constant(start, dtype=tf.int32), num_gallery_tensor,
                        **step_options,
                    )
                outputs.append((start, stop, values, found))
            # ops were dispatched to every replica before any result is read back
            for start, stop, values, found in outputs:
                indices[start:stop] = found.numpy()[: stop - start]
                if return_similarities:
                    similarities[start:stop] = values.numpy()[: stop - start]
    return indices, similarities


def _replica_rounds(num_queries, block, num_replicas):
    """Query blocks dealt to the replicas, round by round: yields `[(replica, start, stop),
    ...]`, one block of at most `block` rows per replica, in query order, so that a round
    is dispatched to every replica before its results are read back."""
    for round_start in range(0, num_queries, block * num_replicas):
        starts = range(round_start, min(round_start + block * num_replicas, num_queries), block)
        yield [(replica, start, min(start + block, num_queries))
               for replica, start in enumerate(starts)]


def _replica_devices(strategy):
    """Devices to shard the query blocks over: the strategy's replicas, or the default."""
    if strategy is None:
        return [None]
    devices = list(strategy.extended.worker_devices)
    return devices or [None]


def _on_cpu(devices):
    """Whether the search runs on CPUs: the strategy's devices, else no visible GPU."""
    if devices == [None]:
        return not tf.config.list_logical_devices("GPU")
    return all("CPU" in str(device).upper() for device in devices)


def _prepare_gallery(gallery_matrix, device, similarity, chunk, num_chunks, group, bfloat16):
    """The gallery on `device`, normalised, zero-padded and cut into transposed chunks.

    Returns `(chunks_t, rows, group_bias)`: the `(C, d, chunk)` scoring chunks (float32,
    or bfloat16 for the bfloat16 pass), the `(C chunk, d)` float32 rows the bfloat16
    pass re-scores (empty for float32), and the `(C, chunk / group)` bias of the group
    maxima: -inf for the groups made of padded columns only, 0 otherwise.
    """
    num_gallery, dim = gallery_matrix.shape
    first_column = (np.arange(num_chunks)[:, None] * chunk
                    + np.arange(chunk // group)[None, :] * group)
    group_bias = np.where(first_column >= num_gallery, -np.inf, 0.0).astype(np.float32)
    with tf.device(device):
        gallery = tf.constant(gallery_matrix)
        if similarity == "cosine":
            gallery = tf.math.l2_normalize(gallery, axis=1)
        padding = num_chunks * chunk - num_gallery
        if padding:
            gallery = tf.pad(gallery, [[0, padding], [0, 0]])
        chunks_t = tf.transpose(tf.reshape(gallery, [num_chunks, chunk, dim]), [0, 2, 1])
        if bfloat16:
            chunks_t = tf.cast(chunks_t, tf.bfloat16)
            rows = gallery
        else:
            rows = tf.zeros([0, dim], tf.float32)
        group_bias = tf.constant(group_bias)
    return chunks_t, rows, group_bias


def _group_size(chunk, candidates):
    """Columns per group of a tile: a power of two near sqrt(chunk / candidates), which
    balances the `chunk / G` group maxima and the `~candidates G` columns kept."""
    return 2 ** int(round(math.log2(max(1.0, math.sqrt(chunk / candidates)))))


@contextlib.contextmanager
def _full_float32_matmul():
    """Turn TensorFloat-32 off for the search and restore the caller's setting after.

    TensorFlow enables TF32 matmuls by default on Ampere and newer GPUs (10-bit
    mantissa, relative error ~1e-3), which would reorder close neighbours; the search
    promises float32. No effect on CPU. The setting is process-wide, so other threads'
    GPU matmuls also run in float32 while a search is in progress.
    """
    enabled = tf.config.experimental.tensor_float_32_execution_enabled()
    if enabled:
        tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield
    finally:
        if enabled:
            tf.config.experimental.enable_tensor_float_32_execution(True)


@tf.function
def _block_top_k(query_block, chunks_t, gallery_rows, group_bias, start, num_gallery, k,
                 candidates, exclude_self, bfloat16, group, compiled_merge=False):
    """Top-k of one `(B, d)` query block against the chunked, transposed `(C, d, W)`
    gallery.

    Each `(B, W)` tile is reduced to the maxima of its `W / group` column groups; the
    `candidates + 2` best groups (one more for a group that mixes gallery and padded
    columns, one more for the query's own column) hold the tile's top `candidates`
    (module docstring), and only their columns are merged into the running top-k.
    `gallery_rows`: the `(C W, d)` float32 rows for the bfloat16 re-scoring (empty for
    float32); `group_bias`: `(C, W / group)` 0, or -inf for groups of padded columns
    only. `compiled_merge`: the merge as one XLA program (`_merge_tile_compiled`, on
    CPU for tiles of at least 2^20 scores), else TensorFlow ops. `k`, `candidates`,
    `exclude_self`, `bfloat16`, `group` and `compiled_merge` are Python values (part of
    the trace key); `start` (global index of the block's first row) and
    `num_gallery` are tensors, so all blocks of a search share one trace. Padded
    gallery columns (index >= N) and, with `exclude_self`, column `start + i` of row
    `i` score -inf. Returns `(similarities (B, k) float32, indices (B, k) int32)`.
    """
    block_rows = tf.shape(query_block)[0]
    num_chunks, chunk = tf.shape(chunks_t)[0], tf.shape(chunks_t)[2]
    num_groups = chunks_t.shape[2] // group
    picked = min(candidates + 1 + int(exclude_self), num_groups)
    scoring_block = tf.cast(query_block, tf.bfloat16) if bfloat16 else query_block
    row_index = start + tf.range(block_rows, dtype=tf.int32)
    minus_inf = tf.constant(-np.inf, tf.float32)

    def merge(c, values, indices):
        tile = tf.linalg.matmul(scoring_block, chunks_t[c])  # (B, W): G^T stored, not
        tile = tf.cast(tile, tf.float32)  # transpose_b (about 2x slower on CPU)
        merge_tile = _merge_tile_compiled if compiled_merge else _merge_tile
        values, indices = merge_tile(
            tile, values, indices, group_bias[c], c * chunk, row_index, num_gallery,
            candidates=candidates, picked=picked, group=group, exclude_self=exclude_self)
        return c + 1, values, indices

    initial = (
        tf.constant(0, tf.int32),
        tf.fill([block_rows, candidates], minus_inf),
        tf.fill([block_rows, candidates], tf.constant(-1, tf.int32)),
    )
    _, values, indices = tf.while_loop(
        lambda c, values, indices: c < num_chunks, merge, initial,
        parallel_iterations=1,
    )
    if not bfloat16:
        return values, indices
    # float32 re-scoring of the candidates, in increasing gallery-index order so that
    # top_k's position tie rule is again the lower-index rule.
    indices = tf.sort(indices, axis=1)
    rows = tf.gather(gallery_rows, indices)  # (B, candidates, d) float32
    exact = tf.einsum("bd,bcd->bc", query_block, rows)
    values, position = tf.math.top_k(exact, k=k, sorted=True)
    return values, tf.gather(indices, position, batch_dims=1)


def _merge_tile(tile, values, indices, group_bias, first_column, row_index, num_gallery,
                candidates, picked, group, exclude_self):
    """The running top-`candidates` `(B, candidates)` merged with one `(B, W)` tile
    whose first column is gallery item `first_column`, through the tile's group maxima
    (`_block_top_k`)."""
    block_rows = tf.shape(tile)[0]
    num_groups = tile.shape[1] // group
    grouped = tf.reshape(tile, [block_rows, num_groups, group])
    group_max = tf.reduce_max(grouped, axis=2) + group_bias[None, :]
    _, best_groups = tf.math.top_k(group_max, k=picked, sorted=True)
    best_groups = tf.sort(best_groups, axis=1)  # increasing gallery order: the tie rule
    scores = tf.reshape(tf.gather(grouped, best_groups, batch_dims=1), [block_rows, -1])
    columns = tf.reshape(first_column + best_groups[:, :, None] * group
                         + tf.range(group, dtype=tf.int32)[None, None, :], [block_rows, -1])
    invalid = columns >= num_gallery
    if exclude_self:
        invalid = invalid | (columns == row_index[:, None])
    scores = tf.where(invalid, tf.constant(-np.inf, tf.float32), scores)
    # running top-k first: among equal values top_k keeps the lower position, which
    # is the lower gallery index (earlier chunks, then increasing columns).
    merged_values = tf.concat([values, scores], axis=1)
    merged_indices = tf.concat([indices, columns], axis=1)
    values, position = tf.math.top_k(merged_values, k=candidates, sorted=True)
    return values, tf.gather(merged_indices, position, batch_dims=1)


# The merge fused by XLA: the tile is read once for its group maxima (CPU; on a GPU
# TensorFlow's own kernels are kept).
_merge_tile_compiled = tf.function(_merge_tile, jit_compile=True)


def _tile_shape(num_queries, num_gallery, candidates, max_memory_bytes, on_cpu,
                gallery_chunk=None, extra_bytes_per_row=0):
    """`(rows, chunk, group)` of the `(rows, chunk)` tiles: chunk columns (default
    16,384 on CPU, 8,192 on GPU, at least 4 candidates, at most the gallery) rounded up
    to a multiple of the group size; rows within `max_memory_bytes` (`_rows_per_block`)
    and, on CPU, within a 64 MiB tile (at least 64 rows)."""
    chunk = int(gallery_chunk) if gallery_chunk else max(
        _CPU_GALLERY_CHUNK if on_cpu else _MIN_GALLERY_CHUNK, 4 * candidates)
    chunk = min(chunk, num_gallery)
    group = _group_size(chunk, candidates)
    chunk = math.ceil(chunk / group) * group
    rows = _rows_per_block(num_queries, chunk + candidates, max_memory_bytes,
                           extra_bytes_per_row=extra_bytes_per_row)
    if on_cpu:
        rows = min(rows, max(_MIN_CPU_ROWS, _CPU_TILE_BYTES // (_BYTES_PER_FLOAT32 * chunk)))
    return rows, chunk, group


def _rows_per_block(num_queries, row_width, max_memory_bytes, extra_bytes_per_row=0):
    """Query rows per block: `_LIVE_TILE_COPIES` float32 `(rows, row_width)` arrays."""
    bytes_per_row = _LIVE_TILE_COPIES * _BYTES_PER_FLOAT32 * row_width + extra_bytes_per_row
    return int(max(1, min(num_queries, max_memory_bytes // bytes_per_row)))


def _as_float32_matrix(values, name):
    array = np.asarray(values)
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(
            f"Expected `{name}` to hold real numbers. Received: dtype={array.dtype}"
        )
    if array.ndim != 2:
        raise ValueError(
            f"Expected `{name}` to be a 2-D (num_items, dim) array. "
            f"Received: shape={array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"Expected `{name}` to be non-empty. Received: shape={array.shape}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(
            f"Expected `{name}` to be finite. Received: {bad} NaN or infinite values."
        )
    return array


def _check_k(k, num_gallery, exclude_self):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"Expected `k` to be a positive integer. Received: k={k!r}")
    limit = num_gallery - 1 if exclude_self else num_gallery
    if not 1 <= k <= limit:
        which = "gallery size"
        if exclude_self:
            which = "gallery size minus one (the query itself is excluded)"
        raise ValueError(
            f"Expected 1 <= k <= {limit}, the {which}. "
            f"Received: k={k}, gallery size={num_gallery}, exclude_self={exclude_self}"
        )
