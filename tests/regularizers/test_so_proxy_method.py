"""`--method=so_proxy`: Proxy Anchor + SoftOrthogonal, its gradients, its distributed
step, its per-method defaults, and an end-to-end `kdml.training.train` run."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from kdml.config import TrainConfig
from kdml.losses import ProxyAnchorLoss
from kdml.methods import get_method
from kdml.models import build_embedder
from kdml.optimizers import GroupedAdamW
from kdml.regularizers import SoftOrthogonal
from kdml.training import latest_checkpoint, train
from kdml.training.checkpointing import restore_checkpoint
from kdml.layers.proxy_diagnostics import EFFECTIVE_RANK, MAX_ABS_COSINE, MEAN_ABS_COSINE
from tests.conftest import new_mirrored_strategy
from tests.helpers import weights_after_one_step


def _objective(strength=2.0, num_classes=5, dim=8):
    embedder = build_embedder("conv4", embedding_dim=dim, image_size=16)
    config = dataclasses.replace(TrainConfig(method="so_proxy"), so_strength=strength).resolved("glyph")
    return get_method("so_proxy").build(embedder, num_classes, config)


def test_model_losses_carry_the_penalty_and_the_gradient_is_pa_plus_so(rng):
    objective = _objective(strength=3.0)
    model, loss = objective.model, objective.loss
    assert isinstance(loss, ProxyAnchorLoss)
    assert set(objective.learning_rate_multipliers) == {"^proxies/", "^backbone/"}
    proxies = model.get_layer("proxies").proxies
    images = rng.uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    labels = np.array([0, 0, 1, 1, 4, 4])
    with tf.GradientTape(persistent=True) as tape:
        pa = loss(labels, model(images, training=True))
        so = tf.add_n(model.losses)
        total = pa + so
    reference = SoftOrthogonal(3.0)(proxies)
    np.testing.assert_allclose(float(so), float(reference), rtol=1e-6)
    grads = tape.gradient(total, model.trainable_variables)
    by_path = dict(zip([v.path for v in model.trainable_variables], grads))
    proxy_grad = by_path[proxies.path].numpy()
    expected = (tape.gradient(pa, proxies).numpy() + tape.gradient(so, proxies).numpy())
    np.testing.assert_allclose(proxy_grad, expected, atol=1e-6)
    assert np.abs(tape.gradient(so, proxies).numpy()).max() > 1e-4  # SO moves the proxies
    backbone = [g for v, g in zip(model.trainable_variables, grads) if "backbone" in v.path]
    assert backbone and all(g is not None for g in backbone)
    assert max(float(tf.reduce_max(tf.abs(g))) for g in backbone) > 0  # PA reaches the backbone


def test_two_replicas_take_the_same_pa_plus_so_step_as_one_device():
    objective = _objective(strength=50.0)
    initial = [w.numpy() for w in objective.model.weights]
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    labels = np.array([0, 0, 0, 0, 3, 3, 3, 3], np.int32)

    def step(strategy):
        optimizer = lambda: GroupedAdamW(  # noqa: E731  (epsilon=1: step linear in the gradient)
            {"^proxies/": 100.0, "^backbone/": 1.0}, learning_rate=1e-2, epsilon=1.0)
        return weights_after_one_step(strategy, lambda: _objective(strength=50.0).model, initial,
                                      ProxyAnchorLoss(), images, labels, optimizer)

    single = step(tf.distribute.get_strategy())
    mirrored = step(new_mirrored_strategy())
    for a, b in zip(single, mirrored):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_method_defaults_deit_small_for_photos_and_conv4_for_glyphs():
    so, pa = TrainConfig(method="so_proxy"), TrainConfig(method="proxy_anchor")
    assert so.resolved("photo").backbone == "deit_small"
    assert so.resolved("photo").weights == "imagenet" and so.resolved("photo").image_size == 224
    assert so.resolved("glyph").backbone == "conv4"
    assert pa.resolved("photo").backbone == "resnet50"
    explicit = dataclasses.replace(so, backbone="resnet50").resolved("photo")
    assert explicit.backbone == "resnet50"  # a flag the user gave always wins


def test_deit_small_class_token_embedder_trains_with_so_proxy(rng):
    """The photo default, tiny (32 px, no download): class token -> linear -> L2 norm."""
    embedder = build_embedder("deit_small", embedding_dim=8, image_size=32, weights="none")
    assert embedder.get_layer("head").pooling == "cls"
    config = TrainConfig(method="so_proxy").resolved("photo")
    model = get_method("so_proxy").build(embedder, 3, config).model
    with tf.GradientTape() as tape:
        loss = ProxyAnchorLoss()(np.array([0, 1]), model(rng.uniform(0, 255, (2, 32, 32, 3)))) \
            + tf.add_n(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)


def test_end_to_end_so_term_is_in_the_logged_loss_and_diagnostics_reach_metrics(tmp_path):
    """lr = 0 keeps the weights fixed, so the logged losses of so_proxy and proxy_anchor on
    the same seed (same init, same batches) differ by exactly lambda * R_SO(proxies)."""
    base = TrainConfig(dataset="synthetic", backbone="conv4", image_size=16, embedding_dim=16,
                       classes_per_batch=50, images_per_class=4, epochs=2, eval_every=2,
                       lr=0.0, jit_compile="false", verbose=0, recall_ks=(1,), so_strength=4.0)
    runs = {}
    for method in ("proxy_anchor", "so_proxy"):
        out = tmp_path / method
        train(dataclasses.replace(base, method=method, output_dir=str(out)))
        runs[method] = json.load(open(out / "metrics.json"))
    so_epochs = runs["so_proxy"]["epochs"]
    assert set(so_epochs) == {"1", "2"}  # every epoch, also the one without evaluation
    for epoch in so_epochs.values():
        assert 0 <= epoch[MEAN_ABS_COSINE] <= epoch[MAX_ABS_COSINE] <= 1
        assert 1 <= epoch[EFFECTIVE_RANK] <= 16
    assert MEAN_ABS_COSINE in runs["proxy_anchor"]["epochs"]["1"]  # PA gets them as well
    assert "recall@1" in so_epochs["2"] and "recall@1" not in so_epochs["1"]

    config = dataclasses.replace(base, method="so_proxy").resolved("glyph")
    objective = get_method("so_proxy").build(
        build_embedder("conv4", embedding_dim=16, image_size=16), 100, config)
    model = objective.model
    model.compile(optimizer=GroupedAdamW(objective.learning_rate_multipliers, learning_rate=0.0),
                  loss=objective.loss)
    restore_checkpoint(model, latest_checkpoint(str(tmp_path / "so_proxy" / "checkpoints")))
    penalty = float(SoftOrthogonal(4.0)(model.get_layer("proxies").proxies))
    assert penalty > 1e-3
    for epoch in ("1", "2"):
        difference = so_epochs[epoch]["loss"] - runs["proxy_anchor"]["epochs"][epoch]["loss"]
        assert difference == pytest.approx(penalty, rel=1e-3)


def test_so_flags_reach_the_config():
    from absl import flags

    from kdml import train as train_cli

    for name in ("so_strength", "so_mode", "so_normalization"):
        assert name in flags.FLAGS
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["prog", "--method=so_proxy", "--so_strength=0.5", "--so_mode=columns",
                     "--so_normalization=size"])
        config = train_cli.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    assert (config.method, config.so_strength, config.so_mode, config.so_normalization) == (
        "so_proxy", 0.5, "columns", "size")
    embedder = build_embedder("conv4", embedding_dim=8, image_size=16)
    model = get_method("so_proxy").build(embedder, 3, config.resolved("glyph")).model
    reg = model.get_layer("proxies").proxy_regularizer
    assert (reg.strength, reg.mode, reg.normalization) == (0.5, "columns", "size")
    # The default is the paper's unnormalised penalty at the strength the Omniglot benchmark
    # chose on validation (docs/results/previous_protocol/omniglot/selection.json).
    assert (TrainConfig().so_normalization, TrainConfig().so_strength) == ("none", 1e-3)
    with pytest.raises(ValueError, match="mode='nope'"):
        _objective_with_mode("nope")


def _objective_with_mode(mode):
    config = dataclasses.replace(TrainConfig(method="so_proxy"), so_mode=mode).resolved("glyph")
    return get_method("so_proxy").build(build_embedder("conv4", embedding_dim=8, image_size=16),
                                        3, config)
