"""Normalised softmax loss (Zhai & Wu, BMVC 2019; docs/design.md 3.6.1)."""

import keras

from kdml.losses._classification import ClassificationLoss, positive_number


@keras.saving.register_keras_serializable(package="kdml")
class NormalizedSoftmaxLoss(ClassificationLoss):
    """Softmax cross-entropy on cosines to L2-normalised class weights, over a temperature.

    Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning", BMVC 2019
    (arXiv:1811.12649), its normalised softmax loss with temperature; docs/design.md 3.6.1:

        L = -1/B sum_i log( exp(s(f_i, w_{y_i}) / T) / sum_c exp(s(f_i, w_c) / T) )

    Same default as pytorch-metric-learning's `NormalizedSoftmaxLoss` (temperature
    0.05); the class weights are `kdml.layers.Proxies` (C, d), PML's W (d, C)
    transposed. Computed in float32 whatever the dtype of y_pred.

    Args:
        temperature: Positive T (default 0.05, i.e. a scale of 20).
        gather_across_replicas: Whether every replica computes the loss of the global
            batch (`kdml.losses.ProxyAnchorLoss` explains the scaling). Default True.
        name: Loss name.
        **kwargs: Passed to `keras.losses.Loss`.

    Shapes:
        y_true: int class labels in [0, C), (B,) or (B, 1).
        y_pred: cosine similarities (B, C), e.g. the output of `kdml.layers.Proxies`.
        Returns: a float32 scalar, the mean over the (global) batch.

    Example (two classes, cosines 1 and 0 to them: log(1 + e^{-1/T}) at T = 1):

    >>> loss = NormalizedSoftmaxLoss(temperature=1.0)
    >>> round(float(loss([0], keras.ops.convert_to_tensor([[1.0, 0.0]]))), 6)
    0.313262
    """

    def __init__(self, temperature=0.05, gather_across_replicas=True,
                 name="normalized_softmax_loss", **kwargs):
        super().__init__(gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        self.temperature = positive_number("temperature", temperature)

    def logits(self, labels, cosines):
        return cosines / self.temperature

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
