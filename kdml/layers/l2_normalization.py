"""`L2Normalization`: rows scaled to unit Euclidean norm, computed in float32."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kdml")
class L2Normalization(keras.layers.Layer):
    """Scales each vector along `axis` to unit L2 norm.

    The norm is computed in float32 whatever the dtype policy, and the output is
    float32: embeddings feed cosine similarities and exponentials downstream.

    Args:
        axis: int, the axis to normalise. Defaults to -1.
        epsilon: float, added to the squared norm to avoid division by zero.

    Shapes: `(..., d) -> (..., d)` float32.

    Example:

    >>> L2Normalization()(np.array([[3.0, 4.0], [0.0, -2.0]])).numpy()
    array([[ 0.6,  0.8],
           [ 0. , -1. ]], dtype=float32)
    """

    def __init__(self, axis=-1, epsilon=1e-12, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.axis = axis
        self.epsilon = epsilon

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        squared = ops.sum(ops.square(x), axis=self.axis, keepdims=True)
        return x * ops.rsqrt(ops.maximum(squared, self.epsilon))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "epsilon": self.epsilon}
