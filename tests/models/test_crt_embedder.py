"""The embedder with head="crt", the multi-size CRT training model, `--method=crt`."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import kdml  # noqa: F401
from kdml import train as train_cli
from kdml.config import TrainConfig
from kdml.layers import CodedResidualTransform
from kdml.losses import MultiSimilarityLoss, SimilarityConsistency
from kdml.methods import get_method
from kdml.models import build_embedder
from tests.conftest import new_mirrored_strategy
from tests.helpers import assert_model_save_load, weights_after_one_step, write_glyph_folder


def _images(n=4, size=28, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _config(**overrides):
    base = TrainConfig(method="crt", backbone="conv4", image_size=28, embedding_dim=16,
                       crt_prototypes=8, crt_aux_prototypes=(4,), crt_aux_dims=(8,),
                       consistency_weight=0.5).resolved("glyph")
    return dataclasses.replace(base, **overrides)


def _crt_objective(config, num_classes=3):
    method = get_method("crt")
    head, options = method.head(config)
    embedder = build_embedder(config.backbone, head, config.embedding_dim, config.image_size,
                              head_options=options)
    return embedder, method.build(embedder, num_classes, config)


def test_crt_embedder_uses_the_unpooled_map_and_survives_save_load():
    embedder = build_embedder("conv4", "crt", embedding_dim=16, image_size=28,
                              head_options=dict(num_prototypes=8, temperature=0.2))
    head = embedder.get_layer("head")
    assert isinstance(head, CodedResidualTransform) and head.num_prototypes == 8
    assert tuple(head.input.shape) == (None, 2, 2, 64)  # the conv4 map, not pooled
    x = _images()
    out = embedder(x).numpy()
    assert out.shape == (4, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    loaded = assert_model_save_load(embedder, x, atol=1e-5)
    assert loaded.get_layer("head").get_config() == head.get_config()


def test_crt_head_on_deit_tokens_skips_class_and_distillation_tokens():
    embedder = build_embedder("deit_tiny", "crt", embedding_dim=8, image_size=32,
                              head_options=dict(num_prototypes=4))
    head = embedder.get_layer("head")
    assert head.skip_tokens == 2 and tuple(head.input.shape) == (None, 6, 192)
    out = embedder(_images(2, 32)).numpy()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_method_table_names_the_head_and_crt_model_shares_the_embedder():
    config = _config()
    assert get_method("multi_similarity").head(config) == ("pooling", {})
    head, options = get_method("crt").head(config)
    assert head == "crt" and options["num_prototypes"] == 8
    embedder, objective = _crt_objective(config)
    model = objective.model
    x = _images(6)
    packed = model(x).numpy()
    assert packed.shape == (6, (16 + 8) * 2)  # [x_main | x_aux | e_main | e_aux] for MS
    np.testing.assert_allclose(packed[:, 24:40], embedder(x).numpy(), atol=1e-6)
    aux = model.get_layer("crt_aux1")
    assert (aux.num_prototypes, aux.embedding_dim, aux.temperature) == (4, 8, config.crt_temperature)
    # shared backbone: the training model holds each embedder variable once
    paths = [v.path for v in model.weights]
    assert len(paths) == len(set(paths)) and {v.path for v in embedder.weights} <= set(paths)
    # two SoftOrthogonal penalties, one per branch's prototypes
    assert len(model.losses) == 2
    labels = np.array([0, 0, 1, 1, 2, 2])
    ms = MultiSimilarityLoss()
    expected = (float(ms(labels, packed[:, 24:40])) + float(ms(labels, packed[:, 40:]))
                + 0.5 * float(SimilarityConsistency()(None, (packed[:, 24:40], packed[:, 40:]))))
    np.testing.assert_allclose(float(objective.loss(labels, packed)), expected, rtol=1e-5)


def test_proxy_anchor_base_loss_gives_each_branch_its_own_fast_proxies():
    config = _config(base_loss="proxy_anchor")
    _, objective = _crt_objective(config, num_classes=5)
    assert tuple(objective.model.output.shape) == (None, 5 + 5 + 16 + 8)
    proxy_paths = sorted(v.path for v in objective.model.weights if "proxies" in v.path)
    assert proxy_paths == ["proxies/proxies", "proxies_aux1/proxies"]
    assert objective.learning_rate_multipliers["^proxies"] == config.proxy_lr_multiplier


def test_bad_crt_settings_are_clear_errors():
    with pytest.raises(ValueError, match="one value per auxiliary branch"):
        _crt_objective(_config(crt_aux_dims=(8, 4)))
    embedder = build_embedder("conv4", embedding_dim=8, image_size=28)
    with pytest.raises(ValueError, match="head='crt'"):
        get_method("crt").build(embedder, 3, _config())


def test_crt_fit_under_mirrored_strategy_equals_one_device_step():
    config = _config()
    x = _images(8, seed=1)
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1])

    def build():
        return _crt_objective(config)[1].model

    initial = build().get_weights()
    loss = lambda: _crt_objective(config)[1].loss  # noqa: E731
    single = weights_after_one_step(tf.distribute.get_strategy(), build, initial, loss(), x, y)
    mirrored = weights_after_one_step(new_mirrored_strategy(), build, initial, loss(), x, y)
    assert max(np.abs(w0 - ws).max() for w0, ws in zip(initial, single)) > 1e-3
    for ws, wm in zip(single, mirrored):
        np.testing.assert_allclose(wm, ws, atol=2e-5)


@pytest.fixture(scope="module")
def glyph_folder(tmp_path_factory):
    return write_glyph_folder(tmp_path_factory.mktemp("crt_glyphs"), num_classes=8, seed=5)


def test_kdml_train_method_crt_end_to_end(glyph_folder, tmp_path):
    argv = ["prog", "--method=crt", f"--dataset=folder:{glyph_folder}", "--image_size=16",
            "--data_kind=glyph", "--embedding_dim=12", "--crt_prototypes=6", "--crt_aux_prototypes=3",
            "--crt_aux_dims=5", "--consistency_weight=2", "--classes_per_batch=2",
            "--images_per_class=3", "--epochs=2", "--jit_compile=false", "--verbose=0",
            "--recall_ks=1,2", f"--output_dir={tmp_path}"]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
        train_cli.main(["prog"])
    finally:
        flags.FLAGS.unparse_flags()
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["config"]["method"] == "crt" and metrics["config"]["crt_aux_dims"] == [5]
    assert set(metrics["epochs"]) == {"1", "2"}
    assert all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in metrics["epochs"].values())
    assert 0 <= metrics["final"]["recall@1"] <= metrics["final"]["recall@2"] <= 1
    embedder = keras.saving.load_model(os.path.join(tmp_path, "embedder.keras"))
    assert embedder.output_shape == (None, 12)  # the main branch only
    assert isinstance(embedder.get_layer("head"), CodedResidualTransform)
    assert [l.name for l in embedder.layers] == ["images", "pixel_normalization", "backbone", "head"]


def test_crt_objective_under_mixed_precision_is_float32_and_close_to_float32():
    config = _config()
    x = _images(6, seed=2)
    labels = np.array([0, 0, 1, 1, 2, 2])
    _, exact = _crt_objective(config)
    expected = exact.model(x).numpy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    _, mixed = _crt_objective(config)
    mixed.model.set_weights(exact.model.get_weights())
    got = mixed.model(x)
    assert got.dtype == "float32"
    np.testing.assert_allclose(got.numpy(), expected, atol=0.05)
    with tf.GradientTape() as tape:
        value = mixed.loss(labels, mixed.model(x, training=True))
    grads = tape.gradient(value, mixed.model.trainable_variables)
    assert value.dtype == "float32" and np.isfinite(float(value))
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
