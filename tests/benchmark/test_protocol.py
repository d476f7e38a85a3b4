"""kdml.benchmark.protocol: selection on validation only, test read after it, resumable."""

import dataclasses
import json
import os

import pytest

from kdml.benchmark.protocol import BenchmarkSpec, MethodPreset, run_benchmark, select
from kdml.benchmark.splits import SplitFolders, class_folders, group_split
from kdml.data.sources.folder import load_folder
from tests.helpers import write_glyph_folder
from tests.benchmark.stand_in import stand_in

SPEC = BenchmarkSpec(
    budget={"backbone": "conv4", "epochs": 2},
    methods={
        "base": MethodPreset({"method": "proxy_anchor"}, {"alpha": (16.0, 32.0, 64.0)}),
        "seed_method": MethodPreset({"method": "so_proxy"}, {"so_strength": (0.001, 1.0, 10.0, 100.0)},
                                    bases=("base",)),
    },
    trials=3, seeds=(0, 1, 2))


def _score(spec):
    """A made-up validation score, highest for alpha = 32 and so_strength = 1."""
    c = spec.config
    return 0.5 - abs(c.get("alpha", 32.0) - 32.0) / 100 - abs(c.get("so_strength", 1.0) - 1.0) / 1000


@pytest.fixture
def dataset(tmp_path):
    root = write_glyph_folder(tmp_path / "data", num_classes=10, images_per_class=2,
                              class_dir=lambda c: f"alphabet{c // 2}/char{c % 2}")
    folders = class_folders([root])
    split = group_split(sorted(folders), num_validation_groups=1, num_test_groups=2, seed=0)
    return folders, split, SplitFolders(folders, split, str(tmp_path / "splits"))


def test_test_split_is_loaded_only_after_every_selection(dataset, tmp_path):
    folders, split, splits = dataset
    events, seen = [], {}

    def images_of(split_name):
        return {os.path.realpath(os.path.join(folders[c], f))
                for c in split.classes[split_name] for f in os.listdir(folders[c])}

    test_images, validation_images = images_of("test"), images_of("validation")

    def spy_load_split(name):
        events.append(("load", name))
        return splits.load_split(name)

    @stand_in
    def execute(spec, train_dir, eval_dir):
        events.append(("run", spec.stage, spec.method))
        seen.setdefault(spec.stage, set()).add((train_dir, eval_dir))
        # No validation or test image reaches a trial's training, no test image a final's.
        train = {os.path.realpath(p) for p in load_folder(train_dir, verify_images=False).paths}
        held_out = {os.path.realpath(p) for p in load_folder(eval_dir, verify_images=False).paths}
        assert train and held_out and not train & held_out
        assert not train & test_images
        if spec.stage == "trial":
            assert not train & validation_images
        return {"metrics": {"recall@1": _score(spec), "map@r": 0.1, "r_precision": 0.2,
                            **({"one_shot": 0.3} if spec.one_shot else {})}, "wall_s": 1.0}

    results = run_benchmark(SPEC, split, spy_load_split, execute, str(tmp_path / "results"),
                            progress=lambda line: None)
    first_test = events.index(("load", "test"))
    trials = [i for i, e in enumerate(events) if e[:2] == ("run", "trial")]
    finals = [i for i, e in enumerate(events) if e[:2] == ("run", "final")]
    assert len(trials) == 2 * 3 and len(finals) == 2 * 3
    assert max(trials) < first_test < min(finals)
    assert seen["trial"] == {(splits.load_split("train"), splits.load_split("validation"))}
    assert seen["final"] == {(splits.load_split("train+validation"), splits.load_split("test"))}
    assert results["selection"]["base"]["params"] == {"alpha": 32.0}
    assert [r["config"]["seed"] for r in results["finals"]["base"]] == [0, 1, 2]
    assert all(r["config"]["alpha"] == 32.0 and r["config"]["epochs"] == 2
               for r in results["finals"]["base"])

    # Resuming runs nothing: every run is cached under its key.
    def fail(*args):
        raise AssertionError("a cached run was executed again")

    again = run_benchmark(SPEC, split, splits.load_split, fail, str(tmp_path / "results"),
                          progress=lambda line: None)
    assert again["selection"] == results["selection"]


def test_select_takes_the_best_validation_recall_and_the_first_of_ties():
    trials = [{"metrics": {"recall@1": r}} for r in (0.5, 0.7, 0.7, 0.6)]
    assert select(trials) == 1


def test_unknown_methods_are_refused(dataset, tmp_path):
    _, split, splits = dataset
    with pytest.raises(ValueError, match="Unknown methods.*Valid methods: base, seed_method"):
        run_benchmark(SPEC, split, splits.load_split, None, str(tmp_path), methods=["nope"])


def test_blocks_read_test_only_after_their_own_selection_and_skip_what_kdml_lacks(tmp_path):
    import dataclasses

    from kdml.benchmark.protocol import run_on_folders

    root = write_glyph_folder(tmp_path / "data", num_classes=10, images_per_class=2,
                              class_dir=lambda c: f"alphabet{c // 2}/char{c % 2}")
    spec = dataclasses.replace(SPEC, methods={
        **SPEC.methods,
        "third": MethodPreset({"method": "proxy_anchor"}, {"margin": (0.1, 0.2, 0.3)}),
        "future": MethodPreset({"method": "pddm", "no_such_field": 1}, {"alpha": (1.0, 2.0, 3.0)}),
    }, default_blocks=(("base", "seed_method"), ("third", "future")))
    events, lines = [], []

    @stand_in
    def execute(run_spec, train_dir, eval_dir):
        events.append((run_spec.stage, run_spec.method, os.path.basename(eval_dir)))
        return {"metrics": {"recall@1": _score(run_spec), "map@r": 0.1, "r_precision": 0.2}}

    results = run_on_folders(spec, [root], str(tmp_path / "results"), str(tmp_path / "scratch"),
                             progress=lines.append, execute=execute)
    stages = [(stage, method) for stage, method, _ in events]
    first_block_finals = stages.index(("final", "base"))
    assert {m for s, m in stages[:first_block_finals]} == {"base", "seed_method"}
    assert {m for s, m in stages[first_block_finals:first_block_finals + 6]} == {"base", "seed_method"}
    assert stages[first_block_finals + 6:] == [("trial", "third")] * 3 + [("final", "third")] * 3
    assert all(eval_dir.startswith("test-") == (stage == "final") for stage, _, eval_dir in events)
    assert "Skipping future: TrainConfig has no field no_such_field." in lines
    assert set(results["selection"]) == {"base", "seed_method", "third"}


def test_a_failed_run_is_reported_not_cached_and_the_rest_goes_on(dataset, tmp_path):
    _, split, splits = dataset
    lines = []

    from kdml.benchmark.protocol import row_trials
    from kdml.benchmark.runs import RunFailed, failure_path

    second = row_trials(SPEC, "base")[1]["alpha"]
    failed = []

    @stand_in
    def execute(spec, train_dir, eval_dir):
        if spec.method == "base" and spec.index == 1:
            failed.append(spec)
            raise RunFailed("Run base trial 1 failed (exit 1)",
                            "NonFiniteLossError: The training loss became nan at epoch 1, "
                            "global step 7", 7)
        return {"metrics": {"recall@1": _score(spec)}}

    results = run_benchmark(SPEC, split, splits.load_split, execute, str(tmp_path / "r"),
                            progress=lines.append)
    assert any(f"base trial 2/3 alpha={second}: FAILED, Run base trial 1 failed" in line
               for line in lines)
    assert "base: no selection and no final runs, 1 trial run(s) failed." in lines
    assert list(results["finals"]) == ["seed_method"] and len(results["finals"]["seed_method"]) == 3
    names = sorted(os.listdir(tmp_path / "r" / "runs" / "base"))
    assert len(names) == 3 and sum(n.endswith(".failed.json") for n in names) == 1
    (spec,) = failed  # the failure is recorded, not cached as a result
    assert not os.path.exists(spec.result_path(str(tmp_path / "r")))
    record = json.load(open(failure_path(spec, str(tmp_path / "r"))))
    assert record["seed"] == 0 and record["step"] == 7 and record["config"]["alpha"] == second
    assert record["error"].startswith("NonFiniteLossError: The training loss became nan")


def test_trials_only_selects_without_reading_test(dataset, tmp_path):
    folders, split, splits = dataset
    loaded, stages = [], []

    def spy_load_split(name):
        loaded.append(name)
        return splits.load_split(name)

    @stand_in
    def execute(spec, train_dir, eval_dir):
        stages.append(spec.stage)
        return {"metrics": {"recall@1": _score(spec), "map@r": 0.1, "r_precision": 0.2},
                "wall_s": 1.0}

    results = run_benchmark(SPEC, split, spy_load_split, execute, str(tmp_path / "results"),
                            progress=lambda line: None, final_runs=False)
    assert "test" not in loaded and "train+validation" not in loaded
    assert stages == ["trial"] * 6 and results["finals"] == {}
    assert results["selection"]["base"]["params"] == {"alpha": 32.0}
    with open(tmp_path / "results" / "selection.json") as f:
        assert len(json.load(f)["methods"]["base"]["finals"]) == 3  # planned, listed as missing


def _pair_spec(base_config, row_config, row_search=None, extends=True):
    return BenchmarkSpec(budget={"backbone": "conv4", "epochs": 2, "data_kind": "glyph"}, methods={
        "base": MethodPreset(base_config, {"alpha": (16.0, 32.0, 64.0)}),
        "row": MethodPreset(row_config, row_search or {"so_strength": (0.001, 1.0)}, bases=("base",),
                            extends="base" if extends else None)})


def test_a_pair_that_differs_in_more_than_the_method_is_refused():
    from kdml.benchmark.protocol import check_pairs

    pa = {"method": "proxy_anchor"}
    check_pairs(_pair_spec(pa, {"method": "so_proxy"}), ["base", "row"])  # like for like
    with pytest.raises(ValueError, match=r"^Comparison row vs base is not like for like: backbone "
                                         r"is 'conv4_stride4' vs 'conv4'\."):
        check_pairs(_pair_spec(pa, {"method": "so_proxy", "backbone": "conv4_stride4"}), ["row"])
    with pytest.raises(ValueError, match="not like for like: lr is 0.01 vs 0.001"):
        check_pairs(_pair_spec(pa, {"method": "so_proxy", "lr": 0.01}), ["row"])
    # a plain comparison (no `extends`) must share the whole set-up too
    with pytest.raises(ValueError, match="not like for like: embedding_dim is 64 vs 512"):
        check_pairs(_pair_spec(pa, {"method": "so_proxy", "embedding_dim": 64}, extends=False),
                    ["row"])
    with pytest.raises(ValueError, match="extends base but searches alpha again"):
        check_pairs(_pair_spec(pa, {"method": "so_proxy"}, {"alpha": (16.0, 64.0)}), ["row"])
    # a method-specific field set by the extending row is its change, and allowed
    check_pairs(_pair_spec(pa, {"method": "so_proxy", "so_mode": "rows"}), ["row"])


def test_an_extending_row_inherits_its_base_choice_and_searches_only_its_own(dataset, tmp_path):
    _, split, splits = dataset
    spec = dataclasses.replace(_pair_spec({"method": "proxy_anchor"}, {"method": "so_proxy"}),
                               trials=3, seeds=(0, 1))
    runs = []

    @stand_in
    def execute(run_spec, train_dir, eval_dir):
        runs.append(run_spec)
        return {"metrics": {"recall@1": _score(run_spec), "map@r": 0.1, "r_precision": 0.2}}

    result = run_benchmark(spec, split, splits.load_split, execute, str(tmp_path / "r"),
                           progress=lambda line: None)
    chosen = result["selection"]
    assert chosen["base"]["params"] == {"alpha": 32.0}  # the made-up score peaks at 32
    assert chosen["row"]["params"] == {"alpha": 32.0, "so_strength": 1.0}
    assert chosen["row"]["inherited"] == {"alpha": 32.0} and chosen["row"]["extends"] == "base"
    row_runs = [r for r in runs if r.method == "row"]
    assert len([r for r in row_runs if r.stage == "trial"]) == 2  # its whole 2-point grid
    assert all(r.config["alpha"] == 32.0 for r in row_runs)
    assert chosen["row"]["search"] == "full grid (2 points)"
    assert chosen["base"]["search"] == "full grid (3 points)"
    assert spec.search_description("base") == "full grid (3 points)"
    assert dataclasses.replace(spec, trials=2).search_description("base") == \
        "2 of 3 grid points (the default, then seeded random)"


def test_a_pair_that_differs_in_views_is_an_unequal_setup():
    from kdml.benchmark.protocol import check_pairs

    pa = {"method": "proxy_anchor"}
    with pytest.raises(ValueError, match="not like for like: views is 2 vs 1"):
        check_pairs(_pair_spec(pa, {"method": "so_proxy", "views": 2}, extends=False), ["row"])
    # supcon resolves views = 2 (its kind default): refused against a one-view base ...
    supcon = {"method": "supcon"}
    with pytest.raises(ValueError, match="not like for like: views is 2 vs 1"):
        check_pairs(_pair_spec(pa, supcon, {"supcon_temperature": (0.1,)}, extends=False), ["row"])
    # ... and compared with Proxy Anchor at its own geometry, 32 x 2 images x 2 views
    two = {"views": 2, "images_per_class": 2}
    check_pairs(_pair_spec({**pa, **two}, {**supcon, **two}, {"supcon_temperature": (0.1,)},
                           extends=False), ["row"])


def test_a_search_over_a_setup_field_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"names the training set-up field\(s\) lr: every row"):
        MethodPreset({"method": "proxy_anchor"}, {"lr": (1e-3, 1e-4)})
    with pytest.raises(ValueError, match="views"):
        MethodPreset({"method": "supcon"}, {"views": (1, 2)})


def test_check_selected_pairs_covers_pairs_that_do_not_extend():
    from kdml.benchmark.protocol import check_selected_pairs

    spec = _pair_spec({"method": "proxy_anchor"}, {"method": "so_proxy"}, extends=False)
    check_selected_pairs(spec, {"base": {"params": {"alpha": 32.0}},
                                "row": {"params": {"so_strength": 1.0}}})
    # a selection that smuggles a set-up difference into a plain pair is caught
    with pytest.raises(ValueError, match="row vs base is not like for like after selection: "
                                         "lr is 0.5 vs 0.001"):
        check_selected_pairs(spec, {"base": {"params": {"alpha": 32.0}},
                                    "row": {"params": {"so_strength": 1.0, "lr": 0.5}}})


def test_a_selection_of_other_code_is_never_mixed_with_new_rows(dataset, tmp_path):
    _, split, splits = dataset
    results = tmp_path / "r"
    os.makedirs(results)
    with open(results / "selection.json", "w") as f:
        json.dump({"code": "0123456789ab", "methods": {}}, f)
    with pytest.raises(ValueError, match="written by kdml code '0123456789ab'.*would mix"):
        run_benchmark(SPEC, split, splits.load_split, None, str(results),
                      progress=lambda line: None)


def test_trials_of_several_seeds_are_chosen_on_their_mean(dataset, tmp_path):
    _, split, splits = dataset
    spec = dataclasses.replace(SPEC, trial_seeds=(0, 1), methods={"base": SPEC.methods["base"]})
    # alpha 16 wins on seed 0 alone, alpha 32 on the mean of seeds 0 and 1
    scores = {(16.0, 0): 0.8, (16.0, 1): 0.2, (32.0, 0): 0.7, (32.0, 1): 0.6,
              (64.0, 0): 0.1, (64.0, 1): 0.1}

    @stand_in
    def execute(run_spec, train_dir, eval_dir):
        c = run_spec.config
        return {"metrics": {"recall@1": scores.get((c["alpha"], c["seed"]), 0.5)}}

    result = run_benchmark(spec, split, splits.load_split, execute, str(tmp_path / "r"),
                           progress=lambda line: None, final_runs=False)
    chosen = result["selection"]["base"]
    assert chosen["params"] == {"alpha": 32.0}
    assert chosen["trials"][0]["default"] and chosen["trials"][0]["params"] == {"alpha": 32.0}
    assert chosen["trials"][0]["validation_seeds"] == [0.7, 0.6]
    assert chosen["validation"]["recall@1"] == pytest.approx(0.65)


def test_switching_the_split_seed_never_leaves_a_held_out_class_in_train(tmp_path):
    root = write_glyph_folder(tmp_path / "data", num_classes=12, images_per_class=2,
                              class_dir=lambda c: f"alphabet{c // 2}/char{c % 2}")
    folders = class_folders([root])
    scratch = str(tmp_path / "splits")
    seen_validation = set()
    for seed in range(4):  # the same named test groups, a new validation group each time
        split = group_split(sorted(folders), num_validation_groups=1,
                            test_groups=["alphabet0", "alphabet1"], seed=seed)
        seen_validation.add(split.validation_groups)
        splits = SplitFolders(folders, split, scratch)
        for name in ("train", "validation", "test", "train+validation"):
            found = {p.split(os.sep)[-2] + "/" + p.split(os.sep)[-1]
                     for p in _class_dirs(splits.load_split(name))}
            assert found == set(split.classes[name]), (seed, name)
        train = {p for p in _class_dirs(splits.load_split("train"))}
        assert not {c.split("/")[0] for c in train} & set(split.validation_groups + split.test_groups)
    assert len(seen_validation) > 1  # the seeds did move the validation group


def _class_dirs(root):
    return {os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
            for d, subdirs, _ in os.walk(root) for n in subdirs
            if os.path.islink(os.path.join(d, n))}


def test_a_tampered_split_folder_is_refused_and_a_half_built_one_ignored(dataset, tmp_path):
    folders, split, splits = dataset
    train = splits.load_split("train")
    leftover = f"{splits.load_split('validation')}.tmp-99999"  # a killed build's folder
    os.makedirs(os.path.join(leftover, "junk"))
    assert splits.load_split("validation").endswith(split.fingerprint("validation"))
    stray = split.classes["test"][0]  # a test class slipped into train/
    link = os.path.join(train, *stray.split("/"))
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.abspath(folders[stray]), link)
    with pytest.raises(ValueError, match="holds other classes than split 'train'.*Delete it"):
        splits.load_split("train")


def test_a_split_folder_linking_elsewhere_is_refused(dataset, tmp_path):
    folders, split, splits = dataset
    validation = splits.load_split("validation")
    name = split.classes["validation"][0]
    link = os.path.join(validation, *name.split("/"))
    other = tmp_path / "copy"
    os.makedirs(other)
    os.remove(link)
    os.symlink(str(other), link)  # same class name, another folder
    with pytest.raises(ValueError, match=f"{name} links to .*copy, not to"):
        splits.load_split("validation")
