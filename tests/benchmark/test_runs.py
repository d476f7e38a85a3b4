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


def _other(value, field=None):
    choices = field.metadata.get("choices") if field is not None else None
    if choices:
        return next(c for c in choices if c != value)
    if field is not None and field.name == "backbone":  # must name a real backbone
        return "conv4" if value != "conv4" else "resnet50"
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
        if value is None:  # resolved from the data kind: set it to something else than that
            value = getattr(TrainConfig(method="proxy_anchor").resolved("photo"), field.name)
        changed = _spec(**{field.name: _other(value, field)})
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


def test_the_key_follows_the_code_and_the_resolved_defaults(tmp_path, monkeypatch):
    import shutil

    import kdml
    from kdml import config as config_module
    from kdml.benchmark import runs

    package = tmp_path / "kdml"
    shutil.copytree(os.path.dirname(kdml.__file__), package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = runs.code_fingerprint(str(package))
    assert before == runs.code_fingerprint(os.path.dirname(kdml.__file__))
    (package / "benchmark" / "report.py").write_text("# the report does not train\n")
    assert runs.code_fingerprint(str(package)) == before
    loss = package / "losses" / "proxy_anchor.py"
    loss.write_text(loss.read_text() + "\n# a changed code path\n")
    runs.code_fingerprint.cache_clear()
    after = runs.code_fingerprint(str(package))
    assert after != before
    spec = _spec(data_kind="glyph")
    assert dataclasses.replace(spec, code=after).key != spec.key
    # a changed default changes the resolved configuration, hence the key
    key = spec.key
    monkeypatch.setitem(config_module.KIND_DEFAULTS, "glyph",
                        {**config_module.KIND_DEFAULTS["glyph"], "lr": 5e-4})
    assert spec.resolved["lr"] == 5e-4 and spec.key != key


def test_a_cached_run_of_another_configuration_or_code_is_refused(tmp_path):
    import json

    from kdml.benchmark.runs import StaleRunError, cached_result, write_json_atomic

    spec = _spec(data_kind="glyph", alpha=32.0)
    path = spec.result_path(str(tmp_path))
    stored = {**spec.to_json(), "metrics": {"recall@1": 0.5}, "resolved_config": spec.resolved}
    write_json_atomic(path, stored)
    assert cached_result(spec, str(tmp_path))["metrics"] == {"recall@1": 0.5}
    write_json_atomic(path, {**stored, "resolved_config": {**spec.resolved, "margin": 0.2}})
    with pytest.raises(StaleRunError, match="resolved_config field 'margin' is 0.2 in the cached "
                                            "run, 0.1 in what the protocol runs now"):
        cached_result(spec, str(tmp_path))
    write_json_atomic(path, {**stored, "code": "0123456789ab"})
    with pytest.raises(StaleRunError, match="ran kdml code '0123456789ab'"):
        cached_result(spec, str(tmp_path))
    assert json.load(open(path))["code"] == "0123456789ab"  # refused, never overwritten


@pytest.mark.slow
def test_a_trial_logs_its_validation_curve_and_trains_the_fixed_steps(tmp_path):
    """A trial evaluates after every epoch (the budget rule's curve) and trains
    epochs x steps_per_epoch steps whatever its split's size."""
    import json

    import kdml  # noqa: F401
    from kdml.benchmark.runs import train_and_evaluate

    train_dir = write_glyph_folder(tmp_path / "train", num_classes=6, images_per_class=4,
                                   class_dir=lambda c: f"a{c // 3}/c{c}")
    val_dir = write_glyph_folder(tmp_path / "val", num_classes=4, images_per_class=3, seed=3,
                                 class_dir=lambda c: f"v/c{c}")
    spec = RunSpec("pa", "trial", 0, {"method": "proxy_anchor", "data_kind": "glyph", "epochs": 2,
                                      "steps_per_epoch": 5, "classes_per_batch": 3,
                                      "images_per_class": 2, "embedding_dim": 8, "image_size": 16,
                                      "seed": 0}, "train", "validation", "x", "y")
    result = train_and_evaluate(spec, train_dir, val_dir, str(tmp_path / "run"))
    assert sorted(result["curve"]) == ["1", "2"] and sorted(result["loss_curve"]) == ["1", "2"]
    assert result["curve"]["2"] == pytest.approx(result["metrics"]["recall@1"])
    history = json.load(open(tmp_path / "run" / "metrics.json"))
    assert {e: h["recall@1"] for e, h in history["epochs"].items()} == result["curve"]
    # 2 epochs x 5 steps, not 2 x ceil(24 images / 6)
    steps = [int(n.split("-")[1]) for n in os.listdir(tmp_path / "run" / "checkpoints")]
    assert max(steps) == 10
    assert result["resolved_config"]["steps_per_epoch"] == 5


def test_the_key_holds_the_library_versions_and_files_fingerprint_like_the_checkout():
    import kdml
    from kdml.benchmark.runs import (code_fingerprint, fingerprint_sources, library_versions,
                                     package_sources)

    spec = _spec()
    assert spec.versions == library_versions() and set(spec.versions) == {"tensorflow", "keras", "numpy"}
    assert dataclasses.replace(spec, versions={**spec.versions, "numpy": "1.0"}).key != spec.key
    assert spec.to_json()["versions"] == spec.versions
    sources = package_sources(os.path.dirname(kdml.__file__))
    assert fingerprint_sources(sources) == code_fingerprint()
    # the run functions are part of it; the rest of kdml/benchmark is not
    runs_text = sources["benchmark/runs.py"].decode()
    changed = runs_text.replace("def embed_folder(", "def embed_folder(  ", 1)
    assert fingerprint_sources({**sources, "benchmark/runs.py": changed.encode()}) != code_fingerprint()
    assert fingerprint_sources({**sources, "benchmark/report.py": b"#"}) == code_fingerprint()


def test_a_cached_run_without_resolved_config_or_of_other_libraries_is_refused(tmp_path):
    from kdml.benchmark.runs import StaleRunError, cached_result, write_json_atomic

    spec = _spec(data_kind="glyph")
    path = spec.result_path(str(tmp_path))
    write_json_atomic(path, {**spec.to_json(), "metrics": {"recall@1": 0.5}})
    with pytest.raises(StaleRunError, match="stores no resolved_config"):
        cached_result(spec, str(tmp_path))
    write_json_atomic(path, {**spec.to_json(), "metrics": {"recall@1": 0.5},
                             "resolved_config": spec.resolved,
                             "versions": {**spec.versions, "tensorflow": "2.0.0"}})
    with pytest.raises(StaleRunError, match="'tensorflow': '2.0.0'"):
        cached_result(spec, str(tmp_path))


def test_a_run_process_that_fails_leaves_its_error_for_the_failure_record(tmp_path):
    import json

    from kdml.benchmark.runs import StaleRunError, run_request_file, write_json_atomic

    spec = dataclasses.replace(_spec(data_kind="glyph"), code="0123456789ab")  # keyed by other code
    request = tmp_path / "request.json"
    write_json_atomic(str(request), {"spec": spec.to_json(), "train_dir": "x", "eval_dir": "y",
                                     "output_dir": str(tmp_path / "run")})
    with pytest.raises(StaleRunError):
        run_request_file(str(request))
    failure = json.load(open(tmp_path / "failure.json"))
    assert failure["error"].startswith("StaleRunError: The kdml sources changed after the "
                                       "benchmark keyed this run") and failure["step"] is None
    assert not (tmp_path / "result.json").exists()
