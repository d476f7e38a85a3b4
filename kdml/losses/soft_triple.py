"""SoftTriple loss (Qian et al., ICCV 2019; docs/design.md 3.6.6)."""

import keras
from keras import ops

from kdml.losses._classification import ClassificationLoss, positive_int, positive_number
from kdml.losses._classification import target_mask


@keras.saving.register_keras_serializable(package="kdml")
class SoftTripleLoss(ClassificationLoss):
    """Softmax cross-entropy on a soft maximum over K centres per class, with a margin.

    Qian et al., "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling",
    ICCV 2019 (arXiv:1909.05235): the relaxed similarity S'_{i,c} over a class's centres
    and the SoftTriple loss on it; docs/design.md 3.6.6:

        S_{i,c} = sum_k softmax_k(s(f_i, w_c^k) / gamma) s(f_i, w_c^k)
        L = -1/B sum_i log( e^{lambda (S_{i,y_i} - delta)}
                            / (e^{lambda (S_{i,y_i} - delta)} + sum_{c != y_i} e^{lambda S_{i,c}}) )

    Same defaults as pytorch-metric-learning's `SoftTripleLoss`: K = 10 centres per
    class, lambda (`la`) = 20, gamma = 0.1, delta (`margin`) = 0.01, and its weight
    layout: column c * K + k of y_pred is centre k of class c. As in PML the paper's
    centre regulariser (its tau term, which merges similar centres) is not part of the
    loss. Computed in float32 whatever the dtype of y_pred.

    Args:
        centers_per_class: K (default 10).
        la: Positive scale lambda (default 20).
        gamma: Positive softmax temperature over a class's centres (default 0.1).
        margin: delta (default 0.01).
        gather_across_replicas: Whether every replica computes the loss of the global
            batch. Default True.
        name: Loss name.
        **kwargs: Passed to `keras.losses.Loss`.

    Shapes:
        y_true: int class labels in [0, C), (B,) or (B, 1).
        y_pred: cosine similarities to every centre (B, C * K), e.g. the output of
            `kdml.layers.Proxies(C * K)`.
        Returns: a float32 scalar, the mean over the (global) batch.

    Example (K = 2, equal cosines within each class, so S = (0.5, 0); lambda = 2,
    delta = 0: log(1 + e^{-1})):

    >>> loss = SoftTripleLoss(centers_per_class=2, la=2.0, margin=0.0)
    >>> round(float(loss([0], keras.ops.convert_to_tensor([[0.5, 0.5, 0.0, 0.0]]))), 6)
    0.313262
    """

    def __init__(self, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01,
                 gather_across_replicas=True, name="soft_triple_loss", **kwargs):
        super().__init__(gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        self.centers_per_class = positive_int("centers_per_class", centers_per_class)
        self.la = positive_number("la", la)
        self.gamma = positive_number("gamma", gamma)
        self.margin = float(margin)

    @property
    def centers(self):
        return self.centers_per_class

    def logits(self, labels, cosines):
        grouped = self.grouped(cosines)  # (B, C, K)
        weights = ops.softmax(grouped / self.gamma, axis=2)
        relaxed = ops.sum(weights * grouped, axis=2)  # (B, C)
        mask = ops.cast(target_mask(labels, ops.shape(relaxed)[-1]), "float32")
        return self.la * (relaxed - self.margin * mask)

    def get_config(self):
        return {**super().get_config(), "centers_per_class": self.centers_per_class,
                "la": self.la, "gamma": self.gamma, "margin": self.margin}
