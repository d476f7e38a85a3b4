"""kdml.benchmark.runs: the cache key, and one real (tiny) run against recomputed metrics."""

import dataclasses
import os

import numpy as np
import pytest

from kdml.benchmark.runs import _NOT_IN_KEY, RunSpec
from kdml.config import TrainConfig
from tests.helpers import write_glyph_folder


def _spec(**config):
    return RunSpec("row", "trial", 0, {"method": "proxy_anchor", **config}, "train", "validation",
                   "aaa", "bbb")


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, tuple):
        return value + (7,)
    return f"{value}_other"


def test_the_key_changes_with_every_training_setting():
    base = _spec()
    defaults = TrainConfig()
    checked = 0
    for field in dataclasses.fields(TrainConfig):
        value = getattr(defaults, field.name)
        changed = _spec(**{field.name: _other(value if value is not None else 1)})
        if field.name in _NOT_IN_KEY:  # where the run lives, not what it is
            assert changed.key == base.key, field.name
        else:
            assert changed.key != base.key, field.name
            checked += 1
    assert checked > 30
    assert _spec(alpha=32.0).key != _spec(alpha=16.0).key


def test_the_key_changes_with_the_splits_the_stage_and_the_evaluation():
    base = _spec()
    assert dataclasses.replace(base, train_fingerprint="ccc").key != base.key
    assert dataclasses.replace(base, eval_fingerprint="ccc").key != base.key
    assert dataclasses.replace(base, eval_split="test").key != base.key
    assert dataclasses.replace(base, one_shot={"n_way": 5, "episodes": 10}).key != base.key
    assert dataclasses.replace(base, method="other_row").key == base.key  # same run, other row
    assert _spec(crt_aux_dims=(128,)).key == _spec(crt_aux_dims=[128]).key  # JSON round trip
    path = base.result_path("results")
    assert path == os.path.join("results", "runs", "row", f"trial-0-{base.key}.json")


def test_a_tiny_run_reports_the_metrics_of_its_saved_embedder(tmp_path):
    import keras

    import kdml  # noqa: F401
    from kdml.benchmark.runs import train_and_evaluate
    from kdml.data.pipeline import eval_dataset
    from kdml.data.sources.folder import load_folder
    from kdml.evaluation import few_shot_accuracy, retrieval_metrics

    train_dir = write_glyph_folder(tmp_path / "train", num_classes=8, images_per_class=4,
                                   class_dir=lambda c: f"a{c // 4}/c{c}")
    test_dir = write_glyph_folder(tmp_path / "test", num_classes=8, images_per_class=4, seed=9,
                                  class_dir=lambda c: f"b{c // 4}/c{c}")
    spec = RunSpec("pa", "final", 0, {"method": "proxy_anchor", "data_kind": "glyph", "epochs": 1,
                                      "classes_per_batch": 4, "images_per_class": 2,
                                      "embedding_dim": 16, "image_size": 16, "seed": 0},
                   "train+validation", "test", "x", "y", {"n_way": 3, "episodes": 20})
    result = train_and_evaluate(spec, train_dir, test_dir, str(tmp_path / "run"))

    test = load_folder(test_dir, verify_images=False)
    embedder = keras.saving.load_model(str(tmp_path / "run" / "embedder.keras"))
    embeddings = embedder.predict(eval_dataset(test, image_size=16).map(lambda x, y: x), verbose=0)
    expected = retrieval_metrics(embeddings, test.labels, ks=(1,), nmi=False)
    for k in ("recall@1", "map@r", "r_precision"):
        assert result["metrics"][k] == pytest.approx(expected[k], abs=1e-6)
    groups = np.array([test.class_names[c].split("/")[0] for c in test.labels])
    shot = few_shot_accuracy(embeddings, test.labels, n_way=3, num_episodes=20, groups=groups, seed=0)
    assert result["metrics"]["one_shot"] == pytest.approx(shot["accuracy"])
    assert result["one_shot_groups"] == ["b0", "b1"]
