"""Every command given each bad input: one `error: <path>: ...` line, exit code 2, nothing
written (issue: "one line for every bad input"); grayscale and 16-bit PNGs are images.

Each command runs as a user runs it, in a subprocess: `python -m kdml.index query`,
`python -m kdml.evaluate`, and the TF-free kit `export/kdml_litert.py query|search|
embed|index`. The kit's rows are fast (no TensorFlow import); `kdml.index query`'s rows run its
`main` in this process, and one row per kdml command runs it as a fresh process
(TensorFlow's import, ~5 s each: marked slow).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KIT = os.path.join(REPO, "export", "kdml_litert.py")
REFUSED_IMAGES = ("corrupt", "text", "empty", "missing")
VALID_IMAGES = ("gray", "rgb16", "gray16")
# (what the command expects, the wrong file given): the search model where an embedder
# goes, the embedder where a search model goes, a missing model, an image as a model.
MODEL_CASES = ("search_as_embedder", "embedder_as_search", "missing_model", "image_as_model")
# The phrase each refusal must hold (besides the path).
REASONS = {"corrupt": "truncated or corrupt PNG", "text": "not an image", "empty": "0 bytes",
           "missing": "no such file", "search_as_embedder": "a search model",
           "embedder_as_search": "an embedder", "missing_model": "no such file",
           "image_as_model": "not a"}


def _run(argv, cwd):
    env = {**os.environ, "PYTHONPATH": REPO, "KERAS_BACKEND": "tensorflow"}
    return subprocess.run([sys.executable, *argv], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=300)


def _command(name, assets, out, *, image=None, model=None):
    """argv of command `name` with `image` (a query file) and `model` (or the right ones)."""
    image = image or os.path.join(assets["gallery"], "alpha1", "char02", "6_1.png")
    if name == "index_query":
        return ["-m", "kdml.index", "query", f"--index={assets['index']}",
                f"--model={model or assets['keras']}", f"--output_dir={out}", "--k=2", image]
    if name == "evaluate":
        return ["-m", "kdml.evaluate", f"--model={model or assets['keras']}",
                f"--dataset=folder:{assets['gallery']}", f"--output_dir={out}",
                "--nmi=false", "--verification=false"]
    if name == "kit_query":
        return [KIT, "query", f"--model={model or assets['tflite']}", f"--index={assets['index']}",
                "--allow_model_mismatch", "--k=2", image]
    if name == "kit_search":
        return [KIT, "search", f"--model={model or assets['search']}", image]
    if name == "kit_embed":
        return [KIT, "embed", f"--model={model or assets['tflite']}",
                f"--output={os.path.join(str(out), 'e.npy')}", image]
    if name == "kit_index":
        return [KIT, "index", f"--model={model or assets['tflite']}",
                f"--gallery={assets['gallery']}", f"--index={os.path.join(str(out), 'i.index')}"]
    raise ValueError(name)


def _wrong_model(case, command, assets):
    if case == "search_as_embedder":
        return None if command == "kit_search" else assets["search"]
    if case == "embedder_as_search":
        return assets["tflite"] if command == "kit_search" else None
    if case == "missing_model":
        return os.path.join(str(assets["root"]), "no_such_embedder.tflite")
    return assets["bad"]["gray"]


def _assert_refused(result, path, reason, out):
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, lines  # one line, nothing else: no traceback, no log noise
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert reason in lines[0], lines[0]
    assert "Traceback" not in result.stdout
    written = [f for _, _, files in os.walk(out) for f in files]
    assert written == [], written


KIT_IMAGE_COMMANDS = ("kit_query", "kit_search", "kit_embed")


@pytest.mark.parametrize("kind", REFUSED_IMAGES)
@pytest.mark.parametrize("command", KIT_IMAGE_COMMANDS)
def test_the_kit_refuses_a_bad_query_file(newcomer, tmp_path, command, kind):
    path = newcomer["bad"][kind]
    result = _run(_command(command, newcomer, tmp_path, image=path), tmp_path)
    _assert_refused(result, path, REASONS[kind], tmp_path)


@pytest.mark.parametrize("command,case", [
    (command, case) for command in KIT_IMAGE_COMMANDS + ("kit_index",) for case in MODEL_CASES
    if case != ("search_as_embedder" if command == "kit_search" else "embedder_as_search")])
def test_the_kit_refuses_the_wrong_model_file(newcomer, tmp_path, command, case):
    model = _wrong_model(case, command, newcomer)
    result = _run(_command(command, newcomer, tmp_path, model=model), tmp_path)
    _assert_refused(result, model, REASONS[case], tmp_path)


def _in_process(argv, capfd):
    """`python -m kdml.index ...` run in this process: (exit code, stdout, stderr)."""
    from kdml.index.__main__ import main

    code = main(argv[2:])
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


@pytest.mark.parametrize("kind", REFUSED_IMAGES)
def test_index_query_refuses_a_bad_query_file(newcomer, tmp_path, kind, capfd):
    path = newcomer["bad"][kind]
    result = _in_process(_command("index_query", newcomer, tmp_path / "out", image=path), capfd)
    _assert_refused(result, path, REASONS[kind], tmp_path)


@pytest.mark.parametrize("case", ("search_as_embedder", "missing_model", "image_as_model"))
def test_index_query_refuses_the_wrong_model_file(newcomer, tmp_path, case, capfd):
    model = _wrong_model(case, "index_query", newcomer)
    result = _in_process(_command("index_query", newcomer, tmp_path / "out", model=model), capfd)
    _assert_refused(result, model, REASONS[case], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("command,case", [("index_query", "text"),
                                          ("evaluate", "search_as_embedder"),
                                          ("evaluate", "missing_model"),
                                          ("evaluate", "image_as_model")])
def test_kdml_commands_refuse_in_one_line_as_a_user_runs_them(newcomer, tmp_path, command,
                                                               case):
    """The same refusals from a fresh `python -m` process: no start-up line either."""
    image = newcomer["bad"].get(case)
    model = None if image else _wrong_model(case, command, newcomer)
    result = _run(_command(command, newcomer, tmp_path / "out", image=image, model=model),
                  tmp_path)
    _assert_refused(result, image or model, REASONS[case], tmp_path)


@pytest.mark.filterwarnings("ignore:0 of 1 query labels")  # bad/ is outside the gallery
@pytest.mark.parametrize("kind", VALID_IMAGES)
def test_grayscale_and_16_bit_files_are_images_to_index_query(newcomer, tmp_path, kind, capfd):
    result = _in_process(_command("index_query", newcomer, tmp_path / "out",
                                  image=newcomer["bad"][kind]), capfd)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out" / "query.json") as f:
        (record,) = json.load(f)
    assert record["query"] == newcomer["bad"][kind] and len(record["neighbours"]) == 2


def test_image_file_problem_names_each_bad_kind_and_accepts_the_valid_ones(newcomer):
    import importlib.util

    from kdml.data.decoding import image_file_problem

    spec = importlib.util.spec_from_file_location("kdml_litert", KIT)
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    for kind, path in newcomer["bad"].items():
        ours, theirs = image_file_problem(path), kit.image_file_problem(path)
        if kind in VALID_IMAGES:
            assert ours is None and theirs is None, (kind, ours, theirs)
        else:
            assert REASONS[kind] in ours and REASONS[kind] in theirs, (kind, ours, theirs)


def test_folder_sources_skip_bad_files_in_one_warning_naming_them(newcomer, tmp_path):
    """`kdml.index build` (every folder: source, through `drop_unreadable`) and the
    kit's `index` skip the corrupt, text and empty files, keep gray and 16-bit ones."""
    import logging
    import shutil

    from kdml.embedding import load_source

    gallery = tmp_path / "gallery"
    shutil.copytree(newcomer["gallery"], gallery)
    for kind, path in newcomer["bad"].items():
        if kind != "missing":
            shutil.copy(path, gallery / "alpha0" / "char00" / f"{kind}.png")
    bad = sorted(str(gallery / "alpha0" / "char00" / f"{k}.png") for k in ("corrupt", "empty", "text"))
    from absl import logging as absl_logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    absl_logging.get_absl_logger().addHandler(handler)
    try:
        images = load_source(f"folder:{gallery}")
    finally:
        absl_logging.get_absl_logger().removeHandler(handler)
    skipped = [m for m in records if "cannot be decoded" in m]
    assert len(skipped) == 1 and all(p in skipped[0] for p in bad), records
    assert "skipping 3 of 38" in skipped[0]  # 32 gallery files + 6 added
    assert images.num_images == 35 and not set(bad) & set(images.paths.tolist())
    result = _run([KIT, "index", f"--model={newcomer['tflite']}", f"--gallery={gallery}",
                   f"--index={tmp_path / 'kit.index'}"], tmp_path)
    lines = result.stderr.splitlines()
    assert result.returncode == 0 and len(lines) == 1, lines
    assert lines[0].startswith("warning: ") and all(p in lines[0] for p in bad)
    assert "Indexed 35 images of 8 labels" in result.stdout
