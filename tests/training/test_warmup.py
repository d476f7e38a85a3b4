"""Warm-up (`BackboneWarmup` + `GroupedAdamW`): a frozen backbone keeps its weights,
BatchNorm statistics and optimizer state; head and proxies train."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.config import TrainConfig
from kdml.methods import BACKBONE_GROUP, get_method
from kdml.models import build_embedder
from kdml.optimizers import GroupedAdamW
from kdml.training.callbacks import BackboneWarmup


def _adam_slots(optimizer, variables):
    """(m, v) of each variable, as NumPy arrays."""
    slots = []
    for variable in variables:
        index = optimizer._get_variable_index(variable)
        slots.append((optimizer._momentums[index].numpy(), optimizer._velocities[index].numpy()))
    return slots


def _batch_norms(backbone):
    return [layer for layer in backbone._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization)]


def _state(model, backbone, optimizer):
    bn = _batch_norms(backbone)
    return {
        "backbone": [w.numpy() for w in backbone.weights],  # includes the BN moving stats
        "moving": [w.numpy() for layer in bn for w in (layer.moving_mean, layer.moving_variance)],
        "slots": _adam_slots(optimizer, [v for v in model.trainable_variables
                                         if v.path.startswith("backbone/")]),
        "head": model.get_layer("embedder").get_layer("head").weights[0].numpy(),
        "proxies": model.get_layer("proxies").weights[0].numpy(),
    }


@pytest.mark.parametrize("freeze_batchnorm", [False, True])
def test_warmup_leaves_backbone_bn_stats_and_adam_state_unchanged(freeze_batchnorm):
    keras.utils.set_random_seed(0)
    embedder = build_embedder("conv4", embedding_dim=8, image_size=16,
                              freeze_batchnorm=freeze_batchnorm)
    backbone = embedder.get_layer("backbone")
    objective = get_method("proxy_anchor").build(embedder, 4, TrainConfig().resolved("glyph"))
    model = objective.model
    optimizer = GroupedAdamW(objective.learning_rate_multipliers, learning_rate=1e-2,
                             weight_decay=1e-2)
    model.compile(optimizer=optimizer, loss=objective.loss, jit_compile=False)
    optimizer.build(model.trainable_variables)
    backbone_variables = [v for v in model.trainable_variables if v.path.startswith("backbone/")]
    assert backbone_variables

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, 16, 16, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4), 4).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).repeat()
    before = _state(model, backbone, optimizer)
    assert all(not m.any() and not v.any() for m, v in before["slots"])

    warmup = BackboneWarmup(1, BACKBONE_GROUP, backbone)
    model.fit(data, epochs=1, steps_per_epoch=2, callbacks=[warmup], shuffle=False, verbose=0)
    after = _state(model, backbone, optimizer)
    for a, b in zip(before["backbone"], after["backbone"]):
        np.testing.assert_array_equal(a, b)  # weights and BatchNorm moving mean / variance
    for (m0, v0), (m1, v1) in zip(before["slots"], after["slots"]):
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_array_equal(v0, v1)
    assert optimizer.group_steps(BACKBONE_GROUP) == 0 and int(optimizer.iterations) == 2
    assert optimizer.group_steps("^proxies/") == 2
    assert not np.allclose(before["head"], after["head"])
    assert not np.allclose(before["proxies"], after["proxies"])
    # After warm-up every layer has its own flag again (frozen BatchNorm stays frozen).
    bn = _batch_norms(backbone)
    assert backbone.trainable and all(layer.trainable != freeze_batchnorm for layer in bn)

    # The epoch after warm-up trains the backbone, from Adam's first step.
    model.fit(data, initial_epoch=1, epochs=2, steps_per_epoch=2, callbacks=[warmup],
              shuffle=False, verbose=0)
    trained = _state(model, backbone, optimizer)
    assert optimizer.group_steps(BACKBONE_GROUP) == 2 and int(optimizer.iterations) == 4
    assert not np.allclose(after["backbone"][0], trained["backbone"][0])  # conv1 kernel
    moved_stats = [not np.allclose(a, b) for a, b in zip(after["moving"], trained["moving"])]
    assert len(moved_stats) == 8  # 4 BatchNorm layers x (mean, variance)
    assert all(moved_stats) if not freeze_batchnorm else not any(moved_stats)


def test_zero_multiplier_keeps_adam_moments_and_step_count_then_resumes_at_step_one():
    """NumPy reference: after any number of frozen steps, the first step with the
    multiplier back at 1 is Adam's first step, w - lr * m1 / (sqrt(v1) + eps) with
    bias-corrected m1 = g, v1 = g^2 (Kingma & Ba 2015, Algorithm 1)."""
    lr, eps = 1e-2, 1e-3
    optimizer = GroupedAdamW({"^backbone": 1.0}, learning_rate=lr, weight_decay=0.0, epsilon=eps)
    w0 = np.array([0.5, -1.0, 2.0], np.float32)
    frozen = keras.Variable(w0, name="backbone")
    free = keras.Variable(np.ones(3, np.float32), name="head")
    optimizer.build([frozen, free])
    optimizer.set_multiplier("^backbone", 0.0)
    g0 = np.array([1.0, -2.0, 0.5], np.float32)
    for _ in range(3):
        optimizer.apply([keras.ops.convert_to_tensor(g0), keras.ops.ones(3)], [frozen, free])
    (m, v), = _adam_slots(optimizer, [frozen])
    assert not m.any() and not v.any() and optimizer.group_steps("^backbone") == 0
    np.testing.assert_array_equal(frozen.numpy(), w0)

    optimizer.set_multiplier("^backbone", 1.0)
    g = np.array([0.3, 0.02, -4.0], np.float32)
    optimizer.apply([keras.ops.convert_to_tensor(g), keras.ops.ones(3)], [frozen, free])
    # Keras' Adam adds eps to sqrt(v_t) before the bias correction of v:
    # alpha = lr sqrt(1 - b2) / (1 - b1), step = alpha m_t / (sqrt(v_t) + eps).
    m1, v1 = 0.1 * g, 0.001 * g ** 2
    expected = w0 - lr * np.sqrt(1 - 0.999) / (1 - 0.9) * m1 / (np.sqrt(v1) + eps)
    np.testing.assert_allclose(frozen.numpy(), expected, rtol=1e-5)
    assert optimizer.group_steps("^backbone") == 1 and int(optimizer.iterations) == 4
