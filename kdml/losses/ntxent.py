"""NT-Xent, the normalised temperature-scaled cross entropy of SimCLR (docs/design.md 3.5.5)."""

import keras
from keras import ops

from kdml.losses._pairs import TemperaturePairLoss
from kdml.losses._pairs import masked_logsumexp
from kdml.losses._pairs import masked_mean
from kdml.losses._pairs import pair_masks


@keras.saving.register_keras_serializable(package="kdml")
class NTXentLoss(TemperaturePairLoss):
    """NT-Xent (InfoNCE) over every positive pair of the batch, against the anchor's negatives.

    Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations" (SimCLR), ICML 2020 (Eq. 1); docs/design.md 3.5.5. With cosine
    similarities s and temperature tau, for each ordered positive pair (i, p)
    (y_i = y_p, i != p) and the negatives N(i) of i (y_n != y_i):

        l(i, p) = -log( exp(s_ip / tau) / (exp(s_ip / tau) + sum_{n in N(i)} exp(s_in / tau)) )

    L is the mean over all positive pairs (PML's MeanReducer, zeros included), and 0 for
    a batch without any positive or any negative pair. For SimCLR give the two views of
    each image one label of their own (the image's index), so the only positive of a
    view is the other view; with class labels it is the supervised form of PML. Other
    positives of i are not in the denominator (PML's choice; SimCLR has one positive).
    Defaults are PML's `NTXentLoss` (tau 0.07, cosine). Float32.

    Distribution: the global batch across replicas, as `MultiSimilarityLoss`.

    Args:
        temperature: tau (default 0.07).
        normalize_embeddings: L2-normalise `y_pred` first (default True, as PML).
        gather_across_replicas: All-gather the batch across replicas (default True).
        name, **kwargs: As `keras.losses.Loss`.

    Shapes:
        y_true: int labels (B,) or (B, 1), e.g. [0..n-1, 0..n-1] for two views of n images.
        y_pred: embeddings (B, d).
        Returns: a float32 scalar. `sample_weight` is not supported.

    Example: orthogonal unit vectors, labels [0, 0, 1], tau = 1: the pairs (0, 1) and
    (1, 0) each have one negative at s = 0, so l = log 2:

    >>> loss = NTXentLoss(temperature=1.0)
    >>> round(float(loss(np.array([0, 0, 1]), np.eye(3, dtype="float32"))), 6)
    0.693147
    """

    def __init__(self, temperature=0.07, normalize_embeddings=True,
                 gather_across_replicas=True, name="ntxent_loss", **kwargs):
        super().__init__(temperature, normalize_embeddings, gather_across_replicas, name,
                         **kwargs)

    def pair_loss(self, labels, embeddings, ref_labels, ref_embeddings, excluded):
        logits = self.scaled_cosines(embeddings, ref_embeddings)
        positive, negative = pair_masks(labels, ref_labels, excluded)
        negatives = masked_logsumexp(logits, negative, axis=1)[:, None]  # (m, 1)
        # -log(e^x / (e^x + e^N)) = log(e^x + e^N) - x, N = log sum_n e^{s_in / tau}
        per_pair = ops.logaddexp(logits, negatives) - logits  # (m, n)
        has_pairs = ops.logical_and(ops.any(positive), ops.any(negative))
        return ops.where(has_pairs, masked_mean(per_pair, positive), 0.0)
