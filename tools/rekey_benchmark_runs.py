"""Re-keys benchmark run files made before the current cache key, without re-running them.

    python tools/rekey_benchmark_runs.py --made_at=<commit> <results_dir>/runs/<row> [...]

A run's key (`kdml.benchmark.runs.RunSpec.key`) hashes its full resolved configuration,
its splits and the code that trains and evaluates it (`code_fingerprint`). Files written
under an older key scheme carry an old key, and no `code` field. This tool gives them the
current key only when that is true of them:
- the code that made them (`--made_at`, the commit whose benchmark run wrote them) equals
  this checkout's in every file the fingerprint covers, checked with `git diff`, and in the
  source of the run functions the fingerprint hashes;
- the configuration each run resolved (its stored `resolved_config`) equals what
  `resolved_config` predicts now (`check_result_matches`).
Anything else is refused with the reason, and the file is left alone. A re-keyed file
records `rekeyed_from` (its old key) and `made_at`.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # a script run: TensorFlow starts quietly (before kdml imports it)
    import quiet  # tools/quiet.py

    quiet.quiet_startup()

from kdml.benchmark import runs  # noqa: E402


def code_unchanged_since(commit: str, repo: str) -> str:
    """'' if the fingerprinted code at `commit` equals this checkout's, else the reason."""
    diff = subprocess.run(["git", "-C", repo, "diff", "--stat", commit, "--", "kdml",
                           ":!kdml/benchmark"], capture_output=True, text=True, check=True).stdout
    if diff.strip():
        return f"kdml sources changed since {commit}:\n{diff}"
    old = subprocess.run(["git", "-C", repo, "show", f"{commit}:kdml/benchmark/runs.py"],
                         capture_output=True, text=True, check=True).stdout
    for name in runs._RUN_FUNCTIONS:
        if inspect.getsource(getattr(runs, name)) not in old:
            return f"runs.{name} changed since {commit}"
    return ""


def rekey(path: str, made_at: str) -> str:
    with open(path) as f:
        result = json.load(f)
    fields = {"method", "stage", "index", "config", "train_split", "eval_split",
              "train_fingerprint", "eval_fingerprint", "one_shot"}
    spec = runs.RunSpec(**{k: result[k] for k in fields})
    runs.check_result_matches(spec, {**result, "code": spec.code}, path)
    target = spec.result_path(os.path.dirname(os.path.dirname(os.path.dirname(path))))
    runs.write_json_atomic(target, {**result, "code": spec.code, "key": spec.key,
                                    "rekeyed_from": result["key"], "made_at": made_at})
    if os.path.abspath(target) != os.path.abspath(path):
        os.remove(path)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--made_at", required=True, help="Commit whose benchmark run wrote the files.")
    parser.add_argument("row_dirs", nargs="+", help="<results_dir>/runs/<row> folders.")
    args = parser.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reason = code_unchanged_since(args.made_at, repo)
    if reason:
        print(f"error: not re-keyed, {reason}", file=sys.stderr)
        return 2
    for row_dir in args.row_dirs:
        for path in sorted(glob.glob(os.path.join(row_dir, "*.json"))):
            print(f"{path} -> {rekey(path, args.made_at)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
