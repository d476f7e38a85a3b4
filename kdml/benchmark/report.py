"""The benchmark's report, generated from its run files: JSON summary, markdown, plot.

`write_report(results_dir)` reads `selection.json` and the final runs it names
(`runs/<method>/final-<seed>-<key>.json`), and writes `results.json` (every final run,
mean and 95 % t interval per metric, paired differences to each base, Holm-adjusted
p-values), `results.md` (the tables and the verdicts) and `results.png` (the metrics and
the differences with their intervals). Missing runs are listed, never filled in.

The verdict rests on one primary metric, Recall@1, declared before any run
(`protocol.PRIMARY_METRIC`): a row beats its base when the paired difference on it is
positive and its two-sided paired t-test p-value, Holm-adjusted over every comparison of
the table, is below 0.05. The other metrics are descriptive. Every sentence about who
wins is generated here from the same numbers as the tables.

A row whose selection chose a re-ranking depth (PDDM) gets a derived row `<method>_rerank`:
Recall@1 of each final run re-ranked at that depth (`rerank_recall@1` of its JSON),
compared with the row itself. `update_readme` puts the report between
`<!-- results:start -->` and `<!-- results:end -->` of a markdown file.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Union

from kdml.benchmark.runs import write_json_atomic
from kdml.benchmark.stats import holm, mean_interval, paired_difference

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
# What must agree for two rows to be compared at all (besides the method).
_LIKE_FOR_LIKE = ("backbone", "embedding_dim", "image_size", "epochs")


def collect(results_dir: str) -> Dict:
    """The summary dict of `results.json` (see the module docstring)."""
    with open(os.path.join(results_dir, "selection.json")) as f:
        selection = json.load(f)
    budget = selection["budget"]
    methods, missing, wall = {}, [], []
    for name, chosen in selection["methods"].items():
        runs, reranked, setup = {}, {}, {}
        for seed, key in chosen["finals"].items():
            path = os.path.join(results_dir, "runs", name, f"final-{seed}-{key}.json")
            if os.path.exists(path):
                with open(path) as f:
                    run = json.load(f)
                runs[int(seed)] = {"metrics": run["metrics"], "wall_s": run.get("wall_s"),
                                   "one_shot_ci95": run.get("one_shot_ci95")}
                reranked[int(seed)] = {k: run[k] for k in _RERANK_KEYS if k in run}
                config = {**budget, **run.get("config", {}), **(run.get("resolved_config") or {})}
                setup = {k: config.get(k) for k in _LIKE_FOR_LIKE}
            else:
                missing.append(f"{name} seed {seed}")
        trial_walls = _trial_walls(results_dir, name, chosen)
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
                         "summary": summary,
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
            differ = [k for k in _LIKE_FOR_LIKE if m["setup"] and methods[base]["setup"]
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
    _holm_verdicts(comparisons)
    summary = {"split": selection["split"], "budget": budget, "trials": selection["trials"],
               "seeds": selection["seeds"], "selection_metric": selection["selection_metric"],
               "primary_metric": PRIMARY, "alpha": ALPHA, "code": selection.get("code"),
               "history": selection.get("history", ""), "leaderboard": leaderboard,
               "one_shot": selection["one_shot"], "methods": methods, "comparisons": comparisons,
               "not_drawn": not_drawn, "missing_runs": missing, "runs_done": len(wall),
               "run_wall_s_total": sum(wall)}
    summary["previous"] = _previous(results_dir, selection.get("previous_results"), comparisons)
    return summary


def _holm_verdicts(comparisons: List[Dict]) -> None:
    """Adds `p_holm` and `verdict` ("beats" | "below" | "no difference shown" | "not measured")
    to each comparison: Holm's correction over every comparison with a primary difference."""
    tested = [c for c in comparisons if PRIMARY in c["metrics"]]
    adjusted = holm([c["metrics"][PRIMARY]["t_p"] for c in tested])
    for c in comparisons:
        c["p_holm"], c["verdict"] = None, "not measured"
    for c, p in zip(tested, adjusted):
        d = c["metrics"][PRIMARY]
        c["p_holm"] = p
        if p < ALPHA and d["mean"] > 0:
            c["verdict"] = "beats"
        elif p < ALPHA and d["mean"] < 0:
            c["verdict"] = "below"
        else:
            c["verdict"] = "no difference shown"


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


def _trial_walls(results_dir: str, name: str, chosen: Dict) -> List[float]:
    walls = []
    for i, trial in enumerate(chosen["trials"]):
        path = os.path.join(results_dir, "runs", name, f"trial-{i}-{trial['key']}.json")
        if os.path.exists(path):
            with open(path) as f:
                run = json.load(f)
            walls.append(run.get("wall_s") or 0.0)
            if run.get("rerank_retrained_wall_s"):
                walls.append(run["rerank_retrained_wall_s"])
    return walls


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


def format_markdown(summary: Dict) -> str:
    """The caption, the per-row table, the paired comparisons and the generated verdicts."""
    split, budget = summary["split"], summary["budget"]
    primary = dict(METRICS)[summary["primary_metric"]]
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [
        f"Train alphabets {', '.join(split['train_groups'])}; validation "
        f"{', '.join(split['validation_groups'])}; test {', '.join(split['test_groups'])} "
        f"({split['classes']['test']} characters). P x K = {_text(budget.get('classes_per_batch'))} x "
        f"{_text(budget.get('images_per_class'))}, {budget.get('epochs')} epochs per run, backbone "
        f"and d as in each row. Up to {summary['trials']} trials per row (its whole grid when "
        f"smaller; the 'search' column says which), chosen on {summary['selection_metric']}; "
        f"a row that extends a base inherits the base's chosen values. The chosen setting is "
        f"retrained on train + validation with seeds {seeds} and evaluated on test once. "
        f"Mean ± 95 % t-interval half width over seeds (%). Runs made by kdml code "
        f"`{summary.get('code')}` (`kdml.benchmark.runs.code_fingerprint`).",
    ]
    if summary.get("history"):
        lines += ["", summary["history"]]
    leaderboard = summary.get("leaderboard", False)
    if leaderboard:
        lines += ["", f"A leaderboard: every row on the same backbone, d and budget, sorted by "
                  f"test {primary} (mean over seeds); '#' is that order, not a significance ranking."]
    lines += [
        "",
        ("| # " if leaderboard else "") + "| method | backbone | d | search | chosen (val R@1 %) | seeds | "
        + " | ".join(t for _, t in METRICS) + " | s / run |",
        ("|---:" if leaderboard else "") + "|---|---|---:|---|---|---:|" + "---:|" * len(METRICS) + "---:|",
    ]
    for rank, (name, m) in enumerate(summary["methods"].items(), 1):
        cells = []
        for k, _ in METRICS:
            s = m["summary"].get(k)
            cells.append("" if s is None else f"{_pct(s['mean'])} ± {_pct(s['half_width'])}")
        wall = "" if m["mean_wall_s"] is None else f"{m['mean_wall_s']:.0f}"
        setup = m.get("setup") or {}
        lines.append((f"| {rank} " if leaderboard else "") + f"| `{name}` | {_text(setup.get('backbone'))} | {_text(setup.get('embedding_dim'))} | "
                     f"{m.get('search', '')} | {_chosen(m)} ({_pct(m['validation']['recall@1'], 1)}) | "
                     f"{len(m['seeds'])} | " + " | ".join(cells) + f" | {wall} |")
    n = sum(1 for c in summary["comparisons"] if c["p_holm"] is not None)
    lines += ["", f"Paired differences, method − base on the same seeds (points, 95 % t-interval). "
              f"Primary metric {primary}: two-sided paired t-test p, and p Holm-adjusted over the "
              f"{n} comparisons of this table; 'beats' = difference above zero at adjusted "
              f"p < {ALPHA}. The other metrics are descriptive (uncorrected intervals).", "",
              f"| method − base | seeds | {primary} | p | p (Holm) | verdict | "
              + " | ".join(t for k, t in METRICS if k != summary["primary_metric"]) + " |",
              "|---|---:|---|---:|---:|---|" + "---|" * (len(METRICS) - 1)]
    for c in summary["comparisons"]:
        d = c["metrics"].get(summary["primary_metric"])
        others = [("" if c["metrics"].get(k) is None else _difference(c["metrics"][k]))
                  for k, _ in METRICS if k != summary["primary_metric"]]
        lines.append(f"| `{c['method']}` − `{c['base']}` | {len(c['seeds'])} | "
                     f"{'' if d is None else _difference(d)} | {'' if d is None else _p(d['t_p'])} | "
                     f"{_p(c['p_holm'])} | {c['verdict']} | " + " | ".join(others) + " |")
    lines.append("")
    lines += verdict_sentences(summary)
    if leaderboard:
        lines += [""] + spread_sentences(summary)
    lines += _rerank_notes(summary)
    if summary.get("not_drawn"):
        lines.append(f"- Not compared (rows differ in more than the method): "
                     f"{'; '.join(summary['not_drawn'])}.")
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
    if summary["missing_runs"]:
        lines.append(f"Missing ({len(summary['missing_runs'])}): {'; '.join(summary['missing_runs'])}.")
    return "\n".join(lines) + "\n"


def format_compact(summary: Dict) -> str:
    """A short form for a front page: each row's primary metric and its verdict against its
    base, then the spread sentences (a leaderboard) or the verdicts; the full report is
    `format_markdown`."""
    primary = dict(METRICS)[summary["primary_metric"]]
    versus = {}
    for c in summary["comparisons"]:
        versus.setdefault(c["method"], c)
    lines = [f"{len(summary['methods'])} rows, {summary['budget'].get('backbone')} backbone, "
             f"d = {summary['budget'].get('embedding_dim')}, {summary['budget'].get('epochs')} epochs, "
             f"{len(summary['seeds'])} paired seeds; test {primary} (%), mean ± 95 % half width; "
             f"'vs base': paired difference in points, Holm-adjusted over the table.", "",
             f"| # | method | {primary} | vs base | verdict |", "|---:|---|---:|---|---|"]
    for rank, (name, m) in enumerate(summary["methods"].items(), 1):
        s = m["summary"].get(summary["primary_metric"])
        c = versus.get(name)
        d = c["metrics"].get(summary["primary_metric"]) if c else None
        metric = "" if s is None else f"{_pct(s['mean'])} ± {_pct(s['half_width'])}"
        difference = "" if d is None else f"`{c['base']}` {_signed(d['mean'])}"
        lines.append(f"| {rank} | `{name}` | {metric} | {difference} | {c['verdict'] if c else ''} |")
    lines.append("")
    lines += spread_sentences(summary) if summary.get("leaderboard") else verdict_sentences(summary)
    lines.append(f"- {summary['runs_done']} runs, {summary['run_wall_s_total'] / 60:.0f} min of run "
                 "wall time in all (trials and seeds).")
    if summary["missing_runs"]:
        lines.append(f"- Missing ({len(summary['missing_runs'])}): {'; '.join(summary['missing_runs'])}.")
    return "\n".join(lines) + "\n"


def verdict_sentences(summary: Dict) -> List[str]:
    """One generated sentence per comparison: the only place the report says who wins."""
    primary = dict(METRICS)[summary["primary_metric"]]
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
                   f"{len(c['seeds'])} paired seeds, interval half width {100 * d['half_width']:.2f}")
        if c["verdict"] == "beats":
            lines.append(f"- `{c['method']}` beats `{c['base']}`: {figures}.")
        elif c["verdict"] == "below":
            lines.append(f"- `{c['method']}` is below `{c['base']}`: {figures}.")
        else:
            lines.append(f"- `{c['method']}` is not shown to beat `{c['base']}`: {figures}.")
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
    - how many rows are not shown to differ from their base (Holm, as in the table), and
      how many beat or are below it;
    - the reality check: the table agrees with Musgrave et al. when most compared rows
      are not shown to differ from their base AND no classic pair loss
      (`REALITY_CHECK_CLASSICS`) is below `REALITY_CHECK_BASELINE`.
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
    same = verdicts.count("no difference shown")
    lines = [f"- Spread: the {len(rows)} rows' mean {primary} spans {100 * (high - low):.2f} points, "
             f"from `{best}` ({_pct(high)}) to `{worst}` ({_pct(low)}); the middle half of the rows "
             f"spans {100 * inner:.2f} points.",
             f"- Against their bases ({len(tested)} Holm-corrected comparisons): {same} not shown to "
             f"differ, {verdicts.count('beats')} beat, {verdicts.count('below')} below. The median "
             f"95 % half width of the paired differences is "
             f"{100 * statistics.median(c['metrics'][key]['half_width'] for c in tested):.2f} points "
             f"before the correction: 'not shown to differ' means no difference of that size was "
             f"detected, not that the rows are equal."]
    classics = {c["method"]: c for c in tested if c["method"] in REALITY_CHECK_CLASSICS
                and c["base"] == REALITY_CHECK_BASELINE}
    if classics:
        shown = "; ".join(f"`{name}` {c['verdict']} (Recall@1 {_difference(c['metrics'][key])})"
                          for name, c in sorted(classics.items()))
        agrees = same > len(tested) / 2 and all(c["verdict"] != "below" for c in classics.values())
        lines.append(
            f"- Reality check (Musgrave et al., ECCV 2020: once tuned under one protocol, most "
            f"losses end close together and the classic pair losses are not left behind): the "
            f"classic losses vs `{REALITY_CHECK_BASELINE}`: {shown}. This table "
            + ("agrees: most rows are not shown to differ from their base and no classic loss is "
               "below the baseline." if agrees else
               "does not agree: " + ("most rows differ from their base" if same <= len(tested) / 2
                                     else "a classic loss is below the baseline") + "."))
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


def readme_block(results_dir: str, readme: str, summary: Optional[Dict] = None,
                 compact: bool = False) -> str:
    """The text `write_report` puts between the results markers of markdown file `readme`
    (`format_compact` with `compact=True`)."""
    summary = summary if summary is not None else collect(results_dir)
    markdown = format_compact(summary) if compact else format_markdown(summary)
    return _with_plot(markdown, results_dir, readme)


def _with_plot(markdown: str, results_dir: str, readme: str) -> str:
    """`markdown` followed by the plot, linked relative to markdown file `readme`."""
    image = os.path.relpath(os.path.join(results_dir, "results.png"),
                            os.path.dirname(os.path.abspath(readme))).replace(os.sep, "/")
    return f"{markdown}\n![Benchmark metrics and paired differences]({image})\n"


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
                 block: Optional[str] = None, compact: bool = False) -> Dict:
    """Writes results.json, results.md and results.png in `results_dir` and the results
    block (`markers(block)`) of each markdown file in `readme` (its short form,
    `format_compact`, with `compact=True`); returns the summary."""
    summary = collect(results_dir)
    write_json_atomic(os.path.join(results_dir, "results.json"), summary)
    markdown = format_markdown(summary)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(markdown)
    plot(summary, os.path.join(results_dir, "results.png"))
    text = format_compact(summary) if compact else markdown
    for path in [readme] if isinstance(readme, str) else readme or []:
        update_readme(path, _with_plot(text, results_dir, path), block)
    return summary
