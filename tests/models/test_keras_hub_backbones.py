"""The keras-hub backbones (dinov2_small/base, dinov3_small, siglip_base, clip_vit_b16,
efficientnet_b0, mobilenet_v3_large): their published architectures, `--weights` as a
local preset directory (tiny models written by `save_to_preset`), the offline error of a
preset name, and the whole chain on each (train, `.keras`, evaluate, index, SavedModel
and float16 / int8 TFLite with the parity report). Nothing here downloads."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

import kdml  # noqa: F401
from kdml.config import TrainConfig
from kdml.models import BACKBONES, backbone_spec, build_backbone, build_embedder
from kdml.models.keras_hub_backbones import HUB_BACKBONES
from tests.helpers import write_glyph_folder
from tests.models.keras_hub_presets import TINY, tiny_backbone, write_tiny_presets

NAMES = sorted(HUB_BACKBONES)


@pytest.fixture(scope="session")
def tiny_presets(tmp_path_factory):
    return write_tiny_presets(tmp_path_factory.mktemp("keras_hub_presets"))


@pytest.fixture(scope="module")
def glyph_folder(tmp_path_factory):
    """12 classes x 6 glyph images (PNG): 6 train and 6 test classes."""
    return write_glyph_folder(tmp_path_factory.mktemp("hub_glyphs"))


def test_every_name_is_a_backbone_with_its_keras_hub_spec():
    # (class, features, prefix tokens, native size, default pooling), from the models' papers
    want = {
        "dinov2_small": ("DINOV2Backbone", "tokens", 1, "cls"),
        "dinov2_base": ("DINOV2Backbone", "tokens", 1, "cls"),
        "dinov3_small": ("DINOV3Backbone", "tokens", 5, "cls"),  # class + 4 registers
        "siglip_base": ("SigLIPVisionEncoder", "tokens", 1, "cls"),  # the pooled token
        "clip_vit_b16": ("CLIPVisionEncoder", "tokens", 1, "cls"),
        "efficientnet_b0": ("EfficientNetBackbone", "map", 0, "gem"),
        "mobilenet_v3_large": ("MobileNetBackbone", "map", 0, "gem"),
    }
    assert set(want) == set(NAMES) and set(NAMES) <= set(BACKBONES)
    for name, (cls, features, prefix, pooling) in want.items():
        spec = backbone_spec(name)
        assert (spec.keras_hub_class, spec.features, spec.prefix_tokens, spec.default_pooling,
                spec.native_image_size) == (cls, features, prefix, pooling, 224)
    # SigLIP: [-1, 1]; CLIP: OpenAI's statistics; the others ImageNet's.
    assert backbone_spec("siglip_base").pixel_mean == (127.5,) * 3
    assert backbone_spec("clip_vit_b16").pixel_std[0] == pytest.approx(0.26862954 * 255)
    assert backbone_spec("dinov2_small").pixel_mean[0] == pytest.approx(0.485 * 255)


@pytest.mark.slow
@pytest.mark.parametrize("name, size, count, trainable_only", [
    ("dinov2_small", 518, 22_582_656, False),  # the keras-hub preset's count (at 518 px)
    ("mobilenet_v3_large", 224, 2_996_352, False),  # the keras-hub preset's count
    ("efficientnet_b0", 224, 5_288_548 - 1280 * 1000 - 1000, True),  # timm's, less its classifier
    ("siglip_base", 224, 92_884_224, True),  # SiglipVisionModel (base, patch 16, 224)
])
def test_weights_none_is_the_published_architecture(name, size, count, trainable_only):
    model = build_backbone(name, size, "none")
    weights = model.trainable_weights if trainable_only else model.weights
    assert sum(int(np.prod(w.shape)) for w in weights) == count


@pytest.mark.parametrize("name", NAMES)
def test_a_preset_directory_loads_its_weights_and_lays_out_the_tokens(name, tiny_presets, rng):
    _, arguments, size = TINY[name]
    reference = tiny_backbone(name)
    reference.load_weights(os.path.join(tiny_presets[name], "model.weights.h5"))
    backbone = build_backbone(name, size, tiny_presets[name])
    x = rng.normal(size=(2, size, size, 3)).astype("float32")
    got = keras.ops.convert_to_numpy(backbone(x))
    want = keras.ops.convert_to_numpy(reference({next(iter(reference.input)): x}
                                                if isinstance(reference.input, dict) else x))
    spec = backbone_spec(name)
    if spec.features == "map":
        np.testing.assert_allclose(got, want, atol=1e-5)
        return
    patches = (size // arguments["patch_size"]) ** 2
    assert got.shape == (2, spec.prefix_tokens + patches, 16)
    assert tuple(backbone.output_shape[1:]) == got.shape[1:]
    if name == "siglip_base":  # token 0: the attention-pooled embedding, then the patches
        np.testing.assert_allclose(got[:, 0], want, atol=1e-5)
    else:
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_preset_name_without_network_is_one_line_naming_the_directory(monkeypatch):
    import kagglehub
    import requests

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(kagglehub, "model_download", offline)
    with pytest.raises(ValueError) as error:
        build_backbone("dinov2_small", 224, "dinov2_small")
    message = str(error.value)
    assert "\n" not in message and message.startswith("--weights=dinov2_small: could not download")
    assert "--weights=<that directory>" in message and "save_to_preset" in message


def test_weights_that_do_not_apply_are_errors_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match="--weights=dinov2_small"):
        build_backbone("dinov2_small", 224, "imagenet")  # DINOv2 is not ImageNet-trained
    with pytest.raises(ValueError, match="dinov2_with_registers_small"):
        build_backbone("dinov2_small", 224, "clip_vit_base_patch16")  # lists dinov2's presets
    with pytest.raises(ValueError, match="must be one of"):
        build_backbone("resnet50", 32, "dinov2_small")
    with pytest.raises(ValueError, match="not a keras-hub preset directory"):
        build_backbone("dinov2_small", 224, str(tmp_path))  # an empty directory


def test_a_preset_of_another_class_or_size_is_refused(tiny_presets):
    with pytest.raises(ValueError, match="holds a DINOV2Backbone; --backbone=clip_vit_b16"):
        build_backbone("clip_vit_b16", 16, tiny_presets["dinov2_small"])
    with pytest.raises(ValueError, match="--image_size=16"):  # fixed position embeddings
        build_backbone("siglip_base", 32, tiny_presets["siglip_base"])
    with pytest.raises(ValueError, match="2 register tokens; --backbone=dinov3_small is the "
                                         "architecture with 4"):
        build_backbone("dinov3_small", 16, _with_registers(tiny_presets, 2))


@pytest.mark.parametrize("name, prefix", [("dinov2_small", 1), ("dinov3_small", 5)])
def test_dino_presets_load_at_another_size(name, prefix, tiny_presets):
    """DINOv2 interpolates its position embeddings, DINOv3 has RoPE: a preset saved at
    16 px runs at 32 px with (32 / 4)^2 patches, and at 16 px as saved."""
    backbone = build_backbone(name, 32, tiny_presets[name])
    assert keras.ops.convert_to_numpy(backbone(np.zeros((1, 32, 32, 3)))).shape == (
        1, prefix + 64, 16)


def _with_registers(tiny_presets, registers):
    import keras_hub

    directory = os.path.join(os.path.dirname(tiny_presets["dinov3_small"]), f"reg{registers}")
    if not os.path.isdir(directory):
        arguments = dict(TINY["dinov3_small"][1], num_register_tokens=registers)
        keras_hub.models.DINOV3Backbone(**arguments).save_to_preset(directory)
    return directory


def test_photo_defaults_are_imagenet_or_the_published_preset():
    assert TrainConfig(backbone="dinov2_small").resolved("photo").weights == "dinov2_small"
    assert TrainConfig(backbone="siglip_base").resolved("photo").weights == \
        "siglip_base_patch16_224"
    assert TrainConfig(backbone="efficientnet_b0").resolved("photo").weights == "imagenet"
    glyph = TrainConfig(backbone="dinov3_small").resolved("glyph")
    assert glyph.weights == "none" and glyph.warmup_epochs == 0


def test_pooling_setting_reaches_the_head_and_is_checked(tiny_presets):
    from kdml.methods import check_method_options, get_method

    config = TrainConfig(pooling="gem")
    head, options = get_method("proxy_anchor").head(config)
    embedder = build_embedder("dinov3_small", head, embedding_dim=4, image_size=16,
                              weights=tiny_presets["dinov3_small"], head_options=options)
    assert embedder.get_layer("head").pooling == "gem"
    assert embedder.get_layer("head").skip_tokens == 5  # class + 4 registers left out
    with pytest.raises(ValueError, match="--pooling"):
        check_method_options(TrainConfig(method="crt", pooling="gem"))
    with pytest.raises(ValueError, match="needs a transformer's tokens"):
        build_embedder("mobilenet_v3_large", image_size=32, pooling="cls")
    with pytest.raises(ValueError, match="--pooling must be one of"):
        TrainConfig(pooling="sum")


CHAIN = [pytest.param(name, marks=pytest.mark.slow) for name in NAMES if name != "dinov2_base"]


@pytest.mark.parametrize("name", CHAIN)
def test_the_whole_chain_on_a_tiny_preset(name, tiny_presets, glyph_folder, tmp_path):
    """dinov2_base is dinov2_small's class with other sizes: its chain is dinov2_small's."""
    from kdml.evaluation.protocols import evaluate_model
    from kdml.embedding import load_embedder
    from kdml.export.workflow import run_export
    from kdml.index import build_index
    from kdml.training import train

    size = TINY[name][2]
    source = f"folder:{glyph_folder}"
    config = TrainConfig(dataset=source, output_dir=str(tmp_path / "run"), backbone=name,
                         weights=tiny_presets[name], image_size=size, embedding_dim=8,
                         augmentation="none", classes_per_batch=3, images_per_class=2, epochs=1,
                         warmup_epochs=0, lr=1e-3, jit_compile="false", verbose=0,
                         recall_ks=(1,))
    history = train(config)
    run = tmp_path / "run"
    assert history["config"]["weights"] == tiny_presets[name]
    assert np.isfinite(history["epochs"]["1"]["loss"])
    model_path = str(run / "embedder.keras")

    # The saved embedder is the trained one: its backbone moved away from the preset.
    embedder = keras.saving.load_model(model_path)
    start = build_backbone(name, size, tiny_presets[name])
    moved = [not np.allclose(a, b) for a, b in zip(embedder.get_layer("backbone").get_weights(),
                                                   start.get_weights())]
    assert any(moved)

    report = evaluate_model(model_path, dataset=source, ks=(1,), nmi=False, verification=False,
                            ranking_metrics=False)
    assert report["metrics"]["recall@1"] == pytest.approx(history["final"]["recall@1"])

    index = build_index(model_path, source, str(tmp_path / "index"))
    own = load_embedder(model_path)
    assert len(index) == 72 and index.dim == 8
    result = index.query(index.embeddings[:5], k=1)
    np.testing.assert_array_equal(result.indices[:, 0], np.arange(5))

    paths, parity = run_export(model_path, str(tmp_path / "export"), dataset=source,
                               quantizations=("float16", "int8"), calibration_count=12,
                               parity_images=36, latency_runs=0, max_recall_drop=100.0)
    assert set(paths) == {"saved_model", "tflite_float16", "tflite_int8"}
    files = parity["files"]
    assert files["saved_model"]["cosine_min"] > 0.9999
    assert files["tflite_float16"]["cosine_min"] > 0.99
    assert files["tflite_int8"]["cosine_mean"] > 0.9 and "recall@1_drop" in files["tflite_int8"]
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    np.testing.assert_allclose(load_embedder(paths["tflite_float16"]).embed(images),
                               own.embed(images), atol=5e-3)
    with open(os.path.join(str(tmp_path / "export"), "parity.json")) as f:
        assert json.load(f)["files"]["tflite_int8"]["path"] == paths["tflite_int8"]


def _train_commands(*pages):
    """Every `python -m kdml.train ...` command of `pages` (code lines and inline code)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    commands = []
    for page in pages:
        text = open(os.path.join(root, page), encoding="utf-8").read()
        for match in re.finditer(r"python -m kdml\.train([^`\n]*)", text):
            commands.append((page, match.group(1).split(" #")[0].strip()))
    return commands


def test_the_training_docs_commands_parse_with_the_real_flags():
    """Each command's flags parse with `kdml.train`'s absl flags and make a TrainConfig.
    `--freeze_backbone` (the frozen-backbone mode) is a flag of its own branch; until it
    is merged here, a command using it is checked without it."""
    import shlex

    from absl import flags

    from kdml.train import config_from_flags, define_flags

    commands = _train_commands("docs/training.md", "README.md")
    assert any("--backbone=dinov2_small" in c and "tfds:cub200" in c for _, c in commands)
    assert any("--backbone=siglip_base" in c and "--freeze_backbone" in c for _, c in commands)
    has_freeze = "freeze_backbone" in {f.name for f in dataclasses.fields(TrainConfig)}
    for page, command in commands:
        arguments = shlex.split(command)
        if "--helpfull" in arguments:
            continue
        if not has_freeze:
            arguments = [a for a in arguments if a != "--freeze_backbone"]
        values = flags.FlagValues()
        define_flags(TrainConfig, values)
        values(["kdml.train", *arguments])  # raises on an unknown flag or a bad value
        config = config_from_flags(values)
        assert isinstance(config, TrainConfig), (page, command)
