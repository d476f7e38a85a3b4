"""Supervised contrastive loss (docs/design.md 3.5.4)."""

import keras
from keras import ops

from kdml.losses._pairs import TemperaturePairLoss
from kdml.losses._pairs import masked_logsumexp
from kdml.losses._pairs import mean_of_positive
from kdml.losses._pairs import pair_masks


@keras.saving.register_keras_serializable(package="kdml")
class SupConLoss(TemperaturePairLoss):
    """Supervised contrastive loss (SupCon, "L_out"), per anchor of the batch.

    Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (Eq. 2, L^sup_out);
    docs/design.md 3.5.4. With cosine similarities s and temperature tau, for anchor i
    with positives P(i) (same label, not i) and A(i) = all j != i:

        L_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / tau) / sum_{a in A(i)} exp(s_ia / tau) )

    L is the mean of the L_i > 0 (PML's AvgNonZeroReducer; anchors without a positive
    give 0 and do not count), and 0 for a batch without any positive or any negative
    pair (as PML). Feed the views of each image as separate rows with the image's class
    label (`--views=2` in kdml.train). Defaults are PML's `SupConLoss` (tau 0.1, cosine).
    Float32, log-softmax via a masked logsumexp.

    Distribution: the global batch across replicas, as `MultiSimilarityLoss`.

    Args:
        temperature: tau (default 0.1).
        normalize_embeddings: L2-normalise `y_pred` first (default True, as PML).
        gather_across_replicas: All-gather the batch across replicas (default True).
        name, **kwargs: As `keras.losses.Loss`.

    Shapes:
        y_true: int labels (B,) or (B, 1).
        y_pred: embeddings (B, d).
        Returns: a float32 scalar. `sample_weight` is not supported.

    Example: orthogonal unit vectors, labels [0, 0, 1], tau = 1: anchors 0 and 1 each
    have one positive and one negative at s = 0, so L_i = log 2:

    >>> loss = SupConLoss(temperature=1.0)
    >>> round(float(loss(np.array([0, 0, 1]), np.eye(3, dtype="float32"))), 6)
    0.693147
    """

    def __init__(self, temperature=0.1, normalize_embeddings=True,
                 gather_across_replicas=True, name="supcon_loss", **kwargs):
        super().__init__(temperature, normalize_embeddings, gather_across_replicas, name,
                         **kwargs)

    def pair_loss(self, labels, embeddings, ref_labels, ref_embeddings, excluded):
        logits = self.scaled_cosines(embeddings, ref_embeddings)
        positive, negative = pair_masks(labels, ref_labels, excluded)
        others = ops.logical_or(positive, negative)
        log_denominator = masked_logsumexp(logits, others, axis=1)[:, None]  # (m, 1)
        log_prob = ops.where(positive, logits - log_denominator, 0.0)
        count = ops.sum(ops.cast(positive, "float32"), axis=1)
        per_anchor = -ops.divide_no_nan(ops.sum(log_prob, axis=1), count)
        has_pairs = ops.logical_and(ops.any(positive), ops.any(negative))
        return ops.where(has_pairs, mean_of_positive(per_anchor, ops.greater(count, 0.0)), 0.0)
