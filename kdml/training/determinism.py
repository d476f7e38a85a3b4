"""Bit-for-bit reproducible training on CPU (`--deterministic`).

A seed fixes the data order, the augmentation and the initial weights
(`keras.utils.set_random_seed`), but not the order in which TensorFlow's graph executor
runs independent ops. Measured on TensorFlow 2.21 (CPU, 2 cores): the gradients of one
PDDM train step (kdml.losses.PDDMLoss on a (128, 512) batch, inside `tf.function`)
differ from call to call by up to 3e-5, and two 16-step runs with one seed end with
weights 0.02 apart. Eager execution repeats exactly, and so does graph execution with
one inter-op thread or with Grappler switched off, while `enable_op_determinism` and
`TF_ENABLE_ONEDNN_OPTS=0` do not help: the result depends on the order in which the
graph's concurrently executed branches complete, not on one kernel. Running one op at a
time (each op still uses every core) removes that order.
"""

from __future__ import annotations


def make_deterministic() -> None:
    """One inter-op thread and TensorFlow's op determinism, for the rest of this process.

    Call it before TensorFlow runs its first op (`kdml.training.train` does, with
    `TrainConfig(deterministic=True)`); afterwards TensorFlow cannot change its thread
    pools, and this raises a RuntimeError that says so.
    """
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    if tf.config.threading.get_inter_op_parallelism_threads() == 1:
        return
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError as error:
        raise RuntimeError(
            "--deterministic must take effect before TensorFlow runs its first op, and this "
            "process already ran one. Start a new process (python -m kdml.train "
            "--deterministic ...), or call kdml.training.make_deterministic() first.") from error
