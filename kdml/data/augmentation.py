"""Crops of the DML recipes as stateless TensorFlow ops.

Training: random-resized-crop (Szegedy et al. 2015; torchvision `RandomResizedCrop`:
area fraction and log-uniform aspect ratio, 10 attempts, centre-crop fallback) and
an optional horizontal flip. Evaluation: the centred square of `crop_fraction` of the
shorter side, resized to `size` (the "Resize(256), CenterCrop(224)" of
ImageNet-pretrained recipes). Boxes are drawn for a batch; `crop_and_resize_one`
cuts each image at whole pixels and resizes it with antialiasing. All randomness is stateless and keyed by a seed
tensor, so a resumed run reproduces the same crops.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

_ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation of one kind of data.

    Attributes:
        crop_area: (min, max) fraction of the image area a random crop covers.
        crop_ratio: (min, max) aspect ratio (width / height) of a random crop.
        flip: random horizontal flip (off for glyphs and text, whose mirror
            image is another character).
    """

    crop_area: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip: bool = True


AUGMENTATIONS = {
    # Photographs (CUB, Cars, SOP): the Proxy Anchor / MS recipes.
    "photo": Augmentation(crop_area=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True),
    # Glyphs and handwriting: mild crops that keep the strokes, no mirror images.
    "glyph": Augmentation(crop_area=(0.7, 1.0), crop_ratio=(0.9, 1.1), flip=False),
    "none": Augmentation(crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False),
}


def crop_uniforms(seed, batch_size):
    """`(B, 2 * 10 + 2)` uniform draws that decide B random-resized crops.

    Drawn for a whole batch from one seed, then turned into a box per image by
    `random_resized_crop_boxes` once that image's size is known (after decoding a
    file), so a crop depends only on the seed and the image's position in the batch.
    """
    return tf.random.stateless_uniform([batch_size, 2 * _ATTEMPTS + 2], seed)


def random_resized_crop_boxes(uniforms, image_hw, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Normalised crop boxes `(B, 4)` [y1, x1, y2, x2], one per image.

    Args:
        uniforms: `(B, 22)` draws in [0, 1) from `crop_uniforms`.
        image_hw: `(B, 2)` float heights and widths of the source images.
        area: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (w / h), sampled log-uniformly.
    """
    image_hw = tf.cast(image_hw, tf.float32)
    h, w = image_hw[:, 0:1], image_hw[:, 1:2]
    area_u, ratio_u, pos_u = (uniforms[:, :_ATTEMPTS], uniforms[:, _ATTEMPTS:2 * _ATTEMPTS],
                              uniforms[:, 2 * _ATTEMPTS:])
    target_area = h * w * (area[0] + (area[1] - area[0]) * area_u)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_low + (log_high - log_low) * ratio_u)
    crop_w = tf.round(tf.sqrt(target_area * aspect))
    crop_h = tf.round(tf.sqrt(target_area / aspect))
    fits = (crop_w <= w) & (crop_h <= h) & (crop_w > 0) & (crop_h > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1)  # first attempt that fits
    any_fit = tf.reduce_any(fits, axis=1)
    crop_w = tf.gather(crop_w, first, batch_dims=1)
    crop_h = tf.gather(crop_h, first, batch_dims=1)
    # Fallback: the largest centred crop within the ratio range (torchvision's rule).
    h1, w1 = h[:, 0], w[:, 0]
    in_ratio = w1 / h1
    fallback_w = tf.where(in_ratio > ratio[1], h1 * ratio[1], w1)
    fallback_h = tf.where(in_ratio < ratio[0], w1 / ratio[0], h1)
    crop_w = tf.where(any_fit, crop_w, tf.round(fallback_w))
    crop_h = tf.where(any_fit, crop_h, tf.round(fallback_h))
    top = tf.where(any_fit, tf.floor(pos_u[:, 0] * (h1 - crop_h + 1)), tf.floor((h1 - crop_h) / 2))
    left = tf.where(any_fit, tf.floor(pos_u[:, 1] * (w1 - crop_w + 1)), tf.floor((w1 - crop_w) / 2))
    return tf.stack([top / h1, left / w1, (top + crop_h) / h1, (left + crop_w) / w1], axis=1)


def center_crop_boxes(image_hw, crop_fraction=0.875):
    """Normalised boxes `(B, 4)` of the centred square of side `crop_fraction` x shorter side."""
    image_hw = tf.cast(image_hw, tf.float32)
    side = tf.reduce_min(image_hw, axis=1, keepdims=True) * crop_fraction
    half = side / image_hw / 2.0  # (B, 2) half extents, normalised
    return tf.concat([0.5 - half, 0.5 + half], axis=1)


def crop_and_resize_one(image, box, size: int):
    """Crops `(H, W, 3)` to a normalised box `(4,)`, resizes to `(size, size, 3)` float32.

    The box is snapped to whole pixels (boxes from this module already are) and the
    resize is bilinear with antialiasing, so large shrink factors do not alias.
    """
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    top_left = tf.cast(tf.round(box[:2] * hw), tf.int32)
    bottom_right = tf.cast(tf.round(box[2:] * hw), tf.int32)
    extent = tf.maximum(bottom_right - top_left, 1)
    crop = tf.slice(image, tf.concat([top_left, [0]], 0), tf.concat([extent, [-1]], 0))
    resized = tf.image.resize(tf.cast(crop, tf.float32), [size, size], method="bilinear",
                              antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0)


def random_flip(seed, images, offset=0, batch_size=None):
    """Flips each image of `(b, H, W, C)` left-right with probability 1/2.

    `images` may be rows `[offset, offset + b)` of a batch of `batch_size` (one
    worker's shard): they get the draws they have in the whole batch.
    """
    n = tf.shape(images)[0]
    total = n if batch_size is None else batch_size
    draws = tf.random.stateless_uniform([total, 1, 1, 1], seed)
    flip = draws[offset:offset + n] < 0.5
    return tf.where(flip, tf.reverse(images, axis=[2]), images)
