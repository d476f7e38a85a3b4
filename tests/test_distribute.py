"""kdml.distribute: TF_CONFIG checks, worker roles, per-worker shards of the global
batch, and Multi-Similarity's global-batch value and gradients on 2 replicas."""

import json

import numpy as np
import pytest
import tensorflow as tf

from kdml.data import AUGMENTATIONS
from kdml.data.image_set import ImageSet
from kdml.data.pipeline import train_dataset
from kdml.distribute import (check_replica_batch, create_strategy, distribute_batches,
                             local_cluster, parse_tf_config, worker_role)
from kdml.losses import MultiSimilarityLoss


@pytest.mark.parametrize("tf_config, message", [
    (None, "needs the TF_CONFIG environment variable"),
    ("{not json", "not valid JSON"),
    (json.dumps({"cluster": {"worker": ["a:1"]}}), "needs `cluster.worker`"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}),
     "index into it"),
])
def test_bad_tf_config_is_a_clear_error(tf_config, message, monkeypatch):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=message) as error:
        create_strategy("multi_worker")
    assert '"task": {"type": "worker", "index": 0}' in str(error.value)  # shows a valid one


def test_local_cluster_lists_distinct_free_ports_and_each_task():
    configs = [json.loads(c) for c in local_cluster(3)]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    for i, raw in enumerate(local_cluster(2)):
        assert parse_tf_config({"TF_CONFIG": raw})["task"]["index"] == i


def test_single_process_strategies_are_the_chief(mirrored):
    for strategy in (tf.distribute.get_strategy(), mirrored):
        role = worker_role(strategy)
        assert (role.index, role.count, role.is_chief) == (0, 1, True)


def test_batch_must_split_over_replicas(mirrored):
    check_replica_batch(6, mirrored)
    with pytest.raises(ValueError, match="multiple of 2"):
        check_replica_batch(9, mirrored)


@pytest.fixture(scope="module")
def image_set():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 20, 24, 3), dtype=np.uint8)  # 8 classes x 5
    return ImageSet(labels=np.repeat(np.arange(8), 5), class_names=[str(i) for i in range(8)],
                    pixels=pixels)


def _batches(image_set, steps, **kwargs):
    data = train_dataset(image_set, image_size=16, classes_per_batch=4, images_per_class=3,
                         augmentation=AUGMENTATIONS["photo"], seed=5, start_step=2, **kwargs)
    return [(x.numpy(), y.numpy()) for x, y in data.take(steps)]


def test_worker_shards_concatenate_to_the_single_process_batch(image_set):
    """Crops and flips included: worker w loads rows [w B/W, (w+1) B/W) of batch s."""
    whole = _batches(image_set, 3)
    for workers in (2, 4):
        shards = [_batches(image_set, 3, num_shards=workers, shard_index=w) for w in range(workers)]
        for step in range(3):
            np.testing.assert_array_equal(
                np.concatenate([s[step][0] for s in shards]), whole[step][0])
            np.testing.assert_array_equal(
                np.concatenate([s[step][1] for s in shards]), whole[step][1])
    halves = _batches(image_set, 1, num_shards=2, shard_index=0)[0][1], \
        _batches(image_set, 1, num_shards=2, shard_index=1)[0][1]
    assert not set(halves[0]) & set(halves[1])  # P=4 over 2 workers: whole classes each
    with pytest.raises(ValueError, match="multiple of the number of shards"):
        _batches(image_set, 1, num_shards=5, shard_index=0)


def test_distributed_replicas_get_their_rows_of_the_global_batch(image_set, mirrored):
    whole = _batches(image_set, 2)
    data = distribute_batches(
        mirrored, lambda index, count: train_dataset(
            image_set, image_size=16, classes_per_batch=4, images_per_class=3,
            augmentation=AUGMENTATIONS["photo"], seed=5, start_step=2, num_shards=count,
            shard_index=index), 12)
    iterator = iter(data)
    for step in range(2):
        images, labels = next(iterator)
        local_images = [t.numpy() for t in mirrored.experimental_local_results(images)]
        local_labels = [t.numpy() for t in mirrored.experimental_local_results(labels)]
        np.testing.assert_array_equal(np.concatenate(local_images), whole[step][0])
        np.testing.assert_array_equal(np.concatenate(local_labels), whole[step][1])


def test_multi_similarity_on_two_replicas_is_the_global_batch_loss(mirrored):
    """Each replica's value is L(global batch) / 2; each replica's gradient covers its
    own rows and equals the single-device gradient of L on the concatenated batch."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1], np.int32)  # replica 1's 0 and 1 pair globally
    loss = MultiSimilarityLoss(beta=50.0)

    embeddings = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        single = loss(tf.constant(y), embeddings)
    single_gradient = tape.gradient(single, embeddings).numpy()
    assert np.abs(single_gradient).sum() > 0

    def replica_fn():
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        local = tf.constant(x)[4 * r:4 * r + 4]
        with tf.GradientTape() as tape:
            tape.watch(local)
            value = loss(tf.constant(y)[4 * r:4 * r + 4], local)
        return value, tape.gradient(value, local)

    values, gradients = mirrored.run(replica_fn)
    values = [v.numpy() for v in mirrored.experimental_local_results(values)]
    np.testing.assert_allclose(values, [single.numpy() / 2] * 2, rtol=1e-6)
    gradients = [g.numpy() for g in mirrored.experimental_local_results(gradients)]
    np.testing.assert_allclose(np.concatenate(gradients), single_gradient, rtol=1e-5, atol=1e-7)
