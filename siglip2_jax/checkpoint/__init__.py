"""Checkpoints: HF safetensors -> our params, and our self-contained Orbax checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .hf import iter_hf_params, key_table, load_hf_params, read_hf_config
from .orbax_io import is_checkpoint, read_checkpoint_config, restore_params, save_checkpoint, write_checkpoint
from .safetensors_reader import WeightsError
from .sources import SourceError, resolve_source


def convert(source: str | Path, out_dir: str | Path, *, param_dtype=np.float32, overwrite: bool = False,
            progress: bool = False) -> Path:
    """HF hub id or local HF dir -> our checkpoint dir. Returns the local source dir it read."""
    local = resolve_source(source)
    config, leaves = iter_hf_params(local, param_dtype=param_dtype, progress=progress)
    write_checkpoint(out_dir, config, leaves, source=str(source), assets_from=local, overwrite=overwrite)
    return local


__all__ = ["SourceError", "WeightsError", "convert", "is_checkpoint", "iter_hf_params", "key_table", "load_hf_params",
           "read_checkpoint_config", "read_hf_config", "resolve_source", "restore_params", "save_checkpoint", "write_checkpoint"]
