"""The scripts of tools/ start TensorFlow quietly (`tools/quiet.py`), as the commands do.

Each check runs a script in a fresh process with `TF_CPP_MIN_LOG_LEVEL` unset and reads
its stdout and stderr for the start-up lines of `tests.helpers.NOISE_PATTERNS` (CUDA
probing, `cpu_feature_guard`, `absl::InitializeLog`, `I0000`/`E0000` log lines, oneDNN).
A bare `import tensorflow` in the same environment is the control: where it prints
such lines, the scripts must not.
"""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import noise_lines

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")


def _run(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=timeout)
    return result, result.stdout + result.stderr


@pytest.fixture(scope="module")
def control_is_noisy():
    _, text = _run(["-c", "import tensorflow as tf; tf.config.list_physical_devices('GPU')"])
    return bool(noise_lines(text))


def test_a_tool_help_prints_no_start_up_line(control_is_noisy):
    result, text = _run([os.path.join(TOOLS, "bench_index.py"), "--help"])
    assert result.returncode == 0, text
    assert "usage:" in result.stdout
    assert noise_lines(text) == [], (control_is_noisy, text)


def test_a_tool_that_imports_kdml_at_the_top_runs_quietly(tmp_path, control_is_noisy):
    """show_glyphs imports kdml (and TensorFlow) before its main: the sheet is written,
    and of the size its layout gives: rows = classes, columns = images, each cell
    S * zoom pixels plus a 2-pixel gutter."""
    output = tmp_path / "glyphs.png"
    result, text = _run([os.path.join(TOOLS, "show_glyphs.py"), f"--output={output}",
                         "--classes=100,101,102", "--images=4", "--zoom=2", "--image_size=20"])
    assert result.returncode == 0, text
    assert noise_lines(text) == [], (control_is_noisy, text)
    sheet = np.asarray(Image.open(output))
    cell = 20 * 2
    assert sheet.shape == (3 * (cell + 2) + 2, 4 * (cell + 2) + 2, 3)


def _imports_tensorflow(path):
    """Whether a script imports TensorFlow, Keras or kdml (which imports TensorFlow)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n.split(".")[0] in ("tensorflow", "keras", "kdml") for n in names):
            return True
    return False


def test_every_tool_that_imports_tensorflow_starts_quietly():
    """Each such script calls `quiet.quiet_startup()` in a `__main__` block."""
    missing = []
    for name in sorted(os.listdir(TOOLS)):
        path = os.path.join(TOOLS, name)
        if not name.endswith(".py") or name == "quiet.py" or not _imports_tensorflow(path):
            continue
        source = open(path, encoding="utf-8").read()
        if "quiet.quiet_startup()" not in source or 'if __name__ == "__main__"' not in source:
            missing.append(name)
    assert missing == [], f"tools without tools/quiet.py's start-up: {missing}"
