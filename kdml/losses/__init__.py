"""kdml losses: batch-level deep-metric-learning objectives (DESIGN.md 3)."""

from kdml.losses.multi_similarity import MultiSimilarityLoss
from kdml.losses.proxy_anchor import ProxyAnchorLoss

__all__ = ["MultiSimilarityLoss", "ProxyAnchorLoss"]
