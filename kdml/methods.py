"""Method name -> how to build its training model, loss and learning-rate groups.

The only module that knows every method: adding one touches this table and the
method's own layer and loss files, never `train.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import keras
import numpy as np

from kdml.config import TrainConfig
from kdml.evaluation.rerank import rerank_metrics
from kdml.layers import CodedResidualTransform
from kdml.layers.pddm import PDDM, PDDMScoreMatrix, SavePDDMUnit
from kdml.layers.proxies import Proxies
from kdml.layers.proxy_diagnostics import ProxyDiagnostics
from kdml.losses import (ArcFaceLoss, CircleLoss, ContrastiveLoss, CosFaceLoss, CrossBatchMemory,
                         MultiBranchLoss, MultiSimilarityLoss, NormalizedSoftmaxLoss, NTXentLoss,
                         ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss, SubCenterArcFaceLoss,
                         SupConLoss, TripletMarginLoss)
from kdml.losses.pddm_loss import PDDMLoss, PDDMMiningMonitor, PDDMMiningSchedule
from kdml.models import multi_branch_model
from kdml.regularizers import SoftOrthogonal

BACKBONE_GROUP = "^backbone/"
PDDM_UNIT_GROUP = "(^|/)pddm/"  # the PDDM unit's variables inside the training model


@dataclasses.dataclass
class Objective:
    """What `model.fit` trains: a model from images, its loss, lr groups.

    `model` maps images `(B, S, S, 3)` to what `loss(labels, outputs)` consumes
    (proxy similarities or embeddings); it shares its layers with the embedder.
    `callbacks` are the method's own (diagnostics); `extra_metrics(embeddings,
    labels)` adds method-specific test metrics (e.g. re-ranked recall) to every
    retrieval evaluation of the run.
    """

    model: keras.Model
    loss: keras.losses.Loss
    learning_rate_multipliers: Dict[str, float]
    callbacks: List[keras.callbacks.Callback] = dataclasses.field(default_factory=list)
    extra_metrics: Optional[Callable[[np.ndarray, np.ndarray], Dict[str, float]]] = None


def _pooling_head(config: TrainConfig):
    return "pooling", ({"pooling": config.pooling} if config.pooling else {})


def _class_labels(config: TrainConfig) -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class Method:
    """`head(config) -> (head, head_options)` is the head of the method's embedder
    (`kdml.models.build_embedder(..., head=..., head_options=...)`); default "pooling".
    `instance_labels(config)`: whether the training batches label each image's views
    with the image's own id instead of its class (`kdml.data.train_dataset`).
    `pair_based`: the loss is a pair-based loss on embeddings, which `--xbm_size` can
    wrap in a cross-batch memory."""

    name: str
    description: str
    build: Callable[[keras.Model, int, TrainConfig], Objective]
    head: Callable[[TrainConfig], Tuple[str, Dict]] = _pooling_head
    instance_labels: Callable[[TrainConfig], bool] = _class_labels
    pair_based: bool = False


def _proxy_anchor(embedder: keras.Model, num_classes: int, config: TrainConfig,
                  proxy_regularizer=None, name: str = "proxy_anchor") -> Objective:
    images = keras.Input(embedder.input_shape[1:], name="images")
    proxies = Proxies(num_classes, proxy_regularizer=proxy_regularizer, name="proxies")
    similarities = proxies(embedder(images))
    return Objective(
        model=keras.Model(images, similarities, name=name),
        loss=ProxyAnchorLoss(alpha=config.alpha, margin=config.margin),
        learning_rate_multipliers={"^proxies/": config.proxy_lr_multiplier, BACKBONE_GROUP: 1.0},
        callbacks=[ProxyDiagnostics(proxies.proxies)],
    )


def _so_proxy(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    """Proxy Anchor + lambda * SoftOrthogonal on the proxies (docs/design.md 3.2); the penalty
    joins `model.losses`, so the logged loss is L_PA + lambda R_SO."""
    return _proxy_anchor(embedder, num_classes, config, name="so_proxy",
                         proxy_regularizer=SoftOrthogonal(config.so_strength, config.so_mode,
                                                          config.so_normalization))


def _pair_objective(embedder: keras.Model, loss: keras.losses.Loss, config: TrainConfig,
                    name: str) -> Objective:
    """The embedder trained by a pair-based `loss` on its embeddings; with --xbm_size the
    loss is wrapped in a CrossBatchMemory whose queue layer sits after the embedder (so
    the queue is in the model's weights and checkpoints)."""
    images = keras.Input(embedder.input_shape[1:], name="images")
    embeddings = embedder(images)
    if config.xbm_size:
        rows = config.batch_size * (config.views or 1)
        if config.xbm_size < rows:
            raise ValueError(
                f"--xbm_size={config.xbm_size} is smaller than the global batch of {rows} "
                "embeddings (P x K x views). Fix: --xbm_size >= that, or 0 for no memory.")
        loss = CrossBatchMemory(loss, embedding_size=embedder.output_shape[-1],
                                memory_size=config.xbm_size)
        embeddings = loss.memory(embeddings)
    return Objective(model=keras.Model(images, embeddings, name=name), loss=loss,
                     learning_rate_multipliers={BACKBONE_GROUP: 1.0})


def _multi_similarity(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    return _pair_objective(embedder, MultiSimilarityLoss(
        alpha=config.ms_alpha, beta=config.ms_beta, base=config.ms_base,
        epsilon=config.ms_epsilon), config, "multi_similarity")


# --- pair and triplet losses (issue 21; docs/design.md 3.5) -----------------------------


def _triplet(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    return _pair_objective(embedder, TripletMarginLoss(
        margin=config.triplet_margin, mining=config.triplet_mining,
        distance=config.triplet_distance), config, "triplet")


def _contrastive(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    return _pair_objective(embedder, ContrastiveLoss(
        pos_margin=config.contrastive_pos_margin, neg_margin=config.contrastive_neg_margin,
        distance=config.contrastive_distance), config, "contrastive")


def _circle(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    return _pair_objective(embedder, CircleLoss(m=config.circle_m, gamma=config.circle_gamma),
                           config, "circle")


def _supcon(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    return _pair_objective(embedder, SupConLoss(temperature=config.supcon_temperature),
                           config, "supcon")


def _ntxent_instance_labels(config: TrainConfig) -> bool:
    return config.ntxent_positives == "views"


def _ntxent(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    if config.ntxent_positives == "views" and config.views != 2:
        raise ValueError(
            "--method=ntxent with --ntxent_positives=views takes the other view of each image "
            f"as its positive and needs --views=2. Received: --views={config.views}. Fix: "
            "--views=2, or --ntxent_positives=class.")
    return _pair_objective(embedder, NTXentLoss(temperature=config.ntxent_temperature),
                           config, "ntxent")


# --- Classification-based losses (issue 21; docs/design.md 3.6) --------------------------
# Each trains k class weights per class (kdml.layers.Proxies(C * k), named "proxies") with
# a loss on the cosines to them. The weights take --proxy_lr_multiplier x the backbone's
# learning rate (100, as Proxy Anchor): like proxies they start at random directions and
# each row is pulled only by the few samples of its class in a batch, and one multiplier
# for every proxy-based method keeps their comparison fair (docs/methods.md).

# method -> (loss class, {loss argument: TrainConfig field}, field of the weights per class)
_CLASSIFICATION_LOSSES = {
    "normalized_softmax": (NormalizedSoftmaxLoss, {"temperature": "ns_temperature"}, None),
    "cosface": (CosFaceLoss, {"margin": "cosface_margin", "scale": "cosface_scale"}, None),
    "arcface": (ArcFaceLoss, {"margin": "arcface_margin", "scale": "arcface_scale"}, None),
    "subcenter_arcface": (SubCenterArcFaceLoss, {"margin": "arcface_margin", "scale": "arcface_scale",
                                                 "sub_centers": "sub_centers"}, "sub_centers"),
    "proxy_nca": (ProxyNCALoss, {"softmax_scale": "proxy_nca_scale"}, None),
    "soft_triple": (SoftTripleLoss, {"centers_per_class": "soft_triple_centers",
                                     "la": "soft_triple_la", "gamma": "soft_triple_gamma",
                                     "margin": "soft_triple_margin"}, "soft_triple_centers"),
}


def _classification(name: str):
    """The builder of `--method=<name>`: embedder -> Proxies(C * k) -> the loss."""
    loss_cls, arguments, centers_field = _CLASSIFICATION_LOSSES[name]

    def build(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
        try:
            loss = loss_cls(**{arg: getattr(config, field) for arg, field in arguments.items()})
        except ValueError as error:  # name the flag, not the loss argument
            flags = [f"--{field}" for arg, field in arguments.items() if f"`{arg}`" in str(error)]
            raise ValueError(f"{', '.join(flags) or '--method=' + name}: {error}") from None
        images = keras.Input(embedder.input_shape[1:], name="images")
        k = getattr(config, centers_field) if centers_field else 1
        proxies = Proxies(num_classes * k, name="proxies")
        return Objective(
            model=keras.Model(images, proxies(embedder(images)), name=name),
            loss=loss,
            learning_rate_multipliers={"^proxies/": config.proxy_lr_multiplier,
                                       BACKBONE_GROUP: 1.0},
            # Coherence of one weight per class; with k per class it would compare
            # centres of one class too, and cost (C k)^2 d per epoch (SOP, k = 10: 6e12).
            callbacks=[ProxyDiagnostics(proxies.proxies)] if k == 1 else [],
        )

    return build


# --- Coded Residual Transform (issue 5; docs/design.md 3.3) -----------------------------


def _crt_head(config: TrainConfig, num_prototypes: Optional[int] = None):
    """The CRT head options of the main branch (or of an auxiliary one of K prototypes)."""
    return "crt", dict(num_prototypes=num_prototypes or config.crt_prototypes,
                       temperature=config.crt_temperature,
                       orthogonality_strength=config.crt_orthogonality)


class CRTGeometry(keras.callbacks.Callback):
    """Adds the CRT head's N (positions encoded) and K (prototypes) to every epoch's logs,
    so metrics.json reports N next to K."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.head.num_positions is not None:
            logs["crt_num_positions"] = float(self.head.num_positions)
            logs["crt_num_prototypes"] = float(self.head.num_prototypes)


def _crt(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    """Multi-size CRT: the embedder's CRT head (main) plus auxiliary CRT heads on the
    same backbone features, each with the base loss, plus consistency_weight x
    SimilarityConsistency(main, aux) (kdml.losses.MultiBranchLoss)."""
    from absl import logging

    aux_sizes = list(zip(config.crt_aux_prototypes, config.crt_aux_dims))
    if len(config.crt_aux_prototypes) != len(config.crt_aux_dims):
        raise ValueError(
            "--crt_aux_prototypes and --crt_aux_dims need one value per auxiliary branch. "
            f"Received: {list(config.crt_aux_prototypes)} and {list(config.crt_aux_dims)}.")
    head = embedder.get_layer("head")
    if not isinstance(head, CodedResidualTransform):
        raise ValueError("--method=crt needs an embedder built with head='crt'. "
                         f"Received a head of type {type(head).__name__}.")
    # Auxiliary branches: the main head's design choices, their own (K, d).
    aux_heads = [
        CodedResidualTransform.from_config({**head.get_config(), "name": f"crt_aux{i + 1}",
                                            "num_prototypes": k, "embedding_dim": dim})
        for i, (k, dim) in enumerate(aux_sizes)]
    dims = [head.embedding_dim] + [dim for _, dim in aux_sizes]
    multipliers = {BACKBONE_GROUP: 1.0}
    if config.base_loss == "proxy_anchor":
        proxies = [Proxies(num_classes, name="proxies" if i == 0 else f"proxies_aux{i}")
                   for i in range(len(dims))]
        base = [ProxyAnchorLoss(alpha=config.alpha, margin=config.margin) for _ in dims]
        input_dims = [num_classes] * len(dims)
        multipliers = {"^proxies": config.proxy_lr_multiplier, **multipliers}
    elif config.base_loss == "ms":
        proxies = None
        base = [MultiSimilarityLoss(alpha=config.ms_alpha, beta=config.ms_beta,
                                    base=config.ms_base, epsilon=config.ms_epsilon) for _ in dims]
        input_dims = dims
    else:
        raise ValueError(f"Unknown --base_loss {config.base_loss!r}. Valid: ms, proxy_anchor.")
    logging.info("CRT heads over N=%s positions of the backbone's features: (K, d) = %s",
                 head.num_positions, ", ".join(
                     f"({h.num_prototypes}, {h.embedding_dim})" for h in [head, *aux_heads]))
    return Objective(
        model=multi_branch_model(embedder, aux_heads, proxies, name="crt"),
        loss=MultiBranchLoss(base, input_dims, dims, consistency_weight=config.consistency_weight),
        learning_rate_multipliers=multipliers,
        callbacks=[CRTGeometry(head)],
    )


# --- PDDM (issue 6; docs/design.md 3.4) -------------------------------------------------


def _pddm(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    """Embedder -> PDDMScoreMatrix (embeddings | unit scores vs the global batch) ->
    PDDMLoss. Writes the unit to <output_dir>/pddm.keras; with --rerank_top_k > 0 every
    evaluation adds reranked_recall@K (top-k cosine neighbours re-ordered by the unit)."""
    import os

    import tensorflow as tf

    images = keras.Input(embedder.input_shape[1:], name="images")
    unit = PDDM(config.pddm_hidden_dim, config.pddm_dropout,
                normalization=config.pddm_normalization, name="pddm")
    outputs = PDDMScoreMatrix(unit, name="pddm_scores")(embedder(images))
    try:
        loss = PDDMLoss(alpha=config.pddm_alpha, beta=config.pddm_beta,
                        lambda_=config.pddm_lambda, mining=config.pddm_mining,
                        mining_score=config.pddm_mining_score,
                        unit_loss=config.pddm_unit_loss, hardness=config.pddm_hardness,
                        mining_temperature=config.pddm_mining_temperature, seed=config.seed)
    except ValueError as error:  # name the flag, not the loss argument
        flag = "--pddm_mining_temperature" if "mining_temperature" in str(error) else "--method=pddm"
        raise ValueError(f"{flag}: {error}") from None
    schedule = PDDMMiningSchedule(loss, config.pddm_mining_warmup_epochs)
    dim = embedder.output_shape[-1]
    extra_metrics = None
    if config.rerank_top_k > 0:
        scorer = tf.function(lambda a, b: unit(a, b, training=False), reduce_retracing=True)

        def extra_metrics(embeddings, labels):
            top_k = min(config.rerank_top_k, len(labels) - 1)
            return rerank_metrics(embeddings, labels, scorer, top_k=top_k, ks=config.recall_ks)

    return Objective(
        model=keras.Model(images, outputs, name="pddm"),
        loss=loss,
        learning_rate_multipliers={PDDM_UNIT_GROUP: config.pddm_lr_multiplier,
                                   BACKBONE_GROUP: 1.0},
        callbacks=[PDDMMiningMonitor(loss), schedule,
                   SavePDDMUnit(unit, dim, os.path.join(config.output_dir, "pddm.keras"))],
        extra_metrics=extra_metrics,
    )


METHODS: Dict[str, Method] = {
    "crt": Method(
        "crt", "Coded Residual Transform head, multi-size with similarity consistency "
        "(docs/design.md 3.3); base loss --base_loss", _crt, head=_crt_head),
    "proxy_anchor": Method(
        "proxy_anchor", "Proxy Anchor loss (Kim et al., CVPR 2020), the baseline", _proxy_anchor),
    "multi_similarity": Method(
        "multi_similarity", "Multi-Similarity loss with pair mining (Wang et al., CVPR 2019)",
        _multi_similarity, pair_based=True),
    "triplet": Method(
        "triplet", "Triplet margin loss with batch mining (FaceNet, Schroff et al., CVPR 2015)",
        _triplet, pair_based=True),
    "contrastive": Method(
        "contrastive", "Contrastive loss with positive and negative margins (Hadsell et al., "
        "CVPR 2006)", _contrastive, pair_based=True),
    "circle": Method(
        "circle", "Circle loss (Sun et al., CVPR 2020)", _circle, pair_based=True),
    "supcon": Method(
        "supcon", "Supervised contrastive loss over two views (Khosla et al., NeurIPS 2020)",
        _supcon, pair_based=True),
    "ntxent": Method(
        "ntxent", "NT-Xent over two views of each image (SimCLR, Chen et al., ICML 2020)",
        _ntxent, instance_labels=_ntxent_instance_labels, pair_based=True),
    "pddm": Method(
        "pddm", "PDDM unit, hard-quadruplet mining, double-header hinge (Huang et al., "
        "NIPS 2016, docs/design.md 3.4)", _pddm),
    "so_proxy": Method(
        "so_proxy", "Proxy Anchor + soft-orthogonal proxies (Soft Orthogonal Proxies, docs/design.md 3.2)",
        _so_proxy),
    "normalized_softmax": Method(
        "normalized_softmax", "Normalised softmax with a temperature (Zhai & Wu, BMVC 2019)",
        _classification("normalized_softmax")),
    "cosface": Method(
        "cosface", "CosFace, additive cosine margin (Wang et al., CVPR 2018)",
        _classification("cosface")),
    "arcface": Method(
        "arcface", "ArcFace, additive angular margin (Deng et al., CVPR 2019)",
        _classification("arcface")),
    "subcenter_arcface": Method(
        "subcenter_arcface", "Sub-center ArcFace, k sub-centres per class (Deng et al., ECCV 2020)",
        _classification("subcenter_arcface")),
    "proxy_nca": Method(
        "proxy_nca", "ProxyNCA with ProxyNCA++'s temperature (Teh et al., ECCV 2020)",
        _classification("proxy_nca")),
    "soft_triple": Method(
        "soft_triple", "SoftTriple, K centres per class (Qian et al., ICCV 2019)",
        _classification("soft_triple")),
}


def get_method(name: str) -> Method:
    """The method called `name`; a ValueError lists the valid names."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}. Valid methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def check_method_options(config: TrainConfig) -> None:
    """Raises a ValueError naming the fix when --xbm_size is set for a method that has no
    pair-based loss to wrap, or --pooling for a method without the pooling head."""
    method = get_method(config.method)
    if config.pooling and method.head is not _pooling_head:
        raise ValueError(f"--pooling chooses the pooling head's mode; --method={config.method} "
                         "has another head. Fix: leave --pooling out.")
    if config.xbm_size and not method.pair_based:
        valid = ", ".join(sorted(m.name for m in METHODS.values() if m.pair_based))
        raise ValueError(
            f"--xbm_size wraps a pair-based method ({valid}); --method={config.method} has no "
            "pairs to remember. Fix: --xbm_size=0, or one of those methods.")
