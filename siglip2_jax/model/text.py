"""The text tower: token + position embeddings, the pre-LN encoder with no mask at all, a final
LayerNorm, then the LAST position (usually a pad token) through a linear head.

Pooling the last position and letting pads attend is how SigLIP 2 was trained; it is replicated
as is, not "fixed".
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import TextConfig
from .layers import Encoder, LayerNorm, TowerOutput, exact_float32_dots, in_row_blocks, matmul, param, zeros

Array = jax.Array


class TextTower(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_impl=None, stacked_layers: bool = True):
        self.dtype = dtype
        self.max_length = cfg.max_length
        self.token_embed = param(rngs, (cfg.vocab_size, cfg.width), ("vocab", "embed"), param_dtype,
                                 nnx.initializers.normal(cfg.width ** -0.5))
        self.position = param(rngs, (cfg.max_length, cfg.width), (None, "embed"), jnp.float32,
                              nnx.initializers.normal(cfg.width ** -0.5))
        self.encoder = Encoder(
            cfg.depth, rngs=rngs, stacked=stacked_layers, width=cfg.width, mlp_dim=cfg.mlp_dim,
            num_heads=cfg.num_heads, eps=cfg.layer_norm_eps, approximate_gelu=cfg.approximate_gelu, dtype=dtype,
            param_dtype=param_dtype, attention_impl=attention_impl)
        self.final_norm = LayerNorm(cfg.width, cfg.layer_norm_eps, dtype=dtype)
        self.head_kernel = param(rngs, (cfg.width, cfg.projection_size), ("embed", "proj"), param_dtype)
        self.head_bias = zeros((cfg.projection_size,), ("proj",), param_dtype)

    def __call__(self, token_ids: Array, hidden_layers: Sequence[int] | None = None) -> TowerOutput:
        """token_ids: (B, L) int, L <= max_length (always max_length for the released models).
        Returns a `TowerOutput`: pooled (B, P) float32, tokens (B, L, D), mask None (every position is
        attended, pads included), hidden (len(hidden_layers), B, L, D) the blocks asked for, or None.
        Raises ValueError for ids of another shape."""
        if token_ids.ndim != 2 or token_ids.shape[1] > self.max_length:
            raise ValueError(f"expected token ids of shape (batch, {self.max_length}), got {tuple(token_ids.shape)}")
        length = token_ids.shape[1]
        x = jnp.take(self.token_embed[...], token_ids, axis=0).astype(jnp.float32) + self.position[:length]
        with exact_float32_dots(self.dtype):
            x, hidden = self.encoder(x.astype(self.dtype), None, hidden_layers)
            tokens = self.final_norm(x)
            compute = self.dtype
            kernel, bias = self.head_kernel[...].astype(compute), self.head_bias[...].astype(compute)
            pooled = in_row_blocks(lambda r: matmul(r, kernel) + bias, tokens[:, -1])
        return TowerOutput(pooled.astype(jnp.float32), tokens, None, hidden)
