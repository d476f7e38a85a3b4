"""CRT where it is meant to work: on many local features. `conv4_stride4` keeps a 7 x 7
map at 28 px; CRT builds on ResNet-50 maps and DeiT-S patch tokens; N (positions) is
reported next to K (prototypes)."""

import dataclasses
import logging

import numpy as np
import pytest

from kdml.config import TrainConfig
from kdml.layers import CodedResidualTransform
from kdml.methods import get_method
from kdml.models import build_embedder
from kdml.models.backbones import build_backbone


def _images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def test_conv4_stride4_is_conv4_without_its_last_two_poolings():
    stride4, conv4 = build_backbone("conv4_stride4", 28), build_backbone("conv4", 28)
    x = np.random.default_rng(1).normal(size=(2, 28, 28, 3)).astype(np.float32)
    assert tuple(stride4(x).shape) == (2, 7, 7, 64)  # 28 -> 14 -> 7 -> 7 -> 7
    assert tuple(conv4(x).shape) == (2, 2, 2, 64)  # 28 -> 14 -> 7 -> 4 -> 2
    names = [layer.name for layer in conv4.layers]
    assert [layer.name for layer in stride4.layers] == [
        n for n in names if n not in ("pool3", "pool4")]
    assert [w.shape for w in stride4.weights] == [w.shape for w in conv4.weights]
    # With the same weights, the first two blocks (both pooled) are the same network.
    stride4.set_weights(conv4.get_weights())

    def first_two_blocks(model):
        y = x
        for layer in model.layers[:8]:  # conv, bn, relu, pool, twice
            y = layer(y)
        return y.numpy()

    np.testing.assert_array_equal(first_two_blocks(stride4), first_two_blocks(conv4))


@pytest.mark.parametrize("head", ["pooling", "crt"])
def test_both_heads_work_on_the_7x7_map_and_crt_reports_n_49(head):
    embedder = build_embedder("conv4_stride4", head, embedding_dim=16, image_size=28,
                              head_options=dict(num_prototypes=8) if head == "crt" else None)
    out = embedder(_images(3, 28), training=True).numpy()
    assert out.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    if head == "crt":
        layer = embedder.get_layer("head")
        assert (layer.num_positions, layer.num_prototypes) == (49, 8)


def test_crt_on_resnet50_feature_map():
    embedder = build_embedder("resnet50", "crt", embedding_dim=8, image_size=64,
                              head_options=dict(num_prototypes=16))
    head = embedder.get_layer("head")
    assert tuple(head.input.shape) == (None, 2, 2, 2048) and head.num_positions == 4
    assert tuple(head.prototypes.shape) == (16, 2048)
    out = embedder(_images(2, 64), training=True).numpy()
    assert out.shape == (2, 8) and np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_crt_on_deit_small_patch_tokens_drops_class_and_distillation_tokens():
    embedder = build_embedder("deit_small", "crt", embedding_dim=8, image_size=32,
                              head_options=dict(num_prototypes=4))
    head = embedder.get_layer("head")
    assert tuple(head.input.shape) == (None, 6, 384)  # 2 prefix tokens + 2 x 2 patches
    assert head.skip_tokens == 2 and head.num_positions == 4
    x = _images(2, 32)
    tokens = embedder.get_layer("backbone")(embedder.get_layer("pixel_normalization")(x))
    out = head(tokens).numpy()  # = embedder(x), one forward pass of the backbone
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # The same head on the patch tokens alone (skip_tokens=0) gives the same embedding.
    patches_only = CodedResidualTransform.from_config({**head.get_config(), "skip_tokens": 0})
    patches_only.build(tuple(tokens[:, 2:].shape))
    patches_only.set_weights(head.get_weights())
    np.testing.assert_allclose(patches_only(tokens[:, 2:]).numpy(), out, atol=1e-5)


def test_crt_training_logs_n_next_to_k(caplog):
    config = dataclasses.replace(
        TrainConfig(method="crt", backbone="conv4_stride4", image_size=28, embedding_dim=16,
                    crt_prototypes=8, crt_aux_prototypes=(4,), crt_aux_dims=(8,)).resolved("glyph"))
    method = get_method("crt")
    head, options = method.head(config)
    embedder = build_embedder(config.backbone, head, config.embedding_dim, config.image_size,
                              head_options=options)
    # the absl logger's own level: another test's command line may have set it to WARNING
    with caplog.at_level(logging.INFO, logger="absl"):
        objective = method.build(embedder, 3, config)
    assert "N=49 positions" in caplog.text and "(8, 16), (4, 8)" in caplog.text
    logs = {}
    for callback in objective.callbacks:
        callback.on_epoch_end(0, logs)
    assert (logs["crt_num_positions"], logs["crt_num_prototypes"]) == (49.0, 8.0)
