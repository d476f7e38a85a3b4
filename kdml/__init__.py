"""kdml: deep metric learning for TensorFlow / Keras 3.

Public API:
    kdml.layers       Proxies, PoolingHead, L2Normalization, PixelNormalization,
                      CodedResidualTransform, PDDM, PDDMScoreMatrix
    kdml.losses       ProxyAnchorLoss, MultiSimilarityLoss, SimilarityConsistency,
                      MultiBranchLoss, PDDMLoss
    kdml.optimizers   GroupedAdamW (per-group learning rates)
    kdml.regularizers SoftOrthogonal (proxy / prototype diversity)
    kdml.models       build_embedder, build_backbone, multi_branch_model
    kdml.data         load_dataset, train_dataset, eval_dataset, class_balanced_batches
    kdml.embedding    load_embedder, read_image_set, embed_image_set (shared by evaluation,
                      kdml.index and kdml.export)
    kdml.evaluation   retrieval_metrics, exact_knn, few_shot_accuracy
    kdml.methods      the method table used by `python -m kdml.train`
    kdml.export       export_embedder, load_embedder, parity_report (`python -m kdml.export`)

Importing kdml registers every layer, loss and optimizer with Keras, so `.keras`
files reload with `keras.saving.load_model` and no `custom_objects`.
"""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from kdml import quiet_startup as _quiet_startup  # noqa: E402

if _quiet_startup.is_kdml_command_line():  # `python -m kdml.<command>`: before TensorFlow loads
    _quiet_startup.quiet_startup()

from kdml import data, embedding, evaluation, layers, losses, models, optimizers  # noqa: E402,F401
from kdml import regularizers  # noqa: E402,F401
from kdml.version import __version__  # noqa: E402,F401
