"""`class_balanced_batches`: P classes x K images per batch, a pure function of the step.

Every metric loss needs positives in the batch, so DML recipes sample P classes and
K images of each (pytorch-metric-learning's `MPerClassSampler`). Here batch `s` is
drawn with stateless random ops seeded by `(seed, s)`: the data order is identical
across runs, a resumed run continues exactly where it stopped, and every worker of a
multi-worker run draws the same global batch and loads only its own rows of it
(`kdml.data.train_dataset(num_shards=, shard_index=)`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def check_batch_geometry(labels: np.ndarray, classes_per_batch: int, images_per_class: int,
                         name: str = "training set") -> None:
    """Raises a ValueError naming the fix when P x K batches cannot be drawn."""
    if classes_per_batch < 2 or images_per_class < 2:
        raise ValueError(
            "A metric-learning batch needs at least 2 classes and 2 images per class. "
            f"Received: --classes_per_batch={classes_per_batch}, "
            f"--images_per_class={images_per_class}.")
    num_classes = int(np.unique(labels).size)
    if num_classes < classes_per_batch:
        raise ValueError(
            f"The {name} has {num_classes} classes, fewer than --classes_per_batch="
            f"{classes_per_batch}. Lower --classes_per_batch to at most {num_classes} "
            "or use a dataset with more classes.")


def class_balanced_batches(labels, classes_per_batch: int, images_per_class: int,
                           seed: int = 0, start_step: int = 0) -> tf.data.Dataset:
    """An infinite dataset of index batches, P distinct classes x K images each.

    The K images of a class are distinct when the class has at least K images;
    a smaller class repeats its images in a random cycle to fill K.

    Args:
        labels: (N,) int class ids of the images.
        classes_per_batch: P.
        images_per_class: K.
        seed: int, the stream's seed.
        start_step: the first batch index (a resumed run passes its global step).

    Returns:
        `tf.data.Dataset` of int64 `(P * K,)` image indices, class-major
        (`[c1, c1, .., c1, c2, ..]`); batch s depends only on (labels, seed, s).
    """
    labels = np.asarray(labels, dtype=np.int64)
    check_batch_geometry(labels, classes_per_batch, images_per_class)
    classes, counts = np.unique(labels, return_counts=True)
    order = np.argsort(labels, kind="stable")  # image indices grouped by class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    max_count = int(counts.max())
    p, k = classes_per_batch, images_per_class

    order_t = tf.constant(order, tf.int64)
    starts_t = tf.constant(starts, tf.int64)
    counts_t = tf.constant(counts, tf.int64)
    num_classes = len(classes)

    def draw(step):
        key = tf.stack([tf.constant(seed, tf.int64), step])
        class_key, image_key = tf.unstack(
            tf.random.experimental.stateless_split(key, num=2))
        # P distinct classes: the first P of a random permutation.
        picked = tf.argsort(tf.random.stateless_uniform([num_classes], seed=class_key))[:p]
        n = tf.gather(counts_t, picked)  # (P,)
        # A random permutation of each class's images: random keys, invalid slots last.
        keys = tf.random.stateless_uniform([p, max_count], seed=image_key)
        valid = tf.range(max_count, dtype=tf.int64)[None, :] < n[:, None]
        keys = tf.where(valid, keys, 2.0)
        permutation = tf.argsort(keys, axis=1)[:, : min(k, max_count)]
        slot = tf.range(k, dtype=tf.int64)[None, :] % n[:, None]
        offsets = tf.gather(tf.cast(permutation, tf.int64), slot, batch_dims=1)
        return tf.reshape(tf.gather(order_t, tf.gather(starts_t, picked)[:, None] + offsets), [-1])

    return tf.data.Dataset.counter(start=start_step, dtype=tf.int64).map(draw)
