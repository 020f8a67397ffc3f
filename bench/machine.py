"""The machine a benchmark ran on, in one line every `bench/` program prints first: CPU model, cores, L2 cache
per core, the vector/matrix extensions that decide which kernels run, the accelerator, and XLA's own fp32
matmul peak (2048^2, measured in that process). Figures taken on different days or machines are then
comparable: on the project's 2-core Xeon the peak has read from 144 to 421 GFLOP/s."""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp

from siglip2_jax import defaults


def matmul_peak_gflops(dtype=jnp.float32, n: int = 2048, reps: int = 10) -> float:
    """XLA's best of `reps` (n, n) @ (n, n) matmuls on the default device, in GFLOP/s."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_extensions() -> str:
    """The x86 extensions XLA:CPU's fp32/bf16 kernels depend on, as far as /proc/cpuinfo tells."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    names = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
    return "/".join(label for flag, label in names.items() if flag in flags)


def describe(dtype=jnp.float32) -> str:
    """One line: "# <cpu>, N cores, L2 ... per core, <extensions>; <device> xK; jax V; XLA 2048^2 <dtype> matmul P GFLOP/s"."""
    l2 = defaults.l2_cache_bytes()
    cache = f", L2 {l2 >> 20} MiB per core" if l2 and l2 >= 1 << 20 else (f", L2 {l2 >> 10} KiB per core" if l2 else "")
    ext = cpu_extensions()
    device = jax.devices()[0]
    return (f"# {cpu_model()} ({platform.machine()}), {os.cpu_count()} cores{cache}{', ' + ext if ext else ''}; "
            f"{device.device_kind} x{jax.device_count()}; jax {jax.__version__}; "
            f"XLA 2048^2 {jnp.dtype(dtype).name} matmul {matmul_peak_gflops(dtype):.0f} GFLOP/s")
