"""Embedders: backbones by name and the backbone + head model."""

from kdml.models.backbones import BACKBONES, BackboneSpec, backbone_spec, build_backbone
from kdml.models.embedder import HEADS, build_embedder, build_head, split_embedder
from kdml.models.multi_branch import multi_branch_model

__all__ = ["BACKBONES", "BackboneSpec", "HEADS", "backbone_spec", "build_backbone", "build_embedder",
           "build_head", "multi_branch_model", "split_embedder"]
