"""The two-tower SigLIP 2 model: image and text towers, a learned logit scale and bias.
The logits and the sigmoid loss are in `siglip2_jax.losses`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import Siglip2Config
from ..losses import pair_logits
from .layers import zeros
from .text import TextTower
from .vision import VisionTower

Array = jax.Array


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Siglip2(nnx.Module):
    """Either tower may be absent (standalone vision or text checkpoints)."""

    def __init__(self, config: Siglip2Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, attention_impl=None, stacked_layers: bool = True):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention_impl=attention_impl,
                  stacked_layers=stacked_layers)
        self.config = config
        self.vision = VisionTower(config.vision, **kw) if config.vision is not None else None
        self.text = TextTower(config.text, **kw) if config.text is not None else None
        if self.vision is not None and self.text is not None:
            self.logit_scale = zeros((), (), jnp.float32)
            self.logit_bias = zeros((), (), jnp.float32)

    def encode_images(self, images, normalize: bool = True) -> Array:
        pooled = self.vision(images).pooled
        return l2_normalize(pooled) if normalize else pooled

    def encode_texts(self, token_ids: Array, normalize: bool = True) -> Array:
        pooled = self.text(token_ids).pooled
        return l2_normalize(pooled) if normalize else pooled

    def logits(self, image_embeds: Array, text_embeds: Array) -> Array:
        """(num_images, num_texts) logits from L2-normalized embeddings; sigmoid gives probabilities."""
        return pair_logits(image_embeds, text_embeds, self.logit_scale[...], self.logit_bias[...])

    def __call__(self, images, token_ids: Array) -> dict:
        image_embeds = self.encode_images(images)
        text_embeds = self.encode_texts(token_ids)
        logits_per_image = self.logits(image_embeds, text_embeds)
        return dict(image_embeds=image_embeds, text_embeds=text_embeds,
                    logits_per_image=logits_per_image, logits_per_text=logits_per_image.T)
