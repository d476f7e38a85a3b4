"""Frozen-backbone mode (`--freeze_backbone`, kdml.training.frozen) on a tiny glyph folder."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest

import kdml  # noqa: F401
from kdml.config import TrainConfig
from kdml.data import (AUGMENTATIONS, eval_dataset, feature_train_dataset, load_dataset,
                       train_dataset, unaugmented_dataset)
from kdml.methods import get_method
from kdml.models import build_embedder, split_embedder
from kdml.optimizers import GroupedAdamW
from kdml.training import frozen, latest_checkpoint, train
from tests.helpers import write_glyph_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def glyph_folder(tmp_path_factory):
    """12 classes x 6 glyph images (20 px PNG): 6 train classes, 6 test classes."""
    return write_glyph_folder(tmp_path_factory.mktemp("frozen_glyphs"))


def _config(folder, out, **overrides):
    base = TrainConfig(dataset=f"folder:{folder}", output_dir=str(out), backbone="conv4",
                       weights="none", image_size=16, embedding_dim=8, classes_per_batch=3,
                       images_per_class=2, epochs=1, lr=1e-2, jit_compile="false", verbose=0,
                       recall_ks=(1, 2), freeze_backbone=True)
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def count_backbone_images(monkeypatch):
    """Counts the images that go through the backbone (the feature pass)."""
    counted = []
    original = frozen.extract_features

    def counting(extractor, dataset, num_images, path=None):
        counted.append(num_images)
        return original(extractor, dataset, num_images, path)

    monkeypatch.setattr(frozen, "extract_features", counting)
    return counted


def _checkpoint_paths(path):
    names = []
    with h5py.File(os.path.join(path, "model.weights.h5")) as f:
        f.visititems(lambda name, item: names.append((name, item.shape))
                     if isinstance(item, h5py.Dataset) else None)
    return names


def test_features_are_computed_once_and_reused_on_resume(glyph_folder, tmp_path,
                                                         count_backbone_images, capsys):
    splits = load_dataset(f"folder:{glyph_folder}")
    train(_config(glyph_folder, tmp_path))
    # Each image went through the backbone exactly once: 36 training + 36 test images.
    assert count_backbone_images == [splits.train.num_images, splits.test.num_images] == [36, 36]
    out = capsys.readouterr().out
    assert "frozen:   backbone frozen" in out and "augmentation off" in out
    assert "computed in" in out
    files = sorted(os.listdir(tmp_path / "features"))
    assert [f.split("-")[0] for f in files] == ["test", "test", "train", "train"]

    # A resumed (longer) run reuses the cache: no image goes through the backbone again.
    history = train(_config(glyph_folder, tmp_path, epochs=2, resume=True))
    assert count_backbone_images == [36, 36]
    assert "reused" in capsys.readouterr().out
    assert set(history["epochs"]) == {"1", "2"}
    assert sorted(os.listdir(tmp_path / "features")) == files


def test_cache_is_invalidated_by_other_weights_or_another_image_list(glyph_folder, tmp_path,
                                                                     count_backbone_images):
    splits = load_dataset(f"folder:{glyph_folder}")
    config = _config(glyph_folder, tmp_path).resolved("glyph")
    keras.utils.set_random_seed(0)
    extractor, _ = split_embedder(build_embedder("conv4", embedding_dim=8, image_size=16))
    cache = str(tmp_path / "features")

    first = frozen.prepare_features(extractor, splits.train, splits.test, config, cache)
    again = frozen.prepare_features(extractor, splits.train, splits.test, config, cache)
    assert count_backbone_images == [36, 36]
    assert again.train.reused and again.test.reused
    np.testing.assert_array_equal(again.train.features, first.train.features)

    # Other backbone weights: another fingerprint, new features (the old file replaced).
    kernel = extractor.get_layer("backbone").get_layer("conv1").kernel
    kernel.assign(kernel * 2.0)
    changed = frozen.prepare_features(extractor, splits.train, splits.test, config, cache)
    assert count_backbone_images == [36, 36, 36, 36]
    assert changed.fingerprint != first.fingerprint and not changed.train.reused
    assert not np.allclose(changed.train.features, first.train.features)
    assert len(os.listdir(cache)) == 4  # train and test .npy + .json, the old ones removed

    # Another image list (one class fewer): the training features are computed again,
    # the test features (same images, same backbone) are reused.
    fewer = splits.train.select_classes(range(5))
    frozen.prepare_features(extractor, fewer, splits.test, config, cache)
    assert count_backbone_images == [36, 36, 36, 36, 30]
    # Without a cache folder the features stay in memory: the same values, nothing written.
    in_memory = frozen.prepare_features(extractor, splits.train, splits.test, config, None)
    assert in_memory.train.path is None and isinstance(in_memory.train.features, np.ndarray)
    np.testing.assert_array_equal(in_memory.train.features, changed.train.features)
    assert count_backbone_images == [36, 36, 36, 36, 30, 36, 36]
    assert "in memory" in in_memory.describe()
    # Another crop of the same images is another image list too.
    frozen.prepare_features(extractor, fewer, splits.test,
                            dataclasses.replace(config, eval_crop_fraction=0.5), cache)
    assert count_backbone_images == [36, 36, 36, 36, 30, 36, 36, 36]


def test_unaugmented_batches_are_the_training_crop_without_augmentation(glyph_folder):
    splits = load_dataset(f"folder:{glyph_folder}")
    images = np.concatenate([x for x, _ in unaugmented_dataset(splits.train, image_size=16,
                                                               batch_size=7)])
    fake_features = np.arange(36 * 3, dtype=np.float32).reshape(36, 3)
    batches = train_dataset(splits.train, image_size=16, classes_per_batch=3,
                            images_per_class=2, augmentation=AUGMENTATIONS["none"], seed=4,
                            views=2)
    feature_batches = feature_train_dataset(fake_features, splits.train.labels,
                                            classes_per_batch=3, images_per_class=2, seed=4,
                                            views=2)
    for (pixels, labels), (rows, row_labels) in zip(batches.take(3), feature_batches.take(3)):
        # The feature rows name the images of the batch: the same pixels, labels and views.
        indices = (rows.numpy()[:, 0] / 3).astype(int)
        np.testing.assert_array_equal(pixels.numpy(), images[indices])
        np.testing.assert_array_equal(labels.numpy(), row_labels.numpy())
        np.testing.assert_array_equal(indices[0::2], indices[1::2])  # two identical views


def test_worker_shards_of_feature_batches_concatenate_to_the_global_batch():
    features = np.arange(40 * 2, dtype=np.float32).reshape(40, 2)
    labels = np.repeat(np.arange(10), 4)
    whole = feature_train_dataset(features, labels, classes_per_batch=4, images_per_class=2,
                                  seed=1, start_step=5)
    shards = [feature_train_dataset(features, labels, classes_per_batch=4, images_per_class=2,
                                    seed=1, start_step=5, num_shards=2, shard_index=i)
              for i in range(2)]
    for (rows, row_labels), *parts in zip(whole.take(3), *(s.take(3) for s in shards)):
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), rows)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), row_labels)
        np.testing.assert_array_equal(labels[(rows.numpy()[:, 0] / 2).astype(int)], row_labels)


def test_head_on_cached_features_equals_head_trained_on_the_fly(glyph_folder, tmp_path):
    config = _config(glyph_folder, tmp_path / "frozen", epochs=2)
    train(config)
    trained = keras.saving.load_model(str(tmp_path / "frozen" / "embedder.keras"))

    # The same model trained on images, with augmentation off and a non-trainable backbone.
    resolved = dataclasses.replace(config.resolved("glyph"), augmentation="none")
    splits = load_dataset(config.dataset)
    method = get_method("proxy_anchor")
    keras.utils.set_random_seed(config.seed)
    embedder = build_embedder("conv4", "pooling", 8, 16, "none", freeze_batchnorm=False)
    embedder.get_layer("backbone").trainable = False
    objective = method.build(embedder, splits.train.num_classes, resolved)
    model = objective.model
    model.compile(optimizer=GroupedAdamW(objective.learning_rate_multipliers, learning_rate=1e-2,
                                         weight_decay=resolved.weight_decay),
                  loss=objective.loss, jit_compile=False)
    data = train_dataset(splits.train, image_size=16, classes_per_batch=3, images_per_class=2,
                         augmentation=AUGMENTATIONS["none"], seed=config.seed)
    model.fit(data, epochs=2, steps_per_epoch=6, shuffle=False, verbose=0)

    for name in ("head", "backbone"):
        expected = embedder.get_layer(name).get_weights()
        got = trained.get_layer(name).get_weights()
        assert len(got) == len(expected) > 0
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The head did train (a step of lr 1e-2 moves it).
    keras.utils.set_random_seed(config.seed)
    initial = build_embedder("conv4", "pooling", 8, 16, "none").get_layer("head").get_weights()
    assert np.abs(trained.get_layer("head").get_weights()[0] - initial[0]).max() > 1e-3


def test_checkpoints_hold_no_backbone_and_the_embedder_is_backbone_then_head(glyph_folder,
                                                                             tmp_path):
    config = _config(glyph_folder, tmp_path)
    history = train(config)
    checkpoint = latest_checkpoint(str(tmp_path / "checkpoints"))
    stored = _checkpoint_paths(checkpoint)
    embedder = keras.saving.load_model(str(tmp_path / "embedder.keras"))
    backbone_shapes = {tuple(w.shape) for w in embedder.get_layer("backbone").weights}
    head_shapes = [tuple(w.shape) for w in embedder.get_layer("head").weights]
    assert not any("backbone" in name or "conv" in name or "bn" in name for name, _ in stored)
    assert not any(tuple(shape) in backbone_shapes for _, shape in stored)
    # What trains: the head's kernel and bias, the 6 proxies, and their Adam moments.
    shapes = [tuple(shape) for _, shape in stored]
    assert head_shapes == [(64, 8), (8,)]
    assert shapes.count((64, 8)) == 3 and shapes.count((6, 8)) == 3
    state = json.load(open(os.path.join(checkpoint, "state.json")))
    extractor, head_model = split_embedder(embedder)
    assert state["backbone_fingerprint"] == frozen.backbone_fingerprint(extractor)

    # embedder.keras maps images to backbone -> head, and reproduces the final metrics.
    splits = load_dataset(config.dataset)
    images = np.concatenate([x for x, _ in eval_dataset(splits.test, image_size=16)])
    cached = np.load(next((tmp_path / "features").glob("test-*.npy")))
    np.testing.assert_allclose(extractor.predict(images, verbose=0), cached, atol=1e-5)
    np.testing.assert_allclose(embedder.predict(images, verbose=0),
                               head_model.predict(cached, verbose=0), atol=1e-5)
    from kdml.evaluation import retrieval_metrics

    again = retrieval_metrics(embedder.predict(images, verbose=0), splits.test.labels, ks=(1, 2))
    for key, value in history["final"].items():
        assert again[key] == pytest.approx(value, abs=1e-6), key


def test_a_killed_frozen_run_resumes_mid_epoch_to_the_same_head(glyph_folder, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(_config(glyph_folder, whole, epochs=2, checkpoint_every_steps=4, keep_checkpoints=10))
    # Killed after step 4 of 6-step epochs: only that checkpoint and the feature cache remain.
    os.makedirs(killed / "checkpoints")
    shutil.copytree(whole / "checkpoints" / "ckpt-4", killed / "checkpoints" / "ckpt-4")
    shutil.copytree(whole / "features", killed / "features")
    train(_config(glyph_folder, killed, epochs=2, resume=True, checkpoint_every_steps=4))
    a = keras.saving.load_model(str(whole / "embedder.keras")).get_layer("head").get_weights()
    b = keras.saving.load_model(str(killed / "embedder.keras")).get_layer("head").get_weights()
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_resume_on_another_backbone_is_refused(glyph_folder, tmp_path):
    train(_config(glyph_folder, tmp_path))
    # Another seed initialises another conv4 (without metrics.json, which would refuse
    # the other --seed first): the checkpoint's head belongs to other features.
    os.remove(tmp_path / "metrics.json")
    with pytest.raises(ValueError, match="another backbone"):
        train(_config(glyph_folder, tmp_path, resume=True, epochs=2, seed=1))


@pytest.mark.parametrize("method, overrides", [
    ("crt", dict(backbone="conv4_stride4", crt_prototypes=4, crt_aux_prototypes=(2,),
                 crt_aux_dims=(4,))),
    ("pddm", dict(pddm_hidden_dim=8)),
    ("subcenter_arcface", dict(sub_centers=2)),
    ("supcon", dict()),
    ("multi_similarity", dict(xbm_size=12)),
    ("proxy_anchor", dict(mixed_precision=True)),
])
def test_every_kind_of_method_trains_on_cached_features(glyph_folder, tmp_path, method, overrides):
    history = train(_config(glyph_folder, tmp_path, method=method, **overrides))
    assert np.isfinite(history["epochs"]["1"]["loss"])
    stored = _checkpoint_paths(latest_checkpoint(str(tmp_path / "checkpoints")))
    assert not any("conv" in name or "bn" in name for name, _ in stored)
    embedder = keras.saving.load_model(str(tmp_path / "embedder.keras"))
    assert embedder.input_shape == (None, 16, 16, 3) and embedder.output_shape == (None, 8)


@pytest.mark.parametrize("overrides, message", [
    (dict(augmentation="glyph"), "--augmentation=none"),
    (dict(warmup_epochs=1), "--warmup_epochs=0"),
    (dict(method="ntxent", views=2), "--ntxent_positives=class"),
])
def test_settings_that_contradict_a_frozen_backbone_are_refused(glyph_folder, tmp_path,
                                                                overrides, message):
    with pytest.raises(ValueError, match=message):
        train(_config(glyph_folder, tmp_path, **overrides))


@pytest.mark.slow
def test_command_line_run_with_a_frozen_backbone(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-m", "kdml.train", "--freeze_backbone", "--dataset=synthetic",
         "--image_size=16", "--embedding_dim=8", "--epochs=1", "--classes_per_batch=50",
         "--images_per_class=4", "--verbose=0", "--recall_ks=1", f"--output_dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "augmentation off" in result.stdout and "computed in" in result.stdout
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["config"]["freeze_backbone"] is True
    assert metrics["config"]["augmentation"] == "none"
    assert metrics["final"]["recall@1"] > 0
    embedder = keras.saving.load_model(str(tmp_path / "embedder.keras"))
    assert embedder.input_shape == (None, 16, 16, 3)
    bad = subprocess.run(
        [sys.executable, "-m", "kdml.train", "--freeze_backbone", "--augmentation=glyph",
         f"--output_dir={tmp_path / 'bad'}"], capture_output=True, text=True, env=env,
        timeout=120, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: --freeze_backbone") and "Traceback" not in bad.stderr
