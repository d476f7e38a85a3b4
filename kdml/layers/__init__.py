"""Keras layers of kdml (all registered serializable under the package "kdml")."""

from kdml.layers.heads import PoolingHead
from kdml.layers.l2_normalization import L2Normalization
from kdml.layers.pixel_normalization import PixelNormalization
from kdml.layers.proxies import Proxies

__all__ = ["L2Normalization", "PixelNormalization", "PoolingHead", "Proxies"]
