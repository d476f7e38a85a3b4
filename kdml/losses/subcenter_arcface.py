"""Sub-center ArcFace and its dominant-centre clean-up (Deng et al., ECCV 2020;
docs/design.md 3.6.4)."""

import math
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from kdml.losses._classification import ClassificationLoss, additive_angular_margin
from kdml.losses._classification import positive_int, positive_number
from kdml.losses.arcface import angular_margin_degrees


@keras.saving.register_keras_serializable(package="kdml")
class SubCenterArcFaceLoss(ClassificationLoss):
    """ArcFace on the closest of k sub-centres per class.

    Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-Scale Noisy Web
    Faces", ECCV 2020, the sub-center ArcFace loss; docs/design.md 3.6.4. Each class c has k
    weight vectors w_c1..w_ck; its cosine is the largest, cos theta_c = max_j s(f_i, w_cj),
    and the loss is `ArcFaceLoss` on these C cosines. Noisy images then gather at
    non-dominant sub-centres; `dominant_center_cleanup` drops them afterwards.

    Same defaults as pytorch-metric-learning's `SubCenterArcFaceLoss`: margin 28.6
    DEGREES, scale 64, k = 3 sub-centres, and its weight layout: column c * k + j of
    y_pred is sub-centre j of class c (give `kdml.layers.Proxies` C * k weights).
    Computed in float32 whatever the dtype of y_pred; the target cosine is clipped
    before arccos as in `ArcFaceLoss`.

    Args:
        margin: Angular margin m in degrees, in [0, 180) (default 28.6).
        scale: Positive s (default 64).
        sub_centers: k, sub-centres per class (default 3).
        gather_across_replicas: Whether every replica computes the loss of the global
            batch. Default True.
        name: Loss name.
        **kwargs: Passed to `keras.losses.Loss`.

    Shapes:
        y_true: int class labels in [0, C), (B,) or (B, 1).
        y_pred: cosine similarities to every sub-centre (B, C * k), e.g. the output of
            `kdml.layers.Proxies(C * k)`.
        Returns: a float32 scalar, the mean over the (global) batch.

    Example (k = 2: class 0's best sub-centre is at 60 deg, class 1's at 90 deg; with
    m = 30 deg, s = 1 the loss is log 2, as `ArcFaceLoss` on [[0.5, 0.0]]):

    >>> loss = SubCenterArcFaceLoss(margin=30.0, scale=1.0, sub_centers=2)
    >>> round(float(loss([0], keras.ops.convert_to_tensor([[-0.3, 0.5, 0.0, -1.0]]))), 6)
    0.693147
    """

    def __init__(self, margin=28.6, scale=64.0, sub_centers=3, gather_across_replicas=True,
                 name="subcenter_arcface_loss", **kwargs):
        super().__init__(gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        self.margin = angular_margin_degrees(margin)
        self.scale = positive_number("scale", scale)
        self.sub_centers = positive_int("sub_centers", sub_centers)

    @property
    def centers(self):
        return self.sub_centers

    def logits(self, labels, cosines):
        closest = ops.max(self.grouped(cosines), axis=2)  # (B, C)
        return additive_angular_margin(labels, closest, self.margin, self.scale)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "scale": self.scale,
                "sub_centers": self.sub_centers}


class Cleanup(NamedTuple):
    """What `dominant_center_cleanup` returns.

    kept: int64 (N_kept,), indices of the samples to keep, ascending.
    outliers: int64 (N_out,), indices of the dropped samples, ascending.
    dominant_centers: (C, d), each class's dominant sub-centre (the rows of the weight
        matrix as given, not normalised): the class weights to go on training with.
    """

    kept: np.ndarray
    outliers: np.ndarray
    dominant_centers: np.ndarray


def dominant_center_cleanup(embeddings, labels, centers, sub_centers, threshold=75.0):
    """Sub-center ArcFace's clean-up: keep each class's dominant sub-centre, drop outliers.

    Deng et al., ECCV 2020, its noisy-sample clean-up (docs/design.md 3.6.4). For class
    c, each of its samples votes for its closest sub-centre; the sub-centre with most votes (the lowest
    index on a tie) is the dominant one, and a sample of class c whose angle to it
    exceeds `threshold` degrees is an outlier. Train on `kept` afterwards with one
    weight per class initialised from `dominant_centers` (e.g. `kdml.layers.Proxies(C,
    initializer=keras.initializers.Constant(...))` and `ArcFaceLoss`).

    Same rule and default threshold (75 deg) as pytorch-metric-learning's
    `SubCenterArcFaceLoss.get_outliers`, in NumPy, on the kdml weight layout. A class
    with no sample keeps its sub-centre 0 (PML leaves that column uninitialised).

    Args:
        embeddings: (N, d) float embeddings of the training set (normalised inside).
        labels: (N,) int class labels in [0, C).
        centers: (C * k, d) sub-centre weights, e.g. `Proxies(C * k).proxies`; row
            c * k + j is sub-centre j of class c.
        sub_centers: k.
        threshold: Angle in degrees, in (0, 180]; default 75.

    Returns:
        `Cleanup(kept, outliers, dominant_centers)`.

    Example (two of class 0's three samples vote for its sub-centre 1, the x axis; the
    third, at 85 deg from it, is an outlier; class 1's sample picks its sub-centre 0):

    >>> centers = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
    >>> deg = np.radians([10.0, 30.0, 85.0, 280.0])
    >>> embeddings = np.stack([np.cos(deg), np.sin(deg)], axis=1)
    >>> result = dominant_center_cleanup(embeddings, [0, 0, 0, 1], centers, sub_centers=2)
    >>> result.kept.tolist(), result.outliers.tolist(), result.dominant_centers.tolist()
    ([0, 1, 3], [2], [[1.0, 0.0], [0.0, -1.0]])
    """
    embeddings = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels).reshape(-1)
    centers = np.asarray(centers)
    sub_centers = positive_int("sub_centers", sub_centers)
    if not 0 < threshold <= 180:
        raise ValueError(f"Expected `threshold` in degrees, in (0, 180]. Received: threshold={threshold}")
    if embeddings.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(f"Expected embeddings (N, d) and labels (N,). Received shapes "
                         f"{embeddings.shape} and {labels.shape}.")
    if centers.ndim != 2 or centers.shape[0] % sub_centers or centers.shape[1] != embeddings.shape[1]:
        raise ValueError(f"Expected centers (C * {sub_centers}, {embeddings.shape[1]}) (the "
                         f"Proxies weight). Received shape {centers.shape}.")
    num_classes = centers.shape[0] // sub_centers
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) (C = centers rows / "
                         f"sub_centers); received {labels.min()}..{labels.max()}.")

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    grouped = centers.reshape(num_classes, sub_centers, -1)
    cosines = np.einsum("nd,ckd->nck", unit(embeddings), unit(grouped.astype(np.float64)))
    dominant = np.zeros(num_classes, np.int64)
    outlier = np.zeros(len(labels), bool)
    cos_threshold = math.cos(math.radians(threshold))
    for label in np.unique(labels):
        members = labels == label
        own = cosines[members, label]  # (n_c, k)
        votes = np.bincount(np.argmax(own, axis=1), minlength=sub_centers)
        dominant[label] = int(np.argmax(votes))
        outlier[members] = own[:, dominant[label]] < cos_threshold
    return Cleanup(kept=np.flatnonzero(~outlier), outliers=np.flatnonzero(outlier),
                   dominant_centers=grouped[np.arange(num_classes), dominant])
