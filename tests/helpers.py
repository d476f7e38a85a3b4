"""Assertions shared by layer, loss and model tests."""

import os
import tempfile

import keras
import numpy as np


def assert_config_roundtrip(obj):
    """`obj` rebuilds from its config through the registered-serializable path."""
    config = keras.saving.serialize_keras_object(obj)
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is type(obj)
    assert clone.get_config() == obj.get_config()
    return clone


def assert_model_save_load(model, inputs, atol=1e-6):
    """A `.keras` save/load round trip reproduces `model(inputs)` with no custom_objects."""
    expected = keras.ops.convert_to_numpy(model(inputs, training=False))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    got = keras.ops.convert_to_numpy(loaded(inputs, training=False))
    np.testing.assert_allclose(got, expected, atol=atol)
    return loaded
