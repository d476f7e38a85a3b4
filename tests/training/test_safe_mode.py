"""`.keras` files load in Keras safe mode: a Python `Lambda` is refused, not run."""

import keras
import numpy as np
import pytest

import kdml  # noqa: F401


@pytest.fixture
def lambda_model_path(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)  # Python bytecode in the file
    path = str(tmp_path / "lambda.keras")
    keras.Model(inputs, outputs).save(path)
    return path


def test_keras_load_refuses_a_lambda_layer(lambda_model_path):
    # As kdml calls it (kdml.evaluate, kdml.export): safe_mode defaults to True.
    with pytest.raises(ValueError, match="safe_mode=False"):
        keras.saving.load_model(lambda_model_path)


def test_kdml_loaders_refuse_a_lambda_layer(lambda_model_path):
    from kdml import export  # kdml's own module: a broken import must fail, not skip
    with pytest.raises(ValueError, match="safe_mode"):
        export.load_embedder(lambda_model_path)


def test_kdml_embedders_load_in_safe_mode(tmp_path):
    embedder = kdml.models.build_embedder("conv4", embedding_dim=8, image_size=16)
    path = str(tmp_path / "embedder.keras")
    embedder.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.zeros((1, 16, 16, 3), np.float32)
    np.testing.assert_allclose(loaded(x), embedder(x), atol=1e-6)
