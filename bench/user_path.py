"""What a user's call costs, end to end: `encode_images` on PIL photos and `encode_texts` on strings, against
transformers' processor + model on the same weights, same process, alternating rounds; quiet, and with a
"neighbour" process spinning on one core beside them.

    python bench/user_path.py                                # B/16@224, 8 photos, 32 texts; quiet and neighbour
    python bench/user_path.py --conditions neighbour --reps 3
    python bench/user_path.py --preset siglip2-so400m-patch14-384 --images 4 --texts 8

Weights are random and full size: a checkpoint of ours with the real Gemma vocabulary (--tokenizer,
default ../shared/data/gemma_tokenizer.model or $SIGLIP2_TOKENIZER), exported with `siglip2-jax export`, and
that export is what transformers loads (`AutoModel`, sdpa attention, and `AutoProcessor`: its image processor
and Gemma tokenizer). Photos are synthetic 640x480 RGB PIL images (smooth gradients plus noise, as JPEG
decoding would give); texts are captions in several languages. Before timing, both sides' embeddings are
compared (cosine). The neighbour is `python -c "while True: pass"` started before the condition's rounds and
killed after them: one core's worth of someone else's work, as on a shared machine.

Each condition prints the end-to-end figure and where the time goes: preprocessing (ours: `preprocess` /
`tokenize`; theirs: the processor) and the model (ours: `embed_preprocessed`; theirs: `get_*_features`),
each timed alone in the same rounds. The matmul peaks of XLA and torch (2048^2 fp32, in this process) are
printed first, so a reader can tell which kind of machine a figure came from.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from PIL import Image

import siglip2_jax
from siglip2_jax.checkpoint import export_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import random_checkpoint  # noqa: E402
from machine import describe  # noqa: E402
from peers import cosine  # noqa: E402
from speed import timed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a photo of a cat sleeping on a red sofa", "two dogs running on the beach at sunset",
    "une tour Eiffel illuminée la nuit", "ein Fahrrad lehnt an einer alten Steinmauer",
    "un plato de paella con mariscos", "東京の夜景と高層ビル", "一只熊猫在竹林里吃竹子",
    "서울의 한옥 마을 풍경", "кошка сидит на подоконнике", "منظر طبيعي لصحراء عند الغروب",
    "एक व्यस्त भारतीय बाज़ार", "a bowl of ramen with a soft-boiled egg", "snow-covered mountains under a clear sky",
    "a diagram of a neural network", "Ο Παρθενώνας στην Αθήνα", "uma praia tropical com coqueiros",
]


def photos(count: int, seed: int = 0) -> list[Image.Image]:
    """`count` 640x480 RGB images with a photo's statistics at the scale that matters here (smooth regions,
    edges, sensor noise), deterministic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    out = []
    for _ in range(count):
        base = np.stack([np.sin(x / rng.uniform(20, 120) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(20, 120))
                         for _ in range(3)], -1)
        pixels = (base * 90 + 128 + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)
        out.append(Image.fromarray(pixels))
    return out


@contextlib.contextmanager
def neighbour(active: bool):
    """One core kept busy by another process while the block runs (nothing when not `active`)."""
    if not active:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        process.kill()
        process.wait()


def torch_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    a = torch.ones(n, n)
    a @ a
    return 2 * n ** 3 / min(timed(lambda: a @ a, reps)) / 1e9


def calls(sides, reference, processor, images, texts):
    """{(kind, stage): {side: fn}} for kind image/text, stage total/preprocess/model; `sides` maps our side
    names ("ours", "ours-bf16") to pipelines, and "transformers" is added."""
    ours = sides["ours"]
    length = ours.config.text.max_length
    pixels, ids = ours.preprocess(images), ours.tokenize(texts)

    def ref_text_inputs():
        # FixRes hub repos give the plain Gemma tokenizer: the caller lowercases and pads to 64 (SPEC.md)
        return processor(text=[t.lower() for t in texts], padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt")

    ref_pixels, ref_ids = processor(images=images, return_tensors="pt"), ref_text_inputs()["input_ids"]
    table = {
        ("image", "total"): {name: (lambda p=p: p.encode_images(images)) for name, p in sides.items()},
        ("image", "preprocess"): {"ours": lambda: ours.preprocess(images)},
        ("image", "model"): {name: (lambda p=p: p.embed_preprocessed(pixels).result()) for name, p in sides.items()},
        ("text", "total"): {name: (lambda p=p: p.encode_texts(texts)) for name, p in sides.items()},
        ("text", "preprocess"): {"ours": lambda: ours.tokenize(texts)},
        ("text", "model"): {name: (lambda p=p: p.embed_preprocessed(ids, "text").result()) for name, p in sides.items()},
    }
    table[("image", "total")]["transformers"] = (
        lambda: reference.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output)
    table[("image", "preprocess")]["transformers"] = lambda: processor(images=images, return_tensors="pt")
    table[("image", "model")]["transformers"] = lambda: reference.get_image_features(**ref_pixels)
    table[("text", "total")]["transformers"] = (
        lambda: reference.get_text_features(input_ids=ref_text_inputs()["input_ids"]).pooler_output)
    table[("text", "preprocess")]["transformers"] = ref_text_inputs
    table[("text", "model")]["transformers"] = lambda: reference.get_text_features(input_ids=ref_ids)
    return table


def run_condition(name: str, table, reps: int, counts: dict) -> list[dict]:
    """Alternating rounds of every call in `table`; the median per side."""
    samples = {key: {side: [] for side in sides} for key, sides in table.items()}
    with neighbour(name == "neighbour"):
        for rep in range(reps):
            for key, sides in table.items():
                order = list(sides) if rep % 2 == 0 else list(reversed(list(sides)))
                for side in order:
                    samples[key][side] += timed(sides[side], 1)
    return [dict(condition=name, kind=kind, stage=stage, n=counts[kind],
                 seconds={side: statistics.median(times) for side, times in sides.items()})
            for (kind, stage), sides in samples.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-base-patch16-224", help="a configs/ preset (default %(default)s)")
    parser.add_argument("--images", type=int, default=8, help="photos per call (default %(default)s)")
    parser.add_argument("--texts", type=int, default=32, help="texts per call (default %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="alternating rounds per condition (default %(default)s)")
    parser.add_argument("--conditions", nargs="+", choices=["quiet", "neighbour"], default=["quiet", "neighbour"])
    parser.add_argument("--bf16", action="store_true", help="also time ours with `load(..., dtype=bfloat16)` "
                        "(bf16 matmul inputs, float32 accumulation)")
    parser.add_argument("--tokenizer", type=Path, default=os.environ.get(
        "SIGLIP2_TOKENIZER", REPO.parent / "shared/data/gemma_tokenizer.model"),
        help="the Gemma tokenizer.model (default $SIGLIP2_TOKENIZER or ../shared/data/gemma_tokenizer.model)")
    args = parser.parse_args(argv)
    if not args.tokenizer.is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no such file (the SigLIP 2 Gemma tokenizer.model)")

    print(describe(), flush=True)
    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), 2048^2 fp32 matmul {torch_peak_gflops():.0f} "
          f"GFLOP/s; transformers {transformers.__version__}", flush=True)
    images = photos(args.images)
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.texts)]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        checkpoint = random_checkpoint(args.preset, None, Path(tmp) / "ckpt", args.tokenizer)
        hf = export_hf(checkpoint, Path(tmp) / "hf")
        sides = {"ours": siglip2_jax.load(checkpoint)}
        if args.bf16:
            sides["ours-bf16"] = siglip2_jax.load(checkpoint, dtype=jnp.bfloat16)
        for pipeline in sides.values():
            pipeline.batch_size = max(args.images, args.texts)   # one call per side, as transformers does
        reference = transformers.AutoModel.from_pretrained(hf, attn_implementation="sdpa").eval()
        processor = transformers.AutoProcessor.from_pretrained(hf)
        table = calls(sides, reference, processor, images, texts)
        for kind in ("image", "text"):
            ref = table[(kind, "total")]["transformers"]().numpy()
            for name in sides:   # also warms up: compiles ours for these batch sizes
                print(f"# {kind}s, end to end: cosine {name} vs transformers fp32 {cosine(table[(kind, 'total')][name](), ref):.6f} "
                      "(min over inputs)")
        counts = {"image": args.images, "text": args.texts}
        names = [*sides, "transformers"]
        print(f"{'condition':>9} | {'what':<17} | " + " | ".join(f"{n + ' /s':>15}" for n in names) + " | "
              + " | ".join(f"{n}/transformers" for n in sides), flush=True)
        for condition in args.conditions:
            for row in run_condition(condition, table, args.reps, counts):
                s = row["seconds"]
                rates = " | ".join(f"{row['n'] / s[n]:15.2f}" if n in s else f"{'':>15}" for n in names)
                ratios = " | ".join(f"{s['transformers'] / s[n]:.2f}x".rjust(len(n) + 13) if n in s else " " * (len(n) + 13)
                                    for n in sides)
                print(f"{row['condition']:>9} | {row['kind'] + 's ' + row['stage']:<17} | {rates} | {ratios}", flush=True)


if __name__ == "__main__":
    main()
