"""Ours vs transformers, same machine, same process, same inputs: image and text encoding throughput.

    python bench/speed.py                                   # B/16@224, So400m/14@384, NaFlex B/16 @256; batch 1 and 8
    python bench/speed.py --variants b16-224 --batches 8 --reps 5
    python bench/speed.py --dtype bfloat16                  # on a GPU/TPU

Weights are random (full size, built from configs/), identical on both sides. Each repetition times ours
and the reference back to back (order alternating), so load from other processes on a shared machine
hits both alike; we report the median per side and the ratio of medians. transformers runs both its
"eager" and "sdpa" attention and the faster of the two is the reference figure. Ours is timed through the
library's path for ready inputs, `Siglip2Pipeline.embed_preprocessed` (host arrays in, embeddings on the
device out; on CPU a big batch runs as several calls, see `CPU_TOKENS_PER_CALL`). Achieved GFLOP/s count
the model's FLOPs from its architecture, against a matmul peak measured here, in this process.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import siglip2_jax
from siglip2_jax.config import PRESETS_DIR
from siglip2_jax.images import NaFlexBatch

from machine import describe, matmul_peak_gflops

VARIANTS = {"b16-224": "siglip2-base-patch16-224", "so400m14-384": "siglip2-so400m-patch14-384",
            "naflex-b16-256": "siglip2-base-patch16-naflex", "b16-256": "siglip2-base-patch16-256"}


def encoder_flops(tokens: int, width: int, mlp: int, depth: int) -> float:
    """Multiply-adds x 2 of `depth` pre-LN blocks over `tokens` tokens (projections, attention, MLP)."""
    per_layer = 2 * tokens * width * (4 * width + 2 * mlp) + 4 * tokens * tokens * width
    return depth * per_layer


def model_flops(config, kind: str, tokens: int) -> float:
    """Per-example FLOPs of an image or text embedding, counted from the architecture (XLA's cost analysis
    counts a scanned layer once, so it cannot be used here)."""
    if kind == "text":
        t = config.text
        return encoder_flops(t.max_length, t.width, t.mlp_dim, t.depth) + 2 * t.width * t.projection_size
    v = config.vision
    head = 2 * tokens * v.width * 2 * v.width + 4 * tokens * v.width + 2 * v.width * (2 * v.width + 2 * v.mlp_dim)
    return 2 * tokens * v.patch_dim * v.width + encoder_flops(tokens, v.width, v.mlp_dim, v.depth) + head


def reference_model(name: str, directory: str, dtype) -> dict:
    hf = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    hf.pop("_name_or_path", None)
    cls = transformers.Siglip2Config if hf["model_type"] == "siglip2" else transformers.SiglipConfig
    config = cls(**{k: v for k, v in hf.items() if k != "model_type"})
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    model.save_pretrained(directory)
    models = {}
    for impl in ("eager", "sdpa"):
        models[impl] = transformers.AutoModel.from_pretrained(directory, attn_implementation=impl, dtype=dtype).eval()
    return models


def inputs(config, batch: int, seed=0):
    rng = np.random.default_rng(seed)
    v = config.vision
    if v.naflex:
        n = v.num_positions
        images = NaFlexBatch(patches=rng.uniform(-1, 1, (batch, n, v.patch_dim)).astype(np.float32),
                             mask=np.ones((batch, n), np.int32),
                             spatial_shapes=np.tile([[v.grid_size, v.grid_size]], (batch, 1)).astype(np.int32))
    else:
        images = rng.uniform(-1, 1, (batch, v.image_size, v.image_size, 3)).astype(np.float32)
    ids = rng.integers(0, config.text.vocab_size, (batch, config.text.max_length)).astype(np.int32)
    return images, ids


def torch_image_call(model, images):
    if isinstance(images, NaFlexBatch):
        kwargs = dict(pixel_values=torch.from_numpy(images.patches), pixel_attention_mask=torch.from_numpy(images.mask),
                      spatial_shapes=torch.from_numpy(images.spatial_shapes).long())
    else:
        kwargs = dict(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    return lambda: model.get_image_features(**kwargs)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_variant(key: str, batches: list[int], reps: int, dtype: str, peak: float) -> list[dict]:
    name = VARIANTS[key]
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    rows = []
    with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
        references = reference_model(name, directory, tdtype)
        ours = siglip2_jax.load(directory, dtype=jdtype)
        for batch in batches:
            images, ids = inputs(ours.config, batch)
            for kind, x, torch_call in [
                ("image", images, lambda m: torch_image_call(m, images)),
                ("text", ids, lambda m: (lambda: m.get_text_features(input_ids=torch.from_numpy(ids).long()))),
            ]:
                flops = batch * model_flops(ours.config, kind, ours.config.vision.num_positions)
                # the library's own path for ready inputs: host arrays in, embeddings on device out
                ours_call = lambda p=ours, x=x, kind=kind: jax.block_until_ready(p.embed_preprocessed(x, kind).device_array)
                calls = {"ours": ours_call, **{impl: torch_call(m) for impl, m in references.items()}}
                for call in calls.values():   # warm up
                    call()
                samples = {k: [] for k in calls}
                for r in range(reps):
                    order = list(calls) if r % 2 == 0 else list(reversed(list(calls)))
                    for k in order:
                        samples[k] += timed(calls[k], 1)
                median = {k: statistics.median(v) for k, v in samples.items()}
                best_ref = min(("eager", "sdpa"), key=lambda k: median[k])
                row = dict(variant=key, kind=kind, batch=batch, dtype=dtype,
                           ours_per_s=batch / median["ours"], eager_per_s=batch / median["eager"],
                           sdpa_per_s=batch / median["sdpa"], reference=best_ref,
                           ratio=median[best_ref] / median["ours"],
                           gflops=flops / median["ours"] / 1e9, peak_gflops=peak)
                rows.append(row)
                print(f"{key:>15} {kind:>5} b={batch:<3} ours {row['ours_per_s']:8.2f}/s  eager {row['eager_per_s']:8.2f}/s  "
                      f"sdpa {row['sdpa_per_s']:8.2f}/s  ratio {row['ratio']:.2f}x vs {best_ref}  "
                      f"{row['gflops']:.0f} GFLOP/s ({row['gflops'] / peak:.0%} of matmul peak)", flush=True)
        del references, ours
        gc.collect()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["b16-224", "so400m14-384", "naflex-b16-256"], choices=VARIANTS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print(describe(dtype), flush=True)
    peak = matmul_peak_gflops(dtype)
    print(f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"matmul peak {peak:.0f} GFLOP/s ({args.dtype})", flush=True)
    rows = [row for key in args.variants for row in bench_variant(key, args.batches, args.reps, args.dtype, peak)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
