"""The command lines: `python -m kdml.train` and `python -m kdml.evaluate`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from kdml import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(module, argv):
    """Parses `argv` with absl and runs `module.main`; returns the exit code."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", *argv])
    try:
        module.main(["prog"])
        return 0
    except SystemExit as exit_:
        return exit_.code
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("argv,message", [
    (["--method=magic"], "Unknown method 'magic'. Valid methods: "),
    (["--dataset=imagenet"], "Unknown dataset 'imagenet'. Valid datasets: synthetic, folder:<dir>, "
                             "tfds:<name>."),
    (["--dataset=tfds:mnist"], "mnist"),
    (["--dataset=folder:/no/such/dir"], "/no/such/dir"),
    (["--classes_per_batch=500"], "--classes_per_batch"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(argv, message, capsys, tmp_path):
    code = _run_main(train_cli, argv + [f"--output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def test_helpfull_lists_every_training_flag():
    out = subprocess.run([sys.executable, "-m", "kdml.train", "--helpfull"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120).stdout
    for name in ("method", "dataset", "eval_dataset", "data_dir", "backbone", "weights",
                 "embedding_dim", "image_size", "classes_per_batch", "images_per_class", "epochs",
                 "lr", "output_dir", "strategy", "mixed_precision", "seed", "resume", "eval_every"):
        assert f"--{name}" in out or f"--[no]{name}" in out, name  # absl shows bools as --[no]x


def test_train_then_evaluate_the_default_dataset_from_the_command_line(tmp_path):
    """The README's main job, one short epoch: train, then `kdml.evaluate` its embedder."""
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "kdml.train", "--epochs=1", "--embedding_dim=32",
                    "--classes_per_batch=16", "--images_per_class=4", "--jit_compile=false",
                    "--verbose=0", f"--output_dir={out}"], check=True, cwd=ROOT, timeout=600,
                   capture_output=True)
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["config"]["dataset"] == "synthetic" and metrics["config"]["backbone"] == "conv4"
    result = subprocess.run([sys.executable, "-m", "kdml.evaluate", f"--model={out / 'embedder.keras'}",
                             "--dataset=synthetic"], check=True, cwd=ROOT, timeout=600,
                            capture_output=True, text=True)
    assert "| embedder.keras |" in result.stdout
    evaluated = json.load(open(out / "eval_test.json"))["metrics"]
    for key in ("recall@1", "recall@8", "map@r", "r_precision", "nmi"):
        np.testing.assert_allclose(evaluated[key], metrics["final"][key], atol=1e-6)
