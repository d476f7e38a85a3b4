import numpy as np
import tensorflow as tf

from kdml.data import AUGMENTATIONS, ImageSet, eval_dataset, steps_per_epoch, train_dataset


def _coded_set(num_classes=6, per_class=4, size=8):
    """Image i is filled with the value i, so each output pixel names its source image."""
    n = num_classes * per_class
    pixels = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3))
    labels = np.repeat(np.arange(num_classes), per_class)
    return ImageSet(labels=labels, class_names=[f"c{i}" for i in range(num_classes)],
                    pixels=np.ascontiguousarray(pixels), name="coded")


def _as_files(image_set, tmp_path):
    paths = []
    for i, image in enumerate(image_set.pixels):
        path = str(tmp_path / f"{i}.png")
        tf.io.write_file(path, tf.io.encode_png(image))
        paths.append(path)
    return ImageSet(labels=image_set.labels, class_names=image_set.class_names, paths=paths)


def test_train_batches_carry_the_sampled_images_and_their_labels(tmp_path):
    coded = _coded_set()
    for source in (coded, _as_files(coded, tmp_path)):
        data = train_dataset(source, image_size=8, classes_per_batch=3, images_per_class=2,
                             augmentation=AUGMENTATIONS["none"], seed=0)
        for images, labels in data.take(3):
            images, labels = images.numpy(), labels.numpy()
            assert images.shape == (6, 8, 8, 3) and images.dtype == np.float32
            index = images[:, 0, 0, 0].astype(int)
            assert np.all(images == index[:, None, None, None])  # no crop, no resampling
            np.testing.assert_array_equal(labels, coded.labels[index])
            assert len(set(labels)) == 3


def test_files_and_pixels_give_the_same_augmented_batches(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 20, 20, 3)).astype(np.uint8)
    memory = ImageSet(labels=np.repeat(np.arange(3), 4), class_names="abc", pixels=pixels)
    files = _as_files(memory, tmp_path)
    kw = dict(image_size=16, classes_per_batch=2, images_per_class=2,
              augmentation=AUGMENTATIONS["photo"], seed=5)
    a = next(iter(train_dataset(memory, **kw)))[0].numpy()
    b = next(iter(train_dataset(files, **kw)))[0].numpy()
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_resumed_pipeline_continues_the_same_stream():
    data = _coded_set()
    kw = dict(image_size=6, classes_per_batch=2, images_per_class=2,
              augmentation=AUGMENTATIONS["photo"], seed=1)
    full = [b[0].numpy() for b in train_dataset(data, **kw).take(5)]
    resumed = [b[0].numpy() for b in train_dataset(data, start_step=3, **kw).take(2)]
    np.testing.assert_array_equal(full[3], resumed[0])
    np.testing.assert_array_equal(full[4], resumed[1])


def test_eval_dataset_yields_every_image_once_in_order():
    data = _coded_set(num_classes=5, per_class=3, size=8)
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in
                           eval_dataset(data, image_size=4, batch_size=4, crop_fraction=0.5)])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape == (15, 4, 4, 3)
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(15))
    np.testing.assert_array_equal(labels, data.labels)


def test_steps_per_epoch_rounds_up():
    assert steps_per_epoch(128, 128) == 1
    assert steps_per_epoch(129, 128) == 2
    assert steps_per_epoch(2000, 128) == 16


def test_two_views_are_adjacent_independently_augmented_copies_of_each_image():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 20, 20, 3)).astype(np.uint8)
    data = ImageSet(labels=np.repeat(np.arange(3), 4), class_names="abc", pixels=pixels)
    kw = dict(image_size=16, classes_per_batch=2, images_per_class=2,
              augmentation=AUGMENTATIONS["photo"], seed=5)
    single_images, single_labels = (t.numpy() for t in next(iter(train_dataset(data, **kw))))
    images, labels = (t.numpy() for t in next(iter(train_dataset(data, views=2, **kw))))
    assert images.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(labels, np.repeat(single_labels, 2))
    np.testing.assert_array_equal(images[0::2], single_images)  # view 0 = the one-view batch
    for i in range(4):  # view 1 is another crop of the same image
        assert np.abs(images[2 * i + 1] - images[2 * i]).mean() > 1.0
    # Coded images without augmentation: both views show the same source image.
    coded = _coded_set()
    images, labels = (t.numpy() for t in next(iter(train_dataset(
        coded, image_size=8, classes_per_batch=3, images_per_class=2,
        augmentation=AUGMENTATIONS["none"], views=2))))
    index = images[:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(index[0::2], index[1::2])
    np.testing.assert_array_equal(labels, coded.labels[index])


def test_instance_labels_name_each_image_of_the_global_batch_and_shards_add_up():
    coded = _coded_set()
    kw = dict(image_size=8, classes_per_batch=3, images_per_class=2,
              augmentation=AUGMENTATIONS["glyph"], seed=2, views=2, instance_labels=True)
    images, labels = (t.numpy() for t in next(iter(train_dataset(coded, **kw))))
    np.testing.assert_array_equal(labels, np.repeat(np.arange(6), 2))
    shards = [next(iter(train_dataset(coded, num_shards=2, shard_index=w, **kw))) for w in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([s[0].numpy() for s in shards]), images)
    np.testing.assert_array_equal(np.concatenate([s[1].numpy() for s in shards]), labels)


def test_views_other_than_one_or_two_are_rejected():
    import pytest

    with pytest.raises(ValueError, match="views=3"):
        train_dataset(_coded_set(), image_size=8, classes_per_batch=2, images_per_class=2,
                      views=3)
