"""`--strategy=multi_worker`: two worker processes on 127.0.0.1 train one model.

Slow by nature (two extra TensorFlow processes): one test, bounded by a timeout
after which both workers are killed.
"""

import json
import os

import keras
import numpy as np
import pytest

import kdml  # noqa: F401
from kdml.config import TrainConfig
from kdml.training import train
from tests.helpers import run_local_workers, write_glyph_folder

# Both workers are killed after this. The job itself needs ~40 s of CPU (two
# TensorFlow start-ups included, ~45 s wall on an idle 2-core machine); the bound
# leaves room for a machine shared with other jobs.
TIMEOUT_S = 300

# Each worker runs the real `kdml.training.train`; the copy of the trained
# embedder that only this test needs (the non-chief's own files are deleted).
_WORKER = """
import json, sys
import kdml
from kdml.config import TrainConfig
from kdml.training import run
config, copy = json.loads(sys.argv[1]), sys.argv[2]
save = run.save_model_atomic
def save_and_copy(model, path):
    save(model, path)
    model.save(copy)
run.save_model_atomic = save_and_copy
config["recall_ks"] = tuple(config["recall_ks"])
run.train(TrainConfig(**config))
"""


@pytest.fixture(scope="module")
def glyph_folder(tmp_path_factory):
    """12 classes x 6 glyphs (6 train classes, 36 images: 5 steps of 4 x 2 per epoch)."""
    return write_glyph_folder(tmp_path_factory.mktemp("mw_glyphs"))


def _config(folder, out, **overrides):
    return dict(dataset=f"folder:{folder}", output_dir=str(out), backbone="conv4",
                weights="none", image_size=16, embedding_dim=16, augmentation="glyph",
                classes_per_batch=4, images_per_class=2, epochs=2, lr=1e-3,
                jit_compile="false", verbose=0, recall_ks=(1,), checkpoint_every_steps=3,
                eval_every=2, verify_images=False,
                **overrides)


def _weights(path):
    return [w.numpy() for w in keras.saving.load_model(path).weights]


@pytest.mark.large
def test_two_workers_end_bit_identical_and_match_one_process_to_a_tolerance(glyph_folder, tmp_path):
    """Worker vs worker: bit-identical weights (both apply the same all-reduced
    gradient to the same variables). Worker vs one process on the same global
    batches: equal up to float rounding, losses to rtol 1e-4 and weights to atol
    1e-3 after 10 steps, since the all-reduce adds the two workers' partial
    gradients in another order than one process sums its batch."""
    out = tmp_path / "mw"
    config = json.dumps(_config(glyph_folder, out, strategy="multi_worker"))
    run_local_workers(lambda i: ["-c", _WORKER, config, str(tmp_path / f"w{i}.keras")],
                      timeout_s=TIMEOUT_S)

    # Only the chief wrote the run's files; both workers hold bit-identical weights.
    assert sorted(os.listdir(out)) == ["checkpoints", "embedder.keras", "logs", "metrics.json"]
    chief, other = _weights(str(tmp_path / "w0.keras")), _weights(str(tmp_path / "w1.keras"))
    for a, b in zip(chief, other):
        np.testing.assert_array_equal(a, b)
    metrics = json.load(open(out / "metrics.json"))
    losses = [metrics["epochs"][e]["loss"] for e in ("1", "2")]
    assert losses[1] < losses[0]  # training converges

    # The two workers' rows form the single process's global batch: the same run in
    # one process reaches the same losses and weights to a tolerance, not bit for bit
    # (float sums in another order: the all-reduce of two partial gradients).
    config = _config(glyph_folder, tmp_path / "single")
    single = train(TrainConfig(**config))
    np.testing.assert_allclose(losses, [single["epochs"][e]["loss"] for e in ("1", "2")],
                               rtol=1e-4)
    for a, b in zip(chief, _weights(str(tmp_path / "single" / "embedder.keras"))):
        np.testing.assert_allclose(a, b, atol=1e-3)
