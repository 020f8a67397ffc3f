"""The attention core, apart from the module that holds its weights (`layers.Attention`):

    matmul:          x @ kernel accumulated in float32 (every projection of the towers goes through it)
    project:         x (B, S, D) @ the fused (D, n, H, E) kernel -> n arrays of (B, S, H, E)
    attention_core:  q (B, T, H, E), k and v (B, S, H, E), key mask -> softmax(q k^T * scale) v, (B, T, H, E)

`attention_core` runs one of three kernels: "einsum", heads-major einsums written here (the fastest on
CPU, where they also loop over groups of (image, head) pairs whose logits would leave the cache); "xla"
or "cudnn", `jax.nn.dot_product_attention` with that implementation (cudnn: flash attention on NVIDIA
GPUs); None takes `siglip2_jax.defaults.attention_implementation()`. Logits and softmax are float32 in
every case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import defaults

Array = jax.Array


def matmul(x: Array, kernel: Array) -> Array:
    """x (..., D) @ kernel (D, N) -> (..., N), accumulated in float32 and returned in x's dtype.

    For float32 this is plain `x @ kernel`. For bfloat16 it is the precise form, and on CPU also the fast
    one: XLA:CPU runs bf16 x bf16 -> f32 dots on its AVX512-BF16/AMX library kernels, while a dot with a
    bf16 result takes a slow path. At 1568x768x3072 on the 2-core Xeon: 415 GFLOP/s, against 142 for the
    bf16 result and 134 for float32 (`python bench/peers.py --runtimes ours ours-bf16` times the towers)."""
    return jnp.matmul(x, kernel, preferred_element_type=jnp.float32).astype(x.dtype)


def project(x: Array, kernel: Array, bias: Array) -> list[Array]:
    """x (B, S, D) times kernel (D, n, H, E) plus bias (n, H, E) -> n arrays of (B, S, H, E).

    A plain 2-D matmul against the kernel as stored ((D, n*H*E) after a free reshape); the activations
    are what gets reshaped: an einsum asking for a heads-major output made XLA transpose the whole
    weight matrix on every call (~30% of a text layer at batch 1 on CPU; `python bench/speed.py
    --variants b16-224 --batches 1` times the text tower at batch 1)."""
    batch, length, width = x.shape
    _, n, heads, head_dim = kernel.shape
    y = matmul(x.reshape(batch * length, width), kernel.reshape(width, -1)).reshape(batch, length, n, heads, head_dim)
    return list(jnp.unstack(y + bias, axis=2))


def attention_core(q: Array, k: Array, v: Array, key_mask: Array | None, scale: float,
                   implementation: str | None = None) -> Array:
    """q (B, T, H, E), k and v (B, S, H, E), key_mask (B, S) bool (True for real tokens) or None ->
    softmax(q k^T * scale) v as (B, T, H, E), in v's dtype. `implementation`: "einsum", "xla", "cudnn",
    or None for the backend's default (see the module docstring)."""
    implementation = implementation or defaults.attention_implementation()
    if implementation == "einsum":
        return _heads_major_attention(q, k, v, key_mask, scale)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)


def _heads_major_attention(q: Array, k: Array, v: Array, key_mask: Array | None, scale: float) -> Array:
    """(B, T, H, E) in and out; inside, (B, H, T, E) so that every einsum is a plain batched matmul."""
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    q = q * jnp.asarray(scale, q.dtype)   # on q, not the logits: T*E products instead of T*S
    mask = None if key_mask is None else key_mask[:, None, None, :]
    batch, heads, length, head_dim = q.shape
    pairs = batch * heads
    group = _pairs_per_step(pairs, length * k.shape[2] * 4) if defaults.attention_in_pair_groups() else pairs
    if group == pairs:
        out = _softmax_attention(q, k, v, mask)
    else:
        # one (T, S) logits matrix per (image, head) of a few MB: computed all at once they leave the
        # cache between the two matmuls (3x slower at So400m's 729 tokens on CPU; `python bench/speed.py
        # --variants so400m14-384 --batches 8`), so loop over groups
        steps = [t.reshape(pairs // group, group, *t.shape[2:]) for t in (q, k, v)]
        if mask is not None:
            mask = jnp.broadcast_to(mask, (batch, heads, 1, mask.shape[-1]))
            steps.append(mask.reshape(pairs // group, group, 1, -1))
        out = jax.lax.map(lambda a: _softmax_attention(*a[:3], a[3] if len(a) > 3 else None), steps)
        out = out.reshape(batch, heads, length, head_dim)
    return out.transpose(0, 2, 1, 3)


# Logits of at most this many bytes per (image, head) pair are computed for the whole batch at once;
# larger ones in groups of pairs of up to LOGITS_BYTES_PER_STEP (CPU only; measured on x86-64 with 2 MiB
# of L2 per core, `python bench/speed.py --variants so400m14-384 --batches 8`, and scaled to this
# machine's L2). So400m's attention core at batch 8 ran at 66, 62, 64, 89, 86, 83, 39 GFLOP/s with 1, 2,
# 4, 8, 16, 32, 64 MiB per step there (2026-11-30).
LOGITS_BYTES_ONE_STEP = defaults.scaled_to_l2(1 << 19)
LOGITS_BYTES_PER_STEP = defaults.scaled_to_l2(8 << 20)


def _pairs_per_step(pairs: int, pair_bytes: int) -> int:
    if pair_bytes <= LOGITS_BYTES_ONE_STEP:
        return pairs
    limit = max(1, LOGITS_BYTES_PER_STEP // pair_bytes)
    return max(d for d in range(1, min(pairs, limit) + 1) if pairs % d == 0)


def _softmax_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """softmax(q k^T) v over the last two axes, normalised after the second matmul (T*E divisions
    instead of T*S); logits and the softmax in float32."""
    logits = jnp.einsum("...te,...se->...ts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(logits - logits.max(-1, keepdims=True))
    out = jnp.einsum("...ts,...se->...te", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / weights.sum(-1, keepdims=True)).astype(v.dtype)
