"""Our checkpoint -> a Hugging Face model directory that `transformers` loads.

    OUT/config.json                          model_type "siglip" (FixRes) or "siglip2" (NaFlex)
    OUT/model.safetensors                    or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    OUT/tokenizer.model, tokenizer_config.json, preprocessor_config.json, ...

The tensors come from `hf.key_table` read backwards (`iter_hf_tensors`), so an export of a converted
checkpoint gives back the source's tensors bit for bit. Tensors are written one at a time straight into
the files (no second copy of the model in memory), under a temporary directory renamed into place when
complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from ..config import ConfigError
from .big_vision import hf_assets
from .hf import hf_keys, iter_hf_tensors, key_table
from .orbax_io import ASSET_FILES, orbax_item_of, read_checkpoint_config, replaceable, restore_params, stored_dtypes

DEFAULT_MAX_SHARD_SIZE = "5GB"
_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "5GB" (10^9, as transformers' `max_shard_size`) or "2GiB" (2^30)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max shard size {size!r}: expected a positive size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
              overwrite: bool = False) -> Path:
    """A siglip2-jax checkpoint directory (converted or fine-tuned) -> a HF model directory; returns OUT.

    `transformers.AutoModel.from_pretrained(OUT)` and `AutoProcessor.from_pretrained(OUT)` load it. Weights
    keep their stored dtype (float32 or bfloat16); files past `max_shard_size` bytes are split with an
    index, as `save_pretrained` does. Tokenizer and preprocessing files are copied from the checkpoint;
    those missing are written with the released checkpoints' settings. Raises ConfigError for a
    directory that is not a two-tower siglip2-jax checkpoint, FileExistsError for a non-empty OUT
    without `overwrite`, or one that `overwrite` does not replace (`orbax_io.replaceable`)."""
    checkpoint_dir = Path(checkpoint_dir)
    limit = parse_size(max_shard_size)
    config = read_checkpoint_config(checkpoint_dir)
    if config.vision is None or config.text is None:
        raise ConfigError(f"{checkpoint_dir}: export needs both towers (this checkpoint has one)")
    out_dir = replaceable(out_dir, overwrite, checkpoint_dir)

    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # item by item (see orbax_io.orbax_item_of): only one item's params are in memory at a time
        dtypes = stored_dtypes(checkpoint_dir)
        by_group: dict[str, list] = {}
        for rule in key_table(config):
            by_group.setdefault(orbax_item_of(rule.ours), []).append(rule)
        entries = [(key, rule.hf_shape, dtypes[rule.ours]) for rules in by_group.values() for rule in rules
                   for keys in hf_keys(rule) for key in keys]

        def tensors():
            for group, rules in by_group.items():
                params = restore_params(checkpoint_dir, config, groups={group})
                yield from iter_hf_tensors(config, params, rules)
                del params

        shards = _plan_shards(entries, limit)
        stream = tensors()
        weight_map = {}
        for k, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(staging / name, shard, stream)
            weight_map.update({key: name for key, _, _ in shard})
        if len(shards) > 1:
            total = sum(_nbytes(shape, dtype) for _, shape, dtype in entries)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

        stored = {str(d) for d in dtypes.values()}
        hf = {**config.to_hf(), "architectures": ["Siglip2Model" if config.naflex else "SiglipModel"],
              "dtype": "bfloat16" if stored == {"bfloat16"} else "float32"}
        if config.name:
            hf["_name_or_path"] = config.name
        (staging / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name in ASSET_FILES:
            if (checkpoint_dir / name).is_file():
                shutil.copy2(checkpoint_dir / name, staging / name)
        has_tokenizer = any((checkpoint_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json"))
        for name, text in hf_assets(config, with_tokenizer=has_tokenizer).items():
            if not (staging / name).exists():
                (staging / name).write_text(text)

        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out_dir)
        return out_dir
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _plan_shards(entries: list, limit: int) -> list[list]:
    """Consecutive tensors grouped into files of at most `limit` bytes (a bigger tensor gets its own)."""
    shards, size = [[]], 0
    for entry in entries:
        n = _nbytes(entry[1], entry[2])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def _write_safetensors(path: Path, shard: list, tensors) -> None:
    """The safetensors format (8-byte little-endian header length, JSON header, raw little-endian data),
    written by hand like our reader: the `safetensors` numpy API has no bfloat16, and writing each
    tensor as it is produced keeps a single copy of the model in memory. `tensors` yields (key, array)
    in the order of `shard`."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in shard:
        n = _nbytes(shape, dtype)
        header[key] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key, shape, dtype in shard:
            name, value = next(tensors)
            assert name == key and value.shape == tuple(shape) and value.dtype == dtype, (name, key, value.shape, shape)
            f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)  # native = little-endian here
