"""What differs between CPU and accelerators: every default this package picks by `jax.default_backend()`.

    attention_implementation   "einsum" except on GPU (`jax.nn.dot_product_attention`'s own default there)
    attention_in_pair_groups   CPU: the einsum attention loops over groups of (image, head) pairs
    tokens_per_call            CPU: a batch runs as calls of at most CPU_TOKENS_PER_CALL tokens per device
    scaled_to_l2               CPU cache budgets (tokens per call, attention logits per step) scaled to this L2
    loader_workers             CPU: no data-loader worker processes; else one per core but one, up to 32
    compute_dtype              CPU: float32; accelerators: bfloat16 (fine-tuning's dtype "auto")
    embed_part_size            CPU: CPU_PART_SIZE inputs per embed part; accelerators: 4096

jax is imported when a default is asked for, not with this module (the commands' option modules read
the constants without importing jax). Figures were measured on the 2-core x86-64 machine of the README's
tables; each comment names the `bench/` script that measures it again.
"""

from __future__ import annotations

import os
from pathlib import Path

# The cache budgets below were measured on a machine with this much L2 per core (the 2-core Xeon of the
# README's tables); another machine gets them scaled by its own L2 per core (`scaled_to_l2`), within
# [1/4, 4]x. Only the 2 MiB point is measured; the scaling is the assumption that the knee follows the
# cache that the activations leave.
REFERENCE_L2_BYTES = 2 << 20
TOKENS_PER_CALL_ENV = "SIGLIP2_CPU_TOKENS_PER_CALL"


def l2_cache_bytes(root: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The L2 cache per core in bytes, from Linux's sysfs (`root`: cpu0's cache directory); None where it
    cannot be read (other systems, containers that hide it)."""
    root = Path(root)
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip().upper()
                unit = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * unit
    except (OSError, ValueError):
        return None
    return None


def scaled_to_l2(reference_bytes: int, l2_bytes: int | None = None) -> int:
    """A cache budget measured at REFERENCE_L2_BYTES of L2 per core, scaled to this machine's L2 per core
    (`l2_cache_bytes()`, or `l2_bytes`) by at most 4x either way, rounded down to a power of two; the
    reference value itself where the L2 size is unknown."""
    l2 = l2_cache_bytes() if l2_bytes is None else l2_bytes
    if not l2:
        return reference_bytes
    scaled = reference_bytes * min(4.0, max(0.25, l2 / REFERENCE_L2_BYTES))
    return 1 << (int(scaled).bit_length() - 1)


def _cpu_tokens_per_call() -> int:
    value = os.environ.get(TOKENS_PER_CALL_ENV, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value:   # read at import: a warning, not an exception that would stop every command
        import warnings
        warnings.warn(f"${TOKENS_PER_CALL_ENV}={value!r} ignored: expected a positive whole number of tokens", stacklevel=2)
    return scaled_to_l2(2048)


# Past ~2048 tokens per call on a 2 MiB-L2 core every XLA:CPU matmul slows down (activations fall out of
# the cache): B/16 texts at 128 per batch ran 15.3, 13.7, 14.0, 12.3, 10.9 texts/s at 512, 1024, 2048,
# 4096, 8192 tokens per call (2026-11-30, a 227 GFLOP/s day), images flat from 400 to 3200. $SIGLIP2_CPU_TOKENS_PER_CALL
# overrides it. Measured with `python bench/speed.py` (batch 8 of So400m/14@384 runs as several calls).
CPU_TOKENS_PER_CALL = _cpu_tokens_per_call()
# About a minute or two of a base model on a CPU (`python bench/embed_throughput.py`): an interrupted
# `embed` run loses little.
CPU_PART_SIZE = 256
ACCELERATOR_PART_SIZE = 4096
MAX_LOADER_WORKERS = 32


def backend() -> str:
    """"cpu", "gpu" or "tpu": `jax.default_backend()`."""
    import jax

    return jax.default_backend()


def attention_implementation() -> str | None:
    """The attention kernel when none is asked for: "einsum" (heads-major einsums, the fastest on CPU)
    everywhere but on GPU, where None is `jax.nn.dot_product_attention`'s default: XLA's attention in JAX
    0.10 and 0.11 (its source: "defaults to XLA for now"), which writes the logits to memory, not cuDNN's
    fused kernel. `bench/gpu.py` times both ("ours" and "ours-cudnn") for the choice on a lent GPU."""
    return None if backend() == "gpu" else "einsum"


def attention_in_pair_groups() -> bool:
    """Whether the einsum attention computes large logits in groups of (image, head) pairs (see
    `siglip2_jax.model.attention.LOGITS_BYTES_PER_STEP`): on CPU only, where they would leave the cache."""
    return backend() == "cpu"


def tokens_per_call() -> int | None:
    """At most this many tokens per device in one compiled call (CPU: CPU_TOKENS_PER_CALL); None: the whole
    batch in one call (accelerators)."""
    return CPU_TOKENS_PER_CALL if backend() == "cpu" else None


def loader_workers() -> int:
    """Data-loader worker processes when none are asked for. On CPU the devices are the cores: worker
    processes would take them from the model, while the main thread decodes the next batch as XLA's
    threads compute the current one. Elsewhere one per core but one (at least 1, at most 32)."""
    import os

    if backend() == "cpu":
        return 0
    return min(MAX_LOADER_WORKERS, max(1, (os.cpu_count() or 2) - 1))


def compute_dtype():
    """The compute dtype of fine-tuning's "auto": float32 on CPU, bfloat16 on accelerators
    (`jnp.float32` / `jnp.bfloat16`)."""
    import jax.numpy as jnp

    return jnp.float32 if backend() == "cpu" else jnp.bfloat16


def embed_part_size(batch_size: int) -> int:
    """Inputs per `embed` part when --part-size is not given: ACCELERATOR_PART_SIZE with accelerators; on
    CPU, where a base model embeds a few images a second, CPU_PART_SIZE (or one batch, if larger), so that
    parts are saved every minute or two rather than every half hour."""
    return max(CPU_PART_SIZE, batch_size) if backend() == "cpu" else ACCELERATOR_PART_SIZE
