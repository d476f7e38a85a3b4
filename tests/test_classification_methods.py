"""`--method=` normalized_softmax | cosface | arcface | subcenter_arcface | proxy_nca |
soft_triple (kdml.methods, docs/methods.md): each builds Proxies(C * k) and its loss from
TrainConfig, trains the class weights at --proxy_lr_multiplier, and one short command-line
epoch on the embedded synthetic glyphs beats the untrained embedder's Recall@1."""

import dataclasses
import json

import numpy as np
import pytest

from kdml import train as train_cli
from kdml.config import TrainConfig
from kdml.losses import (ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss, ProxyNCALoss,
                         SoftTripleLoss, SubCenterArcFaceLoss)
from kdml.methods import BACKBONE_GROUP, get_method
from kdml.models import build_embedder
from tests.test_cli import _run_main

# method -> (loss class, TrainConfig overrides, what the loss must hold, weights per class)
METHODS = {
    "normalized_softmax": (NormalizedSoftmaxLoss, dict(ns_temperature=0.1),
                           dict(temperature=0.1), 1),
    "cosface": (CosFaceLoss, dict(cosface_margin=0.2, cosface_scale=30.0),
                dict(margin=0.2, scale=30.0), 1),
    "arcface": (ArcFaceLoss, dict(arcface_margin=20.0, arcface_scale=30.0),
                dict(margin=20.0, scale=30.0), 1),
    "subcenter_arcface": (SubCenterArcFaceLoss, dict(arcface_margin=20.0, sub_centers=2),
                          dict(margin=20.0, scale=64.0, sub_centers=2), 2),
    "proxy_nca": (ProxyNCALoss, dict(proxy_nca_scale=4.0), dict(softmax_scale=4.0), 1),
    "soft_triple": (SoftTripleLoss, dict(soft_triple_centers=3, soft_triple_la=10.0,
                                         soft_triple_gamma=0.2, soft_triple_margin=0.05),
                    dict(centers_per_class=3, la=10.0, gamma=0.2, margin=0.05), 3),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_method_builds_its_loss_and_class_weights_from_the_config(name):
    loss_cls, overrides, expected, centers = METHODS[name]
    config = dataclasses.replace(TrainConfig(method=name, proxy_lr_multiplier=50.0),
                                 **overrides).resolved("glyph")
    embedder = build_embedder("conv4", embedding_dim=8, image_size=16)
    objective = get_method(name).build(embedder, 7, config)
    assert type(objective.loss) is loss_cls
    assert {k: objective.loss.get_config()[k] for k in expected} == expected
    proxies = objective.model.get_layer("proxies").proxies
    assert tuple(proxies.shape) == (7 * centers, 8)
    assert objective.learning_rate_multipliers == {"^proxies/": 50.0, BACKBONE_GROUP: 1.0}
    assert len(objective.callbacks) == (1 if centers == 1 else 0)  # proxy diagnostics
    images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    value = objective.loss(np.array([0, 6, 3, 3]), objective.model(images))
    assert np.isfinite(float(value)) and float(value) > 0


def test_the_defaults_are_pytorch_metric_learnings_but_proxy_nca_uses_proxynca_plus_plus():
    config = TrainConfig()
    built = {name: get_method(name).build(build_embedder("conv4", embedding_dim=8, image_size=16),
                                          3, config.resolved("glyph")).loss.get_config()
             for name in METHODS}
    assert built["normalized_softmax"]["temperature"] == 0.05
    assert (built["cosface"]["margin"], built["cosface"]["scale"]) == (0.35, 64.0)
    assert (built["arcface"]["margin"], built["arcface"]["scale"]) == (28.6, 64.0)
    assert built["subcenter_arcface"]["sub_centers"] == 3
    assert built["proxy_nca"]["softmax_scale"] == 9.0  # ProxyNCA++'s T = 1/9 (PML: 1)
    assert ({k: built["soft_triple"][k] for k in ("centers_per_class", "la", "gamma", "margin")}
            == dict(centers_per_class=10, la=20.0, gamma=0.1, margin=0.01))


@pytest.mark.parametrize("argv, message", [
    (["--method=arcface", "--arcface_margin=200"], "error: --arcface_margin: Expected `margin` in degrees"),
    (["--method=subcenter_arcface", "--sub_centers=0"], "error: --sub_centers: Expected `sub_centers`"),
    (["--method=normalized_softmax", "--ns_temperature=0"], "error: --ns_temperature: Expected"),
])
def test_a_bad_hyperparameter_is_a_one_line_error_naming_the_flag(argv, message, capsys, tmp_path):
    code = _run_main(train_cli, argv + [f"--output_dir={tmp_path}", "--verbose=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(message), err[-1]
    assert not any(line.startswith("Traceback") for line in err)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_command_line_epoch_beats_the_untrained_embedder(name, tmp_path):
    """`python -m kdml.train --method=<name>` (in-process), 1 epoch of 16 steps on the
    embedded glyphs (16 px, d = 16), with the method's default hyperparameters."""
    out = tmp_path / name
    code = _run_main(train_cli, [f"--method={name}", "--epochs=1", "--embedding_dim=16",
                                 "--image_size=16", "--classes_per_batch=32",
                                 "--images_per_class=4", "--jit_compile=false", "--verbose=0",
                                 "--recall_ks=1", f"--output_dir={out}"])
    assert code == 0
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["config"]["method"] == name
    before, after = metrics["initial"]["recall@1"], metrics["final"]["recall@1"]
    assert after > before + 0.01, (before, after)
    assert np.isfinite(metrics["epochs"]["1"]["loss"])
