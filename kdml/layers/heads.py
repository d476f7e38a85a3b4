"""`PoolingHead`: backbone features -> pooled vector -> linear -> L2-normalised embedding."""

import keras
from keras import ops

from kdml.layers.gem_pooling import GeMPooling
from kdml.layers.l2_normalization import L2Normalization

POOLINGS = ("avg_max", "avg", "max", "gem", "cls", "cls_gem")


@keras.saving.register_keras_serializable(package="kdml")
class PoolingHead(keras.layers.Layer):
    """The Proxy Anchor recipe's head: global pooling, one linear layer, L2 norm.

    Feature maps `(B, H, W, C)` are pooled by global average plus global max
    (`"avg_max"`, Kim et al. 2020's default), either alone, or by generalized-mean
    pooling (`"gem"`, `kdml.layers.GeMPooling`: a learnable exponent p, initially 3).
    Token sequences `(B, N, C)` from a vision transformer use the class token
    (`"cls"`, token 0), or pool the patch tokens (the tokens after the first
    `skip_tokens`: class, distillation and register tokens are left out) by
    "avg_max", "avg", "max" or "gem", or concatenate the class token and the GeM of
    the patch tokens (`"cls_gem"`, a `(B, 2C)` vector before the linear layer).

    Args:
        embedding_dim: int, size d of the embedding.
        pooling: one of "avg_max", "avg", "max", "gem", "cls", "cls_gem".
        kernel_initializer: initializer of the linear layer.
        skip_tokens: int, leading tokens of a `(B, N, C)` input that are not patches
            (the backbone's `BackboneSpec.prefix_tokens`); ignored for maps.

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
                 kernel_initializer="glorot_uniform", skip_tokens=0, **kwargs):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}. Received: pooling={pooling!r}")
        if int(embedding_dim) <= 0:
            raise ValueError(f"`embedding_dim` must be positive. Received: {embedding_dim}")
        self.embedding_dim = int(embedding_dim)
        if int(skip_tokens) < 0:
            raise ValueError(f"`skip_tokens` must be >= 0. Received: skip_tokens={skip_tokens}")
        self.pooling = pooling
        self.skip_tokens = int(skip_tokens)
        self.gem = GeMPooling(name="gem") if pooling in ("gem", "cls_gem") else None
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
        tokens = len(input_shape) == 3
        if self.pooling in ("cls", "cls_gem") and not tokens:
            raise ValueError(f"pooling={self.pooling!r} needs tokens (B, N, C). "
                             f"Received: {input_shape}")
        if tokens and input_shape[1] is not None and self.pooling != "cls" and (
                input_shape[1] <= self.skip_tokens):
            raise ValueError(f"No patch tokens to pool: {input_shape[1]} tokens, skip_tokens="
                             f"{self.skip_tokens}. Received: input_shape={input_shape}")
        channels = input_shape[-1]
        if self.gem is not None:
            self.gem.build((input_shape[0], None, channels))
        width = 2 * channels if self.pooling == "cls_gem" else channels
        self.projection.build((input_shape[0], width))
        self.built = True

    def call(self, features):
        if self.pooling == "cls":
            return self.normalization(self.projection(features[:, 0]))
        if len(features.shape) == 3:
            patches = features[:, self.skip_tokens:]
        else:
            patches = features
        spatial_axes = tuple(range(1, len(patches.shape) - 1))
        if self.pooling == "avg":
            pooled = ops.mean(patches, axis=spatial_axes)
        elif self.pooling == "max":
            pooled = ops.max(patches, axis=spatial_axes)
        elif self.pooling == "avg_max":
            pooled = ops.mean(patches, axis=spatial_axes) + ops.max(patches, axis=spatial_axes)
        else:  # "gem", "cls_gem": GeM in float32, then the layer's compute dtype
            pooled = ops.cast(self.gem(patches), features.dtype)
            if self.pooling == "cls_gem":
                pooled = ops.concatenate([features[:, 0], pooled], axis=-1)
        return self.normalization(self.projection(pooled))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "embedding_dim": self.embedding_dim,
            "pooling": self.pooling,
            "skip_tokens": self.skip_tokens,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
