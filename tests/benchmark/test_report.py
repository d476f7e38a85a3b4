"""kdml.benchmark.report: tables and summary generated from the run files."""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from kdml.benchmark.protocol import BenchmarkSpec, MethodPreset, run_benchmark
from kdml.benchmark.report import END, START, update_readme, write_report
from kdml.benchmark.splits import group_split
from tests.benchmark.stand_in import stand_in

SPEC = BenchmarkSpec(
    budget={"backbone": "conv4", "epochs": 2},
    methods={"base": MethodPreset({"method": "proxy_anchor"}, {"alpha": (16.0, 32.0)}),
             "new": MethodPreset({"method": "so_proxy"}, {"so_strength": (0.001, 10.0)},
                                 bases=("base",), description="the new one")},
    trials=2, seeds=(0, 1, 2, 3))
BASE = {0: 0.60, 1: 0.62, 2: 0.58, 3: 0.61}
GAIN = {0: 0.02, 1: 0.03, 2: 0.01, 3: 0.025}  # recall@1 of "new" = base + gain


@stand_in
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
    p = stats.ttest_rel(new, base).pvalue
    assert d["t_p"] == pytest.approx(p)
    assert comparison["p_holm"] == pytest.approx(p)  # one comparison: Holm changes nothing
    assert comparison["verdict"] == "beats"  # on the primary metric only
    assert summary["missing_runs"] == [] and summary["runs_done"] == 2 * (2 + 4)

    markdown = open(os.path.join(results_dir, "results.md")).read()
    mean, half = 100 * new.mean(), 100 * (high - new.mean())
    assert "| `new` | conv4 | 512 | 128 | full grid (2 points) | so_strength=" in markdown
    assert f"{mean:.2f} ± {half:.2f}" in markdown
    diff = new - base  # TOST within the default 2-point margin, and the MDD, by hand
    se = diff.std(ddof=1) / 2
    p_tost = max(stats.t.sf((diff.mean() + 0.02) / se, 3), stats.t.cdf((diff.mean() - 0.02) / se, 3))
    mdd = (stats.t.ppf(1 - 0.05 / 2, 3) + stats.t.ppf(0.8, 3)) * diff.std(ddof=1) / 2
    assert comparison["p_tost"] == pytest.approx(p_tost) and comparison["mdd_holm"] == pytest.approx(mdd)
    assert (f"| `new` − `base` | 4 | {100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, "
            f"{100 * d['high']:+.2f}] | {p:.3f} | {p_tost:.3f} | {100 * mdd:.2f} | beats |") in markdown
    assert (f"- `new` beats `base`: Recall@1 {100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] "
            f"points, Holm-adjusted p = {p:.3f}, 4 paired seeds") in markdown
    assert summary["comparisons"][0]["p_holm"] >= 0.001  # else the sentence says "p < 0.001"
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
    assert "Missing (1): new seed 3." in markdown and "3 paired seeds" in markdown


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
    # a second, named block on the same page is rewritten alone
    readme.write_text(f"{START}\nmain\n{END}\n<!-- results:other:start -->\nold\n"
                      "<!-- results:other:end -->\n")
    write_report(results_dir, readme=str(readme), block="other")
    text = readme.read_text()
    assert text.startswith(f"{START}\nmain\n{END}\n<!-- results:other:start -->\n")
    assert "old" not in text and "| `new` − `base` |" in text.split(END)[1]


def test_planned_rows_without_a_selection_are_listed(results_dir):
    path = os.path.join(results_dir, "selection.json")
    selection = json.load(open(path))
    assert selection["planned"] == ["base", "new"]
    selection["planned"].append("later")
    json.dump(selection, open(path, "w"))
    assert write_report(results_dir)["missing_runs"] == ["later (not yet selected)"]


def test_a_method_below_its_base_is_reported_as_below(tmp_path):
    @stand_in
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
    assert comparison["verdict"] == "below"
    markdown = open(tmp_path / "r" / "results.md").read()
    assert f"- `new` is below `base`: Recall@1 {100 * comparison['metrics']['recall@1']['mean']:+.2f} [" in markdown


def test_the_verdict_is_holm_corrected_over_every_comparison_of_the_table(tmp_path):
    """Three rows over one base; the weakest real gain is significant alone, not after Holm."""
    gains = {"a": [0.030, 0.032, 0.031, 0.029], "b": [0.020, 0.030, 0.005, 0.025],
             "c": [0.0, 0.001, -0.001, 0.0005]}
    methods = {"base": MethodPreset({"method": "proxy_anchor"}, {"alpha": (32.0,)})}
    methods.update({m: MethodPreset({"method": "so_proxy"}, {"so_strength": (0.001,)},
                                    bases=("base",)) for m in gains})
    spec = BenchmarkSpec(budget={"backbone": "conv4", "epochs": 2}, methods=methods, trials=1,
                         seeds=(0, 1, 2, 3))

    @stand_in
    def execute(run_spec, train_dir, eval_dir):
        seed = run_spec.config["seed"]
        r1 = BASE[seed] + (gains[run_spec.method][seed] if run_spec.method in gains else 0.0)
        return {"metrics": {"recall@1": r1, "map@r": r1 / 2, "r_precision": r1 / 1.5}}

    names = [f"g{g}/c{c}" for g in range(5) for c in range(2)]
    run_benchmark(spec, group_split(names, seed=0), lambda name: str(tmp_path / name), execute,
                  str(tmp_path / "r"), progress=lambda line: None)
    summary = write_report(str(tmp_path / "r"))
    by_row = {c["method"]: c for c in summary["comparisons"]}
    base = np.array([BASE[s] for s in range(4)])
    raw = {m: stats.ttest_rel(base + np.array(g), base).pvalue for m, g in gains.items()}
    order = sorted(raw, key=raw.get)  # Holm by hand: (3 - rank) x p, running maximum
    expected, running = {}, 0.0
    for rank, m in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * raw[m]))
        expected[m] = running
    for m in gains:
        assert by_row[m]["p_holm"] == pytest.approx(expected[m])
    assert raw["b"] < 0.05 < expected["b"]  # the point of the correction
    # the equivalence tests, by hand: TOST within +-2 points, Holm over the family of 3
    tost = {}
    for m, g in gains.items():
        g = np.array(g)
        se = g.std(ddof=1) / 2
        tost[m] = max(stats.t.sf((g.mean() + 0.02) / se, 3), stats.t.cdf((g.mean() - 0.02) / se, 3))
    order = sorted(tost, key=tost.get)
    tost_holm, running = {}, 0.0
    for rank, m in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * tost[m]))
        tost_holm[m] = running
    for m in gains:
        assert by_row[m]["p_tost_holm"] == pytest.approx(tost_holm[m])
    assert tost_holm["c"] < 0.05 < tost_holm["b"]
    # a: beats; b: neither shown to differ nor within the margin; c: inside +-2 points
    assert [by_row[m]["verdict"] for m in ("a", "b", "c")] == ["beats", "inconclusive", "equivalent"]


def test_rows_of_different_backbones_are_not_compared(tmp_path):
    methods = {"base": MethodPreset({"method": "proxy_anchor"}, {"alpha": (32.0,)}),
               "other": MethodPreset({"method": "so_proxy", "backbone": "conv4_stride4"},
                                     {"so_strength": (0.001,)}, bases=("base",))}
    spec = BenchmarkSpec(budget={"backbone": "conv4", "epochs": 2}, methods=methods, trials=1,
                         seeds=(0, 1))
    names = [f"g{g}/c{c}" for g in range(5) for c in range(2)]
    with pytest.raises(ValueError, match="not like for like: backbone"):
        run_benchmark(spec, group_split(names, seed=0), lambda name: str(tmp_path / name),
                      _execute, str(tmp_path / "r"), progress=lambda line: None)


def test_the_readme_block_is_the_regeneration_of_the_committed_runs():
    """README.md and docs/benchmarks.md hold exactly what the committed run JSON generates:
    the full tables on docs/benchmarks.md, their short forms on the README."""
    from kdml.benchmark.report import current_block, readme_block

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    front = os.path.join(repo, "README.md")
    page = os.path.join(repo, "docs", "benchmarks.md")
    # the protocol-2 re-runs accumulate in docs/results/omniglot{,_losses}/runs/; until a
    # table is complete the pages show the previous protocol's, generated from its folder
    previous = os.path.join(repo, "docs", "results", "previous_protocol")
    results = os.path.join(previous, "omniglot")
    assert current_block(page) == readme_block(results, page), (
        "docs/benchmarks.md: its results block is not what `python -m kdml.benchmark report "
        "docs/results/previous_protocol/omniglot --readme=docs/benchmarks.md` writes")
    with open(os.path.join(results, "results.md")) as f:
        assert current_block(page).startswith(f.read())
    assert current_block(front) == readme_block(
        results, front, compact=True, details="docs/benchmarks.md#method-comparison"), (
        "README.md: its results block is not what `python -m kdml.benchmark report "
        "docs/results/previous_protocol/omniglot --readme=README.md --compact "
        "--details=docs/benchmarks.md#method-comparison` writes")
    # the PDDM mining-hardness table of docs/benchmarks.md, a block of its own
    mining = os.path.join(repo, "docs", "results", "omniglot_pddm_mining")
    assert current_block(page, "omniglot_pddm_mining") == readme_block(mining, page)
    # the loss leaderboard: in full on docs/benchmarks.md, its short form on the README
    losses = os.path.join(previous, "omniglot_losses")
    assert current_block(page, "omniglot_losses") == readme_block(losses, page)
    assert current_block(front, "omniglot_losses") == readme_block(
        losses, front, compact=True, details="docs/benchmarks.md#loss-leaderboard")
    # the front page's two generated blocks stay short
    lines = len(current_block(front).splitlines()) + len(current_block(front, "omniglot_losses").splitlines())
    assert lines <= 45, lines
    # the committed tables predate protocol 2 and say so
    assert "Made under the previous protocol" in current_block(page, "omniglot_losses")
    # GeM against avg + max (protocol 2): in full on docs/benchmarks.md, its short form on
    # the README and docs/training.md
    pooling = os.path.join(repo, "docs", "results", "omniglot_pooling")
    assert current_block(page, "omniglot_pooling") == readme_block(pooling, page)
    assert "Made under the previous protocol" not in current_block(page, "omniglot_pooling")
    details = "docs/benchmarks.md#pooling-gem-against-average--max"
    assert current_block(front, "omniglot_pooling") == readme_block(
        pooling, front, compact=True, details=details)
    training = os.path.join(repo, "docs", "training.md")
    assert current_block(training, "omniglot_pooling") == readme_block(
        pooling, training, compact=True, details=details.replace("docs/", ""))


def test_the_docs_list_each_grid_and_its_default_as_the_presets_give_them():
    from kdml.benchmark.presets import PRESETS
    from kdml.benchmark.protocol import grid_table
    from kdml.benchmark.report import current_block

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    page = os.path.join(repo, "docs", "benchmarks.md")
    for name, spec in PRESETS.items():
        assert current_block(page, f"grids_{name}") == grid_table(spec), (
            f"docs/benchmarks.md: run `python -m kdml.benchmark grids --preset={name} "
            "--readme=docs/benchmarks.md`")
    table = grid_table(PRESETS["omniglot_losses"])
    assert "| `proxy_nca` | proxy_nca_scale {3, **9**, 16} |" in table
    assert "| `multi_similarity_xbm` | xbm_size {**1024**, 2048} |" in table


def test_the_plot_keeps_each_row_at_one_height_in_every_panel(results_dir, tmp_path):
    """A row lacking a metric leaves its slot empty: later rows do not move up a row."""
    import matplotlib

    matplotlib.use("Agg")
    from kdml.benchmark.report import collect, plot

    summary = collect(results_dir)
    summary["methods"]["new"]["summary"].pop("map@r")  # like the re-ranking rows
    drawn = {}
    import matplotlib.pyplot as plt

    original = plt.Axes.errorbar

    def spy(ax, x, y, *args, **kwargs):
        drawn.setdefault(ax, []).append((list(x), list(y)))
        return original(ax, x, y, *args, **kwargs)

    plt.Axes.errorbar = spy
    try:
        plot(summary, str(tmp_path / "p.png"))
    finally:
        plt.Axes.errorbar = original
    drawn = {ax.get_title(): points for ax, points in drawn.items()}
    names = list(summary["methods"])
    means = {(n, k): 100 * summary["methods"][n]["summary"][k]["mean"]
             for n in names for k in summary["methods"][n]["summary"]}
    for title, key in (("Recall@1 (%)", "recall@1"), ("MAP@R (%)", "map@r")):
        ((xs, ys),) = drawn[title]
        for x, y in zip(xs, ys):
            assert x == pytest.approx(means[(names[int(y)], key)])  # drawn on its own row
    assert drawn["MAP@R (%)"][0][1] == [names.index("base")]


# A leaderboard: three rows against one baseline, with known paired differences per seed.
LEADERBOARD_SHIFT = {"proxy_anchor": [0.0] * 5,
                     "contrastive": [0.004, -0.003, 0.002, -0.004, 0.001],  # no difference
                     "triplet": [-0.05, -0.048, -0.052, -0.049, -0.051],  # clearly below
                     "circle": [0.03, 0.031, 0.029, 0.032, 0.030]}  # clearly above
LEADERBOARD_BASE = [0.70, 0.72, 0.69, 0.71, 0.73]


@stand_in
def _leaderboard_execute(spec, train_dir, eval_dir):
    seed = spec.config["seed"]
    r1 = LEADERBOARD_BASE[seed] + LEADERBOARD_SHIFT[spec.method][seed]
    return {"metrics": {"recall@1": r1}, "wall_s": 1.0}


@pytest.fixture
def leaderboard_dir(tmp_path):
    base = MethodPreset({"method": "proxy_anchor"}, {"alpha": (32.0,)})
    rows = {name: MethodPreset({"method": "proxy_anchor"}, {"margin": (0.1,)},
                               bases=("proxy_anchor",)) for name in ("contrastive", "triplet", "circle")}
    spec = BenchmarkSpec(budget={"backbone": "conv4", "embedding_dim": 64, "epochs": 1},
                         methods={"proxy_anchor": base, **rows}, trials=1, seeds=tuple(range(5)),
                         leaderboard=True)
    names = [f"g{g}/c{c}" for g in range(5) for c in range(2)]
    run_benchmark(spec, group_split(names, seed=0), lambda name: str(tmp_path / name),
                  _leaderboard_execute, str(tmp_path / "r"), progress=lambda line: None)
    return str(tmp_path / "r")


def test_a_leaderboard_is_sorted_and_its_spread_is_computed_from_the_runs(leaderboard_dir):
    from kdml.benchmark.report import format_compact

    summary = write_report(leaderboard_dir)
    means = {name: np.mean(np.add(LEADERBOARD_BASE, shift)) for name, shift in LEADERBOARD_SHIFT.items()}
    order = sorted(means, key=lambda name: -means[name])
    assert list(summary["methods"]) == order == ["circle", "proxy_anchor", "contrastive", "triplet"]
    verdicts = {c["method"]: c["verdict"] for c in summary["comparisons"]}
    assert verdicts == {"circle": "beats", "contrastive": "equivalent", "triplet": "below"}
    markdown = open(os.path.join(leaderboard_dir, "results.md")).read()
    ranked = [line.split(" | ")[1] for line in markdown.splitlines() if line.startswith("| 1 ")
              or line.startswith("| 2 ") or line.startswith("| 3 ") or line.startswith("| 4 ")]
    assert ranked == [f"`{name}`" for name in order]
    values = sorted(means.values())
    spread, inner = values[-1] - values[0], values[2] - values[1]  # 4 rows: middle half = 2nd..3rd
    assert (f"- Spread: the 4 rows' mean Recall@1 spans {100 * spread:.2f} points, from `circle` "
            f"({100 * means['circle']:.2f}) to `triplet` ({100 * means['triplet']:.2f}); the middle "
            f"half of the rows spans {100 * inner:.2f} points.") in markdown
    mdds = sorted((stats.t.ppf(1 - 0.05 / 6, 4) + stats.t.ppf(0.8, 4))
                  * np.std(np.array(shift), ddof=1) / np.sqrt(5)
                  for name, shift in LEADERBOARD_SHIFT.items() if name != "proxy_anchor")
    assert (f"- Decisive: 3 of 3 comparisons (1 beats, 1 below, 1 equivalent, 0 inconclusive). "
            f"Minimum detectable difference at Holm's first-step level, 80 % power: median "
            f"{100 * mdds[1]:.2f} points (from {100 * mdds[0]:.2f} to {100 * mdds[2]:.2f}).") in markdown
    # a classic loss (triplet) is below the baseline: the table does not agree
    assert "This table does not agree: a classic loss is below the baseline." in markdown
    compact = format_compact(summary)
    assert compact.splitlines()[4] == (f"| 1 | `circle` | {100 * means['circle']:.2f} ± "
                                       f"{100 * summary['methods']['circle']['summary']['recall@1']['half_width']:.2f} "
                                       f"| `proxy_anchor` {100 * (means['circle'] - means['proxy_anchor']):+.2f} | beats |")


def test_the_reality_check_agrees_when_most_rows_tie_and_no_classic_loss_is_below(leaderboard_dir):
    from kdml.benchmark.report import spread_sentences

    summary = write_report(leaderboard_dir)
    for c in summary["comparisons"]:  # as if triplet and circle had been shown equivalent
        if c["method"] in ("triplet", "circle"):
            c["verdict"] = "equivalent"
    lines = spread_sentences(summary)
    assert lines[1].endswith("This table agrees: most rows are shown equivalent to their base "
                             "and no classic loss is below the baseline.")
    for c in summary["comparisons"]:  # too few seeds: "not shown to differ" is no agreement
        c["verdict"] = "inconclusive"
    assert spread_sentences(summary)[1].endswith(
        "cannot tell: 0 of 3 comparisons are shown equivalent and 0 differ; an inconclusive "
        "comparison is no evidence either way.")


def test_failure_records_are_counted_per_row(tmp_path):
    """A failed run leaves a record (config, seed, error, step) that the report counts."""
    from kdml.benchmark.runs import RunFailed

    attempts = {"n": 0}

    @stand_in
    def flaky(spec, train_dir, eval_dir):
        if spec.method == "new" and spec.stage == "final" and spec.config["seed"] == 1:
            attempts["n"] += 1
            if attempts["n"] == 1:  # diverges once, succeeds when the benchmark is rerun
                raise RunFailed("Run new final 1 failed (exit 1)",
                                "NonFiniteLossError: The training loss became nan at epoch 2, "
                                "global step 31", 31)
        return _execute(spec, train_dir, eval_dir)

    names = [f"g{g}/c{c}" for g in range(5) for c in range(2)]
    for _ in range(2):
        run_benchmark(SPEC, group_split(names, seed=0), lambda name: str(tmp_path / name), flaky,
                      str(tmp_path / "r"), progress=lambda line: None)
    summary = write_report(str(tmp_path / "r"))
    assert summary["missing_runs"] == []  # the rerun filled it in
    assert summary["methods"]["base"]["failures"] == []
    (record,) = summary["methods"]["new"]["failures"]
    assert record == {"stage": "final", "index": 1, "seed": 1, "step": 31,
                      "error": "NonFiniteLossError: The training loss became nan at epoch 2, "
                               "global step 31"}
    markdown = open(tmp_path / "r" / "results.md").read()
    assert ("Failed runs (1, failure records in runs/<row>/*.failed.json): `new` 1 (final seed 1: "
            "NonFiniteLossError: The training loss became nan at epoch 2, global step 31 at step 31)."
            in markdown)


def test_a_protocol_2_run_without_resolved_config_or_of_other_code_is_an_error(results_dir):
    selection = json.load(open(os.path.join(results_dir, "selection.json")))
    assert selection["protocol"] == 2
    key = selection["methods"]["new"]["finals"]["2"]
    path = os.path.join(results_dir, "runs", "new", f"final-2-{key}.json")
    run = json.load(open(path))
    json.dump({k: v for k, v in run.items() if k != "resolved_config"}, open(path, "w"))
    with pytest.raises(ValueError, match=f"{path}: stores no resolved_config"):
        write_report(results_dir)
    json.dump({**run, "code": "0123456789ab"}, open(path, "w"))
    with pytest.raises(ValueError, match="made by kdml code '0123456789ab', the table by"):
        write_report(results_dir)
    json.dump({**run, "resolved_config": {**run["resolved_config"], "lr": 0.5}}, open(path, "w"))
    with pytest.raises(ValueError, match="resolved_config field 'lr' is 0.5, the protocol resolves 0.0001"):
        write_report(results_dir)
    json.dump({**run, "resolved_config": {**run["resolved_config"], "so_strength": 5.0}}, open(path, "w"))
    with pytest.raises(ValueError, match="config sets so_strength=0.001 but the run resolved 5.0"):
        write_report(results_dir)


def test_the_budget_rule_on_curves_computed_by_hand():
    from kdml.benchmark.report import budget_rule, last_quarter_range, quarter_change

    def curve(values):
        return {str(e): v for e, v in enumerate(values, 1)}

    # rises, then wiggles by 0.4 points from epoch 6 on
    a = curve([0.30, 0.50, 0.60, 0.66, 0.70, 0.720, 0.724, 0.721, 0.723, 0.720, 0.722, 0.724])
    # E = 8: q = 2, epochs 7..8 against 5..6; E = 9: q = 3, epochs 7..9 against 4..6
    assert quarter_change(a, 8) == pytest.approx((0.724 + 0.721) / 2 - (0.70 + 0.72) / 2)
    assert quarter_change(a, 9) == pytest.approx((0.724 + 0.721 + 0.723 - 0.66 - 0.70 - 0.72) / 3)
    assert quarter_change(a, 10) == pytest.approx((0.721 + 0.723 + 0.720 - 0.70 - 0.72 - 0.724) / 3)
    assert quarter_change(a, 12) == pytest.approx((0.720 + 0.722 + 0.724 - 0.724 - 0.721 - 0.723) / 3)
    assert math.isnan(quarter_change(a, 1)) and math.isnan(quarter_change(a, 13))
    # 1.25 points at E = 8, 2.9 at 9, under 1 from 10 on
    assert budget_rule({"a": a}) == 10
    # an early pause (epochs 2..5 flat) passes on its own at E = 3, 4 and 5 but the curve
    # rises after it; the quarter means settle from E = 15 (epochs 12..15 vs 8..11: 0.25)
    c = curve([0.30] + [0.50] * 4 + [0.60, 0.70, 0.75] + [0.76] * 8)
    assert [abs(quarter_change(c, e)) < 0.01 for e in (3, 4, 5, 6, 14, 15, 16)] == [
        True, True, True, False, False, True, True]
    assert quarter_change(c, 14) == pytest.approx(0.76 - (0.70 + 0.75 + 0.76 + 0.76) / 4)
    assert budget_rule({"c": c}) == 15
    assert last_quarter_range(c, 3) == 0.0  # what a single-epoch max - min rule would accept
    # every row must settle, over the epochs all curves cover (12: c has not)
    assert budget_rule({"a": a, "c": c}) is None
    assert budget_rule({"a": curve(list(a.values()) + [0.724] * 4), "c": c}) == 15


def test_a_protocol_2_table_states_its_budget_evidence_and_plots_the_curves(tmp_path):
    from kdml.benchmark.report import collect

    curve = {"1": 0.5, "2": 0.60, "3": 0.605, "4": 0.61}

    @stand_in
    def with_curves(spec, train_dir, eval_dir):
        out = _execute(spec, train_dir, eval_dir)
        return {**out, "curve": curve} if spec.stage == "trial" else out

    spec = BenchmarkSpec(budget={"backbone": "conv4", "epochs": 4, "steps_per_epoch": 3},
                         methods=SPEC.methods, trials=2, seeds=(0, 1, 2, 3), budget_rows=("base",))
    names = [f"g{g}/c{c}" for g in range(5) for c in range(2)]
    run_benchmark(spec, group_split(names, seed=0), lambda name: str(tmp_path / name), with_curves,
                  str(tmp_path / "r"), progress=lambda line: None)
    summary = write_report(str(tmp_path / "r"))
    assert summary["budget_evidence"] == {"epochs": 4, "rule_epochs": 3, "rows": {"base": {
        "quarter_change": pytest.approx(0.005), "last_quarter_range": pytest.approx(0.005)}}}
    markdown = open(tmp_path / "r" / "results.md").read()
    assert ("Budget: 4 epochs. Over the last quarter of training the mean validation Recall@1 curve "
            "of the trials moved (points, mean of the last quarter − mean of the quarter before): "
            "`base` +0.50 (single epochs spread 0.50); the rule") in markdown
    assert "4 epochs per run of 3 steps (trials and final runs alike)" in markdown
    assert "- `base`: alpha=32.0* 60.0; → alpha=16.0 60.0." in markdown or \
        "- `base`: → alpha=32.0* 60.0; alpha=16.0 60.0." in markdown
    assert os.path.getsize(tmp_path / "r" / "curves.png") > 5_000
    assert len(collect(str(tmp_path / "r"))["methods"]["new"]["curves"]) == 2


def test_the_presets_budget_is_what_the_rule_gives_on_the_committed_pilot():
    """docs/results/budget_pilot/: 40-epoch runs of each table's budget rows (defaults,
    seeds 0 and 1); the rule on their mean curves is the presets' epochs."""
    from kdml.benchmark.presets import PRESETS
    from kdml.benchmark.report import budget_rule, collect, mean_curve

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for folder, preset in (("omniglot", "omniglot"), ("losses", "omniglot_losses")):
        summary = collect(os.path.join(repo, "docs", "results", "budget_pilot", folder))
        spec = PRESETS[preset]
        assert summary["budget_rows"] == list(spec.budget_rows)
        curves = {r: mean_curve([c["curve"] for c in summary["methods"][r]["curves"]])
                  for r in spec.budget_rows}
        assert all(len(c) == 40 and len(summary["methods"][r]["curves"]) == 2
                   for r, c in curves.items())
        assert budget_rule(curves) == spec.budget["epochs"], folder
        # the pilot is the preset's set-up, longer
        assert {k: v for k, v in summary["budget"].items() if k != "epochs"} == {
            k: v for k, v in spec.budget.items() if k != "epochs"}
