"""Our checkpoint directory: self-contained, so loading it never needs the network.

    OUT/config.json        the model config in HF layout, plus a "siglip2_jax" block (format, source, dtype)
    OUT/params/ITEM/       the params (stacked layout), as a few Orbax items (see `orbax_item_of`)
    OUT/tokenizer.model, tokenizer.json, preprocessor_config.json, ...   copied from the source, when present

The directory is written under a temporary name and renamed into place when complete, so an interrupted
conversion never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..config import ConfigError, Siglip2Config
from ..errors import first_line
from ..model.build import flat_param_shapes
from ..params import Layout, flatten, nest, to_layout

FORMAT_VERSION = 1
ASSET_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "preprocessor_config.json", "processor_config.json")


def is_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / "params").is_dir() and (directory / "config.json").is_file()


def orbax_item_of(path: str) -> str:
    """Params are stored as a few Orbax items (vision.encoder.mlp, text.token_embed, ...), each written
    as soon as it is complete: conversion holds at most about one item's worth of extra copies (the
    largest is ~1.2 GB, So400m's vocabulary), and a job that needs one tower restores only its items.
    An item is a nested tree (what Orbax stores): flat params are nested only here."""
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "encoder":        # vision/encoder/blocks/mlp/fc1_kernel
        return f"{parts[0]}.encoder.{parts[3]}"
    if len(parts) > 1 and parts[1] == "token_embed":
        return f"{parts[0]}.token_embed"
    return parts[0] if len(parts) > 1 else "logit"


def replaceable(out_dir: str | Path, overwrite: bool, *inputs) -> Path:
    """`out_dir` as an absolute path ("..": lexically), once checked that writing it replaces nothing
    but an old output: it is absent or empty; or, with `overwrite`, a model directory (one with a
    config.json) that neither is nor holds any of `inputs` (what the job reads; None, hub ids skipped).
    Raises FileExistsError naming it otherwise: `overwrite` deletes OUT at the end, and an OUT such as
    the source itself or the folder above it would lose the model, or far more, for nothing."""
    out = Path(os.path.abspath(out_dir))
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    if not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (pass overwrite to replace it)")
    if not (out / "config.json").is_file():
        raise FileExistsError(f"{out}: not a model directory (no config.json), so overwrite does not replace "
                              "it; give a new OUT, or delete this one yourself")
    for source in inputs:
        if source is not None and Path(source).exists():
            path = Path(source).resolve()
            if path == out.resolve() or out.resolve() in path.parents:
                raise FileExistsError(f"{out}: is or holds {source}, which is being read; give another OUT")
    return out


class CheckpointWriter:
    """Write a checkpoint parameter by parameter: `add(path, array)` for every parameter of `config`,
    then `finish()`. The directory appears under its name only once complete."""

    def __init__(self, out_dir: str | Path, config: Siglip2Config, *, source: str = "",
                 assets_from: str | Path | None = None, overwrite: bool = False, files: dict | None = None):
        """`files`: {name: text, or a Path to copy} written into the directory besides the copied assets."""
        inputs = [assets_from, source, *(v for v in (files or {}).values() if isinstance(v, Path))]
        self.out_dir = replaceable(out_dir, overwrite, *inputs)
        self.config, self.source, self.assets_from, self.files = config, source, assets_from, files or {}
        self.staging = self.out_dir.with_name(f".{self.out_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(self.staging, ignore_errors=True)
        (self.staging / "params").mkdir(parents=True)
        self.pending: dict[str, set[str]] = {}
        for path in flat_param_shapes(config):
            self.pending.setdefault(orbax_item_of(path), set()).add(path)
        self.buffers: dict[str, dict] = {}
        self.dtypes: set[str] = set()
        # jax arrays rather than numpy, and no compression (weights barely compress): Orbax then makes
        # one extra copy of an item while writing it instead of three, and writes 5x faster
        # written by this process alone, also in a multi-host job (where `finetune` exports from process 0)
        alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                   active_processes={jax.process_index()})
        self.checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False,
                                                                         multiprocessing_options=alone),
                                             multiprocessing_options=alone)

    def add(self, path: str, value) -> None:
        group = orbax_item_of(path)
        if path not in self.pending.get(group, ()):
            raise ValueError(f"{path} is not a parameter of this config, or was added twice")
        self.pending[group].remove(path)
        self.dtypes.add(str(np.dtype(value.dtype)))
        # (Orbax refuses host-local jax arrays in a multi-host job: numpy there)
        self.buffers.setdefault(group, {})[path] = jax.device_put(value) if jax.process_count() == 1 else np.asarray(value)
        if not self.pending[group]:
            items = nest(self.buffers.pop(group))
            self.checkpointer.save(self.staging / "params" / group, ocp.args.PyTreeSave(items))
            del items
            _release_freed_memory()

    def finish(self) -> Path:
        left = sorted(p for paths in self.pending.values() for p in paths)
        if left:
            raise ValueError(f"checkpoint incomplete: {left[0]} and {len(left) - 1} more parameters never added")
        meta = {"format_version": FORMAT_VERSION, "source": self.source, "param_dtypes": sorted(self.dtypes)}
        (self.staging / "config.json").write_text(json.dumps({"_name_or_path": self.config.name or self.source, **self.config.to_hf(), "siglip2_jax": meta}, indent=2) + "\n")
        if self.assets_from is not None:
            for name in ASSET_FILES:
                if (Path(self.assets_from) / name).is_file():
                    shutil.copy2(Path(self.assets_from) / name, self.staging / name)
        for name, content in self.files.items():
            if isinstance(content, Path):
                shutil.copy2(content, self.staging / name)
            else:
                (self.staging / name).write_text(content)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.staging, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def write_checkpoint(out_dir: str | Path, config: Siglip2Config, params, **kwargs) -> Path:
    """`params`: flat params (a dict, in either layout: written stacked), or an iterator of (path, array)
    pairs in the stacked layout, which a converter fills one parameter at a time. Raises ValueError for
    a path that is not a parameter of `config`, or one missing."""
    writer = CheckpointWriter(out_dir, config, **kwargs)
    try:
        for path, value in (to_layout(dict(params), Layout.STACKED).items() if isinstance(params, dict) else params):
            writer.add(path, value)
        return writer.finish()
    finally:
        writer.abort()


def save_checkpoint(out_dir: str | Path, config: Siglip2Config, params: dict, *, source: str = "",
                    assets_from: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write flat params (numpy or jax arrays, either layout) and everything needed to use them."""
    return write_checkpoint(out_dir, config, params, source=source, assets_from=assets_from, overwrite=overwrite)


def read_checkpoint_config(directory: str | Path) -> Siglip2Config:
    return Siglip2Config.from_json(Path(directory) / "config.json")


def restore_params(directory: str | Path, config: Siglip2Config | None = None, shardings: dict | None = None,
                   groups: set[str] | None = None, layout: Layout = Layout.STACKED) -> dict:
    """Flat params in `layout`, as jax arrays placed straight onto `shardings` ({path: `Sharding`}, the
    stacked layout's, as `param_shardings` gives; default: the first device), each device reading only
    its own shards. `groups`: only the params of these items (see `orbax_item_of`), for a job that streams
    a checkpoint item by item. Raises ConfigError for a directory that is not a checkpoint or whose
    params do not match config.json."""
    directory = Path(directory).absolute()  # Orbax resolves relative paths wrongly
    if not is_checkpoint(directory):
        raise ConfigError(f"{directory}: not a siglip2-jax checkpoint (no params/ and config.json)")
    config = config if config is not None else read_checkpoint_config(directory)
    expected = flat_param_shapes(config)
    shardings = shardings or {}
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    only, groups = groups, {}
    for path in expected:
        groups.setdefault(orbax_item_of(path), []).append(path)
    # Orbax holds a second copy of an item while reading it: the biggest items first keep that copy on
    # top of little else, so the peak stays near the size of the params.
    order = sorted(groups, key=lambda g: -sum(np.prod(expected[p].shape) for p in groups[g]))
    order = [g for g in order if only is None or g in only]
    restored = {}
    for group in order:
        item = directory / "params" / group
        if not item.is_dir():
            raise ConfigError(f"{directory}: params/{group} is missing (incomplete or foreign checkpoint)")
        stored = flatten(_metadata_tree(checkpointer, item))
        if set(stored) != set(groups[group]):
            missing, extra = sorted(set(groups[group]) - set(stored)), sorted(set(stored) - set(groups[group]))
            raise ConfigError(f"{item}: params do not match config.json (missing {missing[:3]}, unexpected {extra[:3]})")
        args = {}
        for path, meta in stored.items():
            if tuple(meta.shape) != tuple(expected[path].shape):
                raise ConfigError(f"{item}: {path} has shape {tuple(meta.shape)}, config.json implies {expected[path].shape}")
            sharding = shardings.get(path)
            args[path] = (ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(meta.shape), dtype=meta.dtype)
                          if sharding is not None else ocp.RestoreArgs(restore_type=np.ndarray, dtype=meta.dtype))
        values = flatten(checkpointer.restore(item, ocp.args.PyTreeRestore(restore_args=nest(args))))
        # host arrays (no sharding asked for) go to the default device; on CPU that is not even a copy
        restored.update({p: v if shardings.get(p) is not None else jax.device_put(v) for p, v in values.items()})
    return to_layout(restored, layout)


def stored_dtypes(directory: str | Path) -> dict[str, np.dtype]:
    """{param path: dtype} as stored, from the items' metadata (no data read)."""
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    out = {}
    for item in sorted((Path(directory).absolute() / "params").iterdir()):
        out.update({path: np.dtype(meta.dtype) for path, meta in flatten(_metadata_tree(checkpointer, item)).items()})
    return out


def _release_freed_memory() -> None:
    """Hand memory that the writer threads freed back to the OS (glibc keeps it otherwise, and the next
    item's buffers would be added on top of it in the peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _metadata_tree(checkpointer, path: Path) -> dict:
    """The item's tree of array metadata. Raises ConfigError naming the item if it has none (its _METADATA
    file deleted or damaged: Orbax then returns None or raises)."""
    try:
        meta = checkpointer.metadata(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: unreadable Orbax metadata ({first_line(error)}); incomplete checkpoint? "
                          "Convert it again") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: no readable Orbax metadata (_METADATA or data files missing or "
                          "damaged); incomplete checkpoint? "
                          "Convert it again")
    return tree
