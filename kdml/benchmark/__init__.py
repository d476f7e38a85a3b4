"""The comparison protocol: class-disjoint splits, equal-budget search, seeds, paired tests.

    python -m kdml.benchmark run --preset=omniglot --omniglot_dir=<dir with the zips>
    python -m kdml.benchmark report docs/results/omniglot --readme=README.md
"""

from kdml.benchmark.presets import OMNIGLOT, PRESETS
from kdml.benchmark.protocol import (BenchmarkSpec, MethodPreset, run_benchmark,
                                     run_on_folders, select)
from kdml.benchmark.report import write_report
from kdml.benchmark.runs import RunSpec
from kdml.benchmark.search import sample_trials
from kdml.benchmark.splits import ClassSplit, SplitFolders, group_split
from kdml.benchmark.stats import mean_interval, paired_difference

__all__ = ["BenchmarkSpec", "ClassSplit", "MethodPreset", "OMNIGLOT", "PRESETS", "RunSpec",
           "SplitFolders", "group_split", "mean_interval", "paired_difference", "run_benchmark",
           "run_on_folders", "sample_trials", "select", "write_report"]
