"""`create_strategy`: a tf.distribute strategy by name."""

from __future__ import annotations

import tensorflow as tf

STRATEGIES = ("auto", "one_device", "mirrored")


def create_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Builds the strategy `name`.

    - "auto": MirroredStrategy when more than one GPU is visible, else the default
      (single-device) strategy.
    - "one_device": the first GPU, or the CPU.
    - "mirrored": MirroredStrategy over all GPUs; without GPUs, over all logical
      CPU devices (tests split the CPU in two to exercise it).
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    raise ValueError(f"Unknown strategy {name!r}. Valid strategies: {', '.join(STRATEGIES)}.")
