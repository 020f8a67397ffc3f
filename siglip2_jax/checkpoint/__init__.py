"""Checkpoints: HF safetensors or big_vision .npz -> our self-contained Orbax checkpoint directory
(`convert`), and back out to a Hugging Face model directory (`export_hf`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .big_vision import VARIANTS, convert_big_vision, find_npz, variant_of
from .hf import iter_hf_params, key_table, load_hf_params, read_hf_config
from .hf_export import export_hf
from .orbax_io import is_checkpoint, read_checkpoint_config, restore_params, save_checkpoint, write_checkpoint
from .safetensors_reader import WeightsError
from .sources import SourceError, resolve_source


def convert(source: str | Path, out_dir: str | Path, *, param_dtype=np.float32, overwrite: bool = False,
            progress: bool = False, config=None, tokenizer: str | Path | None = None) -> Path:
    """HF hub id or local HF dir, or a big_vision `.npz` (or a directory or hub id holding one) -> our
    checkpoint dir. Returns the local source it read (the HF dir, or the `.npz` file).

    config / tokenizer apply to `.npz` sources only (see `convert_big_vision`); a HF dir brings its own."""
    npz = find_npz(source)
    local = None if npz is not None else resolve_source(source)
    npz = npz if local is None else find_npz(local)
    if npz is not None:
        convert_big_vision(npz, out_dir, config=config, tokenizer=tokenizer, param_dtype=param_dtype,
                           overwrite=overwrite, progress=progress)
        return npz
    if config is not None or tokenizer is not None:
        raise SourceError(f"{source}: --config and --tokenizer apply to big_vision .npz sources only "
                          f"(a Hugging Face directory brings its own config.json and tokenizer)")
    config, leaves = iter_hf_params(local, param_dtype=param_dtype, progress=progress)
    write_checkpoint(out_dir, config, leaves, source=str(source), assets_from=local, overwrite=overwrite)
    return local


__all__ = ["VARIANTS", "SourceError", "WeightsError", "convert", "convert_big_vision", "export_hf", "variant_of", "is_checkpoint", "iter_hf_params", "key_table", "load_hf_params",
           "read_checkpoint_config", "read_hf_config", "resolve_source", "restore_params", "save_checkpoint", "write_checkpoint"]
