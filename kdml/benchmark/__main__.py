"""`python -m kdml.benchmark`: run (or resume) a benchmark, or regenerate its report.

    python -m kdml.benchmark run --preset=omniglot --omniglot_dir=<dir with the zips>
        [--methods=proxy_anchor,so_proxy] [--seeds=0,1,2,3,4] [--trials=3] [--epochs=26]
        [--results_dir=docs/results/omniglot] [--scratch_dir=runs/benchmark] [--trials_only]
    python -m kdml.benchmark run --preset=omniglot_losses --omniglot_dir=<dir>
        --results_dir=docs/results/omniglot_losses     # the leaderboard of every objective
    python -m kdml.benchmark run --preset=omniglot --data=<root>[,<root>...]
        [--test_groups=A,B | --num_test_groups=2] [--num_validation_groups=1] [--split_seed=0]
    python -m kdml.benchmark report <results_dir> [--readme=README.md --readme=docs/benchmarks.md]
        [--block=<name>] [--compact --details=docs/benchmarks.md#method-comparison]
    python -m kdml.benchmark budget <results_dir> [--rows=proxy_anchor,multi_similarity]
        [--tolerance=1]                               # the budget rule on the trials' curves
    python -m kdml.benchmark grids --preset=omniglot [--readme=docs/benchmarks.md]
        # each row's grid and default (the block <!-- results:grids_<preset>:start -->)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from kdml.benchmark.presets import OMNIGLOT_TEST_GROUPS, PRESETS, omniglot_roots
from kdml.benchmark.protocol import grid_table, run_on_folders
from kdml.benchmark.report import (budget_rule, collect, mean_curve, quarter_change,
                                   update_readme, write_report)
from kdml.benchmark.runs import code_fingerprint, rerank_request_file, run_request_file
from kdml.command_line import (add_argument, argparse_flag_names, check_flag_spellings,
                               set_verbosity)

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

PROG = "python -m kdml.benchmark"
# A benchmark writes to two places: --results_dir (the committed report) and
# --scratch_dir (checkpoints, models, logs); the other commands' single --output_dir
# and --seed get a hint naming them (kdml.command_line.check_flag_spellings).
_WHERE = "--results_dir (run files and the report) or --scratch_dir (checkpoints, models, logs)"
_RENAMED = {"output_dir": _WHERE, "output": _WHERE,
            "seed": "--seeds (of the final runs) or --split_seed (of the class split)",
            "dataset": "--data (dataset roots) or --omniglot_dir"}


def _list(text):
    return [t for t in text.split(",") if t] if text else []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Run or resume a benchmark (cached per run).")
    run.add_argument("--preset", default="omniglot", help="Named benchmark (kdml.benchmark.PRESETS).")
    run.add_argument("--omniglot_dir", help="Folder with images_background_small{1,2}.zip (omniglot preset).")
    run.add_argument("--data", help="Comma-separated dataset roots <root>/<group>/<class>/<image> "
                     "(instead of --omniglot_dir).")
    run.add_argument("--test_groups", help="Comma-separated test groups, named up front "
                     "(omniglot preset: Japanese_(katakana),Sanskrit).")
    run.add_argument("--num_test_groups", type=int, default=2, help="Test groups drawn when "
                     "--test_groups is empty.")
    run.add_argument("--num_validation_groups", type=int, default=1)
    run.add_argument("--split_seed", type=int, default=0)
    run.add_argument("--methods", help="Comma-separated rows of the preset, in run order (default: all).")
    run.add_argument("--seeds", help="Comma-separated seeds of the final runs (default: the preset's).")
    run.add_argument("--trials", type=int, help="Trials per method (default: the preset's).")
    run.add_argument("--epochs", type=int, help="Epochs of every run (default: the preset's).")
    run.add_argument("--trials_only", action="store_true", help="Stop after the trials and the "
                     "selection on validation: no final runs, the test split is not read.")
    run.add_argument("--results_dir", default=os.path.join("docs", "results", "omniglot"),
                     help="Run JSON files, selection.json and the report.")
    run.add_argument("--scratch_dir", default=os.path.join("runs", "benchmark"),
                     help="Split folders, checkpoints, models and logs (not committed).")
    run.add_argument("--cache_dir", default=os.path.join("runs", "benchmark", "data"),
                     help="Where the omniglot zips are unpacked.")
    run.add_argument("--readme", action="append", help="Also rewrite the results block of this "
                     "markdown file (repeatable).")
    report = commands.add_parser("report", help="Regenerate results.{json,md,png} from the run files.")
    report.add_argument("results_dir")
    report.add_argument("--block", default=None,
                        help="Name of the results block to rewrite (<!-- results:<block>:start "
                             "-->); default: the main one (<!-- results:start -->).")
    report.add_argument("--readme", action="append",
                        help="Markdown file whose results block is rewritten (repeatable).")
    report.add_argument("--compact", action="store_true",
                        help="Write the short form into the --readme files (primary metric, "
                             "difference to the base, verdict), e.g. for a front page.")
    report.add_argument("--details", help="With --compact: where the full table is (a markdown "
                        "link target, e.g. docs/benchmarks.md#loss-leaderboard).")
    budget = commands.add_parser("budget", help="The budget rule on the trials' validation curves: "
                                 "the smallest epochs from which each row moves less than "
                                 "--tolerance points over the last quarter of training (mean "
                                 "of the last quarter - mean of the quarter before).")
    budget.add_argument("results_dir")
    budget.add_argument("--rows", help="Comma-separated rows (default: the table's budget rows).")
    budget.add_argument("--tolerance", type=float, default=1.0,
                        help="Points of validation Recall@1 (default 1).")
    grids = commands.add_parser("grids", help="Each row's search grid and its default, as markdown.")
    grids.add_argument("--preset", default="omniglot")
    grids.add_argument("--readme", action="append", help="Markdown file whose block "
                       "<!-- results:grids_<preset>:start --> is rewritten (repeatable).")
    for command in (run, report, budget, grids):
        add_argument(command, "verbosity")
    worker = commands.add_parser("_run", help=argparse.SUPPRESS)
    worker.add_argument("request")
    reranker = commands.add_parser("_rerank", help=argparse.SUPPRESS)
    reranker.add_argument("request")
    return parser


def _run(args, parser) -> None:
    if args.preset not in PRESETS:
        parser.error(f"--preset={args.preset!r} is unknown. Valid presets: {', '.join(PRESETS)}.")
    spec = PRESETS[args.preset]
    if args.trials:
        spec = dataclasses.replace(spec, trials=args.trials)
    if args.seeds:
        spec = dataclasses.replace(spec, seeds=tuple(int(s) for s in _list(args.seeds)))
    if args.epochs:
        spec = dataclasses.replace(spec, budget={**spec.budget, "epochs": args.epochs})
    methods = _list(args.methods) or None
    unknown = [m for m in methods or [] if m not in spec.methods]
    if unknown:
        parser.error(f"--methods: unknown rows {unknown}. Valid rows: {', '.join(spec.methods)}.")
    test_groups = _list(args.test_groups) or None
    if args.data:
        roots = _list(args.data)
    elif args.omniglot_dir:
        roots = omniglot_roots(args.omniglot_dir, args.cache_dir)
        test_groups = test_groups or list(OMNIGLOT_TEST_GROUPS)
    else:
        parser.error("Pass --omniglot_dir=<folder with images_background_small{1,2}.zip> or "
                     "--data=<root>[,<root>...].")
    run_on_folders(spec, roots, args.results_dir, args.scratch_dir, test_groups=test_groups,
                   num_test_groups=args.num_test_groups,
                   num_validation_groups=args.num_validation_groups, split_seed=args.split_seed,
                   methods=methods, progress=lambda line: print(line, flush=True),
                   final_runs=not args.trials_only)
    write_report(args.results_dir, readme=args.readme)
    with open(os.path.join(args.results_dir, "results.md")) as f:
        print(f.read())


def _budget(args, parser) -> None:
    """Prints each row's mean validation curve, its last-quarter movement per budget, and the
    budget rule's smallest epochs."""
    if not os.path.exists(os.path.join(args.results_dir, "selection.json")):
        parser.error(f"{args.results_dir} holds no selection.json: run the trials first "
                     "(python -m kdml.benchmark run ... --trials_only).")
    summary = collect(args.results_dir)
    rows = _list(args.rows) or summary.get("budget_rows") or []
    unknown = [r for r in rows if r not in summary["methods"]]
    if not rows or unknown:
        parser.error(f"--rows: name rows of {args.results_dir} ({', '.join(summary['methods'])}); "
                     f"unknown: {unknown or 'none given'}.")
    curves = {r: mean_curve([c["curve"] for c in summary["methods"][r]["curves"]]) for r in rows}
    empty = [r for r, c in curves.items() if not c]
    if empty:
        raise ValueError(f"{args.results_dir}: rows {empty} have no validation curves (trials of "
                         "the previous protocol); re-run their trials.")
    longest = min(max(int(e) for e in c) for c in curves.values())
    print("epochs  " + "  ".join(f"{r} (R@1 %, last-quarter change)" for r in rows))
    for epochs in range(1, longest + 1):
        print(f"{epochs:6d}  " + "  ".join(
            f"{100 * c[str(epochs)]:.2f} ({100 * quarter_change(c, epochs):+.2f})"
            for c in curves.values()))
    rule = budget_rule(curves, args.tolerance / 100)
    print(f"budget: {rule} epochs" if rule else
          f"budget: none within {longest} epochs (train longer: --epochs)")


def main(argv=None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    check_flag_spellings(argv, argparse_flag_names(parser, argv), PROG, _RENAMED)
    args = parser.parse_args(argv)
    if args.command in ("run", "report", "budget", "grids"):
        set_verbosity(args.verbosity)
    try:
        if args.command == "_run":
            run_request_file(args.request)
        elif args.command == "_rerank":
            rerank_request_file(args.request)
        elif args.command == "report":
            if not os.path.exists(os.path.join(args.results_dir, "selection.json")):
                parser.error(f"{args.results_dir} holds no selection.json: pass the --results_dir "
                             "of a benchmark run (python -m kdml.benchmark run ...).")
            summary = write_report(args.results_dir, readme=args.readme, block=args.block,
                                   compact=args.compact, details=args.details)
            with open(os.path.join(args.results_dir, "results.md")) as f:
                print(f.read())

            if summary.get("code") and summary["code"] != code_fingerprint():
                print(f"note: these runs were made by kdml code {summary['code']}; this checkout "
                      f"is {code_fingerprint()}, so `python -m kdml.benchmark run` would train "
                      "every row again under it.")
        elif args.command == "budget":
            _budget(args, parser)
        elif args.command == "grids":
            if args.preset not in PRESETS:
                parser.error(f"--preset={args.preset!r} is unknown. Valid presets: {', '.join(PRESETS)}.")
            table = grid_table(PRESETS[args.preset])
            for path in args.readme or []:
                update_readme(path, table, f"grids_{args.preset}")
            print(table, end="")
        else:
            _run(args, parser)
    except (ValueError, FileNotFoundError) as error:
        if args.command in ("_run", "_rerank"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
