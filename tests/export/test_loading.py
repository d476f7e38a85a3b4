"""`kdml.export.load_embedder` on the three formats, and its input checks."""

import os

import keras
import numpy as np
import pytest

import kdml
from kdml.export import load_embedder


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    keras.utils.set_random_seed(1)
    embedder = kdml.models.build_embedder("conv4", embedding_dim=8, image_size=20)
    path = str(tmp_path_factory.mktemp("loading") / "embedder.keras")
    embedder.save(path)
    return path, embedder


def test_keras_file_embeds_like_the_model(keras_file, rng):
    path, embedder = keras_file
    loaded = load_embedder(path)
    assert (loaded.format, loaded.image_size, loaded.embedding_dim) == ("keras", (20, 20), 8)
    images = rng.integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    expected = keras.ops.convert_to_numpy(embedder(images.astype("float32"), training=False))
    # uint8, float pixels and batching all give the model's output
    for x, batch_size in ((images, 2), (images.astype(np.float64), 64)):
        got = loaded.embed(x, batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == (5, 8)
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert loaded.embed(images[:0]).shape == (0, 8)


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 21, 20, 3), np.uint8), r"\(N, 20, 20, 3\)"),
    (np.zeros((2, 20, 20, 1), np.uint8), r"\(N, 20, 20, 3\).*grayscale"),
    (np.zeros((20, 20, 3), np.uint8), "add a batch axis"),
    (np.full((1, 20, 20, 3), 300.0), r"\[0, 255\]"),
    (np.full((1, 20, 20, 3), -1.0), r"\[0, 255\]"),
    (np.full((1, 20, 20, 3), "a"), "dtype"),
])
def test_bad_images_name_the_expected_shape(keras_file, images, message):
    with pytest.raises(ValueError, match=message):
        load_embedder(keras_file[0]).embed(images)


def test_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="No embedder"):
        load_embedder(str(tmp_path / "missing.keras"))
    with pytest.raises(ValueError, match="not a SavedModel"):
        load_embedder(str(tmp_path))
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=".keras file, a .tflite file or a SavedModel"):
        load_embedder(str(other))


def test_every_exported_format_loads(exported):
    images, reference = exported["images"][:16], exported["reference"][:16]
    for key, path in {"keras": exported["keras"], **exported["paths"]}.items():
        loaded = load_embedder(path)
        assert loaded.format == ("tflite" if key.startswith("tflite_") else key)
        assert loaded.image_size == (28, 28) and loaded.embedding_dim == 32
        got = loaded.embed(images, batch_size=5)
        assert got.dtype == np.float32 and got.shape == (16, 32)
        cosine = np.sum(got * reference, axis=1) / np.linalg.norm(got, axis=1)
        assert cosine.min() > 0.95, (key, cosine.min())
        with pytest.raises(ValueError, match=r"\(N, 28, 28, 3\)"):
            loaded.embed(np.zeros((1, 28, 28, 4), np.uint8))
    assert os.path.isdir(exported["paths"]["saved_model"])
