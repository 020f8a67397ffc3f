"""SigLIP's pairwise sigmoid loss: on one device, and in its distributed "ring" form.

Every (image, text) pair of a batch is an independent binary problem: the matching pair is positive, every
other pair negative. For a square batch of n pairs with logits L (n x n):

    loss = -1/n * sum_ij log_sigmoid(L_ij * (2 * I_ij - 1))

(summed over one axis, averaged over the other: the reference's convention, transformers' `return_loss`).

The ring form never builds the global n x n logits: each device keeps its b = n / devices images and starts
with its own b texts (the block holding its positives); the texts then travel one step round the ring of
devices (`ppermute`) and each device adds the loss of its (b x b) block against them, until every device
has seen every text. Memory per device stays O(b^2), and only one block of text embeddings is in flight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

Array = jax.Array


def pair_logits(image_embeds: Array, text_embeds: Array, logit_scale: Array, logit_bias: Array) -> Array:
    """(images, texts) logits of L2-normalized embeddings: exp(logit_scale) * cosine + logit_bias.

    The cosines are float32 dots computed in float32 on every backend. JAX's default on GPU (TF32) and TPU
    (one bf16 pass) rounds each product to about 1e-3, which leaves a cosine about 1e-4 off, and the logit
    scale (about 112 in the released models) multiplies that. Their cost is small next to the towers'."""
    cosine = jnp.matmul(image_embeds, text_embeds.T, precision=jax.lax.Precision.HIGHEST)
    return cosine_logits(cosine, logit_scale, logit_bias)


def cosine_logits(cosine: Array, logit_scale: Array, logit_bias: Array) -> Array:
    """The logits of image-text pairs (any shape) from their cosine similarities; sigmoid gives the
    probability that a pair matches."""
    return cosine * jnp.exp(logit_scale) + logit_bias


def _block_loss_sum(logits: Array, holds_positives: bool) -> Array:
    """-sum of log_sigmoid(label * logit) over one block; labels are +1 on the diagonal of the block
    that pairs each image with its own text, -1 everywhere else."""
    logits = logits.astype(jnp.float32)
    labels = 2.0 * jnp.eye(*logits.shape, dtype=jnp.float32) - 1.0 if holds_positives else -1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def sigmoid_loss(logits: Array) -> Array:
    """The loss of a square batch whose pair (i, i) is the positive, from its (n x n) logits."""
    return _block_loss_sum(logits, holds_positives=True) / logits.shape[0]


def ring_sigmoid_loss(image_embeds: Array, text_embeds: Array, logit_scale: Array, logit_bias: Array,
                      mesh: Mesh, axis: str = "data") -> Array:
    """The same loss as `sigmoid_loss(pair_logits(...))` on the global batch, computed block by block.

    image_embeds, text_embeds: (n, d) global arrays (row i of each is a pair), split over the mesh axis
    `axis` (n must be a multiple of its size); logit_scale, logit_bias: scalars. Differentiable.
    """
    devices = mesh.shape[axis]
    if image_embeds.shape[0] % devices:
        raise ValueError(f"batch of {image_embeds.shape[0]} does not split over {devices} devices on {axis!r}")
    global_batch = image_embeds.shape[0]
    ring = [(i, (i + 1) % devices) for i in range(devices)]

    def local_loss(images, texts, scale, bias):
        def block(texts, holds_positives):
            return _block_loss_sum(pair_logits(images, texts, scale, bias), holds_positives)

        def pass_texts_on(_, carry):
            texts, total = carry
            texts = jax.lax.ppermute(texts, axis, ring)
            return texts, total + block(texts, holds_positives=False)

        total = block(texts, holds_positives=True)
        _, total = jax.lax.fori_loop(0, devices - 1, pass_texts_on, (texts, total))
        # normalized by the GLOBAL batch: the per-device sums add up to the single-device loss
        return jax.lax.psum(total, axis) / global_batch

    rows = P(axis, None)
    return jax.shard_map(local_loss, mesh=mesh, in_specs=(rows, rows, P(), P()), out_specs=P())(
        image_embeds, text_embeds, logit_scale, logit_bias)
