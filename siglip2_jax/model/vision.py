"""The image tower. FixRes and NaFlex differ only in how pixels become position-embedded tokens.

Both families cut the image into p x p patches, flattened in (py, px, c) order, and embed them with one
linear map (FixRes's stride-p conv is exactly that map). FixRes adds a learned table of grid^2 positions;
NaFlex resizes its learned 16x16 grid to each image's own (h, w) and masks the padded tokens.
Embeddings are computed in float32 whatever the compute dtype: casting them early moves outputs a lot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import VisionConfig
from .layers import Encoder, LayerNorm, MapHead, TowerOutput, exact_float32_dots, param, zeros

if TYPE_CHECKING:  # the model does not import preprocessing (PIL); a NaFlexBatch is a NamedTuple pytree
    from ..images import NaFlexBatch

Array = jax.Array
_EXACT = jax.lax.Precision.HIGHEST  # keep float32 embeddings float32 on TPU/GPU too (no bf16 passes)


def patchify_batch(pixels: Array, patch_size: int) -> Array:
    """jax (B, H, W, C) -> (B, gh * gw, p * p * C), row-major over patches, (py, px, c) inside a patch
    (`siglip2_jax.images.patchify_image` is the same order for one numpy image).
    Rows/columns beyond the last whole patch are dropped, like the reference's VALID convolution."""
    b, h, w, c = pixels.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = pixels[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)


class PatchEmbedding(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs):
        self.kernel = param(rngs, (cfg.patch_dim, cfg.width), (None, "embed"), jnp.float32)
        self.bias = zeros((cfg.width,), ("embed",), jnp.float32)

    def __call__(self, patches: Array) -> Array:
        return jnp.matmul(patches.astype(jnp.float32), self.kernel[...], precision=_EXACT) + self.bias[...]


class FixResEmbedding(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs):
        self.patch_size = cfg.patch_size
        self.grid_size = cfg.grid_size
        self.patch = PatchEmbedding(cfg, rngs=rngs)
        self.position = param(rngs, (cfg.num_positions, cfg.width), (None, "embed"), jnp.float32,
                              nnx.initializers.normal(cfg.width ** -0.5))

    def __call__(self, pixels: Array) -> tuple[Array, None]:
        """pixels: (B, S, S, 3) normalized to [-1, 1]. Returns (tokens (B, N, D) float32, no mask)."""
        if pixels.ndim != 4 or pixels.shape[1] // self.patch_size != self.grid_size or pixels.shape[2] // self.patch_size != self.grid_size:
            raise ValueError(
                f"expected pixels of shape (batch, {self.grid_size * self.patch_size}, "
                f"{self.grid_size * self.patch_size}, 3) (NHWC), got {tuple(pixels.shape)}")
        return self.patch(patchify_batch(pixels, self.patch_size)) + self.position[...], None


def bilinear_antialias_weights(out_size: Array, in_size: int, rows: Array) -> Array:
    """Rows of the (out_size x in_size) matrix that resizes a signal like torch's
    `interpolate(mode="bilinear", antialias=True, align_corners=False)` along one axis.

    `out_size` may be traced (one per image), so this runs under `jit` with static shapes: the rows
    are requested by index (`rows`, any shape) rather than built as a matrix of a traced size.
    When shrinking, the triangle filter widens by in/out (that is the antialias); when growing it is
    plain bilinear. Each row is normalized over the taps that fall inside the input.
    """
    scale = in_size / jnp.asarray(out_size).astype(jnp.float32)
    support = jnp.maximum(scale, 1.0)
    center = (rows.astype(jnp.float32) + 0.5) * scale
    taps = jnp.arange(in_size, dtype=jnp.float32)
    distance = (taps + 0.5 - center[..., None]) / support[..., None]
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(distance))
    return weights / weights.sum(-1, keepdims=True)


def bicubic_weights(out_size: Array, in_size: int, rows: Array) -> Array:
    """Rows of the (out_size x in_size) matrix of torch's `interpolate(mode="bicubic",
    align_corners=False)` (no antialias) along one axis: Keys' cubic kernel with a = -0.75 over the 4
    taps around (row + 0.5) * in / out - 0.5; taps past an edge read the edge value. Same calling
    convention as `bilinear_antialias_weights`."""
    a = -0.75
    scale = in_size / jnp.asarray(out_size).astype(jnp.float32)
    source = (rows.astype(jnp.float32) + 0.5) * scale - 0.5
    taps = jnp.floor(source)[..., None] + jnp.arange(-1, 3, dtype=jnp.float32)       # (..., 4)
    x = jnp.abs(source[..., None] - taps)
    near = ((a + 2) * x - (a + 3)) * x * x + 1                                         # |x| <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a                                    # 1 < |x| < 2
    tap_weights = jnp.where(x <= 1, near, jnp.where(x < 2, far, 0.0))
    index = jnp.clip(taps, 0, in_size - 1).astype(jnp.int32)
    return (tap_weights[..., None] * jax.nn.one_hot(index, in_size, dtype=jnp.float32)).sum(-2)


def resize_position_grid(table: Array, grid_size: int, height: Array, width: Array, num_tokens: int,
                         weights=None) -> Array:
    """A learned (grid_size^2, D) position table, seen as a grid_size x grid_size grid, resized to
    (height, width) with the separable 1-D `weights` (default: `bilinear_antialias_weights`, NaFlex's)
    and flattened row-major into `num_tokens` rows; rows past height * width (padding) repeat row 0.
    height/width may be traced."""
    weights = weights or bilinear_antialias_weights
    n = jnp.arange(num_tokens)
    n = jnp.where(n < height * width, n, 0)
    row_weights = weights(height, grid_size, n // width)   # (N, G)
    col_weights = weights(width, grid_size, n % width)     # (N, G)
    token_weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(num_tokens, -1)
    return jnp.matmul(token_weights, table, precision=_EXACT)


def interpolate_fixres_positions(table: Array, patch_size: int, image_size: int) -> Array:
    """A FixRes position table (G^2, D) for square inputs of `image_size` pixels: (g^2, D) with
    g = image_size // patch_size (the patches a VALID stride-p convolution makes; leftover pixels are
    dropped). As transformers' `interpolate_pos_encoding=True` (SiglipVisionEmbeddings): bicubic,
    align_corners=False, no antialias, the table unchanged when g == G."""
    grid_size = round(table.shape[0] ** 0.5)
    new_grid = image_size // patch_size
    if new_grid == grid_size:
        return table
    return resize_position_grid(jnp.asarray(table, jnp.float32), grid_size, new_grid, new_grid, new_grid ** 2,
                                bicubic_weights)


class NaFlexEmbedding(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs):
        self.grid_size = cfg.grid_size
        self.patch_dim = cfg.patch_dim
        self.patch = PatchEmbedding(cfg, rngs=rngs)
        self.position = param(rngs, (cfg.num_positions, cfg.width), (None, "embed"), jnp.float32,
                              nnx.initializers.normal(cfg.width ** -0.5))

    def __call__(self, images: NaFlexBatch) -> tuple[Array, Array]:
        """images: a `NaFlexBatch`: patches (B, N, p*p*3), mask (B, N), spatial_shapes (B, 2) = (h, w) in
        patches. Returns (tokens (B, N, D) float32, mask (B, N) bool)."""
        patches, mask, shapes = images.patches, images.mask, images.spatial_shapes
        if patches.ndim != 3 or patches.shape[-1] != self.patch_dim:
            raise ValueError(f"expected patches of shape (batch, num_patches, {self.patch_dim}), got {tuple(patches.shape)}")
        positions = jax.vmap(self.resized_positions, in_axes=(0, None))(shapes, patches.shape[1])
        return self.patch(patches) + positions, mask.astype(bool)

    def resized_positions(self, shape: Array, num_tokens: int) -> Array:
        """The learned G x G grid resized to (h, w) (bilinear, antialiased) and flattened row-major into
        `num_tokens` rows; rows past h * w (padding) repeat row 0, as the reference does."""
        return resize_position_grid(self.position[...], self.grid_size, shape[0], shape[1], num_tokens)


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_impl=None, stacked_layers: bool = True):
        self.dtype = dtype
        embedding = NaFlexEmbedding if cfg.naflex else FixResEmbedding
        self.embed = embedding(cfg, rngs=rngs)
        block = dict(width=cfg.width, mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads, eps=cfg.layer_norm_eps,
                     approximate_gelu=cfg.approximate_gelu, dtype=dtype, param_dtype=param_dtype,
                     attention_impl=attention_impl)
        self.encoder = Encoder(cfg.depth, rngs=rngs, stacked=stacked_layers, **block)
        self.post_norm = LayerNorm(cfg.width, cfg.layer_norm_eps, dtype=dtype)
        self.head = MapHead(rngs=rngs, **block)

    def __call__(self, images: Array | NaFlexBatch, hidden_layers: Sequence[int] | None = None) -> TowerOutput:
        """images: FixRes pixels (B, S, S, 3); NaFlex a `NaFlexBatch`. Returns a `TowerOutput`: pooled (B, D)
        float32, tokens (B, N, D) post-LayerNorm patch features, mask (B, N) bool or None (FixRes), hidden
        (len(hidden_layers), B, N, D) the outputs of the encoder blocks asked for (None: not asked)."""
        with exact_float32_dots(self.dtype):
            x, key_mask = self.embed(images)
            x, hidden = self.encoder(x.astype(self.dtype), key_mask, hidden_layers)
            tokens = self.post_norm(x)
            pooled = self.head(tokens, key_mask).astype(jnp.float32)
        return TowerOutput(pooled, tokens, key_mask, hidden)
