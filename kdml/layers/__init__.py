"""Keras layers of kdml (all registered serializable under the package "kdml")."""

from kdml.layers.coded_residual_transform import CodedResidualTransform
from kdml.layers.gem_pooling import GeMPooling
from kdml.layers.heads import PoolingHead
from kdml.layers.l2_normalization import L2Normalization
from kdml.layers.pddm import PDDM, PDDMScoreMatrix
from kdml.layers.pixel_normalization import PixelNormalization
from kdml.layers.proxies import Proxies

__all__ = ["CodedResidualTransform", "GeMPooling", "L2Normalization", "PDDM", "PDDMScoreMatrix", "PixelNormalization", "PoolingHead", "Proxies"]
