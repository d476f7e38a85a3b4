"""Private helpers shared by the batch-level losses: the `BatchLoss` base (cross-replica
gather and scaling) and the stable masked log(1 + sum exp).

A batch-level metric-learning loss (Proxy Anchor, Multi-Similarity) is not a mean of
per-sample terms, so the mean of per-replica losses is not the loss of the global
batch. `kdml.distribute.all_gather` lets every replica see the global batch, and
`BatchLoss` applies Keras' per-replica 1/num_replicas scaling, which Keras itself skips
for scalar losses.
"""

import keras

from kdml.distribute import all_gather, num_replicas_in_sync

__all__ = [
    "BatchLoss",
    "all_gather",
    "labels_to_int32",
    "masked_log1p_sum_exp",
    "num_replicas_in_sync",
]

# Stands in for log(0) = -inf in masked logits. Finite, so gradients through
# `where` stay 0 (never NaN), and far enough below any real logit (|alpha * s| < 1e3)
# that exp() of it underflows to exactly 0 in float32.
MASKED_LOGIT = -1e9


def labels_to_int32(y_true):
    """(B,) or (B, 1) labels, possibly cast to float by Keras -> int32 (B,)."""
    labels = keras.ops.convert_to_tensor(y_true)
    if not keras.backend.is_int_dtype(labels.dtype):
        labels = keras.ops.round(labels)
    return keras.ops.reshape(keras.ops.cast(labels, "int32"), (-1,))


def masked_log1p_sum_exp(logits, mask, axis):
    """log(1 + sum_{mask} exp(logits)) along `axis`, in float32, never overflowing.

    Stable form: softplus(logsumexp(where(mask, logits, MASKED_LOGIT))). An all-False
    slice gives softplus(MASKED_LOGIT + log n) = 0 with a zero (finite) gradient.
    """
    logits = keras.ops.cast(logits, "float32")
    masked = keras.ops.where(mask, logits, MASKED_LOGIT)
    return keras.ops.softplus(keras.ops.logsumexp(masked, axis=axis))


class BatchLoss(keras.losses.Loss):
    """Base for losses defined on a whole (optionally cross-replica) batch.

    Subclasses implement `call(y_true, y_pred) -> scalar` on the global batch (after
    `self._maybe_gather`). `__call__` then divides the scalar by the number of replicas
    in sync: Keras applies that scaling only to non-scalar per-sample losses (a scalar
    passes through its reduction untouched), but the optimizer still SUM-all-reduces
    the gradients, so without it a distributed step would be R times too large.

    Args:
        gather_across_replicas: Whether `call` all-gathers `y_true` and `y_pred` so
            that every replica computes the loss of the global batch.
        name, reduction, dtype: As `keras.losses.Loss`.
    """

    def __init__(self, gather_across_replicas=True, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if not isinstance(gather_across_replicas, bool):
            raise ValueError(
                "Expected `gather_across_replicas` to be a bool. Received: "
                f"gather_across_replicas={gather_across_replicas!r}"
            )
        self.gather_across_replicas = gather_across_replicas

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(
                f"{type(self).__name__} is a batch-level loss and does not support "
                "per-sample weights. Received: sample_weight is not None. Fix: drop "
                "`sample_weight` / `class_weight`, or balance the batch sampler instead."
            )
        loss = super().__call__(y_true, y_pred)
        replicas = num_replicas_in_sync()
        if replicas > 1:
            loss = loss * keras.ops.cast(1.0 / replicas, loss.dtype)
        return loss

    def _maybe_gather(self, labels, values):
        """Flattens labels to int32 (B,), casts values to float32, gathers if asked."""
        labels = labels_to_int32(labels)
        values = keras.ops.cast(values, "float32")
        if self.gather_across_replicas:
            labels = all_gather(labels)
            values = all_gather(values)
        return labels, values

    def get_config(self):
        config = super().get_config()
        config["gather_across_replicas"] = self.gather_across_replicas
        return config
