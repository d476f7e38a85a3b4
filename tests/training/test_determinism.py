"""kdml.training.make_deterministic: a PDDM step repeats bit for bit on CPU.

Without it, the gradients of the same PDDM step inside `tf.function` differ from call
to call (measured up to 3e-5 on 2 cores: kdml/training/determinism.py); the check runs in
a fresh process because TensorFlow's thread pools are fixed once it has run an op.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_STEP = r"""
import os, sys
os.environ["KERAS_BACKEND"] = "tensorflow"
import numpy as np
import tensorflow as tf
import kdml
from kdml.layers import PDDM, PDDMScoreMatrix
from kdml.losses import PDDMLoss
from kdml.training import make_deterministic

make_deterministic()
import keras
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = tf.constant(rng.normal(size=(128, 512)).astype("float32"))  # the benchmark's batch and d
y = tf.constant(np.repeat(np.arange(32), 4).astype("int32"))
head = PDDMScoreMatrix(PDDM(hidden_dim=128))
loss = PDDMLoss()

@tf.function
def step():
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(y, head(x))
    return [value] + tape.gradient(value, [x] + head.trainable_weights)

first = [t.numpy() for t in step()]
for _ in range(5):
    again = [t.numpy() for t in step()]
    assert all(np.array_equal(a, b) for a, b in zip(first, again)), max(
        float(np.max(np.abs(a - b))) for a, b in zip(first, again))
print("REPEATS", tf.config.threading.get_inter_op_parallelism_threads(),
      tf.config.threading.get_intra_op_parallelism_threads())
"""


def test_a_pddm_step_repeats_bit_for_bit():
    result = subprocess.run([sys.executable, "-c", _STEP], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REPEATS 1 1" in result.stdout


def test_it_refuses_to_pretend_once_tensorflow_has_run():
    code = ("import tensorflow as tf; tf.constant(1.0) + 1.0\n"
            "from kdml.training import make_deterministic\n"
            "make_deterministic()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode != 0
    assert "must take effect before TensorFlow runs its first op" in result.stderr
