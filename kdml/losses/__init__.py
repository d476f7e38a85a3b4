"""kdml losses: batch-level deep-metric-learning objectives (docs/design.md 3)."""

from kdml.losses.multi_branch import MultiBranchLoss
from kdml.losses.multi_similarity import MultiSimilarityLoss
from kdml.losses.pddm_loss import PDDMLoss
from kdml.losses.proxy_anchor import ProxyAnchorLoss
from kdml.losses.similarity_consistency import SimilarityConsistency

__all__ = ["MultiBranchLoss", "MultiSimilarityLoss", "PDDMLoss", "ProxyAnchorLoss", "SimilarityConsistency"]
