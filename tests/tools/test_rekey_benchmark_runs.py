"""`tools/rekey_benchmark_runs.py`: a run of an older key scheme gets the current key only
when git vouches for the code that made it (the fingerprint of the kdml sources of the
commit that added the file) and its stored configuration is what the protocol resolves now."""

import importlib.util
import json
import os
import shutil
import subprocess

import pytest

from kdml.benchmark.runs import (RunSpec, StaleRunError, code_fingerprint, library_versions,
                                 write_json_atomic)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool():
    spec = importlib.util.spec_from_file_location(
        "rekey_benchmark_runs", os.path.join(ROOT, "tools", "rekey_benchmark_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    """A git repository whose first commit holds a copy of this checkout's kdml sources."""
    import kdml

    shutil.copytree(os.path.dirname(kdml.__file__), tmp_path / "kdml",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "kdml")
    _git(tmp_path, "commit", "-qm", "code")
    return tmp_path


def _old_run(root, commit=True, **changes):
    spec = RunSpec("pa", "final", 3, {"method": "proxy_anchor", "data_kind": "glyph", "seed": 3},
                   "train+validation", "test", "aaa", "bbb", {"n_way": 5, "episodes": 10})
    stored = {k: v for k, v in spec.to_json().items() if k != "code"}  # old scheme: no code
    stored.update(key="0123456789ab", metrics={"recall@1": 0.5}, resolved_config=spec.resolved)
    stored.update(changes)
    path = os.path.join(root, "results", "runs", "pa", "final-3-0123456789ab.json")
    write_json_atomic(path, stored)
    if commit:
        _git(root, "add", "results")
        _git(root, "commit", "-qm", "runs")
    return spec, path


def test_the_fingerprint_of_a_commit_is_computed_from_its_blobs(repo):
    assert _tool().fingerprint_at("HEAD", str(repo)) == code_fingerprint()


def test_a_run_that_git_vouches_for_is_rekeyed(repo):
    spec, path = _old_run(repo)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    target = _tool().rekey(path)
    assert target == spec.result_path(str(repo / "results")) and not os.path.exists(path)
    moved = json.load(open(target))
    assert moved["key"] == spec.key and moved["code"] == code_fingerprint()
    assert moved["rekeyed_from"] == "0123456789ab" and moved["made_at"] == head
    assert moved["versions"] == library_versions() and moved["metrics"] == {"recall@1": 0.5}


def test_an_uncommitted_run_is_refused_and_left_alone(repo):
    _, path = _old_run(repo, commit=False)
    with pytest.raises(ValueError, match="not committed, so no commit vouches"):
        _tool().rekey(path)
    assert os.path.exists(path)


def test_a_run_added_by_a_commit_of_other_code_is_refused(repo):
    loss = repo / "kdml" / "losses" / "proxy_anchor.py"
    loss.write_text(loss.read_text() + "\n# changed before the runs were committed\n")
    _git(repo, "add", "kdml")
    _git(repo, "commit", "-qm", "other code")
    _, path = _old_run(repo)
    with pytest.raises(ValueError, match=r"whose kdml sources fingerprint to \w+, not this checkout's"):
        _tool().rekey(path)
    assert os.path.exists(path)


def test_a_run_whose_stored_code_is_not_its_commit_is_refused(repo):
    _, path = _old_run(repo, code="0123456789ab")
    with pytest.raises(ValueError, match="stores code 0123456789ab, but the kdml sources of the "
                                         "commit that added it"):
        _tool().rekey(path)


def test_a_run_of_other_libraries_or_configuration_is_refused(repo):
    _, path = _old_run(repo, versions=None)
    with pytest.raises(ValueError, match="made with unrecorded library versions"):
        _tool().rekey(path)


def test_a_run_of_another_configuration_is_refused(repo):
    spec, path = _old_run(repo)
    stored = json.load(open(path))
    write_json_atomic(path, {**stored, "resolved_config": {**stored["resolved_config"], "lr": 0.5}})
    _git(repo, "commit", "-qam", "edited")
    with pytest.raises(StaleRunError, match="resolved_config field 'lr' is 0.5"):
        _tool().rekey(path)
    assert os.path.exists(path) and not os.path.exists(spec.result_path(str(repo / "results")))
