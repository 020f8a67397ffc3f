"""`siglip2_jax.load(...)`: a checkpoint, its tokenizer and preprocessing, and jit-compiled towers.

Inputs of any count are cut into batches of at most `batch_size` and the last one is padded up to a
power of two, so a notebook compiles a handful of shapes once (1, 2, 4, ... batch_size) and never
again for batch 7 after batch 8. On a mesh the batch is split over the "data" axis and the weights are
placed by `siglip2_jax.sharding`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint import write_checkpoint
from .config import DEFAULT_MODEL, DEFAULT_TEMPLATE, Siglip2Config, check_template  # noqa: F401 (DEFAULT_MODEL: re-exported)
from .images import ImagePreprocessor, NaFlexBatch
from .losses import cosine_logits
from .model.build import in_compute_dtype, model_from_params, params_of
from .model_source import ModelSource
from .engine import BatchEngine, Pending
from .params import Layout
from .sharding import param_shardings



@dataclasses.dataclass
class PatchFeatures:
    """Dense image features: `features[i, n]` is patch n of image i (post-LayerNorm tokens, the ones the
    pooling head reads); `positions[i, n]` is its (row, col) in the patch grid; `mask[i, n]` is False for
    padding (NaFlex); `grid[i]` is (rows, cols). Pixel box of a patch: rows * p .. (row + 1) * p of the
    resized image."""

    features: np.ndarray
    positions: np.ndarray
    mask: np.ndarray
    grid: np.ndarray
    patch_size: int


class Siglip2Pipeline:
    def __init__(self, config: Siglip2Config, params: dict, *, tokenizer=None, dtype=jnp.float32, mesh=None,
                 max_num_patches: int = 256, batch_size: int = 32, source: ModelSource | None = None,
                 preprocessor: ImagePreprocessor | None = None):
        """`params`: flat params (`siglip2_jax.params`) as `load` gives them: per layer, which runs faster
        at inference than the stacked layout (see `model.layers.Encoder`); stacked ones run as a scan.
        `source`: where they came from (`save` copies its tokenizer and processor files)."""
        # the one image preprocessor (default: hub SigLIP 2 settings); it decides the NaFlex budget
        if preprocessor is None and config.vision is not None:
            preprocessor = ImagePreprocessor.for_model(config.vision, max_num_patches=max_num_patches)
        if preprocessor is not None and preprocessor.naflex:
            max_num_patches = preprocessor.max_num_patches
        self.preprocessor = preprocessor
        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        self.max_num_patches, self.batch_size, self.source = max_num_patches, batch_size, source
        self.dtype = dtype = jnp.dtype(dtype)
        # weights read only in the compute dtype are held in it (bit-identical, see in_compute_dtype)
        self.model = model_from_params(config, in_compute_dtype(params, dtype), dtype=dtype)
        self._graphdef, self._state = nnx.split(self.model)
        graphdef = self._graphdef

        def image_embeds(state, images):
            return nnx.merge(graphdef, state).encode_images(images)

        def image_tokens(state, images):
            return nnx.merge(graphdef, state).vision(images).tokens.astype(jnp.float32)

        def text_embeds(state, token_ids):
            return nnx.merge(graphdef, state).encode_texts(token_ids)

        tokens_per_row, pad_rows = {"text": config.text.max_length if config.text else 0}, {}
        if config.vision is not None:
            image_tokens_per_row = max_num_patches if config.vision.naflex else config.vision.num_positions
            tokens_per_row.update(image=image_tokens_per_row, image_tokens=image_tokens_per_row)
            if config.vision.naflex:
                pad_rows.update(image=NaFlexBatch.pad_rows, image_tokens=NaFlexBatch.pad_rows)
        self.engine = BatchEngine({"image": jax.jit(image_embeds), "image_tokens": jax.jit(image_tokens),
                                   "text": jax.jit(text_embeds)}, self._state, tokens_per_row, mesh, pad_rows)

    @property
    def assets_dir(self) -> Path | None:
        """The directory the model was loaded from (None for params given directly)."""
        return self.source.directory if self.source is not None else None

    # ---- inputs -----------------------------------------------------------------------------------
    def preprocess(self, images) -> np.ndarray | NaFlexBatch:
        """Images -> the image tower's input, by `self.preprocessor` (the checkpoint's processor config):
        FixRes float32 (n, S, S, 3); NaFlex a `NaFlexBatch` (patches, mask, spatial_shapes). See
        `ImagePreprocessor`."""
        self._require("vision")
        return self.preprocessor(images)

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        t = self._require("text")
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer (tokenizer.model or tokenizer.json); "
                             "pass token ids to encode_token_ids, or load one with siglip2_jax.tokenizer.Tokenizer")
        return self.tokenizer.encode(texts, max_length=t.max_length)

    # ---- embeddings -------------------------------------------------------------------------------
    def encode_images(self, images) -> np.ndarray:
        """Paths, bytes, PIL images or uint8 arrays -> (n, D) L2-normalized float32 embeddings."""
        self._require("vision")
        return self.engine.map("image", map(self.preprocess, self._chunks(_as_list(images))))

    def encode_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Strings -> (n, P) L2-normalized float32 embeddings (lowercased, tokenized, padded to 64)."""
        return self.encode_token_ids(self.tokenize(texts))

    def encode_token_ids(self, token_ids: np.ndarray) -> np.ndarray:
        self._require("text")
        return self.engine.map("text", self._chunks(np.asarray(token_ids, np.int32).reshape(-1, self.config.text.max_length)))

    def embed_preprocessed(self, inputs, kind: str = "image") -> Pending:
        """One batch of n inputs that is already `preprocess`ed (kind="image") or `tokenize`d (kind="text"),
        dispatched and not waited for: the caller overlaps the next batch's preparation with this one's
        compute, then calls `.result()` for its (n, D) float32 embeddings (the padding up to the compiled
        batch size trimmed off)."""
        self._require("vision" if kind == "image" else "text")
        return self.engine.dispatch(kind, inputs)

    def patch_features(self, images) -> PatchFeatures:
        """Dense per-patch features of each image, with each patch's (row, col)."""
        v = self._require("vision")
        items = _as_list(images)
        tokens, masks, grids = [], [], []
        for start in range(0, len(items), self.batch_size):
            inputs = self.preprocess(items[start:start + self.batch_size])
            n = len(items[start:start + self.batch_size])
            tokens.append(self.engine.run("image_tokens", inputs, n))
            if v.naflex:
                masks.append(inputs.mask.astype(bool))
                grids.append(inputs.spatial_shapes)
            else:
                masks.append(np.ones(tokens[-1].shape[:2], bool))
                grids.append(np.full((n, 2), v.grid_size, np.int32))
        features = np.concatenate(tokens) if tokens else np.zeros((0, 0, v.width), np.float32)
        grid = np.concatenate(grids) if grids else np.zeros((0, 2), np.int32)
        index = np.arange(features.shape[1])
        cols = np.maximum(grid[:, 1:2], 1)
        positions = np.stack([index[None] // cols, index[None] % cols], -1).astype(np.int32)
        mask = np.concatenate(masks) if masks else np.zeros(features.shape[:2], bool)
        positions = np.where(mask[..., None], positions, -1)
        return PatchFeatures(features, positions, mask, grid, v.patch_size)

    # ---- answers ----------------------------------------------------------------------------------
    def logits(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """(n_images, n_texts) float32 logits of L2-normalized (n, D) embeddings: exp(logit_scale) * cosine +
        logit_bias (`losses.pair_logits`)."""
        self._require("vision"), self._require("text")
        return np.asarray(self.model.logits(jnp.asarray(image_embeds, jnp.float32), jnp.asarray(text_embeds, jnp.float32)))

    def match_probability(self, cosine: np.ndarray) -> np.ndarray:
        """Cosine similarities of image-text pairs (any shape) -> the model's probability that each pair
        matches (float32, same shape): the sigmoid of its logit, as `zero_shot` computes it."""
        self._require("vision"), self._require("text")
        return sigmoid(np.asarray(cosine_logits(jnp.asarray(cosine, jnp.float32), self.model.logit_scale[...],
                                                self.model.logit_bias[...])))

    def zero_shot(self, images, labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> np.ndarray:
        """(n_images, n_labels) probabilities, each an independent sigmoid: rows need not sum to 1."""
        labels = list(labels)
        if not labels:
            raise ValueError("zero_shot needs at least one label")
        check_template(template)  # a ValueError naming the template, not str.format's IndexError or KeyError
        texts = [template.format(label) for label in labels]
        return sigmoid(self.logits(self.encode_images(images), self.encode_texts(texts)))

    def rank_images(self, query: str, images, top_k: int | None = None) -> list[tuple[int, float]]:
        """Text -> image retrieval: (image index, probability) best first."""
        probs = sigmoid(self.logits(self.encode_images(images), self.encode_texts([query])))[:, 0]
        return _top(probs, top_k)

    def rank_texts(self, image, texts: Sequence[str], top_k: int | None = None) -> list[tuple[int, float]]:
        """Image -> text retrieval: (text index, probability) best first."""
        probs = sigmoid(self.logits(self.encode_images([image]), self.encode_texts(list(texts))))[0]
        return _top(probs, top_k)

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """A self-contained checkpoint directory (params, config, tokenizer and preprocessor files). Raises
        ValueError for a pipeline loaded with another dtype than float32, which holds its attention and MLP
        weights rounded to that dtype."""
        if self.dtype != jnp.float32:
            raise ValueError(f"save() writes float32 weights, and this pipeline holds its attention and MLP weights "
                             f"in {self.dtype.name} (load(..., dtype={self.dtype.name})): load the checkpoint in float32 to save it")
        params = {path: np.asarray(value) for path, value in params_of(self.model).items()}
        path = write_checkpoint(directory, self.config, params, source=self.config.name,
                                assets_from=self.assets_dir, overwrite=overwrite)
        if self.preprocessor is not None:
            self.preprocessor.save(path)  # this pipeline's settings (its image_size, its budget)
        return path

    # ---- internals --------------------------------------------------------------------------------
    def _require(self, tower: str):
        cfg = getattr(self.config, tower)
        if cfg is None:
            raise ValueError(f"this checkpoint has no {tower} tower")
        return cfg

    def _chunks(self, items):
        """Consecutive slices of at most batch_size items (lazily: the engine bounds what runs ahead)."""
        return (items[s:s + self.batch_size] for s in range(0, len(items), self.batch_size))


def load(source: str | Path | ModelSource = DEFAULT_MODEL, *, dtype=jnp.float32, mesh=None, max_num_patches: int | None = None,
         image_size: int | None = None, batch_size: int = 32, tokenizer=None) -> Siglip2Pipeline:
    """A siglip2-jax checkpoint dir, a local HF model dir, or a hub id (downloaded, converted in memory),
    or a `ModelSource` already resolved from one.

    dtype: compute dtype (float32 or bfloat16; patch/position embeddings and norms stay float32).
    mesh: a `jax.sharding.Mesh` with a "data" (and optionally "model") axis; default: one device.
    max_num_patches: NaFlex patch budget (default: the checkpoint's processor config, else 256; 576, 784,
        1024 for more detail).
    image_size: FixRes models only: run at image_size x image_size pixels instead of the model's own size.
        The position table is resized once, as transformers' `interpolate_pos_encoding=True` does
        (bicubic; a grid of image_size // patch_size patches a side), and images are resized to it.
    Images are preprocessed as the checkpoint's `preprocessor_config.json` says (`ImagePreprocessor`);
    a value that is not implemented raises ConfigError naming the field, before any weight is read.
    """
    model = source if isinstance(source, ModelSource) else ModelSource(source)
    preprocessor = model.preprocessor(max_num_patches=max_num_patches, image_size=image_size)
    shardings = param_shardings(model.config, mesh) if mesh is not None else None
    params = model.params(Layout.PER_LAYER, shardings, image_size=image_size)
    return Siglip2Pipeline(model.config_at(image_size), params, tokenizer=tokenizer if tokenizer is not None else model.tokenizer,
                           dtype=dtype, mesh=mesh, batch_size=batch_size, source=model, preprocessor=preprocessor)


def _as_list(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, Path, bytes, bytearray, np.ndarray)) or not isinstance(images, Sequence):
        return [images]
    return list(images)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logits -> probabilities; SigLIP's are independent per (image, text) pair, not a softmax."""
    return 1.0 / (1.0 + np.exp(-x))


def _top(scores: np.ndarray, top_k: int | None) -> list[tuple[int, float]]:
    order = np.argsort(-scores, kind="stable")[: top_k or len(scores)]
    return [(int(i), float(scores[i])) for i in order]
