"""Where a model comes from, resolved once: a siglip2-jax checkpoint dir, a local HF dir or a hub id.

`ModelSource(x)` finds the local directory (downloading a hub id), reads its config, and from then on
answers every question about the model's origin without going back to the path: what to record as its
source, its preprocessing settings, its tokenizer, its fingerprint, and its params in the layout a job
wants. `load`, `embed`, `search`, `finetune` and `serve` all start from one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from .checkpoint import is_checkpoint, iter_hf_params, read_checkpoint_config, read_hf_config, resolve_source, restore_params
from .config import DEFAULT_MODEL, ConfigError, Siglip2Config
from .images import ImagePreprocessor
from .params import Layout, to_layout


class ModelSource:
    """A model's directory and what it holds; reading no weights until `params` is called.

    Attributes:
      directory: the local directory (for a hub id, its snapshot in the Hugging Face cache).
      source: what to record as the model's origin (the absolute directory for a local path, else the
        hub id as given).
      config: the `Siglip2Config` (named after the source for a HF model).
      is_checkpoint: True for a siglip2-jax checkpoint (Orbax params), False for HF safetensors.

    Raises SourceError (neither a directory nor a reachable hub id), WeightsError (a pickle file) or
    ConfigError (no or a bad config.json)."""

    def __init__(self, source: str | Path = DEFAULT_MODEL):
        path = Path(source).expanduser()
        self.given = str(source)
        self.is_checkpoint = is_checkpoint(path)
        self.directory = path if self.is_checkpoint else resolve_source(source)
        self.source = os.path.abspath(self.directory) if path.exists() else self.given
        if self.is_checkpoint:
            self.config: Siglip2Config = read_checkpoint_config(self.directory)
        else:
            self.config = dataclasses.replace(read_hf_config(self.directory), name=self.given)

    def __repr__(self) -> str:
        return f"ModelSource({self.given!r})"

    def preprocessor(self, *, max_num_patches: int | None = None, image_size: int | None = None) -> ImagePreprocessor | None:
        """The image preprocessor its processor config describes (`ImagePreprocessor.from_dir`), with the
        NaFlex budget / FixRes size overridden when given; None for a text-only model. Raises ConfigError
        for an unimplemented processor setting, an `image_size` for a model without an image tower or a
        NaFlex one, or a `max_num_patches` for a FixRes one."""
        if self.config.vision is None:
            if image_size is not None:
                raise ConfigError(f"image_size={image_size}: {self.given} has no image tower")
            return None
        if max_num_patches is not None and not self.config.vision.naflex:   # it would be ignored without a word
            raise ConfigError(f"max_num_patches={max_num_patches}: {self.given} is a FixRes model, which takes "
                              "image_size (--image-size) instead; the patch budget is for NaFlex models")
        return ImagePreprocessor.from_dir(self.directory, self.config.vision, max_num_patches=max_num_patches,
                                          image_size=image_size)

    @functools.cached_property
    def tokenizer(self):
        """Its `Tokenizer` (tokenizer.json or tokenizer.model), read on first use; None when it has none
        or has no text tower."""
        from .tokenizer import Tokenizer

        if self.config.text is None:
            return None
        try:
            return Tokenizer.from_dir(self.directory)
        except FileNotFoundError:
            return None

    @functools.cached_property
    def fingerprint(self) -> str:
        """`embed_store.fingerprint` of the directory (computed once): what an embed output records of its model."""
        from .embed_store import fingerprint

        return fingerprint(self.directory)

    def config_at(self, image_size: int | None = None) -> Siglip2Config:
        """The config; for a FixRes model run at `image_size` x `image_size` pixels, with that size (the
        params `params(image_size=...)` gives fit it)."""
        if image_size is None:
            return self.config
        return dataclasses.replace(self.config, vision=dataclasses.replace(self.config.vision, image_size=image_size))

    def params(self, layout: Layout = Layout.STACKED, shardings: dict | None = None, *,
               image_size: int | None = None) -> dict:
        """Flat params (`siglip2_jax.params`) in `layout`, as jax arrays (a checkpoint's stored dtype;
        float32 from HF) placed on `shardings` ({path: Sharding} of the stacked layout, as
        `sharding.param_shardings(self.config, mesh)` gives; default: the first device). Orbax checkpoints
        restore each shard on its device; HF safetensors are checked from their headers (WeightsError) and
        read one tensor at a time. `image_size`: a FixRes model's position table resized once for inputs
        of that size (`model.vision.interpolate_fixres_positions`), to go with `config_at(image_size)`."""
        if self.is_checkpoint:
            params = restore_params(self.directory, self.config, shardings, layout=layout)
        else:
            _, leaves = iter_hf_params(self.directory, self.config)
            params = to_layout({path: jax.device_put(value, shardings[path]) if shardings else jnp.asarray(value)
                                for path, value in leaves}, layout)
        if image_size is not None:
            from .model.vision import interpolate_fixres_positions

            key = "vision/embed/position"
            table = interpolate_fixres_positions(params[key], self.config.vision.patch_size, image_size)
            params[key] = jax.device_put(table, shardings[key]) if shardings else table
        return params
