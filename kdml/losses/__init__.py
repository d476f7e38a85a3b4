"""kdml losses: batch-level deep-metric-learning objectives (docs/design.md 3)."""

from kdml.losses.arcface import ArcFaceLoss
from kdml.losses.circle import CircleLoss
from kdml.losses.contrastive import ContrastiveLoss
from kdml.losses.cosface import CosFaceLoss
from kdml.losses.cross_batch_memory import CrossBatchMemory
from kdml.losses.multi_branch import MultiBranchLoss
from kdml.losses.multi_similarity import MultiSimilarityLoss
from kdml.losses.normalized_softmax import NormalizedSoftmaxLoss
from kdml.losses.ntxent import NTXentLoss
from kdml.losses.pddm_loss import PDDMLoss
from kdml.losses.proxy_anchor import ProxyAnchorLoss
from kdml.losses.proxy_nca import ProxyNCALoss
from kdml.losses.similarity_consistency import SimilarityConsistency
from kdml.losses.soft_triple import SoftTripleLoss
from kdml.losses.subcenter_arcface import SubCenterArcFaceLoss, dominant_center_cleanup
from kdml.losses.supcon import SupConLoss
from kdml.losses.triplet_margin import TripletMarginLoss

__all__ = ["ArcFaceLoss", "CircleLoss", "ContrastiveLoss", "CosFaceLoss", "CrossBatchMemory",
           "MultiBranchLoss", "MultiSimilarityLoss", "NTXentLoss", "NormalizedSoftmaxLoss",
           "PDDMLoss", "ProxyAnchorLoss", "ProxyNCALoss", "SimilarityConsistency",
           "SoftTripleLoss", "SubCenterArcFaceLoss", "SupConLoss", "TripletMarginLoss"]
