"""`PoolingHead`: backbone features -> pooled vector -> linear -> L2-normalised embedding."""

import keras
from keras import ops

from kdml.layers.l2_normalization import L2Normalization

POOLINGS = ("avg_max", "avg", "max", "cls")


@keras.saving.register_keras_serializable(package="kdml")
class PoolingHead(keras.layers.Layer):
    """The Proxy Anchor recipe's head: global pooling, one linear layer, L2 norm.

    Feature maps `(B, H, W, C)` are pooled by global average plus global max
    (`"avg_max"`, Kim et al. 2020's default), or either alone. Token sequences
    `(B, N, C)` from a vision transformer use the class token (`"cls"`, token 0)
    or average / max over tokens.

    Args:
        embedding_dim: int, size d of the embedding.
        pooling: one of "avg_max", "avg", "max", "cls".
        kernel_initializer: initializer of the linear layer.

    Shapes: `(B, H, W, C)` or `(B, N, C)` -> `(B, d)` float32, unit norm.

    Example: with an identity projection, max pooling of a (1, 2, 1, 2) map whose
    channel maxima are (3, 4) gives (3, 4) / 5.

    >>> head = PoolingHead(embedding_dim=2, pooling="max", kernel_initializer="identity")
    >>> head(np.array([[[[3.0, 0.0]], [[-1.0, 4.0]]]])).numpy()
    array([[0.6, 0.8]], dtype=float32)
    >>> tuple(PoolingHead(embedding_dim=8)(np.random.rand(2, 7, 7, 64)).shape)
    (2, 8)
    """

    def __init__(self, embedding_dim, pooling="avg_max",
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}. Received: pooling={pooling!r}")
        if int(embedding_dim) <= 0:
            raise ValueError(f"`embedding_dim` must be positive. Received: {embedding_dim}")
        self.embedding_dim = int(embedding_dim)
        self.pooling = pooling
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.projection = keras.layers.Dense(
            self.embedding_dim, kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy, name="projection")
        self.normalization = L2Normalization(name="l2_normalization")

    def build(self, input_shape):
        if len(input_shape) not in (3, 4):
            raise ValueError(
                "PoolingHead expects a feature map (B, H, W, C) or tokens (B, N, C). "
                f"Received: input_shape={input_shape}")
        if self.pooling == "cls" and len(input_shape) != 3:
            raise ValueError(f"pooling='cls' needs tokens (B, N, C). Received: {input_shape}")
        self.projection.build((input_shape[0], input_shape[-1]))
        self.built = True

    def call(self, features):
        spatial_axes = tuple(range(1, len(features.shape) - 1))
        if self.pooling == "cls":
            pooled = features[:, 0]
        elif self.pooling == "avg":
            pooled = ops.mean(features, axis=spatial_axes)
        elif self.pooling == "max":
            pooled = ops.max(features, axis=spatial_axes)
        else:
            pooled = ops.mean(features, axis=spatial_axes) + ops.max(features, axis=spatial_axes)
        return self.normalization(self.projection(pooled))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "embedding_dim": self.embedding_dim,
            "pooling": self.pooling,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
