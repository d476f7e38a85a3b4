"""`CodedResidualTransform`: feature map -> prototype-coded residuals -> embedding (docs/design.md 3.3)."""

import keras
from keras import ops

from kdml.layers.l2_normalization import L2Normalization
from kdml.regularizers import SoftOrthogonal

_EPSILON = 1e-12  # guards norms of all-zero vectors and empty weight sums
CODE_NORMALIZATIONS = ("l2", "layer_norm", "none")


def _l2_normalize(x, axis=-1):
    squared = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared, _EPSILON))


@keras.saving.register_keras_serializable(package="kdml")
class CodedResidualTransform(keras.layers.Layer):
    """Coded Residual Transform head: prototype-coded residuals of the features.

    Our reading of "Coded Residual Transform for Generalizable Deep Metric Learning"
    (its method section is not available to us; docs/design.md 3.3). With features x_n
    (n = 1..N positions or tokens, C channels), K learnable prototypes c_k (C,) and
    c^_k = c_k / ||c_k||:

        w_nk  = softmax_k( cos(x_n, c_k) / temperature )        correlation coefficients
        r_nk  = x_n - (x_n . c^_k) c^_k                          coded residual (orthogonal to c^_k)
        z_k   = sum_n w_nk r_nk / sum_n w_nk                     per-prototype code (C,)
        z_k  <- z_k / ||z_k||                                    intra-normalisation
        e     = L2( W [z_1, ..., z_K] + b )                      (B, d) embedding

    Vectorised without materialising r (B, N, K, C): since the projection is linear,
    sum_n w_nk r_nk = sum_n w_nk x_n - (sum_n w_nk (x_n . c^_k)) c^_k, two einsums of
    O(N K C) each. `coded_residuals` returns the explicit r_nk for inspection.

    Choices that are ours (docs/design.md 3.3 marks them), each an argument:

    Args:
        num_prototypes: K, positive int.
        embedding_dim: d, positive int.
        temperature: tau of the correlation softmax, > 0. Default 0.1 (cosines in
            [-1, 1] / 0.1 give a peaked but not one-hot assignment).
        normalize_features: whether residuals and codes are formed from the
            L2-normalised features x_n / ||x_n|| instead of x_n. Default False
            (docs/design.md's r_nk uses x_n; the weights use cosines either way).
        intra_normalization: L2-normalise each z_k before concatenation (NetVLAD's
            intra-normalisation). Default True.
        code_normalization: what is applied to the concatenated (K C,) code before
            the linear projection: "l2" (unit norm; with intra-normalisation a
            constant 1/sqrt(K) that keeps the projection's input scale independent
            of K), "layer_norm" (a learnable LayerNorm), or "none". Default "l2".
        orthogonality_strength: strength of `kdml.regularizers.SoftOrthogonal` on the
            prototype matrix (K, C) (docs/design.md 3.2's penalty); 0 disables it.
            Default 1.0.
        orthogonality_mode: that regulariser's mode ("auto": rows when K <= C).
        orthogonality_normalization: that regulariser's normalization. Default "size"
            (divided by K^2: the mean squared cosine between prototypes, so one strength
            fits any K; "none" is the SO paper's unnormalised sum).
        prototype_initializer: initializer of the (K, C) prototypes. Default
            "orthogonal" (orthonormal rows when K <= C: distinct directions from the
            start).
        skip_tokens: leading tokens of a (B, N, C) input to ignore (a DeiT's class
            and distillation tokens: 2). Default 0.
        kernel_initializer: initializer of the projection.
        **kwargs: standard layer arguments (`name`, `dtype`, `trainable`).

    Numerics: the layer does not autocast; features are cast to float32 and the
    cosines, softmax, aggregation and normalisations run in float32 (the softmax
    logits reach 1/temperature); only the projection runs in the compute dtype of
    the policy (e.g. bfloat16), and the output is float32.

    Shapes:
        `(B, H, W, C)` feature map or `(B, N, C)` tokens -> `(B, d)` float32, unit norm.
        `num_positions` is N, the positions (H W) or tokens (less `skip_tokens`) the
        K prototypes encode, once built.

    Example:

    >>> crt = CodedResidualTransform(num_prototypes=8, embedding_dim=16, temperature=0.1)
    >>> tuple(crt(np.random.rand(2, 7, 7, 32).astype("float32")).shape)
    (2, 16)
    >>> crt.num_positions, crt.num_prototypes  # N = 7 x 7 positions, K prototypes
    (49, 8)
    """

    def __init__(self, num_prototypes, embedding_dim, temperature=0.1,
                 normalize_features=False, intra_normalization=True,
                 code_normalization="l2", orthogonality_strength=1.0,
                 orthogonality_mode="auto", prototype_initializer="orthogonal",
                 skip_tokens=0, kernel_initializer="glorot_uniform",
                 orthogonality_normalization="size", **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        for arg, value in (("num_prototypes", num_prototypes), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{arg}` to be a positive int. Received: {arg}={value!r}")
        if not float(temperature) > 0:
            raise ValueError(
                f"Expected `temperature` > 0 (the softmax scale is 1/temperature). "
                f"Received: temperature={temperature!r}")
        if code_normalization not in CODE_NORMALIZATIONS:
            raise ValueError(
                f"Expected `code_normalization` to be one of {CODE_NORMALIZATIONS}. "
                f"Received: code_normalization={code_normalization!r}")
        if isinstance(skip_tokens, bool) or not isinstance(skip_tokens, int) or skip_tokens < 0:
            raise ValueError(f"Expected `skip_tokens` to be an int >= 0. Received: {skip_tokens!r}")
        self.num_prototypes = num_prototypes
        self.embedding_dim = embedding_dim
        self.temperature = float(temperature)
        self.normalize_features = bool(normalize_features)
        self.intra_normalization = bool(intra_normalization)
        self.code_normalization = code_normalization
        self.orthogonality_strength = float(orthogonality_strength)
        self.orthogonality_mode = orthogonality_mode
        self.orthogonality_normalization = orthogonality_normalization
        # Validates strength >= 0, mode and normalization with SoftOrthogonal's messages.
        regularizer = SoftOrthogonal(self.orthogonality_strength, orthogonality_mode,
                                     orthogonality_normalization)
        self.prototype_regularizer = regularizer if self.orthogonality_strength > 0 else None
        self.prototype_initializer = keras.initializers.get(prototype_initializer)
        self.skip_tokens = skip_tokens
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.layer_norm = (keras.layers.LayerNormalization(dtype="float32", name="layer_norm")
                           if code_normalization == "layer_norm" else None)
        self.projection = keras.layers.Dense(
            embedding_dim, kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy, name="projection")
        self.normalization = L2Normalization(name="l2_normalization")
        self._num_positions = None

    @property
    def num_positions(self):
        """N: the positions or tokens each input contributes (None before build, or when
        the input's spatial size is unknown)."""
        return self._num_positions

    def build(self, input_shape):
        if len(input_shape) not in (3, 4) or input_shape[-1] is None:
            raise ValueError(
                "CodedResidualTransform expects a feature map (B, H, W, C) or tokens "
                f"(B, N, C) with a known C. Received: input_shape={input_shape}")
        if self.skip_tokens and len(input_shape) != 3:
            raise ValueError(
                f"`skip_tokens`={self.skip_tokens} needs tokens (B, N, C). "
                f"Received: input_shape={input_shape}")
        if len(input_shape) == 3 and input_shape[1] is not None and input_shape[1] <= self.skip_tokens:
            raise ValueError(
                f"skip_tokens={self.skip_tokens} leaves no tokens of input_shape={input_shape}.")
        spatial = input_shape[1:-1]
        if all(size is not None for size in spatial):
            count = 1
            for size in spatial:
                count *= int(size)
            self._num_positions = count - (self.skip_tokens if len(input_shape) == 3 else 0)
        channels = int(input_shape[-1])
        self.prototypes = self.add_weight(
            name="prototypes", shape=(self.num_prototypes, channels),
            initializer=self.prototype_initializer, regularizer=self.prototype_regularizer,
            dtype="float32", autocast=False)
        code_dim = self.num_prototypes * channels
        if self.layer_norm is not None:
            self.layer_norm.build((None, code_dim))
        self.projection.build((None, code_dim))
        self.built = True

    def _positions(self, features):
        """(B, H, W, C) or (B, N, C) -> (B, N', C) float32 (prefix tokens dropped)."""
        x = ops.cast(features, "float32")
        if len(x.shape) == 4:
            x = ops.reshape(x, (ops.shape(x)[0], -1, ops.shape(x)[-1]))
        elif self.skip_tokens:
            x = x[:, self.skip_tokens:]
        return x

    def _weights_and_projections(self, x):
        """Correlations w (B, N, K), projection lengths x_n . c^_k (B, N, K), c^ (K, C)."""
        directions = _l2_normalize(ops.cast(self.prototypes, "float32"))  # (K, C)
        dots = ops.einsum("bnc,kc->bnk", x, directions)
        norms = ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), _EPSILON))
        weights = ops.softmax(dots / norms / self.temperature, axis=-1)  # softmax over k
        return weights, dots, directions

    def coded_residuals(self, features):
        """The explicit correlation weights and coded residuals (for inspection and tests).

        Returns:
            weights w (B, N, K) float32 (each row sums to 1 over K), and residuals
            r (B, N, K, C) float32 with r_nk = x_n - (x_n . c^_k) c^_k, x_n normalised
            first when `normalize_features`. Memory O(B N K C): not used by `call`.
        """
        features = ops.convert_to_tensor(features)
        if not self.built:
            self.build(tuple(features.shape))
        x = self._positions(features)
        if self.normalize_features:
            x = _l2_normalize(x)
        weights, dots, directions = self._weights_and_projections(x)
        residuals = x[:, :, None, :] - dots[..., None] * directions[None, None]
        return weights, residuals

    def call(self, features):
        x = self._positions(features)  # (B, N, C) float32
        if self.normalize_features:
            x = _l2_normalize(x)
        weights, dots, directions = self._weights_and_projections(x)
        # sum_n w_nk r_nk = sum_n w_nk x_n - (sum_n w_nk x_n . c^_k) c^_k
        weighted_sum = ops.einsum("bnk,bnc->bkc", weights, x)  # (B, K, C)
        weighted_length = ops.sum(weights * dots, axis=1)  # (B, K)
        codes = weighted_sum - weighted_length[..., None] * directions[None]
        codes = codes / ops.maximum(ops.sum(weights, axis=1), _EPSILON)[..., None]  # z_k
        if self.intra_normalization:
            codes = _l2_normalize(codes)
        code = ops.reshape(codes, (ops.shape(codes)[0], -1))  # (B, K C), k-major
        if self.code_normalization == "l2":
            code = _l2_normalize(code)
        elif self.code_normalization == "layer_norm":
            code = self.layer_norm(code)
        return self.normalization(self.projection(ops.cast(code, self.compute_dtype)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    def compute_output_spec(self, features):
        return keras.KerasTensor((features.shape[0], self.embedding_dim), dtype="float32")

    def get_config(self):
        return {
            **super().get_config(),
            "num_prototypes": self.num_prototypes,
            "embedding_dim": self.embedding_dim,
            "temperature": self.temperature,
            "normalize_features": self.normalize_features,
            "intra_normalization": self.intra_normalization,
            "code_normalization": self.code_normalization,
            "orthogonality_strength": self.orthogonality_strength,
            "orthogonality_mode": self.orthogonality_mode,
            "orthogonality_normalization": self.orthogonality_normalization,
            "prototype_initializer": keras.initializers.serialize(self.prototype_initializer),
            "skip_tokens": self.skip_tokens,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
