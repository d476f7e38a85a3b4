"""PDDM loss: hard-quadruplet mining, double-header hinge and embedding hinge (docs/design.md 3.4)."""

import warnings

import keras
import tensorflow as tf
from keras import ops

from kdml.losses._cross_replica import BatchLoss

MINING_MODES = ("per_anchor", "single")
MINING_SCORES = ("unit", "cosine")
UNIT_LOSSES = ("all_pairs", "hardest")
HARDNESS = ("hardest", "semihard", "soft")
_FAR = 3.0e38  # stands in for +-inf in masked argmin/argmax (no gradient flows there)


def _take_pairs(matrix, rows, cols):
    """matrix (B, B), rows/cols (Q,) int32 -> (Q,) entries matrix[rows, cols]."""
    size = ops.shape(matrix)[1]
    return ops.take(ops.reshape(matrix, (-1,)), rows * size + cols)


def _cosine_matrix(embeddings):
    """(B, d) -> (B, B) cosine similarities (rows L2-normalised first)."""
    squared = ops.sum(ops.square(embeddings), axis=-1, keepdims=True)
    unit = embeddings * ops.rsqrt(ops.maximum(squared, 1e-12))
    return ops.matmul(unit, ops.transpose(unit))


def _squared_distances(embeddings, rows, cols):
    """(Q,) squared L2 distances ||f_rows - f_cols||^2 of the given row pairs."""
    diff = ops.take(embeddings, rows, axis=0) - ops.take(embeddings, cols, axis=0)
    return ops.sum(ops.square(diff), axis=-1)


def all_pairs_score_hinge(labels, scores, alpha):
    """Double-header hinge on every (positive, negative) pair of each anchor.

    For anchor i with positives P(i) (same label, j != i) and negatives N(i):

        E_m(i) = 2 / (|P(i)| |N(i)|) sum_{j in P(i)} sum_{k in N(i)} [alpha - S_ij + S_ik]_+

    The factor 2 keeps the scale of the mined double-header hinge (two hinges per
    positive pair): over the batch every positive pair is an anchor from both ends, so
    both heads are covered. Unlike the hinge on the mined hardest quadruplet, a constant
    S is not a minimum of this loss (its value alpha per hinge can be lowered by any
    score that ranks positives above negatives on average).

    Args:
        labels: (B,) int labels.
        scores: (B, B) float32 scores S.
        alpha: Score margin.

    Returns:
        (per_anchor, valid): (B,) float32 E_m(i) (0 where invalid) and a (B,) bool mask
        of anchors with at least one positive and one negative. Memory: one (B, B, B)
        float32 tensor (8 MiB at B = 128, 64 MiB at B = 256).
    """
    scores = ops.cast(scores, "float32")
    size = ops.shape(scores)[0]
    index = ops.arange(size, dtype="int32")
    same = ops.equal(labels[:, None], labels[None, :])
    positive = ops.cast(ops.logical_and(same, ops.not_equal(index[:, None], index[None, :])),
                        "float32")
    negative = ops.cast(ops.logical_not(same), "float32")
    # hinge[i, j, k] = [alpha - S_ij + S_ik]_+, weighted by positive[i, j] negative[i, k].
    hinge = ops.relu(alpha - scores[:, :, None] + scores[:, None, :])
    weight = positive[:, :, None] * negative[:, None, :]
    pairs = ops.sum(weight, axis=(1, 2))
    per_anchor = 2.0 * ops.divide_no_nan(ops.sum(hinge * weight, axis=(1, 2)), pairs)
    return per_anchor, pairs > 0


_LOW32 = 0xFFFFFFFF


def _mul32(x, constant):
    """(x * constant) mod 2^32 for int64 x, constant in [0, 2^32), without overflow."""
    low, high = tf.bitwise.bitwise_and(x, 0xFFFF), tf.bitwise.right_shift(x, 16)
    high_part = tf.bitwise.left_shift(tf.bitwise.bitwise_and(high * constant, 0xFFFF), 16)
    return tf.bitwise.bitwise_and(low * constant + high_part, _LOW32)


def _hash32(x):
    """Wellons' lowbias32 integer hash of int64 x in [0, 2^32) (exact integer ops)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = _mul32(x, 0x7FEB352D)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = _mul32(x, 0x846CA68B)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def _uniform(shape, seed):
    """Uniform (0, 1) float32 of `shape`, a counter-based hash of (seed (2,), element index).

    Exact integer arithmetic, so every device, replica and XLA draw the same numbers
    (TensorFlow's stateless Philox does not: XLA and the CPU kernel differ)."""
    seed = tf.bitwise.bitwise_and(ops.cast(seed, "int64"), _LOW32)
    run_key = _hash32(seed[0])
    draw_key = _hash32(tf.bitwise.bitwise_and(seed[1] + run_key, _LOW32))
    index = tf.range(tf.reduce_prod(shape), dtype=tf.int64)
    bits = _hash32(tf.bitwise.bitwise_xor(
        _hash32(tf.bitwise.bitwise_and(index + run_key, _LOW32)), draw_key))
    # The top 24 bits, centred: (m + 0.5) / 2^24 is exact in float32 and never 0 or 1.
    unit = (ops.cast(tf.bitwise.right_shift(bits, 8), "float32") + 0.5) * (2.0 ** -24)
    return ops.reshape(unit, shape)


def _gumbel(shape, seed):
    """Standard Gumbel noise -log(-log u), u = `_uniform(shape, seed)`."""
    return -ops.log(-ops.log(_uniform(shape, seed)))


def _choose_negatives(scores, negative, rows, positive_scores, hardness, temperature, noise):
    """The negative of each quadruplet among row `rows[q]`'s negatives: (Q,) int32.

    hardest: argmax S. semihard: argmax S over the negatives with S < positive_scores[q]
    (strictly), the hardest when there is none. soft: argmax (S / temperature + Gumbel
    noise), a draw with P(k) = softmax_k(S_rk / temperature) over the negatives.
    """
    row_scores = ops.take(scores, rows, axis=0)  # (Q, B)
    row_negative = ops.take(negative, rows, axis=0)
    hardest = ops.cast(ops.argmax(ops.where(row_negative, row_scores, -_FAR), axis=1), "int32")
    if hardness == "hardest":
        return hardest
    if hardness == "semihard":
        below = ops.logical_and(row_negative, row_scores < positive_scores[:, None])
        semihard = ops.cast(ops.argmax(ops.where(below, row_scores, -_FAR), axis=1), "int32")
        return ops.where(ops.any(below, axis=1), semihard, hardest)
    keys = row_scores / temperature + noise
    return ops.cast(ops.argmax(ops.where(row_negative, keys, -_FAR), axis=1), "int32")


def mine_quadruplets(labels, scores, mode="per_anchor", hardness="hardest", temperature=0.1,
                     seed=None):
    """Quadruplets (i, j, k, l) from a (B, B) PDDM score matrix, in-graph.

    Positive pair: `mode="single"` (the paper, Sec. 3.2) takes the positive pair (i, j)
    with the lowest score, one quadruplet (Q = 1); `mode="per_anchor"` takes, for every
    anchor i, j = its positive with the lowest score (Q = B). Negatives k (of i) and
    l (of j), `hardness` (docs/design.md 3.4, "Mining hardness"):

    - "hardest" (the paper): k = argmax_{y_k != y_i} S_ik, l = argmax_{y_l != y_j} S_jl.
    - "semihard" (FaceNet's rule on scores): k = argmax S_ik over the negatives with
      S_ik < S_ij (strictly below the positive pair's score, so the ranking holds but
      the hinge may still be active), l likewise with S_jl < S_ij; the hardest negative
      when no negative is below.
    - "soft": k drawn with P(k) = exp(S_ik / temperature) / sum_{y_k' != y_i}
      exp(S_ik' / temperature), l likewise from row j, independently per quadruplet
      (Gumbel-max, the noise a counter-based integer hash keyed by `seed`: the same
      seed gives the same draws on every device, replica and under XLA).

    Ties go to the lowest index (row-major for the single pair). Comparisons only: no
    gradient. Labels of j equal those of i on valid rows, so N(j) = N(i).

    Args:
        labels: (B,) int32 labels.
        scores: (B, B) float32 scores S (higher = more similar).
        mode: "per_anchor" or "single".
        hardness: "hardest", "semihard" or "soft".
        temperature: tau > 0 of "soft".
        seed: (2,) int32/int64 tensor, the RNG key of "soft" (required there).

    Returns:
        (i, j, k, l, valid): four (Q,) int32 index vectors and a (Q,) bool mask of
        quadruplets that exist (a positive and a negative are both available).
    """
    if mode not in MINING_MODES:
        raise ValueError(f"Expected `mode` in {MINING_MODES}. Received: mode={mode!r}")
    if hardness not in HARDNESS:
        raise ValueError(f"Expected `hardness` in {HARDNESS}. Received: hardness={hardness!r}")
    if hardness == "soft" and seed is None:
        raise ValueError("hardness='soft' draws negatives: pass `seed`, a (2,) int tensor "
                         "(e.g. [run seed, step]). Received: seed=None")
    if hardness == "soft" and not temperature > 0:
        raise ValueError(f"Expected `temperature` > 0. Received: temperature={temperature!r}")
    scores = ops.stop_gradient(ops.cast(scores, "float32"))
    size = ops.shape(scores)[0]
    index = ops.arange(size, dtype="int32")
    same = ops.equal(labels[:, None], labels[None, :])
    positive = ops.logical_and(same, ops.not_equal(index[:, None], index[None, :]))
    negative = ops.logical_not(same)
    neg_scores = ops.where(negative, scores, -_FAR)
    if mode == "single":
        flat = ops.argmin(ops.reshape(ops.where(positive, scores, _FAR), (-1,)))
        flat = ops.cast(flat, "int32")
        i = ops.reshape(flat // size, (1,))
        j = ops.reshape(flat % size, (1,))
        valid = ops.reshape(
            ops.logical_and(ops.any(positive), ops.any(ops.take(negative, i, axis=0))), (1,)
        )
    else:
        i = index
        j = ops.cast(ops.argmin(ops.where(positive, scores, _FAR), axis=1), "int32")
        valid = ops.logical_and(ops.any(positive, axis=1), ops.any(negative, axis=1))
    if hardness == "hardest":  # the paper's rule, as it always was computed
        k = ops.cast(ops.argmax(ops.take(neg_scores, i, axis=0), axis=1), "int32")
        # y_j = y_i on valid rows, so j's negatives are i's negatives, scored from j.
        l = ops.cast(ops.argmax(ops.take(neg_scores, j, axis=0), axis=1), "int32")  # noqa: E741
        return i, j, k, l, valid
    s_ij = _take_pairs(scores, i, j)
    noise_k = noise_l = None
    if hardness == "soft":
        noise_k, noise_l = ops.unstack(
            _gumbel((2, ops.shape(i)[0], size), ops.cast(seed, "int64")), axis=0)
    k = _choose_negatives(scores, negative, i, s_ij, hardness, temperature, noise_k)
    l = _choose_negatives(scores, negative, j, s_ij, hardness, temperature, noise_l)  # noqa: E741
    return i, j, k, l, valid


@keras.saving.register_keras_serializable(package="kdml")
class PDDMLoss(BatchLoss):
    """PDDM objective: double-header hinge on unit scores + embedding hinge.

    Huang, Loy, Tang, "Local Similarity-Aware Deep Feature Embedding", NIPS 2016,
    Eq. (3)-(5) (docs/design.md 3.4). For each mined hard quadruplet (i, j, k, l)
    (`mine_quadruplets`: positive pair (i, j), hardest negatives k of i and l of j by
    the unit's score S):

        E_m = [alpha - S_ij + S_ik]_+ + [alpha - S_ij + S_jl]_+      (double-header hinge)
        E_e = [beta + D_ij - D_ik]_+ + [beta + D_ij - D_jl]_+        (D = squared L2)
        L   = mean over valid quadruplets of (E_m + lambda E_e)        (unit_loss="hardest")
        L   = mean over anchors of E_m^all + lambda mean over quadruplets of E_e
                                                                    (unit_loss="all_pairs")

    E_e is computed on the SAME quadruplets, so the unit's hard-quadruplet mining
    drives the embedding loss (the paper's Sec. 3.2).

    `unit_loss` says which pairs train the unit. `"hardest"` is the paper's E_m above,
    on the mined quadruplet. It has a constant score as a minimum: with the quadruplet
    mined by S itself, each hinge is `[alpha - min_positive S + max_negative S]_+`, at
    least alpha unless S separates the batch perfectly, and exactly alpha for a
    constant S; kdml's units trained that way collapse to a constant (docs/methods.md).
    `"all_pairs"` (the default) averages the double-header hinge over every
    (positive, negative) pair of each anchor (`all_pairs_score_hinge`), which a
    constant S does not minimise; the mined quadruplets still drive E_e. `mining_score="cosine"` is the
    ablation: the quadruplets are mined with the cosine similarity of the embeddings
    instead of S, everything else (E_m on S, E_e, the weights) unchanged.

    `mining="single"` is the paper's one quadruplet per batch; `"per_anchor"` (the
    default, an improvement docs/design.md allows) mines one per anchor, using every image.

    `hardness` says which negatives the mining takes (`mine_quadruplets`): `"hardest"`
    (the paper's, the default), `"semihard"` (the hardest negative scored strictly below
    the positive pair, FaceNet's rule) or `"soft"` (drawn with probability proportional
    to exp(S / mining_temperature); the draws are keyed by (`seed`, `draws`), so a run
    is reproducible and every replica draws the same quadruplets from the global batch).

    Warm-up: `mine_by_unit` (a non-trainable bool variable, True at construction) is
    read inside the compiled step; while it is False a `mining_score="unit"` loss mines
    by cosine. `PDDMMiningSchedule` sets it at each epoch begin
    (`--pddm_mining_warmup_epochs`) and saves it, with `draws`, in checkpoints.

    Input: `y_pred` is `kdml.layers.PDDMScoreMatrix`'s output, row i = [f_i, S_i,:]
    (embeddings then the scores against the whole batch), so the model holds the unit
    and the loss sees embeddings and scores in one Keras output. The loss all-gathers
    labels and rows across replicas (the score layer gathers the columns), so the
    mining pool is the global batch; the scalar is divided by the replica count
    (`BatchLoss`), making one distributed step equal to the single-device step on the
    concatenated batch.

    A batch with no positive pair or no negative has no quadruplet: the loss is exactly
    0 with zero, finite gradients; `invalid_batches` (a non-trainable counter) counts
    such steps, eager calls warn at once, and `PDDMMiningMonitor` logs a warning from
    training.

    Args:
        alpha: Score margin of the double-header hinge (paper alpha, default 0.5).
        beta: Squared-distance margin of the embedding hinge (paper beta, default 1.0).
        lambda_: Weight of the embedding loss (paper lambda, default 0.5).
        mining: "per_anchor" (default) or "single".
        mining_score: "unit" (default, the paper: mine by S) or "cosine" (the ablation).
        unit_loss: "all_pairs" (default) or "hardest" (the paper's E_m on the mined
            quadruplet, which collapses the unit), see above.
        hardness: "hardest" (default, the paper), "semihard" or "soft", see above.
        mining_temperature: tau > 0 of `hardness="soft"`.
        seed: int, the first half of the RNG key of `hardness="soft"`.
        gather_across_replicas: Must be True (the score layer always gathers).
        name, **kwargs: As `keras.losses.Loss`.

    Shapes:
        y_true: int labels (B,) or (B, 1). y_pred: (B, d + B) float.
        Returns: a float32 scalar. `sample_weight` is not supported.

    Example:

    >>> emb = keras.ops.convert_to_tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    >>> scores = keras.ops.matmul(emb, keras.ops.transpose(emb))  # stand-in for S
    >>> y_pred = keras.ops.concatenate([emb, scores], axis=1)
    >>> # (i, j, k, l) = (0, 1, 2, 2): E_m = 0.7 + 0.86, E_e = 1.4 + 1.72
    >>> round(float(PDDMLoss(mining="single", unit_loss="hardest")([0, 0, 1], y_pred)), 4)
    3.12
    >>> # All pairs: anchors 0 and 1 each have one (positive, negative) pair,
    >>> # E_m^all = (2 * 0.7 + 2 * 0.86) / 2, the same here; E_e as above.
    >>> round(float(PDDMLoss(mining="single")([0, 0, 1], y_pred)), 4)
    3.12
    >>> # The ablation mines by cosine; here S is the cosine, so the same quadruplet.
    >>> round(float(PDDMLoss(mining="single", mining_score="cosine",
    ...                      unit_loss="hardest")([0, 0, 1], y_pred)), 4)
    3.12
    """

    def __init__(
        self,
        alpha=0.5,
        beta=1.0,
        lambda_=0.5,
        mining="per_anchor",
        mining_score="unit",
        unit_loss="all_pairs",
        hardness="hardest",
        mining_temperature=0.1,
        seed=0,
        gather_across_replicas=True,
        name="pddm_loss",
        **kwargs,
    ):
        super().__init__(gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        if not gather_across_replicas:
            raise ValueError(
                "PDDMLoss needs gather_across_replicas=True: kdml.layers.PDDMScoreMatrix "
                "scores each row against the global batch, so the rows must be gathered "
                "too. Received: gather_across_replicas=False."
            )
        for arg, value in (("alpha", alpha), ("beta", beta), ("lambda_", lambda_)):
            if not value >= 0:
                raise ValueError(f"Expected `{arg}` >= 0. Received: {arg}={value!r}")
        if mining not in MINING_MODES:
            raise ValueError(
                f"Expected `mining` in {MINING_MODES}. Received: mining={mining!r}"
            )
        if mining_score not in MINING_SCORES:
            raise ValueError(
                f"Expected `mining_score` in {MINING_SCORES} (\"unit\" mines with the PDDM "
                f"score, as the paper). Received: mining_score={mining_score!r}"
            )
        if unit_loss not in UNIT_LOSSES:
            raise ValueError(
                f"Expected `unit_loss` in {UNIT_LOSSES} (\"hardest\" is the paper's hinge on "
                f"the mined quadruplet). Received: unit_loss={unit_loss!r}"
            )
        if hardness not in HARDNESS:
            raise ValueError(
                f"Expected `hardness` in {HARDNESS} (\"hardest\" is the paper's mining). "
                f"Received: hardness={hardness!r}")
        if not mining_temperature > 0:
            raise ValueError("Expected `mining_temperature` > 0 (the softmax temperature of "
                             f"hardness='soft'). Received: mining_temperature={mining_temperature!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Expected `seed` to be an int. Received: seed={seed!r}")
        self.hardness = hardness
        self.mining_temperature = float(mining_temperature)
        self.seed = seed
        self.mining_score = mining_score
        self.unit_loss = unit_loss
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.lambda_ = float(lambda_)
        self.mining = mining
        # Steps without a quadruplet. ONLY_FIRST_REPLICA: every replica sees the same
        # global batch, so a step counts once.
        self.invalid_batches = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="pddm_invalid_batches",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        # Calls that drew soft negatives: with `seed`, the key of the next draw.
        self.draws = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="pddm_draws",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        # False during the mining warm-up (PDDMMiningSchedule): mine by cosine.
        self.mine_by_unit = tf.Variable(
            True, dtype=tf.bool, trainable=False, name="pddm_mine_by_unit",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    def call(self, y_true, y_pred):
        labels, values = self._maybe_gather(y_true, y_pred)  # (B,), (B, d + B)
        size = values.shape[0] if values.shape[0] is not None else ops.shape(values)[0]
        width = values.shape[1] if values.shape[1] is not None else ops.shape(values)[1]
        if isinstance(size, int) and isinstance(width, int) and width <= size:
            raise ValueError(
                "PDDMLoss expects y_pred (B, d + B) = [embeddings | PDDM score matrix], "
                f"the output of kdml.layers.PDDMScoreMatrix. Received: shape={values.shape}"
            )
        dim = width - size
        embeddings, scores = values[:, :dim], values[:, dim:]

        if self.mining_score == "cosine":
            mining_scores = _cosine_matrix(embeddings)
        else:  # the unit's scores, or the cosine during the warm-up
            mining_scores = ops.where(self.mine_by_unit.value(), scores,
                                      _cosine_matrix(embeddings))
        seed = None
        if self.hardness == "soft":
            draw = self.draws.value()
            seed = ops.stack([ops.convert_to_tensor(self.seed, "int64"), draw])
        i, j, k, l, valid = mine_quadruplets(  # noqa: E741
            labels, mining_scores, self.mining, self.hardness, self.mining_temperature, seed)
        if self.hardness == "soft":
            self.draws.assign_add(ops.convert_to_tensor(1, "int64"))
        s_ij = _take_pairs(scores, i, j)
        s_ik = _take_pairs(scores, i, k)
        s_jl = _take_pairs(scores, j, l)
        d_ij = _squared_distances(embeddings, i, j)
        d_ik = _squared_distances(embeddings, i, k)
        d_jl = _squared_distances(embeddings, j, l)
        embedding_hinge = ops.relu(self.beta + d_ij - d_ik) + ops.relu(self.beta + d_ij - d_jl)
        if self.unit_loss == "hardest":
            score_hinge = (ops.relu(self.alpha - s_ij + s_ik)
                           + ops.relu(self.alpha - s_ij + s_jl))
        else:
            # Per anchor; in "single" mode E_m still averages over every valid anchor
            # (sum over rows / Q with Q = 1 would weigh it B times), see below.
            score_hinge, anchor_valid = all_pairs_score_hinge(labels, scores, self.alpha)
        count = ops.sum(ops.cast(valid, "float32"))
        per_quadruplet = ops.where(valid, self.lambda_ * embedding_hinge, 0.0)
        if self.unit_loss == "hardest":
            per_quadruplet = per_quadruplet + ops.where(valid, score_hinge, 0.0)
            loss = ops.divide_no_nan(ops.sum(per_quadruplet), count)
        else:
            unit_term = ops.divide_no_nan(
                ops.sum(ops.where(anchor_valid, score_hinge, 0.0)),
                ops.sum(ops.cast(anchor_valid, "float32")))
            loss = ops.divide_no_nan(ops.sum(per_quadruplet), count) + unit_term

        none_valid = ops.logical_not(ops.any(valid))
        self.invalid_batches.assign_add(ops.cast(none_valid, "int64"))
        if tf.executing_eagerly() and bool(none_valid):
            warnings.warn(_INVALID_BATCH_MESSAGE, RuntimeWarning, stacklevel=2)
        return loss

    def get_config(self):
        config = super().get_config()
        config.update(
            {"alpha": self.alpha, "beta": self.beta, "lambda_": self.lambda_,
             "mining": self.mining, "mining_score": self.mining_score,
             "unit_loss": self.unit_loss, "hardness": self.hardness,
             "mining_temperature": self.mining_temperature, "seed": self.seed}
        )
        return config


_INVALID_BATCH_MESSAGE = (
    "PDDMLoss: a batch has no positive pair or no negative, so no quadruplet: its "
    "loss is 0. Fix: sample at least 2 classes with at least 2 images each per batch "
    "(--classes_per_batch >= 2, --images_per_class >= 2)."
)


class PDDMMiningMonitor(keras.callbacks.Callback):
    """Logs a warning at each epoch end in which `loss` met batches with no quadruplet.

    Reads `PDDMLoss.invalid_batches` host-side (no `tf.print` in the step) and adds
    `pddm_invalid_batches` (the count of that epoch) to the epoch logs.
    """

    def __init__(self, loss):
        super().__init__()
        self.loss = loss
        self._seen = 0

    def on_train_begin(self, logs=None):
        self._seen = int(self.loss.invalid_batches.numpy())

    def on_epoch_end(self, epoch, logs=None):
        from absl import logging

        total = int(self.loss.invalid_batches.numpy())
        new, self._seen = total - self._seen, total
        if logs is not None:
            logs["pddm_invalid_batches"] = float(new)
        if new:
            logging.warning("epoch %d: %d batch(es) gave zero loss. %s", epoch + 1, new,
                            _INVALID_BATCH_MESSAGE)


class PDDMMiningSchedule(keras.callbacks.Callback):
    """The mining warm-up: quadruplets mined by cosine for the first `warmup_epochs`
    epochs, by the unit after (docs/design.md 3.4, "Mining hardness").

    At each epoch begin sets `loss.mine_by_unit` to `epoch >= warmup_epochs` (read by
    the compiled step: no retrace) and, with a warm-up, logs `pddm_mine_by_unit` (1 or
    0) with the epoch. Keras' `save_weights` does not hold a loss's variables, so
    `checkpoint_state()` (the runner writes it into each checkpoint's state.json) and
    `restore_checkpoint_state(state)` (on resume) carry `mine_by_unit` and the soft
    draws' counter `draws`: a resumed run continues in the same mode and with the same
    draws as the uninterrupted one.
    """

    def __init__(self, loss, warmup_epochs=0):
        super().__init__()
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError("Expected --pddm_mining_warmup_epochs to be an int >= 0. "
                             f"Received: --pddm_mining_warmup_epochs={warmup_epochs!r}")
        if warmup_epochs and loss.mining_score != "unit":
            raise ValueError(
                f"--pddm_mining_warmup_epochs={warmup_epochs} switches from cosine to unit "
                f"mining: it needs --pddm_mining_score=unit. Received: {loss.mining_score!r}")
        self.loss = loss
        self.warmup_epochs = warmup_epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.loss.mine_by_unit.assign(epoch >= self.warmup_epochs)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.warmup_epochs:
            logs["pddm_mine_by_unit"] = float(bool(self.loss.mine_by_unit.numpy()))

    def checkpoint_state(self):
        return {"pddm_mine_by_unit": bool(self.loss.mine_by_unit.numpy()),
                "pddm_draws": int(self.loss.draws.numpy())}

    def restore_checkpoint_state(self, state):
        if "pddm_mine_by_unit" in state:
            self.loss.mine_by_unit.assign(bool(state["pddm_mine_by_unit"]))
        if "pddm_draws" in state:
            self.loss.draws.assign(int(state["pddm_draws"]))
