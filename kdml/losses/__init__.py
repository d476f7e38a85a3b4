"""kdml losses: batch-level deep-metric-learning objectives (docs/design.md 3)."""

from kdml.losses.arcface import ArcFaceLoss
from kdml.losses.cosface import CosFaceLoss
from kdml.losses.multi_branch import MultiBranchLoss
from kdml.losses.multi_similarity import MultiSimilarityLoss
from kdml.losses.normalized_softmax import NormalizedSoftmaxLoss
from kdml.losses.pddm_loss import PDDMLoss
from kdml.losses.proxy_anchor import ProxyAnchorLoss
from kdml.losses.proxy_nca import ProxyNCALoss
from kdml.losses.similarity_consistency import SimilarityConsistency
from kdml.losses.soft_triple import SoftTripleLoss
from kdml.losses.subcenter_arcface import SubCenterArcFaceLoss, dominant_center_cleanup

__all__ = ["ArcFaceLoss", "CosFaceLoss", "MultiBranchLoss", "MultiSimilarityLoss",
           "NormalizedSoftmaxLoss", "PDDMLoss", "ProxyAnchorLoss", "ProxyNCALoss",
           "SimilarityConsistency", "SoftTripleLoss", "SubCenterArcFaceLoss"]
