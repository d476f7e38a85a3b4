"""The position-dependent deep metric (PDDM) unit (Huang, Loy, Tang, NIPS 2016; docs/design.md 3.4)."""

import keras
from keras import ops

from kdml.distribute import all_gather, worker_role

_NORM_EPSILON = 1e-12  # as tf.math.l2_normalize: guards u = |f_i - f_i| = 0 and dead ReLUs
NORMALIZATIONS = ("before_fc", "after_fc")


def _l2_normalize(x):
    squared_norm = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared_norm, _NORM_EPSILON))


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int. Received: {name}={value!r}")


@keras.saving.register_keras_serializable(package="kdml")
class PDDM(keras.layers.Layer):
    """Learned similarity S(f_i, f_j) of a pair of embeddings (the PDDM unit).

    Huang, Loy, Tang, "Local Similarity-Aware Deep Feature Embedding", NIPS 2016,
    Eq. (1), on L2-normalised embeddings f (the paper's Fig. 2):

        u1 = |f_i - f_j|,           v1 = (f_i + f_j) / 2
        u2 = u1 / ||u1||_2,         v2 = v1 / ||v1||_2       (normalised BEFORE the FCs)
        u  = ReLU(W_u u2 + b_u),    v  = ReLU(W_v v2 + b_v)
        c  = ReLU(W_c [u; v] + b_c),  S_ij = W_s c + b_s

    The normalisation removes the scale of the difference and of the mean: u2 keeps
    only the direction in which f_i and f_j differ, v2 where the pair sits (the
    "position" of the position-dependent metric). For f_i = f_j, u1 = 0: the norm is
    guarded by max(||u1||^2, 1e-12) (u2 = 0, finite gradients).
    `normalization="after_fc"` is the other order, u = L2(ReLU(W_u u1 + b_u)) and
    v = L2(ReLU(W_v v1 + b_v)), kept as an option (an earlier reading of the paper).

    u and v are symmetric in (f_i, f_j), so S_ij = S_ji exactly (bit for bit) in
    inference; dropout on c (training only) draws independent masks per pair. Since
    W_v is linear, W_v v1 = (W_v f_i + W_v f_j) / 2 is computed per row and broadcast,
    and ||v1||^2 = (||f_i||^2 + ||f_j||^2) / 2 - ||u1||^2 / 4 (the parallelogram law),
    so a (q, g) score matrix only needs the (q, g, d) tensor for u.

    Computed in float32 whatever the input dtype or mixed-precision policy (inputs are
    cast up, weights are float32 and never cast down): the scores feed a hinge loss
    and a re-ranking sort.

    Args:
        hidden_dim: Width of u, v and c (the paper's fully connected layers).
        dropout: Dropout rate on c during training, in [0, 1).
        normalization: "before_fc" (default, the paper's Eq. 1) or "after_fc", see above.
        **kwargs: Standard layer arguments (`name`, `trainable`, `dtype`).

    Shapes:
        `layer(a, b)`: a, b (n, d) -> (n,) float32 scores of the row pairs.
        `layer.pairwise(x)`: (B, d) -> (B, B); `layer.pairwise(x, y)`: (q, d), (g, d)
        -> (q, g). Vectorised by broadcasting.

    Example:

    >>> unit = PDDM(hidden_dim=16)
    >>> x = keras.random.normal((5, 8))
    >>> tuple(unit(x, x[::-1]).shape), tuple(unit.pairwise(x).shape)
    ((5,), (5, 5))
    >>> # u1, v1 are normalised before the FCs: the pair's scale does not matter.
    >>> bool(np.allclose(unit(x, x[::-1]), unit(3 * x, 3 * x[::-1]), atol=1e-5))
    True
    """

    def __init__(self, hidden_dim=128, dropout=0.0, normalization="before_fc", **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        _check_positive_int("hidden_dim", hidden_dim)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected `dropout` in [0, 1). Received: dropout={dropout!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Expected `normalization` in {NORMALIZATIONS} (\"before_fc\" is the paper's "
                f"Eq. 1). Received: normalization={normalization!r}")
        self.hidden_dim = hidden_dim
        self.dropout = float(dropout)
        self.normalization = normalization
        dense = dict(dtype="float32", kernel_initializer="glorot_uniform")
        self.u_dense = keras.layers.Dense(hidden_dim, name="u_dense", **dense)
        self.v_dense = keras.layers.Dense(hidden_dim, name="v_dense", **dense)
        self.c_dense = keras.layers.Dense(hidden_dim, name="c_dense", **dense)
        self.score_dense = keras.layers.Dense(1, name="score_dense", **dense)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype="float32")

    def build(self, a_shape, b_shape=None):
        embedding_dim = a_shape[-1]
        if embedding_dim is None:
            raise ValueError(
                "PDDM needs a known embedding size (last input dimension). "
                f"Received: input shape={a_shape}"
            )
        self.u_dense.build((None, embedding_dim))
        self.v_dense.build((None, embedding_dim))
        self.c_dense.build((None, 2 * self.hidden_dim))
        self.score_dense.build((None, self.hidden_dim))

    def _check(self, *tensors):
        for x in tensors:
            if len(x.shape) != 2:
                raise ValueError(
                    f"PDDM expects (n, d) embedding batches. Received: shape={tuple(x.shape)}"
                )
        if not self.built:
            self.build(tensors[0].shape)
        return [ops.cast(x, "float32") for x in tensors]

    def _head(self, u1, v_mean_proj, v_squared_norm, training):
        """u1 = |f_i - f_j| (..., d), W_v v1 (..., h), ||v1||^2 (...) -> scores (...)."""
        v_bias = ops.cast(self.v_dense.bias, "float32")
        if self.normalization == "before_fc":
            u = ops.relu(self.u_dense(_l2_normalize(u1)))
            # W_v (v1 / ||v1||) + b_v, guarded as _l2_normalize guards u1.
            v_scale = ops.rsqrt(ops.maximum(v_squared_norm, _NORM_EPSILON))
            v = ops.relu(v_mean_proj * v_scale[..., None] + v_bias)
        else:
            u = _l2_normalize(ops.relu(self.u_dense(u1)))
            v = _l2_normalize(ops.relu(v_mean_proj + v_bias))
        c = ops.relu(self.c_dense(ops.concatenate([u, v], axis=-1)))
        c = self.dropout_layer(c, training=training)
        return ops.squeeze(self.score_dense(c), axis=-1)

    def _project_v(self, x):
        return ops.matmul(x, ops.cast(self.v_dense.kernel, "float32"))

    def _scores(self, a, b, a_proj, b_proj, a_sq, b_sq, training):
        """Broadcast rows a, b (..., d), their W_v products and squared norms -> (...)."""
        u1 = ops.abs(a - b)
        # ||v1||^2 = ||(a + b) / 2||^2 by the parallelogram law; symmetric in (a, b).
        v_squared_norm = ops.maximum((a_sq + b_sq) * 0.5 - ops.sum(ops.square(u1), axis=-1) * 0.25,
                                     0.0)
        return self._head(u1, (a_proj + b_proj) * 0.5, v_squared_norm, training)

    def call(self, a, b, training=None):
        a, b = self._check(a, b)
        return self._scores(a, b, self._project_v(a), self._project_v(b),
                            ops.sum(ops.square(a), axis=-1), ops.sum(ops.square(b), axis=-1),
                            training)

    def pairwise(self, x, y=None, training=None):
        """Scores of every pair: (q, d) x (g, d) -> (q, g); `y=None` means `y = x`."""
        if y is None:
            (x,) = self._check(x)
            y = x
        else:
            x, y = self._check(x, y)
        x_proj, y_proj = self._project_v(x), self._project_v(y)
        x_sq, y_sq = ops.sum(ops.square(x), axis=-1), ops.sum(ops.square(y), axis=-1)
        return self._scores(x[:, None, :], y[None, :, :], x_proj[:, None, :], y_proj[None, :, :],
                            x_sq[:, None], y_sq[None, :], training)

    def compute_output_spec(self, a, b, training=None):
        return keras.KerasTensor(a.shape[:-1], dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_dim": self.hidden_dim, "dropout": self.dropout,
                       "normalization": self.normalization})
        return config

    @classmethod
    def from_config(cls, config):
        # Units saved before `normalization` existed normalised after the FCs.
        return cls(**{"normalization": "after_fc", **config})


@keras.saving.register_keras_serializable(package="kdml")
class PDDMScoreMatrix(keras.layers.Layer):
    """Training-model head: embeddings -> [embeddings | PDDM scores vs the global batch].

    Puts a PDDM unit into the training model (so the optimizer trains it and
    checkpoints hold it) and hands `kdml.losses.PDDMLoss` both what it needs in one
    Keras output: row i is `[f_i (d), S_i1 ... S_iB (B)]`, where the columns run over
    the GLOBAL batch: under a `tf.distribute` strategy with several replicas the
    columns' embeddings are all-gathered (replica order, as `PDDMLoss` gathers the
    rows), so each replica scores its local rows against every image of the step and
    the loss sees the full (B, B) matrix. The all-gather's gradient sums over replicas
    and returns each replica its own rows, so gradients reach only local rows.
    Outside a multi-replica context it is the (B, B) matrix of the batch itself.

    Args:
        unit: The `PDDM` layer (or its config) that scores pairs.
        **kwargs: Standard layer arguments.

    Shapes:
        (b, d) -> (b, d + B) float32, B = b x replicas.

    Example:

    >>> head = PDDMScoreMatrix(PDDM(hidden_dim=8))
    >>> out = head(keras.random.normal((4, 6)))
    >>> tuple(out.shape)  # [4 embeddings of 6 | their 4 x 4 scores]
    (4, 10)
    """

    def __init__(self, unit, **kwargs):
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        if isinstance(unit, dict):
            unit = keras.saving.deserialize_keras_object(unit)
        if not isinstance(unit, PDDM):
            raise ValueError(
                f"Expected `unit` to be a kdml.layers.PDDM. Received: {type(unit).__name__}"
            )
        self.unit = unit

    def build(self, input_shape):
        if not self.unit.built:
            self.unit.build(input_shape)

    def call(self, embeddings, training=None):
        embeddings = ops.cast(embeddings, "float32")
        scores = self.unit.pairwise(embeddings, all_gather(embeddings), training=training)
        return ops.concatenate([embeddings, scores], axis=-1)

    def compute_output_spec(self, embeddings, training=None):
        return keras.KerasTensor((embeddings.shape[0], None), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config["unit"] = keras.saving.serialize_keras_object(self.unit)
        return config


def pddm_pair_model(unit, embedding_dim, name="pddm"):
    """A two-input Keras model (n, d), (n, d) -> (n,) scores sharing `unit`'s weights.

    This is what a PDDM run saves as `<output_dir>/pddm.keras` (the re-ranker).
    """
    a = keras.Input((embedding_dim,), name="embeddings_a")
    b = keras.Input((embedding_dim,), name="embeddings_b")
    return keras.Model([a, b], unit(a, b), name=name)


class SavePDDMUnit(keras.callbacks.Callback):
    """Writes `pddm_pair_model(unit)` to `path` at every epoch end and at the end of training.

    Atomic (a temporary file in the same folder, then `os.replace`), so the file is
    always a complete model, written just before the epoch's checkpoint; a resumed run
    overwrites it with the resumed unit. In a multi-worker run only the chief writes.
    """

    def __init__(self, unit, embedding_dim, path):
        super().__init__()
        self.unit = unit
        self.embedding_dim = int(embedding_dim)
        self.path = path

    def save(self):
        import os

        strategy = getattr(self.model, "distribute_strategy", None)
        if strategy is not None and not worker_role(strategy).is_chief:
            return  # multi-worker: only the chief writes, as for embedder.keras
        model = pddm_pair_model(self.unit, self.embedding_dim)
        tmp = f"{self.path[:-len('.keras')]}.tmp-{os.getpid()}.keras"
        model.save(tmp)
        os.replace(tmp, self.path)

    def on_epoch_end(self, epoch, logs=None):
        self.save()

    def on_train_end(self, logs=None):
        self.save()
