"""`python -m kdml.train`: absl flags -> `TrainConfig` -> `kdml.training.train`.

Example:
    python -m kdml.train --method=proxy_anchor --dataset=synthetic --epochs=20
    python -m kdml.train --dataset=tfds:cub200 --download --backbone=resnet50
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags, logging  # noqa: E402

from kdml.config import TrainConfig  # noqa: E402

_D = TrainConfig()
FLAGS = flags.FLAGS
# Method and data.
flags.DEFINE_string("method", _D.method, "Training method: proxy_anchor | multi_similarity | so_proxy | pddm | crt.")
flags.DEFINE_string("dataset", _D.dataset,
                    "synthetic (embedded glyphs) | folder:<dir> | tfds:<cub200|cars196|sop|omniglot>.")
flags.DEFINE_string("eval_dataset", None,
                    "folder:<dir> to evaluate on; then every class of --dataset trains.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_bool("download", _D.download, "Let tensorflow-datasets download a missing dataset.")
flags.DEFINE_bool("verify_images", _D.verify_images,
                  "Decode every image of a folder dataset once before training and skip "
                  "unreadable files (--noverify_images skips the check).")
flags.DEFINE_string("output_dir", _D.output_dir, "Checkpoints, logs, metrics.json, embedder.keras.")
flags.DEFINE_enum("data_kind", None, ["photo", "glyph"],
                  "Picks the defaults of backbone, weights, image size, lr, warm-up and augmentation. "
                  "Default: the dataset's kind (glyph for synthetic and tfds:omniglot, photo otherwise).")
# Model.
flags.DEFINE_string("backbone", None, "conv4 | resnet50 | mobilenet_v3_small | deit_tiny | "
                    "deit_small | deit_base. Default: conv4 for glyphs, resnet50 for photos.")
flags.DEFINE_enum("weights", None, ["none", "imagenet"],
                  "Backbone weights. Default: none for glyphs, imagenet for photos.")
flags.DEFINE_integer("embedding_dim", _D.embedding_dim, "Embedding size d.")
flags.DEFINE_integer("image_size", None, "Square input size. Default: 28 for glyphs, 224 for photos.")
flags.DEFINE_enum("freeze_batchnorm", "auto", ["auto", "true", "false"],
                  "Freeze BatchNorm (auto: when --weights=imagenet).")
flags.DEFINE_enum("augmentation", None, ["photo", "glyph", "none"],
                  "Training crops/flips. Default: from the dataset kind.")
# Optimisation.
flags.DEFINE_integer("classes_per_batch", _D.classes_per_batch, "P: classes per batch.")
flags.DEFINE_integer("images_per_class", _D.images_per_class, "K: images per class in a batch.")
flags.DEFINE_integer("epochs", _D.epochs, "Epochs of ceil(N_train / (P x K)) steps.")
flags.DEFINE_float("lr", None, "AdamW learning rate. Default: 1e-3 for glyphs (from scratch), "
                   "1e-4 for photos (fine-tuning).")
flags.DEFINE_float("weight_decay", _D.weight_decay, "AdamW decoupled weight decay.")
flags.DEFINE_float("proxy_lr_multiplier", _D.proxy_lr_multiplier, "Proxies' lr / backbone lr.")
flags.DEFINE_integer("warmup_epochs", None,
                     "Epochs that train only head and proxies. Default: 1 with pretrained weights, else 0.")
flags.DEFINE_float("alpha", _D.alpha, "Proxy Anchor scale alpha.")
flags.DEFINE_float("margin", _D.margin, "Proxy Anchor margin delta.")
flags.DEFINE_float("ms_alpha", _D.ms_alpha, "Multi-Similarity positive scale.")
flags.DEFINE_float("ms_beta", _D.ms_beta, "Multi-Similarity negative scale.")
flags.DEFINE_float("ms_base", _D.ms_base, "Multi-Similarity similarity offset lambda.")
flags.DEFINE_float("ms_epsilon", _D.ms_epsilon, "Multi-Similarity mining margin.")
flags.DEFINE_float("so_strength", _D.so_strength,
                   "so_proxy: weight lambda of the soft-orthogonality penalty on the proxies.")
flags.DEFINE_enum("so_mode", _D.so_mode, ["auto", "rows", "columns"],
                  "so_proxy: ||P P^T - I_C|| (rows), ||P^T P - (C/d) I_d|| (columns), "
                  "or auto (rows when C <= d); same gradient, see kdml.regularizers.")
flags.DEFINE_enum("base_loss", _D.base_loss, ["ms", "proxy_anchor"],
                  "crt: loss of every CRT branch, Multi-Similarity (the paper's) or Proxy "
                  "Anchor (proxies per branch, lr x --proxy_lr_multiplier).")
flags.DEFINE_integer("crt_prototypes", _D.crt_prototypes,
                     "crt: prototypes K of the main branch (its size d is --embedding_dim).")
flags.DEFINE_list("crt_aux_prototypes", [str(k) for k in _D.crt_aux_prototypes],
                  "crt: prototypes of each auxiliary branch (empty: main branch only).")
flags.DEFINE_list("crt_aux_dims", [str(d) for d in _D.crt_aux_dims],
                  "crt: embedding size of each auxiliary branch (one per --crt_aux_prototypes).")
flags.DEFINE_float("crt_temperature", _D.crt_temperature,
                   "crt: temperature of the prototype-correlation softmax.")
flags.DEFINE_float("crt_orthogonality", _D.crt_orthogonality,
                   "crt: SoftOrthogonal strength on each branch's prototypes (0: off).")
flags.DEFINE_float("consistency_weight", _D.consistency_weight,
                   "crt: weight of the similarity-matrix consistency, main vs each aux branch.")
flags.DEFINE_float("pddm_alpha", _D.pddm_alpha, "pddm: margin of the double-header hinge on scores.")
flags.DEFINE_float("pddm_beta", _D.pddm_beta, "pddm: margin of the embedding hinge on squared distances.")
flags.DEFINE_float("pddm_lambda", _D.pddm_lambda, "pddm: weight of the embedding hinge.")
flags.DEFINE_integer("pddm_hidden_dim", _D.pddm_hidden_dim, "pddm: width of the PDDM unit.")
flags.DEFINE_float("pddm_dropout", _D.pddm_dropout, "pddm: dropout on the unit's hidden layer.")
flags.DEFINE_enum("pddm_mining", _D.pddm_mining, ["per_anchor", "single"],
                  "pddm: one hard quadruplet per anchor, or the paper's single one per batch.")
flags.DEFINE_integer("rerank_top_k", _D.rerank_top_k,
                     "pddm: also report reranked_recall@K, each query's top-k cosine neighbours "
                     "re-ordered by the PDDM unit (0: off).")
# Execution.
flags.DEFINE_enum("strategy", _D.strategy, ["auto", "one_device", "mirrored", "multi_worker"],
                  "tf.distribute strategy (auto: mirrored on >1 GPU; multi_worker: "
                  "MultiWorkerMirroredStrategy from the TF_CONFIG environment variable).")
flags.DEFINE_bool("mixed_precision", _D.mixed_precision,
                  "mixed_float16 on GPU, mixed_bfloat16 on CPU; losses stay float32.")
flags.DEFINE_enum("jit_compile", _D.jit_compile, ["auto", "true", "false"], "XLA-compile the train step.")
flags.DEFINE_integer("seed", _D.seed, "Seed of data order, augmentation and initialisation.")
flags.DEFINE_bool("resume", _D.resume, "Continue from the newest checkpoint in --output_dir.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Evaluate retrieval every N epochs (and at the end).")
flags.DEFINE_list("recall_ks", [str(k) for k in _D.recall_ks], "K values of Recall@K.")
flags.DEFINE_integer("checkpoint_every_steps", _D.checkpoint_every_steps,
                     "Also checkpoint every N steps (0: only at epoch ends).")
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Checkpoints kept.")
flags.DEFINE_integer("verbose", _D.verbose, "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")


def config_from_flags(values=FLAGS) -> TrainConfig:
    """The frozen `TrainConfig` of parsed flags; nothing below this reads flags."""
    freeze = {"auto": None, "true": True, "false": False}[values.freeze_batchnorm]
    return TrainConfig(
        method=values.method, dataset=values.dataset, eval_dataset=values.eval_dataset,
        data_dir=values.data_dir, download=values.download, verify_images=values.verify_images,
        output_dir=values.output_dir,
        data_kind=values.data_kind,
        backbone=values.backbone, weights=values.weights, embedding_dim=values.embedding_dim,
        image_size=values.image_size, freeze_batchnorm=freeze, augmentation=values.augmentation,
        classes_per_batch=values.classes_per_batch, images_per_class=values.images_per_class,
        epochs=values.epochs, lr=values.lr, weight_decay=values.weight_decay,
        proxy_lr_multiplier=values.proxy_lr_multiplier, warmup_epochs=values.warmup_epochs,
        alpha=values.alpha, margin=values.margin, ms_alpha=values.ms_alpha,
        ms_beta=values.ms_beta, ms_base=values.ms_base, ms_epsilon=values.ms_epsilon,
        so_strength=values.so_strength, so_mode=values.so_mode,
        base_loss=values.base_loss, crt_prototypes=values.crt_prototypes,
        crt_aux_prototypes=tuple(int(k) for k in values.crt_aux_prototypes),
        crt_aux_dims=tuple(int(d) for d in values.crt_aux_dims),
        crt_temperature=values.crt_temperature, crt_orthogonality=values.crt_orthogonality,
        consistency_weight=values.consistency_weight,
        pddm_alpha=values.pddm_alpha, pddm_beta=values.pddm_beta, pddm_lambda=values.pddm_lambda,
        pddm_hidden_dim=values.pddm_hidden_dim, pddm_dropout=values.pddm_dropout,
        pddm_mining=values.pddm_mining, rerank_top_k=values.rerank_top_k,
        strategy=values.strategy, mixed_precision=values.mixed_precision,
        jit_compile=values.jit_compile, seed=values.seed, resume=values.resume,
        eval_every=values.eval_every, recall_ks=tuple(int(k) for k in values.recall_ks),
        checkpoint_every_steps=values.checkpoint_every_steps,
        keep_checkpoints=values.keep_checkpoints, verbose=values.verbose,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from kdml.methods import get_method
    from kdml.training import train

    config = config_from_flags()
    try:
        get_method(config.method)  # fail fast, before any data is loaded
        train(config)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        logging.debug("Traceback of the error below:", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
