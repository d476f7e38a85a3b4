"""The benchmark's report, generated from its run files: JSON summary, markdown, plot.

`write_report(results_dir)` reads `selection.json` and the final runs it names
(`runs/<method>/final-<seed>-<key>.json`), and writes `results.json` (every final run,
mean and 95 % t interval per metric, paired differences to each base, Holm-adjusted
p-values), `results.md` (the tables and the verdicts) and `results.png` (the metrics and
the differences with their intervals). Missing runs are listed, never filled in.

The verdict rests on one primary metric, Recall@1, declared before any run
(`protocol.PRIMARY_METRIC`), and on an equivalence margin Delta declared in the preset
before any run (`BenchmarkSpec.margin`). Each comparison ends as one of
- **beats** / **below**: the two-sided paired t-test p-value, Holm-adjusted over every
  comparison of the table (the table is one family), is below 0.05;
- **equivalent**: otherwise, the two one-sided tests (`stats.tost`) put the difference
  inside +-Delta at the Holm-adjusted level (Holm over the family's TOST p-values);
- **inconclusive**: neither.
Each comparison also states its minimum detectable difference at the level of Holm's
first step (alpha / m) and 80 % power (`stats.minimum_detectable_difference`). The other
metrics are descriptive. Every sentence about who wins is generated here from the same
numbers as the tables.

Runs of protocol 2 (`protocol.PROTOCOL_VERSION`) are checked here: every run stores its
`resolved_config`, was made by the table's code, and (when this checkout is that code)
resolves to the configuration the protocol predicts; anything else is an error. A table
of the previous protocol (no trial curves, no margin) is rendered and marked as such.

A row whose selection chose a re-ranking depth (PDDM) gets a derived row `<method>_rerank`:
Recall@1 of each final run re-ranked at that depth (`rerank_recall@1` of its JSON),
compared with the row itself. `update_readme` puts the report between
`<!-- results:start -->` and `<!-- results:end -->` of a markdown file.
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Union

from kdml.benchmark.runs import _NOT_IN_KEY, code_fingerprint, resolved_config, write_json_atomic
from kdml.benchmark.stats import (holm, mean_interval, minimum_detectable_difference,
                                  paired_difference, tost)

METRICS = (("recall@1", "Recall@1"), ("map@r", "MAP@R"), ("r_precision", "R-Precision"),
           ("one_shot", "20-way 1-shot"))
PRIMARY = "recall@1"
ALPHA = 0.05
START, END = "<!-- results:start -->", "<!-- results:end -->"


def markers(block: Optional[str] = None):
    """(start, end) comment lines around a generated block: the main results block, or the
    one named `block` (`<!-- results:<block>:start -->`), for a second table on a page."""
    return (START, END) if not block else (f"<!-- results:{block}:start -->",
                                           f"<!-- results:{block}:end -->")
RERANK_SUFFIX = "_rerank"
RERANK_DESCRIPTION = "PDDM unit re-ranks the top-k cosine neighbours (top_k chosen on validation)"
# What must agree for two rows to be compared at all (besides the method); protocol 2
# adds the batch geometry and the steps (the images each run sees).
_LIKE_FOR_LIKE = ("backbone", "embedding_dim", "image_size", "epochs")
_LIKE_FOR_LIKE_2 = _LIKE_FOR_LIKE + ("classes_per_batch", "images_per_class", "views",
                                     "steps_per_epoch")
POWER = 0.8
CURVES = "curves.png"


def check_run(run: Dict, path: str, code: Optional[str]) -> None:
    """Raises ValueError (one line) when a protocol-2 run file is not what its table claims:
    no `resolved_config`, another code fingerprint than the table's, a configured field its
    run resolved otherwise, or (when this checkout is the table's code) a resolved
    configuration other than what `runs.resolved_config` predicts now."""
    stored = run.get("resolved_config")
    if not stored:
        raise ValueError(f"{path}: stores no resolved_config; the run cannot be checked. "
                         "Re-run it (delete the file) under the current protocol.")
    if run.get("code") != code:
        raise ValueError(f"{path}: made by kdml code {run.get('code')!r}, the table by {code!r}. "
                         "Re-run it so that the table comes from one code.")
    for field, value in (run.get("config") or {}).items():
        if field not in _NOT_IN_KEY and stored.get(field) != value:
            raise ValueError(f"{path}: config sets {field}={value!r} but the run resolved "
                             f"{stored.get(field)!r}.")
    if code == code_fingerprint():
        expected = resolved_config(run.get("config") or {})
        for field in sorted(set(expected) | set(stored)):
            if field not in _NOT_IN_KEY and stored.get(field) != expected.get(field):
                raise ValueError(f"{path}: resolved_config field {field!r} is "
                                 f"{stored.get(field)!r}, the protocol resolves "
                                 f"{expected.get(field)!r}.")


def _load_run(path: str, protocol: int, code: Optional[str]) -> Dict:
    with open(path) as f:
        run = json.load(f)
    if protocol >= 2:
        check_run(run, path, code)
    return run


def _failures(results_dir: str, name: str) -> List[Dict]:
    """The failure records of row `name` (`runs.failure_path`), oldest name first."""
    records = []
    for path in sorted(glob.glob(os.path.join(results_dir, "runs", name, "*.failed.json"))):
        with open(path) as f:
            record = json.load(f)
        records.append({k: record.get(k) for k in ("stage", "index", "seed", "error", "step")})
    return records


def images_per_step(setup: Dict) -> Optional[int]:
    """P x K x views of a row's resolved set-up (None when unknown)."""
    p, k = setup.get("classes_per_batch"), setup.get("images_per_class")
    return None if p is None or k is None else int(p) * int(k) * int(setup.get("views") or 1)


def collect(results_dir: str) -> Dict:
    """The summary dict of `results.json` (see the module docstring)."""
    with open(os.path.join(results_dir, "selection.json")) as f:
        selection = json.load(f)
    budget = selection["budget"]
    protocol = int(selection.get("protocol", 1))
    like_for_like = _LIKE_FOR_LIKE_2 if protocol >= 2 else _LIKE_FOR_LIKE
    methods, missing, wall = {}, [], []
    for name, chosen in selection["methods"].items():
        runs, reranked, setup = {}, {}, {}
        for seed, key in chosen["finals"].items():
            path = os.path.join(results_dir, "runs", name, f"final-{seed}-{key}.json")
            if os.path.exists(path):
                run = _load_run(path, protocol, selection.get("code"))
                runs[int(seed)] = {"metrics": run["metrics"], "wall_s": run.get("wall_s"),
                                   "one_shot_ci95": run.get("one_shot_ci95")}
                reranked[int(seed)] = {k: run[k] for k in _RERANK_KEYS if k in run}
                config = {**budget, **run.get("config", {}), **(run.get("resolved_config") or {})}
                setup = {k: config.get(k) for k in _LIKE_FOR_LIKE_2}
            else:
                missing.append(f"{name} seed {seed}")
        trial_walls, curves, trial_setup = _trial_walls(results_dir, name, chosen, protocol,
                                                        selection.get("code"))
        if not setup and trial_setup:  # no final run yet: the set-up its trials resolved
            config = {**budget, **trial_setup}
            setup = {k: config.get(k) for k in _LIKE_FOR_LIKE_2}
        wall += [r["wall_s"] for r in runs.values() if r["wall_s"]] + trial_walls
        wall += [r["rerank_retrained_wall_s"] for r in reranked.values()
                 if r.get("rerank_retrained_wall_s")]
        summary = {k: mean_interval([r["metrics"][k] for r in runs.values()])
                   for k, _ in METRICS if runs and all(k in r["metrics"] for r in runs.values())}
        methods[name] = {"description": chosen.get("description", ""), "bases": chosen.get("bases", []),
                         "extends": chosen.get("extends"), "inherited": chosen.get("inherited", {}),
                         "search": chosen.get("search", ""), "setup": setup,
                         "params": chosen["params"], "validation": chosen["validation"],
                         "trials": chosen["trials"], "seeds": sorted(runs), "finals": runs,
                         "summary": summary, "curves": curves,
                         "failures": _failures(results_dir, name),
                         "default": chosen.get("default"), "grid": chosen.get("grid"),
                         "chosen_trial": chosen.get("trial"),
                         "mean_wall_s": (sum(r["wall_s"] for r in runs.values()) / len(runs)
                                         if runs and all(r["wall_s"] for r in runs.values())
                                         else None)}
        if chosen.get("rerank"):
            methods[name + RERANK_SUFFIX] = _rerank_row(name, chosen["rerank"], reranked, missing,
                                                        setup)
        elif chosen.get("rerank_depths"):
            missing.append(f"{name}{RERANK_SUFFIX} (no re-ranking depth chosen yet)")
    missing += [f"{name} (not yet selected)" for name in selection.get("planned", [])
                if name not in methods]
    leaderboard = bool(selection.get("leaderboard"))
    if leaderboard:  # best first by the primary metric's mean; rows without finals last
        methods = dict(sorted(methods.items(), key=lambda item: -item[1]["summary"][PRIMARY]["mean"]
                              if PRIMARY in item[1]["summary"] else math.inf))
    comparisons, not_drawn = [], []
    for name, m in methods.items():
        for base in m["bases"]:
            if base not in methods:
                missing.append(f"{base} (base of {name}) not run")
                continue
            differ = [k for k in like_for_like if m["setup"] and methods[base]["setup"]
                      and m["setup"].get(k) != methods[base]["setup"].get(k)]
            if differ:
                not_drawn.append(f"{name} vs {base} (different {', '.join(differ)})")
                continue
            seeds = sorted(set(m["finals"]) & set(methods[base]["finals"]))
            entry = {"method": name, "base": base, "seeds": seeds, "metrics": {}}
            if len(seeds) >= 2:
                for k, _ in METRICS:
                    if k in m["summary"] and k in methods[base]["summary"]:
                        entry["metrics"][k] = paired_difference(
                            [m["finals"][s]["metrics"][k] for s in seeds],
                            [methods[base]["finals"][s]["metrics"][k] for s in seeds])
            comparisons.append(entry)
    margin = selection.get("margin") if protocol >= 2 else None
    _holm_verdicts(comparisons, margin)
    summary = {"protocol": protocol, "margin": margin, "power": selection.get("power", POWER),
               "trial_seeds": selection.get("trial_seeds", [0]),
               "family": selection.get("family", ""),
               "budget_rows": selection.get("budget_rows", []),
               "split": selection["split"], "budget": budget, "trials": selection["trials"],
               "seeds": selection["seeds"], "selection_metric": selection["selection_metric"],
               "primary_metric": PRIMARY, "alpha": ALPHA, "code": selection.get("code"),
               "history": selection.get("history", ""), "leaderboard": leaderboard,
               "one_shot": selection["one_shot"], "methods": methods, "comparisons": comparisons,
               "not_drawn": not_drawn, "missing_runs": missing, "runs_done": len(wall),
               "run_wall_s_total": sum(wall)}
    summary["previous"] = _previous(results_dir, selection.get("previous_results"), comparisons)
    summary["budget_evidence"] = budget_evidence(summary)
    return summary


VERDICTS = ("beats", "below", "equivalent", "inconclusive")


def _holm_verdicts(comparisons: List[Dict], margin: Optional[float]) -> None:
    """Adds `p_holm`, `p_tost`, `p_tost_holm`, `mdd_holm` and `verdict` (one of VERDICTS, or
    "not measured") to each comparison. Holm's correction runs over every comparison with a
    primary difference, once for the two-sided tests and once for the TOST p-values; the
    minimum detectable difference is at Holm's first-step level alpha / m and power POWER."""
    tested = [c for c in comparisons if PRIMARY in c["metrics"]]
    adjusted = holm([c["metrics"][PRIMARY]["t_p"] for c in tested])
    for c in comparisons:
        c["p_holm"], c["p_tost"], c["p_tost_holm"], c["mdd_holm"] = None, None, None, None
        c["verdict"] = "not measured"
    p_tost = []
    for c in tested:
        d = c["metrics"][PRIMARY]
        p_tost.append(math.nan if margin is None else tost(d["differences"], margin))
    tost_adjusted = holm(p_tost) if tested else []
    for c, p, pt, pt_holm in zip(tested, adjusted, p_tost, tost_adjusted):
        d = c["metrics"][PRIMARY]
        c["p_holm"] = p
        c["mdd_holm"] = minimum_detectable_difference(d["sd"], d["n"], ALPHA / len(tested), POWER)
        if margin is not None:
            c["p_tost"], c["p_tost_holm"] = pt, pt_holm
        if p < ALPHA and d["mean"] > 0:
            c["verdict"] = "beats"
        elif p < ALPHA and d["mean"] < 0:
            c["verdict"] = "below"
        elif margin is not None and pt_holm < ALPHA:
            c["verdict"] = "equivalent"
        else:
            c["verdict"] = "inconclusive"


def _previous(results_dir: str, relative: Optional[str], comparisons: List[Dict]) -> Dict:
    """`{"path", "comparisons": {"<method> - <base>": primary difference}}` of an earlier
    protocol's results.json, for the pairs this table also has; {} when there is none."""
    if not relative or not os.path.exists(os.path.join(results_dir, relative)):
        return {}
    with open(os.path.join(results_dir, relative)) as f:
        previous = json.load(f)
    now = {(c["method"], c["base"]) for c in comparisons}
    return {"path": relative, "comparisons": {
        f"{c['method']} - {c['base']}": {**c["metrics"][PRIMARY], "seeds": len(c["seeds"]),
                                         "params": previous["methods"][c["method"]]["params"]}
        for c in previous["comparisons"]
        if (c["method"], c["base"]) in now and PRIMARY in c.get("metrics", {})}}


_RERANK_KEYS = ("rerank_recall@1", "rerank_from_retrained_run", "rerank_retrained_recall@1",
                "rerank_retrained_wall_s")


def _rerank_row(name: str, rerank: Dict, reranked: Dict, missing: List[str], setup: Dict) -> Dict:
    """The derived `<name>_rerank` row: Recall@1 per seed at the chosen depth, vs `name`."""
    depth = str(rerank["top_k"])
    finals = {}
    for seed, run in reranked.items():
        scores = run.get("rerank_recall@1") or {}
        if depth in scores:
            finals[seed] = {"metrics": {"recall@1": scores[depth]}, "wall_s": None,
                            "from_retrained_run": bool(run.get("rerank_from_retrained_run")),
                            "retrained_recall@1": run.get("rerank_retrained_recall@1")}
        else:
            missing.append(f"{name}{RERANK_SUFFIX} seed {seed} (no re-ranking scores)")
    return {"description": RERANK_DESCRIPTION, "bases": [name], "derived_from": name,
            "extends": name, "inherited": {}, "search": "top_k on validation", "setup": setup,
            "params": {"top_k": rerank["top_k"]},
            "validation": {"recall@1": rerank["validation"][depth]}, "rerank": rerank,
            "trials": [], "seeds": sorted(finals), "finals": finals,
            "summary": ({"recall@1": mean_interval([r["metrics"]["recall@1"]
                                                    for r in finals.values()])} if finals else {}),
            "mean_wall_s": None}


def _trial_walls(results_dir: str, name: str, chosen: Dict, protocol: int = 1,
                 code: Optional[str] = None):
    """`(wall times, validation curves, a resolved configuration)` of a row's trial runs; a
    curve is `{"trial", "seed", "default", "curve": {"<epoch>": Recall@1}}` (protocol 2:
    every epoch)."""
    walls, curves, setup = [], [], {}
    for i, trial in enumerate(chosen["trials"]):
        for key in trial.get("keys") or [trial["key"]]:
            path = os.path.join(results_dir, "runs", name, f"trial-{i}-{key}.json")
            if not os.path.exists(path):
                continue
            run = _load_run(path, protocol, code)
            setup = setup or {**run.get("config", {}), **(run.get("resolved_config") or {})}
            walls.append(run.get("wall_s") or 0.0)
            if run.get("rerank_retrained_wall_s"):
                walls.append(run["rerank_retrained_wall_s"])
            if run.get("curve"):
                curves.append({"trial": i, "seed": run.get("config", {}).get("seed"),
                               "default": bool(trial.get("default")), "curve": run["curve"]})
    return walls, curves, setup


def last_quarter_range(curve: Dict, epochs: int) -> float:
    """max - min of `curve` ({"<epoch>": value}) over the last quarter of `epochs` epochs:
    epochs epochs - ceil(epochs / 4) .. epochs (NaN when an epoch is missing)."""
    first = epochs - math.ceil(epochs / 4)
    values = [curve.get(str(e)) for e in range(max(first, 1), epochs + 1)]
    if any(v is None for v in values):
        return math.nan
    return max(values) - min(values)


def mean_curve(curves: Sequence[Dict]) -> Dict:
    """The mean of several `{"<epoch>": value}` curves over the epochs they all have."""
    epochs = set.intersection(*(set(c) for c in curves)) if curves else set()
    return {e: sum(c[e] for c in curves) / len(curves) for e in sorted(epochs, key=int)}


def quarter_change(curve: Dict, epochs: int) -> float:
    """How far `curve` ({"<epoch>": value}) moved over the last quarter of `epochs` epochs:
    the mean over its last q = ceil(epochs / 4) epochs minus the mean over the q epochs
    before them (NaN when an epoch is missing). Means over q epochs, not max - min of
    single epochs: one epoch's validation Recall@1 on ~800 queries has a binomial standard
    error near 1 point, so a flat curve's max - min over a quarter exceeds 1 point too."""
    q = math.ceil(epochs / 4)
    if epochs < 2 or epochs - 2 * q + 1 < 1:
        return math.nan
    last = [curve.get(str(e)) for e in range(epochs - q + 1, epochs + 1)]
    before = [curve.get(str(e)) for e in range(epochs - 2 * q + 1, epochs - q + 1)]
    if any(v is None for v in last + before):
        return math.nan
    return sum(last) / q - sum(before) / q


def budget_rule(curves: Dict[str, Dict], tolerance: float = 0.01) -> Optional[int]:
    """The budget rule: the smallest number of epochs E such that, at E and at every longer
    budget the curves cover, each row's validation Recall@1 (`curves`: row -> its mean
    curve `{"<epoch>": R@1}`) moves less than `tolerance` (1 point) over the last quarter
    of training (`quarter_change`, in absolute value); None when no E qualifies. "At every
    longer budget" keeps an early pause of a still-rising curve from passing. Each curve
    is one run's epochs, so E epochs of it are what a run of E epochs trains (kdml's
    schedule has no dependence on the total epochs: constant learning rate, batches a
    function of the step)."""
    if not curves:
        return None
    longest = min(max(int(e) for e in c) for c in curves.values())
    flat = [all(abs(quarter_change(c, e)) < tolerance for c in curves.values())
            for e in range(longest + 1)]  # NaN compares False
    for epochs in range(2, longest + 1):
        if all(flat[epochs:]):
            return epochs
    return None


def budget_evidence(summary: Dict) -> Dict:
    """For the table's budget rows: each one's mean validation curve over its trials, its
    movement over the last quarter of the budget, and the rule's smallest E on them."""
    rows = [r for r in summary.get("budget_rows") or [] if r in summary["methods"]]
    curves = {r: mean_curve([c["curve"] for c in summary["methods"][r]["curves"]])
              for r in rows if summary["methods"][r]["curves"]}
    epochs = int(summary["budget"].get("epochs") or 0)
    if not curves or not epochs:
        return {}
    return {"epochs": epochs,
            "rows": {r: {"quarter_change": quarter_change(c, epochs),
                         "last_quarter_range": last_quarter_range(c, epochs)}
                     for r, c in curves.items()},
            "rule_epochs": budget_rule(curves)}


def _pct(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def _signed(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:+.2f}"


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if value >= 0.001 else "<0.001"


def _text(value) -> str:
    return "" if value is None else str(value)


def _difference(d: Dict) -> str:
    return f"{_signed(d['mean'])} [{_signed(d['low'])}, {_signed(d['high'])}]"


def _chosen(m: Dict) -> str:
    own = {k: v for k, v in m["params"].items() if k not in m.get("inherited", {})}
    text = ", ".join(f"{k}={v}" for k, v in own.items()) or "nothing of its own"
    if m.get("inherited"):
        text += f"; inherits {', '.join(f'{k}={v}' for k, v in m['inherited'].items())}"
    return text


def _family(summary: Dict) -> str:
    return summary.get("family") or ("leaderboard" if summary.get("leaderboard") else "this table")


def _caption(summary: Dict) -> List[str]:
    """The caption: split, budget, search, seeds, statistics, budget evidence, protocol."""
    split, budget = summary["split"], summary["budget"]
    seeds = ", ".join(map(str, summary["seeds"]))
    steps = budget.get("steps_per_epoch")
    trial_seeds = summary.get("trial_seeds") or [0]
    text = (f"Train alphabets {', '.join(split['train_groups'])}; validation "
            f"{', '.join(split['validation_groups'])}; test {', '.join(split['test_groups'])} "
            f"({split['classes']['test']} characters). P x K = {_text(budget.get('classes_per_batch'))} x "
            f"{_text(budget.get('images_per_class'))}, {budget.get('epochs')} epochs per run"
            + (f" of {steps} steps (trials and final runs alike)" if steps else "")
            + ", backbone, d and images per step as in each row. ")
    if summary.get("protocol", 1) >= 2:
        text += (f"Up to {summary['trials']} trials per row (its whole grid when smaller): trial 1 is "
                 f"the row's default, the others are drawn from the rest of its grid with a seed "
                 f"derived from the row's name; each trial trains with seed(s) "
                 f"{', '.join(map(str, trial_seeds))} and is chosen on the mean "
                 f"{summary['selection_metric']}; ")
    else:
        text += (f"Up to {summary['trials']} trials per row (its whole grid when smaller; the 'search' "
                 f"column says which), chosen on {summary['selection_metric']}; ")
    text += (f"a row that extends a base inherits the base's chosen values. The chosen setting is "
             f"retrained on train + validation with seeds {seeds} and evaluated on test once. "
             f"Mean ± 95 % t-interval half width over seeds (%). Runs made by kdml code "
             f"`{summary.get('code')}` (`kdml.benchmark.runs.code_fingerprint`).")
    lines = [text]
    if summary.get("protocol", 1) < 2:
        lines += ["", "Made under the previous protocol: every row's trials drew the same grid "
                  "positions (one search seed), so most rows never tried their default; trials "
                  "were scored only at the end (no validation curves); no equivalence margin was "
                  "declared, so a comparison that is neither beats nor below is inconclusive."]
    evidence = summary.get("budget_evidence") or {}
    if evidence:
        moved = "; ".join(f"`{r}` {100 * v['quarter_change']:+.2f} (single epochs spread "
                          f"{100 * v['last_quarter_range']:.2f})"
                          for r, v in evidence["rows"].items())
        rule = evidence.get("rule_epochs")
        lines += ["", f"Budget: {evidence['epochs']} epochs. Over the last quarter of training the "
                  f"mean validation Recall@1 curve of the trials moved (points, mean of the last "
                  f"quarter − mean of the quarter before): {moved}; the rule (the smallest budget "
                  f"from which these rows move < 1 point over the last quarter at every longer "
                  f"budget) gives " + (f"{rule} epochs on these curves." if rule else
                                       "no budget within these curves.")]
    if summary.get("history"):
        lines += ["", summary["history"]]
    return lines


def format_markdown(summary: Dict) -> str:
    """The caption, the per-row table, the paired comparisons and the generated verdicts."""
    primary = dict(METRICS)[summary["primary_metric"]]
    lines = _caption(summary)
    leaderboard = summary.get("leaderboard", False)
    if leaderboard:
        lines += ["", f"A leaderboard: every row on the same backbone, d and budget, sorted by "
                  f"test {primary} (mean over seeds); '#' is that order, not a significance ranking."]
    lines += [
        "",
        ("| # " if leaderboard else "") + "| method | backbone | d | images / step | search | "
        "chosen (val R@1 %) | seeds | " + " | ".join(t for _, t in METRICS) + " | s / run |",
        ("|---:" if leaderboard else "") + "|---|---|---:|---:|---|---|---:|" + "---:|" * len(METRICS)
        + "---:|",
    ]
    for rank, (name, m) in enumerate(summary["methods"].items(), 1):
        cells = []
        for k, _ in METRICS:
            s = m["summary"].get(k)
            cells.append("" if s is None else f"{_pct(s['mean'])} ± {_pct(s['half_width'])}")
        wall = "" if m["mean_wall_s"] is None else f"{m['mean_wall_s']:.0f}"
        setup = m.get("setup") or {}
        images = images_per_step(setup)
        lines.append((f"| {rank} " if leaderboard else "") + f"| `{name}` | {_text(setup.get('backbone'))} | "
                     f"{_text(setup.get('embedding_dim'))} | {_text(images)} | "
                     f"{m.get('search', '')} | {_chosen(m)} ({_pct(m['validation']['recall@1'], 1)}) | "
                     f"{len(m['seeds'])} | " + " | ".join(cells) + f" | {wall} |")
    tested = [c for c in summary["comparisons"] if c["p_holm"] is not None]
    n = len(tested)
    margin = summary.get("margin")
    equivalence = (f"'equivalent' = the two one-sided paired t-tests put the difference inside "
                   f"±{100 * margin:g} points (the margin declared before the runs) at "
                   f"Holm-adjusted p < {ALPHA}; " if margin is not None else "")
    lines += ["", f"Paired differences, method − base on the same seeds (points, 95 % t-interval). "
              f"Primary metric {primary}, one family of {n or 'its'} comparisons ({_family(summary)}), "
              f"Holm-corrected on its own: 'beats' / 'below' = two-sided paired t-test at "
              f"Holm-adjusted p < {ALPHA}; {equivalence}'inconclusive' = neither. MDD: the minimum "
              f"detectable difference at the level of Holm's first step ({ALPHA} / {n or 'm'}) with "
              f"{100 * POWER:.0f} % power, from the comparison's own SD. The other metrics are "
              "descriptive (uncorrected intervals).", "",
              f"| method − base | seeds | {primary} | p (Holm) | TOST p (Holm) | MDD | verdict | "
              + " | ".join(t for k, t in METRICS if k != summary["primary_metric"]) + " |",
              "|---|---:|---|---:|---:|---:|---|" + "---|" * (len(METRICS) - 1)]
    for c in summary["comparisons"]:
        d = c["metrics"].get(summary["primary_metric"])
        others = [("" if c["metrics"].get(k) is None else _difference(c["metrics"][k]))
                  for k, _ in METRICS if k != summary["primary_metric"]]
        mdd = "" if c.get("mdd_holm") is None else _pct(c["mdd_holm"])
        lines.append(f"| `{c['method']}` − `{c['base']}` | {len(c['seeds'])} | "
                     f"{'' if d is None else _difference(d)} | {_p(c['p_holm'])} | "
                     f"{_p(c.get('p_tost_holm'))} | {mdd} | {c['verdict']} | "
                     + " | ".join(others) + " |")
    lines.append("")
    lines += verdict_sentences(summary)
    lines += decisive_sentences(summary)
    if leaderboard:
        lines += [""] + spread_sentences(summary)
    lines += _rerank_notes(summary)
    if summary.get("not_drawn"):
        lines.append(f"- Not compared (rows differ in more than the method): "
                     f"{'; '.join(summary['not_drawn'])}.")
    lines += _trial_lines(summary)
    previous = summary.get("previous") or {}
    if previous.get("comparisons"):
        lines += ["", f"The same pairs under the previous protocol ({previous['path']}: a row did "
                  f"not inherit its base's chosen values, so e.g. so_proxy ran with Proxy Anchor's "
                  f"defaults against a tuned base; no multiplicity correction), {primary}, points:", "",
                  "| method − base | before (seeds) | now (seeds) |", "|---|---|---|"]
        for c in summary["comparisons"]:
            label = f"{c['method']} - {c['base']}"
            before = previous["comparisons"].get(label)
            d = c["metrics"].get(summary["primary_metric"])
            if before is not None:
                lines.append(f"| `{c['method']}` − `{c['base']}` | {_difference(before)} "
                             f"({before['seeds']}) | {'' if d is None else _difference(d)} "
                             f"({len(c['seeds'])}) |")
    lines.append("")
    lines.append(f"{summary['runs_done']} runs, {summary['run_wall_s_total'] / 60:.0f} min of run wall "
                 "time in all (trials and seeds, whatever run they were cached from).")
    lines += _failure_lines(summary)
    if summary["missing_runs"]:
        lines.append(f"Missing ({len(summary['missing_runs'])}): {'; '.join(summary['missing_runs'])}.")
    return "\n".join(lines) + "\n"


def _trial_lines(summary: Dict) -> List[str]:
    """Each row's trials with their validation Recall@1, the default marked (protocol 2)."""
    if summary.get("protocol", 1) < 2:
        return []
    lines = ["", "Trials, validation Recall@1 (%, mean over the trial seeds; * = the row's "
             "default, → = chosen):"]
    for name, m in summary["methods"].items():
        if not m.get("trials"):
            continue
        shown = []
        for i, t in enumerate(m["trials"]):
            params = ", ".join(f"{k}={v}" for k, v in t["params"].items()) or "its configuration"
            seeds = t.get("validation_seeds") or []
            spread = (f" [{', '.join(_pct(v, 1) for v in seeds)}]" if len(seeds) > 1 else "")
            shown.append(f"{'→ ' if m.get('chosen_trial') == i else ''}{params}{'*' if t.get('default') else ''} "
                         f"{_pct(t['validation']['recall@1'], 1)}{spread}")
        lines.append(f"- `{name}`: " + "; ".join(shown) + ".")
    return lines


def _failure_lines(summary: Dict) -> List[str]:
    failed = {n: m["failures"] for n, m in summary["methods"].items() if m.get("failures")}
    if not failed:
        return ["Failed runs: none."] if summary.get("protocol", 1) >= 2 else []
    shown = "; ".join(f"`{n}` {len(f)} ({', '.join(sorted({_failure_kind(r) for r in f}))})"
                      for n, f in failed.items())
    return [f"Failed runs ({sum(len(f) for f in failed.values())}, failure records in "
            f"runs/<row>/*.failed.json): {shown}."]


def _failure_kind(record: Dict) -> str:
    step = "" if record.get("step") is None else f" at step {record['step']}"
    return f"{record.get('stage')} seed {record.get('seed')}: {str(record.get('error'))[:80]}{step}"


def decisive_sentences(summary: Dict) -> List[str]:
    """How many comparisons decided (beats, below, equivalent) and the MDD reached."""
    tested = [c for c in summary["comparisons"] if c["p_holm"] is not None]
    if not tested:
        return []
    verdicts = [c["verdict"] for c in tested]
    decisive = sum(v in ("beats", "below", "equivalent") for v in verdicts)
    mdds = sorted(c["mdd_holm"] for c in tested if c["mdd_holm"] is not None
                  and not math.isnan(c["mdd_holm"]))
    line = (f"- Decisive: {decisive} of {len(tested)} comparisons ({verdicts.count('beats')} beats, "
            f"{verdicts.count('below')} below, {verdicts.count('equivalent')} equivalent, "
            f"{verdicts.count('inconclusive')} inconclusive).")
    if mdds:
        line += (f" Minimum detectable difference at Holm's first-step level, {100 * POWER:.0f} % "
                 f"power: median {100 * statistics.median(mdds):.2f} points (from "
                 f"{100 * mdds[0]:.2f} to {100 * mdds[-1]:.2f}).")
    return [line]


def format_compact(summary: Dict, details: Optional[str] = None) -> str:
    """A short form for a front page: each row's primary metric and its verdicts against its
    bases, the decisive count, and a link to the full table (`details`, a markdown link
    target); the full report is `format_markdown`."""
    primary = dict(METRICS)[summary["primary_metric"]]
    versus: Dict[str, List[Dict]] = {}
    for c in summary["comparisons"]:
        versus.setdefault(c["method"], []).append(c)
    budget = summary["budget"]
    margin = summary.get("margin")
    rule = (f"±{100 * margin:g}-point equivalence margin" if margin is not None
            else "previous protocol, no equivalence margin")
    leaderboard = summary.get("leaderboard")
    lines = [f"{len(summary['methods'])} rows, {budget.get('backbone')} backbone, "
             f"{budget.get('epochs')} epochs, {len(summary['seeds'])} paired seeds; test {primary} "
             f"(%, mean ± 95 % half width); 'vs base': paired difference in points; verdicts "
             f"Holm-corrected over the table, {rule}.", "",
             ("| # " if leaderboard else "") + f"| method | {primary} | vs base | verdict |",
             ("|---:" if leaderboard else "") + "|---|---:|---|---|"]
    for rank, (name, m) in enumerate(summary["methods"].items(), 1):
        s = m["summary"].get(summary["primary_metric"])
        metric = "" if s is None else f"{_pct(s['mean'])} ± {_pct(s['half_width'])}"
        mine = versus.get(name, [])
        difference = "; ".join(
            f"`{c['base']}` {_signed(c['metrics'][summary['primary_metric']]['mean'])}"
            for c in mine if summary["primary_metric"] in c["metrics"])
        verdict = "; ".join(c["verdict"] for c in mine)
        lines.append((f"| {rank} " if leaderboard else "") +
                     f"| `{name}` | {metric} | {difference} | {verdict} |")
    lines.append("")
    lines += decisive_sentences(summary)
    if summary["missing_runs"]:
        lines.append(f"- Missing ({len(summary['missing_runs'])}): see the full table.")
    if details:
        lines.append(f"- Full table, captions, trials and curves: [{details.split('#')[0]}]({details}).")
    return "\n".join(lines) + "\n"


def verdict_sentences(summary: Dict) -> List[str]:
    """One generated sentence per comparison: the only place the report says who wins."""
    primary = dict(METRICS)[summary["primary_metric"]]
    margin = summary.get("margin")
    lines = []
    for c in summary["comparisons"]:
        d = c["metrics"].get(summary["primary_metric"])
        pair = f"`{c['method']}` vs `{c['base']}`"
        if d is None:
            lines.append(f"- {pair}: not measured yet ({len(c['seeds'])} paired seed(s)).")
            continue
        p_holm = _p(c["p_holm"])
        p_holm = p_holm if p_holm.startswith("<") else f"= {p_holm}"
        figures = (f"{primary} {_difference(d)} points, Holm-adjusted p {p_holm}, "
                   f"{len(c['seeds'])} paired seeds, minimum detectable difference "
                   f"{100 * c['mdd_holm']:.2f}" if c.get("mdd_holm") is not None
                   and not math.isnan(c["mdd_holm"]) else
                   f"{primary} {_difference(d)} points, Holm-adjusted p {p_holm}, "
                   f"{len(c['seeds'])} paired seeds")
        if c["verdict"] == "beats":
            lines.append(f"- `{c['method']}` beats `{c['base']}`: {figures}.")
        elif c["verdict"] == "below":
            lines.append(f"- `{c['method']}` is below `{c['base']}`: {figures}.")
        elif c["verdict"] == "equivalent":
            lines.append(f"- `{c['method']}` is equivalent to `{c['base']}` within "
                         f"±{100 * margin:g} points: {figures}, TOST Holm-adjusted p "
                         f"{_p(c['p_tost_holm'])}.")
        else:
            why = ("" if margin is None else
                   f", nor shown within ±{100 * margin:g} points (TOST Holm-adjusted p "
                   f"{_p(c['p_tost_holm'])})")
            lines.append(f"- `{c['method']}` vs `{c['base']}` is inconclusive: no difference "
                         f"shown{why}; {figures}.")
    return lines


# The classic losses and the modern baseline of "A Metric Learning Reality Check" (Musgrave
# et al., ECCV 2020), whose finding the leaderboard is checked against: once every loss is
# tuned under one protocol, most end close together, and the classic pair losses are not
# beaten by the newer ones by the margins the papers reported.
REALITY_CHECK_CLASSICS = ("contrastive", "triplet")
REALITY_CHECK_BASELINE = "proxy_anchor"


def spread_sentences(summary: Dict) -> List[str]:
    """A leaderboard's spread, generated (the rule is declared here, before any number):

    - the range of the rows' mean primary metric, best and worst named;
    - the reality check: the table agrees with Musgrave et al. when most comparisons are
      shown *equivalent* to their base within the margin and no classic pair loss
      (`REALITY_CHECK_CLASSICS`) is below `REALITY_CHECK_BASELINE`; it disagrees when a
      classic loss is below, or most comparisons differ (beats or below); otherwise it
      cannot tell (too few comparisons decided). "Not shown to differ" is no evidence of
      agreement: it is what too few seeds give.
    """
    key = summary["primary_metric"]
    primary = dict(METRICS)[key]
    rows = [(n, m["summary"][key]["mean"]) for n, m in summary["methods"].items()
            if key in m["summary"] and "derived_from" not in m]
    tested = [c for c in summary["comparisons"] if c["p_holm"] is not None]
    if len(rows) < 2 or not tested:
        return ["- Spread: not measured yet (fewer than two rows with final runs)."]
    (best, high), (worst, low) = rows[0], rows[-1]
    middle = sorted(v for _, v in rows)
    quartile = len(middle) // 4
    inner = middle[len(middle) - 1 - quartile] - middle[quartile]
    verdicts = [c["verdict"] for c in tested]
    lines = [f"- Spread: the {len(rows)} rows' mean {primary} spans {100 * (high - low):.2f} points, "
             f"from `{best}` ({_pct(high)}) to `{worst}` ({_pct(low)}); the middle half of the rows "
             f"spans {100 * inner:.2f} points."]
    classics = {c["method"]: c for c in tested if c["method"] in REALITY_CHECK_CLASSICS
                and c["base"] == REALITY_CHECK_BASELINE}
    if classics:
        shown = "; ".join(f"`{name}` {c['verdict']} (Recall@1 {_difference(c['metrics'][key])})"
                          for name, c in sorted(classics.items()))
        equivalent = verdicts.count("equivalent")
        differ = verdicts.count("beats") + verdicts.count("below")
        classic_below = any(c["verdict"] == "below" for c in classics.values())
        if classic_below or differ > len(tested) / 2:
            outcome = "does not agree: " + ("a classic loss is below the baseline" if classic_below
                                             else "most rows differ from their base") + "."
        elif equivalent > len(tested) / 2:
            outcome = ("agrees: most rows are shown equivalent to their base and no classic loss "
                       "is below the baseline.")
        else:
            outcome = (f"cannot tell: {equivalent} of {len(tested)} comparisons are shown "
                       f"equivalent and {differ} differ; an inconclusive comparison is no "
                       "evidence either way.")
        lines.append(
            f"- Reality check (Musgrave et al., ECCV 2020: once tuned under one protocol, most "
            f"losses end close together and the classic pair losses are not left behind): the "
            f"classic losses vs `{REALITY_CHECK_BASELINE}`: {shown}. This table " + outcome)
    return lines


def _rerank_notes(summary: Dict) -> List[str]:
    lines = []
    for name, m in summary["methods"].items():
        if "derived_from" not in m:
            continue
        rerank, base = m["rerank"], m["derived_from"]
        curve = ", ".join(f"{d}: {_pct(r, 1)}" for d, r in
                          sorted(rerank["validation"].items(), key=lambda item: int(item[0])))
        line = (f"- `{name}`: {m['description']}; Recall@1 only (re-ranking re-orders only each "
                f"query's top_k; MAP@R, R-Precision and one-shot are not re-ranked). Validation Recall@1 "
                f"(%) of `{base}`'s chosen trial by top_k: {curve}")
        if int(rerank["top_k"]) == 1:
            line += " (top_k = 1: validation chose not to re-rank, the row repeats the embedding's)"
        if rerank.get("from_retrained_run"):
            line += (f"; these come from a retrained copy of that trial (its saved models were "
                     f"gone), whose own Recall@1 is {_pct(rerank['retrained_recall@1'], 1)} vs "
                     f"{_pct(summary['methods'][base]['validation']['recall@1'], 1)} cached")
        retrained = [s for s, r in m["finals"].items() if r["from_retrained_run"]]
        if retrained:
            line += (f"; seed(s) {', '.join(map(str, sorted(retrained)))} re-ranked from a "
                     "retrained copy of the run")
        lines.append(line + ".")
    return lines


def plot(summary: Dict, path: str) -> None:
    """Means with 95 % intervals per metric (top), paired differences to the base (bottom).

    Every panel of a row of panels uses the same y positions (one per method, or per
    comparison), so a metric a row lacks leaves its slot empty instead of moving the rest up.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in summary["methods"].items() if m["summary"]]
    pairs = [c for c in summary["comparisons"] if c["metrics"]]
    labels = [f"{c['method']} − {c['base']}" for c in pairs]
    height = max(7.0, 2.0 + 0.3 * (len(names) + len(pairs)))  # a leaderboard's many rows
    fig, axes = plt.subplots(2, len(METRICS), figsize=(4 * len(METRICS), height), squeeze=False,
                             gridspec_kw={"height_ratios": [max(len(names), 1), max(len(pairs), 1)]})
    for j, (k, title) in enumerate(METRICS):
        ax = axes[0, j]
        rows = [(y, summary["methods"][n]["summary"][k]) for y, n in enumerate(names)
                if k in summary["methods"][n]["summary"]]
        ax.errorbar([100 * s["mean"] for _, s in rows], [y for y, _ in rows],
                    xerr=[0 if math.isnan(s["half_width"]) else 100 * s["half_width"] for _, s in rows],
                    fmt="o", capsize=3)
        ax.set_yticks(list(range(len(names))), names if j == 0 else [""] * len(names))
        ax.set_title(f"{title} (%)")
        ax.set_ylim(max(len(names), 1) - 0.5, -0.5)
        ax = axes[1, j]
        rows = [(y, c["metrics"][k]) for y, c in enumerate(pairs) if k in c["metrics"]]
        color = "C3" if k == summary.get("primary_metric", PRIMARY) else "C1"
        ax.errorbar([100 * d["mean"] for _, d in rows], [y for y, _ in rows],
                    xerr=[0 if math.isnan(d["half_width"]) else 100 * d["half_width"] for _, d in rows],
                    fmt="o", color=color, capsize=3)
        ax.axvline(0, color="gray", lw=1)
        ax.set_yticks(list(range(len(pairs))), labels if j == 0 else [""] * len(pairs))
        primary = " (primary)" if k == summary.get("primary_metric", PRIMARY) else ""
        ax.set_title(f"Δ {title} vs base{primary}")
        ax.set_ylim(max(len(pairs), 1) - 0.5, -0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(summary: Dict, path: str) -> bool:
    """Validation Recall@1 after every epoch of each row's trials (one panel per row, the
    default trial drawn solid, the others dashed; the budget rows first, with their mean
    curve in black and the budget rule's epochs dotted), with the start of the budget's
    last quarter marked. False (nothing written) without curves."""
    rows = [n for n, m in summary["methods"].items() if m.get("curves")]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = [r for r in summary.get("budget_rows") or [] if r in rows]
    rows = first + [r for r in rows if r not in first]
    columns = min(6, len(rows))
    height = (len(rows) + columns - 1) // columns
    fig, axes = plt.subplots(height, columns, figsize=(2.8 * columns, 2.4 * height),
                             squeeze=False, sharey=True)
    epochs = int(summary["budget"].get("epochs") or 0)
    rule = (summary.get("budget_evidence") or {}).get("rule_epochs")
    for ax, name in zip(axes.flat, rows):
        for curve in summary["methods"][name]["curves"]:
            xs = sorted(int(e) for e in curve["curve"])
            ax.plot(xs, [100 * curve["curve"][str(e)] for e in xs],
                    "-" if curve["default"] else "--", lw=1, marker=".", markersize=3,
                    color=f"C{curve['trial'] % 10}")
        if name in first and len(summary["methods"][name]["curves"]) > 1:
            mean = mean_curve([c["curve"] for c in summary["methods"][name]["curves"]])
            xs = sorted(int(e) for e in mean)
            ax.plot(xs, [100 * mean[str(e)] for e in xs], "-", lw=1.5, color="black")
        if epochs:
            ax.axvline(epochs - math.ceil(epochs / 4), color="gray", lw=0.5)
        title = name + ("\n(budget row" + (f"; rule: {rule} epochs)" if rule else ")")
                        if name in first else "")
        if name in first and rule:
            ax.axvline(rule, color="C3", ls=":", lw=1)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.supxlabel("epoch", fontsize=8)
    fig.supylabel("validation Recall@1 (%)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def readme_block(results_dir: str, readme: str, summary: Optional[Dict] = None,
                 compact: bool = False, details: Optional[str] = None) -> str:
    """The text `write_report` puts between the results markers of markdown file `readme`
    (`format_compact` with `compact=True`, linking to `details`)."""
    summary = summary if summary is not None else collect(results_dir)
    markdown = format_compact(summary, details) if compact else format_markdown(summary)
    return _with_plot(markdown, results_dir, readme, curves=not compact and any(
        m.get("curves") for m in summary["methods"].values()))


def _with_plot(markdown: str, results_dir: str, readme: str, curves: bool = False) -> str:
    """`markdown` followed by the plot (and the validation curves), linked relative to
    markdown file `readme`."""
    def link(name):
        return os.path.relpath(os.path.join(results_dir, name),
                               os.path.dirname(os.path.abspath(readme))).replace(os.sep, "/")

    text = f"{markdown}\n![Benchmark metrics and paired differences]({link('results.png')})\n"
    if curves:
        text += f"\n![Validation Recall@1 after every epoch of each trial]({link(CURVES)})\n"
    return text


def current_block(readme: str, block: Optional[str] = None) -> str:
    """The text between the results markers (of `block`) of `readme`."""
    start, end = markers(block)
    with open(readme) as f:
        text = f.read()
    _check_markers(readme, text, start, end)
    content = text.split(start)[1].split(end)[0]
    return content[1:] if content.startswith("\n") else content


def _check_markers(readme: str, text: str, start: str, end: str) -> None:
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{readme}: expected one {start} line followed by one {end} line; "
                         "add them where the generated results belong.")


def update_readme(readme: str, content: str, block: Optional[str] = None) -> None:
    """Replaces the text between the results markers (of `block`) of `readme` with `content`."""
    start, end = markers(block)
    with open(readme) as f:
        text = f.read()
    _check_markers(readme, text, start, end)
    head, rest = text.split(start)
    _, tail = rest.split(end)
    with open(readme, "w") as f:
        f.write(f"{head}{start}\n{content}{end}{tail}")


def write_report(results_dir: str, readme: Union[None, str, Sequence[str]] = None,
                 block: Optional[str] = None, compact: bool = False,
                 details: Optional[str] = None) -> Dict:
    """Writes results.json, results.md, results.png (and curves.png when the trials have
    validation curves) in `results_dir` and the results block (`markers(block)`) of each
    markdown file in `readme` (its short form, `format_compact` linking to `details`, with
    `compact=True`); returns the summary."""
    summary = collect(results_dir)
    write_json_atomic(os.path.join(results_dir, "results.json"), summary)
    markdown = format_markdown(summary)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(markdown)
    plot(summary, os.path.join(results_dir, "results.png"))
    plot_curves(summary, os.path.join(results_dir, CURVES))
    for path in [readme] if isinstance(readme, str) else readme or []:
        update_readme(path, readme_block(results_dir, path, summary, compact, details), block)
    return summary
