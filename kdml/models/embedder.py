"""`build_embedder`: raw RGB pixels -> backbone -> head -> L2-normalised embedding."""

from __future__ import annotations

import keras

from kdml.layers.heads import PoolingHead
from kdml.layers.pixel_normalization import PixelNormalization
from kdml.models.backbones import backbone_spec, build_backbone

HEADS = ("pooling",)


def build_embedder(
    backbone: str = "conv4",
    head: str = "pooling",
    embedding_dim: int = 512,
    image_size: int = 28,
    weights: str = "none",
    pooling: str | None = None,
    freeze_batchnorm: bool = False,
    name: str = "embedder",
) -> keras.Model:
    """Builds the embedder, the model that retrieval, evaluation and export use.

    Normalisation is inside the model, so it takes camera pixels as they are.

    Args:
        backbone: backbone name (`kdml.models.BACKBONES`).
        head: "pooling" (global avg+max or class token -> linear -> L2 norm).
        embedding_dim: size d of the embedding.
        image_size: square input size S in pixels.
        weights: "none" or "imagenet".
        pooling: the pooling head's mode; None picks the backbone's default
            ("avg_max" for CNN maps, "cls" for transformer tokens).
        freeze_batchnorm: run every BatchNormalization layer of the backbone in
            inference mode with frozen statistics and affine weights (the Proxy
            Anchor recipe for pretrained backbones).
        name: model name.

    Returns:
        A functional `keras.Model`: `(B, S, S, 3)` RGB in [0, 255] (any real dtype)
        -> `(B, d)` float32 with unit L2 norm. Its layers are named
        "pixel_normalization", "backbone" and "head".
    """
    spec = backbone_spec(backbone)
    if head not in HEADS:
        raise ValueError(f"Unknown head {head!r}. Valid heads: {', '.join(HEADS)}.")
    features_net = build_backbone(backbone, image_size, weights)
    if freeze_batchnorm:
        for layer in features_net._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    images = keras.Input((image_size, image_size, 3), name="images")
    x = PixelNormalization(spec.pixel_mean, spec.pixel_std, spec.channel_order,
                           name="pixel_normalization")(images)
    features = features_net(x)
    embeddings = PoolingHead(embedding_dim, pooling=pooling or spec.default_pooling,
                             name="head")(features)
    return keras.Model(images, embeddings, name=name)
