"""Soft-orthogonality penalty on a matrix of row vectors (docs/design.md 3.2)."""

import keras
from keras import ops

_MODES = ("auto", "rows", "columns")
NORMALIZATIONS = ("none", "size")
_NORM_EPSILON = 1e-12  # as tf.math.l2_normalize: guards an all-zero row


@keras.saving.register_keras_serializable(package="kdml")
class SoftOrthogonal(keras.regularizers.Regularizer):
    """Soft-orthogonality penalty that spreads class proxies (or prototypes) apart.

    Saberi-Movahed et al., "Deep Metric Learning with Soft Orthogonal Proxies" (2023):
    L = L_PA + lambda ||P^ P^T - I||_F^2, with P (C, d) the proxies as rows and P^ its
    rows L2-normalised (so the penalty ignores the proxies' scale). By default the
    penalty is in the paper's own units, unnormalised, so `strength` is its lambda:

        "rows":    R = strength * || P^ P^T - I_C ||_F^2
        "columns": R = strength * || P^T P^ - (C/d) I_d ||_F^2
        "auto":    "rows" when C <= d, else "columns".

    "rows" is the paper's form: the sum of squared cosines between distinct proxies
    (the diagonal of P^ P^T is 1), zero exactly when the proxies are orthonormal, which
    needs C <= d. When C > d it cannot reach zero: since trace(P^T P^) = C,

        || P^ P^T - I_C ||_F^2 = || P^T P^ - (C/d) I_d ||_F^2 + C (C - d) / d,

    so both forms differ by a constant and have the same gradient. The minimisers are
    the unit-norm tight frames (P^T P^ = (C/d) I_d: the proxies spread evenly over all
    d directions), where the mean squared off-diagonal cosine equals the Welch bound
    (C - d) / (d (C - 1)) and "rows" converges to C (C - d) / d, while "columns"
    reaches 0. The mode changes the reported value (zero at the optimum in "auto"),
    never the gradient or the optimisation.

    Normalisation (`normalization`): "none" (default) is the paper's sum; "size"
    divides by C^2, the size of the Gram matrix, making R (up to (C - 1) / C) `strength`
    times the mean squared cosine between distinct proxies: about strength / d for
    random proxies whatever C, so one strength means the same for 100 or 11,318
    classes. Converting: "size" with strength s equals "none" with s / C^2 (e.g.
    s = 10 with C = 136 classes is lambda = 5.4e-4 in the paper's units).

    Distribution: under a `tf.distribute` strategy with R replicas every replica
    evaluates the penalty on the (mirrored) weight and the optimizer SUMS gradients
    over replicas. Keras 3's TensorFlow trainer already divides every `model.losses`
    term by R (`TensorFlowTrainer._aggregate_additional_loss`), so the penalty, used
    as a weight regularizer or through `add_loss`, counts once per global step in
    `model.fit` and must not divide itself (tests/regularizers checks a 2-replica step
    against a 1-device step). A custom training loop that sums `model.losses` on every
    replica must apply the same 1/R itself.

    Computed in float32 whatever the weight's dtype.

    Args:
        strength: Non-negative weight lambda of the penalty.
        mode: "auto" (default), "rows" or "columns", see above.
        normalization: "none" (default, the paper's units) or "size" (divided by C^2).

    Shapes:
        (C, d) -> scalar float32.

    Example:

    >>> reg = SoftOrthogonal(strength=1.0)
    >>> round(float(reg(keras.ops.eye(3, 8))), 6)  # orthonormal rows
    0.0
    >>> # Two unit proxies at 60 degrees: 2 off-diagonal cosines of 0.5 -> 2 * 0.25.
    >>> p = keras.ops.convert_to_tensor([[1.0, 0.0], [0.5, 3 ** 0.5 / 2]])
    >>> round(float(reg(p)), 6), round(float(SoftOrthogonal(1.0, normalization="size")(p)), 6)
    (0.5, 0.125)
    """

    def __init__(self, strength, mode="auto", normalization="none"):
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            strength = None
        if strength is None or not strength >= 0.0:
            raise ValueError(
                "Expected `strength` to be a non-negative number. "
                f"Received: strength={strength!r}"
            )
        if mode not in _MODES:
            raise ValueError(
                f"Expected `mode` to be one of {', '.join(_MODES)}. Received: mode={mode!r}"
            )
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"Expected `normalization` to be one of {', '.join(NORMALIZATIONS)} (\"none\": "
                f"the paper's units). Received: normalization={normalization!r}"
            )
        self.strength = strength
        self.mode = mode
        self.normalization = normalization

    def resolved_mode(self, num_rows, dim):
        """"rows" or "columns" for a (num_rows, dim) matrix."""
        if self.mode != "auto":
            return self.mode
        return "rows" if num_rows <= dim else "columns"

    def __call__(self, x):
        if len(x.shape) != 2 or x.shape[0] is None or x.shape[1] is None:
            raise ValueError(
                "SoftOrthogonal expects a (C, d) matrix of row vectors with a known "
                f"shape. Received: shape={tuple(x.shape)}"
            )
        num_rows, dim = int(x.shape[0]), int(x.shape[1])
        p = ops.cast(x, "float32")
        p = p * ops.rsqrt(ops.maximum(ops.sum(ops.square(p), axis=1, keepdims=True),
                                      _NORM_EPSILON))
        if self.resolved_mode(num_rows, dim) == "rows":
            deviation = ops.matmul(p, ops.transpose(p)) - ops.eye(num_rows, dtype="float32")
        else:
            deviation = ops.matmul(ops.transpose(p), p) - (num_rows / dim) * ops.eye(
                dim, dtype="float32")
        scale = self.strength / (float(num_rows) ** 2 if self.normalization == "size" else 1.0)
        return ops.sum(ops.square(deviation)) * scale

    def get_config(self):
        return {"strength": self.strength, "mode": self.mode, "normalization": self.normalization}

    @classmethod
    def from_config(cls, config):
        # Penalties saved before `normalization` existed were divided by C^2.
        return cls(**{"normalization": "size", **config})
