"""tf.data pipelines: class-balanced training batches and ordered evaluation batches.

Images leave the pipeline as float32 RGB in [0, 255]; normalisation is the model's
job (`kdml.layers.PixelNormalization`), so an exported model takes camera pixels.
Each batch map fetches its images (a gather from memory, or a file read and decode),
crops each at its own size and resizes it with antialiasing (a 105 px Omniglot
character or a 500 px photo shrinks without aliasing), in parallel across batches.

A frozen-backbone run (`--freeze_backbone`) computes the backbone's features of every
image once, from `unaugmented_dataset` (the training crop with augmentation "none")
and `eval_dataset`, then trains on `feature_train_dataset`: the same class-balanced
batches, as rows of the feature array instead of decoded images.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from kdml.data import augmentation as aug
from kdml.data.decoding import decode_rgb
from kdml.data.image_set import ImageSet
from kdml.data.sampler import class_balanced_batches

AUTOTUNE = tf.data.AUTOTUNE


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """ceil(N / batch): one epoch shows as many images as the training set holds."""
    return max(1, math.ceil(num_images / batch_size))


def _fetcher(image_set: ImageSet):
    """index -> uint8 (H, W, 3) image, from memory or from its file."""
    if image_set.pixels is not None:
        pixels = tf.constant(image_set.pixels)
        return lambda index: tf.gather(pixels, index)
    paths = tf.constant(image_set.paths)
    return lambda index: decode_rgb(tf.io.read_file(tf.gather(paths, index)))


def _load_batch(fetch, indices, uniforms, make_box, size: int):
    """`(B,)` indices and `(B, u)` random draws -> `(B, S, S, 3)` float32 crops."""

    def one(args):
        index, u = args
        image = fetch(index)
        hw = tf.cast(tf.shape(image)[None, :2], tf.float32)
        return aug.crop_and_resize_one(image, make_box(u[None], hw)[0], size)

    return tf.map_fn(one, (indices, uniforms),
                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))


def _shard_rows(classes_per_batch, images_per_class, num_shards, shard_index, views):
    """`(P x K, rows of this shard, its first row)` of a global P x K batch; ValueError
    (naming the flags) when the batch does not split over the shards or views is not 1 or 2."""
    batch = classes_per_batch * images_per_class
    if num_shards < 1 or not 0 <= shard_index < num_shards or batch % num_shards:
        raise ValueError(
            f"Cannot take shard {shard_index} of {num_shards} from batches of P x K = {batch}: "
            "the batch must be a multiple of the number of shards (workers). "
            "Change --classes_per_batch or --images_per_class.")
    if views not in (1, 2):
        raise ValueError(f"`views` must be 1 or 2. Received: views={views!r}. Fix: --views=1 or 2.")
    rows = batch // num_shards
    return batch, rows, shard_index * rows


def train_dataset(image_set: ImageSet, *, image_size: int, classes_per_batch: int = 32,
                  images_per_class: int = 4, augmentation: aug.Augmentation = aug.AUGMENTATIONS["photo"],
                  seed: int = 0, start_step: int = 0, num_shards: int = 1,
                  shard_index: int = 0, views: int = 1,
                  instance_labels: bool = False) -> tf.data.Dataset:
    """Infinite class-balanced batches for `model.fit`, or one worker's rows of them.

    Args:
        image_set: the training images.
        image_size: output side S.
        classes_per_batch, images_per_class: P and K (batch = P x K).
        augmentation: random-resized-crop range and flip.
        seed: data-order and augmentation seed.
        start_step: first global step (resume).
        num_shards, shard_index: a multi-worker run's W workers and this worker's
            index w: only rows `[w * B / W, (w + 1) * B / W)` of each global batch
            are loaded (B = P x K, a multiple of W), with the crops and flips those
            rows get in the whole batch, so the W shards concatenated are the
            single-process batch (whole classes when W divides P).
        views: V independently augmented views of each sampled image (1 or 2), as
            adjacent rows: image i of the batch is rows V i ... V i + V - 1. View 0 is the
            single-view batch; view v > 0 draws its crops and flips from keys folded
            with v. Used by SupCon and NT-Xent (docs/design.md 3.5).
        instance_labels: label each image's views with the image's row in the global
            batch (0 .. B - 1) instead of its class: the views of one image are then each
            other's only positive (SimCLR's NT-Xent).

    Returns:
        `tf.data.Dataset` of `(images float32 (V B/W, S, S, 3) in [0, 255], labels int32
        (V B/W,))`; batch s depends only on (image_set, seed, s, shard).
    """
    fetch = _fetcher(image_set)
    labels = tf.constant(image_set.labels.astype(np.int32))
    batch, rows, first = _shard_rows(classes_per_batch, images_per_class, num_shards,
                                     shard_index, views)

    def make_box(uniforms, hw):
        return aug.random_resized_crop_boxes(uniforms, hw, augmentation.crop_area,
                                             augmentation.crop_ratio)

    def load(step, indices):
        key = tf.stack([tf.constant(seed, tf.int64) + 1, step])
        crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        indices = indices[first:first + rows]
        out = []
        for view in range(views):
            if view:
                crop_key = tf.random.experimental.stateless_fold_in(crop_key, view)
                flip_key = tf.random.experimental.stateless_fold_in(flip_key, view)
            uniforms = aug.crop_uniforms(crop_key, batch)[first:first + rows]
            images = _load_batch(fetch, indices, uniforms, make_box, image_size)
            if augmentation.flip:
                images = aug.random_flip(flip_key, images, offset=first, batch_size=batch)
            out.append(images)
        images = out[0] if views == 1 else tf.reshape(
            tf.stack(out, axis=1), [views * rows, image_size, image_size, 3])
        images.set_shape([views * rows, image_size, image_size, 3])
        if instance_labels:
            image_labels = first + tf.range(rows, dtype=tf.int32)
        else:
            image_labels = tf.gather(labels, indices)
        return images, tf.repeat(image_labels, views) if views > 1 else image_labels

    indices = class_balanced_batches(image_set.labels, classes_per_batch, images_per_class,
                                     seed=seed, start_step=start_step)
    steps = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
    dataset = tf.data.Dataset.zip(steps, indices).map(load, num_parallel_calls=AUTOTUNE,
                                                      deterministic=True)
    return dataset.prefetch(AUTOTUNE)


def eval_dataset(image_set: ImageSet, *, image_size: int, batch_size: int = 256,
                 crop_fraction: float = 0.875) -> tf.data.Dataset:
    """All images once, in order, centre-cropped (`crop_fraction` of the shorter side) and resized.

    Returns:
        `tf.data.Dataset` of `(images float32 (b, S, S, 3) in [0, 255], labels int32 (b,))`.
    """
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"`crop_fraction` must be in (0, 1]. Received: {crop_fraction}")
    fetch = _fetcher(image_set)
    labels = image_set.labels.astype(np.int32)

    def make_box(_, hw):
        return aug.center_crop_boxes(hw, crop_fraction)

    def load(indices):
        unused = tf.zeros([tf.shape(indices)[0], 1])
        images = _load_batch(fetch, indices, unused, make_box, image_size)
        return images, tf.gather(labels, indices)

    dataset = tf.data.Dataset.range(image_set.num_images).batch(batch_size)
    return dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def unaugmented_dataset(image_set: ImageSet, *, image_size: int,
                        batch_size: int = 256) -> tf.data.Dataset:
    """All images once, in order, cropped as `train_dataset` crops them with augmentation "none".

    That crop is deterministic (the largest centred square, the whole image when it
    is square, no flip), so these batches are exactly the pixels an unaugmented
    training batch holds for the same images: a frozen backbone's features are
    computed from them once.

    Returns:
        `tf.data.Dataset` of `(images float32 (b, S, S, 3) in [0, 255], labels int32 (b,))`.
    """
    fetch = _fetcher(image_set)
    labels = image_set.labels.astype(np.int32)
    none = aug.AUGMENTATIONS["none"]

    def make_box(uniforms, hw):
        return aug.random_resized_crop_boxes(uniforms, hw, none.crop_area, none.crop_ratio)

    def load(indices):
        # With area and ratio 1 the draws move nothing: the crop spans its whole range.
        uniforms = aug.crop_uniforms(tf.constant([0, 0], tf.int64), tf.shape(indices)[0])
        images = _load_batch(fetch, indices, uniforms, make_box, image_size)
        return images, tf.gather(labels, indices)

    dataset = tf.data.Dataset.range(image_set.num_images).batch(batch_size)
    return dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def _feature_gather(features: np.ndarray):
    """index batch -> float32 rows of `features` (an array in memory or a read-only
    `np.memmap` of a feature cache), read by NumPy: no graph constant of the whole array
    (TensorFlow's 2 GiB limit), only the rows of the batch are read."""
    row_shape = list(features.shape[1:])

    def gather(indices):
        rows = tf.numpy_function(lambda i: np.asarray(features[i], dtype=np.float32),
                                 [indices], tf.float32, stateful=False)
        rows.set_shape([indices.shape[0]] + row_shape)
        return rows

    return gather


def feature_train_dataset(features: np.ndarray, labels: np.ndarray, *, classes_per_batch: int = 32,
                          images_per_class: int = 4, seed: int = 0, start_step: int = 0,
                          num_shards: int = 1, shard_index: int = 0, views: int = 1,
                          instance_labels: bool = False) -> tf.data.Dataset:
    """`train_dataset`'s batches as rows of precomputed features (a frozen backbone).

    Batch s holds the features of the images `class_balanced_batches(labels, P, K,
    seed)` draws for step s, with the labels, sharding, views and instance labels of
    `train_dataset` (the V views of an image are V copies of its row: there is no
    augmentation to tell them apart).

    Args:
        features: `(N, ...)` float32 features of the N training images, in the image
            set's order (a NumPy array or a memmap).
        labels: `(N,)` class ids.
        The others: as `train_dataset`.

    Returns:
        `tf.data.Dataset` of `(features float32 (V B/W, ...), labels int32 (V B/W,))`;
        batch s depends only on (labels, seed, s, shard).
    """
    labels = np.asarray(labels)
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels: the features "
                         "must be those of the training images, in their order.")
    batch, rows, first = _shard_rows(classes_per_batch, images_per_class, num_shards,
                                     shard_index, views)
    gather = _feature_gather(features)
    labels_t = tf.constant(labels.astype(np.int32))

    def load(indices):
        indices = indices[first:first + rows]
        indices.set_shape([rows])
        rows_out = gather(indices)
        if instance_labels:
            row_labels = first + tf.range(rows, dtype=tf.int32)
        else:
            row_labels = tf.gather(labels_t, indices)
        if views > 1:
            return tf.repeat(rows_out, views, axis=0), tf.repeat(row_labels, views)
        return rows_out, row_labels

    indices = class_balanced_batches(labels, classes_per_batch, images_per_class,
                                     seed=seed, start_step=start_step)
    return indices.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def feature_eval_dataset(features: np.ndarray, labels: np.ndarray,
                         batch_size: int = 256) -> tf.data.Dataset:
    """All rows of precomputed features once, in order: `eval_dataset` for a frozen backbone.

    Returns:
        `tf.data.Dataset` of `(features float32 (b, ...), labels int32 (b,))`.
    """
    labels = np.asarray(labels).astype(np.int32)
    gather = _feature_gather(features)

    def load(indices):
        return gather(indices), tf.gather(labels, indices)

    dataset = tf.data.Dataset.range(len(labels)).batch(batch_size)
    return dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)
