"""Private helpers of the pair- and triplet-based losses (docs/design.md 3.5).

`PairLoss` is the base of every loss computed on the pairs of a batch of embeddings
against a reference set: the batch itself (plain call, the global batch across replicas)
or a cross-batch memory (`kdml.losses.CrossBatchMemory`). Subclasses implement
`pair_loss(labels, embeddings, ref_labels, ref_embeddings, excluded)`, in float32.

The reductions follow pytorch-metric-learning's reducers exactly: `mean_of_positive` is
its `AvgNonZeroReducer` (the mean of the terms > 0, 0 when there is none), and a plain
masked mean its `MeanReducer`.
"""

from keras import ops

from kdml.losses._cross_replica import MASKED_LOGIT
from kdml.losses._cross_replica import BatchLoss

DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def l2_normalize(x):
    """x / max(||x||, 1e-12) row-wise, as torch.nn.functional.normalize."""
    squared = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared, 1e-24))


def check_distance(distance):
    if distance not in DISTANCES:
        raise ValueError(
            f"Expected `distance` in {', '.join(DISTANCES)}. Received: distance={distance!r}. "
            "Fix: pass one of these names.")
    return distance


def distance_matrix(a, b, distance):
    """(m, d), (n, d) -> (m, n): Euclidean or squared Euclidean distance, or cosine
    similarity (the dot product; the rows are unit vectors when normalised).

    The Euclidean form is sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0)) with a zero (finite)
    gradient where the distance is 0, as torch.cdist.
    """
    dots = ops.matmul(a, ops.transpose(b))
    if distance == "cosine":
        return dots
    squared = (ops.sum(ops.square(a), axis=1)[:, None] + ops.sum(ops.square(b), axis=1)[None, :]
               - 2.0 * dots)
    squared = ops.maximum(squared, 0.0)
    if distance == "squared_euclidean":
        return squared
    positive = ops.greater(squared, 0.0)
    return ops.where(positive, ops.sqrt(ops.where(positive, squared, 1.0)), 0.0)


def pair_masks(labels, ref_labels, excluded):
    """(positive, negative) (m, n) bool masks: same label / another label, each outside
    `excluded` (m, n) (a query's own entry; empty memory rows)."""
    same = ops.equal(labels[:, None], ref_labels[None, :])
    kept = ops.logical_not(excluded)
    return ops.logical_and(same, kept), ops.logical_and(ops.logical_not(same), kept)


def mean_of_positive(losses, mask):
    """pytorch-metric-learning's AvgNonZeroReducer: mean of the masked terms > 0 (else 0)."""
    losses = ops.cast(losses, "float32")
    keep = ops.logical_and(mask, ops.greater(losses, 0.0))
    total = ops.sum(ops.where(keep, losses, 0.0))
    return ops.divide_no_nan(total, ops.sum(ops.cast(keep, "float32")))


def masked_mean(losses, mask):
    """pytorch-metric-learning's MeanReducer over the masked terms (0 when none)."""
    total = ops.sum(ops.where(mask, ops.cast(losses, "float32"), 0.0))
    return ops.divide_no_nan(total, ops.sum(ops.cast(mask, "float32")))


def masked_logsumexp(logits, mask, axis):
    """log sum_{mask} exp(logits) along `axis`; an all-False slice gives MASKED_LOGIT + log n
    (callers mask it out), never NaN, with a zero gradient there."""
    return ops.logsumexp(ops.where(mask, logits, MASKED_LOGIT), axis=axis)


class PairLoss(BatchLoss):
    """Base of the losses on the pairs of a batch of embeddings (docs/design.md 3.5).

    `call(y_true, y_pred)` gathers the global batch across replicas (`BatchLoss`),
    L2-normalises the embeddings when `normalize_embeddings` (as the distances of
    pytorch-metric-learning do by default) and returns `pair_loss` of the batch against
    itself. `kdml.losses.CrossBatchMemory` calls `pair_loss` with a memory as reference.

    Args:
        normalize_embeddings: L2-normalise `y_pred` first (default True).
        gather_across_replicas, name, **kwargs: as `BatchLoss`.
    """

    def __init__(self, normalize_embeddings=True, gather_across_replicas=True, name=None,
                 **kwargs):
        super().__init__(gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        if not isinstance(normalize_embeddings, bool):
            raise ValueError("Expected `normalize_embeddings` to be a bool. Received: "
                             f"normalize_embeddings={normalize_embeddings!r}")
        self.normalize_embeddings = normalize_embeddings

    def prepare(self, embeddings):
        """float32 embeddings, L2-normalised when `normalize_embeddings`."""
        embeddings = ops.cast(embeddings, "float32")
        return l2_normalize(embeddings) if self.normalize_embeddings else embeddings

    def call(self, y_true, y_pred):
        labels, embeddings = self._maybe_gather(y_true, y_pred)  # (B,), (B, d)
        if len(embeddings.shape) != 2:
            raise ValueError(
                f"{type(self).__name__} expects embeddings of shape (B, d). Received: "
                f"y_pred.shape={tuple(embeddings.shape)}. Fix: pass the embedder's output.")
        embeddings = self.prepare(embeddings)
        index = ops.arange(ops.shape(labels)[0], dtype="int32")
        is_self = ops.equal(index[:, None], index[None, :])
        return self.pair_loss(labels, embeddings, labels, embeddings, is_self)

    def pair_loss(self, labels, embeddings, ref_labels, ref_embeddings, excluded):
        """Scalar float32 loss of queries (m,), (m, d) against references (n,), (n, d);
        `excluded` (m, n) marks the pairs that are neither positive nor negative (a
        query's own entry among the references, empty memory rows)."""
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config["normalize_embeddings"] = self.normalize_embeddings
        return config


class TemperaturePairLoss(PairLoss):
    """Base of the pair losses on cosine similarities over a temperature tau (SupCon,
    NT-Xent): `temperature` checked (> 0), kept and serialized; `scaled_cosines` gives
    the logits s / tau.

    Args:
        temperature: tau > 0.
        normalize_embeddings, gather_across_replicas, name, **kwargs: as `PairLoss`.
    """

    def __init__(self, temperature, normalize_embeddings=True, gather_across_replicas=True,
                 name=None, **kwargs):
        super().__init__(normalize_embeddings=normalize_embeddings,
                         gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        self.temperature = as_float(temperature, "temperature", positive=True)

    def scaled_cosines(self, embeddings, ref_embeddings):
        """`(m, d)`, `(n, d)` -> float32 `(m, n)` cosine similarities divided by tau."""
        return distance_matrix(embeddings, ref_embeddings, "cosine") / self.temperature

    def get_config(self):
        config = super().get_config()
        config["temperature"] = self.temperature
        return config


def as_float(value, name, positive=False):
    value = float(value)
    if positive and not value > 0:
        raise ValueError(f"Expected `{name}` > 0. Received: {name}={value}. Fix: pass a "
                         "positive number.")
    return value


