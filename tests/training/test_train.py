"""End-to-end training runs on a tiny folder of glyphs (seconds, not minutes)."""

import dataclasses
import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import kdml  # noqa: F401
from kdml.config import TrainConfig
from kdml.data import eval_dataset, load_dataset
from kdml.evaluation import retrieval_metrics
from kdml.methods import get_method
from kdml.models import build_embedder
from kdml.optimizers import GroupedAdamW
from kdml.training import embed, list_checkpoints, train
from kdml.losses import ProxyAnchorLoss
from tests.conftest import new_mirrored_strategy
from tests.helpers import weights_after_one_step, write_glyph_folder


@pytest.fixture(scope="module")
def glyph_folder(tmp_path_factory):
    """12 classes x 6 glyph images as PNG files in alphabet/character folders."""
    return write_glyph_folder(tmp_path_factory.mktemp("glyph_folder"),
                              class_dir=lambda label: f"alphabet{label // 6}/char{label:02d}")


def _config(folder, out, **overrides):
    base = TrainConfig(dataset=f"folder:{folder}", output_dir=str(out), backbone="conv4",
                       weights="none", image_size=16, embedding_dim=16, augmentation="glyph",
                       classes_per_batch=3, images_per_class=2, epochs=2, lr=1e-3,
                       jit_compile="false", verbose=0, recall_ks=(1, 2))
    return dataclasses.replace(base, **overrides)


def _embedder_weights(out):
    return [w.numpy() for w in keras.saving.load_model(os.path.join(out, "embedder.keras")).weights]


def test_train_writes_metrics_checkpoints_and_a_reloadable_embedder(glyph_folder, tmp_path):
    history = train(_config(glyph_folder, tmp_path))
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["initial"] == history["initial"]
    assert set(saved["epochs"]) == {"1", "2"}
    for epoch in saved["epochs"].values():
        assert np.isfinite(epoch["loss"]) and epoch["images_per_second"] > 0
        assert 0 <= epoch["recall@1"] <= epoch["recall@2"] <= 1
    assert saved["config"]["backbone"] == "conv4" and saved["config"]["freeze_batchnorm"] is False
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [6, 12]  # 6 steps/epoch
    assert os.listdir(tmp_path / "logs")  # TensorBoard events

    # The saved embedder reproduces the final metrics from scratch after a reload.
    embedder = keras.saving.load_model(str(tmp_path / "embedder.keras"))
    splits = load_dataset(f"folder:{glyph_folder}")
    again = retrieval_metrics(embed(embedder, eval_dataset(splits.test, image_size=16)),
                              splits.test.labels, ks=(1, 2))
    for key, value in saved["final"].items():
        assert again[key] == pytest.approx(value, abs=1e-6), key


def test_killed_run_resumes_mid_epoch_to_the_same_weights(glyph_folder, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(_config(glyph_folder, whole, checkpoint_every_steps=4, keep_checkpoints=10))
    # A run killed after step 4 (mid-epoch 1 of 6-step epochs) left only its checkpoint.
    os.makedirs(killed / "checkpoints")
    shutil.copytree(whole / "checkpoints" / "ckpt-4", killed / "checkpoints" / "ckpt-4")
    with pytest.raises(ValueError, match="--resume"):
        train(_config(glyph_folder, killed))
    history = train(_config(glyph_folder, killed, resume=True, checkpoint_every_steps=4))
    assert set(history["epochs"]) == {"1", "2"}
    for a, b in zip(_embedder_weights(whole), _embedder_weights(killed)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_photo_folder_with_conv4_and_no_weights_flag_trains_from_scratch(glyph_folder, tmp_path):
    """A folder is a photo dataset (imagenet by default), but conv4 has no ImageNet weights."""
    history = train(_config(glyph_folder, tmp_path, weights=None, epochs=1))
    assert history["config"]["weights"] == "none" and history["config"]["warmup_epochs"] == 0
    assert history["config"]["freeze_batchnorm"] is False


def test_multi_similarity_trains_and_lowers_its_loss(glyph_folder, tmp_path):
    history = train(_config(glyph_folder, tmp_path, method="multi_similarity", epochs=3))
    losses = [history["epochs"][e]["loss"] for e in ("1", "2", "3")]
    assert losses[-1] < losses[0]


def _one_step_weights(strategy, initial):
    def build_model():
        embedder = build_embedder("conv4", embedding_dim=8, image_size=16)
        config = TrainConfig().resolved("glyph")
        return get_method("proxy_anchor").build(embedder, 5, config).model

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    labels = np.array([0, 0, 0, 0, 3, 3, 3, 3], np.int32)
    # epsilon=1 keeps Adam's first step linear in the gradient: with the default 1e-7,
    # g / (|g| + eps) turns float noise of near-zero gradients into +-lr.
    optimizer = lambda: GroupedAdamW(  # noqa: E731
        {"^proxies/": 100.0, "^backbone/": 1.0}, learning_rate=1e-2, weight_decay=1e-4,
        epsilon=1.0)
    return weights_after_one_step(strategy, build_model, initial, ProxyAnchorLoss(), images,
                                  labels, optimizer)


def test_two_replicas_take_the_same_step_as_one_on_the_global_batch():
    """Proxy Anchor + proxies at 100x lr + synchronised BatchNorm, 2 logical CPUs vs 1."""
    embedder = build_embedder("conv4", embedding_dim=8, image_size=16)
    config = TrainConfig().resolved("glyph")
    initial = [w.numpy() for w in get_method("proxy_anchor").build(embedder, 5, config).model.weights]
    single = _one_step_weights(tf.distribute.get_strategy(), initial)
    mirrored = _one_step_weights(new_mirrored_strategy(), initial)
    moved = [not np.allclose(a, b) for a, b in zip(initial, single)]
    assert sum(moved) > len(initial) // 2  # the step really changed the model
    for a, b in zip(single, mirrored):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_warmup_trains_head_and_proxies_with_the_backbone_frozen(glyph_folder, tmp_path):
    config = _config(glyph_folder, tmp_path, epochs=1, warmup_epochs=1, freeze_batchnorm=True)
    keras.utils.set_random_seed(config.seed)
    initial = build_embedder("conv4", embedding_dim=16, image_size=16, freeze_batchnorm=True)
    train(config)
    trained = keras.saving.load_model(str(tmp_path / "embedder.keras"))
    for before, after in zip(initial.get_layer("backbone").weights,
                             trained.get_layer("backbone").weights):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
    head_before = initial.get_layer("head").weights[0].numpy()
    assert not np.allclose(head_before, trained.get_layer("head").weights[0].numpy())


def test_train_under_mirrored_strategy_and_mixed_precision(glyph_folder, tmp_path):
    tf.distribute.MirroredStrategy._collective_key_base += 10_000  # see conftest
    history = train(_config(glyph_folder, tmp_path, epochs=1, strategy="mirrored",
                            mixed_precision=True))
    assert keras.mixed_precision.global_policy().name == "float32"  # no leaked global state
    assert np.isfinite(history["epochs"]["1"]["loss"])
    embedder = keras.saving.load_model(str(tmp_path / "embedder.keras"))
    expected = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    assert embedder.get_layer("backbone").layers[0].dtype_policy.name == expected
    out = embedder(np.zeros((2, 16, 16, 3), np.float32))
    assert out.dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-3)


def test_resume_refuses_a_run_recorded_with_another_method(tmp_path):
    import dataclasses
    import json

    from kdml.config import TrainConfig
    from kdml.training.run import check_same_run

    recorded = TrainConfig(method="proxy_anchor", output_dir=str(tmp_path)).resolved("glyph")
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"config": dataclasses.asdict(recorded)}))
    # More epochs and another evaluation cadence continue the same run.
    check_same_run(dataclasses.replace(recorded, epochs=60, eval_every=5), str(path))
    with pytest.raises(ValueError, match=r"--method='proxy_anchor' \(now 'so_proxy'\)"):
        check_same_run(dataclasses.replace(recorded, method="so_proxy"), str(path))
    with pytest.raises(ValueError, match="embedding_dim"):
        check_same_run(dataclasses.replace(recorded, embedding_dim=128), str(path))
