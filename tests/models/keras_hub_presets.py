"""Tiny keras-hub backbones of each kdml keras-hub backbone name, written to preset
directories by `save_to_preset` (what a user's downloaded preset looks like), shared by
the backbone tests. One layer, hidden size 16: seconds to build, train and export."""

import os

# name -> (keras-hub class, constructor arguments, image size the tests use)
_VIT = dict(num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32)
TINY = {
    "dinov2_small": ("DINOV2Backbone", dict(patch_size=4, image_shape=(16, 16, 3),
                                            position_embedding_shape=(16, 16, 3), **_VIT), 16),
    "dinov2_base": ("DINOV2Backbone", dict(patch_size=4, image_shape=(16, 16, 3),
                                           position_embedding_shape=(24, 24, 3), **_VIT), 16),
    "dinov3_small": ("DINOV3Backbone", dict(patch_size=4, image_shape=(16, 16, 3),
                                            num_register_tokens=4, use_key_bias=False, **_VIT),
                     16),
    "siglip_base": ("SigLIPVisionEncoder", dict(patch_size=4, image_shape=(16, 16, 3), **_VIT),
                    16),
    "clip_vit_b16": ("CLIPVisionEncoder", dict(patch_size=4, image_shape=(16, 16, 3),
                                               intermediate_activation="quick_gelu", **_VIT), 16),
    # num_features stays 1280: keras-hub 0.32 does not save it in the preset config.
    "efficientnet_b0": ("EfficientNetBackbone", dict(
        stackwise_width_coefficients=[1.0, 1.0], stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8], stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 2], stackwise_squeeze_and_excite_ratios=[0.25, 0.25],
        stackwise_strides=[1, 2], stackwise_block_types=["v1", "v1"],
        stackwise_force_input_filters=[0, 0], stackwise_nores_option=[False, False],
        input_shape=(32, 32, 3), min_depth=None,
        use_depth_divisor_as_min_depth=True, dropout=0), 32),
    "mobilenet_v3_large": ("MobileNetBackbone", dict(
        stackwise_expansion=[[16]], stackwise_num_blocks=[1], stackwise_num_filters=[[8]],
        stackwise_kernel_size=[[3]], stackwise_num_strides=[[2]], stackwise_se_ratio=[[0.25]],
        stackwise_activation=[["hard_swish"]], stackwise_padding=[[1]], output_num_filters=16,
        depthwise_filters=8, depthwise_stride=2, depthwise_residual=False,
        last_layer_filter=16, input_num_filters=8, image_shape=(32, 32, 3)), 32),
}


def tiny_backbone(name):
    """A randomly initialised tiny keras-hub model of backbone `name`'s class."""
    import keras_hub

    class_name, arguments, _ = TINY[name]
    return getattr(keras_hub.models, class_name)(**arguments)


def write_tiny_presets(root):
    """{name: preset directory} of every `TINY` backbone, written under `root`."""
    import keras

    directories = {}
    for i, name in enumerate(TINY):
        keras.utils.set_random_seed(i)
        directory = os.path.join(str(root), name)
        tiny_backbone(name).save_to_preset(directory)
        directories[name] = directory
    return directories
