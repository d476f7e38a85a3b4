import numpy as np
import pytest

from kdml.data.sampler import class_balanced_batches


def _batches(labels, p, k, n, **kw):
    it = iter(class_balanced_batches(labels, p, k, **kw))
    return [next(it).numpy() for _ in range(n)]


def test_every_batch_has_p_distinct_classes_of_k_images():
    labels = np.repeat(np.arange(10), [5, 6, 7, 8, 9, 5, 6, 7, 8, 9])
    for batch in _batches(labels, 4, 3, 20, seed=1):
        assert batch.shape == (12,)
        groups = labels[batch].reshape(4, 3)
        assert np.all(groups == groups[:, :1])  # class-major blocks of K
        assert len(set(groups[:, 0])) == 4  # P distinct classes
        for block in batch.reshape(4, 3):
            assert len(set(block)) == 3  # distinct images when the class has >= K


def test_small_class_cycles_through_all_its_images():
    labels = np.array([0, 0, 1, 1, 1, 1, 1])  # class 0 has 2 images, K = 4
    for batch in _batches(labels, 2, 4, 10, seed=0):
        block = batch.reshape(2, 4)[labels[batch].reshape(2, 4)[:, 0] == 0][0]
        values, counts = np.unique(block, return_counts=True)
        assert set(values) == {0, 1} and list(counts) == [2, 2]


def test_batch_is_a_pure_function_of_seed_and_step():
    labels = np.repeat(np.arange(20), 4)
    from_zero = _batches(labels, 5, 2, 8, seed=3)
    from_five = _batches(labels, 5, 2, 3, seed=3, start_step=5)
    for a, b in zip(from_zero[5:], from_five):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_batches(labels, 5, 2, 1, seed=4)[0], from_zero[0])


def test_classes_are_drawn_uniformly():
    labels = np.repeat(np.arange(10), [2] * 5 + [50] * 5)  # image counts must not bias classes
    counts = np.zeros(10)
    for batch in _batches(labels, 2, 2, 500, seed=0):
        counts[np.unique(labels[batch])] += 1
    expected = 500 * 2 / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # 99.9th percentile of chi-square with 9 degrees of freedom


@pytest.mark.parametrize("p,k,message", [(11, 2, "classes_per_batch"), (4, 1, "images_per_class")])
def test_batch_geometry_the_data_cannot_fill_fails_early(p, k, message):
    labels = np.repeat(np.arange(10), 3)
    with pytest.raises(ValueError, match=message):
        class_balanced_batches(labels, p, k)
