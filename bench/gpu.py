"""Everything a lent GPU should measure, in one run of a few minutes: bf16 towers against transformers
(sdpa, and sdpa under `torch.compile`) on the same GPU, MFU, `embed` end to end, and cost per 1,000 images.

    python bench/gpu.py                                  # So400m/14@384, B/16@224, NaFlex So400m/16 @256
    python bench/gpu.py --price-per-hour 3.5 --peak-tflops 989    # the machine's price and bf16 dense peak
    python bench/gpu.py --variants b16-224 --batch 2 --reps 1 --images 8 --compile   # a CPU smoke run

For each variant, with random weights at full size built by bench/speed.py's `reference_model` (the same
weights on both sides), in one process and alternating rounds:
  ours      `Siglip2Pipeline.embed_preprocessed` in bfloat16
  ours-cudnn  the same with cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`)
  sdpa      transformers, attn_implementation="sdpa", bfloat16, on the same GPU
  compile   the same under `torch.compile` (inductor)
The weights are redrawn at trained magnitude (tests/reference.py's `trained_size_`, as bench/peers.py does).
Every side starts from host arrays and ends with host embeddings (the transfers are timed too), and its
embeddings are compared with transformers fp32 first (minimum cosine). MFU is the model's FLOPs
(bench/speed.py's `model_flops`) per second over --peak-tflops (default: the H200's 989 TFLOP/s bf16 dense,
from NVIDIA's datasheet; our own 8192^2 bf16 matmul is printed beside it). ONNX Runtime CUDA is run when
`onnxruntime-gpu` is installed; otherwise the script says so.

float32, B/16@224 images: ours as shipped (float32 dots computed in float32), ours with JAX's default
precision (TF32 on NVIDIA GPUs since Ampere) and transformers sdpa float32 (TF32 off, torch's default), each
with its largest difference from transformers eager float32.

The steps run in this order, each on its own (a failing one is reported and the rest still run), and --json
is rewritten after each: the towers' GEMMs (XLA as we call it, XLA with a bf16 result, torch), embed, the
variants, float32.

`embed` end to end: `siglip2-jax embed` in its own process, as a user runs it (listing, decoding in worker
processes, the model, parts written to disk), B/16@224 in bfloat16 on --images/4 and on --images 640x480
JPEG files; the difference is the steady rate, and cost per 1,000 images = --price-per-hour / 3600 /
(images/s) * 1000.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

import siglip2_jax
from peers import Tower, cosine, normalized, torch_args, trained_size_
from speed import VARIANTS, inputs, model_flops, reference_model

VARIANTS = {**VARIANTS, "naflex-so400m16-256": "siglip2-so400m-patch16-naflex"}
H200_BF16_DENSE_TFLOPS = 989.0   # NVIDIA H200 SXM datasheet, dense (without sparsity)


def bf16_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), jnp.bfloat16)  # not constant:
    # a GPU multiplies zeros and ones faster than data
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


# (tokens per row, in, out) of the towers' largest GEMMs: MLP fc1 (width x MLP width), B/16's fused q|k|v
GEMM_SHAPES = {"So400m images fc1": (729, 1152, 4304), "So400m texts fc1": (64, 1152, 4304),
               "B/16 images fc1": (196, 768, 3072), "B/16 images qkv": (196, 768, 3 * 768)}


def bench_gemms(device, batch: int, reps: int = 20) -> list[dict]:
    """The towers' own GEMMs in bf16, TFLOP/s: XLA as the towers call it (`model.attention.matmul`: float32
    accumulation, bf16 result), XLA asked for a bf16 result directly, and torch (cuBLAS, what transformers
    runs), at `batch` rows of tokens. Where ours loses to transformers, this says whether the GEMMs are the
    cause. Best of 3 rounds."""
    from siglip2_jax.model.attention import matmul

    rows = []
    for name, (tokens, k, n) in GEMM_SHAPES.items():
        m = batch * tokens
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32) / k ** 0.5
        ja, jb = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
        ta, tb = torch.from_numpy(a).to(device, torch.bfloat16), torch.from_numpy(b).to(device, torch.bfloat16)
        ours, plain = jax.jit(matmul), jax.jit(lambda x, y: x @ y)
        calls = {"ours": lambda: ours(ja, jb).block_until_ready(), "xla-bf16-out": lambda: plain(ja, jb).block_until_ready(),
                 "torch": lambda: (ta @ tb, synchronize(device))}
        best = {}
        for _ in range(3):
            for label, call in calls.items():
                call()
                t = time.perf_counter()
                for _ in range(reps):
                    call()
                best[label] = min(best.get(label, float("inf")), (time.perf_counter() - t) / reps)
        row = dict(gemm=name, m=m, k=k, n=n, **{f"{label}_tflops": 2 * m * k * n / best[label] / 1e12 for label in calls})
        rows.append(row)
        print(f"GEMM {name} ({m}x{k}x{n}) bf16 TFLOP/s: " + "  ".join(f"{label} {row[label + '_tflops']:.0f}"
                                                                     for label in calls), flush=True)
    return rows


def on(device, args: tuple, dtype) -> tuple:
    """`torch_args` on the device, floating tensors in `dtype` (ids, masks and shapes keep theirs)."""
    return tuple(a.to(device, dtype) if a.is_floating_point() else a.to(device) for a in args)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternating_medians(calls: dict, reps: int, device) -> dict[str, float]:
    """Median seconds of each call over `reps` rounds; each round runs every call once, starting one call
    further on than the round before, and the device is synchronized around each."""
    samples = {name: [] for name in calls}
    for rep in range(reps):
        for name in list(calls)[rep % len(calls):] + list(calls)[:rep % len(calls)]:
            synchronize(device)
            t = time.perf_counter()
            calls[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(times) for name, times in samples.items()}


def trained_references(key: str, directory: str) -> tuple:
    """transformers' eager and sdpa models of a variant with the same weights of trained magnitude (the
    default init's hide bf16 error, see peers.py), saved in `directory` for our side to load: (eager, sdpa)."""
    references = reference_model(VARIANTS[key], directory, torch.float32)
    eager = trained_size_(references["eager"])
    eager.save_pretrained(directory)
    references["sdpa"].load_state_dict(eager.state_dict())
    return eager, references["sdpa"]


def with_cudnn(call):
    """`call()` with `jax.nn.dot_product_attention(implementation="cudnn")` as the towers' attention when they
    are traced: `implementation=None`, this package's GPU default, is XLA's attention in JAX 0.10 and 0.11
    (its source: "defaults to XLA for now"), which writes every logit to memory."""
    from siglip2_jax import defaults

    default = defaults.attention_implementation
    defaults.attention_implementation = lambda: "cudnn"
    try:
        return call()
    finally:
        defaults.attention_implementation = default


def bench_variant(key: str, batch: int, reps: int, use_compile: bool, peak: float, device) -> list[dict]:
    """Rows of one variant: image and text towers, each runtime's items/s, MFU and cosine to fp32."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        fp32, sdpa = trained_references(key, tmp)
        sdpa = sdpa.to(device, torch.bfloat16)
        fp32 = fp32.to(device)   # the truth in float32 on the GPU too (TF32 is off: see main)
        ours = siglip2_jax.load(tmp, dtype=jnp.bfloat16)
        cudnn = siglip2_jax.load(tmp, dtype=jnp.bfloat16)   # traced with cuDNN's fused attention (see with_cudnn)
        naflex = ours.config.vision.naflex
        for kind in ("image", "text"):
            images, ids = inputs(ours.config, batch)
            x = ids if kind == "text" else images
            args = torch_args(kind, x)
            truth = Tower(fp32, kind, naflex)(*on(device, args, torch.float32)).cpu().numpy()
            tower = Tower(sdpa, kind, naflex).eval()
            # every side starts from host arrays and ends with host embeddings, as a user's batch does
            calls = {"ours": lambda x=x, kind=kind: ours.embed_preprocessed(x, kind).result(),
                     "sdpa": lambda: tower(*on(device, args, torch.bfloat16)).float().cpu().numpy()}
            calls["ours-cudnn"] = lambda x=x, kind=kind: with_cudnn(lambda: cudnn.embed_preprocessed(x, kind).result())
            if use_compile:
                compiled = torch.compile(tower)
                calls["compile"] = lambda: compiled(*on(device, args, torch.bfloat16)).float().cpu().numpy()
            notes = {}
            for name, call in list(calls.items()):   # also the warm-up
                try:
                    notes[name] = f"cos {cosine(call(), truth):.5f}"
                except Exception as error:   # cuDNN's attention is not on every GPU, and not on CPU
                    print(f"{key} {kind} {name}: not run: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    del calls[name]
            median = alternating_medians(calls, reps, device)
            flops = batch * model_flops(ours.config, kind, ours.config.vision.num_positions)
            for name, seconds in median.items():
                rows.append(dict(variant=key, kind=kind, batch=batch, runtime=name, per_s=batch / seconds,
                                 mfu=flops / seconds / 1e12 / peak, note=notes[name],
                                 ours_over=seconds / median["ours"]))
            best_torch = min((n for n in median if not n.startswith("ours")), key=median.get)
            line = "  ".join(f"{r['runtime']} {r['per_s']:8.1f}/s MFU {r['mfu']:5.1%} ({r['note']})"
                             for r in rows[-len(median):])
            best_ours = min((n for n in median if n.startswith("ours")), key=median.get)
            print(f"{key:>20} {kind:>5} b={batch}: {line}  {best_ours}/{best_torch} "
                  f"{median[best_torch] / median[best_ours]:.2f}x", flush=True)
    return rows


def bench_fp32(key: str, batch: int, reps: int, device) -> list[dict]:
    """float32 on the GPU: ours as shipped (float32 dots in float32, `model.layers.exact_float32_dots`), ours
    with JAX's default precision (TF32 on this GPU) and transformers sdpa float32 (TF32 off, its default),
    image tower: images/s and the largest difference of unit embeddings from transformers eager float32."""
    import contextlib

    from flax import nnx

    from siglip2_jax.model import vision

    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        eager, sdpa = trained_references(key, tmp)
        model = siglip2_jax.load(tmp, dtype=jnp.float32).model
        images, _ = inputs(model.config, batch)
        host = torch_args("image", images)
        truth = normalized(Tower(eager.to(device), "image", False)(*on(device, host, torch.float32)).cpu().numpy())
        sdpa = Tower(sdpa.to(device), "image", False)
        graph, state = nnx.split(model)
        calls, shipped = {}, vision.exact_float32_dots
        try:
            for name, context in (("ours-fp32", shipped), ("ours-fp32-jax-default", lambda dtype: contextlib.nullcontext())):
                vision.exact_float32_dots = context   # read when the tower is traced
                compiled = jax.jit(lambda state, x: nnx.merge(graph, state).vision(x).pooled).lower(state, images).compile()
                calls[name] = lambda compiled=compiled: np.asarray(compiled(state, images))
        finally:
            vision.exact_float32_dots = shipped
        calls["sdpa-fp32"] = lambda: sdpa(*on(device, host, torch.float32)).cpu().numpy()
        error = {name: float(np.abs(normalized(call()) - truth).max()) for name, call in calls.items()}
        median = alternating_medians(calls, reps, device)
    for name, seconds in median.items():
        rows.append(dict(variant=key, kind="image", batch=batch, runtime=name, per_s=batch / seconds,
                         max_abs_diff=error[name]))
    print(f"{key:>20} image b={batch} float32: " + "  ".join(
        f"{r['runtime']} {r['per_s']:8.1f}/s (max |diff| {r['max_abs_diff']:.1e})" for r in rows), flush=True)
    return rows


def photos(folder: Path, count: int) -> list[str]:
    """`count` 640x480 JPEG files (quality 90) of smooth random patterns in `folder`; their paths, sorted."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    folder.mkdir(parents=True)

    def write(i):
        rng = np.random.default_rng(i)
        pixels = (np.cumsum(rng.integers(0, 9, (480, 640, 3)), axis=1) % 256).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
        return str(folder / f"{i:06d}.jpg")

    with ThreadPoolExecutor() as pool:
        return sorted(pool.map(write, range(count)))


def bench_embed(count: int, batch: int, price: float) -> dict:
    """`siglip2-jax embed` as a user runs it (its own process: start, load, compile, decoding workers, parts
    written), on count/4 and on count photos. The difference of the two gives the steady rate, which the
    cost uses; what is left of the short run is the fixed cost of a run (start, load, compile)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference_model(VARIANTS["b16-224"], str(tmp / "hf"), torch.float32)
        paths = photos(tmp / "photos", count)
        (tmp / "quarter.txt").write_text("\n".join(paths[: count // 4]))
        seconds = {}
        for name, source in (("quarter", tmp / "quarter.txt"), ("all", tmp / "photos")):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "siglip2_jax", "embed", str(tmp / "hf"), str(source), str(tmp / name),
                            "--compute-dtype", "bfloat16", "--batch-size", str(batch), "--no-progress"],
                           check=True, capture_output=True)
            seconds[name] = time.perf_counter() - t
    if seconds["all"] <= seconds["quarter"] * 1.1:   # the rate would be noise: say so, do not make one up
        print(f"embed end to end: not measured: {count} images took {seconds['all']:.1f} s and {count // 4} "
              f"took {seconds['quarter']:.1f} s; use more --images", flush=True)
        return dict(images=count, seconds=seconds["all"], seconds_quarter=seconds["quarter"], images_per_s=None)
    rate = (count - count // 4) / (seconds["all"] - seconds["quarter"])
    row = dict(images=count, seconds=seconds["all"], seconds_quarter=seconds["quarter"], images_per_s=rate,
               fixed_s=seconds["quarter"] - (count // 4) / rate, dollars_per_1k=price / 3600 / rate * 1000,
               price_per_hour=price)
    print(f"embed end to end (`siglip2-jax embed`, B/16@224 bf16, JPEGs 640x480 -> parts on disk): {rate:.0f} "
          f"images/s steady ({count // 4} images {seconds['quarter']:.1f} s, {count} images {seconds['all']:.1f} s: "
          f"{row['fixed_s']:.1f} s a run to start, load and compile), ${row['dollars_per_1k']:.5f} per 1,000 images "
          f"at ${price}/h", flush=True)
    return row


def onnxruntime_cuda_note() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "ONNX Runtime CUDA: not run (onnxruntime-gpu is not installed)"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return f"ONNX Runtime CUDA: not run (providers: {onnxruntime.get_available_providers()})"
    return "ONNX Runtime CUDA: available; run bench/peers.py's ort runtime with the CUDA provider"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["so400m14-384", "b16-224", "naflex-so400m16-256"],
                        choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=64, help="rows per timed call (default 64)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--compile", nargs="*", default=["b16-224", "so400m14-384"], choices=VARIANTS,
                        help="the variants also timed under torch.compile, each tower a minute or more of compiling "
                             "(default: b16-224 so400m14-384; none: --compile with no names)")
    parser.add_argument("--images", type=int, default=2048, help="JPEGs for the embed run (default 2048)")
    parser.add_argument("--price-per-hour", type=float, default=3.5,
                        help="the machine's price in $/h for the cost column (default 3.5: an assumed on-demand "
                             "H200 price; state the real one)")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                        help="the accelerator's bf16 dense peak for MFU (default: H200, 989)")
    parser.add_argument("--json", help="also write every row to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # the fp32 truth in fp32
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()} (jax {jax.__version__}), torch {torch.__version__} on "
          f"{device}; bf16 8192^2 matmul {bf16_matmul_tflops():.0f} TFLOP/s, MFU against {args.peak_tflops:g}",
          flush=True)
    results = {"gemms": [], "towers": [], "embed": None, "failed": []}

    def save():
        if args.json:   # after every step: a run stopped at its time limit keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))

    steps = [("gemms", lambda: results["gemms"].extend(bench_gemms(device, args.batch))),
             ("embed", lambda: results.update(embed=bench_embed(args.images, args.batch, args.price_per_hour)))]
    steps += [(key, lambda key=key: results["towers"].extend(bench_variant(
        key, args.batch, args.reps, key in args.compile, args.peak_tflops, device))) for key in args.variants]
    steps += [("fp32", lambda: results["towers"].extend(bench_fp32("b16-224", args.batch, args.reps, device)))]
    for name, step in steps:
        try:
            step()
        except Exception as error:   # one failing step must not cost the others' device time
            results["failed"].append(f"{name}: {type(error).__name__}: {error}")
            print(f"{name} FAILED: {type(error).__name__}: {error}", flush=True)
        save()
        gc.collect()   # the step's models, before the next step's
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(onnxruntime_cuda_note(), flush=True)
    save()
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
