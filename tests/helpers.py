"""Assertions shared by layer, loss and model tests."""

import os
import re
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np


def assert_config_roundtrip(obj):
    """`obj` rebuilds from its config as JSON text, by registered name and by class
    (`tests/layer_test_case.py`, which also runs the rest of the layer contract)."""
    from tests.layer_test_case import assert_json_config_roundtrip

    return assert_json_config_roundtrip(obj)


def assert_model_save_load(model, inputs, atol=1e-6):
    """A `.keras` save/load round trip reproduces `model(inputs)` with no custom_objects."""
    expected = keras.ops.convert_to_numpy(model(inputs, training=False))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    got = keras.ops.convert_to_numpy(loaded(inputs, training=False))
    np.testing.assert_allclose(got, expected, atol=atol)
    return loaded


def weights_after_one_step(strategy, build_model, initial_weights, loss, x, y,
                           optimizer=lambda: keras.optimizers.SGD(learning_rate=0.1)):
    """Weights after one `model.fit` step on the global batch (x, y) under `strategy`.

    The model is built, set to `initial_weights` and compiled inside the strategy's
    scope, so a single-device run and a mirrored run start from the same point.
    """
    import tensorflow as tf

    with strategy.scope():
        model = build_model()
        model.set_weights(initial_weights)
        model.compile(optimizer=optimizer(), loss=loss, jit_compile=False)
    dataset = tf.data.Dataset.from_tensors((x, y))
    model.fit(dataset, epochs=1, steps_per_epoch=1, shuffle=False, verbose=0)
    return [w.numpy() for w in model.weights]


def write_glyph_folder(root, *, num_classes=12, images_per_class=6, seed=3,
                       class_dir=lambda label: f"char{label:02d}"):
    """Writes synthetic glyphs as PNG files, one folder per class (`class_dir(label)`,
    relative to `root`, may hold an alphabet level); returns `str(root)`."""
    import tensorflow as tf

    from kdml.data.sources.synthetic import glyphs

    images = glyphs(num_classes=num_classes, images_per_class=images_per_class,
                    image_size=20, seed=seed)
    for i, (pixels, label) in enumerate(zip(images.pixels, images.labels)):
        folder = os.path.join(str(root), class_dir(int(label)))
        os.makedirs(folder, exist_ok=True)
        tf.io.write_file(os.path.join(folder, f"{i}.png"), tf.io.encode_png(pixels))
    return str(root)


def numerical_gradient(f, x, h=1e-6):
    """Central finite differences of the scalar function `f` at the array `x`."""
    x = np.asarray(x)
    numeric = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = (f(plus) - f(minus)) / (2 * h)
    return numeric


def run_local_workers(argv, num_workers=2, *, timeout_s, cwd=None):
    """Runs `python <argv>` as `num_workers` processes of a localhost TF_CONFIG cluster
    (CPU only, quiet) and returns each worker's combined output; asserts every worker
    exited 0 within `timeout_s` (a straggler is killed), showing the end of its log."""
    from kdml.distribute import local_cluster

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    workers = [subprocess.Popen([sys.executable, *argv(i)], cwd=cwd,
                                env={**env, "TF_CONFIG": tf_config}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
               for i, tf_config in enumerate(local_cluster(num_workers))]
    deadline, logs = time.monotonic() + timeout_s, []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pass
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for i, worker in enumerate(workers):
        assert worker.returncode == 0, f"worker {i}: {logs[i][-3000:] if i < len(logs) else 'timed out'}"
    return logs


# What a quiet `python -m kdml.<command>` must not print (tests/test_command_line.py):
NOISE_PATTERNS = {
    # absl / glog log format: I1204 12:00:00.123456 140 file.py:12] ... (also I0000 00:00:1796...)
    "absl/glog log line": r"^[IWEF]\d{4} [\d:.]+\s+\d+\s+\S+:\d+\]",
    # Python logging's default format: INFO:tensorflow:Assets written to ...
    "Python log record": r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]+:",
    # TFLite / LiteRT C++: "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
    "TFLite C++ log": r"^(INFO|WARNING|ERROR): ",
    # the converter's C++ printf
    "TFLite converter": r"^fully_quantize:",
    # TensorFlow's C++ start-up, CUDA probing, CPU notes, NMSLIB's banner
    "TensorFlow C++ start-up": r"cudart_stub|cuInit|cuda_dnn|cuda_blas|cuda_fft|oneDNN|"
                               r"cpu_feature_guard|absl::InitializeLog|rebuild TensorFlow|NMSLIB",
    # Python warnings: "<file>.py:1952: UserWarning: ..."
    "Python warning": r"^\s*\S+\.py:\d+: \w*Warning: ",
    "traceback": r"^Traceback \(most recent call last\)",
}


def noise_lines(text: str) -> list:
    """The lines of `text` that match a `NOISE_PATTERNS` entry, as (kind, line)."""
    found = []
    for line in text.splitlines():
        for kind, pattern in NOISE_PATTERNS.items():
            if re.search(pattern, line):
                found.append((kind, line))
                break
    return found
