"""Every public layer, loss and regularizer passes the shared contract of
`tests/layer_test_case.py` (config JSON round trip, `.keras` round trip, a training
step, float32 under mixed precision, and for layers a builtin-ops TFLite conversion)."""

import keras
import numpy as np
import pytest

import kdml
from kdml.layers import (PDDM, CodedResidualTransform, GeMPooling, L2Normalization,
                         PDDMScoreMatrix, PixelNormalization, PoolingHead, Proxies)
from kdml.losses import (ArcFaceLoss, CircleLoss, ContrastiveLoss, CosFaceLoss, CrossBatchMemory,
                         MultiBranchLoss, MultiSimilarityLoss, NormalizedSoftmaxLoss, NTXentLoss,
                         PDDMLoss, ProxyAnchorLoss, ProxyNCALoss, SimilarityConsistency,
                         SoftTripleLoss, SubCenterArcFaceLoss, SupConLoss, TripletMarginLoss)
from kdml.regularizers import SoftOrthogonal
from tests.layer_test_case import run_layer_test, run_loss_test, run_regularizer_test


def _normal(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _pixels(*shape):
    return np.random.default_rng(0).uniform(0, 255, size=shape).astype("float32")


_PDDM_UNIT = {"unit": keras.saving.serialize_keras_object(PDDM(hidden_dim=8))}

LAYER_CASES = {
    "Proxies": (Proxies, dict(num_classes=5, initializer=keras.initializers.RandomNormal(stddev=0.5),
                              proxy_regularizer=SoftOrthogonal(0.5), name="class_proxies"),
                _normal(4, 6), {}),
    "L2Normalization": (L2Normalization, dict(axis=-1), _normal(3, 5), {}),
    # documented: output in the layer's compute dtype
    "PixelNormalization": (PixelNormalization, dict(mean=(120.0, 110.0, 100.0),
                                                    std=(60.0, 50.0, 40.0), channel_order="bgr"),
                           _pixels(2, 4, 4, 3), dict(output_dtype="compute")),
    "PoolingHead": (PoolingHead, dict(embedding_dim=6, pooling="avg_max"), _normal(2, 3, 3, 8), {}),
    "PoolingHead_cls": (PoolingHead, dict(embedding_dim=6, pooling="cls"), _normal(2, 5, 8), {}),
    "PoolingHead_gem": (PoolingHead, dict(embedding_dim=6, pooling="gem"),
                        np.abs(_normal(2, 3, 3, 8)), {}),
    "PoolingHead_cls_gem": (PoolingHead, dict(embedding_dim=6, pooling="cls_gem", skip_tokens=1),
                            _normal(2, 5, 8), {}),
    "GeMPooling": (GeMPooling, dict(initial_p=2.5, max_p=8.0, epsilon=1e-5),
                   np.abs(_normal(2, 4, 4, 3)) + 0.1, {}),
    "CodedResidualTransform": (CodedResidualTransform,
                               dict(num_prototypes=3, embedding_dim=6, temperature=0.5),
                               _normal(2, 3, 3, 8), {}),
    "CodedResidualTransform_tokens": (CodedResidualTransform, dict(
        num_prototypes=3, embedding_dim=5, temperature=0.3, normalize_features=True,
        intra_normalization=False, code_normalization="layer_norm", orthogonality_strength=0.5,
        orthogonality_mode="rows", prototype_initializer="random_normal", skip_tokens=1),
        _normal(2, 4, 6), {}),
    "PDDM": (PDDM, dict(hidden_dim=8), [_normal(4, 5), _normal(4, 5, seed=1)], {}),
    "PDDMScoreMatrix": (PDDMScoreMatrix, _PDDM_UNIT, _normal(4, 5), {}),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_contract(case):
    layer_cls, init_kwargs, inputs, options = LAYER_CASES[case]
    run_layer_test(layer_cls, init_kwargs, inputs, **options)


def _embedder(width, normalize=True):
    def build():
        inputs = keras.Input((4,), batch_size=6)
        x = keras.layers.Dense(width, name="embedding")(inputs)
        return keras.Model(inputs, L2Normalization()(x) if normalize else x)
    return build


def _proxy_model(num_weights=5):
    def build():
        inputs = keras.Input((4,), batch_size=6)
        return keras.Model(inputs, Proxies(num_weights, name="proxies")(keras.layers.Dense(3)(inputs)))
    return build


def _two_branch_model():
    inputs = keras.Input((4,), batch_size=6)
    e0 = L2Normalization()(keras.layers.Dense(3, name="branch0")(inputs))
    e1 = L2Normalization()(keras.layers.Dense(3, name="branch1")(inputs))
    return keras.Model(inputs, keras.layers.Concatenate()([e0, e1, e0, e1]))


def _pddm_model():
    inputs = keras.Input((4,), batch_size=6)
    embeddings = L2Normalization()(keras.layers.Dense(5)(inputs))
    return keras.Model(inputs, PDDMScoreMatrix(PDDM(hidden_dim=8))(embeddings))


_LABELS = np.array([0, 0, 1, 1, 2, 2])

LOSS_CASES = {
    "ProxyAnchorLoss": (ProxyAnchorLoss, dict(alpha=16.0, margin=0.2, gather_across_replicas=False,
                                             name="pa"), np.array([0, 1, 2, 3, 4, 0]),
                        _proxy_model()),
    "MultiSimilarityLoss": (MultiSimilarityLoss, dict(alpha=3.0, beta=10.0, base=0.3, epsilon=0.2,
                                                     gather_across_replicas=False, name="ms"),
                            _LABELS, _embedder(4)),
    "SimilarityConsistency": (SimilarityConsistency, dict(split=3, gather_across_replicas=False),
                              _LABELS, _embedder(7, False)),
    "MultiBranchLoss": (MultiBranchLoss, dict(
        base_losses=[MultiSimilarityLoss(beta=10.0), MultiSimilarityLoss(beta=10.0)],
        input_dims=[3, 3], embedding_dims=[3, 3], consistency_weight=0.5),
        _LABELS, _two_branch_model),
    "PDDMLoss": (PDDMLoss, dict(alpha=0.5, beta=1.0, lambda_=0.5), _LABELS, _pddm_model),
    "PDDMLoss_semihard": (PDDMLoss, dict(hardness="semihard"), _LABELS, _pddm_model),
    # Soft draws change with every call (the training check calls the loss twice); at
    # tau = 1e-3 the draw is the hardest negative unless two scores are within ~1e-2.
    # The draws themselves: tests/losses/test_pddm_mining.py.
    "PDDMLoss_soft": (PDDMLoss, dict(hardness="soft", mining_temperature=1e-3, seed=3),
                      _LABELS, _pddm_model),
    # classification-based losses (docs/design.md 3.6): 5 classes, k weights per class
    "NormalizedSoftmaxLoss": (NormalizedSoftmaxLoss, dict(temperature=0.1, name="ns"),
                              np.array([0, 1, 2, 3, 4, 0]), _proxy_model()),
    "CosFaceLoss": (CosFaceLoss, dict(margin=0.2, scale=16.0, gather_across_replicas=False),
                    np.array([0, 1, 2, 3, 4, 0]), _proxy_model()),
    "ArcFaceLoss": (ArcFaceLoss, dict(margin=20.0, scale=16.0), np.array([4, 1, 2, 3, 4, 0]),
                    _proxy_model()),
    "SubCenterArcFaceLoss": (SubCenterArcFaceLoss, dict(margin=20.0, scale=16.0, sub_centers=2),
                             np.array([0, 1, 2, 3, 4, 0]), _proxy_model(10)),
    "ProxyNCALoss": (ProxyNCALoss, dict(softmax_scale=9.0), np.array([0, 1, 2, 3, 4, 4]),
                     _proxy_model()),
    "SoftTripleLoss": (SoftTripleLoss, dict(centers_per_class=3, la=10.0, gamma=0.2, margin=0.05),
                       np.array([0, 1, 2, 3, 4, 0]), _proxy_model(15)),
    "TripletMarginLoss": (TripletMarginLoss, dict(margin=1.0, mining="semihard",
                                                  distance="squared_euclidean",
                                                  gather_across_replicas=False, name="tml"),
                          _LABELS, _embedder(4, False)),
    "ContrastiveLoss": (ContrastiveLoss, dict(pos_margin=0.1, neg_margin=1.5, distance="cosine"),
                        _LABELS, _embedder(4, False)),
    "CircleLoss": (CircleLoss, dict(m=0.3, gamma=16.0, normalize_embeddings=False),
                   _LABELS, _embedder(4)),
    "SupConLoss": (SupConLoss, dict(temperature=0.2), _LABELS, _embedder(4, False)),
    # memory_size = the batch: every call sees the same memory, as the contract's
    # repeated evaluations of one batch need.
    "CrossBatchMemory": (CrossBatchMemory, dict(loss=MultiSimilarityLoss(beta=10.0),
                                                embedding_size=3, memory_size=6),
                         _LABELS, _embedder(3)),
    "NTXentLoss": (NTXentLoss, dict(temperature=0.5), np.array([0, 1, 2, 0, 1, 2]),
                   _embedder(4, False)),
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_loss_contract(case):
    loss_cls, init_kwargs, labels, build_model = LOSS_CASES[case]
    run_loss_test(loss_cls, init_kwargs, labels, build_model, _normal(6, 4, seed=2))


REGULARIZER_CASES = {
    "SoftOrthogonal_rows": (SoftOrthogonal, dict(strength=0.5, mode="rows", normalization="size"),
                            (6, 8)),
    "SoftOrthogonal_auto": (SoftOrthogonal, dict(strength=2.0), (6, 4)),
}


@pytest.mark.parametrize("case", sorted(REGULARIZER_CASES))
def test_regularizer_contract(case):
    regularizer_cls, init_kwargs, shape = REGULARIZER_CASES[case]
    run_regularizer_test(regularizer_cls, init_kwargs, shape)


def test_every_public_layer_loss_and_regularizer_has_a_contract_case():
    covered = {cls for cls, *_ in [*LAYER_CASES.values(), *LOSS_CASES.values(),
                                   *REGULARIZER_CASES.values()]}
    public = {getattr(module, name) for module in (kdml.layers, kdml.losses, kdml.regularizers)
              for name in module.__all__}
    assert public - covered == set(), f"add contract cases for {sorted(c.__name__ for c in public - covered)}"
