"""Quiet TensorFlow start-up for the scripts of tools/, as `python -m kdml.<command>` has.

    if __name__ == "__main__":
        import quiet  # tools/quiet.py (the script's folder is on sys.path)

        quiet.quiet_startup()
        main()

`quiet_startup()` loads `kdml/quiet_startup.py` by its path, as the module
`kdml.quiet_startup` (importing the `kdml` package would import TensorFlow, and print
its C++ start-up lines, first), and runs its `quiet_startup` and `quiet_logs`:
TensorFlow is imported with stderr captured, other libraries' Python warnings are
hidden, absl logs warnings and errors only, and kdml's `native_output_hidden()` (the
TFLite converter's and LiteRT's lines) is on. `-v` / `--verbosity` on the command line
skips all of it, as for the commands. It also puts the repository root on `sys.path`,
so the script imports this checkout's `kdml`.

Call it only from a script's `__main__` block: a test that imports a tool keeps its
own warnings and logs.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "kdml.quiet_startup"


def load_quiet_startup():
    """The `kdml.quiet_startup` module, loaded by path when `kdml` is not imported yet."""
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    spec = importlib.util.spec_from_file_location(
        MODULE, os.path.join(ROOT, "kdml", "quiet_startup.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module  # `import kdml` later finds this one: one quiet state
    spec.loader.exec_module(module)
    return module


def quiet_startup(argv=None) -> bool:
    """Imports TensorFlow without its start-up lines (see the module docstring); returns
    False, changing nothing, when `argv` (default `sys.argv[1:]`) asks for `--verbosity`."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    module = load_quiet_startup()
    if not module.quiet_startup(argv):
        return False
    module.quiet_logs()
    return True
