"""What every `python -m kdml.<command>` shares: the flags of `kdml.command_line` (one
name, type and help wording everywhere), the one-line hint for another command's
spelling, and the definition of "noise" that the quiet commands are held to."""

import json
import os
import subprocess
import sys

import pytest

from kdml import command_line
from tests.helpers import NOISE_PATTERNS, noise_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Which shared flags each command takes; every command that writes files takes
# --output_dir (kdml.benchmark writes to --results_dir and --scratch_dir instead).
EXPECTED_SHARED = {
    "train": {"dataset", "output_dir", "seed", "verbosity"},
    "evaluate": {"model", "dataset", "output_dir", "seed", "verbosity"},
    "export": {"model", "dataset", "output_dir", "seed", "verbosity"},
    "index build": {"model", "output_dir", "seed", "verbosity"},
    "index query": {"model", "output_dir", "seed", "verbosity"},
    "index evaluate": {"output_dir", "seed", "verbosity"},
    "benchmark run": {"verbosity"},
    "benchmark report": {"verbosity"},
    "benchmark budget": {"verbosity"},
    "benchmark grids": {"verbosity"},
}
EXPECTED_TYPES = {"model": "string", "dataset": "string", "output_dir": "string", "seed": "int",
                  "verbosity": "int"}

# One process imports the three absl commands in turn (each one's flags are removed
# before the next defines its own: absl allows one definition per name) and builds the
# argparse parsers; it prints {command: {flag: {"type", "help"}}} for every flag.
_DUMP = r"""
import argparse, importlib, json
from absl import flags

FLAGS, out = flags.FLAGS, {}
for command, module in (("train", "kdml.train"), ("evaluate", "kdml.evaluate"),
                        ("export", "kdml.export.__main__")):
    importlib.import_module(module)
    own = {f.name: f for f in FLAGS.get_flags_for_module(module)}
    out[command] = {name: {"type": f.parser.flag_type(), "help": f.help} for name, f in own.items()}
    out[command]["verbosity"] = {"type": FLAGS["verbosity"].parser.flag_type(),
                                 "help": FLAGS["verbosity"].help}
    for name in own:
        delattr(FLAGS, name)

def argparse_flags(parser):
    return {s[2:]: {"type": {None: "string", str: "string", int: "int", float: "float"}.get(
                        a.type, str(a.type)), "help": a.help}
            for a in parser._actions for s in a.option_strings if s.startswith("--")}

from kdml.benchmark.__main__ import _parser as benchmark_parser
from kdml.index.__main__ import _parser as index_parser

for prog, parser in (("index", index_parser()), ("benchmark", benchmark_parser())):
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, subparser in sub.choices.items():
        if not name.startswith("_"):
            out[f"{prog} {name}"] = argparse_flags(subparser)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def command_flags():
    result = subprocess.run([sys.executable, "-c", _DUMP], capture_output=True, text=True,
                            cwd=ROOT, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # one TensorFlow start-up in a subprocess
def test_shared_flags_have_one_name_type_and_help_wording_in_every_command(command_flags):
    assert set(command_flags) == set(EXPECTED_SHARED)
    for command, defined in command_flags.items():
        shared = set(defined) & set(command_line.SHARED_FLAGS)
        assert shared == EXPECTED_SHARED[command], command
        assert "output" not in defined, command  # the old name of --output_dir
    verbosity_help = command_flags["train"]["verbosity"]["help"]
    assert verbosity_help.startswith("Logging verbosity level.")  # absl's own flag
    for name, kind in EXPECTED_TYPES.items():
        helps = {}
        for command, defined in command_flags.items():
            if name in defined:
                assert defined[name]["type"] == kind, (command, name)
                helps[command] = defined[name]["help"]
        if name == "verbosity":
            assert set(helps.values()) == {verbosity_help}, helps
            continue
        # The shared wording first, then at most the command's own sentences.
        wording = command_line.SHARED_FLAGS[name].help
        assert wording.endswith(".") and len(wording) > 10
        for command, text in helps.items():
            assert text == wording or text.startswith(wording + " "), (command, name, text)


def test_help_of_a_shared_flag_is_the_wording_then_the_note():
    assert command_line.shared_help("seed") == "Random seed."
    assert command_line.shared_help("seed", "It draws the rows.") == "Random seed. It draws the rows."


@pytest.mark.parametrize("argv,known,renamed,hint", [
    (["--model=m.keras", "--output=x.json"], {"model", "output_dir"}, None,
     "error: --output is not a flag of prog: use --output_dir."),
    (["-output", "x"], {"output_dir"}, None, "error: -output is not a flag of prog: use --output_dir."),
    (["--dataset=synthetic"], {"source"}, {"dataset": "source"},
     "error: --dataset is not a flag of prog: use --source."),
    (["--output_dir=x"], {"results_dir"}, {"output_dir": "--results_dir (the report)"},
     "error: --output_dir is not a flag of prog: use --results_dir (the report)."),
])
def test_another_commands_spelling_is_a_one_line_hint_with_exit_code_2(argv, known, renamed,
                                                                       hint, capsys):
    with pytest.raises(SystemExit) as exit_:
        command_line.check_flag_spellings(argv, known, "prog", renamed)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == hint + "\n"


def test_spellings_a_command_has_and_values_after_a_double_dash_pass():
    command_line.check_flag_spellings(["--output=x"], {"output"}, "prog")  # its own flag
    command_line.check_flag_spellings(["--", "--output=x"], set(), "prog")
    command_line.check_flag_spellings(["--seed=-1", "-1", "--unknown"], {"seed"}, "prog")


@pytest.mark.parametrize("module,argv,hint", [
    ("kdml.index.__main__", ["build", "--model=m.keras", "--source=synthetic", "--output=g"],
     "error: --output is not a flag of python -m kdml.index: use --output_dir."),
    ("kdml.index.__main__", ["query", "--index=g", "--model=m.keras", "--output=q.json", "a.png"],
     "error: --output is not a flag of python -m kdml.index: use --output_dir."),
    ("kdml.index.__main__", ["build", "--model=m.keras", "--dataset=synthetic", "--output_dir=g"],
     "error: --dataset is not a flag of python -m kdml.index: use --source."),
    ("kdml.benchmark.__main__", ["run", "--output_dir=r"],
     "error: --output_dir is not a flag of python -m kdml.benchmark: use --results_dir (run "
     "files and the report) or --scratch_dir (checkpoints, models, logs)."),
])
def test_argparse_commands_give_the_hint_before_parsing(module, argv, hint, capsys):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and capsys.readouterr().err == hint + "\n"


def test_absl_commands_give_the_hint_before_absl_parses(capsys):
    parse = command_line.absl_flags_parser("python -m kdml.evaluate")
    with pytest.raises(SystemExit) as exit_:
        parse(["prog", "--model=m.keras", "--output=eval.json"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: --output is not a flag of python -m kdml.evaluate: "
                                       "use --output_dir.\n")


# Lines captured from the commands before they were quiet (one per kind of noise), and
# lines the commands print themselves.
_NOISE_SAMPLES = {
    "absl/glog log line": [
        "I1204 16:52:43.420349 139695044705152 signature_serialization.py:156] Function `serve` "
        "contains input name(s) resource",
        "I1204 16:52:45.492462 139695044705152 workflow.py:57] Wrote saved_model: /tmp/exp/saved_model",
        "W0000 00:00:1796403571.620154   12814 gpu_device.cc:2344] Cannot dlopen some GPU libraries."],
    "Python log record": ["INFO:tensorflow:Assets written to: /tmp/exp/saved_model/assets"],
    "TFLite C++ log": ["INFO: Created TensorFlow Lite XNNPACK delegate for CPU."],
    "TFLite converter": ["fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, "
                         "output_inference_type: FLOAT32"],
    "TensorFlow C++ start-up": [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796403571.620497   12814 cudart_stub.cc:31] Could not find cuda drivers on "
        "your machine, GPU will not be used.",
        "E0000 00:00:1796403575.088636   12814 cuda_platform.cc:52] failed call to cuInit: "
        "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
        "2026-12-04 12:00:00.000000: I tensorflow/core/util/port.cc:153] oneDNN custom operations "
        "are on."],
    "Python warning": [
        "/venv/lib/python3.11/site-packages/umap/umap_.py:1952: UserWarning: n_jobs value 1 "
        "overridden to 1 by setting random_state. Use no seed for parallelism."],
    "traceback": ["Traceback (most recent call last):"],
}
_OWN_LINES = [
    "data:     synthetic (glyph): train 2000 images of 100 classes, test 2000 images of 100 classes",
    "strategy: one device, CPU:0; float32, XLA auto",
    "| result | recall@1 | recall@2 | recall@4 | recall@8 | map@r | r_precision | nmi |",
    "| tflite_int8 | 170 | 0.99862 | 0.99843 | 48.50 | 12.21 | 0.047 |",
    "Exporting runs/default/embedder.keras (saved_model, tflite float32/int8) to runs/default/export",
    "Wrote tflite_int8: /tmp/exp/embedder_int8.tflite",
    "Evaluating runs/default/embedder.keras on synthetic (retrieval)",
    "Indexed 4000 images of 200 classes (d = 512, backend exact): /tmp/idx",
    "logs:     /tmp/run/logs (tensorboard --logdir /tmp/run/logs)",
    "error: --output is not a flag of python -m kdml.evaluate: use --output_dir.",
]


def test_noise_is_every_kind_of_log_and_warning_line_and_none_of_the_commands_own():
    assert set(_NOISE_SAMPLES) == set(NOISE_PATTERNS)
    for kind, lines in _NOISE_SAMPLES.items():
        found = noise_lines("\n".join(lines))
        assert len(found) == len(lines), (kind, found)
        if kind not in ("TensorFlow C++ start-up", "absl/glog log line"):  # overlap: either
            assert {k for k, _ in found} == {kind}, found
    assert noise_lines("\n".join(_OWN_LINES)) == []


@pytest.mark.slow  # one TensorFlow start-up in a subprocess
def test_the_test_suites_conftest_imports_tensorflow_without_a_line():
    """pytest holds a conftest's output and prints it after its summary line (what `make
    test` showed): tests/conftest.py imports TensorFlow with stderr captured."""
    result = subprocess.run(
        [sys.executable, "-c", "import runpy; runpy.run_path('tests/conftest.py')"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert noise_lines(result.stdout + result.stderr) == [], result.stderr


@pytest.mark.slow
def test_every_command_on_the_synthetic_dataset_is_quiet_and_says_where_its_files_go(tmp_path):
    """The README's path on the embedded glyphs, as a user runs it: train one short epoch,
    evaluate with figures, export, index, query, measure the index, report a benchmark.
    Each command prints its own lines only: zero `noise_lines` (TF / absl / converter
    logs, C++ start-up lines, Python warnings)."""
    import shutil

    import numpy as np

    from kdml.evaluation.clustering import DEFAULT_MAX_ITER
    from kdml.index.backends import faiss_available

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # a user's shell

    def run(module, *args, quiet=True):
        result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (module, result.stderr[-3000:])
        if quiet:
            assert noise_lines(result.stdout + result.stderr) == [], (module, result.stderr[-3000:])
        return result.stdout.splitlines()

    # kdml.train: what will run, the result table, where the files are.
    out = tmp_path / "run"
    lines = run("kdml.train", "--epochs=1", "--embedding_dim=32", "--classes_per_batch=16",
                "--images_per_class=4", "--jit_compile=false", "--verbose=0", f"--output_dir={out}")
    assert [line.split(":")[0] for line in lines[:6]] == [
        "data", "model", "method", "strategy", "schedule", "output"]
    assert lines[0].startswith("data:     synthetic (glyph): train 2000 images of 100 classes")
    assert lines[1].startswith("model:    conv4 (weights none, 28 px") and "32-d embedding" in lines[1]
    assert "1 epoch x 32 steps of 16 classes x 4 images" in lines[4] and str(out) in lines[5]
    assert lines[-3:] == [f"embedder: {out / 'embedder.keras'}", f"metrics:  {out / 'metrics.json'}",
                          f"logs:     {out / 'logs'} (tensorboard --logdir {out / 'logs'})"]
    assert lines[-4].startswith("| final |") and lines[-5].startswith("| initial |")
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["config"]["dataset"] == "synthetic" and metrics["config"]["backbone"] == "conv4"
    model = out / "embedder.keras"

    # kdml.evaluate --plots into --output_dir: the metrics of training's own final evaluation
    # (same k-means default, kdml.evaluation.clustering).
    lines = run("kdml.evaluate", f"--model={model}", "--dataset=synthetic",
                f"--kmeans_max_iter={DEFAULT_MAX_ITER}", "--plots", "--plot_map=tsne",
                "--plot_points=300", "--grid_k=4", "--grid_sampled=2", "--grid_worst=2",
                f"--output_dir={tmp_path / 'eval'}")
    assert lines[0] == f"Evaluating {model} on synthetic (retrieval)"
    assert lines[3].startswith("| embedder.keras |")
    assert lines[-1] == f"Wrote {tmp_path / 'eval' / 'eval_test.json'}"
    evaluated = json.load(open(tmp_path / "eval" / "eval_test.json"))
    for key in ("recall@1", "recall@8", "map@r", "r_precision", "nmi"):
        np.testing.assert_allclose(evaluated["metrics"][key], metrics["final"][key], atol=1e-6)
    for path in evaluated["plots"].values():
        assert open(path, "rb").read(4) == b"\x89PNG" and str(tmp_path / "eval") in path

    # kdml.export (int8 brings the converter's C++ lines, parity the LiteRT delegate's).
    lines = run("kdml.export", f"--model={model}", f"--output_dir={tmp_path / 'export'}",
                "--quantization=float32,int8", "--calibration_images=20", "--parity_images=200",
                "--latency_runs=2")
    assert lines[0] == (f"Exporting {model} (saved_model, tflite float32/int8) to "
                        f"{tmp_path / 'export'}")
    assert any(line.startswith("| tflite_int8 |") for line in lines)
    assert lines[-4:] == [f"Wrote saved_model: {tmp_path / 'export' / 'saved_model'}",
                          f"Wrote tflite_float32: {tmp_path / 'export' / 'embedder_float32.tflite'}",
                          f"Wrote tflite_int8: {tmp_path / 'export' / 'embedder_int8.tflite'}",
                          f"Wrote {tmp_path / 'export' / 'parity.json'}"]

    # kdml.index build / query (the synthetic source has no files: rows are "synthetic#i")
    index = tmp_path / "gallery.index"
    lines = run("kdml.index", "build", f"--model={model}", "--source=synthetic",
                f"--output_dir={index}")
    assert lines == [f"Indexed 4000 images of 200 classes (d = 32, backend exact): {index}"]
    lines = run("kdml.index", "query", f"--index={index}", f"--model={model}", "--source=synthetic",
                "--k=3", f"--output_dir={tmp_path / 'query'}")
    assert lines == [f"Wrote {tmp_path / 'query' / 'query.json'}"]
    records = json.load(open(tmp_path / "query" / "query.json"))
    assert len(records) == 4000 and all(len(r["neighbours"]) == 3 for r in records)
    assert all(n["path"] != r["query"] for r in records for n in r["neighbours"])  # not itself
    # the search model (a float16 gallery product: oneDNN's C++ "DT_HALF" line on CPUs
    # without AVX-512 FP16 must stay hidden)
    lines = run("kdml.export", f"--model={model}", f"--output_dir={tmp_path / 'search'}",
                f"--gallery={index}", "--quantization=float16", "--noparity")
    assert lines[-1] == (f"Wrote search_float16: "
                         f"{tmp_path / 'search' / 'embedder_float16_search.tflite'}")
    if faiss_available():
        lines = run("kdml.index", "evaluate", f"--index={index}", "--k=3", "--num_queries=50",
                    f"--output_dir={tmp_path / 'index_eval'}")
        assert lines[0] == "| search | recall@3 vs exact | queries/s |"
        assert lines[-1] == f"Wrote {tmp_path / 'index_eval' / 'evaluate.json'}"

    # kdml.benchmark report, on a copy of the committed Omniglot results.
    results = tmp_path / "results"
    shutil.copytree(os.path.join(ROOT, "docs", "results", "previous_protocol", "omniglot"), results)
    lines = run("kdml.benchmark", "report", results)
    assert any(line.startswith("| ") for line in lines) and (results / "results.png").is_file()


def test_quiet_logs_only_in_a_quiet_command_and_verbosity_skips_the_quiet_start(monkeypatch):
    """`--verbosity` (any level) skips `quiet_startup`, so `quiet_logs` changes nothing and
    every log line stays; a quiet command keeps absl to warnings, TensorFlow's logger to errors."""
    import logging as python_logging

    from absl import logging

    from kdml import quiet_startup

    tf_logger = python_logging.getLogger("tensorflow")
    before = logging.get_verbosity(), tf_logger.level
    try:
        logging.set_verbosity(logging.INFO)
        tf_logger.setLevel(python_logging.INFO)
        assert quiet_startup.quiet_startup(["--verbosity=0"]) is False and not quiet_startup.is_quiet()
        quiet_startup.quiet_logs()
        assert (logging.get_verbosity(), tf_logger.level) == (logging.INFO, python_logging.INFO)
        monkeypatch.setattr(quiet_startup, "_quiet", True)
        quiet_startup.quiet_logs()
        assert (logging.get_verbosity(), tf_logger.level) == (logging.WARNING, python_logging.ERROR)
    finally:
        logging.set_verbosity(before[0])
        tf_logger.setLevel(before[1])


def test_native_output_is_captured_only_in_a_quiet_command(monkeypatch, capfd):
    from kdml import quiet_startup

    with quiet_startup.native_output_hidden():
        os.write(2, b"shown\n")
    monkeypatch.setattr(quiet_startup, "_quiet", True)
    with quiet_startup.native_output_hidden():
        os.write(2, b"fully_quantize: 0\n")
    assert capfd.readouterr().err == "shown\n"


def test_quiet_warnings_hide_other_libraries_and_keep_kdmls_as_one_plain_line(capsys):
    import warnings

    from kdml import quiet_startup

    with warnings.catch_warnings():
        quiet_startup.quiet_warnings()
        warnings.warn_explicit("n_jobs value 1 overridden", UserWarning, "umap_.py", 1952,
                               module="umap.umap_")
        warnings.warn_explicit("1 of 7 queries have no other image of their class",
                               UserWarning, "protocols.py", 202, module="kdml.evaluation.protocols")
    err = capsys.readouterr().err
    assert err == "warning: 1 of 7 queries have no other image of their class\n"
    assert noise_lines(err) == []


@pytest.mark.parametrize("argv, message", [
    (["--bogus=1"], "error: Unknown command line flag 'bogus' (flags: python -m kdml.train --helpfull)"),
    (["--epochs=abc"], "error: flag --epochs=abc: invalid literal for int() with base 10: 'abc' "
                       "(flags: python -m kdml.train --helpfull)"),
])
def test_absl_commands_refuse_an_unknown_or_malformed_flag_in_one_line_with_exit_code_2(
        argv, message, capsys):
    """absl itself prints two lines and exits 1; argparse commands exit 2 with one line."""
    import kdml.train  # noqa: F401  (defines the train flags in absl's FLAGS)

    parse = command_line.absl_flags_parser("python -m kdml.train")
    with pytest.raises(SystemExit) as exit_:
        parse(["prog", *argv])
    captured = capsys.readouterr()
    assert exit_.value.code == 2
    assert captured.err.splitlines() == [message] and captured.out == ""
