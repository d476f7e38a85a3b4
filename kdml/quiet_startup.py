"""Quiet start-up of kdml's command lines (`python -m kdml.train`, `kdml.evaluate`, ...).

Importing TensorFlow writes C++ lines to stderr before any Python code can filter
them: CUDA probing ("cudart_stub.cc ... Could not find cuda drivers"), "All log
messages before absl::InitializeLog() is called are written to STDERR", CPU feature
notes, and on a machine with CUDA libraries but no GPU "failed call to cuInit".
tensorflow-similarity's NMSLIB prints a CPU-instruction banner from C++ when it is
imported. On a CPU-only machine all of it is noise.

`quiet_startup()` runs before `kdml` imports TensorFlow (from `kdml/__init__.py`, for
a `python -m kdml.<command>` process only; a library user's process is left alone):
it sets `TF_CPP_MIN_LOG_LEVEL=2` (TensorFlow's C++ errors only) unless the user set
it, and imports TensorFlow (probing the GPUs) and nmslib with the stderr file
descriptor sent to a temporary file, replayed if the import fails, and hides the Python
warnings of other libraries (UMAP's, Keras', TensorFlow's) unless `-W` /
PYTHONWARNINGS asks for them; kdml's own warnings stay, as plain `warning: ...` lines.
Later, `quiet_logs()` (at the start of each command's `main`) keeps absl and
TensorFlow's Python loggers to warnings and errors (absl's as plain `warning: ...`
lines), and `native_output_hidden()` captures the C++ lines of a call (the TFLite converter's "fully_quantize: ...", LiteRT's
"Created TensorFlow Lite XNNPACK delegate"). Passing absl's `-v` / `--verbosity` (any
level) on the command line skips all of this: every log line comes back.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from typing import Iterator, Optional, Sequence

_VERBOSITY_FLAGS = ("-v", "--verbosity", "-verbosity")
_quiet = False  # set by quiet_startup(): this process is a quiet `python -m kdml.<command>`


def is_kdml_command_line(argv: Optional[Sequence[str]] = None) -> bool:
    """Whether this process is `python -m kdml.<command> ...` (`sys.orig_argv`)."""
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    return any(a == "-m" and b.startswith("kdml.") for a, b in zip(argv, argv[1:]))


def asks_for_verbosity(argv: Sequence[str]) -> bool:
    """Whether the command line sets absl's `-v` / `--verbosity` flag."""
    return any(arg in _VERBOSITY_FLAGS or arg.startswith(tuple(f"{f}=" for f in _VERBOSITY_FLAGS))
               for arg in argv)


@contextlib.contextmanager
def stderr_captured() -> Iterator[None]:
    """Sends file descriptor 2 (C and C++ writes included) to a temporary file; on an
    exception the captured text is written back to stderr before it propagates."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def quiet_startup(argv: Optional[Sequence[str]] = None) -> bool:
    """Imports TensorFlow and nmslib without their start-up lines; returns whether it
    did (False when `argv`, default `sys.argv`, asks for `--verbosity`)."""
    global _quiet
    if asks_for_verbosity(sys.argv[1:] if argv is None else argv):
        return False
    _quiet = True
    if not sys.warnoptions:  # no -W / PYTHONWARNINGS of the user's
        quiet_warnings()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with stderr_captured():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # CUDA probing logs here, once
        try:
            import nmslib  # noqa: F401  (tensorflow-similarity's index; its banner)
        except ImportError:
            pass
    return True


def quiet_warnings() -> None:
    """Hides Python warnings of other libraries; kdml's own (e.g. "1 of 7 queries have
    no other image of their class") stay, as one plain `warning: <message>` line."""
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"kdml(\.|$)")  # the only ones shown

    def showwarning(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = showwarning


def is_quiet() -> bool:
    """Whether this process is a `python -m kdml.<command>` run without `--verbosity`."""
    return _quiet


def quiet_logs() -> None:
    """In a quiet command: absl logs warnings and errors only, TensorFlow's Python
    logger errors only. Elsewhere (a library user, `--verbosity`): nothing changes."""
    if not _quiet:
        return
    import logging as python_logging

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    python_logging.getLogger("tensorflow").setLevel(python_logging.ERROR)
    # kdml's absl warnings as plain `warning: <message>` lines, like its Python warnings
    # (not "W1207 23:09:23.24 1405 folder.py:80] ..." or "WARNING:absl:...")
    logging.get_absl_handler().python_handler.setFormatter(_PlainFormatter())
    logging.use_absl_handler()
    from absl import flags

    if not flags.FLAGS.is_parsed():  # an argparse command: no "Logging before flag parsing"
        flags.FLAGS.mark_as_parsed()


class _PlainFormatter:
    """`<level>: <message>` (`warning: ...`, `error: ...`): a command's log line."""

    def format(self, record) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def native_output_hidden():
    """A context that captures file descriptor 2 (`stderr_captured`) in a quiet command,
    for calls whose C++ code writes log lines; elsewhere a no-op."""
    return stderr_captured() if _quiet else contextlib.nullcontext()
