"""The run header's model line names the normalisation that a backbone has: BatchNorm
(frozen or trained) for a CNN, LayerNorm for a ViT, nothing but "frozen" under
--freeze_backbone."""

import types

import pytest
import tensorflow as tf

import kdml  # noqa: F401
from kdml.config import TrainConfig
from kdml.distribute import WorkerRole
from kdml.methods import get_method
from kdml.training.run import describe_run


def _model_line(**settings):
    config = TrainConfig(dataset="synthetic", output_dir="/tmp/out", weights="none", lr=1e-3,
                         image_size=32, embedding_dim=8, **settings)
    part = types.SimpleNamespace(num_images=10, num_classes=2)
    splits = types.SimpleNamespace(train=part, test=part, kind="photo")
    header = describe_run(config, get_method(config.method), splits,
                          tf.distribute.get_strategy(), WorkerRole(), steps=3)
    return next(line for line in header.splitlines() if line.startswith("model:"))


@pytest.mark.parametrize("settings, state", [
    (dict(backbone="conv4", freeze_batchnorm=False), "BatchNorm trained"),
    (dict(backbone="conv4", freeze_batchnorm=True), "BatchNorm frozen"),
    (dict(backbone="deit_tiny", freeze_batchnorm=True), "LayerNorm, all layers trained"),
    (dict(backbone="dinov2_small"), "LayerNorm, all layers trained"),
    (dict(backbone="conv4", freeze_backbone=True), "backbone frozen"),
])
def test_the_model_line_names_the_backbones_own_normalisation(settings, state):
    line = _model_line(**settings)
    assert f", {state})" in line
    if "BatchNorm" not in state:
        assert "BatchNorm" not in line
