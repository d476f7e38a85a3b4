"""Proxy Anchor loss (Kim et al., CVPR 2020; docs/design.md 3.1)."""

import keras
from keras import ops

from kdml.losses._classification import checked_class_labels
from kdml.losses._cross_replica import BatchLoss
from kdml.losses._cross_replica import masked_log1p_sum_exp


@keras.saving.register_keras_serializable(package="kdml")
class ProxyAnchorLoss(BatchLoss):
    """Proxy Anchor loss on sample-to-proxy cosine similarities.

    Each proxy is an anchor that pulls the batch samples of its class and pushes the
    others (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020, the
    Proxy-Anchor loss equation; docs/design.md 3.1):

        L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
          + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

    P are all C proxies, P+ the proxies whose class occurs in the batch, X_p+ / X_p-
    the samples of / not of p's class. Each log(1 + sum exp) is computed in float32 as
    softplus(logsumexp(.)) over masked logits (masked entries use a large finite
    negative value, not -inf), so alpha * s up to 64 and beyond neither overflows nor
    gives NaN gradients, whatever the dtype of `y_pred`.

    Distribution: with `gather_across_replicas=True` each replica all-gathers labels and
    similarities and computes the loss of the GLOBAL batch (P+ is then the global set
    of present classes). The returned scalar is divided by the number of replicas (the
    Keras per-replica convention; Keras skips it for scalar losses, so this loss does
    it) and the optimizer sums gradients over replicas, so one distributed step equals
    the single-device step on the concatenated batch. With `False` each replica uses
    its own slice and the update is the mean over replicas of the per-slice losses.

    Args:
        alpha: Positive scale (the paper's alpha, default 32).
        margin: The paper's delta (default 0.1).
        gather_across_replicas: See "Distribution" above. Default True.
        name: Loss name.
        **kwargs: Passed to `keras.losses.Loss` (`reduction` has no effect on the
            scalar; `dtype` is the dtype inputs are first converted to, keep float32).

    Labels: a label outside [0, C) (C = the number of proxies) is an error, not a
    sample that is negative for every proxy: eagerly a `ValueError`, in a
    `tf.function` (`model.fit`) a `tf.errors.InvalidArgumentError` (both name C and
    the label). Under XLA (`jit_compile=True`), which compiles asserts away, the loss
    is NaN instead, which kdml's training stops on at once (`NonFiniteLossGuard`).

    Shapes:
        y_true: int class labels in [0, C), (B,) or (B, 1); float labels (Keras casts
            `y_true` to the loss dtype) are converted back to int32.
        y_pred: cosine similarities (B, C), e.g. the output of `kdml.layers.Proxies`.
        Returns: a float32 scalar. `sample_weight` is not supported.

    Example:

    >>> loss = ProxyAnchorLoss(alpha=32.0, margin=0.1)
    >>> sims = keras.ops.convert_to_tensor([[0.9, -0.1], [-0.2, 0.8]])
    >>> float(loss([0, 1], sims)) < 0.5
    True

    With alpha = 1, margin = 0 and one sample per proxy at cosine 0, each proxy has
    one positive and one negative term, log(1 + e^0) = log 2, so L = 2 log 2:

    >>> zeros = keras.ops.zeros((2, 2))
    >>> round(float(ProxyAnchorLoss(alpha=1.0, margin=0.0)([0, 1], zeros)), 6)
    1.386294
    """

    def __init__(
        self,
        alpha=32.0,
        margin=0.1,
        gather_across_replicas=True,
        name="proxy_anchor_loss",
        **kwargs,
    ):
        super().__init__(
            gather_across_replicas=gather_across_replicas, name=name, **kwargs
        )
        if not alpha > 0:
            raise ValueError(
                f"Expected `alpha` > 0 (the similarity scale). Received: alpha={alpha}"
            )
        self.alpha = float(alpha)
        self.margin = float(margin)

    def call(self, y_true, y_pred):
        labels, sims = self._maybe_gather(y_true, y_pred)  # (B,), (B, C) float32
        num_classes = ops.shape(sims)[-1]
        labels, valid = _checked_labels(labels, num_classes)
        class_ids = ops.arange(num_classes, dtype="int32")
        positive = ops.equal(labels[:, None], class_ids[None, :])  # (B, C)

        # Per proxy (column): log(1 + sum over its positives / negatives).
        pos_terms = masked_log1p_sum_exp(
            -self.alpha * (sims - self.margin), positive, axis=0
        )  # (C,)
        neg_terms = masked_log1p_sum_exp(
            self.alpha * (sims + self.margin), ops.logical_not(positive), axis=0
        )  # (C,)

        present = ops.cast(ops.any(positive, axis=0), "float32")  # P+ indicator
        pos_loss = ops.divide_no_nan(ops.sum(present * pos_terms), ops.sum(present))
        neg_loss = ops.mean(neg_terms)
        # NaN for labels outside [0, C) where the assert cannot run (XLA).
        return pos_loss + neg_loss + ops.where(valid, 0.0, float("nan"))

    def get_config(self):
        config = super().get_config()
        config.update({"alpha": self.alpha, "margin": self.margin})
        return config


def _checked_labels(labels, num_classes):
    """(labels, valid): see `kdml.losses._classification.checked_class_labels`."""
    return checked_class_labels(labels, num_classes, "ProxyAnchorLoss")
