"""`TrainConfig`: the one frozen object that flags become and builders read."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

# Defaults that depend on the kind of data: glyphs train a small CNN from scratch,
# photographs fine-tune an ImageNet backbone (the Proxy Anchor recipe).
KIND_DEFAULTS = {
    "glyph": dict(backbone="conv4", image_size=28, weights="none", lr=1e-3,
                  warmup_epochs=0, augmentation="glyph", eval_crop_fraction=0.875),
    "photo": dict(backbone="resnet50", image_size=224, weights="imagenet", lr=1e-4,
                  warmup_epochs=1, augmentation="photo", eval_crop_fraction=0.875),
}


# Method-specific defaults per data kind, applied over KIND_DEFAULTS (still only to
# fields left `None`): {method: {kind: {field: value}}}.
METHOD_KIND_DEFAULTS = {
    # The SO paper's encoder: DeiT, class token -> linear -> L2 norm (the "cls" head).
    "so_proxy": {"photo": dict(backbone="deit_small")},
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `None` fields are resolved from the data kind."""

    method: str = "proxy_anchor"
    dataset: str = "synthetic"
    eval_dataset: Optional[str] = None
    data_dir: Optional[str] = None
    download: bool = False
    verify_images: bool = True
    output_dir: str = "runs/default"
    data_kind: Optional[str] = None  # "photo" | "glyph"; None: the dataset's own kind

    backbone: Optional[str] = None
    weights: Optional[str] = None
    embedding_dim: int = 512
    image_size: Optional[int] = None
    freeze_batchnorm: Optional[bool] = None  # None: freeze when weights are pretrained
    augmentation: Optional[str] = None
    eval_crop_fraction: Optional[float] = None

    classes_per_batch: int = 32
    images_per_class: int = 4
    epochs: int = 30
    lr: Optional[float] = None
    weight_decay: float = 1e-4
    proxy_lr_multiplier: float = 100.0
    warmup_epochs: Optional[int] = None
    alpha: float = 32.0
    margin: float = 0.1
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    ms_base: float = 0.5
    ms_epsilon: float = 0.1
    # Soft-orthogonal proxies (so_proxy, issue 4): lambda of L_PA + lambda R_SO and the
    # form of R_SO (kdml.regularizers.SoftOrthogonal; default from tools/bench_methods.py).
    so_strength: float = 10.0
    so_mode: str = "auto"
    # Coded Residual Transform (crt, issue 5; docs/design.md 3.3): the main branch is
    # (crt_prototypes, embedding_dim), the auxiliary branches (crt_aux_prototypes[i],
    # crt_aux_dims[i]); each branch gets `base_loss`, plus consistency_weight x
    # SimilarityConsistency(main, aux). Defaults from tools/bench_methods.py.
    base_loss: str = "ms"  # "ms" | "proxy_anchor"
    crt_prototypes: int = 64
    crt_aux_prototypes: Tuple[int, ...] = (32,)
    crt_aux_dims: Tuple[int, ...] = (128,)
    crt_temperature: float = 0.1
    crt_orthogonality: float = 1.0
    consistency_weight: float = 1.0
    # PDDM (pddm, issue 6; docs/design.md 3.4): the unit's width and dropout, the loss's
    # margins alpha (scores) / beta (squared distances), weight lambda, mining mode;
    # rerank_top_k > 0 adds reranked_recall@K (top-k re-ranked by the unit) to evaluations.
    pddm_alpha: float = 0.5
    pddm_beta: float = 1.0
    pddm_lambda: float = 0.5
    pddm_hidden_dim: int = 128
    pddm_dropout: float = 0.0
    pddm_mining: str = "per_anchor"
    rerank_top_k: int = 0

    strategy: str = "auto"
    mixed_precision: bool = False
    jit_compile: str = "auto"
    seed: int = 0
    resume: bool = False
    eval_every: int = 1
    eval_batch_size: int = 256
    recall_ks: Tuple[int, ...] = (1, 2, 4, 8)
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 3
    verbose: int = 1

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.images_per_class

    def resolved(self, kind: str) -> "TrainConfig":
        """A copy with every `None` field filled from `KIND_DEFAULTS[kind]`, overridden
        by `METHOD_KIND_DEFAULTS[method][kind]`."""
        defaults = {**KIND_DEFAULTS[kind], **METHOD_KIND_DEFAULTS.get(self.method, {}).get(kind, {})}
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        config = dataclasses.replace(self, **updates)
        if config.freeze_batchnorm is None:
            config = dataclasses.replace(config, freeze_batchnorm=config.weights != "none")
        return config
