"""Private base of the classification-based losses (docs/design.md 3.6): labels and the
cosines of a batch to the class weights -> logits -> softmax cross-entropy, averaged
over the (optionally cross-replica) global batch; and the label check they share with
Proxy Anchor.
"""

import math

import keras
import tensorflow as tf
from keras import ops

from kdml.losses._cross_replica import BatchLoss

_LABEL_FIX = ("Fix: map the labels to 0..C-1 (as kdml.data does) and give Proxies one proxy "
              "per training class.")


def checked_class_labels(labels, num_classes, loss_name):
    """(labels, valid): raises on a label outside [0, C) eagerly and in a tf.function.

    Eagerly a `ValueError`; in a graph a `tf.debugging.Assert` (InvalidArgumentError)
    that the returned labels depend on. XLA compiles the assert to nothing, so `valid`
    (a bool scalar) is returned for the caller to turn the loss into NaN.
    """
    in_range = ops.logical_and(ops.greater_equal(labels, 0), ops.less(labels, num_classes))
    valid = ops.all(in_range)
    if tf.executing_eagerly():
        if not bool(valid):
            bad = ops.convert_to_numpy(labels)[~ops.convert_to_numpy(in_range)][0]
            raise ValueError(
                f"{loss_name}: labels must be class indices in [0, C) = [0, {int(num_classes)})"
                f" (C = the number of classes of y_pred); received a label of {bad}. "
                + _LABEL_FIX)
        return labels, valid
    lowest, highest = ops.min(labels), ops.max(labels)
    bad = ops.where(ops.less(lowest, 0), lowest, highest)  # an offending label
    check = tf.debugging.Assert(valid, [
        f"{loss_name}: labels must be class indices in [0, C) with C = the number of "
        "classes of y_pred =", num_classes, "; received a label of", bad,
        ". " + _LABEL_FIX])
    with tf.control_dependencies([check]):
        return tf.identity(labels), valid


def positive_number(name, value):
    """`value` as a float, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Expected `{name}` to be a positive number. Received: {name}={value!r}")
    return float(value)


def positive_int(name, value):
    """`value` as an int >= 1, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int. Received: {name}={value!r}")
    return value


class ClassificationLoss(BatchLoss):
    """Mean softmax cross-entropy of per-class logits over the global batch.

    Subclasses implement `logits(labels, cosines) -> (B, C)` on float32 cosines
    (B, C * centers) and int32 labels (B,). `centers` is the number of weight vectors
    per class (sub-centres, SoftTriple's centres): column c * centers + k of y_pred is
    centre k of class c, as in pytorch-metric-learning's weight layout.

    The loss is 1/B sum_i [logsumexp_c z_ic - z_{i y_i}], computed in float32 whatever
    the dtype of y_pred, with B the global batch when `gather_across_replicas` (the
    returned scalar is then divided by the number of replicas, see `BatchLoss`).
    """

    centers = 1

    def call(self, y_true, y_pred):
        labels, cosines = self._maybe_gather(y_true, y_pred)  # (B,), (B, C*k) float32
        width = cosines.shape[-1]
        if width is not None and width % self.centers:
            raise ValueError(
                f"{type(self).__name__}: y_pred has {width} columns, not a multiple of the "
                f"{self.centers} centres per class. Fix: give Proxies num_classes * {self.centers} "
                "weight vectors.")
        num_classes = ops.shape(cosines)[-1] // self.centers
        labels, valid = checked_class_labels(labels, num_classes, type(self).__name__)
        logits = self.logits(labels, cosines)  # (B, C)
        target = ops.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        per_sample = ops.logsumexp(logits, axis=1) - target
        # NaN for labels outside [0, C) where the assert cannot run (XLA).
        return ops.mean(per_sample) + ops.where(valid, 0.0, float("nan"))

    def logits(self, labels, cosines):
        raise NotImplementedError

    def grouped(self, cosines):
        """(B, C * centers) -> (B, C, centers)."""
        return ops.reshape(cosines, (-1, ops.shape(cosines)[-1] // self.centers, self.centers))


def target_mask(labels, num_classes):
    """(B, C) bool: True at (i, y_i)."""
    return ops.equal(labels[:, None], ops.arange(num_classes, dtype="int32")[None, :])


# Cosines of the target class are clipped to [-1 + eps, 1 - eps] before arccos, whose
# derivative is infinite at +-1 (float32: 1 - 2^-23 is the largest float below 1).
_ACOS_EPSILON = 2.0 ** -23


def additive_angular_margin(labels, cosines, margin_degrees, scale):
    """ArcFace logits (B, C): s cos(theta_{y_i} + m) at the target, s cos theta elsewhere.

    Past theta = 180 deg - m, where cos(theta + m) would rise again, the target logit is
    s (cos theta - m sin m), as in insightface and pytorch-metric-learning.
    """
    margin = math.radians(margin_degrees)
    num_classes = ops.shape(cosines)[-1]
    mask = target_mask(labels, num_classes)
    target = ops.sum(ops.where(mask, cosines, 0.0), axis=1)  # (B,)
    angles = ops.arccos(ops.clip(target, -1.0 + _ACOS_EPSILON, 1.0 - _ACOS_EPSILON))
    with_margin = ops.where(angles <= math.pi - margin, ops.cos(angles + margin),
                            target - margin * math.sin(margin))
    return scale * ops.where(mask, with_margin[:, None], cosines)
