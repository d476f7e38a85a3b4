"""`--mixed_precision`: float16 / bfloat16 compute, float32 losses and logits, Keras
loss scaling around `GroupedAdamW`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.config import TrainConfig
from kdml.methods import get_method
from kdml.models import build_embedder
from kdml.optimizers import GroupedAdamW
from kdml.training.callbacks import BackboneWarmup, grouped_optimizer
from kdml.training.run import _dtype_policy

_CONFIG = TrainConfig(alpha=64.0, ms_beta=50.0).resolved("glyph")


def _model(method, policy, config=_CONFIG, multipliers=None, weight_decay=1e-4):
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(policy)
    try:
        embedder = build_embedder("conv4", embedding_dim=8, image_size=16)
        objective = get_method(method).build(embedder, 4, config)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    optimizer = GroupedAdamW(multipliers or objective.learning_rate_multipliers,
                             learning_rate=1e-2, weight_decay=weight_decay)
    objective.model.compile(optimizer=optimizer, loss=objective.loss, jit_compile=False)
    return objective.model, objective.loss


def _backbone(model):
    embedder = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    return embedder.get_layer("backbone").trainable_weights


def _batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    return images, np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("method", ["proxy_anchor", "multi_similarity"])
def test_a_step_under_the_policy_has_finite_loss_and_gradients(method, policy):
    """Proxy Anchor at alpha = 64, Multi-Similarity at beta = 50."""
    model, loss = _model(method, policy)
    images, labels = _batch()
    with tf.GradientTape() as tape:
        outputs = model(images, training=True)
        value = loss(labels, outputs)
    assert outputs.dtype == "float32" and value.dtype == "float32"  # logits and loss
    gradients = tape.gradient(value, model.trainable_variables)
    assert np.isfinite(value.numpy()) and value.numpy() > 0
    assert all(np.isfinite(g.numpy()).all() for g in gradients)
    assert sum(float(np.abs(g.numpy()).sum()) > 0 for g in gradients) > len(gradients) // 2
    # Keras' own step (loss scaling included for float16) keeps every weight finite.
    history = model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert all(np.isfinite(w.numpy()).all() for w in model.weights)


def test_float16_wraps_grouped_adamw_in_loss_scaling_and_multipliers_still_apply():
    images, labels = _batch()
    deltas = {}
    for proxy_multiplier in (1.0, 100.0):
        model, _ = _model("proxy_anchor", "mixed_float16",
                          multipliers={"^proxies/": proxy_multiplier, "^backbone/": 0.0},
                          weight_decay=0.0)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(grouped_optimizer(model.optimizer), GroupedAdamW)
        backbone = [w.numpy() for w in _backbone(model)]
        proxies = model.get_layer("proxies").weights[0].numpy()
        # Dynamic loss scaling starts at 2^15 and skips the steps whose float16
        # gradients overflow (halving the scale): train until one step is applied.
        inner = grouped_optimizer(model.optimizer)
        for _ in range(20):
            model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
            if int(inner.iterations.numpy()) == 1:
                break
        assert int(inner.iterations.numpy()) == 1
        for before, after in zip(backbone, _backbone(model)):
            np.testing.assert_array_equal(before, after.numpy())  # multiplier 0: frozen
        deltas[proxy_multiplier] = np.abs(model.get_layer("proxies").weights[0].numpy() - proxies)
    # Adam's first step is lr * g / (|g| + eps) ~ lr per weight: the proxies' 100x
    # multiplier makes their step 100x larger.
    moved = deltas[1.0] > 1e-4
    assert moved.mean() > 0.9
    np.testing.assert_allclose(np.median(deltas[100.0][moved] / deltas[1.0][moved]), 100.0, rtol=0.02)


def test_warmup_sets_the_multiplier_through_the_loss_scale_optimizer():
    model, _ = _model("proxy_anchor", "mixed_float16")
    model.optimizer.build(model.trainable_variables)
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model)
                    ).get_layer("backbone")
    warmup = BackboneWarmup(1, "^backbone/", backbone)
    warmup.set_model(model)
    warmup.on_epoch_begin(0)
    assert grouped_optimizer(model.optimizer).multiplier("^backbone/") == 0.0
    assert not backbone.trainable
    warmup.on_epoch_begin(1)
    assert grouped_optimizer(model.optimizer).multiplier("^backbone/") == 1.0
    assert backbone.trainable


def test_dtype_policy_is_float16_on_gpu_and_bfloat16_on_cpu():
    with _dtype_policy(True):
        expected = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
        assert keras.mixed_precision.global_policy().name == expected
    assert keras.mixed_precision.global_policy().name == "float32"
