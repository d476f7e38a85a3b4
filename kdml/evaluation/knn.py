"""Exact k-nearest-neighbour search by chunked matrix products.

`exact_knn` ranks a gallery by cosine (or raw inner-product) similarity for every
query, one block of queries at a time, so that memory stays bounded: the largest
intermediate is a `(block, N)` float32 similarity matrix whose size is derived from
`max_memory_bytes`, never an `(N, N)` matrix. This is what lets the evaluation protocol
of DESIGN.md section 4 run on Stanford Online Products (60,502 x 512) on a laptop.

Ranking is exact and deterministic: float32 products (TensorFloat-32 is switched off
during the search on GPUs that default to it), and equal similarities are ordered by
lower gallery index first (the documented tie rule of `tf.math.top_k`).
"""

import contextlib

import numpy as np
import tensorflow as tf

_SIMILARITIES = ("cosine", "inner_product")

# float32 copies of a (block, N) row block that are alive at once inside the block step:
# the similarity matrix and its self-masked copy that `top_k` reads.
_LIVE_BLOCK_COPIES = 2
_BYTES_PER_FLOAT32 = 4


def exact_knn(
    queries,
    gallery=None,
    *,
    k,
    max_memory_bytes=256 * 2**20,
    exclude_self=None,
    similarity="cosine",
):
    """Exact k nearest neighbours of each query by chunked cosine similarity.

    For each block of queries the step computes `S = Q_b G^T` with `tf.linalg.matmul`
    and keeps the `k` largest entries of each row with `tf.math.top_k`. The block
    has a fixed number of rows (the last one is zero-padded), so the `tf.function` step
    is traced once per `(block, N, d, k)` and reused across blocks and calls.

    Args:
        queries: `(Q, d)` array-like of real numbers.
        gallery: `(N, d)` array-like, or `None` for leave-one-out search of the
            queries among themselves (then `N = Q`).
        k: number of neighbours to return, `1 <= k <= N` (`k <= N - 1` when the query
            itself is excluded).
        max_memory_bytes: budget for the `(block, N)` float32 similarity block and its
            masked copy; the number of query rows per block is
            `max_memory_bytes // (2 * 4 * N)` (at least 1, at most Q). The inputs
            themselves are not counted.
        exclude_self: whether query `i` may not return gallery item `i`. `None`
            (default) means `True` when `gallery is None` and `False` otherwise. `True`
            with an explicit gallery requires `Q == N` (query `i` is gallery item `i`).
            The exclusion is by index, not by similarity value, so duplicated
            embeddings still retrieve each other.
        similarity: `"cosine"` (rows are L2-normalised first; a zero row has
            similarity 0 to everything) or `"inner_product"` (rows used as given).

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
    if similarity not in _SIMILARITIES:
        raise ValueError(
            f"Expected `similarity` to be one of {_SIMILARITIES}. "
            f"Received: similarity={similarity!r}"
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
    _check_k(k, num_gallery, bool(exclude_self))
    if not isinstance(max_memory_bytes, (int, np.integer)) or max_memory_bytes <= 0:
        raise ValueError(
            "Expected `max_memory_bytes` to be a positive integer. "
            f"Received: max_memory_bytes={max_memory_bytes!r}"
        )

    block = _rows_per_block(num_queries, num_gallery, int(max_memory_bytes))
    query_tensor = tf.constant(queries)
    gallery_tensor = tf.constant(gallery_matrix)
    if similarity == "cosine":
        query_tensor = tf.math.l2_normalize(query_tensor, axis=1)
        gallery_tensor = tf.math.l2_normalize(gallery_tensor, axis=1)

    indices = np.empty((num_queries, k), dtype=np.int64)
    similarities = np.empty((num_queries, k), dtype=np.float32)
    with _full_float32_matmul():
        for start in range(0, num_queries, block):
            stop = min(start + block, num_queries)
            query_block = query_tensor[start:stop]
            if stop - start < block:  # keep the traced shape: pad the last block with zeros
                query_block = tf.pad(query_block, [[0, block - (stop - start)], [0, 0]])
            block_similarities, block_indices = _block_top_k(
                query_block,
                gallery_tensor,
                tf.constant(start, dtype=tf.int32),
                k=int(k),
                exclude_self=bool(exclude_self),
            )
            indices[start:stop] = block_indices.numpy()[: stop - start]
            similarities[start:stop] = block_similarities.numpy()[: stop - start]
    return indices, similarities


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
def _block_top_k(query_block, gallery, start, k, exclude_self):
    """Top-k of one `(block, d)` query block against the `(N, d)` gallery.

    `k` and `exclude_self` are Python values (part of the trace key); `start`, the
    global index of the block's first row, is a tensor so blocks share one trace.
    Returns `(similarities (block, k) float32, indices (block, k) int64)`.
    """
    scores = tf.linalg.matmul(query_block, gallery, transpose_b=True)  # (block, N)
    if exclude_self:
        block_rows = tf.shape(query_block)[0]
        self_index = start + tf.range(block_rows, dtype=tf.int32)
        # one_hot of an index >= N (a padded row) is all zeros: nothing masked there.
        is_self = tf.one_hot(
            self_index, depth=tf.shape(gallery)[0], on_value=True, off_value=False
        )
        scores = tf.where(is_self, tf.constant(-np.inf, dtype=scores.dtype), scores)
    # top_k is stable: among equal values the lower index comes first.
    values, indices = tf.math.top_k(scores, k=k, sorted=True)
    return values, tf.cast(indices, tf.int64)


def _rows_per_block(num_queries, num_gallery, max_memory_bytes):
    bytes_per_row = _LIVE_BLOCK_COPIES * _BYTES_PER_FLOAT32 * num_gallery
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
