"""k-means for the NMI / AMI of an embedding, in TensorFlow on the embeddings' device.

`kmeans` is Lloyd's algorithm (Lloyd 1982) on L2-normalised rows, with the assignment
step as blocked matrix products (`argmin_c |x - c|^2 = argmax_c (x . c - |c|^2 / 2)`,
`(B, C)` tiles, never an `(N, C)` matrix) and the update step as a segment mean, the
way pytorch-metric-learning clusters with faiss (`faiss.Clustering`, 20 iterations,
random initial centroids) rather than scikit-learn (k-means++ seeding alone takes
minutes at Stanford Online Products size: 12,100 sequential passes over the data).

Settings (`KMEANS_SETTINGS` and the arguments): initial centroids by k-means++
(scikit-learn's `kmeans_plusplus`, greedy, seeded) when `num_clusters x N <= 2**22`
(CUB, Cars), else `num_clusters` distinct rows drawn uniformly with the seed (as faiss
does); at most `max_iter` Lloyd iterations (default 10), stopping early when no
assignment changes; `n_init` restarts (default 1, seeds `seed, seed + 1, ...`), the
lowest inertia kept. An empty cluster keeps its previous centroid.
"""

import numpy as np
import tensorflow as tf

from kdml.evaluation.knn import _full_float32_matmul

DEFAULT_MAX_ITER = 10
# Above this many (clusters x points) the k-means++ seeding (sequential over clusters)
# costs more than the Lloyd iterations; below it, it finds well-separated clusters
# that a random start may merge.
_PLUSPLUS_LIMIT = 2**22


def kmeans(embeddings, num_clusters, *, seed=0, n_init=1, max_iter=DEFAULT_MAX_ITER,
           max_memory_bytes=256 * 2**20):
    """Cluster the L2-normalised rows of `embeddings` into `num_clusters` by Lloyd's k-means.

    Args:
        embeddings: `(N, d)` float array.
        num_clusters: `k`, `1 <= k <= N`.
        seed: seed of the initial centroids (restart r uses `seed + r`).
        n_init: restarts; the clustering of lowest inertia is returned.
        max_iter: Lloyd iterations at most per restart (each one `(N, k, d)` products).
        max_memory_bytes: budget of the `(B, k)` assignment tiles.

    Returns:
        `(assignments (N,) int64, centroids (k, d) float32, inertia float, iterations int)`
        of the best restart; inertia is the sum of squared distances to the centroids.

    Example:

    >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32)
    >>> assignments, *_ = kmeans(x, 2)
    >>> bool(assignments[0] == assignments[1] != assignments[2] == assignments[3])
    True
    """
    for name, value in (("num_clusters", num_clusters), ("n_init", n_init),
                        ("max_iter", max_iter), ("max_memory_bytes", max_memory_bytes)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"Expected `{name}` to be a positive integer. Received: {name}={value!r}")
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"Expected `embeddings` of shape (N, d), N >= 1. Received: shape={x.shape}")
    if num_clusters > len(x):
        raise ValueError(f"Expected `num_clusters` <= the number of rows ({len(x)}). "
                         f"Received: num_clusters={num_clusters}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    block = int(max(1, min(len(x), max_memory_bytes // (8 * num_clusters))))
    best = None
    with _full_float32_matmul():
        points = tf.constant(x)
        for restart in range(int(n_init)):
            centroids = initial_centroids(x, num_clusters, seed=seed + restart)
            result = lloyd(points, centroids, max_iter=int(max_iter), block=block)
            if best is None or result[2] < best[2]:
                best = result
    return best


def initial_centroids(x, num_clusters, *, seed):
    """`(k, d)` starting centroids: k-means++ for small problems, else k distinct rows."""
    if num_clusters * len(x) <= _PLUSPLUS_LIMIT:
        from sklearn.cluster import kmeans_plusplus
        from threadpoolctl import threadpool_limits

        # its many small GEMMs oversubscribe a busy CPU when multi-threaded
        with threadpool_limits(limits=1, user_api="blas"):
            centroids, _ = kmeans_plusplus(x, num_clusters, random_state=seed)
        return centroids.astype(np.float32)
    rows = np.random.default_rng(seed).choice(len(x), size=num_clusters, replace=False)
    return x[np.sort(rows)]


def lloyd(points, centroids, *, max_iter, block):
    """Lloyd iterations from `centroids` until no assignment changes or `max_iter`.

    Returns `(assignments (N,) int64, centroids (k, d), inertia, iterations)`.
    """
    centroids = tf.constant(centroids)
    num_clusters = int(centroids.shape[0])
    assignments = None
    iterations = 0
    for iterations in range(1, max_iter + 1):
        new_assignments, _ = _assign(points, centroids, block)
        centroids = _update(points, new_assignments, centroids, num_clusters)
        changed = assignments is None or bool(tf.reduce_any(new_assignments != assignments))
        assignments = new_assignments
        if not changed:
            break
    assignments, distances = _assign(points, centroids, block)
    return (assignments.numpy().astype(np.int64), centroids.numpy(),
            float(tf.reduce_sum(tf.cast(distances, tf.float64))), iterations)


def _assign(points, centroids, block):
    """Nearest centroid `(N,)` int32 and squared distance `(N,)` of every point."""
    half_norms = 0.5 * tf.reduce_sum(tf.square(centroids), axis=1)
    # stored transposed: on CPU `matmul(a, b, transpose_b=True)` runs at about half speed
    centroids_t = tf.transpose(centroids)
    num_points = int(points.shape[0])
    nearest, distances = [], []
    for start in range(0, num_points, block):
        rows = points[start:start + block]
        if rows.shape[0] < block:  # keep the traced shape
            rows = tf.pad(rows, [[0, block - rows.shape[0]], [0, 0]])
        found, distance = _assign_block(rows, centroids_t, half_norms)
        count = min(block, num_points - start)
        nearest.append(found[:count])
        distances.append(distance[:count])
    return tf.concat(nearest, axis=0), tf.concat(distances, axis=0)


@tf.function
def _assign_block(rows, centroids_t, half_norms):
    """`argmax_c (x . c - |c|^2 / 2)` of a `(B, d)` block (`centroids_t`: `(d, k)`) and
    `|x - c|^2` there."""
    scores = tf.linalg.matmul(rows, centroids_t) - half_norms[None, :]
    nearest = tf.argmax(scores, axis=1, output_type=tf.int32)
    best = tf.reduce_max(scores, axis=1)
    distance = tf.maximum(tf.reduce_sum(tf.square(rows), axis=1) - 2.0 * best, 0.0)
    return nearest, distance


@tf.function
def _update(points, assignments, centroids, num_clusters):
    """Mean of each cluster's points; an empty cluster keeps its centroid."""
    sums = tf.math.unsorted_segment_sum(points, assignments, num_clusters)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(assignments, tf.float32), assignments,
                                          num_clusters)
    return tf.where(counts[:, None] > 0, sums / tf.maximum(counts, 1.0)[:, None], centroids)
