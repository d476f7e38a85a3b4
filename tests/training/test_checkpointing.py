import json
import os

import keras
import numpy as np

from kdml.training.checkpointing import (latest_checkpoint, list_checkpoints, restore_checkpoint,
                                         save_checkpoint, write_json_atomic)


def _model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    model.compile(keras.optimizers.AdamW(1e-2), "mse")
    return model


def _train(model, steps):
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    model.fit(x, x[:, :2], batch_size=8, epochs=steps // 2, verbose=0)


def test_restore_brings_back_weights_optimizer_state_and_step(tmp_path):
    trained = _model(0)
    _train(trained, 4)
    path = save_checkpoint(trained, str(tmp_path), 4, {"epoch": 2})
    fresh = _model(1)
    state = restore_checkpoint(fresh, path)
    assert state == {"epoch": 2, "step": 4}
    for a, b in zip(trained.weights, fresh.weights):  # includes BatchNorm statistics
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(trained.optimizer.variables, fresh.optimizer.variables):  # moments, step
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # and training goes on identically from there
    _train(trained, 2)
    _train(fresh, 2)
    np.testing.assert_allclose(trained.weights[0].numpy(), fresh.weights[0].numpy(), atol=1e-6)


def test_only_complete_checkpoints_count_and_old_ones_are_pruned(tmp_path):
    model = _model(0)
    _train(model, 2)
    for step in (10, 20, 30, 40):
        save_checkpoint(model, str(tmp_path), step, {}, keep=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [30, 40]
    # a write killed half-way leaves a temporary directory or a directory without
    # state.json: neither is ever taken for a checkpoint
    os.makedirs(tmp_path / ".tmp-ckpt-50-123")
    os.makedirs(tmp_path / "ckpt-60")
    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-40")
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_json_is_replaced_atomically(tmp_path):
    path = str(tmp_path / "metrics.json")
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.load(open(path)) == {"a": 2}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_restoring_into_another_optimizer_layout_is_an_error_not_a_silent_reset(tmp_path):
    """Keras only warns and skips the optimizer when its variables differ in number."""
    from kdml.optimizers import GroupedAdamW
    import pytest

    trained = _model(0)
    _train(trained, 2)
    path = save_checkpoint(trained, str(tmp_path), 2, {})
    other = _model(1)
    other.compile(GroupedAdamW({"^dense": 10.0}, learning_rate=1e-2), "mse")  # + 1 variable
    with pytest.raises(ValueError, match="does not match this model.*flags of the run"):
        restore_checkpoint(other, path)


def test_partial_checkpoint_writes_are_removed(tmp_path):
    from kdml.training.checkpointing import remove_partial_checkpoints

    model = _model(0)
    _train(model, 2)
    save_checkpoint(model, str(tmp_path), 2, {})
    os.makedirs(tmp_path / ".tmp-ckpt-4-77")
    (tmp_path / ".tmp-ckpt-4-77" / "model.weights.h5").write_bytes(b"\x89HDF partial")
    assert remove_partial_checkpoints(str(tmp_path)) == [str(tmp_path / ".tmp-ckpt-4-77")]
    assert os.listdir(tmp_path) == ["ckpt-2"]
