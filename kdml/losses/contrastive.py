"""Contrastive (pair margin) loss (docs/design.md 3.5.2)."""

import keras
from keras import ops

from kdml.losses._pairs import PairLoss
from kdml.losses._pairs import as_float
from kdml.losses._pairs import check_distance
from kdml.losses._pairs import distance_matrix
from kdml.losses._pairs import mean_of_positive
from kdml.losses._pairs import pair_masks


@keras.saving.register_keras_serializable(package="kdml")
class ContrastiveLoss(PairLoss):
    """Contrastive loss with a positive and a negative margin over all pairs of the batch.

    Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an Invariant
    Mapping", CVPR 2006 (Eq. 4), with a positive margin as in pytorch-metric-learning;
    docs/design.md 3.5.2. Over the ordered pairs (i, j), i != j, of the batch:

        L = mean_{>0}{ max(0, D_ij - m_pos) : y_i = y_j }
          + mean_{>0}{ max(0, m_neg - D_ij) : y_i != y_j }

    each mean over its terms > 0 (PML's AvgNonZeroReducer on each sub-loss, 0 when
    there is none). D is the Euclidean distance (default) or its square; with
    `distance="cosine"` D is the cosine similarity s and the hinges are reversed,
    max(0, m_pos - s) and max(0, s - m_neg), as PML does for a similarity (then pass
    e.g. pos_margin=1, neg_margin=0). Defaults are PML's `ContrastiveLoss` (pos_margin
    0, neg_margin 1, L2-normalised embeddings, Euclidean distance). Float32.

    Distribution: the global batch across replicas, as `MultiSimilarityLoss`.

    Args:
        pos_margin: Positive pairs closer than this cost nothing (default 0).
        neg_margin: Negative pairs farther than this cost nothing (default 1).
        distance: euclidean | squared_euclidean | cosine (default euclidean).
        normalize_embeddings: L2-normalise `y_pred` first (default True, as PML).
        gather_across_replicas: All-gather the batch across replicas (default True).
        name, **kwargs: As `keras.losses.Loss`.

    Shapes:
        y_true: int labels (B,) or (B, 1).
        y_pred: embeddings (B, d).
        Returns: a float32 scalar. `sample_weight` is not supported.

    Example: positives at distance 0.6 (term 0.6), negatives at 0.8 (term 1 - 0.8):

    >>> emb = np.array([[0.0, 0.0], [0.0, 0.6], [0.8, 0.0], [0.8, 0.6]], "float32")
    >>> loss = ContrastiveLoss(normalize_embeddings=False)
    >>> round(float(loss(np.array([0, 0, 1, 1]), emb)), 4)
    0.8
    """

    def __init__(self, pos_margin=0.0, neg_margin=1.0, distance="euclidean",
                 normalize_embeddings=True, gather_across_replicas=True,
                 name="contrastive_loss", **kwargs):
        super().__init__(normalize_embeddings=normalize_embeddings,
                         gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        self.pos_margin = as_float(pos_margin, "pos_margin")
        self.neg_margin = as_float(neg_margin, "neg_margin")
        self.distance = check_distance(distance)

    def pair_loss(self, labels, embeddings, ref_labels, ref_embeddings, excluded):
        dist = distance_matrix(embeddings, ref_embeddings, self.distance)  # (m, n)
        positive, negative = pair_masks(labels, ref_labels, excluded)
        if self.distance == "cosine":
            pos_terms, neg_terms = self.pos_margin - dist, dist - self.neg_margin
        else:
            pos_terms, neg_terms = dist - self.pos_margin, self.neg_margin - dist
        return (mean_of_positive(ops.relu(pos_terms), positive)
                + mean_of_positive(ops.relu(neg_terms), negative))

    def get_config(self):
        config = super().get_config()
        config.update({"pos_margin": self.pos_margin, "neg_margin": self.neg_margin,
                       "distance": self.distance})
        return config
