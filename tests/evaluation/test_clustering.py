"""TensorFlow k-means against scikit-learn's Lloyd iterations from the same start."""

import numpy as np
import pytest
import tensorflow as tf

from kdml.evaluation import clustering, kmeans


def _blobs(rng, num_clusters=4, per_cluster=15, dim=6, spread=0.6):
    centres = rng.normal(size=(num_clusters, dim))
    x = np.repeat(centres, per_cluster, axis=0) + spread * rng.normal(
        size=(num_clusters * per_cluster, dim))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_lloyd_equals_scikit_learn_from_the_same_initial_centroids(rng):
    from sklearn.cluster import KMeans

    x = _blobs(rng)
    start = x[[0, 1, 2, 30]]  # a poor start: three centroids in one blob
    reference = KMeans(n_clusters=4, init=start, n_init=1, max_iter=50, tol=0.0,
                       algorithm="lloyd").fit(x)
    assignments, centroids, inertia, iterations = clustering.lloyd(
        tf.constant(x), start, max_iter=50, block=7)
    np.testing.assert_array_equal(assignments, reference.labels_)
    np.testing.assert_allclose(centroids, reference.cluster_centers_, atol=1e-5)
    assert inertia == pytest.approx(reference.inertia_, rel=1e-5)
    assert 2 < iterations <= 50  # it really moved: not the initial assignment


def test_max_iter_stops_lloyd_early(rng):
    x = _blobs(rng)
    start = x[[0, 1, 2, 30]]
    assignments, centroids, _, iterations = clustering.lloyd(tf.constant(x), start, max_iter=1,
                                                             block=64)
    # one update of the means of the first assignment, then the final assignment
    first = np.argmin(((x[:, None, :] - start[None]) ** 2).sum(-1), axis=1)
    means = np.stack([x[first == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(centroids, means, atol=1e-6)
    np.testing.assert_array_equal(assignments,
                                  np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), 1))
    assert iterations == 1


def test_restarts_keep_the_lowest_inertia(rng):
    x = _blobs(rng, num_clusters=6, per_cluster=5, spread=1.5)
    inertias = [clustering.lloyd(tf.constant(x), clustering.initial_centroids(x, 6, seed=s),
                                 max_iter=10, block=64)[2] for s in (3, 4, 5)]
    _, _, inertia, _ = kmeans(x, 6, seed=3, n_init=3)
    assert inertia == pytest.approx(min(inertias), rel=1e-6)
    again = kmeans(x, 6, seed=3, n_init=3)
    np.testing.assert_array_equal(again[0], kmeans(x, 6, seed=3, n_init=3)[0])


def test_random_rows_start_above_the_plusplus_limit(monkeypatch, rng):
    x = _blobs(rng)
    monkeypatch.setattr(clustering, "_PLUSPLUS_LIMIT", 0)
    start = clustering.initial_centroids(x, 5, seed=1)
    rows = [int(np.flatnonzero((x == row).all(axis=1))[0]) for row in start]
    assert len(set(rows)) == 5 and rows == sorted(rows)  # distinct data rows
    np.testing.assert_array_equal(start, clustering.initial_centroids(x, 5, seed=1))


def test_empty_cluster_keeps_its_centroid():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    start = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)  # nothing near [-1, 0]
    assignments, centroids, _, _ = clustering.lloyd(tf.constant(x), start, max_iter=5, block=2)
    np.testing.assert_array_equal(assignments, [0, 0, 1, 1])
    np.testing.assert_array_equal(centroids[2], [-1, 0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_clusters=0), "num_clusters=0"),
        (dict(num_clusters=9), "num_clusters=9"),
        (dict(num_clusters=2, n_init=0), "n_init=0"),
        (dict(num_clusters=2, max_iter=1.5), "max_iter=1.5"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kmeans(np.ones((4, 2), np.float32), **kwargs)
