"""Learnable class proxies that score embeddings by cosine similarity (docs/design.md 3.1)."""

import keras
from keras import ops

_NORM_EPSILON = 1e-12  # as tf.math.l2_normalize: guards the all-zero vector


def _l2_normalize(x):
    squared_norm = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared_norm, _NORM_EPSILON))


@keras.saving.register_keras_serializable(package="kdml")
class Proxies(keras.layers.Layer):
    """Holds one learnable proxy per class and returns cosine similarities to them.

    The proxy matrix P (C, d) is the float32 weight "proxies", created in `build` from
    the embedding size d. Embeddings and proxies are both L2-normalised inside, and
    the similarities are computed and returned in float32 whatever the input dtype or
    the mixed-precision policy (the layer does not autocast: inputs are cast up to
    float32, and the weight is never cast down), because the Proxy Anchor loss scales
    them by alpha = 32 before exponentiating (docs/design.md 3.1).

    Args:
        num_classes: Number of proxies C (training classes), a positive int.
        initializer: Initializer for P; default "he_normal" (the paper's Kaiming-normal,
            std sqrt(2 / C) for a (C, d) matrix).
        proxy_regularizer: Optional `keras.regularizers.Regularizer` on P (an instance,
            a name or a config); its penalty joins `layer.losses` / `model.losses`,
            e.g. `kdml.regularizers.SoftOrthogonal(strength)` (docs/design.md 3.2).
        regularizer: Former name of `proxy_regularizer`, still accepted (give one).
        **kwargs: Standard layer arguments (`name`, `trainable`, `dtype`).

    Shapes:
        (B, d) -> (B, C) float32 cosine similarities, (more generally (..., d) -> (..., C)).

    Example:

    >>> embeddings = keras.Input(shape=(128,))
    >>> sims = Proxies(num_classes=100)(embeddings)
    >>> tuple(sims.shape), sims.dtype
    ((None, 100), 'float32')

    With the proxies e_1 and e_2 (identity initializer), the cosines of (3, 4) to them
    are 3/5 and 4/5:

    >>> Proxies(num_classes=2, initializer="identity")(np.array([[3.0, 4.0]])).numpy()
    array([[0.6, 0.8]], dtype=float32)
    """

    def __init__(self, num_classes, initializer="he_normal", proxy_regularizer=None,
                 regularizer=None, **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        is_int = isinstance(num_classes, int) and not isinstance(num_classes, bool)
        if not is_int or num_classes < 1:
            raise ValueError(
                "Expected `num_classes` to be a positive int. "
                f"Received: num_classes={num_classes!r}"
            )
        self.num_classes = num_classes
        self.initializer = keras.initializers.get(initializer)
        if proxy_regularizer is not None and regularizer is not None:
            raise ValueError(
                "Pass the proxies' regularizer once, as `proxy_regularizer` (`regularizer` "
                f"is its former name). Received: proxy_regularizer={proxy_regularizer!r}, "
                f"regularizer={regularizer!r}"
            )
        self.proxy_regularizer = keras.regularizers.get(
            proxy_regularizer if proxy_regularizer is not None else regularizer)

    @property
    def regularizer(self):
        """Former name of `proxy_regularizer`."""
        return self.proxy_regularizer

    def build(self, input_shape):
        embedding_dim = input_shape[-1]
        if embedding_dim is None:
            raise ValueError(
                "Proxies needs a known embedding size (last input dimension). "
                f"Received: input_shape={input_shape}"
            )
        self.proxies = self.add_weight(
            name="proxies",
            shape=(self.num_classes, embedding_dim),
            initializer=self.initializer,
            regularizer=self.proxy_regularizer,
            dtype="float32",
            autocast=False,
        )

    def call(self, inputs):
        embeddings = _l2_normalize(ops.cast(inputs, "float32"))
        proxies = _l2_normalize(ops.cast(self.proxies, "float32"))
        return ops.matmul(embeddings, ops.transpose(proxies))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_classes)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype="float32"
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "initializer": keras.initializers.serialize(self.initializer),
                "proxy_regularizer": keras.regularizers.serialize(self.proxy_regularizer)
                if self.proxy_regularizer is not None
                else None,
            }
        )
        return config
