"""siglip2-jax: Google's SigLIP 2 vision-language encoders in JAX / Flax NNX.

The public names below are imported on first use (PEP 562), so `import siglip2_jax` and
`siglip2-jax --help` stay fast; `siglip2_jax.load` imports jax and flax when it is first touched.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING

try:
    __version__ = metadata.version("siglip2-jax")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    "DEFAULT_MODEL": "config", "Siglip2Config": "config", "TextConfig": "config", "VisionConfig": "config",
    "ModelSource": "model_source", "PatchFeatures": "pipeline", "Siglip2Pipeline": "pipeline", "load": "pipeline",
    "read_embeddings": "embed_store",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from .config import DEFAULT_MODEL, Siglip2Config, TextConfig, VisionConfig
    from .embed_store import read_embeddings
    from .model_source import ModelSource
    from .pipeline import PatchFeatures, Siglip2Pipeline, load


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
