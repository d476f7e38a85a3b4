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
import warnings
from typing import Callable, Optional

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
    # Keras only warns, and restores nothing of that object, when the file holds
    # another number of variables (e.g. resumed with other learning-rate groups or
    # another --mixed_precision): a resume would silently restart the optimizer.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(os.path.join(path, WEIGHTS_FILE))
    skipped = [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]
    if skipped:
        raise ValueError(
            f"Checkpoint {path} does not match this model: {skipped[0]} Resume with the "
            "flags of the run that wrote it (method, backbone, head, embedding size, "
            "--mixed_precision), or start a new --output_dir.")
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    logging.info("Restored %s (global step %d).", path, state["step"])
    return state


def remove_partial_checkpoints(directory: str) -> list:
    """Deletes the temporary directories of checkpoint writes that were killed.

    They are never taken for checkpoints (`list_checkpoints`); this only frees the
    space. Call it from the one process that writes `directory`, before training.
    """
    if not os.path.isdir(directory):
        return []
    partial = [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(".tmp-ckpt-")]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    if partial:
        logging.warning("Removed %d partial checkpoint(s) of an interrupted write: %s",
                        len(partial), ", ".join(partial))
    return partial


class Checkpointer(keras.callbacks.Callback):
    """Saves a checkpoint every `every_steps` steps (0: never) and after every epoch.

    The global step counts the batches trained (the runner sets `step` to the first
    one before each `fit`); it is the data position a resumed run starts from. It is
    not the optimizer's `iterations`, which a `LossScaleOptimizer` does not advance
    on the steps it skips for overflowing gradients.
    """

    def __init__(self, directory: str, every_steps: int = 0, keep: int = 3,
                 extra_state: Optional[Callable[[], dict]] = None):
        super().__init__()
        self.directory = directory
        self.every_steps = int(every_steps)
        self.keep = int(keep)
        self.extra_state = extra_state
        self.epoch = 0
        self.step = 0

    def _save(self):
        state = {"epoch": self.epoch, **(self.extra_state() if self.extra_state else {})}
        save_checkpoint(self.model, self.directory, self.step, state, self.keep)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.every_steps and self.step % self.every_steps == 0:
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = epoch + 1
        self._save()
