"""Callbacks of a kdml training run: warm-up, throughput, retrieval evaluation."""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import keras
from absl import logging


class BackboneWarmup(keras.callbacks.Callback):
    """Trains only the head and proxies for the first `epochs` epochs.

    Sets the learning-rate multiplier of the optimizer group `group` (the
    backbone's variables) to 0 during warm-up and back to 1 after (Kim et al.
    2020's `--warm`).
    """

    def __init__(self, epochs: int, group: str):
        super().__init__()
        self.epochs = int(epochs)
        self.group = group

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.set_multiplier(self.group, 0.0 if epoch < self.epochs else 1.0)


class Throughput(keras.callbacks.Callback):
    """Adds `images_per_second` to the epoch logs: steady state, first batch excluded."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = None, 0

    def on_train_batch_end(self, batch, logs=None):
        if self._start is None:
            self._start = time.perf_counter()
        else:
            self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._steps:
            logs["images_per_second"] = self._steps * self.batch_size / (
                time.perf_counter() - self._start)


class RetrievalEvaluation(keras.callbacks.Callback):
    """Evaluates retrieval on the test classes every `every` epochs and at the end.

    `evaluate()` returns a metrics dict (`kdml.evaluation.retrieval_metrics`). The
    results are added to the epoch logs (so TensorBoard, placed after this
    callback, records them) and passed to `on_result(epoch, metrics)`.
    """

    def __init__(self, evaluate: Callable[[], Dict[str, float]], every: int, last_epoch: int,
                 on_result: Optional[Callable[[int, dict], None]] = None):
        super().__init__()
        self.evaluate = evaluate
        self.every = max(1, int(every))
        self.last_epoch = last_epoch
        self.on_result = on_result

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every and done != self.last_epoch:
            return
        metrics = self.evaluate()
        logging.info("epoch %d: %s", done, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if logs is not None:
            logs.update({f"test_{k}": v for k, v in metrics.items()})
        if self.on_result is not None:
            self.on_result(epoch, {**(logs or {}), **metrics})
