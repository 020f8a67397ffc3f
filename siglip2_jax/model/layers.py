"""Building blocks shared by both towers: LayerNorm, MLP, attention, the pre-LN encoder, the MAP head.

Conventions:
- Parameters are stored in `param_dtype` (float32 by default) and cast to the compute `dtype` at use;
  LayerNorm statistics and the attention softmax always run in float32.
- Every parameter carries `axes`: one logical axis name per dimension ("embed", "mlp", "heads", ...),
  from which `siglip2_jax.sharding` derives PartitionSpecs. The encoder's stacked blocks add a leading
  "layers" axis.
- Kernels are (in, out) like Flax; `siglip2_jax.checkpoint.hf` turns torch's (out, in) into this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
_lecun = nnx.initializers.lecun_normal()


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init=_lecun) -> nnx.Param:
    """A parameter with its logical axes; `rngs=None` (or a constant `init`) makes it deterministic."""
    assert len(shape) == len(axes), (shape, axes)
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, shape, dtype), axes=tuple(axes))


def zeros(shape, axes, dtype) -> nnx.Param:
    return param(None, shape, axes, dtype, nnx.initializers.zeros)


def ones(shape, axes, dtype) -> nnx.Param:
    return param(None, shape, axes, dtype, nnx.initializers.ones)


class LayerNorm(nnx.Module):
    def __init__(self, width: int, eps: float, *, dtype, param_dtype=None):
        # float32 always: tiny, and its statistics are computed in float32 anyway
        self.scale = ones((width,), ("embed",), jnp.float32)
        self.bias = zeros((width,), ("embed",), jnp.float32)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, approximate_gelu: bool, *, dtype, param_dtype, rngs):
        self.fc1_kernel = param(rngs, (width, hidden), ("embed", "mlp"), param_dtype)
        self.fc1_bias = zeros((hidden,), ("mlp",), param_dtype)
        self.fc2_kernel = param(rngs, (hidden, width), ("mlp", "embed"), param_dtype)
        self.fc2_bias = zeros((width,), ("embed",), param_dtype)
        self.approximate_gelu = approximate_gelu
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        c = self.dtype
        h = x.astype(c) @ self.fc1_kernel[...].astype(c) + self.fc1_bias[...].astype(c)
        h = jax.nn.gelu(h, approximate=self.approximate_gelu)
        return h @ self.fc2_kernel[...].astype(c) + self.fc2_bias[...].astype(c)


class Attention(nnx.Module):
    """Multi-head attention with one fused (in, q|k|v, heads, head_dim) projection.

    Self-attention runs the fused projection as one matmul; the MAP head's cross-attention (a learned
    query against the tokens) uses the same weights, split into the query part and the key/value part.

    `implementation`: "einsum" computes heads-major attention with plain einsums (the fastest on CPU:
    ~15% over the generic path, no layout transposes); "xla" or "cudnn" call
    `jax.nn.dot_product_attention` with that implementation (cudnn: flash attention on NVIDIA GPUs);
    None picks cudnn-capable `dot_product_attention` on GPU and "einsum" elsewhere. The softmax is
    float32 in every case.
    """

    def __init__(self, width: int, num_heads: int, *, dtype, param_dtype, rngs, implementation=None):
        head_dim = width // num_heads
        self.qkv_kernel = param(rngs, (width, 3, num_heads, head_dim), ("embed", None, "heads", None), param_dtype)
        self.qkv_bias = zeros((3, num_heads, head_dim), (None, "heads", None), param_dtype)
        self.out_kernel = param(rngs, (num_heads, head_dim, width), ("heads", None, "embed"), param_dtype)
        self.out_bias = zeros((width,), ("embed",), param_dtype)
        self.scale = head_dim ** -0.5
        self.dtype = dtype
        self.implementation = implementation

    def __call__(self, x: Array, key_mask: Array | None = None, query: Array | None = None) -> Array:
        """x: (B, S, D) tokens; key_mask: (B, S) bool, True for real tokens; query: (B, T, D) or None (self)."""
        c = self.dtype
        w, b = self.qkv_kernel[...].astype(c), self.qkv_bias[...].astype(c)
        x = x.astype(c)
        impl = self.implementation or ("einsum" if jax.default_backend() != "gpu" else None)
        if impl == "einsum":
            out = self._einsum_attention(x, w, b, key_mask, query)
            return jnp.einsum("bhte,hed->btd", out, self.out_kernel[...].astype(c)) + self.out_bias[...].astype(c)
        if query is None:
            q, k, v = jnp.unstack(jnp.einsum("bsd,dkhe->kbshe", x, w) + b[:, None, None], axis=0)
        else:
            q = jnp.einsum("btd,dhe->bthe", query.astype(c), w[:, 0]) + b[0]
            k, v = jnp.unstack(jnp.einsum("bsd,dkhe->kbshe", x, w[:, 1:]) + b[1:, None, None], axis=0)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.scale, implementation=impl)
        return jnp.einsum("bthe,hed->btd", out, self.out_kernel[...].astype(c)) + self.out_bias[...].astype(c)

    def _einsum_attention(self, x, w, b, key_mask, query) -> Array:
        """Heads-major (B, H, T, E) attention: every einsum is a plain batched matmul."""
        if query is None:
            qkv = jnp.einsum("bsd,dkhe->kbhse", x, w) + b[:, None, :, None]
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = jnp.einsum("btd,dhe->bhte", query.astype(x.dtype), w[:, 0]) + b[0][None, :, None]
            kv = jnp.einsum("bsd,dkhe->kbhse", x, w[:, 1:]) + b[1:, None, :, None]
            k, v = kv[0], kv[1]
        logits = jnp.einsum("bhte,bhse->bhts", q, k, preferred_element_type=jnp.float32) * self.scale
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhts,bhse->bhte", probs, v)


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width, mlp_dim, num_heads, eps, approximate_gelu, *, dtype, param_dtype, rngs,
                 attention_impl=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(width, eps, **kw)
        self.attn = Attention(width, num_heads, rngs=rngs, implementation=attention_impl, **kw)
        self.norm2 = LayerNorm(width, eps, **kw)
        self.mlp = Mlp(width, mlp_dim, approximate_gelu, rngs=rngs, **kw)

    def __call__(self, x: Array, key_mask: Array | None) -> Array:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class Encoder(nnx.Module):
    """`depth` blocks whose parameters are stacked on a leading "layers" axis and run with `lax.scan`:
    one compiled block instead of `depth` copies (compile time stays flat as models grow)."""

    def __init__(self, depth: int, *, rngs: nnx.Rngs, **block_kwargs):
        keys = jax.random.split(rngs.params(), depth)

        @nnx.vmap(in_axes=0, out_axes=0)
        def make_blocks(key):
            return EncoderBlock(rngs=nnx.Rngs(params=key), **block_kwargs)

        self.blocks = make_blocks(keys)
        for _, var in nnx.iter_graph(self.blocks):
            if isinstance(var, nnx.Param):
                var.set_metadata("axes", ("layers", *var.get_metadata()["axes"]))

    def __call__(self, x: Array, key_mask: Array | None = None, return_hidden: bool = False):
        """Returns (output, per-block outputs stacked as (depth, B, S, D) or None)."""
        graphdef, stacked = nnx.split(self.blocks)

        def step(h, layer_state):
            h = nnx.merge(graphdef, layer_state)(h, key_mask)
            return h, (h if return_hidden else None)

        x, hidden = jax.lax.scan(step, x, stacked)
        return x, hidden


class MapHead(nnx.Module):
    """Multi-head attention pooling: one learned query attends over the tokens, then a residual MLP."""

    def __init__(self, width, mlp_dim, num_heads, eps, approximate_gelu, *, dtype, param_dtype, rngs,
                 attention_impl=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.probe = param(rngs, (1, width), (None, "embed"), param_dtype, nnx.initializers.normal(1.0))
        self.attn = Attention(width, num_heads, rngs=rngs, implementation=attention_impl, **kw)
        self.norm = LayerNorm(width, eps, **kw)
        self.mlp = Mlp(width, mlp_dim, approximate_gelu, rngs=rngs, **kw)

    def __call__(self, x: Array, key_mask: Array | None = None) -> Array:
        query = jnp.broadcast_to(self.probe[...], (x.shape[0], *self.probe.shape))
        h = self.attn(x, key_mask, query=query)
        h = h + self.mlp(self.norm(h))
        return h[:, 0]
