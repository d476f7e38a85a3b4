"""`MultiBranchLoss`: a base loss per branch plus consistency between branches (docs/design.md 3.3)."""

import keras
from keras import ops

from kdml.losses.similarity_consistency import SimilarityConsistency


def _positive_ints(name, values):
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"Expected `{name}` to be a non-empty list of positive ints. "
                         f"Received: {name}={values!r}")
    return values


@keras.saving.register_keras_serializable(package="kdml")
class MultiBranchLoss(keras.losses.Loss):
    """The multi-size CRT objective on one packed output tensor.

    Branch 0 is the main branch. With n branches, `y_pred` packs what each branch's
    base loss consumes, x_b (its embedding, or its proxy similarities), then the
    branches' L2-normalised embeddings e_b:

        y_pred = [x_0 | ... | x_{n-1} | e_0 | ... | e_{n-1}]      (B, sum(input_dims) + sum(embedding_dims))

        L = sum_b base_loss_b(y, x_b) + consistency_weight * sum_{b >= 1} consistency(e_0, e_b)

    One packed tensor keeps `model.fit` single-output (one `y`), so the training loop
    needs nothing special. Each term is a kdml batch loss that gathers across replicas
    and divides by the replica count itself, so the sum needs no further scaling.

    Args:
        base_losses: n losses, one per branch (each its own instance, e.g.
            `MultiSimilarityLoss()` or `ProxyAnchorLoss()`), called as loss(y, x_b).
        input_dims: n ints, the sizes of x_b.
        embedding_dims: n ints, the sizes of e_b.
        consistency_weight: float >= 0; 0 drops the consistency terms.
        consistency: the loss on a pair (e_0, e_b); default `SimilarityConsistency()`.
        name: Loss name.

    Shapes:
        y_true: int labels (B,) or (B, 1).  y_pred: (B, D) as above.  Returns a float32 scalar.

    Example: two Proxy Anchor branches (alpha = 1, delta = 0) on zero similarities
    give 2 log 2 each (see `ProxyAnchorLoss`), and embeddings whose similarity
    matrices are I and all-ones add SimilarityConsistency = 0.5:

    >>> pa = lambda: kdml.losses.ProxyAnchorLoss(alpha=1.0, margin=0.0)
    >>> loss = MultiBranchLoss([pa(), pa()], input_dims=[2, 2], embedding_dims=[2, 2])
    >>> x = np.zeros((2, 2), "float32")
    >>> e0, e1 = np.eye(2, dtype="float32"), np.array([[1.0, 0.0], [1.0, 0.0]], "float32")
    >>> y_pred = np.concatenate([x, x, e0, e1], axis=1)  # (B, 2 + 2 + 2 + 2)
    >>> round(float(loss([0, 1], y_pred)), 6)  # 4 log 2 + 0.5
    3.272589
    """

    def __init__(self, base_losses, input_dims, embedding_dims, consistency_weight=1.0,
                 consistency=None, name="multi_branch_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.base_losses = [keras.losses.get(loss) if not isinstance(loss, keras.losses.Loss)
                            else loss for loss in base_losses]
        self.input_dims = _positive_ints("input_dims", input_dims)
        self.embedding_dims = _positive_ints("embedding_dims", embedding_dims)
        if not len(self.base_losses) == len(self.input_dims) == len(self.embedding_dims):
            raise ValueError(
                "`base_losses`, `input_dims` and `embedding_dims` need one entry per branch. "
                f"Received lengths {len(self.base_losses)}, {len(self.input_dims)}, "
                f"{len(self.embedding_dims)}.")
        if not float(consistency_weight) >= 0:
            raise ValueError(f"Expected `consistency_weight` >= 0. Received: {consistency_weight!r}")
        self.consistency_weight = float(consistency_weight)
        self.consistency = consistency if consistency is not None else SimilarityConsistency()

    def split(self, y_pred):
        """(B, D) -> ([x_0, ...], [e_0, ...])."""
        expected = sum(self.input_dims) + sum(self.embedding_dims)
        if y_pred.shape[-1] is not None and y_pred.shape[-1] != expected:
            raise ValueError(
                f"MultiBranchLoss expects y_pred with {expected} columns (inputs {self.input_dims}"
                f" + embeddings {self.embedding_dims}). Received shape {tuple(y_pred.shape)}.")
        parts, start = [], 0
        for size in self.input_dims + self.embedding_dims:
            parts.append(y_pred[:, start:start + size])
            start += size
        n = len(self.input_dims)
        return parts[:n], parts[n:]

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(
                "MultiBranchLoss is a batch-level loss and does not support per-sample "
                "weights. Received: sample_weight is not None. Fix: drop `sample_weight`.")
        return super().__call__(y_true, y_pred)

    def call(self, y_true, y_pred):
        inputs, embeddings = self.split(y_pred)
        total = ops.convert_to_tensor(0.0, "float32")
        for loss, x in zip(self.base_losses, inputs):
            total = total + ops.cast(loss(y_true, x), "float32")
        if self.consistency_weight > 0:
            for other in embeddings[1:]:
                total = total + self.consistency_weight * ops.cast(
                    self.consistency(y_true, (embeddings[0], other)), "float32")
        return total

    def get_config(self):
        return {
            **super().get_config(),
            "base_losses": [keras.saving.serialize_keras_object(l) for l in self.base_losses],
            "input_dims": self.input_dims,
            "embedding_dims": self.embedding_dims,
            "consistency_weight": self.consistency_weight,
            "consistency": keras.saving.serialize_keras_object(self.consistency),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base_losses"] = [keras.saving.deserialize_keras_object(l)
                                 for l in config["base_losses"]]
        config["consistency"] = keras.saving.deserialize_keras_object(config["consistency"])
        return cls(**config)
