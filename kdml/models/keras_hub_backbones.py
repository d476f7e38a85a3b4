"""Backbones from keras-hub by name: DINOv2, DINOv3, SigLIP and CLIP vision towers,
EfficientNet-B0 and MobileNetV3-Large.

Each name is a keras-hub class with the architecture of one published preset. Its
weights (`--weights`) are:
- "none": random initialisation of that architecture at any image size (no network);
- "imagenet", where the published weights are ImageNet weights (the CNNs): that
  preset;
- a keras-hub preset name (`dinov2_small`, `siglip_base_patch16_224`, ...) or handle
  (`kaggle://...`, `hf://...`), downloaded by keras-hub on first use;
- a local preset directory: what `keras_hub.models.Backbone.save_to_preset(dir)`
  writes, or a downloaded copy of a preset. Without network this is the way in.

The backbone returned is a Keras model named "backbone", `(B, S, S, 3)` normalised
pixels -> a map `(B, h, w, C)` (CNNs) or tokens `(B, N, C)` (ViTs): class token first,
then register tokens, then patches (`BackboneSpec.prefix_tokens` counts the leading
non-patch tokens). SigLIP has no class token: its first token is the output of its
attention-pooling head (the image embedding SigLIP was trained with), then its patches.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import keras

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# OpenAI CLIP's preprocessing (and the keras-hub CLIP presets' image converter).
CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)
# SigLIP: pixels to [-1, 1].
SIGLIP_MEAN = (127.5,) * 3
SIGLIP_STD = (127.5,) * 3


@dataclasses.dataclass(frozen=True)
class HubBackbone:
    """How a kdml backbone name maps to keras-hub.

    class_name: the keras-hub class (`keras_hub.models.<class_name>`).
    architecture: a callable `image_size -> constructor arguments` of the published
        architecture, for random initialisation (`weights="none"`).
    preset: the published preset the name stands for (its default weights).
    imagenet_preset: the preset `weights="imagenet"` loads (None: not ImageNet weights).
    size_argument: the constructor argument that sets the input size when a preset is
        loaded (None: the preset fixes it, so `image_size` must be the preset's).
    container_class: the keras-hub class of the published preset when it holds more
        than the vision tower (SigLIP and CLIP presets are image-text models).
    register_tokens: register tokens the published architecture has (checked on load).
    """

    class_name: str
    architecture: Callable[[int], dict]
    preset: str
    imagenet_preset: Optional[str] = None
    size_argument: Optional[str] = "image_shape"
    container_class: Optional[str] = None
    register_tokens: Optional[int] = None


def _dinov2(hidden, heads):
    return lambda size: dict(
        patch_size=14, num_layers=12, hidden_dim=hidden, num_heads=heads,
        intermediate_dim=4 * hidden, layer_scale_init_value=1.0, num_register_tokens=0,
        image_shape=(size, size, 3), position_embedding_shape=(518, 518, 3))


def _dinov3_small(size):
    # facebook/dinov3-vits16-pretrain-lvd1689m: 4 registers, no key bias, RoPE theta 100.
    return dict(patch_size=16, num_layers=12, hidden_dim=384, num_heads=6, intermediate_dim=1536,
                layer_scale_init_value=1.0, num_register_tokens=4, use_key_bias=False,
                image_shape=(size, size, 3))


def _vit_b16(**extra):
    return lambda size: dict(patch_size=16, hidden_dim=768, num_layers=12, num_heads=12,
                             intermediate_dim=3072, image_shape=(size, size, 3), **extra)


def _timm_architecture(module: str, architecture: str, size_argument: str):
    """The constructor arguments keras-hub's own timm converter uses for `architecture`
    (so a random-weight model has exactly the preset's layers)."""

    def arguments(size):
        import importlib

        convert = importlib.import_module(f"keras_hub.src.utils.timm.{module}")
        return {**convert.convert_backbone_config({"architecture": architecture}),
                size_argument: (size, size, 3)}

    return arguments


HUB_BACKBONES = {
    "dinov2_small": HubBackbone("DINOV2Backbone", _dinov2(384, 6), "dinov2_small",
                                register_tokens=0),
    "dinov2_base": HubBackbone("DINOV2Backbone", _dinov2(768, 12), "dinov2_base",
                               register_tokens=0),
    "dinov3_small": HubBackbone("DINOV3Backbone", _dinov3_small, "dinov3_vit_small_lvd1689m",
                                register_tokens=4),
    "siglip_base": HubBackbone("SigLIPVisionEncoder", _vit_b16(), "siglip_base_patch16_224",
                               size_argument=None, container_class="SigLIPBackbone"),
    "clip_vit_b16": HubBackbone(
        "CLIPVisionEncoder", _vit_b16(intermediate_activation="quick_gelu"),
        "clip_vit_base_patch16", size_argument=None, container_class="CLIPBackbone"),
    "efficientnet_b0": HubBackbone(
        "EfficientNetBackbone",
        _timm_architecture("convert_efficientnet", "efficientnet_b0", "input_shape"),
        "efficientnet_b0_ra_imagenet", imagenet_preset="efficientnet_b0_ra_imagenet",
        size_argument="input_shape"),
    "mobilenet_v3_large": HubBackbone(
        "MobileNetBackbone",
        _timm_architecture("convert_mobilenet", "mobilenetv3_large_100", "image_shape"),
        "mobilenet_v3_large_100_imagenet", imagenet_preset="mobilenet_v3_large_100_imagenet"),
}


def preset_names(hub: HubBackbone) -> list:
    """The keras-hub presets of `hub`'s class (or of the image-text model holding it)."""
    import keras_hub

    return sorted(getattr(keras_hub.models, hub.container_class or hub.class_name).presets)


def hub_builder(name: str, hub: HubBackbone, prefix_tokens: int = 0
                ) -> Callable[[int, str], keras.Model]:
    """The `(image_size, weights) -> backbone` builder of keras-hub backbone `name`."""

    def build(image_size: int, weights: str) -> keras.Model:
        import keras_hub

        cls = getattr(keras_hub.models, hub.class_name)
        if weights == "none":
            model = cls(**hub.architecture(image_size))
        else:
            model = _from_preset(name, hub, weights, image_size)
        return _as_backbone(name, hub, model, image_size, prefix_tokens)

    return build


def _from_preset(name: str, hub: HubBackbone, weights: str, image_size: int) -> keras.Model:
    """Loads `weights` ("imagenet", a preset name or handle, or a local directory)."""
    import keras_hub

    if weights == "imagenet":
        if hub.imagenet_preset is None:
            raise ValueError(
                f"--weights=imagenet does not apply to {name}: its published weights are "
                f"not ImageNet weights. Use --weights={hub.preset} (keras-hub preset, "
                "downloaded) or a local preset directory.")
        weights = hub.imagenet_preset
    local = os.path.isdir(weights)
    if not local and "://" not in weights and weights not in preset_names(hub):
        raise ValueError(
            f"--weights={weights}: not a local directory, nor a keras-hub preset of {name} "
            f"({', '.join(preset_names(hub))}); pass one of those, none, or a preset directory.")
    if local and not os.path.isfile(os.path.join(weights, "config.json")):
        raise ValueError(f"{weights}: not a keras-hub preset directory (no config.json); pass "
                         "the directory keras_hub's save_to_preset writes, or a downloaded preset.")
    kwargs = {}
    if hub.size_argument:
        kwargs[hub.size_argument] = (image_size, image_size, 3)
    try:
        model = keras_hub.models.Backbone.from_preset(weights, **kwargs)
    except (OSError, ImportError) as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if local:
            raise ValueError(f"{weights}: not a keras-hub preset directory ({reason}); pass the "
                             "directory keras_hub's save_to_preset writes.") from None
        raise ValueError(
            f"--weights={weights}: could not download the keras-hub preset ({reason[:160]}); "
            f"without network, copy a downloaded preset directory to this machine and pass "
            f"--weights=<that directory> (what keras_hub's save_to_preset writes).") from None
    if hub.container_class and type(model).__name__ == hub.container_class:
        model = model.vision_encoder
    if type(model).__name__ != hub.class_name:
        raise ValueError(
            f"--weights={weights}: the preset holds a {type(model).__name__}; --backbone={name} "
            f"needs a {hub.class_name} ({hub.container_class or hub.class_name} preset).")
    return model


def _as_backbone(name: str, hub: HubBackbone, model: keras.Model, image_size: int,
                 prefix_tokens: int) -> keras.Model:
    """`model` as kdml's "backbone": one image input, one tensor out (see the module)."""
    shape = tuple(model.inputs[0].shape[1:3])
    if shape != (image_size, image_size):
        raise ValueError(
            f"The {name} preset is built for {shape[0]} px images (its position embeddings "
            f"are fixed); use --image_size={shape[0]}. Received: image_size={image_size}")
    registers = getattr(model, "num_register_tokens", None)
    if hub.register_tokens is not None and registers != hub.register_tokens:
        raise ValueError(
            f"The preset has {registers} register tokens; --backbone={name} is the "
            f"architecture with {hub.register_tokens} (prefix tokens {prefix_tokens}).")
    mask_token = getattr(getattr(model, "embeddings", None), "mask_token", None)
    if mask_token is not None:  # DINO's masked-image token: unused here, gets no gradient
        mask_token.trainable = False
    if hub.class_name == "SigLIPVisionEncoder":
        tokens = model.post_layer_norm.output  # (B, N, C) patch tokens
        pooled = keras.layers.Reshape((1, tokens.shape[-1]), name="pooled_token")(model.output)
        features = keras.layers.Concatenate(axis=1, name="pooled_and_patches")([pooled, tokens])
        # keras-hub 0.32's SigLIPVisionEmbedding reports one token too many in its
        # symbolic shape (N + 1); the slice is a no-op on the real (B, 1 + N, C) tensor
        # and gives the graph its true length.
        features = features[:, :1 + (image_size // model.patch_size) ** 2]
    else:
        features = model.outputs[0]
    return keras.Model(model.inputs[0], features, name="backbone")
