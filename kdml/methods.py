"""Method name -> how to build its training model, loss and learning-rate groups.

The only module that knows every method: adding one touches this table and the
method's own layer and loss files, never `train.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import keras
import numpy as np

from kdml.config import TrainConfig
from kdml.layers.proxies import Proxies
from kdml.losses import MultiSimilarityLoss, ProxyAnchorLoss

BACKBONE_GROUP = "^backbone/"


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


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    build: Callable[[keras.Model, int, TrainConfig], Objective]


def _proxy_anchor(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    images = keras.Input(embedder.input_shape[1:], name="images")
    similarities = Proxies(num_classes, name="proxies")(embedder(images))
    return Objective(
        model=keras.Model(images, similarities, name="proxy_anchor"),
        loss=ProxyAnchorLoss(alpha=config.alpha, margin=config.margin),
        learning_rate_multipliers={"^proxies/": config.proxy_lr_multiplier, BACKBONE_GROUP: 1.0},
    )


def _multi_similarity(embedder: keras.Model, num_classes: int, config: TrainConfig) -> Objective:
    images = keras.Input(embedder.input_shape[1:], name="images")
    return Objective(
        model=keras.Model(images, embedder(images), name="multi_similarity"),
        loss=MultiSimilarityLoss(alpha=config.ms_alpha, beta=config.ms_beta,
                                 base=config.ms_base, epsilon=config.ms_epsilon),
        learning_rate_multipliers={BACKBONE_GROUP: 1.0},
    )


METHODS: Dict[str, Method] = {
    "proxy_anchor": Method(
        "proxy_anchor", "Proxy Anchor loss (Kim et al., CVPR 2020), the baseline", _proxy_anchor),
    "multi_similarity": Method(
        "multi_similarity", "Multi-Similarity loss with pair mining (Wang et al., CVPR 2019)",
        _multi_similarity),
}


def get_method(name: str) -> Method:
    """The method called `name`; a ValueError lists the valid names."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}. Valid methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
