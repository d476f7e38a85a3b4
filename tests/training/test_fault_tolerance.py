"""Runs that die or diverge: SIGKILL mid-epoch and --resume, a kill during a
checkpoint write, a NaN loss, and data that cannot fill a batch."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import kdml  # noqa: F401
from kdml.config import TrainConfig
from kdml.data.sampler import class_balanced_batches
from kdml.data.sources import load_dataset
from kdml.data.sources.synthetic import glyphs
from kdml.methods import METHODS, get_method
from kdml.models import build_embedder
from kdml.optimizers import GroupedAdamW
from kdml.training import list_checkpoints, train
from kdml.training.callbacks import NonFiniteLossError
from kdml.training.checkpointing import (latest_checkpoint, restore_checkpoint,
                                         save_checkpoint)
from tests.helpers import write_glyph_folder

KILL_TIMEOUT_S = 400  # killed by then at the latest (~15 s on an idle 2-core machine)


@pytest.fixture(scope="module")
def glyph_folder(tmp_path_factory):
    """12 classes x 6 glyph PNGs: 6 train classes, 36 images, 6 steps of 3 x 2."""
    return write_glyph_folder(tmp_path_factory.mktemp("ft_glyphs"))


def _flags(folder, out, *extra):
    return [f"--dataset=folder:{folder}", f"--output_dir={out}", "--backbone=conv4",
            "--weights=none", "--image_size=16", "--embedding_dim=16", "--augmentation=glyph",
            "--classes_per_batch=3", "--images_per_class=2", "--epochs=2", "--lr=0.001",
            "--warmup_epochs=0", "--jit_compile=false", "--verbose=0", "--recall_ks=1,2",
            "--checkpoint_every_steps=2", "--keep_checkpoints=10", "--noverify_images", *extra]


def _config_of(flags) -> TrainConfig:
    """The TrainConfig `python -m kdml.train <flags>` runs."""
    from kdml.train import FLAGS, config_from_flags

    FLAGS(["kdml.train", *flags])
    try:
        return config_from_flags()
    finally:
        FLAGS.unparse_flags()


def _fresh_model(config: TrainConfig):
    config = config.resolved("photo")
    method = get_method(config.method)
    head, options = method.head(config)
    embedder = build_embedder(config.backbone, head, config.embedding_dim, config.image_size,
                              config.weights, freeze_batchnorm=config.freeze_batchnorm,
                              head_options=options)
    objective = method.build(embedder, 6, config)
    objective.model.compile(optimizer=GroupedAdamW(objective.learning_rate_multipliers,
                                                   learning_rate=1e-3), loss="mse")
    return objective.model


def _assert_every_checkpoint_loads(directory, config):
    checkpoints = list_checkpoints(directory)
    assert checkpoints
    for step, path in checkpoints:
        model = _fresh_model(config)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Keras only warns when it skips optimizer state
            assert restore_checkpoint(model, path)["step"] == step
        assert all(np.isfinite(w.numpy()).all() for w in model.weights)


@pytest.mark.large
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(glyph_folder, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen([sys.executable, "-m", "kdml.train", *_flags(glyph_folder, killed)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, step = time.monotonic() + KILL_TIMEOUT_S, None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            steps = [s for s, _ in list_checkpoints(str(killed / "checkpoints"))]
            if steps and steps[-1] % 6:  # a step checkpoint inside an epoch (6 steps)
                step = steps[-1]
                break
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
    assert step is not None, f"no mid-epoch checkpoint before the kill: {stderr[-2000:]}"
    assert not (killed / "embedder.keras").exists()  # it really died mid-run
    # The kill may also have hit a later checkpoint write: the newest complete one
    # is where the run goes on from, whatever it is.
    survivors = [s for s, _ in list_checkpoints(str(killed / "checkpoints"))]
    assert survivors and survivors[-1] < 12

    # A write killed half-way: a temporary directory with a truncated weights file.
    partial = killed / "checkpoints" / f".tmp-ckpt-{survivors[-1] + 1}-99999"
    partial.mkdir()
    weights = open(killed / "checkpoints" / f"ckpt-{survivors[0]}" / "model.weights.h5", "rb").read()
    (partial / "model.weights.h5").write_bytes(weights[: len(weights) // 3])

    resumed = train(_config_of(_flags(glyph_folder, killed, "--resume")))
    assert not partial.exists()  # cleaned up, never taken for a checkpoint
    reference = train(_config_of(_flags(glyph_folder, whole)))
    assert set(resumed["epochs"]) == set(reference["epochs"]) == {"1", "2"}
    for epoch in ("1", "2"):
        for key in ("loss", "recall@1", "recall@2", "map@r"):
            assert resumed["epochs"][epoch][key] == pytest.approx(
                reference["epochs"][epoch][key], rel=1e-4, abs=1e-4), (epoch, key)
    for key, value in reference["final"].items():
        assert resumed["final"][key] == pytest.approx(value, abs=1e-4), key
    _assert_every_checkpoint_loads(str(killed / "checkpoints"), _config_of(_flags(glyph_folder, killed)))


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = _fresh_model(_config_of(_flags("unused", tmp_path)))
    model.optimizer.build(model.trainable_variables)
    save_checkpoint(model, str(tmp_path), 4, {"epoch": 0})
    expected = [w.numpy() for w in model.weights]

    def dies_half_way(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89HDF\r\n\x1a\n partial")
        raise KeyboardInterrupt("killed")

    for w in model.weights:
        w.assign(w.numpy() + 1.0)
    monkeypatch.setattr(model, "save_weights", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, str(tmp_path), 6, {"epoch": 1})
    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-4")
    fresh = _fresh_model(_config_of(_flags("unused", tmp_path)))
    assert restore_checkpoint(fresh, latest_checkpoint(str(tmp_path)))["step"] == 4
    for a, b in zip(expected, fresh.weights):
        np.testing.assert_array_equal(a, b.numpy())


class _PoisonProxies(keras.callbacks.Callback):
    """Turns the proxies into NaN before the 4th batch (global step 3)."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.batches == 3:
            proxies = self.model.get_layer("proxies").weights[0]
            proxies.assign(np.full(proxies.shape, np.nan, np.float32))
        self.batches += 1


def test_nan_loss_stops_with_step_and_batch_named_and_no_bad_checkpoint(
        glyph_folder, tmp_path, monkeypatch):
    base = METHODS["proxy_anchor"]

    def build(embedder, num_classes, config):
        objective = base.build(embedder, num_classes, config)
        objective.callbacks.append(_PoisonProxies())
        return objective

    monkeypatch.setitem(METHODS, "proxy_anchor", dataclasses.replace(base, build=build))
    config = _config_of(_flags(glyph_folder, tmp_path))
    with pytest.raises(NonFiniteLossError) as error:
        train(config)
    message = str(error.value)
    assert "epoch 1, global step 3 (batch 4" in message
    # The batch is named by its classes, computed here independently from the sampler.
    splits = load_dataset(f"folder:{glyph_folder}", verify_images=False)
    indices = next(iter(class_balanced_batches(splits.train.labels, 3, 2, seed=0,
                                               start_step=3))).numpy()
    for c in set(splits.train.labels[indices]):
        assert repr(splits.train.class_names[c]) in message
    assert "ckpt-2" in message and "--lr" in message
    # Checkpoints after steps 2 only: none from the diverged state (step 4).
    assert [s for s, _ in list_checkpoints(str(tmp_path / "checkpoints"))] == [2]
    _assert_every_checkpoint_loads(str(tmp_path / "checkpoints"), config)
    assert json.load(open(tmp_path / "metrics.json"))["epochs"] == {}


def test_data_that_cannot_fill_a_batch_fails_before_training(glyph_folder, tmp_path):
    with pytest.raises(ValueError, match="Lower --classes_per_batch to at most 6"):
        train(_config_of(_flags(glyph_folder, tmp_path, "--classes_per_batch=7")))
    one_class = tmp_path / "one_class"
    for i, pixels in enumerate(glyphs(num_classes=2, images_per_class=3, image_size=20).pixels):
        folder = one_class / ("a" if i < 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(pixels))
    (one_class / "b" / "3.png").write_bytes(b"")  # zero-byte and truncated: "b" keeps one
    # readable image, too few for a positive pair, so one usable class is left
    (one_class / "b" / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="1 usable class"):
        train(_config_of(_flags(str(one_class), tmp_path / "out", "--verify_images")))
    assert not (tmp_path / "out").exists()
