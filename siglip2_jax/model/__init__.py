"""Flax NNX modules of SigLIP 2."""

from ..losses import sigmoid_loss
from .layers import TowerOutput
from .siglip import Siglip2, l2_normalize
from .text import TextTower
from .vision import VisionTower, patchify_batch

__all__ = ["Siglip2", "TextTower", "TowerOutput", "VisionTower", "l2_normalize", "patchify_batch", "sigmoid_loss"]
