"""Backbones by name: `conv4`, `conv4_stride4`, `resnet50`, `mobilenet_v3_small`,
`deit_tiny|small|base`, and through keras-hub (`kdml.models.keras_hub_backbones`)
`dinov2_small|base`, `dinov3_small`, `siglip_base`, `clip_vit_b16`, `efficientnet_b0`,
`mobilenet_v3_large`.

Each builder returns the backbone as a Keras model named "backbone" that maps
normalised images `(B, H, W, 3)` to features: a map `(B, h, w, C)` for CNNs or a
token sequence `(B, N, C)` for vision transformers (class token first; DeiT's
class and distillation tokens are the spec's 2 `prefix_tokens`, then the patches). The pixel
normalisation it expects is part of its `BackboneSpec`, so the embedder can put it
inside the model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import keras

from kdml.models.keras_hub_backbones import (CLIP_MEAN, CLIP_STD, HUB_BACKBONES, IMAGENET_MEAN,
                                             IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, hub_builder)

WEIGHTS = ("none", "imagenet")


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What the embedder needs to know about a backbone."""

    name: str
    features: str  # "map" (B, h, w, C) or "tokens" (B, N, C)
    default_pooling: str
    pixel_mean: tuple
    pixel_std: tuple
    channel_order: str = "rgb"
    min_image_size: int = 1
    pretrained_image_size: int | None = None  # the only size the ImageNet weights load at
    prefix_tokens: int = 0  # leading non-patch tokens of "tokens" features (class, registers)
    pretrained_weights: bool = True  # has weights="imagenet"
    # keras-hub backbones: the class, the published preset the name stands for (the
    # photo default of --weights when it is not ImageNet's), and its image size.
    keras_hub_class: Optional[str] = None
    preset: Optional[str] = None
    native_image_size: Optional[int] = None

    @property
    def default_pretrained_weights(self) -> str:
        """What `--weights` defaults to where pretrained weights are wanted (photos):
        "imagenet", else the keras-hub preset, else "none"."""
        if self.pretrained_weights:
            return "imagenet"
        return self.preset or "none"


def _conv4(image_size: int, weights: str, poolings: int = 4, name: str = "conv4") -> keras.Model:
    """4 x [conv3x3-64, BatchNorm, ReLU], each of the first `poolings` blocks followed by
    maxpool 2 (Vinyals et al. 2016; Snell et al. 2017 use all 4 poolings)."""
    if weights != "none":
        raise ValueError(f"Backbone {name!r} has no pretrained weights; use --weights=none.")
    blocks = [keras.Input((image_size, image_size, 3))]
    for i in range(4):
        blocks += [
            keras.layers.Conv2D(64, 3, padding="same", use_bias=False, name=f"conv{i + 1}"),
            keras.layers.BatchNormalization(synchronized=True, name=f"bn{i + 1}"),
            keras.layers.ReLU(name=f"relu{i + 1}"),
        ]
        if i < poolings:
            blocks.append(keras.layers.MaxPooling2D(2, padding="same", name=f"pool{i + 1}"))
    return keras.Sequential(blocks, name="backbone")


def _conv4_stride4(image_size: int, weights: str) -> keras.Model:
    """conv4 without its last two poolings: output stride 4, so a 28 px glyph gives a
    7 x 7 x 64 map (N = 49 positions) for heads that encode local features (CRT),
    instead of conv4's 2 x 2. Same weights as conv4; about 1.1x its FLOPs at 28 px (only
    block 4 grows, from 4 x 4 to 7 x 7 positions), where conv4 at 84 px costs 9x."""
    return _conv4(image_size, weights, poolings=2, name="conv4_stride4")


def _resnet50(image_size: int, weights: str) -> keras.Model:
    model = keras.applications.ResNet50(
        include_top=False, weights=None if weights == "none" else weights,
        input_shape=(image_size, image_size, 3))
    # `outputs` is a one-element list; the heads expect the (B, h, w, C) tensor itself.
    return keras.Model(model.inputs[0], model.outputs[0], name="backbone")


def _mobilenet_v3_small(image_size: int, weights: str) -> keras.Model:
    model = keras.applications.MobileNetV3Small(
        include_top=False, weights=None if weights == "none" else weights,
        input_shape=(image_size, image_size, 3), include_preprocessing=False)
    return keras.Model(model.inputs[0], model.outputs[0], name="backbone")


_DEIT = {
    # name: (hidden_dim, num_layers, num_heads, intermediate_dim, keras-hub preset)
    "deit_tiny": (192, 12, 3, 768, "deit_tiny_distilled_patch16_224_imagenet"),
    "deit_small": (384, 12, 6, 1536, "deit_small_distilled_patch16_224_imagenet"),
    "deit_base": (768, 12, 12, 3072, "deit_base_distilled_patch16_224_imagenet"),
}


def _deit(variant: str) -> Callable[[int, str], keras.Model]:
    hidden, layers, heads, intermediate, preset = _DEIT[variant]

    def build(image_size: int, weights: str) -> keras.Model:
        import keras_hub

        if weights == "imagenet":
            if image_size != 224:
                raise ValueError(
                    f"The ImageNet preset of {variant} is trained at 224 px; "
                    f"use --image_size=224 with --weights=imagenet. Received: {image_size}")
            # Downloads from Kaggle on first use (a user's machine, never in tests).
            model = keras_hub.models.DeiTBackbone.from_preset(preset)
        else:
            model = keras_hub.models.DeiTBackbone(
                image_shape=(image_size, image_size, 3), patch_size=16,
                num_layers=layers, num_heads=heads, hidden_dim=hidden,
                intermediate_dim=intermediate)
        # DeiTBackbone's `outputs` is a one-element list: unwrap it, so the backbone
        # returns the (B, N, C) tensor the heads expect.
        return keras.Model(model.inputs[0], model.outputs[0], name="backbone")

    return build


_GLYPH_SPEC = dict(pixel_mean=(127.5,) * 3, pixel_std=(127.5,) * 3)
BACKBONES: Dict[str, tuple] = {
    "conv4": (_conv4, BackboneSpec("conv4", "map", "avg_max", **_GLYPH_SPEC, min_image_size=16,
                                    pretrained_weights=False)),
    "conv4_stride4": (_conv4_stride4, BackboneSpec(
        "conv4_stride4", "map", "avg_max", **_GLYPH_SPEC, min_image_size=4,
        pretrained_weights=False)),
    "resnet50": (_resnet50, BackboneSpec(
        "resnet50", "map", "avg_max", pixel_mean=IMAGENET_MEAN, pixel_std=(1.0, 1.0, 1.0),
        channel_order="bgr", min_image_size=32, pretrained_image_size=None)),
    "mobilenet_v3_small": (_mobilenet_v3_small, BackboneSpec(
        "mobilenet_v3_small", "map", "avg_max", **_GLYPH_SPEC, min_image_size=32)),
    **{
        name: (_deit(name), BackboneSpec(
            name, "tokens", "cls", pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD,
            min_image_size=16, pretrained_image_size=224, prefix_tokens=2))
        for name in _DEIT
    },
}


def _hub_spec(name, features, default_pooling, mean, std, prefix_tokens=0, patch=1,
              channel_order="rgb"):
    hub = HUB_BACKBONES[name]
    return BackboneSpec(
        name, features, default_pooling, pixel_mean=mean, pixel_std=std,
        channel_order=channel_order, min_image_size=patch if features == "tokens" else 32,
        pretrained_image_size=224 if hub.size_argument is None else None,
        prefix_tokens=prefix_tokens, pretrained_weights=hub.imagenet_preset is not None,
        keras_hub_class=hub.class_name, preset=hub.preset, native_image_size=224)


_HUB_SPECS = [
    # name, features, default pooling, mean, std, prefix tokens, patch size
    _hub_spec("dinov2_small", "tokens", "cls", IMAGENET_MEAN, IMAGENET_STD, 1, 14),
    _hub_spec("dinov2_base", "tokens", "cls", IMAGENET_MEAN, IMAGENET_STD, 1, 14),
    _hub_spec("dinov3_small", "tokens", "cls", IMAGENET_MEAN, IMAGENET_STD, 5, 16),
    _hub_spec("siglip_base", "tokens", "cls", SIGLIP_MEAN, SIGLIP_STD, 1, 16),
    _hub_spec("clip_vit_b16", "tokens", "cls", CLIP_MEAN, CLIP_STD, 1, 16),
    _hub_spec("efficientnet_b0", "map", "gem", IMAGENET_MEAN, IMAGENET_STD),
    _hub_spec("mobilenet_v3_large", "map", "gem", IMAGENET_MEAN, IMAGENET_STD),
]
BACKBONES.update({
    spec.name: (hub_builder(spec.name, HUB_BACKBONES[spec.name], spec.prefix_tokens), spec)
    for spec in _HUB_SPECS
})


def backbone_spec(name: str) -> BackboneSpec:
    """The `BackboneSpec` of a backbone name; a ValueError lists the valid names."""
    if name not in BACKBONES:
        raise ValueError(
            f"Unknown backbone {name!r}. Valid backbones: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name][1]


def build_backbone(name: str, image_size: int, weights: str = "none") -> keras.Model:
    """Builds backbone `name` for square images of `image_size` pixels.

    Args:
        name: one of `BACKBONES`.
        image_size: input height and width.
        weights: "none" (random init, no network) or "imagenet" (downloaded on
            first use on a user's machine); for a keras-hub backbone also a keras-hub
            preset name or handle (downloaded), or a local preset directory (what
            `save_to_preset` writes).

    Returns:
        A `keras.Model` named "backbone": `(B, S, S, 3)` normalised pixels ->
        `(B, h, w, C)` or `(B, N, C)` features.
    """
    spec = backbone_spec(name)
    if weights not in WEIGHTS and spec.keras_hub_class is None:
        raise ValueError(f"`weights` of {name} must be one of {WEIGHTS} (presets and preset "
                         f"directories are for keras-hub backbones). Received: weights={weights!r}")
    if image_size < spec.min_image_size:
        raise ValueError(
            f"Backbone {name!r} needs images of at least {spec.min_image_size} px. "
            f"Received: image_size={image_size}")
    return BACKBONES[name][0](image_size, weights)
