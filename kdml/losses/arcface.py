"""ArcFace, the additive angular margin loss (Deng et al., CVPR 2019; docs/design.md 3.6.3)."""

import keras

from kdml.losses._classification import ClassificationLoss, additive_angular_margin
from kdml.losses._classification import positive_number


def angular_margin_degrees(margin):
    """`margin` (degrees) as a float in [0, 180), or a ValueError naming the fix."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 180:
        raise ValueError(
            "Expected `margin` in degrees, in [0, 180) (pytorch-metric-learning's unit; "
            f"0.5 rad = 28.6 deg). Received: margin={margin!r}")
    return float(margin)


@keras.saving.register_keras_serializable(package="kdml")
class ArcFaceLoss(ClassificationLoss):
    """Softmax cross-entropy with an additive angular margin on the target class.

    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
    CVPR 2019 (arXiv:1801.07698), Eq. 3; docs/design.md 3.6.3. With theta_c the angle
    between f_i and the class weight w_c:

        L = -1/B sum_i log( e^{s cos(theta_{y_i} + m)}
                            / (e^{s cos(theta_{y_i} + m)} + sum_{c != y_i} e^{s cos theta_c}) )

    Past theta_{y_i} = 180 deg - m the target logit is s (cos theta - m sin m), which
    keeps it decreasing in theta (insightface's and pytorch-metric-learning's rule).

    Same defaults and unit as pytorch-metric-learning's `ArcFaceLoss`: the margin m is
    in DEGREES, default 28.6 (= 0.5 rad, the paper's), scale s = 64. One difference:
    the target cosine is clipped to [-1 + 2^-23, 1 - 2^-23] before arccos, so a sample
    exactly on its class weight has a finite gradient (PML's is NaN there). Computed in
    float32 whatever the dtype of y_pred.

    Args:
        margin: Angular margin m in degrees, in [0, 180) (default 28.6).
        scale: Positive s (default 64).
        gather_across_replicas: Whether every replica computes the loss of the global
            batch. Default True.
        name: Loss name.
        **kwargs: Passed to `keras.losses.Loss`.

    Shapes:
        y_true: int class labels in [0, C), (B,) or (B, 1).
        y_pred: cosine similarities (B, C), e.g. the output of `kdml.layers.Proxies`.
        Returns: a float32 scalar, the mean over the (global) batch.

    Example (target at 60 deg, the other class at 90 deg, m = 30 deg, s = 1: the target
    logit is cos 90 deg = 0, so the loss is log 2):

    >>> loss = ArcFaceLoss(margin=30.0, scale=1.0)
    >>> round(float(loss([0], keras.ops.convert_to_tensor([[0.5, 0.0]]))), 6)
    0.693147
    """

    def __init__(self, margin=28.6, scale=64.0, gather_across_replicas=True,
                 name="arcface_loss", **kwargs):
        super().__init__(gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        self.margin = angular_margin_degrees(margin)
        self.scale = positive_number("scale", scale)

    def logits(self, labels, cosines):
        return additive_angular_margin(labels, cosines, self.margin, self.scale)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "scale": self.scale}
