"""`tools/rekey_benchmark_runs.py`: a run of an older key scheme gets the current key only
when its stored configuration is what the protocol resolves now, and git shows its code
unchanged."""

import importlib.util
import json
import os

import pytest

from kdml.benchmark.runs import RunSpec, StaleRunError, code_fingerprint, write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool():
    spec = importlib.util.spec_from_file_location(
        "rekey_benchmark_runs", os.path.join(ROOT, "tools", "rekey_benchmark_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _old_run(tmp_path, **resolved_changes):
    spec = RunSpec("pa", "final", 3, {"method": "proxy_anchor", "data_kind": "glyph", "seed": 3},
                   "train+validation", "test", "aaa", "bbb", {"n_way": 5, "episodes": 10})
    stored = {k: v for k, v in spec.to_json().items() if k != "code"}  # old scheme: no code
    stored.update(key="0123456789ab", metrics={"recall@1": 0.5},
                  resolved_config={**spec.resolved, **resolved_changes})
    path = os.path.join(tmp_path, "runs", "pa", "final-3-0123456789ab.json")
    write_json_atomic(path, stored)
    return spec, path


def test_a_run_with_the_configuration_of_today_is_rekeyed(tmp_path):
    spec, path = _old_run(str(tmp_path))
    target = _tool().rekey(path, "abc1234")
    assert target == spec.result_path(str(tmp_path)) and not os.path.exists(path)
    moved = json.load(open(target))
    assert moved["key"] == spec.key and moved["code"] == code_fingerprint()
    assert moved["rekeyed_from"] == "0123456789ab" and moved["made_at"] == "abc1234"
    assert moved["metrics"] == {"recall@1": 0.5}


def test_a_run_of_another_configuration_is_refused_and_left_alone(tmp_path):
    spec, path = _old_run(str(tmp_path), lr=0.5)
    with pytest.raises(StaleRunError, match="resolved_config field 'lr' is 0.5"):
        _tool().rekey(path, "abc1234")
    assert os.path.exists(path) and not os.path.exists(spec.result_path(str(tmp_path)))


def test_code_changed_since_the_commit_is_reported():
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout

    first, head = git("rev-list", "--max-parents=0", "HEAD").split(), git("rev-parse", "HEAD")
    if not first or first[0] == head.strip():
        pytest.skip("needs a git checkout with history")
    # the first commit's kdml/ is long gone: refused, with git's list of changed files
    reason = _tool().code_unchanged_since(first[0], ROOT)
    assert reason.startswith(f"kdml sources changed since {first[0]}:") and "kdml/" in reason
