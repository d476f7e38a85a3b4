"""CosFace, the large-margin cosine loss (Wang et al., CVPR 2018; docs/design.md 3.6.2)."""

import keras
from keras import ops

from kdml.losses._classification import ClassificationLoss, positive_number, target_mask


@keras.saving.register_keras_serializable(package="kdml")
class CosFaceLoss(ClassificationLoss):
    """Softmax cross-entropy with an additive cosine margin on the target class.

    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018
    (arXiv:1801.09414), the LMCL equation (Eq. 4); docs/design.md 3.6.2:

        L = -1/B sum_i log( e^{s (cos theta_{y_i} - m)}
                            / (e^{s (cos theta_{y_i} - m)} + sum_{c != y_i} e^{s cos theta_c}) )

    Same defaults as pytorch-metric-learning's `CosFaceLoss` (margin m = 0.35, scale
    s = 64). Computed in float32 whatever the dtype of y_pred.

    Args:
        margin: The cosine margin m (default 0.35; 0 gives a scaled normalised softmax).
        scale: Positive s (default 64).
        gather_across_replicas: Whether every replica computes the loss of the global
            batch. Default True.
        name: Loss name.
        **kwargs: Passed to `keras.losses.Loss`.

    Shapes:
        y_true: int class labels in [0, C), (B,) or (B, 1).
        y_pred: cosine similarities (B, C), e.g. the output of `kdml.layers.Proxies`.
        Returns: a float32 scalar, the mean over the (global) batch.

    Example (cosines 0.5 and 0.5, s = 2, m = 0.5: log(1 + e^{2 * 0.5}) = 1.313262):

    >>> loss = CosFaceLoss(margin=0.5, scale=2.0)
    >>> round(float(loss([1], keras.ops.convert_to_tensor([[0.5, 0.5]]))), 6)
    1.313262
    """

    def __init__(self, margin=0.35, scale=64.0, gather_across_replicas=True,
                 name="cosface_loss", **kwargs):
        super().__init__(gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        if not margin >= 0:
            raise ValueError(f"Expected `margin` >= 0 (a cosine margin). Received: margin={margin}")
        self.margin = float(margin)
        self.scale = positive_number("scale", scale)

    def logits(self, labels, cosines):
        mask = ops.cast(target_mask(labels, ops.shape(cosines)[-1]), "float32")
        return self.scale * (cosines - self.margin * mask)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "scale": self.scale}
