"""Training: the run orchestration, callbacks and atomic checkpoints."""

from kdml.training.callbacks import NonFiniteLossError
from kdml.training.checkpointing import latest_checkpoint, list_checkpoints
from kdml.training.determinism import make_deterministic
from kdml.training.run import embed, train

__all__ = ["NonFiniteLossError", "embed", "latest_checkpoint", "list_checkpoints",
           "make_deterministic", "train"]
