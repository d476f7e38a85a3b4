"""Test set-up shared by the whole suite.

The CPU is split into two logical devices before TensorFlow initialises, so that
`tf.distribute.MirroredStrategy` tests run without GPUs (docs/design.md section 5).
"""

import importlib.util
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _stderr_captured():
    """`kdml.quiet_startup.stderr_captured`, loaded without importing kdml (whose
    `__init__` imports TensorFlow)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kdml",
                        "quiet_startup.py")
    spec = importlib.util.spec_from_file_location("_kdml_quiet_startup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.stderr_captured()


# TensorFlow's C++ start-up lines (cudart_stub, cuInit, oneDNN) ignore TF_CPP_MIN_LOG_LEVEL.
# pytest holds what a conftest writes while it loads and prints it when the session
# ends, after the summary line; they are captured here instead (replayed on an error).
with _stderr_captured():
    import tensorflow as tf  # noqa: E402

    tf.config.list_physical_devices("GPU")  # CUDA probing logs here, once

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


# Test tiers (docs/development.md): `make test` runs everything, `make test-fast`
# deselects `large` and `slow`. Most marks sit on the tests; these are end-to-end tests
# (a real training run, a mirrored or mixed-precision fit, two worker processes), each
# over ~10 s of CPU, marked here by name (parametrized cases included).
_MARKED_HERE = {
    "large": (
        "tests/index/test_multi_worker.py::test_two_workers_build_the_one_process_index",
    ),
    "slow": (
        "tests/benchmark/test_runs.py::test_a_tiny_run_reports_the_metrics_of_its_saved_embedder",
        "tests/evaluation/test_rerank.py::test_train_pddm_reports_reranked_recall_and_writes_a_consistent_pddm_keras",
        "tests/models/test_crt_embedder.py::test_crt_fit_under_mirrored_strategy_equals_one_device_step",
        "tests/regularizers/test_so_proxy_method.py::test_end_to_end_so_term_is_in_the_logged_loss_and_diagnostics_reach_metrics",
        "tests/regularizers/test_so_proxy_method.py::test_two_replicas_take_the_same_pa_plus_so_step_as_one_device",
        "tests/test_evaluate.py::test_command_line_end_to_end_with_plots",
        "tests/test_readme.py::test_readme_keras_example_trains_evaluates_and_saves",
        "tests/training/test_mixed_precision.py::test_a_step_under_the_policy_has_finite_loss_and_gradients",
        "tests/training/test_mixed_precision.py::test_float16_wraps_grouped_adamw_in_loss_scaling_and_multipliers_still_apply",
        "tests/training/test_train.py::test_killed_run_resumes_mid_epoch_to_the_same_weights",
        "tests/training/test_train.py::test_train_under_mirrored_strategy_and_mixed_precision",
        "tests/training/test_train.py::test_two_replicas_take_the_same_step_as_one_on_the_global_batch",
    ),
}


def pytest_collection_modifyitems(config, items):
    """Adds the marks of `_MARKED_HERE`; a listed test that no longer exists in a
    collected file is an error (rename it here too)."""
    marks = {name: marker for marker, names in _MARKED_HERE.items() for name in names}
    found, files = set(), {item.nodeid.split("::")[0] for item in items}
    for item in items:
        name = item.nodeid.split("[")[0]
        if name in marks:
            item.add_marker(getattr(pytest.mark, marks[name]))
            found.add(name)
    missing = [name for name in marks if name not in found and name.split("::")[0] in files]
    selected = config.option.keyword or config.option.markexpr or any(
        "::" in arg for arg in config.args)
    if missing and not selected:
        raise pytest.UsageError(f"tests/conftest.py marks tests that do not exist: {missing}")


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from the same seeds and the float32 policy."""
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def new_mirrored_strategy():
    """A MirroredStrategy over the two logical CPUs, on collective keys of its own.

    TF starts every MirroredStrategy's collective keys at 1 and caches collectives
    by key for the life of the process, so a second strategy in one process can fail
    with "Shape mismatch in the collective instance"; TF's own tests offset
    `_collective_key_base` for that reason, and so does this.
    """
    tf.distribute.MirroredStrategy._collective_key_base += 10_000
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="module")
def mirrored():
    return new_mirrored_strategy()
