"""tools/bench_methods.py: its pure logic (rows, cache keys, command line, table); no training."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_methods", os.path.join(ROOT, "tools", "bench_methods.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_are_method_flags_and_so_proxy_spells_out_the_default_strength(bench):
    from kdml.config import TrainConfig
    from kdml.methods import METHODS

    assert {"proxy_anchor", "so_proxy"} <= set(bench.ROWS)
    for name, row in bench.ROWS.items():
        methods = [f.split("=", 1)[1] for f in row.flags if f.startswith("--method=")]
        assert len(methods) == 1 and methods[0] in METHODS, name
        assert row.rerank_top_k >= 0
    assert f"--so_strength={float(TrainConfig.so_strength)}" in bench.ROWS["so_proxy"].flags


def test_cache_key_holds_the_budget_and_the_row_flags(bench):
    row = bench.ROWS["proxy_anchor"]
    key = bench.budget_key(bench.BUDGET, row)
    assert key.startswith("conv4_s28_p32k4_e") and f"_d{bench.BUDGET['embedding_dim']}_" in key
    assert bench.budget_key({**bench.BUDGET, "epochs": 99}, row) != key
    assert bench.budget_key(bench.BUDGET, bench.ROWS["so_proxy"]) != key
    assert bench.budget_key(bench.BUDGET, bench.Row(flags=row.flags)) == key
    path = bench.result_path("runs/x", "proxy_anchor", 2, key)
    assert path == os.path.join("runs/x", "proxy_anchor", "seed2", f"result-{key}.json")


def test_train_command_puts_the_budget_first_and_the_row_flags_last(bench):
    row = bench.Row(flags=("--method=so_proxy", "--epochs=3"))
    command = bench.train_command(row, bench.BUDGET, 1, "/t", "/e", "/o")
    assert command[1:3] == ["-m", "kdml.train"]
    assert "--dataset=folder:/t" in command and "--eval_dataset=folder:/e" in command
    assert "--seed=1" in command and "--output_dir=/o" in command and "--resume" in command
    assert command[-2:] == ["--method=so_proxy", "--epochs=3"]


def test_mean_and_sample_std(bench):
    assert bench.mean_std([2.0]) == (2.0, 0.0)
    mean, std = bench.mean_std([1.0, 2.0, 6.0])
    assert mean == 3.0 and std == pytest.approx(((4 + 1 + 9) / 2) ** 0.5)


def test_table_aggregates_seeds_and_shows_only_measured_columns(bench):
    runs = {
        "proxy_anchor": [{"seed": 0, "recall@1": 0.5, "map@r": 0.2, "one_shot_20way": 0.7, "wall_s": 80},
                         {"seed": 1, "recall@1": 0.7, "map@r": 0.4, "one_shot_20way": 0.9, "wall_s": 90}],
        "so_proxy": [{"seed": 0, "recall@1": 0.6, "map@r": 0.3, "one_shot_20way": 0.8, "wall_s": 85}],
        "empty": [],
    }
    lines = bench.format_table(runs).splitlines()
    assert lines[0] == "| method | seeds | Recall@1 (%) | MAP@R (%) | 20-way 1-shot (%) | wall s / run |"
    assert lines[2] == "| `proxy_anchor` | 0,1 | 60.00 ± 14.14 | 30.00 ± 14.14 | 80.00 ± 14.14 | 85 ± 7 |"
    assert lines[3] == "| `so_proxy` | 0 | 60.00 ± 0.00 | 30.00 ± 0.00 | 80.00 ± 0.00 | 85 ± 0 |"
    assert len(lines) == 4
    runs["so_proxy"][0]["reranked_recall@1"] = 0.65
    assert "re-ranked R@1 (%)" in bench.format_table(runs).splitlines()[0]


def test_alphabet_of_a_class_name(bench):
    assert bench.alphabet_of("Japanese_(katakana)/character01") == "Japanese_(katakana)"


def test_cached_results_and_runs_shared_between_rows_with_the_same_flags(bench, tmp_path):
    key = bench.budget_key(bench.BUDGET, bench.ROWS["proxy_anchor"])
    path = bench.result_path(str(tmp_path), "proxy_anchor", 0, key)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump({"seed": 0, "recall@1": 0.5}, f)
    found = bench.cached_results(str(tmp_path), ["proxy_anchor", "so_proxy"], bench.BUDGET)
    assert found == {"proxy_anchor": [{"seed": 0, "recall@1": 0.5}], "so_proxy": []}
    assert bench.find_same_run(str(tmp_path), 0, key) == path
    assert bench.find_same_run(str(tmp_path), 1, key) is None
