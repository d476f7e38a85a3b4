"""kdml.benchmark.report: tables and summary generated from the run files."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from kdml.benchmark.protocol import BenchmarkSpec, MethodPreset, run_benchmark
from kdml.benchmark.report import END, START, update_readme, write_report
from kdml.benchmark.splits import group_split

SPEC = BenchmarkSpec(
    budget={"backbone": "conv4", "epochs": 2},
    methods={"base": MethodPreset({"method": "proxy_anchor"}, {"alpha": (16.0, 32.0)}),
             "new": MethodPreset({"method": "so_proxy"}, {"so_strength": (1.0, 10.0)},
                                 bases=("base",), description="the new one")},
    trials=2, seeds=(0, 1, 2, 3))
BASE = {0: 0.60, 1: 0.62, 2: 0.58, 3: 0.61}
GAIN = {0: 0.02, 1: 0.03, 2: 0.01, 3: 0.025}  # recall@1 of "new" = base + gain


def _execute(spec, train_dir, eval_dir):
    seed = spec.config["seed"]
    r1 = BASE[seed] + (GAIN[seed] if spec.method == "new" else 0.0)
    one_shot = 0.5 + (0.01 * (-1) ** seed if spec.method == "new" else 0.0)
    return {"metrics": {"recall@1": r1, "map@r": r1 / 2, "r_precision": r1 / 1.5, "one_shot": one_shot},
            "wall_s": 10.0}


@pytest.fixture
def results_dir(tmp_path):
    names = [f"g{g}/c{c}" for g in range(5) for c in range(2)]
    split = group_split(names, seed=0)
    run_benchmark(SPEC, split, lambda name: str(tmp_path / name), _execute, str(tmp_path / "r"),
                  progress=lambda line: None)
    return str(tmp_path / "r")


def test_report_numbers_match_an_independent_computation(results_dir):
    summary = write_report(results_dir)
    base = np.array([BASE[s] for s in range(4)])
    new = base + np.array([GAIN[s] for s in range(4)])
    low, high = stats.t.interval(0.95, 3, loc=new.mean(), scale=stats.sem(new))
    got = summary["methods"]["new"]["summary"]["recall@1"]
    assert (got["mean"], got["low"], got["high"]) == (
        pytest.approx(new.mean()), pytest.approx(low), pytest.approx(high))
    (comparison,) = summary["comparisons"]
    d = comparison["metrics"]["recall@1"]
    assert d["mean"] == pytest.approx(0.02125)
    assert d["t_p"] == pytest.approx(stats.ttest_rel(new, base).pvalue)
    assert comparison["beats_base_on"] == ["recall@1", "map@r", "r_precision"]  # not one-shot (+-1)
    assert summary["missing_runs"] == [] and summary["runs_done"] == 2 * (2 + 4)

    markdown = open(os.path.join(results_dir, "results.md")).read()
    mean, half = 100 * new.mean(), 100 * (high - new.mean())
    assert "| `new` | so_strength=" in markdown and f"{mean:.2f} ± {half:.2f}" in markdown
    assert f"| `new` − `base` | 4 | {100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, " in markdown
    assert "| Recall@1, MAP@R, R-Precision |" in markdown
    assert "- `new` beats `base` on Recall@1, MAP@R, R-Precision (4 paired seed(s))." in markdown
    assert os.path.getsize(os.path.join(results_dir, "results.png")) > 10_000
    assert json.load(open(os.path.join(results_dir, "results.json")))["trials"] == 2


def test_missing_runs_are_listed_not_filled_in(results_dir):
    selection = json.load(open(os.path.join(results_dir, "selection.json")))
    key = selection["methods"]["new"]["finals"]["3"]
    os.remove(os.path.join(results_dir, "runs", "new", f"final-3-{key}.json"))
    summary = write_report(results_dir)
    assert summary["missing_runs"] == ["new seed 3"]
    assert summary["comparisons"][0]["seeds"] == [0, 1, 2]
    markdown = open(os.path.join(results_dir, "results.md")).read()
    assert "Missing (1): new seed 3." in markdown and "(3 paired seed(s))" in markdown


def test_readme_block_is_replaced_between_the_markers(tmp_path, results_dir):
    readme = tmp_path / "README.md"
    readme.write_text(f"# kdml\nintro\n{START}\nold table\n{END}\nafter\n")
    write_report(results_dir, readme=str(readme))
    text = readme.read_text()
    assert text.startswith(f"# kdml\nintro\n{START}\n") and text.endswith(f"{END}\nafter\n")
    assert "old table" not in text and "| `new` − `base` |" in text
    assert "](r/results.png)" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:start"):
        update_readme(str(readme), "x")


def test_planned_rows_without_a_selection_are_listed(results_dir):
    path = os.path.join(results_dir, "selection.json")
    selection = json.load(open(path))
    assert selection["planned"] == ["base", "new"]
    selection["planned"].append("later")
    json.dump(selection, open(path, "w"))
    assert write_report(results_dir)["missing_runs"] == ["later (not yet selected)"]


def test_a_method_below_its_base_is_reported_as_below(tmp_path):
    def worse(spec, train_dir, eval_dir):
        result = _execute(spec, train_dir, eval_dir)
        if spec.method == "new":  # recall@1 of "new" = base - gain: every seed below
            r1 = BASE[spec.config["seed"]] - GAIN[spec.config["seed"]]
            result["metrics"].update({"recall@1": r1, "map@r": r1 / 2, "r_precision": r1 / 1.5})
        return result

    names = [f"g{g}/c{c}" for g in range(5) for c in range(2)]
    run_benchmark(SPEC, group_split(names, seed=0), lambda name: str(tmp_path / name), worse,
                  str(tmp_path / "r"), progress=lambda line: None)
    (comparison,) = write_report(str(tmp_path / "r"))["comparisons"]
    assert comparison["beats_base_on"] == []
    assert comparison["below_base_on"] == ["recall@1", "map@r", "r_precision"]
    markdown = open(tmp_path / "r" / "results.md").read()
    assert ("- `new` does not beat `base`: it is below it on Recall@1, MAP@R, R-Precision "
            "(interval below zero; 4 paired seed(s)).") in markdown
