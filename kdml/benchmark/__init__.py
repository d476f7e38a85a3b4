"""The comparison protocol: class-disjoint splits, equal-budget search, seeds, paired tests.

    python -m kdml.benchmark run --preset=omniglot --omniglot_dir=<dir with the zips>
    python -m kdml.benchmark report docs/results/omniglot --readme=docs/benchmarks.md
    python -m kdml.benchmark budget <results_dir>    # the budget rule on the trials' curves
"""

from kdml.benchmark.presets import OMNIGLOT, PRESETS
from kdml.benchmark.protocol import (BenchmarkSpec, MethodPreset, default_params, grid_table,
                                     row_trials, run_benchmark, run_on_folders, select)
from kdml.benchmark.report import budget_rule, write_report
from kdml.benchmark.runs import RunSpec
from kdml.benchmark.search import row_seed, sample_trials
from kdml.benchmark.splits import ClassSplit, SplitFolders, group_split
from kdml.benchmark.stats import (mean_interval, minimum_detectable_difference,
                                  paired_difference, tost)

__all__ = ["BenchmarkSpec", "ClassSplit", "MethodPreset", "OMNIGLOT", "PRESETS", "RunSpec",
           "SplitFolders", "budget_rule", "default_params", "grid_table", "group_split",
           "mean_interval", "minimum_detectable_difference", "paired_difference", "row_seed",
           "row_trials", "run_benchmark", "run_on_folders", "sample_trials", "select", "tost",
           "write_report"]
