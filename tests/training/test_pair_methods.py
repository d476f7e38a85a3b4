"""The pair and triplet methods (`--method=triplet | contrastive | circle | supcon | ntxent`),
`--views` and `--xbm_size`: objectives built from TrainConfig, and a short command-line run
of each on the embedded synthetic dataset whose Recall@1 beats the untrained embedder."""

import dataclasses
import json

import keras
import pytest

from kdml import train as train_cli
from kdml.config import TrainConfig
from kdml.losses import (CircleLoss, ContrastiveLoss, CrossBatchMemory, MultiSimilarityLoss,
                         NTXentLoss, SupConLoss, TripletMarginLoss)
from kdml.losses.cross_batch_memory import MemoryQueue
from kdml.methods import METHODS, check_method_options, get_method
from kdml.models import build_embedder
from tests.test_cli import _run_main

_EXPECTED = {
    "triplet": (TripletMarginLoss, dict(triplet_margin=0.2, triplet_mining="semihard",
                                        triplet_distance="cosine"),
                dict(margin=0.2, mining="semihard", distance="cosine")),
    "contrastive": (ContrastiveLoss, dict(contrastive_pos_margin=0.1, contrastive_neg_margin=0.7,
                                          contrastive_distance="squared_euclidean"),
                    dict(pos_margin=0.1, neg_margin=0.7, distance="squared_euclidean")),
    "circle": (CircleLoss, dict(circle_m=0.25, circle_gamma=64.0), dict(m=0.25, gamma=64.0)),
    "supcon": (SupConLoss, dict(supcon_temperature=0.2), dict(temperature=0.2)),
    "ntxent": (NTXentLoss, dict(ntxent_temperature=0.5), dict(temperature=0.5)),
}


@pytest.fixture(scope="module")
def embedder():
    return build_embedder("conv4", embedding_dim=8, image_size=16)


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_each_method_builds_its_loss_from_the_config(name, embedder):
    loss_cls, settings, loss_args = _EXPECTED[name]
    config = dataclasses.replace(TrainConfig(method=name), **settings).resolved("glyph")
    objective = get_method(name).build(embedder, 5, config)
    assert type(objective.loss) is loss_cls
    for key, value in loss_args.items():
        assert getattr(objective.loss, key) == value, key
    assert objective.model.output_shape == (None, 8)  # the embeddings themselves
    # PML's defaults are the flags' defaults.
    defaults = get_method(name).build(embedder, 5, TrainConfig(method=name).resolved("glyph")).loss
    assert defaults.get_config() == {**loss_cls().get_config()}


def test_views_default_to_two_for_supcon_and_ntxent_only():
    for name in METHODS:
        want = 2 if name in ("supcon", "ntxent") else 1
        assert TrainConfig(method=name).resolved("glyph").views == want, name
        assert TrainConfig(method=name).resolved("photo").views == want, name
    assert TrainConfig(method="supcon", views=1).resolved("glyph").views == 1
    assert get_method("ntxent").instance_labels(TrainConfig(method="ntxent"))
    assert not get_method("ntxent").instance_labels(
        TrainConfig(method="ntxent", ntxent_positives="class"))
    assert not get_method("supcon").instance_labels(TrainConfig(method="supcon"))


@pytest.mark.parametrize("name", ["multi_similarity", "triplet", "supcon"])
def test_xbm_size_wraps_the_loss_and_puts_the_queue_in_the_model(name, embedder):
    config = TrainConfig(method=name, xbm_size=300).resolved("glyph")
    objective = get_method(name).build(embedder, 5, config)
    assert isinstance(objective.loss, CrossBatchMemory)
    assert objective.loss.memory_size == 300 and objective.loss.embedding_size == 8
    inner = {"multi_similarity": MultiSimilarityLoss, "triplet": TripletMarginLoss,
             "supcon": SupConLoss}[name]
    assert type(objective.loss.loss) is inner
    queue = objective.model.get_layer("xbm_memory")
    assert queue is objective.loss.memory and isinstance(queue, MemoryQueue)
    assert {w.path.split("/")[-1] for w in objective.model.non_trainable_weights} >= {
        "embeddings", "labels", "count"}


def test_xbm_size_needs_a_pair_based_method_and_a_memory_of_at_least_the_batch(embedder):
    for name in ("proxy_anchor", "so_proxy", "crt", "pddm"):
        with pytest.raises(ValueError, match=f"--method={name} has no pairs"):
            check_method_options(TrainConfig(method=name, xbm_size=512))
    check_method_options(TrainConfig(method="circle", xbm_size=512))
    config = TrainConfig(method="supcon", xbm_size=200).resolved("glyph")  # 32 x 4 x 2 = 256
    with pytest.raises(ValueError, match="--xbm_size=200 is smaller than the global batch of "
                                         "256 embeddings"):
        get_method("supcon").build(embedder, 5, config)


# One epoch of each method from the command line (in-process), on the embedded dataset:
# 100 training classes, conv4 at 16 px, 32-d embeddings. About 5 s of CPU each (10-25 s
# of wall time beside a busy benchmark): two stay in the fast tier (triplet, and ntxent
# for two views with instance labels), the others are marked slow.
_SLOW = pytest.mark.slow
_RUNS = [
    pytest.param(["--method=triplet", "--triplet_mining=semihard", "--triplet_margin=0.2"],
                 id="triplet"),
    pytest.param(["--method=contrastive"], id="contrastive", marks=_SLOW),
    pytest.param(["--method=circle"], id="circle", marks=_SLOW),
    pytest.param(["--method=supcon"], id="supcon", marks=_SLOW),
    pytest.param(["--method=ntxent"], id="ntxent"),
    pytest.param(["--method=multi_similarity", "--xbm_size=512"], id="multi_similarity_xbm",
                 marks=_SLOW),
]


@pytest.mark.parametrize("argv", _RUNS)
def test_one_epoch_from_the_command_line_beats_the_untrained_embedder(argv, tmp_path):
    code = _run_main(train_cli, argv + [
        f"--output_dir={tmp_path}", "--epochs=1", "--image_size=16", "--embedding_dim=32",
        "--jit_compile=false", "--verbose=0", "--recall_ks=1"])
    assert code == 0
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["final"]["recall@1"] > metrics["initial"]["recall@1"] + 0.01, metrics
    assert keras.saving.load_model(str(tmp_path / "embedder.keras")).output_shape == (None, 32)


# --- the memory in real runs: kill and resume, two replicas with mixed precision -------


@pytest.fixture(scope="module")
def glyph_folder(tmp_path_factory):
    from tests.helpers import write_glyph_folder

    return write_glyph_folder(tmp_path_factory.mktemp("glyphs"))


def _run_config(folder, out, **overrides):
    base = TrainConfig(dataset=f"folder:{folder}", output_dir=str(out), backbone="conv4",
                       weights="none", image_size=16, embedding_dim=16, augmentation="glyph",
                       classes_per_batch=3, images_per_class=2, epochs=2, lr=1e-3,
                       jit_compile="false", verbose=0, recall_ks=(1,), method="triplet",
                       triplet_margin=0.5, xbm_size=20)
    return dataclasses.replace(base, **overrides)


def _embedder_weights(out):
    return [w.numpy() for w in keras.saving.load_model(str(out / "embedder.keras")).weights]


@pytest.mark.slow
def test_a_killed_xbm_run_resumes_with_the_same_queue_to_the_same_weights(glyph_folder, tmp_path):
    import os
    import shutil

    import numpy as np

    from kdml.training import train

    import h5py

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(_run_config(glyph_folder, whole, checkpoint_every_steps=4, keep_checkpoints=10))
    with h5py.File(whole / "checkpoints" / "ckpt-4" / "model.weights.h5", "r") as weights:
        queue = weights["layers/memory_queue/vars"]  # embeddings, labels, count
        assert queue["0"].shape == (20, 16) and int(queue["2"][()]) == 24
    # Killed after step 4 of 6-step epochs (24 rows written through a 20-row memory).
    os.makedirs(killed / "checkpoints")
    shutil.copytree(whole / "checkpoints" / "ckpt-4", killed / "checkpoints" / "ckpt-4")
    shutil.copy(whole / "metrics.json", killed / "metrics.json")
    train(_run_config(glyph_folder, killed, resume=True, checkpoint_every_steps=4))
    for a, b in zip(_embedder_weights(whole), _embedder_weights(killed)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Without the restored queue the resumed run would end elsewhere: check that the
    # memory changes the step (a memory of one batch is the plain loss).
    plain = tmp_path / "plain"
    train(_run_config(glyph_folder, plain, xbm_size=6))
    assert max(np.abs(a - b).max() for a, b in zip(_embedder_weights(whole),
                                                   _embedder_weights(plain))) > 1e-4


@pytest.mark.slow
def test_xbm_under_mirrored_strategy_and_mixed_precision(glyph_folder, tmp_path):
    import numpy as np
    import tensorflow as tf

    from kdml.training import train

    tf.distribute.MirroredStrategy._collective_key_base += 10_000  # see conftest
    history = train(_run_config(glyph_folder, tmp_path, epochs=1, strategy="mirrored",
                                mixed_precision=True, method="supcon", xbm_size=24))
    assert np.isfinite(history["epochs"]["1"]["loss"])
    assert history["config"]["views"] == 2
