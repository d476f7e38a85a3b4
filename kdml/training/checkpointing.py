"""Atomic training checkpoints: model, optimizer and the global step, every N steps.

A checkpoint is a directory `ckpt-<step>/` holding `model.weights.h5` (Keras
`save_weights`, which includes the optimizer's variables) and `state.json`. It is
written under a temporary name and renamed into place, so a run killed mid-write
leaves the previous checkpoint intact and never a half-written one that looks
complete. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import keras
from absl import logging

_NAME = re.compile(r"^ckpt-(\d+)$")
WEIGHTS_FILE = "model.weights.h5"
STATE_FILE = "state.json"


def write_json_atomic(path: str, payload) -> None:
    """Writes JSON to `path` through a temporary file and `os.replace`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(directory: str) -> list:
    """Complete checkpoints in `directory`, oldest first, as (step, path)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        path = os.path.join(directory, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str) -> Optional[str]:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(model: keras.Model, directory: str, step: int, state: dict, keep: int = 3) -> str:
    """Writes `ckpt-<step>` atomically and prunes all but the newest `keep`."""
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"ckpt-{step}")
    tmp = os.path.join(directory, f".tmp-ckpt-{step}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
    write_json_atomic(os.path.join(tmp, STATE_FILE), {**state, "step": int(step)})
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore_checkpoint(model: keras.Model, path: str) -> dict:
    """Loads weights and optimizer state from `path` into `model`; returns its state."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    logging.info("Restored %s (global step %d).", path, state["step"])
    return state


class Checkpointer(keras.callbacks.Callback):
    """Saves a checkpoint every `every_steps` steps (0: never) and after every epoch.

    The global step is the optimizer's iteration count, so it survives restarts.
    """

    def __init__(self, directory: str, every_steps: int = 0, keep: int = 3):
        super().__init__()
        self.directory = directory
        self.every_steps = int(every_steps)
        self.keep = int(keep)
        self.epoch = 0

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def _save(self):
        save_checkpoint(self.model, self.directory, self._step(), {"epoch": self.epoch}, self.keep)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.every_steps and self._step() % self.every_steps == 0:
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = epoch + 1
        self._save()
