"""`build_embedder`: raw RGB pixels -> backbone -> head -> L2-normalised embedding."""

from __future__ import annotations

import keras

from kdml.layers.coded_residual_transform import CodedResidualTransform
from kdml.layers.heads import PoolingHead
from kdml.layers.pixel_normalization import PixelNormalization
from kdml.models.backbones import backbone_spec, build_backbone

HEADS = ("pooling", "crt")


def build_embedder(
    backbone: str = "conv4",
    head: str = "pooling",
    embedding_dim: int = 512,
    image_size: int = 28,
    weights: str = "none",
    pooling: str | None = None,
    freeze_batchnorm: bool = False,
    name: str = "embedder",
    head_options: dict | None = None,
) -> keras.Model:
    """Builds the embedder, the model that retrieval, evaluation and export use.

    Normalisation is inside the model, so it takes camera pixels as they are.

    Args:
        backbone: backbone name (`kdml.models.BACKBONES`).
        head: "pooling" (global avg+max or class token -> linear -> L2 norm) or
            "crt" (`kdml.layers.CodedResidualTransform` on the whole feature map,
            not pooled: every position of a CNN map, the patch tokens of a
            transformer without its class/distillation tokens).
        embedding_dim: size d of the embedding.
        image_size: square input size S in pixels.
        weights: "none", "imagenet", or for a keras-hub backbone a preset name or a
            local preset directory (`kdml.models.build_backbone`).
        pooling: the pooling head's mode (`kdml.layers.PoolingHead`: "gem",
            "avg_max", "avg", "max", "cls", "cls_gem"); None picks the backbone's
            default (`BackboneSpec.default_pooling`). Patch tokens are pooled
            without the backbone's prefix tokens.
        freeze_batchnorm: run every BatchNormalization layer of the backbone in
            inference mode with frozen statistics and affine weights (the Proxy
            Anchor recipe for pretrained backbones).
        name: model name.
        head_options: extra constructor arguments of the head layer, e.g.
            {"num_prototypes": 64, "temperature": 0.1} for "crt" (defaults: the
            layer's; `skip_tokens` defaults to the backbone's prefix tokens).

    Returns:
        A functional `keras.Model`: `(B, S, S, 3)` RGB in [0, 255] (any real dtype)
        -> `(B, d)` float32 with unit L2 norm. Its layers are named
        "pixel_normalization", "backbone" and "head".
    """
    spec = backbone_spec(backbone)
    if head not in HEADS:
        raise ValueError(f"Unknown head {head!r}. Valid heads: {', '.join(HEADS)}.")
    _check_pooling(spec, pooling or (head_options or {}).get("pooling"))
    features_net = build_backbone(backbone, image_size, weights)
    if freeze_batchnorm:
        for layer in features_net._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    images = keras.Input((image_size, image_size, 3), name="images")
    x = PixelNormalization(spec.pixel_mean, spec.pixel_std, spec.channel_order,
                           name="pixel_normalization")(images)
    features = features_net(x)
    embeddings = build_head(head, embedding_dim, spec, pooling, head_options)(features)
    return keras.Model(images, embeddings, name=name)


def build_head(head: str, embedding_dim: int, spec, pooling: str | None = None,
               head_options: dict | None = None) -> keras.layers.Layer:
    """The head layer named "head" for backbone `spec` (a `BackboneSpec`); `pooling`
    may also come as `head_options["pooling"]` (the method table's way)."""
    options = dict(head_options or {})
    pooling = pooling or options.pop("pooling", None)
    if head == "pooling":
        pooling = pooling or spec.default_pooling
        _check_pooling(spec, pooling)
        if spec.features == "tokens":
            options.setdefault("skip_tokens", spec.prefix_tokens)
        return PoolingHead(embedding_dim, pooling=pooling, name="head", **options)
    if pooling is not None:
        raise ValueError(f"`pooling` applies to head='pooling' only. Received: pooling={pooling!r}")
    if spec.features == "tokens":
        options.setdefault("skip_tokens", spec.prefix_tokens)
    options.setdefault("num_prototypes", 64)
    return CodedResidualTransform(embedding_dim=embedding_dim, name="head", **options)


def split_embedder(embedder: keras.Model) -> tuple:
    """The two halves of an embedder, sharing its layers: (feature extractor, head model).

    The feature extractor is `(B, S, S, 3)` pixels -> pixel normalisation -> backbone
    -> features `(B, h, w, C)` or `(B, N, C)`; the head model is features -> head ->
    `(B, d)` embedding. Both reuse the embedder's layer objects, so training the head
    model trains the embedder's head: `embedder(x)` equals `head(extractor(x))`, and a
    frozen-backbone run (`--freeze_backbone`) trains the head on features computed
    once and still saves the whole image -> embedding embedder.

    Args:
        embedder: a model from `build_embedder` (layers "pixel_normalization",
            "backbone", "head").

    Returns:
        `(extractor, head_model)`: functional models named "feature_extractor" and
        "head_model"; the head model's input is float32 features of the backbone's
        output shape.
    """
    try:
        normalize = embedder.get_layer("pixel_normalization")
        backbone = embedder.get_layer("backbone")
        head = embedder.get_layer("head")
    except ValueError as error:
        raise ValueError(
            "split_embedder needs an embedder from kdml.models.build_embedder (layers "
            f"'pixel_normalization', 'backbone', 'head'). Received: {embedder.name!r}") from error
    images = keras.Input(embedder.input_shape[1:], name="images")
    extractor = keras.Model(images, backbone(normalize(images)), name="feature_extractor")
    features = keras.Input(tuple(backbone.output.shape[1:]), name="features")
    head_model = keras.Model(features, head(features), name="head_model")
    return extractor, head_model


def _check_pooling(spec, pooling) -> None:
    if spec.features == "map" and pooling in ("cls", "cls_gem"):
        raise ValueError(f"--pooling={pooling} needs a transformer's tokens; {spec.name} "
                         "gives a feature map. Use gem, avg_max, avg or max.")
