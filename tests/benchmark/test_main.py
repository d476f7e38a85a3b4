"""`python -m kdml.benchmark`: one-line errors, and the Omniglot preset's data preparation."""

import os
import zipfile

import pytest

from kdml.benchmark.__main__ import main
from kdml.benchmark.presets import OMNIGLOT, OMNIGLOT_ZIPS, omniglot_roots


def test_report_of_a_folder_without_a_benchmark_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "holds no selection.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["run"], "Pass --omniglot_dir"),
    (["run", "--data=/x", "--methods=nope"], "--methods: unknown rows ['nope']"),
    (["run", "--preset=cub"], "--preset='cub' is unknown"),
])
def test_run_argument_errors_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_missing_omniglot_zips_say_what_to_pass(tmp_path, capsys):
    assert main(["run", f"--omniglot_dir={tmp_path}", f"--cache_dir={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Pass --omniglot_dir=" in err


def test_omniglot_zips_are_unpacked_once(tmp_path):
    for name in OMNIGLOT_ZIPS:
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as z:
            z.writestr(f"{name}/Greek/character01/a.png", b"x")
    roots = omniglot_roots(str(tmp_path), str(tmp_path / "cache"))
    assert roots == [str(tmp_path / "cache" / n) for n in OMNIGLOT_ZIPS]
    assert os.path.exists(os.path.join(roots[1], "Greek", "character01", "a.png"))
    os.remove(tmp_path / f"{OMNIGLOT_ZIPS[0]}.zip")
    assert omniglot_roots(str(tmp_path), str(tmp_path / "cache")) == roots  # cached


def test_the_omniglot_preset_gives_every_method_the_same_trials_and_budget():
    from kdml.benchmark.search import sample_trials

    from kdml.benchmark.protocol import check_pairs
    from kdml.benchmark.search import grid_size

    for name, preset in OMNIGLOT.methods.items():
        expected = min(OMNIGLOT.trials, grid_size(preset.search))
        assert len(sample_trials(preset.search, OMNIGLOT.num_trials(name))) == expected, name
        assert not set(preset.config) & {"epochs", "classes_per_batch", "images_per_class", "seed"}
        assert all(base in OMNIGLOT.methods for base in preset.bases)
        # a row that extends a base searches nothing the base searched (it inherits those)
        if preset.extends:
            assert not set(preset.search) & set(OMNIGLOT.methods[preset.extends].search), name
    check_pairs(OMNIGLOT, list(OMNIGLOT.methods))  # every preset pair is like for like
    blocks = [m for block in OMNIGLOT.default_blocks for m in block]
    assert len(blocks) == len(set(blocks)) and len(OMNIGLOT.seeds) >= 8 and OMNIGLOT.trials >= 3
    # each extending row runs in the block of (and after) the base it inherits from
    for block in OMNIGLOT.default_blocks:
        for i, name in enumerate(block):
            base = OMNIGLOT.methods[name].extends
            assert base is None or base in block[:i], name


def test_the_docs_state_the_search_grids_the_preset_runs():
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    grid = sorted(OMNIGLOT.methods["so_proxy"].search["so_strength"])
    methods = open(os.path.join(root, "docs", "methods.md")).read()
    (stated,) = re.findall(r"search space is therefore lambda in \{([^}]*)\}", methods)
    assert sorted(float(v) for v in stated.split(",")) == grid
    benchmarks = open(os.path.join(root, "docs", "benchmarks.md")).read()
    rows = [line for line in benchmarks.splitlines()
            if line.startswith("| `so_proxy` |") and "so_strength {" in line]
    assert rows and all(sorted(float(v.strip(" *")) for v in re.search(
        r"so_strength \{([^}]*)\}", row)[1].split(",")) == grid for row in rows)


def test_grids_and_budget_commands(tmp_path, capsys):
    from kdml.benchmark.__main__ import main

    assert main(["grids", "--preset=omniglot"]) == 0
    assert "| `so_proxy_d64` | so_strength {0.0001, **0.001**, 0.01} |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["budget", str(tmp_path)])
    assert "holds no selection.json" in capsys.readouterr().err
