"""Multi-Similarity loss with its pair mining (Wang et al., CVPR 2019; docs/design.md 3.3)."""

import keras
from keras import ops

from kdml.losses._cross_replica import MASKED_LOGIT
from kdml.losses._cross_replica import BatchLoss
from kdml.losses._cross_replica import masked_log1p_sum_exp


@keras.saving.register_keras_serializable(package="kdml")
class MultiSimilarityLoss(BatchLoss):
    """Multi-Similarity loss with the paper's hard-pair mining, on a (B, B) matrix.

    Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning", CVPR 2019: pair mining by relative similarity (Sec. 4, its mining
    conditions with margin epsilon) then pair weighting (the MS loss equation);
    docs/design.md 3.3. With S = E E^T, for anchor i:

        keep positive j (y_j = y_i, j != i)  if  S_ij - epsilon < max_{k: y_k != y_i} S_ik
        keep negative k (y_k != y_i)         if  S_ik + epsilon > min_{j positive}  S_ij

        L_i = 1/alpha log(1 + sum_{kept j} exp(-alpha (S_ij - base)))
            + 1/beta  log(1 + sum_{kept k} exp( beta  (S_ik - base)))

        L = 1/B sum_{i valid} L_i

    where an anchor is valid when it keeps at least one positive and one negative
    (as in the authors' code; other anchors contribute 0 but still count in B). The
    mining masks carry no gradient. Computed in float32, each log(1 + sum exp) as
    softplus(logsumexp(.)) over masked logits with a large finite negative value, so
    a batch with no valid anchor gives 0 with a zero, finite gradient.

    Distribution: with `gather_across_replicas=True` each replica all-gathers labels and
    embeddings and computes the loss of the GLOBAL batch (pairs across replicas are
    mined too; B is the global batch size). The scalar is divided by the number of
    replicas (Keras' per-replica convention, which Keras itself skips for scalar
    losses) and gradients are summed over replicas, so one distributed step equals the
    single-device step on the concatenated batch. With `False` each replica mines only
    its own slice and the update is the mean over replicas.

    Args:
        alpha: Positive-pair scale (paper alpha, default 2).
        beta: Negative-pair scale (paper beta, default 50).
        base: Similarity threshold (paper lambda, default 0.5).
        epsilon: Mining margin (paper epsilon, default 0.1).
        gather_across_replicas: See "Distribution" above. Default True.
        name: Loss name.
        **kwargs: Passed to `keras.losses.Loss` (`reduction` has no effect on the
            scalar; `dtype` is the dtype inputs are first converted to, keep float32).

    Shapes:
        y_true: int labels, (B,) or (B, 1) (float labels are converted to int32).
        y_pred: L2-normalised embeddings (B, d); they are not re-normalised here.
        Returns: a float32 scalar. `sample_weight` is not supported.

    Example:

    >>> loss = MultiSimilarityLoss()
    >>> emb = keras.ops.convert_to_tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    >>> float(loss([0, 0, 1], emb)) > 0.0
    True
    """

    def __init__(
        self,
        alpha=2.0,
        beta=50.0,
        base=0.5,
        epsilon=0.1,
        gather_across_replicas=True,
        name="multi_similarity_loss",
        **kwargs,
    ):
        super().__init__(
            gather_across_replicas=gather_across_replicas, name=name, **kwargs
        )
        for arg, value in (("alpha", alpha), ("beta", beta)):
            if not value > 0:
                raise ValueError(
                    f"Expected `{arg}` > 0 (a similarity scale). Received: {arg}={value}"
                )
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.epsilon = float(epsilon)

    def prepare(self, embeddings):
        """float32 embeddings (used as given: they are not re-normalised)."""
        return ops.cast(embeddings, "float32")

    def call(self, y_true, y_pred):
        labels, embeddings = self._maybe_gather(y_true, y_pred)  # (B,), (B, d)
        index = ops.arange(ops.shape(labels)[0], dtype="int32")
        is_self = ops.equal(index[:, None], index[None, :])
        return self.pair_loss(labels, embeddings, labels, embeddings, is_self)

    def pair_loss(self, labels, embeddings, ref_labels, ref_embeddings, excluded):
        """The loss of queries (m,), (m, d) against references (n,), (n, d) (the batch
        itself, or a `CrossBatchMemory`); `excluded` (m, n) marks the pairs that are
        neither positive nor negative (a query's own entry, empty memory rows).
        Anchors are the m queries: L = 1/m sum_i L_i."""
        sims = ops.matmul(embeddings, ops.transpose(ref_embeddings))  # (m, n)
        batch_size = ops.shape(sims)[0]
        same_class = ops.equal(labels[:, None], ref_labels[None, :])
        kept = ops.logical_not(excluded)
        positive = ops.logical_and(same_class, kept)
        negative = ops.logical_and(ops.logical_not(same_class), kept)

        # Mining (no gradient: the thresholds only enter comparisons).
        mining_sims = ops.stop_gradient(sims)
        hardest_neg = ops.max(
            ops.where(negative, mining_sims, MASKED_LOGIT), axis=1, keepdims=True
        )
        hardest_pos = ops.min(
            ops.where(positive, mining_sims, -MASKED_LOGIT), axis=1, keepdims=True
        )
        kept_pos = ops.logical_and(
            positive, ops.less(mining_sims - self.epsilon, hardest_neg)
        )
        kept_neg = ops.logical_and(
            negative, ops.greater(mining_sims + self.epsilon, hardest_pos)
        )

        pos_terms = masked_log1p_sum_exp(
            -self.alpha * (sims - self.base), kept_pos, axis=1
        ) / self.alpha  # (m,)
        neg_terms = masked_log1p_sum_exp(
            self.beta * (sims - self.base), kept_neg, axis=1
        ) / self.beta  # (m,)
        valid = ops.logical_and(ops.any(kept_pos, axis=1), ops.any(kept_neg, axis=1))
        per_anchor = ops.where(valid, pos_terms + neg_terms, 0.0)
        return ops.divide_no_nan(ops.sum(per_anchor), ops.cast(batch_size, "float32"))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "alpha": self.alpha,
                "beta": self.beta,
                "base": self.base,
                "epsilon": self.epsilon,
            }
        )
        return config
