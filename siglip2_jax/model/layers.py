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

import contextlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import attention_core, matmul, project

Array = jax.Array
_lecun = nnx.initializers.lecun_normal()


class TowerOutput(NamedTuple):
    """What a tower returns (a pytree: it can leave a `jit`).

    pooled: (B, P) float32, the tower's embedding before L2 normalization;
    tokens: (B, N, D) in the compute dtype, the encoder's output after the final LayerNorm (images: the
        patch features the pooling head reads);
    mask: (B, N) bool, False for padding tokens (NaFlex), or None (every token is real);
    hidden: (len(hidden_layers), B, N, D), the outputs of the blocks asked for, in the order asked, or None.
    """

    pooled: Array
    tokens: Array
    mask: Array | None = None
    hidden: Array | None = None


def exact_float32_dots(dtype):
    """The context a tower is traced in: for a float32 `dtype`, every dot on float32 inputs is computed in
    float32 (`jax.default_matmul_precision("float32")`); for other dtypes, nothing changes.

    Why: by default JAX computes float32 dots in TF32 on NVIDIA GPUs since Ampere, and in one bfloat16 pass
    on TPU (JAX's "Matmul precision" page), about 1e-3 relative error; transformers computes float32 in
    float32 (torch's `allow_tf32` is off for matmuls by default). A float32 model here means float32
    numbers, on every backend; bfloat16 is the fast dtype. On CPU this changes nothing."""
    if jnp.dtype(dtype) == jnp.float32:
        return jax.default_matmul_precision("float32")
    return contextlib.nullcontext()


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
    def __init__(self, width: int, eps: float, *, dtype):
        # parameters float32 whatever the model's param_dtype: tiny, and its statistics are float32 anyway
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
        compute = self.dtype
        h = matmul(x.astype(compute), self.fc1_kernel[...].astype(compute)) + self.fc1_bias[...].astype(compute)
        # in float32 whatever the compute dtype: XLA:CPU's bfloat16 tanh is slow and less precise (bf16 B/16
        # images at batch 8: 826 against 927 ms, one process alternating; `python bench/peers.py --variants
        # b16-224 --runtimes ours-bf16` re-measures); on GPU fused bf16 elementwise code computes in float32 anyway
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=self.approximate_gelu).astype(compute)
        return matmul(h, self.fc2_kernel[...].astype(compute)) + self.fc2_bias[...].astype(compute)


class Attention(nnx.Module):
    """Multi-head attention with one fused (in, q|k|v, heads, head_dim) projection: project, then the
    attention core (`siglip2_jax.model.attention`), then the output projection.

    Self-attention runs the fused projection as one matmul; the MAP head's cross-attention (a learned
    query against the tokens) uses the same weights, split into the query part and the key/value part.
    `implementation`: "einsum", "xla", "cudnn", or None for the backend's default (see `attention_core`).
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
        """x: (B, S, D) tokens; key_mask: (B, S) bool, True for real tokens; query: (B or 1, T, D), or None for
        self-attention. Returns (B, T or S, D)."""
        compute = self.dtype
        w, b = self.qkv_kernel[...].astype(compute), self.qkv_bias[...].astype(compute)
        x = x.astype(compute)
        if query is None:
            return self._attend(*project(x, w, b), key_mask)
        # cross-attention (the MAP head): a query shared by the batch is projected once, and each
        # image's few rows are attended and projected in fixed blocks of images (see in_row_blocks)
        (q,) = project(query.astype(compute), w[:, :1], b[:1])
        q = jnp.broadcast_to(q, (x.shape[0], *q.shape[1:]))
        k, v = project(x, w[:, 1:], b[1:])
        return in_row_blocks(lambda block: self._attend(*block), (q, k, v, key_mask))

    def _attend(self, q, k, v, key_mask) -> Array:
        """(B, T, H, E) q and (B, S, H, E) k, v -> (B, T, D) attention output, projected."""
        compute = self.dtype
        out = attention_core(q, k, v, key_mask, self.scale, self.implementation)
        batch, length, heads, head_dim = out.shape
        wo = self.out_kernel[...].astype(compute).reshape(heads * head_dim, -1)
        return matmul(out.reshape(batch, length, heads * head_dim), wo) + self.out_bias[...].astype(compute)


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width, mlp_dim, num_heads, eps, approximate_gelu, *, dtype, param_dtype, rngs,
                 attention_impl=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(width, eps, dtype=dtype)
        self.attn = Attention(width, num_heads, rngs=rngs, implementation=attention_impl, **kw)
        self.norm2 = LayerNorm(width, eps, dtype=dtype)
        self.mlp = Mlp(width, mlp_dim, approximate_gelu, rngs=rngs, **kw)

    def __call__(self, x: Array, key_mask: Array | None) -> Array:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class Encoder(nnx.Module):
    """`depth` pre-LN blocks, in one of two parameter layouts.

    stacked=True (checkpoints, training): the blocks' parameters are stacked on a leading "layers" axis
    and run with `lax.scan`, one compiled block instead of `depth` copies (compile time stays flat).
    stacked=False (inference): one block per layer. Inside a compiled scan each layer's slice of the
    stacked weights is copied out on every call, which at small batches costs 15-30% of the encoder;
    separate arrays are read in place. `siglip2_jax.params.to_layout` converts params between the two
    (`Layout.STACKED` / `Layout.PER_LAYER`).
    """

    def __init__(self, depth: int, *, rngs: nnx.Rngs, stacked: bool = True, **block_kwargs):
        self.depth = depth
        keys = jax.random.split(rngs.params(), depth)

        @nnx.vmap(in_axes=0, out_axes=0)
        def make_blocks(key):
            return EncoderBlock(rngs=nnx.Rngs(params=key), **block_kwargs)

        blocks = make_blocks(keys)   # one traced init for all layers, also per layer (50x faster to build)
        self.stacked = stacked
        if not stacked:
            graphdef, state = nnx.split(blocks)
            flat = [(path, jnp.unstack(var.get_value()), var) for path, var in nnx.to_flat_state(state)]
            self.layers = nnx.List([nnx.merge(graphdef, nnx.from_flat_state([(path, var.replace(values[i]))
                                                                             for path, values, var in flat]))
                                    for i in range(depth)])
            return
        self.blocks = blocks
        for _, var in nnx.iter_graph(self.blocks):
            if isinstance(var, nnx.Param):
                var.set_metadata("axes", ("layers", *var.get_metadata()["axes"]))

    def __call__(self, x: Array, key_mask: Array | None = None, hidden_layers: Sequence[int] | None = None):
        """x: (B, S, D); key_mask: (B, S) bool or None. Returns (output (B, S, D), the outputs of blocks
        `hidden_layers` (0 = the first block, negative from the last) stacked as (len, B, S, D), or None
        when hidden_layers is None). Only the blocks asked for are kept. Raises ValueError for a block
        index out of range."""
        wanted = self.layer_indices(hidden_layers)
        asked = set(wanted or ())
        if not self.stacked:
            outputs = {}
            for i, block in enumerate(self.layers):
                x = block(x, key_mask)
                if i in asked:
                    outputs[i] = x
            return x, _stacked_outputs(outputs, wanted, x)

        graphdef, stacked = nnx.split(self.blocks)

        def step(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, key_mask), None

        # one scan per run of blocks up to a block asked for (one scan in all when none is asked for), so
        # that no more than the asked outputs are kept
        outputs, start = {}, 0
        for stop in sorted({i + 1 for i in asked}) + [self.depth]:
            if stop > start:
                part = stacked if (start, stop) == (0, self.depth) else jax.tree.map(lambda w: w[start:stop], stacked)
                x, _ = jax.lax.scan(step, x, part)
                outputs[stop - 1] = x
            start = stop
        return x, _stacked_outputs(outputs, wanted, x)

    def layer_indices(self, hidden_layers: Sequence[int] | None) -> list[int] | None:
        """`hidden_layers` as block indices 0 .. depth - 1 (negative ones count from the last block)."""
        if hidden_layers is None:
            return None
        indices = []
        for i in hidden_layers:
            if not -self.depth <= int(i) < self.depth:
                raise ValueError(f"hidden layer {i}: the encoder has {self.depth} blocks (0 .. {self.depth - 1})")
            indices.append(int(i) % self.depth)
        return indices


def _stacked_outputs(outputs: dict[int, Array], wanted: list[int] | None, x: Array) -> Array | None:
    if wanted is None:
        return None
    if not wanted:
        return jnp.zeros((0, *x.shape), x.dtype)
    return jnp.stack([outputs[i] for i in wanted])


class MapHead(nnx.Module):
    """Multi-head attention pooling: one learned query attends over the tokens, then a residual MLP."""

    def __init__(self, width, mlp_dim, num_heads, eps, approximate_gelu, *, dtype, param_dtype, rngs,
                 attention_impl=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.probe = param(rngs, (1, width), (None, "embed"), param_dtype, nnx.initializers.normal(1.0))
        self.attn = Attention(width, num_heads, rngs=rngs, implementation=attention_impl, **kw)
        self.norm = LayerNorm(width, eps, dtype=dtype)
        self.mlp = Mlp(width, mlp_dim, approximate_gelu, rngs=rngs, **kw)

    def __call__(self, x: Array, key_mask: Array | None = None) -> Array:
        h = self.attn(x, key_mask, query=self.probe[...][None])[:, 0]
        return in_row_blocks(lambda r: r + self.mlp(self.norm(r)), h)


# XLA:CPU chooses a matmul kernel, and with it the order of the sums, by the number of rows: the same
# image's embedding then differed in its last bits between batches of 1, 2 and 8. Per-image rows (the
# pooling heads) are therefore computed in blocks of a fixed row count, so an embedding is the same
# whatever batch it came in (what the server promises); padding rows cost < 1% of a tower.
ROWS_PER_BLOCK = 8


def in_row_blocks(fn, rows):
    """fn applied to blocks of ROWS_PER_BLOCK rows of `rows` (an array or a tuple of arrays, each (B, ...),
    None allowed) -> (B, ...); fn must treat each row on its own. Padding rows are zeros."""
    count = jax.tree.leaves(rows)[0].shape[0]
    blocks = -(-count // ROWS_PER_BLOCK)

    def split(x):
        x = jnp.pad(x, [(0, blocks * ROWS_PER_BLOCK - count)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(blocks, ROWS_PER_BLOCK, *x.shape[1:])

    out = jax.lax.map(fn, jax.tree.map(split, rows))
    return out.reshape(blocks * ROWS_PER_BLOCK, *out.shape[2:])[:count]
