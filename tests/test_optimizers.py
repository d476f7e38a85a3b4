import keras
import numpy as np
import pytest

from kdml.optimizers import GroupedAdamW
from tests.helpers import assert_config_roundtrip


def _step(optimizer, values, grads, names):
    variables = [keras.Variable(v, name=n) for v, n in zip(values, names)]
    for _ in range(3):
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
    return [v.numpy() for v in variables]


def test_group_multiplier_equals_adamw_with_scaled_learning_rate():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4,)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
    ga, gb = rng.normal(size=(4,)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
    grouped = _step(GroupedAdamW({"^fast": 10.0}, learning_rate=1e-2, weight_decay=0.1),
                    [a, b], [ga, gb], ["slow", "fast"])
    slow = _step(keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.1), [a], [ga], ["s"])
    fast = _step(keras.optimizers.AdamW(learning_rate=1e-1, weight_decay=0.1), [b], [gb], ["f"])
    np.testing.assert_allclose(grouped[0], slow[0], rtol=1e-6)
    np.testing.assert_allclose(grouped[1], fast[0], rtol=1e-6)


def test_zero_multiplier_freezes_a_group_including_weight_decay():
    optimizer = GroupedAdamW({"^backbone": 1.0}, learning_rate=1e-2, weight_decay=0.5)
    frozen = keras.Variable(np.ones(3, np.float32), name="backbone")
    free = keras.Variable(np.ones(3, np.float32), name="head")
    optimizer.build([frozen, free])
    optimizer.set_multiplier("^backbone", 0.0)
    optimizer.apply([keras.ops.ones(3), keras.ops.ones(3)], [frozen, free])
    np.testing.assert_array_equal(frozen.numpy(), np.ones(3))
    assert np.all(free.numpy() < 1)
    assert optimizer.multiplier("^backbone") == 0.0
    with pytest.raises(ValueError, match="No learning-rate group"):
        optimizer.set_multiplier("proxies", 1.0)


def test_config_roundtrip():
    assert_config_roundtrip(GroupedAdamW({"proxies": 100.0}, learning_rate=1e-4))


def test_compiled_training_model_round_trips_with_its_optimizer_state(tmp_path):
    import kdml
    from kdml.config import TrainConfig
    from kdml.methods import get_method

    embedder = kdml.models.build_embedder("conv4", embedding_dim=8, image_size=16)
    objective = get_method("proxy_anchor").build(embedder, 5, TrainConfig().resolved("glyph"))
    model = objective.model
    model.compile(GroupedAdamW(objective.learning_rate_multipliers, learning_rate=1e-3),
                  objective.loss)
    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.optimizer.set_multiplier("^backbone/", 0.0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert isinstance(loaded.optimizer, GroupedAdamW)
    assert loaded.optimizer.multiplier("^backbone/") == 0.0
    assert int(loaded.optimizer.iterations) == 1
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)


def test_pddm_unit_trains_at_its_own_learning_rate_multiplier():
    # Adam's first step moves every weight by lr * multiplier * g / (|g| + eps): the
    # PDDM unit's weights by 10x the embedder's with --pddm_lr_multiplier=10.
    import kdml
    from kdml.config import TrainConfig
    from kdml.methods import PDDM_UNIT_GROUP, get_method

    embedder = kdml.models.build_embedder("conv4", embedding_dim=8, image_size=16)
    config = TrainConfig(method="pddm", pddm_lr_multiplier=10.0, weight_decay=0.0).resolved("glyph")
    objective = get_method("pddm").build(embedder, 4, config)
    assert objective.learning_rate_multipliers[PDDM_UNIT_GROUP] == 10.0
    model = objective.model
    optimizer = GroupedAdamW(objective.learning_rate_multipliers, learning_rate=1e-3,
                             weight_decay=0.0)
    model.compile(optimizer, objective.loss)
    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    before = {v.path: v.numpy() for v in model.trainable_variables}
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    steps = {}
    for v in model.trainable_variables:
        moved = np.abs(v.numpy() - before[v.path])
        steps.setdefault("unit" if "/pddm/" in f"/{v.path}" else "other", []).append(moved.max())
    assert len(steps["unit"]) == 8  # u, v, c, score: kernels and biases
    np.testing.assert_allclose(max(steps["unit"]), 1e-2, rtol=1e-3)
    np.testing.assert_allclose(max(steps["other"]), 1e-3, rtol=1e-3)
