"""Bit-for-bit reproducible training on CPU (`--deterministic`).

A seed fixes the data order, the augmentation and the initial weights
(`keras.utils.set_random_seed`), but not the order in which TensorFlow's graph executor
runs independent ops. Measured on TensorFlow 2.21 (CPU, 2 cores): the gradients of one
PDDM train step (kdml.losses.PDDMLoss on a (128, 512) batch, inside `tf.function`)
differ from call to call by up to 3e-5, and two 16-step runs with one seed end with
weights 0.02 apart. No single kernel is to blame: `enable_op_determinism` and
`TF_ENABLE_ONEDNN_OPTS=0` leave the runs apart. The step's gradients repeat exactly in
eager mode, or in graph mode with one inter-op thread (or Grappler off), so the order in
which concurrently executed graph branches complete changes the sums; a whole run also
needs one intra-op thread (multi-threaded kernels split their sums by the threads that
are free), and PDDM's argmax mining turns these last-bit differences into other
quadruplets, hence other weights. With one thread in both pools two runs end with
identical weights, at about half the speed on 2 cores.
"""

from __future__ import annotations


def make_deterministic() -> None:
    """One thread in each of TensorFlow's pools and its op determinism, for this process.

    Call it before TensorFlow runs its first op (`kdml.training.train` does, with
    `TrainConfig(deterministic=True)`); afterwards TensorFlow cannot change its thread
    pools, and this raises a RuntimeError that says so.
    """
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    threading = tf.config.threading
    if (threading.get_inter_op_parallelism_threads() == 1
            and threading.get_intra_op_parallelism_threads() == 1):
        return
    try:
        threading.set_inter_op_parallelism_threads(1)
        threading.set_intra_op_parallelism_threads(1)
    except RuntimeError as error:
        raise RuntimeError(
            "--deterministic must take effect before TensorFlow runs its first op, and this "
            "process already ran one. Start a new process (python -m kdml.train "
            "--deterministic ...), or call kdml.training.make_deterministic() first.") from error
