"""`load_tfds` on the real tfds builders, mocked offline by `tfds.testing.mock_data`."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kdml.data.decoding import decode_rgb
from kdml.data.sources.tfds import TFDS_DATASETS, DatasetNotPreparedError, load_tfds


def _class_dirs(paths):
    """tfds class id of each written file: <...>/<class id:05d>/<index>.<ext>."""
    return np.array([int(os.path.basename(os.path.dirname(p))) for p in paths])


def _decoded(paths):
    return [decode_rgb(tf.io.read_file(p)).numpy() for p in paths]


def _assert_protocol(split_set):
    """Labels contiguous 0..C-1, every class has >= 2 images, one tfds class per label."""
    counts = split_set.class_counts()
    assert split_set.num_classes > 0 and (counts >= 2).all()
    dirs = _class_dirs(split_set.paths)
    for label in range(split_set.num_classes):
        assert len(set(dirs[split_set.labels == label])) == 1
    # Relabelled in increasing tfds class id.
    first = [dirs[split_set.labels == c][0] for c in range(split_set.num_classes)]
    assert first == sorted(first)


@pytest.mark.parametrize("name, num_train", [("cub200", 100), ("cars196", 98)])
def test_first_half_of_classes_train_from_merged_splits(tmp_path, name, num_train):
    with tfds.testing.mock_data(num_examples=24):
        splits = load_tfds(name, data_dir=str(tmp_path))
        # Independent reference: what tfds itself decodes for each split, in order.
        builder = tfds.builder(TFDS_DATASETS[name].tfds_name)
        keys = {"image": True, "label": True, **({"label_name": True} if name == "cub200" else {})}
        reference = [(int(ex["label"]), ex["image"])
                     for split in ("train", "test")
                     for ex in builder.as_dataset(split=split, decoders=tfds.decode.PartialDecoding(keys))
                     .as_numpy_iterator()]

    for role, split_set, in_role in [("train", splits.train, lambda c: c < num_train),
                                     ("test", splits.test, lambda c: c >= num_train)]:
        _assert_protocol(split_set)
        expected = [(c, image) for c, image in reference if in_role(c)]
        np.testing.assert_array_equal(_class_dirs(split_set.paths), [c for c, _ in expected])
        for got, (_, image) in zip(_decoded(split_set.paths), expected):
            np.testing.assert_array_equal(got, image)
        assert split_set.name == f"tfds:{name}/{role}"
    assert not set(splits.train.class_names) & set(splits.test.class_names)
    assert splits.train.num_images + splits.test.num_images == len(reference)
    if name == "cars196":  # real class names ship with the builder's metadata
        assert splits.train.class_names[0] in tfds.builder("cars196").info.features["label"].names
    else:
        first_class = _class_dirs(splits.train.paths)[splits.train.labels == 0][0]
        assert splits.train.class_names[0].startswith(f"{first_class + 1:03d}.")  # like "001.x"


def _fake_as_dataset(examples_by_split, fail_after=None):
    """An `as_dataset_fn` for `mock_data` serving fixed examples per split."""

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        examples = examples_by_split[str(split)]

        def generate():
            for i, ex in enumerate(examples):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError("disk full")
                yield ex

        first = examples[0]
        signature = {k: tf.TensorSpec.from_tensor(tf.constant(v)) for k, v in first.items()}
        return tf.data.Dataset.from_generator(generate, output_signature=signature)

    return as_dataset


def _image(value, size=(7, 6)):
    return np.full(size + (3,), value, np.uint8)


def _sop_examples():
    """Train: product classes 0-4 (3 JPEGs each), test: 11318-11321 (2 PNGs each)."""
    train = [{"image": tf.io.encode_jpeg(_image(10 * c)).numpy(), "class_id": c}
             for c in [3, 0, 1, 2, 4] for _ in range(3)]
    test = [{"image": tf.io.encode_png(_image(200 + c - 11318)).numpy(), "class_id": c}
            for c in range(11321, 11317, -1) for _ in range(2)]
    return {"train": train, "test": test}


def test_sop_uses_tfds_splits_and_relabels_contiguously(tmp_path):
    with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset(_sop_examples())):
        splits = load_tfds("sop", data_dir=str(tmp_path))
    assert splits.train.num_classes == 5 and splits.test.num_classes == 4
    _assert_protocol(splits.train)
    _assert_protocol(splits.test)
    np.testing.assert_array_equal(splits.train.labels, [3] * 3 + [0] * 3 + [1] * 3 + [2] * 3 + [4] * 3)
    np.testing.assert_array_equal(splits.test.labels, [3, 3, 2, 2, 1, 1, 0, 0])
    assert all(p.endswith(".jpg") for p in splits.train.paths)
    assert all(p.endswith(".png") for p in splits.test.paths)
    for path, label in zip(splits.test.paths, splits.test.labels):
        np.testing.assert_array_equal(_decoded([path])[0], _image(200 + label))
    for path, label in zip(splits.train.paths, splits.train.labels):
        assert np.abs(_decoded([path])[0].astype(int) - 10 * label).max() <= 1  # JPEG


def test_omniglot_decoded_arrays_are_written_as_png(tmp_path):
    def example(label, alphabet, char, value):
        return {"image": _image(value, (9, 9)), "label": label, "alphabet": alphabet,
                "alphabet_char_id": char}

    examples = {"train": [example(5, 0, 4, 1), example(5, 0, 4, 2), example(7, 1, 0, 3), example(7, 1, 0, 4)],
                "test": [example(1400, 40, 9, 5), example(1400, 40, 9, 6), example(1300, 39, 0, 7),
                         example(1300, 39, 0, 8)]}
    with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset(examples)):
        splits = load_tfds("omniglot", data_dir=str(tmp_path))
    # Alphabet names are numbers until the real dataset's metadata is present.
    assert splits.train.class_names == ("0/character05", "1/character01")
    assert splits.test.class_names == ("39/character01", "40/character10")
    np.testing.assert_array_equal(splits.test.labels, [1, 1, 0, 0])
    assert all(p.endswith(".png") for p in splits.test.paths)
    np.testing.assert_array_equal(_decoded(splits.test.paths[:1])[0], _image(5, (9, 9)))


def test_second_call_reads_only_the_manifest(tmp_path):
    with tfds.testing.mock_data(num_examples=10):
        first = load_tfds("cub200", data_dir=str(tmp_path))
    folder = tmp_path / "kdml_images" / "cub200"
    files = sorted(folder.rglob("*"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert (folder / "manifest.json").is_file()

    # Outside mock_data there is no tfds data at all: only the manifest can answer.
    second = load_tfds("cub200", data_dir=str(tmp_path))
    np.testing.assert_array_equal(second.train.paths, first.train.paths)
    np.testing.assert_array_equal(second.test.labels, first.test.labels)
    assert second.train.class_names == first.train.class_names
    assert sorted(folder.rglob("*")) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_interrupted_write_leaves_nothing_behind(tmp_path):
    examples = _sop_examples()
    with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset(examples, fail_after=4)):
        with pytest.raises(Exception, match="disk full"):
            load_tfds("sop", data_dir=str(tmp_path))
    assert os.listdir(tmp_path / "kdml_images") == []
    with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset(examples)):
        assert load_tfds("sop", data_dir=str(tmp_path)).train.num_images == 15
    assert os.listdir(tmp_path / "kdml_images") == ["sop"]


def test_not_prepared_says_how_to_download(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as info:
        load_tfds("cub200", data_dir=str(tmp_path))
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "--dataset=tfds:cub200 --download" in message
    assert "tfds build caltech_birds2011" in message
    assert str(tmp_path) in message and "--data_dir" in message
    assert not (tmp_path / "kdml_images").exists()


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="cars196, cub200, omniglot, sop"):
        load_tfds("imagenet")


@pytest.mark.parametrize("name", sorted(TFDS_DATASETS))
def test_feature_keys_exist_in_the_builders(name):
    """`info` is available offline: the hard-coded keys match tfds's features."""
    source = TFDS_DATASETS[name]
    features = tfds.builder(source.tfds_name).info.features
    for key in (source.image_key, source.label_key) + tuple(source.name_keys):
        assert key in features
    assert isinstance(features[source.label_key], tfds.features.ClassLabel)
