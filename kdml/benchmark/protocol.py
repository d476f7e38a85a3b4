"""The comparison protocol: trials on validation, selection, seeds on test.

In the spirit of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020):

1. every method gets the same trial budget (`BenchmarkSpec.trials` points of its own
   search grid, or the whole grid when it is smaller): trial 0 is the row's documented
   default (`default_params`), the others are drawn from the rest of its grid with a seed
   derived from the row's name (`search.row_seed`). Every run has the same epochs, steps
   per epoch, images per step and backbone (`BenchmarkSpec.budget`); trials train on the
   train split with each of `BenchmarkSpec.trial_seeds` and are scored on the validation
   split, logging validation Recall@1 after every epoch (the curves of the budget rule,
   `report.budget_rule`). A row that extends a base
   (`MethodPreset.extends`: so_proxy over proxy_anchor) inherits the base's chosen value
   of every shared hyperparameter and searches only its own, so that the pair differs in
   one thing; `check_pairs` refuses a comparison whose two sides differ elsewhere;
2. each method's trial with the best validation Recall@1 (the primary metric, declared
   here before any run), averaged over the trial seeds, is selected (ties: the first);
3. only then is the test split loaded (`load_split("test")`): every selected
   configuration is retrained on train + validation with each seed and evaluated on
   test once. Final runs go seed by seed across methods, so an interrupted benchmark
   still holds paired seeds for every method.

`run_on_folders` runs a preset in blocks (a method with its bases, e.g. proxy_anchor +
so_proxy), each block steps 1-3, so that a comparison completes before the next block
starts; a later block's selection still reads validation results only. Every run is
cached (`kdml.benchmark.runs`), so rerunning resumes; a failed run leaves a failure
record beside the results (`runs.failure_path`) that the report counts.

A row with `rerank_depths` (PDDM) is also reported re-ranked: its chosen trial and its
final runs get `"rerank_recall@1": {"<depth>": R@1}` added to their cached JSON, and the
depth is chosen on the chosen trial's validation scores (`select_depth`), before test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from kdml.benchmark.runs import (RunSpec, cached_result, code_fingerprint, failure_path,
                                 resolved_config, write_json_atomic)
from kdml.benchmark.runs import execute_in_subprocess, rerank_in_subprocess
from kdml.benchmark.search import grid_size, row_seed, sample_trials
from kdml.benchmark.splits import (ClassSplit, SplitFolders, class_folders, group_split,
                                   with_contents)
from kdml.config import TrainConfig
from kdml.methods import METHODS
from kdml.models.backbones import BACKBONES

# The primary metric: selection on validation and the "beats its base" verdict on test.
SELECTION_METRIC = PRIMARY_METRIC = "recall@1"
# The protocol version that selection.json records: 2 adds trial defaults, row seeds,
# trial seeds, validation curves, the equivalence margin and failure records.
PROTOCOL_VERSION = 2
# The training set-up: both sides of every comparison must agree on each of these (the
# budget a method is judged at); only the method and its own hyperparameters may differ.
SETUP_FIELDS = ("data_kind", "backbone", "weights", "embedding_dim", "image_size",
                "freeze_batchnorm", "augmentation", "eval_crop_fraction", "classes_per_batch",
                "images_per_class", "views", "epochs", "steps_per_epoch", "lr", "weight_decay", "proxy_lr_multiplier",
                "warmup_epochs", "strategy", "mixed_precision", "jit_compile", "eval_batch_size",
                "recall_ks")


@dataclasses.dataclass(frozen=True)
class MethodPreset:
    """A benchmark row: fixed TrainConfig fields, its own search space, its bases.

    Attributes:
        config: TrainConfig fields of this row over the shared budget (e.g.
            `{"method": "so_proxy"}`).
        search: `{TrainConfig field: candidate values}` searched on validation.
        bases: rows this one is compared with (paired, same seeds).
        extends: the base this row adds one thing to (a row of `bases`): it inherits that
            base's chosen value of every hyperparameter the base searched, and searches
            only its own `search`; the pair may differ only in `config` and `search`.
        description: one line for the report.
        rerank_depths: top-k depths at which the run's saved pair scorer (`pddm.keras`)
            re-ranks the embedding's neighbours; () = no re-ranking row. Depth 1 is the
            embedding's own Recall@1, so validation may choose not to re-rank.
        defaults: the row's documented default of a searched field where it is not
            TrainConfig's (e.g. xbm_size: 0 there means "no memory"); every other
            searched field defaults to the row's resolved TrainConfig value.
        default_source: where the row's default comes from (a paper, or
            pytorch-metric-learning), for the docs' grid table.
    """

    config: Mapping
    search: Mapping[str, Sequence]
    bases: Tuple[str, ...] = ()
    extends: Optional[str] = None
    description: str = ""
    rerank_depths: Tuple[int, ...] = ()
    defaults: Mapping = dataclasses.field(default_factory=dict)
    default_source: str = ""

    def __post_init__(self):
        if self.extends is not None and self.extends not in self.bases:
            raise ValueError(f"`extends={self.extends!r}` must be one of `bases` {self.bases}.")
        setup = sorted(set(self.search) & set(SETUP_FIELDS + ("seed",)))
        if setup:
            raise ValueError(
                f"The search space of {self.description or self.config} names the training "
                f"set-up field(s) {', '.join(setup)}: every row of a comparison trains with the "
                "same set-up. Set them in the benchmark's budget, not in a row's search.")
        unknown = sorted(set(self.defaults) - set(self.search))
        if unknown:
            raise ValueError(f"`defaults` names {', '.join(unknown)}, which the row does not search.")


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """The whole comparison: shared budget, rows, trials, seeds and evaluation."""

    budget: Mapping  # TrainConfig fields every run shares (backbone, image size, epochs, ...)
    methods: Mapping[str, MethodPreset]
    trials: int = 3
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    # Each trial trains with every one of these seeds; it is chosen by their mean.
    trial_seeds: Tuple[int, ...] = (0,)
    search_seed: int = 0
    n_way: int = 20
    episodes: int = 1000
    # Rows run when none are named, in blocks: each block's trials and selection come
    # before its final runs, so a comparison (a method and its bases) completes early.
    default_blocks: Tuple[Tuple[str, ...], ...] = ()
    # One paragraph for the report on what the split was used for before (e.g. an earlier,
    # withdrawn comparison that read the same test classes), and where that is recorded.
    history: str = ""
    # A results.json of an earlier protocol, relative to the results folder, whose paired
    # differences the report quotes next to the new ones ("" = none).
    previous_results: str = ""
    # A leaderboard (one backbone and budget for every row): the report sorts the rows by
    # the primary metric and adds the spread between them; otherwise rows keep run order.
    leaderboard: bool = False
    # The equivalence margin Delta (Recall@1, absolute), declared before any run: a
    # comparison is "equivalent" when two one-sided paired t-tests put the difference
    # inside +-margin at the Holm-adjusted level (`stats.tost`). None: no equivalence test.
    margin: Optional[float] = 0.02
    # The power at which the report states each comparison's minimum detectable difference.
    power: float = 0.8
    # The rows whose validation curves decide the budget (`report.budget_rule`).
    budget_rows: Tuple[str, ...] = ()
    # The family of the table's comparisons (Holm's correction runs over it alone).
    family: str = ""

    def run_config(self, method: str, params: Mapping, seed: int) -> Dict:
        return {**self.budget, **self.methods[method].config, **params, "seed": seed}

    def num_trials(self, method: str) -> int:
        """Trials of `method`: the shared budget, or its whole grid when that is smaller."""
        return min(self.trials, grid_size(self.methods[method].search))

    def search_description(self, method: str) -> str:
        size, n = grid_size(self.methods[method].search), self.num_trials(method)
        if n == size:
            return f"full grid ({size} point{'s' if size != 1 else ''})"
        return f"{n} of {size} grid points (the default, then seeded random)"


def default_params(spec: BenchmarkSpec, method: str) -> Dict:
    """The row's default point of its own search grid: `MethodPreset.defaults`, else the
    value of each searched field in the row's resolved configuration (TrainConfig's
    default, which kdml takes from the paper or from pytorch-metric-learning)."""
    preset = spec.methods[method]
    resolved = resolved_config(spec.run_config(method, {}, 0))
    return {k: preset.defaults.get(k, resolved.get(k)) for k in sorted(preset.search)}


def row_trials(spec: BenchmarkSpec, method: str) -> List[Dict]:
    """The own hyperparameters of each trial of `method`: its default first, then a draw
    from the rest of its grid seeded by the row's name."""
    preset = spec.methods[method]
    return sample_trials(preset.search, spec.num_trials(method),
                         row_seed(method, spec.search_seed),
                         default_params(spec, method) if preset.search else None)


def check_pairs(spec: BenchmarkSpec, methods: Sequence[str]) -> None:
    """Refuses (ValueError, one line) a comparison whose sides differ in more than the
    method: every pair must agree on the training set-up (`SETUP_FIELDS`, resolved); an
    `extends` row may differ from its base only in `method` and the method-specific fields
    its two rows set in `config`, and searches nothing its base searched."""
    for method in methods:
        preset = spec.methods[method]
        for base in preset.bases:
            if base not in spec.methods:
                raise ValueError(f"Row {method!r} names an unknown base {base!r}.")
            mine = resolved_config(spec.run_config(method, {}, 0))
            theirs = resolved_config(spec.run_config(base, {}, 0))
            fields, allowed = list(SETUP_FIELDS), set()
            if base == preset.extends:
                both = set(spec.methods[base].search) & set(preset.search)
                if both:
                    raise ValueError(
                        f"Row {method} extends {base} but searches {', '.join(sorted(both))} "
                        f"again: it inherits {base}'s chosen values. Drop them from its search.")
                fields = sorted(set(mine) | set(theirs))
                allowed = (set(preset.config) | set(spec.methods[base].config) | set(preset.search)
                           | set(spec.methods[base].search)) - set(SETUP_FIELDS)
            field = _first_difference(mine, theirs, fields, allowed)
            if field is not None:
                raise ValueError(
                    f"Comparison {method} vs {base} is not like for like: {field} is "
                    f"{mine.get(field)!r} vs {theirs.get(field)!r}. Give both rows the same "
                    f"{field}, or compare {method} with a base that has it.")


def _first_difference(mine: Mapping, theirs: Mapping, fields: Sequence[str],
                      allowed: set) -> Optional[str]:
    """The first of `fields` outside `allowed` on which two resolved configurations differ."""
    return next((f for f in fields if f not in allowed and mine.get(f) != theirs.get(f)), None)


Execute = Callable[[RunSpec, str, str], Dict]  # (spec, train_dir, eval_dir) -> result
# (spec, its result, eval_dir, depths) -> {"rerank_recall@1": {"<depth>": R@1}, ...}, or None
# when the run's saved models are missing (`runs.rerank_in_subprocess` with its scratch dir).
Rerank = Callable[[RunSpec, Mapping, str, Sequence[int]], Optional[Dict]]
RERANK_FIELD = "rerank_recall@1"


def trial_specs(spec: BenchmarkSpec, split: ClassSplit, method: str,
                inherited: Optional[Mapping] = None) -> List[Tuple[Dict, List[RunSpec]]]:
    """`(own params, [RunSpec per trial seed])` of each trial of `method`; `inherited`: its
    base's chosen values."""
    return [(params, [RunSpec(method, "trial", i,
                              spec.run_config(method, {**(inherited or {}), **params}, seed),
                              "train", "validation", split.fingerprint("train"),
                              split.fingerprint("validation"))
                      for seed in spec.trial_seeds])
            for i, params in enumerate(row_trials(spec, method))]


def final_spec(spec: BenchmarkSpec, split: ClassSplit, method: str, params: Mapping,
               seed: int) -> RunSpec:
    return RunSpec(method, "final", seed, spec.run_config(method, params, seed),
                   "train+validation", "test", split.fingerprint("train+validation"),
                   split.fingerprint("test"), {"n_way": spec.n_way, "episodes": spec.episodes})


def select(trials: Sequence[Dict]) -> int:
    """Index of the trial with the highest validation Recall@1 (the first of ties)."""
    scores = [t["metrics"][SELECTION_METRIC] for t in trials]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def mean_metrics(runs: Sequence[Mapping]) -> Dict:
    """`{"metrics": mean of each metric over `runs`}`: a trial's score over its seeds."""
    names = [k for k in runs[0]["metrics"] if all(k in r["metrics"] for r in runs)]
    return {"metrics": {k: sum(float(r["metrics"][k]) for r in runs) / len(runs) for k in names}}


def select_depth(scores: Mapping) -> int:
    """The re-ranking depth with the highest (validation) Recall@1; ties: the smallest depth."""
    by_depth = {int(d): float(r) for d, r in scores.items()}
    return max(sorted(by_depth), key=lambda d: (by_depth[d], -d))


def retrained_copy(run_spec: RunSpec) -> RunSpec:
    """The same run (same key) under stage `<stage>_retrained`: its own scratch folder."""
    return dataclasses.replace(run_spec, stage=f"{run_spec.stage}_retrained")


def check_selected_pairs(spec: BenchmarkSpec, selection: Mapping) -> None:
    """After selection, every compared pair of selected rows: the final configurations
    agree on the training set-up (`SETUP_FIELDS`), and an `extends` pair differs only in
    what the row sets in `config` and its own search (ValueError, one line, otherwise)."""
    for method, chosen in selection.items():
        preset = spec.methods[method]
        for base in preset.bases:
            if base not in selection:
                continue
            mine = resolved_config(spec.run_config(method, chosen["params"], 0))
            theirs = resolved_config(spec.run_config(base, selection[base]["params"], 0))
            fields, allowed = list(SETUP_FIELDS), set()
            if base == preset.extends:
                fields = sorted(set(mine) | set(theirs))
                allowed = (set(preset.config) | set(spec.methods[base].config)
                           | set(preset.search)) - set(SETUP_FIELDS)
            field = _first_difference(mine, theirs, fields, allowed)
            if field is not None:
                raise ValueError(
                    f"Comparison {method} vs {base} is not like for like after selection: "
                    f"{field} is {mine.get(field)!r} vs {theirs.get(field)!r}.")


def run_benchmark(spec: BenchmarkSpec, split: ClassSplit, load_split: Callable[[str], str],
                  execute: Execute, results_dir: str, methods: Optional[Sequence[str]] = None,
                  progress: Callable[[str], None] = print, rerank: Optional[Rerank] = None,
                  final_runs: bool = True) -> Dict:
    """Runs (or resumes) the protocol; returns `{"selection": ..., "finals": ...}`.

    Args:
        spec: the benchmark.
        split: the class split; its test classes are only read through `load_split`.
        load_split: split name -> folder (`SplitFolders.load_split`); called with "test"
            only after every method's trial is selected.
        execute: runs one `RunSpec` (`runs.execute_in_subprocess` with its scratch dir); a
            RuntimeError is reported, recorded (`runs.failure_path`: config, seed, error
            and the step where it happened) and the benchmark goes on without that run (a
            method with a failed trial gets no final runs).
        results_dir: where run JSON files and `selection.json` are written.
        methods: the rows to run, in order (default: all of `spec.methods`).
        progress: receives one line per run.
        rerank: re-ranks an executed run (`Rerank`), for rows with `rerank_depths`: the
            chosen trial (its scores choose the depth, stored in `selection.json`) and
            every final run. Scores are added to the run's cached JSON (same key). A run
            whose saved models are gone is executed again once (`retrained_copy`); its
            cached metrics stay, the JSON records `rerank_from_retrained_run` and the
            copy's own Recall@1. None: no re-ranking.
        final_runs: False stops after the trials and the selection (`--trials_only`): the
            test split is never loaded and the final runs stay listed as missing.
    """
    methods = list(methods or spec.methods)
    unknown = [m for m in methods if m not in spec.methods]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}. Valid methods: {', '.join(spec.methods)}.")
    check_pairs(spec, methods)
    check_one_code(results_dir)
    total = sum(spec.num_trials(m) * len(spec.trial_seeds) + len(spec.seeds) for m in methods)
    counter = {"done": 0, "start": time.perf_counter()}

    def run(run_spec: RunSpec, train_dir: str, eval_dir: str, label: str) -> Optional[Dict]:
        counter["done"] += 1
        result = cached_result(run_spec, results_dir)
        status = "cached"
        if result is None:
            try:
                outcome = execute(run_spec, train_dir, eval_dir)
            except RuntimeError as error:  # reported and recorded, not cached: a rerun tries again
                record_failure(run_spec, results_dir, error)
                progress(f"[{counter['done']}/{total}] {label}: FAILED, {error}")
                return None
            result = {**run_spec.to_json(), **outcome}
            write_json_atomic(run_spec.result_path(results_dir), result)
            status = f"{result.get('wall_s', 0.0):.0f} s"
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items())
        elapsed = time.perf_counter() - counter["start"]
        progress(f"[{counter['done']}/{total}] {label}: {metrics} ({status}; {elapsed / 60:.1f} min)")
        return result

    def with_rerank(run_spec: RunSpec, result: Dict, train_dir: str, eval_dir: str,
                    label: str) -> Dict:
        """`result` with its re-ranking scores (computed and cached once)."""
        depths = spec.methods[run_spec.method].rerank_depths
        if not depths or RERANK_FIELD in result:
            return result
        if rerank is None:
            progress(f"{label}: re-ranking skipped (no re-ranking evaluator).")
            return result
        extra = {}
        try:
            scores = rerank(run_spec, result, eval_dir, depths)
            if scores is None:
                progress(f"{label}: its scratch folder lacks the saved embedder + pair scorer "
                         "(e.g. run before pddm.keras was saved); retraining a copy of it for "
                         "the re-ranking scores only (the cached metrics are kept)")
                copy_spec = retrained_copy(run_spec)
                copy = execute(copy_spec, train_dir, eval_dir)
                scores = rerank(copy_spec, {**copy_spec.to_json(), **copy}, eval_dir, depths)
                if scores is None:
                    raise RuntimeError("the retrained copy saved no embedder + pair scorer")
                extra = {"rerank_from_retrained_run": True,
                         "rerank_retrained_recall@1": copy["metrics"][SELECTION_METRIC],
                         "rerank_retrained_wall_s": copy.get("wall_s")}
                progress(f"{label}: retrained copy recall@1={copy['metrics'][SELECTION_METRIC]:.4f} "
                         f"(cached run {result['metrics'][SELECTION_METRIC]:.4f})")
        except RuntimeError as error:  # reported, not cached: a rerun tries again
            progress(f"{label} re-ranking: FAILED, {error}")
            return result
        result = {**result, **scores, **extra}
        write_json_atomic(run_spec.result_path(results_dir), result)
        shown = ", ".join(f"{d}: {r:.4f}" for d, r in result[RERANK_FIELD].items())
        progress(f"{label} re-ranked Recall@1 by top_k {{{shown}}}"
                 f"{' (retrained copy)' if extra else ''}")
        return result

    train_dir, validation_dir = load_split("train"), load_split("validation")
    selection = {}
    for method in methods:
        inherited = _inherited_params(spec, split, method, selection, results_dir)
        if inherited is None:
            progress(f"{method}: no selection and no final runs: its base "
                     f"{spec.methods[method].extends} has no selection.")
            continue
        seeded, specs = [], trial_specs(spec, split, method, inherited)
        for i, (params, run_specs) in enumerate(specs):
            shown = " ".join(f"{k}={v}" for k, v in params.items()) or "(nothing of its own)"
            default = " (default)" if i == 0 and params else ""
            seeded.append([run(run_spec, train_dir, validation_dir,
                               f"{method} trial {i + 1}/{len(specs)}{default} {shown}"
                               + (f" seed {run_spec.config['seed']}" if len(run_specs) > 1 else ""))
                           for run_spec in run_specs])
        failed = sum(r is None for runs in seeded for r in runs)
        if failed:
            progress(f"{method}: no selection and no final runs, {failed} trial run(s) failed.")
            continue
        trials = [mean_metrics(runs) for runs in seeded]
        best = select(trials)
        selection[method] = {"params": sample_params(seeded[best][0], spec, method, inherited),
                             "inherited": dict(inherited),
                             "extends": spec.methods[method].extends,
                             "search": spec.search_description(method),
                             "grid": _plain(spec.methods[method].search),
                             "default": default_params(spec, method),
                             "code": code_fingerprint(),
                             "trial": best, "validation": trials[best]["metrics"],
                             "trials": [{"params": sample_params(runs[0], spec, method),
                                         "validation": trial["metrics"],
                                         "validation_seeds": [r["metrics"][SELECTION_METRIC]
                                                              for r in runs],
                                         "key": runs[0]["key"], "keys": [r["key"] for r in runs],
                                         "default": i == 0 and bool(spec.methods[method].search)}
                                        for i, (trial, runs) in enumerate(zip(trials, seeded))]}
        depths = spec.methods[method].rerank_depths
        if depths:  # chosen on validation, before anything reads test
            chosen = with_rerank(specs[best][1][0], seeded[best][0], train_dir, validation_dir,
                                 f"{method} trial {best + 1}/{len(specs)} (chosen)")
            selection[method]["rerank_depths"] = list(depths)
            if RERANK_FIELD in chosen:
                scores = chosen[RERANK_FIELD]
                top_k = select_depth(scores)
                selection[method]["rerank"] = {"top_k": top_k, "validation": scores}
                if chosen.get("rerank_from_retrained_run"):
                    selection[method]["rerank"].update({
                        "from_retrained_run": True,
                        "retrained_recall@1": chosen["rerank_retrained_recall@1"]})
                progress(f"{method}: re-ranking top_k={top_k} chosen on validation "
                         f"(Recall@1 {scores[str(top_k)]:.4f}; without re-ranking "
                         f"{scores.get('1', float('nan')):.4f})")
        selection[method]["finals"] = {
            str(seed): final_spec(spec, split, method, selection[method]["params"], seed).key
            for seed in spec.seeds}
    check_selected_pairs(spec, selection)
    write_selection(results_dir, spec, split, selection)
    if not final_runs:
        progress("Trials and selection done; no final runs (--trials_only), test not read.")
        return {"selection": selection, "finals": {}}

    trainval_dir, test_dir = load_split("train+validation"), load_split("test")
    finals: Dict[str, List[Dict]] = {m: [] for m in selection}
    for k, seed in enumerate(spec.seeds):
        for method in selection:
            run_spec = final_spec(spec, split, method, selection[method]["params"], seed)
            label = f"{method} seed {seed} ({k + 1}/{len(spec.seeds)})"
            result = run(run_spec, trainval_dir, test_dir, label)
            if result is not None:
                result = with_rerank(run_spec, result, trainval_dir, test_dir, label)
                finals[method].append(result)
    return {"selection": selection, "finals": finals}


def record_failure(run_spec: RunSpec, results_dir: str, error: Exception) -> None:
    """Writes the failure record of `run_spec` (`runs.failure_path`): its configuration,
    seed, code, the error and the training step it stopped at (None when unknown)."""
    write_json_atomic(failure_path(run_spec, results_dir), {
        "method": run_spec.method, "stage": run_spec.stage, "index": run_spec.index,
        "key": run_spec.key, "code": run_spec.code, "seed": run_spec.config.get("seed"),
        "config": {k: _plain_value(v) for k, v in run_spec.config.items()},
        "error": str(getattr(error, "error", None) or error).strip().splitlines()[-1][:500],
        "step": getattr(error, "step", None)})


def _plain_value(value):
    return list(value) if isinstance(value, tuple) else value


def check_one_code(results_dir: str) -> None:
    """Refuses (ValueError, one line) to add rows to a `selection.json` written by other
    kdml code: a table's rows, their inherited values and its verdicts come from one code
    fingerprint."""
    path = os.path.join(results_dir, "selection.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        stored = json.load(f).get("code")
    if stored != code_fingerprint():
        raise ValueError(
            f"{path} was written by kdml code {stored!r}, this checkout is "
            f"{code_fingerprint()!r}: its rows would mix with rows of this code. Move the "
            "results folder away (or pass another --results_dir) and run every row again.")


def write_selection(results_dir: str, spec: BenchmarkSpec, split: ClassSplit,
                    selection: Mapping) -> None:
    """`<results_dir>/selection.json`: split, budget, and per method its trials, the chosen
    hyperparameters and the keys of its final runs (merged with rows selected earlier by
    the same code, split and budget)."""
    path = os.path.join(results_dir, "selection.json")
    methods = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if (previous.get("split") == split.to_json() and previous.get("budget") == _plain(spec.budget)
                and previous.get("code") == code_fingerprint()):
            methods = previous.get("methods", {})
    methods.update(selection)
    write_json_atomic(path, {
        "protocol": PROTOCOL_VERSION,
        "split": split.to_json(), "budget": _plain(spec.budget), "trials": spec.trials,
        "trial_seeds": list(spec.trial_seeds),
        "seeds": list(spec.seeds), "selection_metric": f"validation {SELECTION_METRIC}",
        "primary_metric": PRIMARY_METRIC, "code": code_fingerprint(),
        "margin": spec.margin, "power": spec.power, "budget_rows": list(spec.budget_rows),
        "family": spec.family,
        "history": spec.history, "previous_results": spec.previous_results,
        **({"leaderboard": True} if spec.leaderboard else {}),
        "one_shot": {"n_way": spec.n_way, "episodes": spec.episodes},
        "planned": [m for block in spec.default_blocks for m in block] or list(spec.methods),
        "methods": {m: {**v, "description": spec.methods[m].description if m in spec.methods else "",
                        "bases": list(spec.methods[m].bases) if m in spec.methods else []}
                    for m, v in methods.items()},
    })


def unavailable(preset: MethodPreset, budget: Mapping) -> Optional[str]:
    """Why this kdml cannot run `preset` (an unknown TrainConfig field, method or backbone), or None."""

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


def sample_params(result: Mapping, spec: BenchmarkSpec, method: str,
                  inherited: Optional[Mapping] = None) -> Dict:
    """The hyperparameters of a run result: `inherited` ones, then its own search space's."""
    return {k: result["config"][k] for k in [*(inherited or {}), *spec.methods[method].search]}


def _inherited_params(spec: BenchmarkSpec, split: ClassSplit, method: str, selection: Mapping,
                      results_dir: str) -> Optional[Dict]:
    """The chosen params of `method`'s `extends` base ({} when it extends nothing): from this
    block's selection, else from `selection.json` of the same split and budget; None if the
    base has no selection yet."""
    base = spec.methods[method].extends
    if base is None:
        return {}
    if base in selection:
        return dict(selection[base]["params"])
    path = os.path.join(results_dir, "selection.json")
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if (stored.get("split") == split.to_json() and stored.get("budget") == _plain(spec.budget)
                and base in stored.get("methods", {})):
            code = stored["methods"][base].get("code", stored.get("code"))
            if code != code_fingerprint():
                raise ValueError(
                    f"{path}: {method}'s base {base} was selected by kdml code {code!r}, not this "
                    f"checkout's {code_fingerprint()!r}; run {base} again before {method}.")
            return dict(stored["methods"][base]["params"])
    return None


def run_on_folders(spec: BenchmarkSpec, roots: Sequence[str], results_dir: str, scratch_dir: str, *,
                   test_groups: Optional[Sequence[str]] = None, num_test_groups: int = 2,
                   num_validation_groups: int = 1, split_seed: int = 0,
                   methods: Optional[Sequence[str]] = None,
                   progress: Callable[[str], None] = print,
                   execute: Optional[Execute] = None, rerank: Optional[Rerank] = None,
                   final_runs: bool = True) -> Dict:
    """`run_benchmark` on folder datasets `<root>/<group>/<class>/<image>`, each run in its
    own process (`execute_in_subprocess`); methods this kdml cannot run are skipped and
    reported. Split folders, checkpoints and logs go to `scratch_dir`, run JSON to
    `results_dir`; `execute` and `rerank` replace the subprocess runner and re-ranker (tests)."""

    folders = class_folders(roots)
    split = group_split(sorted(folders), num_validation_groups=num_validation_groups,
                        num_test_groups=num_test_groups, test_groups=test_groups, seed=split_seed)
    split = with_contents(split, folders)
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
    splits = SplitFolders(folders, split, os.path.join(scratch_dir, "splits"))
    run_dir = os.path.join(scratch_dir, "runs")
    if execute is None:
        def execute(run_spec, train_dir, eval_dir):
            return execute_in_subprocess(run_spec, train_dir, eval_dir, run_dir)
    if rerank is None:
        def rerank(run_spec, result, eval_dir, depths):
            return rerank_in_subprocess(run_spec, result, eval_dir, depths, run_dir)
    results = {"selection": {}, "finals": {}}
    for block in blocks:
        if block:
            done = run_benchmark(spec, split, splits.load_split, execute, results_dir,
                                 methods=block, progress=progress, rerank=rerank,
                                 final_runs=final_runs)
            for part in results:
                results[part].update(done[part])
    return results


def grid_table(spec: BenchmarkSpec) -> str:
    """Markdown: each row's own search grid with its default in bold, the trials it gets,
    and where the default comes from (`MethodPreset.default_source`); the docs' grid
    tables are this text (a test regenerates them)."""
    lines = ["| row | its own grid (default in bold) | trials | default from |",
             "|---|---|---|---|"]
    for name, preset in spec.methods.items():
        default = default_params(spec, name) if preset.search else {}
        grid = " x ".join(
            f"{field} {{" + ", ".join(f"**{v:g}**" if isinstance(v, float) and v == default[field]
                                      else f"**{v}**" if v == default[field]
                                      else (f"{v:g}" if isinstance(v, float) else str(v))
                                      for v in preset.search[field]) + "}"
            for field in sorted(preset.search)) or "nothing (inherits its base's choice)"
        lines.append(f"| `{name}` | {grid} | {spec.search_description(name)} | "
                     f"{preset.default_source} |")
    return "\n".join(lines) + "\n"
