"""The re-ranking row: depth chosen on validation only, cached beside the run, reported."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from kdml.benchmark.protocol import (RERANK_FIELD, BenchmarkSpec, MethodPreset, run_benchmark,
                                     select_depth)
from kdml.benchmark.report import write_report
from kdml.benchmark.splits import group_split
from tests.benchmark.stand_in import stand_in

DEPTHS = (1, 2, 4, 8)
SPEC = BenchmarkSpec(
    budget={"backbone": "conv4", "epochs": 2},
    methods={"cos": MethodPreset({"method": "pddm", "pddm_mining_score": "cosine"},
                                 {"pddm_alpha": (0.5, 1.0, 2.0)}),
             "pddm": MethodPreset({"method": "pddm"}, {"pddm_alpha": (0.5, 1.0, 2.0)},
                                  bases=("cos",), rerank_depths=DEPTHS)},
    trials=3, seeds=(0, 1, 2, 3))
PLAIN = {0: 0.60, 1: 0.62, 2: 0.58, 3: 0.61}  # the embedding's test Recall@1 per seed
# Validation peaks at depth 4, test at depth 8: choosing on test would pick 8.
VALIDATION_GAIN = {1: 0.0, 2: 0.01, 4: 0.03, 8: 0.02}
TEST_GAIN = {0: {1: 0.0, 2: 0.01, 4: 0.020, 8: 0.05}, 1: {1: 0.0, 2: 0.00, 4: 0.010, 8: 0.04},
             2: {1: 0.0, 2: 0.02, 4: 0.025, 8: 0.03}, 3: {1: 0.0, 2: 0.01, 4: 0.030, 8: 0.06}}


def _trial_recall(spec):
    return 0.7 + 0.01 * spec.config["pddm_alpha"]  # best: the trial of alpha = 2


def _best():
    """The index of the trial with pddm_alpha = 2 (trial 0 is the default, 0.5)."""
    from kdml.benchmark.protocol import row_trials

    return [t["pddm_alpha"] for t in row_trials(SPEC, "pddm")].index(2.0)


@stand_in
def _execute(spec, train_dir, eval_dir):
    if spec.stage.startswith("trial"):
        r1 = _trial_recall(spec) - (0.005 if spec.stage.endswith("_retrained") else 0.0)
    else:
        r1 = PLAIN[spec.config["seed"]] - (0.02 if spec.method == "cos" else 0.0)
    return {"metrics": {"recall@1": r1, "map@r": r1 / 2, "r_precision": r1 / 1.5},
            "wall_s": 10.0}


class FakeReranker:
    """Curves keyed by split; records every call; `missing` stages have no saved models."""

    def __init__(self, results_dir, missing=(), spy=True):
        self.results_dir, self.missing, self.calls, self.spy = results_dir, set(missing), [], spy

    def __call__(self, run_spec, result, eval_dir, depths):
        self.calls.append((run_spec.stage, run_spec.index, os.path.basename(eval_dir),
                           run_spec.key))
        if run_spec.stage in self.missing:
            return None
        if os.path.basename(eval_dir) == "test" and self.spy:
            # The spy: test scores are produced only once the depth is on disk.
            with open(os.path.join(self.results_dir, "selection.json")) as f:
                assert json.load(f)["methods"]["pddm"]["rerank"]["top_k"] == 4
            gain = TEST_GAIN[run_spec.index]
        else:
            gain = VALIDATION_GAIN
        r1 = result["metrics"]["recall@1"]
        return {RERANK_FIELD: {str(d): r1 + gain[d] for d in depths}}


def _run(tmp_path, rerank, events=None, execute=_execute):
    def load_split(name):
        if events is not None:
            events.append(("load", name))
        return str(tmp_path / name)

    lines = []
    results = run_benchmark(SPEC, _split(), load_split, execute, str(tmp_path / "r"),
                            progress=lines.append, rerank=rerank)
    return results, lines


def _split():
    return group_split([f"g{g}/c{c}" for g in range(5) for c in range(2)], seed=0)


def _json(tmp_path):
    runs = tmp_path / "r" / "runs" / "pddm"
    return {p: json.loads((runs / p).read_text()) for p in sorted(os.listdir(runs))}


def test_the_depth_is_chosen_on_validation_before_any_test_scores(tmp_path):
    events = []
    rerank = FakeReranker(str(tmp_path / "r"))

    def spy(run_spec, result, eval_dir, depths):
        events.append(("rerank", os.path.basename(eval_dir)))
        return rerank(run_spec, result, eval_dir, depths)

    results, lines = _run(tmp_path, spy, events)
    assert results["selection"]["pddm"]["trial"] == _best()
    assert results["selection"]["pddm"]["rerank"]["top_k"] == 4  # not test's 8
    assert results["selection"]["pddm"]["rerank_depths"] == list(DEPTHS)
    assert "rerank" not in results["selection"]["cos"]
    # Only the chosen trial is re-ranked on validation, then test is loaded, then finals.
    assert [c[:3] for c in rerank.calls] == [("trial", _best(), "validation")] + [
        ("final", s, "test") for s in SPEC.seeds]
    assert events.index(("rerank", "validation")) < events.index(("load", "test")) \
        < events.index(("rerank", "test"))
    assert "pddm: re-ranking top_k=4 chosen on validation (Recall@1 0.7500; without " \
           "re-ranking 0.7200)" in lines
    selection = json.loads((tmp_path / "r" / "selection.json").read_text())
    assert selection["methods"]["pddm"]["rerank"]["validation"]["4"] == pytest.approx(0.75)
    assert all(RERANK_FIELD in r for r in results["finals"]["pddm"])

    # Resuming re-ranks nothing: the scores are cached in the run files.
    def fail(*args):
        raise AssertionError("a cached run or re-ranking was executed again")

    again, _ = _run(tmp_path, fail, execute=fail)
    assert again["selection"] == results["selection"]


def test_ties_go_to_the_smallest_depth(tmp_path):
    assert select_depth({"1": 0.5, "2": 0.6, "4": 0.6, "8": 0.55}) == 2
    assert select_depth({8: 0.7, 1: 0.7, 16: 0.7}) == 1

    def flat(run_spec, result, eval_dir, depths):
        return {RERANK_FIELD: {str(d): 0.8 for d in depths}}

    results, _ = _run(tmp_path, flat)
    assert results["selection"]["pddm"]["rerank"]["top_k"] == 1
    write_report(str(tmp_path / "r"))
    assert "validation chose not to re-rank" in open(tmp_path / "r" / "results.md").read()


def test_a_run_without_saved_models_is_retrained_once_keeping_its_cached_metrics(tmp_path):
    _run(tmp_path, None)  # the runs exist, without re-ranking scores (older benchmark)
    before = _json(tmp_path)
    assert not any(RERANK_FIELD in r for r in before.values())
    executed = []

    @stand_in
    def execute(spec, train_dir, eval_dir):
        executed.append((spec.stage, spec.index, spec.key, os.path.basename(eval_dir)))
        return _execute(spec, train_dir, eval_dir)

    rerank = FakeReranker(str(tmp_path / "r"), missing={"trial"})
    results, lines = _run(tmp_path, rerank, execute=execute)
    best = _best()
    chosen_key = before[f"trial-{best}-{results['selection']['pddm']['trials'][best]['key']}.json"]["key"]
    assert executed == [("trial_retrained", best, chosen_key, "validation")]
    assert [c[:3] for c in rerank.calls[:2]] == [("trial", best, "validation"),
                                                 ("trial_retrained", best, "validation")]
    after = _json(tmp_path)
    assert sorted(after) == sorted(before)  # same files: the cache key is unchanged
    trial = after[f"trial-{best}-{chosen_key}.json"]
    assert trial["key"] == chosen_key and trial["metrics"] == before[f"trial-{best}-{chosen_key}.json"]["metrics"]
    assert trial["rerank_from_retrained_run"] is True
    assert trial["rerank_retrained_recall@1"] == pytest.approx(0.715)
    # the retrained copy's curve: its own recall + the validation gain
    assert trial[RERANK_FIELD] == {str(d): pytest.approx(0.715 + VALIDATION_GAIN[d]) for d in DEPTHS}
    assert results["selection"]["pddm"]["rerank"]["from_retrained_run"] is True
    assert any("retraining a copy of it for the re-ranking scores only" in line for line in lines)
    for name, run in after.items():  # every other field is as cached
        assert {k: v for k, v in run.items() if not k.startswith("rerank")} == before[name]
        assert (RERANK_FIELD in run) == (name.startswith("final") or name == f"trial-{best}-{chosen_key}.json")
    assert results["selection"]["pddm"]["validation"] == before[f"trial-{best}-{chosen_key}.json"]["metrics"]
    write_report(str(tmp_path / "r"))
    assert ("come from a retrained copy of that trial (its saved models were gone), whose own "
            "Recall@1 is 71.5 vs 72.0 cached" in open(tmp_path / "r" / "results.md").read())


def test_a_copy_that_still_lacks_the_models_fails_once_and_is_not_cached(tmp_path):
    executed = []

    @stand_in
    def execute(spec, train_dir, eval_dir):
        executed.append(spec.stage)
        return _execute(spec, train_dir, eval_dir)

    rerank = FakeReranker(str(tmp_path / "r"), missing={"trial", "trial_retrained"},
                           spy=False)
    results, lines = _run(tmp_path, rerank, execute=execute)
    assert executed.count("trial_retrained") == 1
    assert any("(chosen) re-ranking: FAILED, the retrained copy saved no" in line for line in lines)
    assert "rerank" not in results["selection"]["pddm"]
    assert not any(RERANK_FIELD in r for name, r in _json(tmp_path).items() if name.startswith("trial"))
    summary = write_report(str(tmp_path / "r"))
    assert "pddm_rerank (no re-ranking depth chosen yet)" in summary["missing_runs"]
    assert "pddm_rerank" not in summary["methods"]


def test_the_report_row_matches_numpy_and_scipy(tmp_path):
    _run(tmp_path, FakeReranker(str(tmp_path / "r")))
    summary = write_report(str(tmp_path / "r"))
    assert list(summary["methods"]) == ["cos", "pddm", "pddm_rerank"]
    row = summary["methods"]["pddm_rerank"]
    plain = np.array([PLAIN[s] for s in SPEC.seeds])
    reranked = plain + np.array([TEST_GAIN[s][4] for s in SPEC.seeds])
    low, high = stats.t.interval(0.95, 3, loc=reranked.mean(), scale=stats.sem(reranked))
    got = row["summary"]["recall@1"]
    assert (got["mean"], got["low"], got["high"]) == (
        pytest.approx(reranked.mean()), pytest.approx(low), pytest.approx(high))
    assert set(row["summary"]) == {"recall@1"} and row["params"] == {"top_k": 4}
    (comparison,) = [c for c in summary["comparisons"] if c["method"] == "pddm_rerank"]
    assert comparison["base"] == "pddm" and comparison["seeds"] == [0, 1, 2, 3]
    assert set(comparison["metrics"]) == {"recall@1"}
    d = comparison["metrics"]["recall@1"]
    assert d["mean"] == pytest.approx(np.mean(reranked - plain))
    assert d["t_p"] == pytest.approx(stats.ttest_rel(reranked, plain).pvalue)
    assert summary["missing_runs"] == []

    markdown = open(tmp_path / "r" / "results.md").read()
    assert (f"| top_k on validation | top_k=4 (75.0) | 4 | {100 * reranked.mean():.2f} ± "
            f"{100 * (high - reranked.mean()):.2f} |  |  |  |  |") in markdown
    assert f"| `pddm_rerank` − `pddm` | 4 | {100 * d['mean']:+.2f} [" in markdown
    assert "- `pddm_rerank`: PDDM unit re-ranks the top-k cosine neighbours (top_k chosen on " \
           "validation); Recall@1 only" in markdown
    assert "by top_k: 1: 72.0, 2: 73.0, 4: 75.0, 8: 74.0." in markdown
    saved = json.load(open(tmp_path / "r" / "results.json"))
    assert saved["methods"]["pddm_rerank"]["derived_from"] == "pddm"

    # A final run without scores is listed as missing, never filled in.
    key = json.load(open(tmp_path / "r" / "selection.json"))["methods"]["pddm"]["finals"]["3"]
    path = tmp_path / "r" / "runs" / "pddm" / f"final-3-{key}.json"
    run = json.loads(path.read_text())
    del run[RERANK_FIELD]
    path.write_text(json.dumps(run))
    summary = write_report(str(tmp_path / "r"))
    assert summary["missing_runs"] == ["pddm_rerank seed 3 (no re-ranking scores)"]
    assert summary["methods"]["pddm_rerank"]["seeds"] == [0, 1, 2]


# --- the real evaluation, on a tiny saved embedder + PDDM unit -----------------------


def test_rerank_evaluation_of_saved_models(tmp_path, monkeypatch):
    import keras

    import kdml  # noqa: F401
    from kdml.benchmark import runs
    from kdml.benchmark.runs import RunSpec, rerank_in_subprocess, run_folder
    from kdml.data.pipeline import eval_dataset
    from kdml.data.sources.folder import load_folder
    from kdml.evaluation import rerank_metrics, retrieval_metrics
    from kdml.evaluation.rerank import pair_scorer
    from kdml.layers.pddm import pddm_pair_model
    from tests.helpers import write_glyph_folder
    from tests.layers.test_pddm import _randomised_unit

    data = write_glyph_folder(tmp_path / "eval", num_classes=6, images_per_class=4,
                              class_dir=lambda c: f"a{c // 3}/c{c}")
    spec = RunSpec("pddm", "final", 0, {"method": "pddm", "image_size": 16}, "train+validation",
                   "test", "x", "y")
    scratch = str(tmp_path / "scratch")
    result = {"resolved_config": {"image_size": 16, "eval_crop_fraction": 0.875}}
    assert rerank_in_subprocess(spec, result, data, DEPTHS, scratch) is None  # nothing saved

    run_dir = os.path.join(run_folder(spec, scratch), "run")
    os.makedirs(run_dir)
    keras.utils.set_random_seed(0)
    embedder = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255),
                                 keras.layers.Flatten(), keras.layers.Dense(5)])
    embedder.save(os.path.join(run_dir, "embedder.keras"))
    scorer = pddm_pair_model(_randomised_unit(hidden_dim=6, dim=5), 5)
    scorer.save(os.path.join(run_dir, "pddm.keras"))

    def in_process(argv, **kwargs):  # the `_rerank` subprocess, run here
        from kdml.benchmark.__main__ import main

        assert argv[1:4] == ["-m", "kdml.benchmark", "_rerank"]
        return type("Done", (), {"returncode": main(argv[3:])})()

    monkeypatch.setattr(runs.subprocess, "run", in_process)
    got = rerank_in_subprocess(spec, result, data, (1, 2, 4, 8, 32), scratch)
    assert set(got[RERANK_FIELD]) == {"1", "2", "4", "8"}  # 32 > N - 1 = 23 is dropped

    images = load_folder(data, verify_images=False)
    embeddings = embedder.predict(eval_dataset(images, image_size=16).map(lambda x, y: x),
                                  verbose=0)
    plain = retrieval_metrics(embeddings, images.labels, ks=(1,), nmi=False)["recall@1"]
    assert got[RERANK_FIELD]["1"] == pytest.approx(plain, abs=1e-9)
    for depth in (2, 4, 8):
        expected = rerank_metrics(embeddings, images.labels, pair_scorer(scorer), top_k=depth,
                                  ks=(1,))["reranked_recall@1"]
        assert got[RERANK_FIELD][str(depth)] == pytest.approx(expected, abs=1e-9), depth
    assert len({round(v, 6) for v in got[RERANK_FIELD].values()}) > 1  # the unit re-ranked
