"""The benchmark's report, generated from its run files: JSON summary, markdown, plot.

`write_report(results_dir)` reads `selection.json` and the final runs it names
(`runs/<method>/final-<seed>-<key>.json`), and writes `results.json` (every final run,
mean and 95 % t interval per metric, paired differences to each base), `results.md`
(the tables) and `results.png` (the metrics and the differences with their intervals).
Missing runs are listed, never filled in. A row whose selection chose a re-ranking depth
(PDDM) gets a derived row `<method>_rerank`: Recall@1 of each final run re-ranked at that
depth (`rerank_recall@1` of its JSON), compared with the row itself. `update_readme` puts `results.md` between
`<!-- results:start -->` and `<!-- results:end -->` of a markdown file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Sequence, Union

from kdml.benchmark.runs import write_json_atomic
from kdml.benchmark.stats import mean_interval, paired_difference

METRICS = (("recall@1", "Recall@1"), ("map@r", "MAP@R"), ("r_precision", "R-Precision"),
           ("one_shot", "20-way 1-shot"))
START, END = "<!-- results:start -->", "<!-- results:end -->"
RERANK_SUFFIX = "_rerank"
RERANK_DESCRIPTION = "PDDM unit re-ranks the top-k cosine neighbours (top_k chosen on validation)"


def collect(results_dir: str) -> Dict:
    """The summary dict of `results.json` (see the module docstring)."""
    with open(os.path.join(results_dir, "selection.json")) as f:
        selection = json.load(f)
    methods, missing, wall = {}, [], []
    for name, chosen in selection["methods"].items():
        runs, reranked = {}, {}
        for seed, key in chosen["finals"].items():
            path = os.path.join(results_dir, "runs", name, f"final-{seed}-{key}.json")
            if os.path.exists(path):
                with open(path) as f:
                    run = json.load(f)
                runs[int(seed)] = {"metrics": run["metrics"], "wall_s": run.get("wall_s"),
                                   "one_shot_ci95": run.get("one_shot_ci95")}
                reranked[int(seed)] = {k: run[k] for k in _RERANK_KEYS if k in run}
            else:
                missing.append(f"{name} seed {seed}")
        trial_walls = _trial_walls(results_dir, name, chosen)
        wall += [r["wall_s"] for r in runs.values() if r["wall_s"]] + trial_walls
        wall += [r["rerank_retrained_wall_s"] for r in reranked.values()
                 if r.get("rerank_retrained_wall_s")]
        summary = {k: mean_interval([r["metrics"][k] for r in runs.values()])
                   for k, _ in METRICS if runs and all(k in r["metrics"] for r in runs.values())}
        methods[name] = {"description": chosen.get("description", ""), "bases": chosen.get("bases", []),
                         "params": chosen["params"], "validation": chosen["validation"],
                         "trials": chosen["trials"], "seeds": sorted(runs), "finals": runs,
                         "summary": summary,
                         "mean_wall_s": (sum(r["wall_s"] for r in runs.values()) / len(runs)
                                         if runs else None)}
        if chosen.get("rerank"):
            methods[name + RERANK_SUFFIX] = _rerank_row(name, chosen["rerank"], reranked, missing)
        elif chosen.get("rerank_depths"):
            missing.append(f"{name}{RERANK_SUFFIX} (no re-ranking depth chosen yet)")
    missing += [f"{name} (not yet selected)" for name in selection.get("planned", [])
                if name not in methods]
    comparisons = []
    for name, m in methods.items():
        for base in m["bases"]:
            if base not in methods:
                missing.append(f"{base} (base of {name}) not run")
                continue
            seeds = sorted(set(m["finals"]) & set(methods[base]["finals"]))
            entry = {"method": name, "base": base, "seeds": seeds, "metrics": {}}
            if len(seeds) >= 2:
                for k, _ in METRICS:
                    if k in m["summary"] and k in methods[base]["summary"]:
                        entry["metrics"][k] = paired_difference(
                            [m["finals"][s]["metrics"][k] for s in seeds],
                            [methods[base]["finals"][s]["metrics"][k] for s in seeds])
            entry["beats_base_on"] = [k for k, d in entry["metrics"].items() if d["above_zero"]]
            entry["below_base_on"] = [k for k, d in entry["metrics"].items() if d["high"] < 0]
            comparisons.append(entry)
    return {"split": selection["split"], "budget": selection["budget"], "trials": selection["trials"],
            "seeds": selection["seeds"], "selection_metric": selection["selection_metric"],
            "one_shot": selection["one_shot"], "methods": methods, "comparisons": comparisons,
            "missing_runs": missing, "runs_done": len(wall), "run_wall_s_total": sum(wall)}


_RERANK_KEYS = ("rerank_recall@1", "rerank_from_retrained_run", "rerank_retrained_recall@1",
                "rerank_retrained_wall_s")


def _rerank_row(name: str, rerank: Dict, reranked: Dict, missing: List[str]) -> Dict:
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


def format_markdown(summary: Dict) -> str:
    """Two tables: per-method means with 95 % intervals; paired differences to each base."""
    split, budget = summary["split"], summary["budget"]
    lines = [
        f"Train alphabets {', '.join(split['train_groups'])}; validation "
        f"{', '.join(split['validation_groups'])}; test {', '.join(split['test_groups'])} "
        f"({split['classes']['test']} characters, never seen before selection). "
        f"{budget.get('backbone')} at {budget.get('image_size')} px unless the row says otherwise, "
        f"d = {budget.get('embedding_dim')}, P x K = {budget.get('classes_per_batch')} x "
        f"{budget.get('images_per_class')}, {budget.get('epochs')} epochs per run; "
        f"{summary['trials']} trials per method chosen on {summary['selection_metric']}, then "
        f"retrained on train + validation with seeds {', '.join(map(str, summary['seeds']))} "
        f"and evaluated on test once. Mean ± 95 % t-interval half width over seeds (%).",
        "",
        "| method | chosen (val R@1 %) | seeds | " + " | ".join(t for _, t in METRICS) + " | s / run |",
        "|---|---|---:|" + "---:|" * len(METRICS) + "---:|",
    ]
    for name, m in summary["methods"].items():
        chosen = ", ".join(f"{k}={v}" for k, v in m["params"].items())
        cells = []
        for k, _ in METRICS:
            s = m["summary"].get(k)
            cells.append("" if s is None else f"{_pct(s['mean'])} ± {_pct(s['half_width'])}")
        wall = "" if m["mean_wall_s"] is None else f"{m['mean_wall_s']:.0f}"
        lines.append(f"| `{name}` | {chosen} ({_pct(m['validation']['recall@1'], 1)}) | "
                     f"{len(m['seeds'])} | " + " | ".join(cells) + f" | {wall} |")
    lines += ["", "Paired differences, method − base on the same seeds (points, 95 % t-interval, "
              "paired t-test p). 'Beats' = interval above zero.", "",
              "| method − base | seeds | " + " | ".join(t for _, t in METRICS) + " | beats base on |",
              "|---|---:|" + "---|" * len(METRICS) + "---|"]
    for c in summary["comparisons"]:
        cells = []
        for k, _ in METRICS:
            d = c["metrics"].get(k)
            cells.append("" if d is None else
                         f"{_signed(d['mean'])} [{_signed(d['low'])}, {_signed(d['high'])}] p={d['t_p']:.2f}")
        verdict = ", ".join(t for k, t in METRICS if k in c["beats_base_on"]) or "nothing"
        lines.append(f"| `{c['method']}` − `{c['base']}` | {len(c['seeds'])} | "
                     + " | ".join(cells) + f" | {verdict} |")
    lines.append("")
    for c in summary["comparisons"]:
        seeds = f"{len(c['seeds'])} paired seed(s)"
        if not c["seeds"]:
            lines.append(f"- `{c['method']}` vs `{c['base']}`: not measured yet (no seed has run).")
        elif c["beats_base_on"]:
            metrics = ", ".join(t for k, t in METRICS if k in c["beats_base_on"])
            lines.append(f"- `{c['method']}` beats `{c['base']}` on {metrics} ({seeds}).")
        elif c.get("below_base_on"):
            metrics = ", ".join(t for k, t in METRICS if k in c["below_base_on"])
            lines.append(f"- `{c['method']}` does not beat `{c['base']}`: it is below it on {metrics} "
                         f"(interval below zero; {seeds}).")
        else:
            lines.append(f"- `{c['method']}` is not shown to beat `{c['base']}` on any metric ({seeds}).")
    lines += _rerank_notes(summary)
    lines.append("")
    lines.append(f"{summary['runs_done']} runs, {summary['run_wall_s_total'] / 60:.0f} min of run wall "
                 "time in all (trials and seeds).")
    if summary["missing_runs"]:
        lines.append(f"Missing ({len(summary['missing_runs'])}): {'; '.join(summary['missing_runs'])}.")
    return "\n".join(lines) + "\n"


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
    """Means with 95 % intervals per metric (top), paired differences to the base (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in summary["methods"].items() if m["summary"]]
    pairs = [c for c in summary["comparisons"] if c["metrics"]]
    fig, axes = plt.subplots(2, len(METRICS), figsize=(4 * len(METRICS), 7), squeeze=False)
    for j, (k, title) in enumerate(METRICS):
        ax = axes[0, j]
        rows = [(n, summary["methods"][n]["summary"][k]) for n in names
                if k in summary["methods"][n]["summary"]]
        ys = range(len(rows))
        ax.errorbar([100 * s["mean"] for _, s in rows], ys,
                    xerr=[0 if math.isnan(s["half_width"]) else 100 * s["half_width"] for _, s in rows],
                    fmt="o", capsize=3)
        ax.set_yticks(list(ys), [n for n, _ in rows] if j == 0 else [""] * len(rows))
        ax.set_title(f"{title} (%)")
        ax.set_ylim(max(len(rows), 1) - 0.5, -0.5)
        ax = axes[1, j]
        rows = [(f"{c['method']} − {c['base']}", c["metrics"][k]) for c in pairs if k in c["metrics"]]
        ys = range(len(rows))
        ax.errorbar([100 * d["mean"] for _, d in rows], ys,
                    xerr=[100 * d["half_width"] for _, d in rows], fmt="o", color="C1", capsize=3)
        ax.axvline(0, color="gray", lw=1)
        ax.set_yticks(list(ys), [n for n, _ in rows] if j == 0 else [""] * len(rows))
        ax.set_title(f"Δ {title} vs base (points)")
        ax.set_ylim(max(len(rows), 1) - 0.5, -0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def update_readme(readme: str, block: str) -> None:
    """Replaces the text between the results markers of `readme` with `block`."""
    with open(readme) as f:
        text = f.read()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{readme}: expected one {START} line followed by one {END} line; "
                         "add them where the generated results belong.")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    with open(readme, "w") as f:
        f.write(f"{head}{START}\n{block}{END}{tail}")


def write_report(results_dir: str, readme: Union[None, str, Sequence[str]] = None) -> Dict:
    """Writes results.json, results.md and results.png in `results_dir` and the results
    block of each markdown file in `readme`; returns the summary."""
    summary = collect(results_dir)
    write_json_atomic(os.path.join(results_dir, "results.json"), summary)
    markdown = format_markdown(summary)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(markdown)
    plot(summary, os.path.join(results_dir, "results.png"))
    for path in [readme] if isinstance(readme, str) else readme or []:
        image = os.path.relpath(os.path.join(results_dir, "results.png"),
                                os.path.dirname(os.path.abspath(path)))
        update_readme(path, f"{markdown}\n![Benchmark metrics and paired differences]({image})\n")
    return summary
