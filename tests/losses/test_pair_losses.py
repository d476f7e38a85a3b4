"""TripletMarginLoss, ContrastiveLoss, CircleLoss, SupConLoss and NTXentLoss: hand-worked
values, the NumPy loops of the papers' formulas on random batches, finite differences,
invariances, edge cases, errors, and a MirroredStrategy step equal to one device's.

The serialization / mixed-precision contract is in tests/test_serialization_contract.py
and the agreement with pytorch-metric-learning in tests/losses/test_pml_agreement.py.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.losses import CircleLoss, ContrastiveLoss, NTXentLoss, SupConLoss, TripletMarginLoss
from tests.helpers import numerical_gradient, weights_after_one_step
from tests.losses import pair_references as ref

# (class, kwargs) covering every option; the NumPy reference takes the same kwargs.
SETTINGS = [
    (TripletMarginLoss, {}),
    (TripletMarginLoss, dict(margin=0.4, mining="hard")),
    (TripletMarginLoss, dict(margin=0.4, mining="semihard", distance="squared_euclidean")),
    (TripletMarginLoss, dict(margin=0.2, mining="easy_positive", distance="cosine")),
    (TripletMarginLoss, dict(margin=1.0, normalize_embeddings=False)),
    (ContrastiveLoss, {}),
    (ContrastiveLoss, dict(pos_margin=0.9, neg_margin=0.2, distance="cosine")),
    (ContrastiveLoss, dict(pos_margin=0.1, neg_margin=1.6, distance="squared_euclidean")),
    (CircleLoss, {}),
    (CircleLoss, dict(m=0.25, gamma=16.0)),
    (SupConLoss, {}),
    (SupConLoss, dict(temperature=0.5, normalize_embeddings=False)),
    (NTXentLoss, {}),
    (NTXentLoss, dict(temperature=0.3)),
]


def _id(setting):
    cls, kwargs = setting
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in sorted(kwargs.items()))


def _reference(cls, kwargs, labels, emb):
    return ref.REFERENCES[cls.__name__](np.asarray(labels), emb, **kwargs)


def _loss_and_grad(loss_fn, labels, emb, dtype="float32"):
    emb = tf.constant(emb, dtype=dtype)
    with tf.GradientTape() as tape:
        tape.watch(emb)
        value = loss_fn(tf.constant(labels), emb)
    return value, tape.gradient(value, emb)


# --- hand-worked values -------------------------------------------------------------

_LINE = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.4], [1.0, 3.0]], "float32")  # y = 0, 1, .4, 3
_LINE_LABELS = np.array([0, 0, 1, 1])


@pytest.mark.parametrize("mining, expected", [
    # Distances along the line, margin 1 (worked in the comments):
    # all: (a, p, n) = (0,1,2) 1.6, (1,0,2) 1.4, (2,3,0) 3.2, (2,3,1) 3.0, (3,2,0) 0.6,
    #      (3,2,1) 1.6, the other two <= 0: mean 11.4 / 6 = 1.9
    ("all", 1.9),
    # hard: per anchor farthest positive, nearest negative: 1.6, 1.4, 3.2, 1.6 -> 1.95
    ("hard", 1.95),
    # semihard: only D(a, n) > D(a, p): (0,1,3) -1, (1,0,3) 0, (3,2,0) 0.6 -> 0.6
    ("semihard", 0.6),
    # easy_positive: one positive per anchor here, so the same triplets as hard
    ("easy_positive", 1.95),
])
def test_triplet_hand_worked(mining, expected):
    loss = TripletMarginLoss(margin=1.0, mining=mining, normalize_embeddings=False)
    np.testing.assert_allclose(float(loss(_LINE_LABELS, _LINE)), expected, rtol=1e-5)


def test_triplet_cosine_and_squared_hand_worked():
    # Unit vectors e0 = (1, 0), e1 = (0.6, 0.8), e2 = (0.8, 0.6); labels [0, 0, 1].
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]], "float32")
    labels = np.array([0, 0, 1])
    # cosine, margin 0.1: (0,1,2): 0.8 - 0.6 + 0.1 = 0.3; (1,0,2): 0.96 - 0.6 + 0.1 = 0.46
    got = TripletMarginLoss(margin=0.1, distance="cosine")(labels, emb)
    np.testing.assert_allclose(float(got), (0.3 + 0.46) / 2, rtol=1e-5)
    # squared Euclidean = 2 - 2 cos: (0,1,2): 0.8 - 0.4 + 0.1 = 0.5; (1,0,2): 0.8 - 0.08 + 0.1
    got = TripletMarginLoss(margin=0.1, distance="squared_euclidean")(labels, emb)
    np.testing.assert_allclose(float(got), (0.5 + 0.82) / 2, rtol=1e-5)


def test_contrastive_hand_worked():
    # Corners of a 0.8 x 0.6 rectangle: positives at 0.6, negatives at 0.8 and 1.0.
    emb = np.array([[0.0, 0.0], [0.0, 0.6], [0.8, 0.0], [0.8, 0.6]], "float32")
    labels = np.array([0, 0, 1, 1])
    loss = ContrastiveLoss(normalize_embeddings=False)
    # positives: 0.6 each; negatives: 1 - 0.8 = 0.2 (twice each way), 1 - 1 = 0 (dropped)
    np.testing.assert_allclose(float(loss(labels, emb)), 0.6 + 0.2, rtol=1e-5)
    loss = ContrastiveLoss(pos_margin=0.5, neg_margin=0.9, normalize_embeddings=False)
    np.testing.assert_allclose(float(loss(labels, emb)), 0.1 + 0.1, rtol=1e-5)
    # cosine: orthogonal vectors, positives 1 - 0 = 1, negatives 0 - 0 = 0 (none > 0).
    cosine = ContrastiveLoss(pos_margin=1.0, neg_margin=0.0, distance="cosine")
    np.testing.assert_allclose(float(cosine(np.array([0, 0, 1]), np.eye(3, dtype="float32"))),
                               1.0, rtol=1e-6)


def test_circle_hand_worked():
    # Orthogonal rows, labels [0, 0, 1]: anchors 0 and 1 have s_p = s_n = 0.
    # m = 0.25, gamma = 1: logit_p = -1.25 * (0 - 0.75) = 0.9375, logit_n = 0.25 * (0 - 0.25)
    expected = math.log1p(math.exp(0.9375 - 0.0625))
    got = CircleLoss(m=0.25, gamma=1.0)(np.array([0, 0, 1]), np.eye(3, dtype="float32"))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # Two positives at s = 0 -> logsumexp adds log 2 to the positive part.
    got = CircleLoss(m=0.25, gamma=1.0)(np.array([0, 0, 0, 1]), np.eye(4, dtype="float32"))
    np.testing.assert_allclose(float(got), math.log1p(2 * math.exp(0.875)), rtol=1e-6)


def test_supcon_and_ntxent_hand_worked():
    # One positive per anchor: both are -log softmax of the positive among {p, n}.
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]], "float32")
    labels = np.array([0, 0, 1])
    # tau = 0.5: anchor 0: s_p = 0.6, s_n = 0.8; anchor 1: s_p = 0.6, s_n = 0.96
    expected = (math.log1p(math.exp(0.4)) + math.log1p(math.exp(0.72))) / 2
    for cls in (SupConLoss, NTXentLoss):
        np.testing.assert_allclose(float(cls(temperature=0.5)(labels, emb)), expected, rtol=1e-5)
    # Three positives of one class, one negative, all orthogonal, tau = 1: SupCon's
    # denominator holds both other positives (log 3), NT-Xent's only p and the negative.
    eye = np.eye(4, dtype="float32")
    np.testing.assert_allclose(float(SupConLoss(temperature=1.0)([0, 0, 0, 1], eye)),
                               math.log(3), rtol=1e-6)
    np.testing.assert_allclose(float(NTXentLoss(temperature=1.0)([0, 0, 0, 1], eye)),
                               math.log(2), rtol=1e-6)


# --- the NumPy loops, finite differences, invariances ----------------------------------


@pytest.mark.parametrize("setting", SETTINGS, ids=_id)
def test_matches_the_numpy_loop_on_random_batches(setting):
    cls, kwargs = setting
    rng = np.random.default_rng(7)
    for labels in ([0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 1, 1, 1, 1, 5], [3, 1, 3, 1, 3, 1, 7, 7]):
        emb = rng.normal(size=(8, 5)).astype("float32")
        got = float(cls(**kwargs)(np.array(labels), emb))
        expected = _reference(cls, kwargs, labels, emb.astype("float64"))
        assert expected > 0
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("setting", SETTINGS, ids=_id)
def test_gradient_matches_central_finite_differences(setting):
    cls, kwargs = setting
    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 0, 1, 1, 2])
    emb = rng.normal(size=(6, 3))
    _, grad = _loss_and_grad(cls(**kwargs), labels, emb)
    if cls is CircleLoss:  # its pair weights are constants of the gradient (stop_gradient)
        kwargs = dict(kwargs, weights_at=emb)
    numeric = numerical_gradient(lambda e: _reference(cls, kwargs, labels, e), emb)
    assert np.abs(numeric).max() > 1e-3
    np.testing.assert_allclose(grad.numpy(), numeric, rtol=1e-3, atol=1e-4 * np.abs(numeric).max())


@pytest.mark.parametrize("setting", SETTINGS, ids=_id)
def test_invariant_to_permuting_the_batch(setting):
    cls, kwargs = setting
    rng = np.random.default_rng(8)
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3])
    emb = rng.normal(size=(8, 4)).astype("float32")
    perm = rng.permutation(8)
    loss = cls(**kwargs)
    original = float(loss(labels, emb))
    np.testing.assert_allclose(float(loss(labels[perm], emb[perm])), original, rtol=1e-5)


@pytest.mark.parametrize("cls", [TripletMarginLoss, ContrastiveLoss, CircleLoss, SupConLoss,
                                 NTXentLoss], ids=lambda c: c.__name__)
def test_a_batch_without_positive_pairs_is_finite_with_a_finite_gradient(cls):
    emb = np.random.default_rng(0).normal(size=(5, 3))
    value, grad = _loss_and_grad(cls(), np.arange(5), emb)
    assert np.all(np.isfinite(grad.numpy()))
    if cls is ContrastiveLoss:  # negatives alone still pull apart
        assert float(value) > 0
    else:
        assert float(value) == 0.0 and np.all(grad.numpy() == 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_input_gives_the_float32_loss_of_the_rounded_input(dtype):
    rng = np.random.default_rng(6)
    labels = np.array([0, 0, 1, 1, 2, 2])
    low = tf.constant(rng.normal(size=(6, 3)), dtype=dtype)
    for cls, kwargs in SETTINGS:
        got = cls(**kwargs)(labels, low)
        assert got.dtype == tf.float32
        rounded = tf.cast(low, "float32")
        np.testing.assert_allclose(float(got), float(cls(**kwargs)(labels, rounded)), rtol=1e-6)


def test_label_shapes_and_dtypes():
    emb = np.random.default_rng(2).normal(size=(6, 3)).astype("float32")
    labels = np.array([1, 0, 0, 1, 2, 2])
    for cls, kwargs in SETTINGS:
        loss = cls(**kwargs)
        expected = float(loss(labels, emb))
        for variant in (labels.reshape(6, 1), labels.astype("float32"), labels.astype("int64")):
            np.testing.assert_allclose(float(loss(variant, emb)), expected, rtol=1e-7)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="mining='batch_all'"):
        TripletMarginLoss(mining="batch_all")
    with pytest.raises(ValueError, match="distance='l1'"):
        ContrastiveLoss(distance="l1")
    with pytest.raises(ValueError, match="temperature=0.0"):
        SupConLoss(temperature=0)
    with pytest.raises(ValueError, match="gamma=-1.0"):
        CircleLoss(gamma=-1)
    with pytest.raises(ValueError, match=r"y_pred.shape=\(2, 3, 4\)"):
        NTXentLoss()(np.array([0, 1]), np.zeros((2, 3, 4), "float32"))
    with pytest.raises(ValueError, match="sample_weight"):
        NTXentLoss()(np.array([0, 1]), np.eye(2, dtype="float32"), sample_weight=np.ones(2))


@pytest.mark.parametrize("cls, default", [(SupConLoss, 0.1), (NTXentLoss, 0.07)])
def test_the_temperature_losses_share_one_temperature(cls, default):
    """SupCon and NT-Xent take tau from one base: PML's default, the same check, the same
    config entry (beside the pair-loss ones), and logits s / tau (the NumPy reference
    at tau = 0.5)."""
    assert cls().temperature == default
    assert cls().get_config()["temperature"] == default
    config = cls(temperature=0.25, normalize_embeddings=False).get_config()
    assert {k: config[k] for k in ("temperature", "normalize_embeddings",
                                   "gather_across_replicas")} == {
        "temperature": 0.25, "normalize_embeddings": False, "gather_across_replicas": True}
    assert cls.from_config(config).temperature == 0.25
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match=f"temperature={float(bad)}"):
            cls(temperature=bad)
    labels = np.array([0, 0, 1, 1, 2])
    emb = np.random.default_rng(4).normal(size=(5, 3)).astype("float32")
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    expected = {SupConLoss: ref.supcon, NTXentLoss: ref.ntxent}[cls](labels, emb, temperature=0.5)
    np.testing.assert_allclose(float(cls(temperature=0.5)(labels, emb)), expected, rtol=1e-5)


# --- distribution -----------------------------------------------------------------

_X = np.random.default_rng(12).normal(size=(8, 4)).astype("float32")
_Y = np.array([0, 0, 1, 1, 2, 2, 0, 1])  # replica 1's 0 and 1 have positives only globally

DISTRIBUTED = [
    (TripletMarginLoss, dict(margin=0.5, mining="hard")),
    (ContrastiveLoss, dict(pos_margin=0.1, neg_margin=1.2)),
    (CircleLoss, dict(gamma=16.0)),
    (SupConLoss, {}),
    (NTXentLoss, {}),
]


def _build_model():
    inputs = keras.Input(shape=(4,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs))


@pytest.mark.parametrize("setting", DISTRIBUTED, ids=_id)
def test_mirrored_step_equals_single_device_step_on_the_global_batch(setting, mirrored):
    cls, kwargs = setting
    initial = _build_model().get_weights()
    single = weights_after_one_step(tf.distribute.get_strategy(), _build_model, initial,
                                    cls(**kwargs), _X, _Y)
    gathered = weights_after_one_step(mirrored, _build_model, initial, cls(**kwargs), _X, _Y)
    assert max(np.abs(ws - w0).max() for w0, ws in zip(initial, single)) > 1e-3
    for ws, wg in zip(single, gathered):
        np.testing.assert_allclose(wg, ws, atol=1e-5)


def test_without_gathering_each_replica_sees_only_its_slice(mirrored):
    initial = _build_model().get_weights()
    make = lambda **kw: SupConLoss(**kw)  # noqa: E731
    single = weights_after_one_step(tf.distribute.get_strategy(), _build_model, initial, make(),
                                    _X, _Y)
    local = weights_after_one_step(mirrored, _build_model, initial,
                                   make(gather_across_replicas=False), _X, _Y)
    assert max(np.abs(ws - wl).max() for ws, wl in zip(single, local)) > 1e-3


def test_xla_compiles_every_setting_to_the_same_value_and_gradient():
    rng = np.random.default_rng(9)
    labels = tf.constant([0, 0, 1, 1, 2, 2, 0, 3])
    emb = tf.constant(rng.normal(size=(8, 4)), tf.float32)
    for cls, kwargs in SETTINGS:
        loss = cls(**kwargs)

        def value_and_grad(e):
            with tf.GradientTape() as tape:
                tape.watch(e)
                value = loss(labels, e)
            return value, tape.gradient(value, e)

        eager = value_and_grad(emb)
        compiled = tf.function(value_and_grad, jit_compile=True)(emb)
        np.testing.assert_allclose(compiled[0].numpy(), eager[0].numpy(), rtol=1e-5)
        np.testing.assert_allclose(compiled[1].numpy(), eager[1].numpy(), rtol=1e-4, atol=1e-6)
