"""Triplet margin loss with batch mining (docs/design.md 3.5.1)."""

import keras
from keras import ops

from kdml.losses._cross_replica import MASKED_LOGIT
from kdml.losses._pairs import PairLoss
from kdml.losses._pairs import as_float
from kdml.losses._pairs import check_distance
from kdml.losses._pairs import distance_matrix
from kdml.losses._pairs import mean_of_positive
from kdml.losses._pairs import pair_masks

MINING = ("all", "hard", "semihard", "easy_positive")


@keras.saving.register_keras_serializable(package="kdml")
class TripletMarginLoss(PairLoss):
    """Triplet margin loss over the triplets of the (global) batch, with batch mining.

    Weinberger & Saul, JMLR 2009 / Schroff et al., "FaceNet", CVPR 2015 (Eq. 1);
    docs/design.md 3.5.1. For a triplet (a, p, n), y_p = y_a != y_n, p != a:

        l(a, p, n) = max(0, D(a, p) - D(a, n) + margin)

    with D the Euclidean distance (default), the squared Euclidean distance, or for
    `distance="cosine"` D = -cos (so l = max(0, cos(a, n) - cos(a, p) + margin)).
    `mining` picks the triplets:

    - `all`: every triplet of the batch (pytorch-metric-learning's default).
    - `hard`: one per anchor, its farthest positive and nearest negative ("batch hard",
      Hermans et al. 2017; PML's `BatchHardMiner`).
    - `semihard`: FaceNet's rule, every triplet with D(a, p) < D(a, n) (<= D(a, p) +
      margin, beyond which l = 0); PML's `TripletMarginMiner(margin, "semihard")`.
      Not tfa's `TripletSemiHardLoss`, which keeps one negative per (a, p).
    - `easy_positive`: one per anchor, its nearest positive and nearest negative (Xuan
      et al., WACV 2020; PML's `BatchEasyHardMiner("easy", "hard")`).

    The loss is the mean over the picked triplets with l > 0 (PML's AvgNonZeroReducer),
    0 when there is none (a batch with no valid triplet gives 0 and a zero gradient).
    Defaults are PML's `TripletMarginLoss` (margin 0.05, L2-normalised embeddings,
    Euclidean distance); its `swap`, `smooth_loss` and sampled `triplets_per_anchor`
    options are not offered. With `hard` / `easy_positive` and tied distances the
    gradient is shared by the tied entries (TensorFlow's max/min), where PML's argmax
    sends it to the first; values are equal. Computed
    in float32. `all` and `semihard` build an (m, n, n) tensor (m queries, n references).

    Distribution: the global batch across replicas, as `MultiSimilarityLoss`.

    Args:
        margin: The margin (PML default 0.05).
        mining: all | hard | semihard | easy_positive (default all).
        distance: euclidean | squared_euclidean | cosine (default euclidean).
        normalize_embeddings: L2-normalise `y_pred` first (default True, as PML).
        gather_across_replicas: All-gather the batch across replicas (default True).
        name, **kwargs: As `keras.losses.Loss`.

    Shapes:
        y_true: int labels (B,) or (B, 1).
        y_pred: embeddings (B, d).
        Returns: a float32 scalar. `sample_weight` is not supported.

    Example: two classes on a line (no normalisation), anchor-positive distance 0.5,
    anchor-negative distances 1.5 to 2.5. With margin 0.5 no triplet violates it; with
    margin 2 the six violating triplets give 0.5, 1, 0.5, 0.5, 1, 0.5, mean 2/3:

    >>> emb = np.array([[1.0, 0.0], [1.0, 0.5], [1.0, 2.0], [1.0, 2.5]], "float32")
    >>> labels = np.array([0, 0, 1, 1])
    >>> float(TripletMarginLoss(margin=0.5, normalize_embeddings=False)(labels, emb))
    0.0
    >>> round(float(TripletMarginLoss(margin=2.0, normalize_embeddings=False)(labels, emb)), 4)
    0.6667
    """

    def __init__(self, margin=0.05, mining="all", distance="euclidean",
                 normalize_embeddings=True, gather_across_replicas=True,
                 name="triplet_margin_loss", **kwargs):
        super().__init__(normalize_embeddings=normalize_embeddings,
                         gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        if mining not in MINING:
            raise ValueError(f"Expected `mining` in {', '.join(MINING)}. Received: "
                             f"mining={mining!r}. Fix: pass one of these names.")
        self.margin = as_float(margin, "margin")
        self.mining = mining
        self.distance = check_distance(distance)

    def pair_loss(self, labels, embeddings, ref_labels, ref_embeddings, excluded):
        dist = distance_matrix(embeddings, ref_embeddings, self.distance)  # (m, n)
        if self.distance == "cosine":
            dist = -dist  # larger is farther
        positive, negative = pair_masks(labels, ref_labels, excluded)
        if self.mining in ("all", "semihard"):
            d_ap, d_an = dist[:, :, None], dist[:, None, :]
            valid = ops.logical_and(positive[:, :, None], negative[:, None, :])  # (m, n, n)
            if self.mining == "semihard":
                valid = ops.logical_and(valid, ops.greater(ops.stop_gradient(d_an),
                                                           ops.stop_gradient(d_ap)))
            return mean_of_positive(ops.relu(d_ap - d_an + self.margin), valid)
        if self.mining == "hard":
            d_ap = ops.max(ops.where(positive, dist, MASKED_LOGIT), axis=1)
        else:  # easy_positive
            d_ap = ops.min(ops.where(positive, dist, -MASKED_LOGIT), axis=1)
        d_an = ops.min(ops.where(negative, dist, -MASKED_LOGIT), axis=1)
        valid = ops.logical_and(ops.any(positive, axis=1), ops.any(negative, axis=1))
        violation = ops.where(valid, d_ap - d_an + self.margin, 0.0)
        return mean_of_positive(ops.relu(violation), valid)

    def get_config(self):
        config = super().get_config()
        config.update({"margin": self.margin, "mining": self.mining, "distance": self.distance})
        return config
