import keras
import numpy as np
import pytest

import kdml  # noqa: F401
from kdml.layers import L2Normalization, PixelNormalization, PoolingHead
from kdml.models import build_backbone, build_embedder
from tests.helpers import assert_config_roundtrip, assert_model_save_load


def _images(n=3, size=28, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def test_pixel_normalization_matches_numpy_in_rgb_and_bgr():
    x = _images(2, 4)
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
    rgb = PixelNormalization(mean, std)(x).numpy()
    np.testing.assert_allclose(rgb, (x - np.array(mean)) / np.array(std), rtol=1e-6)
    bgr = PixelNormalization(mean, std, channel_order="bgr")(x).numpy()
    np.testing.assert_allclose(bgr, (x[..., ::-1] - np.array(mean)[::-1]) / np.array(std)[::-1],
                               rtol=1e-6)
    assert_config_roundtrip(PixelNormalization(mean, std, channel_order="bgr"))


def test_l2_normalization_is_float32_unit_norm_and_scale_invariant():
    x = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float16)
    y = L2Normalization()(x).numpy()
    assert y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(L2Normalization()(3.0 * x.astype(np.float32)).numpy(), y, atol=1e-3)


@pytest.mark.parametrize("pooling", ["avg_max", "avg", "max"])
def test_pooling_head_matches_numpy_on_feature_maps(pooling):
    features = np.random.default_rng(2).normal(size=(2, 3, 4, 5)).astype(np.float32)
    head = PoolingHead(6, pooling=pooling)
    out = head(features).numpy()
    pooled = {"avg_max": features.mean((1, 2)) + features.max((1, 2)),
              "avg": features.mean((1, 2)), "max": features.max((1, 2))}[pooling]
    kernel, bias = [w.numpy() for w in head.projection.weights]
    z = pooled @ kernel + bias
    np.testing.assert_allclose(out, z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-6)
    assert_config_roundtrip(head)


def test_pooling_head_cls_uses_the_first_token_only():
    tokens = np.random.default_rng(3).normal(size=(2, 5, 4)).astype(np.float32)
    head = PoolingHead(3, pooling="cls")
    changed = tokens.copy()
    changed[:, 1:] += 10.0
    np.testing.assert_allclose(head(tokens).numpy(), head(changed).numpy())


def test_embedder_outputs_unit_norm_and_survives_save_load():
    embedder = build_embedder("conv4", embedding_dim=16, image_size=28)
    x = _images()
    out = embedder(x).numpy()
    assert out.shape == (3, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # uint8 camera pixels give the same embedding as their float values
    np.testing.assert_allclose(embedder(x.astype(np.uint8)).numpy(),
                               embedder(x.astype(np.uint8).astype(np.float32)).numpy(), atol=1e-6)
    assert_model_save_load(embedder, x)


def test_embedder_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    embedder = build_embedder("conv4", embedding_dim=8, image_size=28)
    out = embedder(_images()).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_frozen_batchnorm_makes_training_mode_equal_inference_mode():
    embedder = build_embedder("conv4", embedding_dim=8, image_size=28, freeze_batchnorm=True)
    x = _images(4)
    bn = [l for l in embedder.get_layer("backbone").layers
          if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bn) == 4 and not any(l.trainable for l in bn)
    np.testing.assert_allclose(embedder(x, training=True).numpy(),
                               embedder(x, training=False).numpy(), atol=1e-6)
    free = build_embedder("conv4", embedding_dim=8, image_size=28)
    assert not np.allclose(free(x, training=True).numpy(), free(x, training=False).numpy(), atol=1e-3)


@pytest.mark.parametrize("name,size,expected", [
    ("conv4", 28, (2, 2, 2, 64)),
    ("conv4_stride4", 28, (2, 7, 7, 64)),  # its last two poolings removed
    ("mobilenet_v3_small", 32, (2, 1, 1, 576)),
    ("resnet50", 32, (2, 1, 1, 2048)),
    ("deit_tiny", 32, (2, 6, 192)),  # class + distillation token + 2 x 2 patches
])
def test_backbones_build_offline_with_the_documented_feature_shapes(name, size, expected):
    backbone = build_backbone(name, size, weights="none")
    assert tuple(backbone(np.zeros((2, size, size, 3), np.float32)).shape) == expected


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet50", "deit_tiny"])
def test_every_backbone_builds_a_unit_norm_embedder(name):
    # The backbone's output must be one tensor (not keras.applications' one-element
    # list) for the head to be built on it symbolically.
    # training=True: BatchNorm on batch statistics (a freshly initialised MobileNetV3
    # in inference mode shrinks features to ~1e-10, below l2_normalize's epsilon).
    embedder = build_embedder(name, embedding_dim=8, image_size=32)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    out = embedder(x, training=True).numpy()
    assert out.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_unknown_backbone_and_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="Valid backbones: clip_vit_b16, conv4, conv4_stride4, deit_base"):
        build_embedder("resnet18")
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("conv4", 28, weights="imagenet")
    with pytest.raises(ValueError, match="at least 32 px"):
        build_backbone("resnet50", 28)
