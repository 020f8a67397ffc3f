"""siglip2-jax: Google's SigLIP 2 vision-language encoders in JAX / Flax NNX."""

from .config import Siglip2Config, TextConfig, VisionConfig
from .embed import read_embeddings
from .pipeline import DEFAULT_MODEL, PatchFeatures, Siglip2Pipeline, load

__all__ = ["DEFAULT_MODEL", "PatchFeatures", "Siglip2Config", "Siglip2Pipeline", "TextConfig", "VisionConfig", "load",
           "read_embeddings"]
