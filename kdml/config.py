"""`TrainConfig`: the one frozen object that flags become and builders read.

Each training setting is declared once, as a `TrainConfig` field made by `setting`:
its default, its help text and (for a fixed set of values) its choices. The
command line `python -m kdml.train` generates one flag per such field (the flag's
name is the field's, its type follows the annotation); adding a hyperparameter is
one line here. Importing this module imports neither absl nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

from kdml.command_line import shared_help

# Defaults that depend on the kind of data: glyphs train a small CNN from scratch,
# photographs fine-tune an ImageNet backbone (the Proxy Anchor recipe).
KIND_DEFAULTS = {
    "glyph": dict(backbone="conv4", image_size=28, weights="none", lr=1e-3,
                  warmup_epochs=0, augmentation="glyph", eval_crop_fraction=0.875, views=1),
    "photo": dict(backbone="resnet50", image_size=224, weights="imagenet", lr=1e-4,
                  warmup_epochs=1, augmentation="photo", eval_crop_fraction=0.875, views=1),
}


# Method-specific defaults per data kind, applied over KIND_DEFAULTS (still only to
# fields left `None`): {method: {kind: {field: value}}}.
METHOD_KIND_DEFAULTS = {
    # The SO paper's encoder: DeiT, class token -> linear -> L2 norm (the "cls" head).
    "so_proxy": {"photo": dict(backbone="deit_small")},
    # Contrastive objectives of two augmented views of each image (SupCon, SimCLR).
    "supcon": {"photo": dict(views=2), "glyph": dict(views=2)},
    "ntxent": {"photo": dict(views=2), "glyph": dict(views=2)},
}


def setting(default, help: str, choices: Optional[Sequence[str]] = None):
    """A `TrainConfig` field that is also the command-line flag `--<field name>`.

    Args:
        default: the field's default (immutable: a tuple, not a list). `None` means
            "resolved from the data kind" (`TrainConfig.resolved`); the flag then
            has no default either.
        help: the flag's help text.
        choices: the allowed values of a string setting (an enum flag); `TrainConfig`
            rejects any other.
    """
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


def is_flag(field: dataclasses.Field) -> bool:
    """Whether `field` of `TrainConfig` is a command-line flag (made by `setting`)."""
    return "help" in field.metadata


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `None` fields are resolved from the data kind.

    Fields made by `setting` are command-line flags; the others (plain defaults) are
    set from Python only.
    """

    # Method and data.
    method: str = setting(
        "proxy_anchor", "Training method: proxy_anchor | multi_similarity | so_proxy | pddm | crt | "
                        "normalized_softmax | cosface | arcface | subcenter_arcface | proxy_nca | "
                        "soft_triple | triplet | contrastive | circle | supcon | ntxent.")
    dataset: str = setting("synthetic", shared_help("dataset"))
    eval_dataset: Optional[str] = setting(
        None, "folder:<dir> to evaluate on; then every class of --dataset trains.")
    data_dir: Optional[str] = setting(None, "tensorflow-datasets data directory.")
    download: bool = setting(False, "Let tensorflow-datasets download a missing dataset.")
    verify_images: bool = setting(
        True, "Decode every image of a folder dataset once before training and skip "
              "unreadable files (--noverify_images skips the check).")
    output_dir: str = setting("runs/default", shared_help(
        "output_dir", "Checkpoints, logs, metrics.json and embedder.keras go there."))
    data_kind: Optional[str] = setting(
        None, "Picks the defaults of backbone, weights, image size, lr, warm-up and augmentation. "
              "Default: the dataset's kind (glyph for synthetic and tfds:omniglot, photo otherwise).",
        choices=("photo", "glyph"))

    # Model.
    backbone: Optional[str] = setting(
        None, "conv4 | conv4_stride4 | resnet50 | mobilenet_v3_small | deit_tiny | deit_small | "
              "deit_base, or through keras-hub dinov2_small | dinov2_base | dinov3_small | "
              "siglip_base | clip_vit_b16 | efficientnet_b0 | mobilenet_v3_large "
              "(docs/training.md). Default: conv4 for glyphs, resnet50 for photos.")
    weights: Optional[str] = setting(
        None, "Backbone weights: none, imagenet, or for a keras-hub backbone a keras-hub "
              "preset name (downloaded) or a local preset directory (what save_to_preset "
              "writes). Default: none for glyphs; for photos imagenet, or the backbone's "
              "published preset where its weights are not ImageNet's (dinov2_small, ...).")
    pooling: Optional[str] = setting(
        None, "Pooling head: gem (learnable generalized mean), avg_max, avg, max, cls (the "
              "class token), cls_gem (class token + GeM of the patch tokens). Default: the "
              "backbone's (docs/training.md).",
        choices=("gem", "avg_max", "avg", "max", "cls", "cls_gem"))
    embedding_dim: int = setting(512, "Embedding size d.")
    image_size: Optional[int] = setting(
        None, "Square input size. Default: 28 for glyphs, 224 for photos.")
    # None: freeze when the weights are pretrained (the flag: auto | true | false).
    freeze_batchnorm: Optional[bool] = setting(
        None, "Freeze BatchNorm (auto: when --weights=imagenet).")
    augmentation: Optional[str] = setting(
        None, "Training crops/flips. Default: from the dataset kind.",
        choices=("photo", "glyph", "none"))
    # Frozen-backbone mode (issue 32; kdml.training.frozen): features computed once.
    freeze_backbone: bool = setting(
        False, "Train only the head and the proxies / loss weights on the backbone's features, "
               "computed once per image (no augmentation) and cached in <output_dir>/features.")
    eval_crop_fraction: Optional[float] = None

    # Optimisation.
    classes_per_batch: int = setting(32, "P: classes per batch.")
    views: Optional[int] = setting(
        None, "Independently augmented views of each sampled image in a batch (1 or 2; the "
              "views of an image are adjacent rows). Default: 2 for supcon and ntxent, else 1.")
    images_per_class: int = setting(4, "K: images per class in a batch.")
    epochs: int = setting(30, "Epochs of ceil(N_train / (P x K)) steps.")
    steps_per_epoch: int = setting(
        0, "Training steps per epoch (0: ceil(N_train / (P x K)), one pass over the training "
           "images). A fixed count trains runs on splits of different sizes equally long.")
    lr: Optional[float] = setting(
        None, "AdamW learning rate. Default: 1e-3 for glyphs (from scratch), "
              "1e-4 for photos (fine-tuning).")
    weight_decay: float = setting(1e-4, "AdamW decoupled weight decay.")
    proxy_lr_multiplier: float = setting(100.0, "Proxies' lr / backbone lr.")
    warmup_epochs: Optional[int] = setting(
        None, "Epochs that train only head and proxies. Default: 1 with pretrained weights, else 0.")
    alpha: float = setting(32.0, "Proxy Anchor scale alpha.")
    margin: float = setting(0.1, "Proxy Anchor margin delta.")
    ms_alpha: float = setting(2.0, "Multi-Similarity positive scale.")
    ms_beta: float = setting(50.0, "Multi-Similarity negative scale.")
    ms_base: float = setting(0.5, "Multi-Similarity similarity offset lambda.")
    ms_epsilon: float = setting(0.1, "Multi-Similarity mining margin.")
    # Soft-orthogonal proxies (so_proxy, issue 4): lambda of L_PA + lambda R_SO and the
    # form of R_SO (kdml.regularizers.SoftOrthogonal). 1e-3: the strength the Omniglot
    # benchmark chose on its validation alphabets (docs/benchmarks.md).
    so_strength: float = setting(
        1e-3, "so_proxy: weight lambda of the soft-orthogonality penalty on the proxies, "
                "in the paper's units (unnormalised ||P^ P^T - I||_F^2).")
    so_normalization: str = setting(
        "none", "so_proxy: none (the paper's sum) or size (divided by C^2).",
        choices=("none", "size"))
    so_mode: str = setting(
        "auto", "so_proxy: ||P P^T - I_C|| (rows), ||P^T P - (C/d) I_d|| (columns), "
                "or auto (rows when C <= d); same gradient, see kdml.regularizers.",
        choices=("auto", "rows", "columns"))
    # Coded Residual Transform (crt, issue 5; docs/design.md 3.3): the main branch is
    # (crt_prototypes, embedding_dim), the auxiliary branches (crt_aux_prototypes[i],
    # crt_aux_dims[i]); each branch gets `base_loss`, plus consistency_weight x
    # SimilarityConsistency(main, aux). Benchmark search spaces: kdml/benchmark/presets.py.
    base_loss: str = setting(
        "ms", "crt: loss of every CRT branch, Multi-Similarity (the paper's) or Proxy "
              "Anchor (proxies per branch, lr x --proxy_lr_multiplier).",
        choices=("ms", "proxy_anchor"))
    crt_prototypes: int = setting(
        64, "crt: prototypes K of the main branch (its size d is --embedding_dim).")
    crt_aux_prototypes: Tuple[int, ...] = setting(
        (32,), "crt: prototypes of each auxiliary branch (empty: main branch only).")
    crt_aux_dims: Tuple[int, ...] = setting(
        (128,), "crt: embedding size of each auxiliary branch (one per --crt_aux_prototypes).")
    crt_temperature: float = setting(
        0.1, "crt: temperature of the prototype-correlation softmax.")
    crt_orthogonality: float = setting(
        1.0, "crt: SoftOrthogonal strength on each branch's prototypes (0: off).")
    consistency_weight: float = setting(
        1.0, "crt: weight of the similarity-matrix consistency, main vs each aux branch.")
    # PDDM (pddm, issue 6; docs/design.md 3.4): the unit's width and dropout, the loss's
    # margins alpha (scores) / beta (squared distances), weight lambda, mining mode;
    # rerank_top_k > 0 adds reranked_recall@K (top-k re-ranked by the unit) to evaluations.
    pddm_alpha: float = setting(0.5, "pddm: margin of the double-header hinge on scores.")
    pddm_beta: float = setting(1.0, "pddm: margin of the embedding hinge on squared distances.")
    pddm_lambda: float = setting(0.5, "pddm: weight of the embedding hinge.")
    pddm_hidden_dim: int = setting(128, "pddm: width of the PDDM unit.")
    pddm_dropout: float = setting(0.0, "pddm: dropout on the unit's hidden layer.")
    pddm_mining: str = setting(
        "per_anchor", "pddm: one hard quadruplet per anchor, or the paper's single one per batch.",
        choices=("per_anchor", "single"))
    pddm_mining_score: str = setting(
        "unit", "pddm: mine quadruplets by the unit's score (the paper) or by cosine (ablation).",
        choices=("unit", "cosine"))
    pddm_unit_loss: str = setting(
        "all_pairs", "pddm: train the unit on the double-header hinge over all (positive, "
                     "negative) pairs, or on the mined hardest quadruplet only (the paper; "
                     "it collapses the unit to a constant score).",
        choices=("all_pairs", "hardest"))
    pddm_hardness: str = setting(
        "semihard", "pddm: negatives of the mined quadruplets: the hardest (the paper), the "
                   "hardest scored below the positive pair (semihard, FaceNet's rule), or "
                   "drawn with P ~ exp(S / --pddm_mining_temperature) (soft). semihard was "
                   "chosen on validation (docs/methods.md).",
        choices=("hardest", "semihard", "soft"))
    pddm_mining_temperature: float = setting(
        0.1, "pddm: temperature tau of --pddm_hardness=soft.")
    pddm_mining_warmup_epochs: int = setting(
        0, "pddm: mine by cosine for the first E epochs, by the unit after (needs "
           "--pddm_mining_score=unit).")
    pddm_normalization: str = setting(
        "before_fc", "pddm: L2-normalise u, v before the unit's FC layers (the paper's Eq. 1) "
                     "or after.",
        choices=("before_fc", "after_fc"))
    pddm_lr_multiplier: float = setting(
        1.0, "pddm: the unit's learning rate / the embedder's (a newly added head; its scores "
             "start near 0, far below the margin pddm_alpha).")
    # Pair and triplet losses (issue 21; docs/design.md 3.5): defaults are those of the
    # pytorch-metric-learning class of the same name. xbm_size > 0 wraps any pair-based
    # method (these five and multi_similarity) in a cross-batch memory of that many rows.
    triplet_margin: float = setting(0.05, "triplet: margin of the triplet loss.")
    triplet_mining: str = setting(
        "all", "triplet: all triplets, batch-hard, FaceNet's semi-hard, or easy positive with "
               "hard negative.", choices=("all", "hard", "semihard", "easy_positive"))
    triplet_distance: str = setting(
        "euclidean", "triplet: distance between L2-normalised embeddings.",
        choices=("euclidean", "squared_euclidean", "cosine"))
    contrastive_pos_margin: float = setting(
        0.0, "contrastive: positive pairs closer than this cost nothing.")
    contrastive_neg_margin: float = setting(
        1.0, "contrastive: negative pairs farther than this cost nothing.")
    contrastive_distance: str = setting(
        "euclidean", "contrastive: distance (cosine: a similarity, the hinges reversed).",
        choices=("euclidean", "squared_euclidean", "cosine"))
    circle_m: float = setting(0.4, "circle: relaxation margin m.")
    circle_gamma: float = setting(80.0, "circle: scale gamma.")
    supcon_temperature: float = setting(0.1, "supcon: temperature tau.")
    ntxent_temperature: float = setting(0.07, "ntxent: temperature tau.")
    ntxent_positives: str = setting(
        "views", "ntxent: positives are the other view of the same image (SimCLR; needs "
                 "--views=2) or every image of the same class.", choices=("views", "class"))
    xbm_size: int = setting(
        0, "Cross-batch memory: keep the last N embeddings of the global batch as extra "
           "pairs for a pair-based method (0: off; N >= the global batch).")
    rerank_top_k: int = setting(
        0, "pddm: also report reranked_recall@K, each query's top-k cosine neighbours "
           "re-ordered by the PDDM unit (0: off).")

    # Classification-based losses (issue 21; docs/design.md 3.6): the class weights are
    # kdml.layers.Proxies (k per class), trained at --proxy_lr_multiplier x lr. Defaults:
    # pytorch-metric-learning's, except proxy_nca_scale (ProxyNCA++'s T = 1/9; PML: 1).
    ns_temperature: float = setting(
        0.05, "normalized_softmax: temperature T of the softmax over cosines / T.")
    cosface_margin: float = setting(0.35, "cosface: cosine margin m.")
    cosface_scale: float = setting(64.0, "cosface: logit scale s.")
    arcface_margin: float = setting(
        28.6, "arcface, subcenter_arcface: angular margin m in DEGREES (28.6 = 0.5 rad).")
    arcface_scale: float = setting(64.0, "arcface, subcenter_arcface: logit scale s.")
    sub_centers: int = setting(3, "subcenter_arcface: sub-centres k per class.")
    proxy_nca_scale: float = setting(
        9.0, "proxy_nca: softmax scale 1 / T on squared distances (ProxyNCA++: T = 1/9).")
    soft_triple_centers: int = setting(10, "soft_triple: centres K per class.")
    soft_triple_la: float = setting(20.0, "soft_triple: logit scale lambda.")
    soft_triple_gamma: float = setting(
        0.1, "soft_triple: temperature gamma of the softmax over a class's centres.")
    soft_triple_margin: float = setting(0.01, "soft_triple: margin delta on the target class.")

    # Execution.
    strategy: str = setting(
        "auto", "tf.distribute strategy (auto: mirrored on >1 GPU; multi_worker: "
                "MultiWorkerMirroredStrategy from the TF_CONFIG environment variable).",
        choices=("auto", "one_device", "mirrored", "multi_worker"))
    mixed_precision: bool = setting(
        False, "mixed_float16 on GPU, mixed_bfloat16 on CPU; losses stay float32.")
    jit_compile: str = setting(
        "auto", "XLA-compile the train step.", choices=("auto", "true", "false"))
    deterministic: bool = setting(
        False, "Bit-for-bit reproducible runs on CPU: one thread per TensorFlow pool and its "
               "op determinism (about 2x slower on 2 cores).")
    seed: int = setting(0, shared_help(
        "seed", "It seeds the data order, augmentation and initialisation."))
    resume: bool = setting(False, "Continue from the newest checkpoint in --output_dir.")
    eval_every: int = setting(1, "Evaluate retrieval every N epochs (and at the end).")
    eval_batch_size: int = 256
    recall_ks: Tuple[int, ...] = setting((1, 2, 4, 8), "K values of Recall@K.")
    checkpoint_every_steps: int = setting(
        0, "Also checkpoint every N steps (0: only at epoch ends).")
    keep_checkpoints: int = setting(3, "Checkpoints kept.")
    verbose: int = setting(
        1, "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            value = getattr(self, field.name)
            if choices and value is not None and value not in choices:
                raise ValueError(
                    f"--{field.name} must be one of {', '.join(choices)}. "
                    f"Received: {field.name}={value!r}")
        if self.views not in (None, 1, 2):
            raise ValueError(f"--views must be 1 or 2. Received: views={self.views!r}")
        if self.steps_per_epoch < 0:
            raise ValueError(f"--steps_per_epoch must be >= 0 (0: one pass over the training "
                             f"images). Received: steps_per_epoch={self.steps_per_epoch}")
        if self.xbm_size < 0:
            raise ValueError(f"--xbm_size must be >= 0 (0: no memory). Received: "
                             f"xbm_size={self.xbm_size}")

    @property
    def batch_size(self) -> int:
        return self.classes_per_batch * self.images_per_class

    def resolved(self, kind: str) -> "TrainConfig":
        """A copy with every `None` field filled from `KIND_DEFAULTS[kind]`, overridden
        by `METHOD_KIND_DEFAULTS[method][kind]`.

        A backbone without pretrained weights (conv4) defaults to `weights="none"`
        whatever the kind; where the kind wants pretrained weights, a keras-hub
        backbone whose weights are not ImageNet's defaults to its published preset
        (`BackboneSpec.default_pretrained_weights`, e.g. "dinov2_small"). With `weights="none"` the warm-up (which protects
        pretrained weights from the untrained head's gradients) defaults to 0 epochs
        and BatchNorm trains.
        """
        defaults = {**KIND_DEFAULTS[kind], **METHOD_KIND_DEFAULTS.get(self.method, {}).get(kind, {})}
        if (self.weights is None and self.backbone is not None
                and defaults["weights"] == "imagenet"):
            defaults["weights"] = _default_pretrained_weights(self.backbone)
        weights = self.weights or defaults["weights"]
        if weights == "none":
            defaults["warmup_epochs"] = 0
        updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        config = dataclasses.replace(self, **updates)
        if config.freeze_batchnorm is None:
            config = dataclasses.replace(config, freeze_batchnorm=weights != "none")
        return config


def _default_pretrained_weights(backbone: str) -> str:
    from kdml.models.backbones import backbone_spec  # imports Keras: only when resolving

    return backbone_spec(backbone).default_pretrained_weights
