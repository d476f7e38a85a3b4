import numpy as np
import tensorflow as tf

from kdml.data import augmentation as aug


def _seed(i=0):
    return tf.constant([7, i], tf.int64)


def _boxes(seed, hw, **kw):
    return aug.random_resized_crop_boxes(aug.crop_uniforms(seed, hw.shape[0]), hw, **kw)


def test_center_crop_box_is_the_central_square_of_the_shorter_side():
    boxes = aug.center_crop_boxes(tf.constant([[32.0, 32.0], [40.0, 20.0]]), 0.875).numpy()
    np.testing.assert_allclose(boxes[0], [0.0625, 0.0625, 0.9375, 0.9375])
    # shorter side 20 -> side 17.5: half-extent 8.75 / 40 in y and 8.75 / 20 in x
    np.testing.assert_allclose(boxes[1], [0.5 - 0.21875, 0.5 - 0.4375, 0.5 + 0.21875, 0.5 + 0.4375])


def test_random_resized_crop_respects_area_and_ratio_ranges():
    hw = tf.constant([[200.0, 300.0]] * 2000)
    boxes = _boxes(_seed(), hw, area=(0.2, 0.6), ratio=(0.5, 2.0)).numpy()
    assert np.all(boxes >= 0) and np.all(boxes <= 1)
    h = (boxes[:, 2] - boxes[:, 0]) * 200
    w = (boxes[:, 3] - boxes[:, 1]) * 300
    area = h * w / (200 * 300)
    assert area.min() > 0.19 and area.max() < 0.61  # rounding to whole pixels
    assert (w / h).min() > 0.48 and (w / h).max() < 2.05
    assert area.std() > 0.08  # spread over the range, not a constant
    again = _boxes(_seed(), hw, area=(0.2, 0.6), ratio=(0.5, 2.0)).numpy()
    np.testing.assert_array_equal(boxes, again)
    other = _boxes(_seed(1), hw, area=(0.2, 0.6), ratio=(0.5, 2.0)).numpy()
    assert not np.array_equal(boxes, other)


def test_impossible_crop_falls_back_to_the_largest_crop_within_the_ratio_range():
    # A 10 x 100 strip cannot hold a crop of ratio <= 2 with area >= 90% of the image.
    boxes = _boxes(_seed(), tf.constant([[10.0, 100.0]]),
                                          area=(0.9, 1.0), ratio=(0.5, 2.0)).numpy()[0]
    h, w = (boxes[2] - boxes[0]) * 10, (boxes[3] - boxes[1]) * 100
    np.testing.assert_allclose([h, w], [10, 20])


def test_full_box_at_the_same_size_is_the_identity():
    image = np.random.default_rng(0).integers(0, 256, (16, 12, 3)).astype(np.uint8)
    out = aug.crop_and_resize_one(image, tf.constant([0.0, 0.0, 1.0, 1.0]), 16).numpy()
    np.testing.assert_allclose(out, tf.image.resize(image.astype(np.float32), [16, 16]).numpy())
    square = image[:12]
    out = aug.crop_and_resize_one(square, tf.constant([0.0, 0.0, 1.0, 1.0]), 12).numpy()
    np.testing.assert_allclose(out, square.astype(np.float32), atol=1e-4)


def test_crop_takes_the_box_pixels_and_shrinks_with_antialiasing():
    image = np.zeros((40, 40, 3), np.uint8)
    image[10:30, 20:40] = 200
    out = aug.crop_and_resize_one(image, tf.constant([0.25, 0.5, 0.75, 1.0]), 5).numpy()
    np.testing.assert_allclose(out, 200.0, atol=1e-3)  # exactly the bright box
    # a 1-pixel stripe pattern shrunk 8x averages to its mean instead of aliasing
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    out = aug.crop_and_resize_one(stripes, tf.constant([0.0, 0.0, 1.0, 1.0]), 8).numpy()
    np.testing.assert_allclose(out, 127.5, atol=8)


def test_flip_mirrors_about_half_of_the_images():
    images = tf.random.stateless_uniform([400, 4, 5, 3], [1, 2])
    out = aug.random_flip(_seed(), images).numpy()
    mirrored = np.all(out == images.numpy()[:, :, ::-1], axis=(1, 2, 3))
    same = np.all(out == images.numpy(), axis=(1, 2, 3))
    assert np.all(mirrored ^ same)
    assert 150 < mirrored.sum() < 250
