"""Circle loss on pairwise labels (docs/design.md 3.5.3)."""

import keras
from keras import ops

from kdml.losses._pairs import PairLoss
from kdml.losses._pairs import as_float
from kdml.losses._pairs import distance_matrix
from kdml.losses._pairs import masked_logsumexp
from kdml.losses._pairs import mean_of_positive
from kdml.losses._pairs import pair_masks


@keras.saving.register_keras_serializable(package="kdml")
class CircleLoss(PairLoss):
    """Circle loss with self-paced pair weights, per anchor of the batch.

    Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
    CVPR 2020 (Eq. 6 with the weights of Eq. 5 and the margins of Eq. 8);
    docs/design.md 3.5.3. With cosine similarities s, for anchor i, its positives p and
    negatives n:

        a_p = [1 + m - s_p]_+ ,  a_n = [s_n + m]_+      (weights, no gradient)
        L_i = softplus( logsumexp_n(gamma a_n (s_n - m))
                        + logsumexp_p(-gamma a_p (s_p - (1 - m))) )

    and L is the mean of the L_i > 0 over anchors with a positive and a negative (PML's
    AvgNonZeroReducer; 0 when there is none). Defaults are PML's `CircleLoss` (m 0.4,
    gamma 80, the paper's fine-grained retrieval setting); cosine similarity only, as
    in PML. Computed in float32 with stable masked logsumexp.

    Distribution: the global batch across replicas, as `MultiSimilarityLoss`.

    Args:
        m: The relaxation margin (default 0.4).
        gamma: The scale (default 80).
        normalize_embeddings: L2-normalise `y_pred` first (default True, as PML).
        gather_across_replicas: All-gather the batch across replicas (default True).
        name, **kwargs: As `keras.losses.Loss`.

    Shapes:
        y_true: int labels (B,) or (B, 1).
        y_pred: embeddings (B, d).
        Returns: a float32 scalar. `sample_weight` is not supported.

    Example: three orthogonal unit vectors, labels [0, 0, 1]; anchors 0 and 1 each have
    s_p = s_n = 0, so with m = 0.25, gamma = 1: L_i = softplus(0.25 * -0.25 - 1.25 * -0.75)
    = softplus(0.875) = log(1 + e^0.875):

    >>> emb = np.eye(3, dtype="float32")
    >>> loss = CircleLoss(m=0.25, gamma=1.0)
    >>> round(float(loss(np.array([0, 0, 1]), emb)), 5)
    1.22344
    """

    def __init__(self, m=0.4, gamma=80.0, normalize_embeddings=True,
                 gather_across_replicas=True, name="circle_loss", **kwargs):
        super().__init__(normalize_embeddings=normalize_embeddings,
                         gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        self.m = as_float(m, "m")
        self.gamma = as_float(gamma, "gamma", positive=True)

    def pair_loss(self, labels, embeddings, ref_labels, ref_embeddings, excluded):
        sims = distance_matrix(embeddings, ref_embeddings, "cosine")  # (m, n)
        positive, negative = pair_masks(labels, ref_labels, excluded)
        fixed = ops.stop_gradient(sims)
        logit_p = -self.gamma * ops.relu(1.0 + self.m - fixed) * (sims - (1.0 - self.m))
        logit_n = self.gamma * ops.relu(fixed + self.m) * (sims - self.m)
        valid = ops.logical_and(ops.any(positive, axis=1), ops.any(negative, axis=1))
        inner = ops.where(valid, masked_logsumexp(logit_p, positive, axis=1)
                          + masked_logsumexp(logit_n, negative, axis=1), 0.0)
        return mean_of_positive(ops.softplus(inner), valid)

    def get_config(self):
        config = super().get_config()
        config.update({"m": self.m, "gamma": self.gamma})
        return config
