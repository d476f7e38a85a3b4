"""Multi-size consistency: two branches' batch similarity matrices agree (docs/design.md 3.3)."""

import keras
from keras import ops

from kdml.losses._cross_replica import BatchLoss, all_gather


@keras.saving.register_keras_serializable(package="kdml")
class SimilarityConsistency(BatchLoss):
    """Mean squared difference of two embeddings' batch similarity matrices.

    For two embeddings of the same B images, E_1 (B, d_1) and E_2 (B, d_2) (e.g. two
    CRT branches of different size; docs/design.md 3.3, our reading of the CRT paper's
    multi-size consistency):

        S_b = E_b E_b^T  (B, B),    L = 1/B^2 sum_ij (S_1,ij - S_2,ij)^2

    d_1 and d_2 may differ; only the (B, B) matrices are compared. Both branches
    receive gradients (the loss is symmetric). Labels are not used.

    Distribution: with `gather_across_replicas=True` each replica all-gathers both
    embeddings and computes L over the GLOBAL batch; the scalar is divided by the
    number of replicas and gradients (which reach each replica's own rows through
    the gather) are summed, so a distributed step equals the single-device step on
    the concatenated batch.

    Args:
        split: where to split a single `y_pred` tensor (B, d_1 + d_2) into E_1 =
            y_pred[:, :split] and E_2 = y_pred[:, split:] (for use with
            `model.compile`); None when `y_pred` is passed as a pair (E_1, E_2).
        gather_across_replicas: See "Distribution". Default True.
        name: Loss name.
        **kwargs: Passed to `keras.losses.Loss`.

    Shapes:
        y_true: ignored (any tensor, e.g. the labels (B,)).
        y_pred: a pair ((B, d_1), (B, d_2)), or (B, d_1 + d_2) with `split`=d_1.
        Returns: a float32 scalar, computed in float32.

    Example:

    >>> e = keras.ops.convert_to_tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> float(SimilarityConsistency()(None, (e, e)))
    0.0

    S_1 = I against S_2 = all ones: two of the four entries differ by 1, so L = 2/4.

    >>> same = keras.ops.convert_to_tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> float(SimilarityConsistency()(None, (e, same)))
    0.5
    """

    def __init__(self, split=None, gather_across_replicas=True,
                 name="similarity_consistency", **kwargs):
        super().__init__(gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        if split is not None and (isinstance(split, bool) or not isinstance(split, int)
                                  or split < 1):
            raise ValueError(f"Expected `split` to be None or a positive int. Received: {split!r}")
        self.split = split

    def __call__(self, y_true, y_pred, sample_weight=None):
        if y_true is None:  # labels are not needed; Keras' Loss cannot convert None
            y_true = ops.zeros((1,), "float32")
        return super().__call__(y_true, y_pred, sample_weight)

    def call(self, y_true, y_pred):
        del y_true
        if isinstance(y_pred, (list, tuple)):
            if len(y_pred) != 2 or self.split is not None:
                raise ValueError(
                    "SimilarityConsistency takes y_pred=(E_1, E_2) with split=None, or one "
                    f"(B, d_1 + d_2) tensor with split=d_1. Received {len(y_pred)} tensors "
                    f"and split={self.split}.")
            first, second = y_pred
        else:
            if self.split is None or y_pred.shape[-1] is not None and y_pred.shape[-1] <= self.split:
                raise ValueError(
                    "A single y_pred tensor needs `split` = d_1 < its last dimension. "
                    f"Received: split={self.split}, y_pred shape {tuple(y_pred.shape)}. Fix: "
                    "construct SimilarityConsistency(split=d_1) or pass y_pred=(E_1, E_2).")
            first, second = y_pred[:, :self.split], y_pred[:, self.split:]
        first, second = ops.cast(first, "float32"), ops.cast(second, "float32")
        if self.gather_across_replicas:
            first, second = all_gather(first), all_gather(second)
        difference = (ops.matmul(first, ops.transpose(first))
                      - ops.matmul(second, ops.transpose(second)))  # (B, B)
        return ops.mean(ops.square(difference))

    def get_config(self):
        return {**super().get_config(), "split": self.split}
