"""Re-keys committed benchmark run files made under an older cache-key scheme, without re-running them.

    python tools/rekey_benchmark_runs.py <results_dir>/runs/<row> [...]

A run's key (`kdml.benchmark.runs.RunSpec.key`) hashes its full resolved configuration,
its splits, the code that trains and evaluates it (`code_fingerprint`) and the TensorFlow,
Keras and NumPy versions. Files written under an older key scheme carry an old key. This
tool gives a file the current key only when git, not the operator, vouches for it:
- the commit that added the file (`git log --diff-filter=A`) is the code that made it: the
  fingerprint of that commit's kdml sources, computed from its git blobs
  (`git ls-tree` + `git cat-file`, the same `fingerprint_sources` as a checkout), must
  equal the run's stored `code` (when it has one) and this checkout's fingerprint;
- the run stores the library versions it ran with, and they are this environment's;
- the configuration it resolved (its stored `resolved_config`) equals what
  `resolved_config` predicts now (`check_result_matches`).
An uncommitted file, or anything else, is refused with the reason and left alone. A
re-keyed file records `rekeyed_from` (its old key) and `made_at` (the adding commit).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # a script run: TensorFlow starts quietly (before kdml imports it)
    import quiet  # tools/quiet.py

    quiet.quiet_startup()

from kdml.benchmark import runs  # noqa: E402

SPEC_FIELDS = ("method", "stage", "index", "config", "train_split", "eval_split",
               "train_fingerprint", "eval_fingerprint", "one_shot")


def _git(repo: str, *args: str, data: bytes = None) -> bytes:
    return subprocess.run(["git", "-C", repo, *args], input=data, capture_output=True,
                          check=True).stdout


def sources_at(commit: str, repo: str) -> Dict[str, bytes]:
    """`{path relative to kdml/: bytes}` of every `*.py` under `kdml/` at `commit`, read
    from git's objects (no checkout)."""
    listing = _git(repo, "ls-tree", "-r", "-z", commit, "--", "kdml").split(b"\0")
    entries = []
    for line in filter(None, listing):
        meta, path = line.split(b"\t", 1)
        _, kind, blob = meta.split()
        if kind == b"blob" and path.endswith(b".py"):
            entries.append((path.decode()[len("kdml/"):], blob.decode()))
    sources = {}
    for relative, blob in entries:
        sources[relative] = _git(repo, "cat-file", "blob", blob)
    return sources


def fingerprint_at(commit: str, repo: str) -> str:
    """`runs.fingerprint_sources` of the kdml sources at `commit`."""
    return runs.fingerprint_sources(sources_at(commit, repo))


def adding_commit(path: str) -> str:
    """The commit that first added `path` to git, or '' when it is not committed."""
    folder = os.path.dirname(os.path.abspath(path))
    repo = _git(folder, "rev-parse", "--show-toplevel").decode().strip()
    log = _git(repo, "log", "--diff-filter=A", "--format=%H", "--",
               os.path.relpath(os.path.abspath(path), repo)).decode().split()
    return log[-1] if log else ""


def why_not(path: str, result: Dict) -> str:
    """'' when git vouches that `result` (stored at `path`) was made by this checkout's code
    with this environment's libraries, else the reason."""
    commit = adding_commit(path)
    if not commit:
        return f"{path}: not committed, so no commit vouches for the code that made it"
    repo = _git(os.path.dirname(os.path.abspath(path)), "rev-parse", "--show-toplevel").decode().strip()
    made_by = fingerprint_at(commit, repo)
    if result.get("code") and result["code"] != made_by:
        return (f"{path}: stores code {result['code']}, but the kdml sources of the commit that "
                f"added it ({commit[:12]}) fingerprint to {made_by}")
    if made_by != runs.code_fingerprint():
        return (f"{path}: added at {commit[:12]}, whose kdml sources fingerprint to {made_by}, "
                f"not this checkout's {runs.code_fingerprint()}")
    versions = result.get("versions")
    if versions != runs.library_versions():
        return (f"{path}: made with {versions or 'unrecorded library versions'}, not this "
                f"environment's {runs.library_versions()}")
    return ""


def rekey(path: str) -> str:
    """Moves the run at `path` to its current key; raises ValueError (the reason) if git does
    not vouch for it, `StaleRunError` if its configuration resolves otherwise now."""
    with open(path) as f:
        result = json.load(f)
    reason = why_not(path, result)
    if reason:
        raise ValueError(reason)
    spec = runs.RunSpec(**{k: result[k] for k in SPEC_FIELDS})
    runs.check_result_matches(spec, {**result, "code": spec.code}, path)
    target = spec.result_path(os.path.dirname(os.path.dirname(os.path.dirname(path))))
    runs.write_json_atomic(target, {**result, "code": spec.code, "versions": dict(spec.versions),
                                    "key": spec.key, "rekeyed_from": result["key"],
                                    "made_at": adding_commit(path)})
    if os.path.abspath(target) != os.path.abspath(path):
        os.remove(path)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("row_dirs", nargs="+", help="<results_dir>/runs/<row> folders.")
    args = parser.parse_args(argv)
    refused = 0
    for row_dir in args.row_dirs:
        for path in sorted(glob.glob(os.path.join(row_dir, "*.json"))):
            if path.endswith(".failed.json"):
                continue
            try:
                print(f"{path} -> {rekey(path)}")
            except ValueError as error:
                print(f"error: not re-keyed, {error}", file=sys.stderr)
                refused += 1
    return 2 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
