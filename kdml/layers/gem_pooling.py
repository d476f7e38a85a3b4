"""`GeMPooling`: generalized-mean pooling with a learnable exponent p, computed in float32."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kdml")
class GeMPooling(keras.layers.Layer):
    """Generalized-mean (GeM) pooling over positions (Radenović, Tolias, Chum, TPAMI 2018).

    For each channel c, over the N positions of a map `(B, H, W, C)` or a token
    sequence `(B, N, C)` (Eq. 2 of the paper):

        f_c = ( 1/N sum_i max(x_ic, eps)^p )^(1/p)

    p = 1 is average pooling and p -> infinity max pooling; p is one trainable
    scalar shared by all channels, initialised to 3 (the paper's value).

    Stability:
    - features are clamped to `eps` (1e-6) below, as in the paper's code: x^p is
      defined for x > 0 only, so GeM assumes non-negative features (a CNN's map after
      ReLU); on signed features (transformer tokens) it pools the positive part.
    - p is clipped to [1, `max_p`] (default 20) in the forward pass: below 1 the mean
      favours the smallest activations, and the clip keeps a run whose p drifts from
      diverging. Outside the range the gradient with respect to p is 0.
    - the mean of powers is taken in log space, as a log-sum-exp with its maximum
      subtracted: with z_i = p log x_ic and M = max_i z_i,
      f_c = exp((M + log(1/N sum_i exp(z_i - M))) / p),
      so no x^p is formed (no overflow for any p or activation) and nothing is divided
      by a feature (an int8 `.tflite` DIV by a quantized zero fails at run time).
    Everything is computed in float32 whatever the dtype policy; the output is float32.

    Args:
        initial_p: float >= 1, the initial exponent.
        max_p: float, the upper clip of p.
        epsilon: float > 0, the lower clamp of the features.
        trainable_p: whether p is trained.

    Shapes: `(B, H, W, C)` or `(B, N, C)` -> `(B, C)` float32.

    Example: p = 1 averages, and p = 3 of (1, 2) is ((1 + 8) / 2)^(1/3).

    >>> GeMPooling(initial_p=1.0)(np.array([[[1.0], [2.0]]])).numpy()
    array([[1.5]], dtype=float32)
    >>> np.round(GeMPooling()(np.array([[[1.0], [2.0]]])).numpy(), 5)  # 4.5 ** (1 / 3)
    array([[1.65096]], dtype=float32)
    """

    def __init__(self, initial_p=3.0, max_p=20.0, epsilon=1e-6, trainable_p=True, **kwargs):
        kwargs.setdefault("dtype", "float32")  # the inputs are not cast to a half dtype
        super().__init__(**kwargs)
        if not 1.0 <= float(initial_p) <= float(max_p):
            raise ValueError(f"`initial_p` must be in [1, max_p={max_p}]. Received: "
                             f"initial_p={initial_p}")
        if float(epsilon) <= 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        self.initial_p = float(initial_p)
        self.max_p = float(max_p)
        self.epsilon = float(epsilon)
        self.trainable_p = bool(trainable_p)

    def build(self, input_shape):
        if len(input_shape) not in (3, 4):
            raise ValueError("GeMPooling expects a feature map (B, H, W, C) or tokens (B, N, C). "
                             f"Received: input_shape={input_shape}")
        self.p = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(self.initial_p),
            trainable=self.trainable_p, dtype="float32", name="p")
        self.built = True

    def call(self, features):
        x = ops.cast(features, "float32")
        axes = tuple(range(1, len(x.shape) - 1))
        p = ops.clip(ops.cast(self.p, "float32"), 1.0, self.max_p)
        z = p * ops.log(ops.maximum(x, self.epsilon))
        # M: outside the gradient (the identity holds for any M).
        top = ops.stop_gradient(ops.max(z, axis=axes, keepdims=True))
        log_mean = ops.squeeze(top, axis=axes) + ops.log(ops.mean(ops.exp(z - top), axis=axes))
        return ops.exp(log_mean * (1.0 / p))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "initial_p": self.initial_p, "max_p": self.max_p,
                "epsilon": self.epsilon, "trainable_p": self.trainable_p}
