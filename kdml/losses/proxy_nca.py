"""ProxyNCA with ProxyNCA++'s temperature (Movshovitz-Attias et al., ICCV 2017;
Teh et al., ECCV 2020; docs/design.md 3.6.5)."""

import keras

from kdml.losses._classification import ClassificationLoss, positive_number


@keras.saving.register_keras_serializable(package="kdml")
class ProxyNCALoss(ClassificationLoss):
    """Neighbourhood component analysis against one proxy per class, with a temperature.

    Movshovitz-Attias et al., "No Fuss Distance Metric Learning using Proxies", ICCV 2017
    (arXiv:1703.07464), with ProxyNCA++'s changes (Teh, DeVries, Taylor, "ProxyNCA++:
    Revisiting and Revitalizing Proxy Neighborhood Component Analysis", ECCV 2020,
    arXiv:2004.01113, its loss with temperature scaling): the positive proxy is in the
    denominator and the squared distances of normalised vectors are divided by a
    temperature T; docs/design.md 3.6.5:

        L = -1/B sum_i log( exp(-|f^_i - p^_{y_i}|^2 / T) / sum_c exp(-|f^_i - p^_c|^2 / T) )

    With unit vectors |f^ - p^|^2 = 2 - 2 s(f, p), so the logits are (2 / T) s(f_i, p_c)
    (the constant cancels): the loss runs on cosines like the others.

    Same parameter and default as pytorch-metric-learning's `ProxyNCALoss`: the scale
    `softmax_scale` = 1 / T, default 1 (ProxyNCA++ recommends T = 1/9, i.e. 9, which
    `--method=proxy_nca` uses). One difference: PML drops a sample whose softmax
    probability underflows to 0 (possible only for softmax_scale above ~20) from the
    mean; this loss computes the log-softmax stably and keeps it. Computed in float32
    whatever the dtype of y_pred.

    Args:
        softmax_scale: Positive 1 / T (default 1).
        gather_across_replicas: Whether every replica computes the loss of the global
            batch. Default True.
        name: Loss name.
        **kwargs: Passed to `keras.losses.Loss`.

    Shapes:
        y_true: int class labels in [0, C), (B,) or (B, 1).
        y_pred: cosine similarities (B, C), e.g. the output of `kdml.layers.Proxies`.
        Returns: a float32 scalar, the mean over the (global) batch.

    Example (on its proxy, orthogonal to the other: squared distances 0 and 2, so with
    T = 1 the loss is log(1 + e^-2)):

    >>> loss = ProxyNCALoss(softmax_scale=1.0)
    >>> round(float(loss([0], keras.ops.convert_to_tensor([[1.0, 0.0]]))), 6)
    0.126928
    """

    def __init__(self, softmax_scale=1.0, gather_across_replicas=True, name="proxy_nca_loss",
                 **kwargs):
        super().__init__(gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        self.softmax_scale = positive_number("softmax_scale", softmax_scale)

    def logits(self, labels, cosines):
        return (2.0 * self.softmax_scale) * cosines

    def get_config(self):
        return {**super().get_config(), "softmax_scale": self.softmax_scale}
