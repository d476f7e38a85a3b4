"""`TrainConfig.resolved`: defaults from the data kind, the method and the backbone."""

import pytest

from kdml.config import TrainConfig
from kdml.models import build_embedder


@pytest.mark.parametrize("kind", ["photo", "glyph"])
def test_a_backbone_without_pretrained_weights_defaults_to_weights_none(kind):
    config = TrainConfig(backbone="conv4").resolved(kind)
    assert config.weights == "none"
    assert config.warmup_epochs == 0 and config.freeze_batchnorm is False  # nothing to protect
    assert config.image_size == {"photo": 224, "glyph": 28}[kind]  # the kind's other defaults


def test_an_explicit_imagenet_on_such_a_backbone_stays_an_error():
    config = TrainConfig(backbone="conv4", weights="imagenet").resolved("photo")
    assert config.weights == "imagenet"
    with pytest.raises(ValueError,
                       match="Backbone 'conv4' has no pretrained weights; use --weights=none"):
        build_embedder(config.backbone, image_size=32, weights=config.weights)


def test_pretrained_backbones_keep_the_kind_defaults():
    photo = TrainConfig(backbone="resnet50").resolved("photo")
    assert (photo.weights, photo.warmup_epochs, photo.freeze_batchnorm) == ("imagenet", 1, True)
    assert TrainConfig().resolved("photo").weights == "imagenet"
    glyph = TrainConfig(backbone="resnet50").resolved("glyph")
    assert (glyph.weights, glyph.warmup_epochs, glyph.freeze_batchnorm) == ("none", 0, False)
    # Explicit --weights=none on a photo dataset: warm-up defaults to 0 (its help text).
    scratch = TrainConfig(backbone="resnet50", weights="none").resolved("photo")
    assert (scratch.warmup_epochs, scratch.freeze_batchnorm) == (0, False)
    explicit = TrainConfig(backbone="conv4", warmup_epochs=2, freeze_batchnorm=True).resolved("photo")
    assert (explicit.warmup_epochs, explicit.freeze_batchnorm) == (2, True)  # given flags win


def test_an_unknown_backbone_is_an_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown backbone 'vgg'. Valid backbones: .*conv4"):
        TrainConfig(backbone="vgg").resolved("photo")
