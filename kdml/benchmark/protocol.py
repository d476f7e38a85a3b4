"""The comparison protocol: trials on validation, selection, seeds on test.

In the spirit of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020):

1. every method gets the same number of trials (`sample_trials` of its own search
   space), the same epochs and the same backbone (`BenchmarkSpec.budget`), trained on
   the train split and scored on the validation split (one fixed trial seed);
2. each method's trial with the best validation Recall@1 is selected (ties: the first);
3. only then is the test split loaded (`load_split("test")`): every selected
   configuration is retrained on train + validation with each seed and evaluated on
   test once. Final runs go seed by seed across methods, so an interrupted benchmark
   still holds paired seeds for every method.

`run_on_folders` runs a preset in blocks (a method with its bases, e.g. proxy_anchor +
so_proxy), each block steps 1-3, so that a comparison completes before the next block
starts; a later block's selection still reads validation results only. Every run is
cached (`kdml.benchmark.runs`), so rerunning resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from kdml.benchmark.runs import RunSpec, cached_result, write_json_atomic
from kdml.benchmark.search import sample_trials
from kdml.benchmark.splits import ClassSplit

SELECTION_METRIC = "recall@1"


@dataclasses.dataclass(frozen=True)
class MethodPreset:
    """A benchmark row: fixed TrainConfig fields, its own search space, its bases.

    Attributes:
        config: TrainConfig fields of this row over the shared budget (e.g.
            `{"method": "so_proxy"}`).
        search: `{TrainConfig field: candidate values}` searched on validation.
        bases: rows this one is compared with (paired, same seeds).
        description: one line for the report.
    """

    config: Mapping
    search: Mapping[str, Sequence]
    bases: Tuple[str, ...] = ()
    description: str = ""


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """The whole comparison: shared budget, rows, trials, seeds and evaluation."""

    budget: Mapping  # TrainConfig fields every run shares (backbone, image size, epochs, ...)
    methods: Mapping[str, MethodPreset]
    trials: int = 3
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    trial_seed: int = 0
    search_seed: int = 0
    n_way: int = 20
    episodes: int = 1000
    # Rows run when none are named, in blocks: each block's trials and selection come
    # before its final runs, so a comparison (a method and its bases) completes early.
    default_blocks: Tuple[Tuple[str, ...], ...] = ()

    def run_config(self, method: str, params: Mapping, seed: int) -> Dict:
        return {**self.budget, **self.methods[method].config, **params, "seed": seed}


Execute = Callable[[RunSpec, str, str], Dict]  # (spec, train_dir, eval_dir) -> result


def trial_specs(spec: BenchmarkSpec, split: ClassSplit, method: str) -> List[Tuple[Dict, RunSpec]]:
    preset = spec.methods[method]
    return [(params, RunSpec(method, "trial", i, spec.run_config(method, params, spec.trial_seed),
                             "train", "validation", split.fingerprint("train"),
                             split.fingerprint("validation")))
            for i, params in enumerate(sample_trials(preset.search, spec.trials, spec.search_seed))]


def final_spec(spec: BenchmarkSpec, split: ClassSplit, method: str, params: Mapping,
               seed: int) -> RunSpec:
    return RunSpec(method, "final", seed, spec.run_config(method, params, seed),
                   "train+validation", "test", split.fingerprint("train+validation"),
                   split.fingerprint("test"), {"n_way": spec.n_way, "episodes": spec.episodes})


def select(trials: Sequence[Dict]) -> int:
    """Index of the trial with the highest validation Recall@1 (the first of ties)."""
    scores = [t["metrics"][SELECTION_METRIC] for t in trials]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def run_benchmark(spec: BenchmarkSpec, split: ClassSplit, load_split: Callable[[str], str],
                  execute: Execute, results_dir: str, methods: Optional[Sequence[str]] = None,
                  progress: Callable[[str], None] = print) -> Dict:
    """Runs (or resumes) the protocol; returns `{"selection": ..., "finals": ...}`.

    Args:
        spec: the benchmark.
        split: the class split; its test classes are only read through `load_split`.
        load_split: split name -> folder (`SplitFolders.load_split`); called with "test"
            only after every method's trial is selected.
        execute: runs one `RunSpec` (`runs.execute_in_subprocess` with its scratch dir); a
            RuntimeError is reported and the benchmark goes on without that run (a method
            with a failed trial gets no final runs).
        results_dir: where run JSON files and `selection.json` are written.
        methods: the rows to run, in order (default: all of `spec.methods`).
        progress: receives one line per run.
    """
    methods = list(methods or spec.methods)
    unknown = [m for m in methods if m not in spec.methods]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}. Valid methods: {', '.join(spec.methods)}.")
    total = len(methods) * (spec.trials + len(spec.seeds))
    counter = {"done": 0, "start": time.perf_counter()}

    def run(run_spec: RunSpec, train_dir: str, eval_dir: str, label: str) -> Optional[Dict]:
        counter["done"] += 1
        result = cached_result(run_spec, results_dir)
        status = "cached"
        if result is None:
            try:
                outcome = execute(run_spec, train_dir, eval_dir)
            except RuntimeError as error:  # reported, not cached: a rerun tries again
                progress(f"[{counter['done']}/{total}] {label}: FAILED, {error}")
                return None
            result = {**run_spec.to_json(), **outcome}
            write_json_atomic(run_spec.result_path(results_dir), result)
            status = f"{result.get('wall_s', 0.0):.0f} s"
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items())
        elapsed = time.perf_counter() - counter["start"]
        progress(f"[{counter['done']}/{total}] {label}: {metrics} ({status}; {elapsed / 60:.1f} min)")
        return result

    train_dir, validation_dir = load_split("train"), load_split("validation")
    selection = {}
    for method in methods:
        trials = []
        for params, run_spec in trial_specs(spec, split, method):
            shown = " ".join(f"{k}={v}" for k, v in params.items())
            trials.append(run(run_spec, train_dir, validation_dir,
                              f"{method} trial {run_spec.index + 1}/{spec.trials} {shown}"))
        if None in trials:
            progress(f"{method}: no selection and no final runs, {trials.count(None)} trial(s) failed.")
            continue
        best = select(trials)
        selection[method] = {"params": sample_params(trials[best], spec, method),
                             "trial": best, "validation": trials[best]["metrics"],
                             "trials": [{"params": sample_params(t, spec, method),
                                         "validation": t["metrics"], "key": t["key"]} for t in trials]}
        selection[method]["finals"] = {
            str(seed): final_spec(spec, split, method, selection[method]["params"], seed).key
            for seed in spec.seeds}
    write_selection(results_dir, spec, split, selection)

    trainval_dir, test_dir = load_split("train+validation"), load_split("test")
    finals: Dict[str, List[Dict]] = {m: [] for m in selection}
    for k, seed in enumerate(spec.seeds):
        for method in selection:
            run_spec = final_spec(spec, split, method, selection[method]["params"], seed)
            result = run(run_spec, trainval_dir, test_dir,
                         f"{method} seed {seed} ({k + 1}/{len(spec.seeds)})")
            if result is not None:
                finals[method].append(result)
    return {"selection": selection, "finals": finals}


def write_selection(results_dir: str, spec: BenchmarkSpec, split: ClassSplit,
                    selection: Mapping) -> None:
    """`<results_dir>/selection.json`: split, budget, and per method its trials, the chosen
    hyperparameters and the keys of its final runs (merged with rows selected earlier)."""
    path = os.path.join(results_dir, "selection.json")
    methods = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous.get("split") == split.to_json() and previous.get("budget") == _plain(spec.budget):
            methods = previous.get("methods", {})
    methods.update(selection)
    write_json_atomic(path, {
        "split": split.to_json(), "budget": _plain(spec.budget), "trials": spec.trials,
        "seeds": list(spec.seeds), "selection_metric": f"validation {SELECTION_METRIC}",
        "one_shot": {"n_way": spec.n_way, "episodes": spec.episodes},
        "planned": [m for block in spec.default_blocks for m in block] or list(spec.methods),
        "methods": {m: {**v, "description": spec.methods[m].description if m in spec.methods else "",
                        "bases": list(spec.methods[m].bases) if m in spec.methods else []}
                    for m, v in methods.items()},
    })


def unavailable(preset: MethodPreset, budget: Mapping) -> Optional[str]:
    """Why this kdml cannot run `preset` (an unknown TrainConfig field, method or backbone), or None."""
    from kdml.config import TrainConfig
    from kdml.methods import METHODS
    from kdml.models.backbones import BACKBONES

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = {**budget, **preset.config}
    missing = sorted(k for k in [*config, *preset.search] if k not in fields)
    if missing:
        return f"TrainConfig has no field {', '.join(missing)}"
    if config.get("method") not in METHODS:
        return f"unknown method {config.get('method')!r}"
    if config.get("backbone") is not None and config["backbone"] not in BACKBONES:
        return f"unknown backbone {config['backbone']!r}"
    return None


def _plain(mapping: Mapping) -> Dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in mapping.items()}


def sample_params(result: Mapping, spec: BenchmarkSpec, method: str) -> Dict:
    """The searched hyperparameters of a run result (its config restricted to the search space)."""
    return {k: result["config"][k] for k in spec.methods[method].search}


def run_on_folders(spec: BenchmarkSpec, roots: Sequence[str], results_dir: str, scratch_dir: str, *,
                   test_groups: Optional[Sequence[str]] = None, num_test_groups: int = 2,
                   num_validation_groups: int = 1, split_seed: int = 0,
                   methods: Optional[Sequence[str]] = None,
                   progress: Callable[[str], None] = print,
                   execute: Optional[Execute] = None) -> Dict:
    """`run_benchmark` on folder datasets `<root>/<group>/<class>/<image>`, each run in its
    own process (`execute_in_subprocess`); methods this kdml cannot run are skipped and
    reported. Split folders, checkpoints and logs go to `scratch_dir`, run JSON to
    `results_dir`; `execute` replaces the subprocess runner (tests)."""
    from kdml.benchmark.runs import execute_in_subprocess
    from kdml.benchmark.splits import SplitFolders, class_folders, group_split

    folders = class_folders(roots)
    split = group_split(sorted(folders), num_validation_groups=num_validation_groups,
                        num_test_groups=num_test_groups, test_groups=test_groups, seed=split_seed)
    progress(f"Split (seed {split_seed}): train {', '.join(split.train_groups)} "
             f"({len(split.classes['train'])} classes); validation {', '.join(split.validation_groups)} "
             f"({len(split.classes['validation'])}); test {', '.join(split.test_groups)} "
             f"({len(split.classes['test'])}).")
    blocks = [list(methods)] if methods else [list(b) for b in spec.default_blocks] or [list(spec.methods)]
    for block in blocks:
        for method in list(block):
            reason = unavailable(spec.methods[method], spec.budget) if method in spec.methods else None
            if reason:
                progress(f"Skipping {method}: {reason}.")
                block.remove(method)
    split_root = os.path.join(scratch_dir, "splits", split.fingerprint("train+validation")
                              + "-" + split.fingerprint("test"))
    splits = SplitFolders(folders, split, split_root)
    if execute is None:
        run_dir = os.path.join(scratch_dir, "runs")

        def execute(run_spec, train_dir, eval_dir):
            return execute_in_subprocess(run_spec, train_dir, eval_dir, run_dir)
    results = {"selection": {}, "finals": {}}
    for block in blocks:
        if block:
            done = run_benchmark(spec, split, splits.load_split, execute, results_dir,
                                 methods=block, progress=progress)
            for part in results:
                results[part].update(done[part])
    return results
