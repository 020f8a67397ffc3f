"""What differs between CPU and accelerators: every default this package picks by `jax.default_backend()`.

    attention_implementation   "einsum" except on GPU (cudnn-capable `dot_product_attention` there)
    attention_in_pair_groups   CPU: the einsum attention loops over groups of (image, head) pairs
    tokens_per_call            CPU: a batch runs as calls of at most CPU_TOKENS_PER_CALL tokens per device
    loader_workers             CPU: no data-loader worker processes; else one per core but one, up to 32
    compute_dtype              CPU: float32; accelerators: bfloat16 (fine-tuning's dtype "auto")
    embed_part_size            CPU: CPU_PART_SIZE inputs per embed part; accelerators: 4096

jax is imported when a default is asked for, not with this module (the commands' option modules read
the constants without importing jax). Figures were measured on the 2-core x86-64 machine of the README's
tables; each comment names the `bench/` script that measures it again.
"""

from __future__ import annotations

# Past ~2048 tokens per call every XLA:CPU matmul slows down (activations fall out of the cache).
# Measured with `python bench/speed.py` (batch 8 of So400m/14@384 runs as several calls).
CPU_TOKENS_PER_CALL = 2048
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
    everywhere but on GPU, where None lets `jax.nn.dot_product_attention` choose (cudnn flash attention)."""
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
