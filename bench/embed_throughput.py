"""Benchmark: `embed` end to end (JPEG files -> embeddings on disk) against the model alone, and the peak
memory of `search` over 1M x 768 float16 embeddings.

    python bench/embed_throughput.py                  # B/16@224 image tower, full size, random weights
    python bench/embed_throughput.py --layers 2       # scaled down (same width and input), for slow machines

1. Throughput, in one process on the same machine and the same compiled model, in alternating rounds:
   - model only: batches of already preprocessed pixels, dispatched back to back (`embed_preprocessed`);
   - end to end: `embed` over a folder of JPEG photos (listing, decoding and resizing, the model, writing
     and fsyncing one part per batch), each round a new folder and a new OUT.
   Prints images/s of both and their ratio (the goal is >= 0.9: the input pipeline keeps up), by wall
   clock and by CPU time per image (this process and its children): on a CPU-only machine the CPU is the
   device, and CPU time is the steadier measure when other jobs share the machine.
2. Search memory: writes synthetic parts holding 1M (and 4096) random unit vectors of 768 float16 in the
   `embed` format, runs `siglip2-jax search OUT --image ...` on each in a fresh process, and prints each
   process's peak resident memory: the difference is what the collection's size costs (bounded by
   --chunk-rows, not by the 1.5 GB of embeddings).

The model is the image tower of configs/siglip2-base-patch16-224.json at full size with random weights
(the text tower is not needed for image embedding or image queries), saved with `save_checkpoint`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def build_model(directory: Path, layers: int | None) -> Path:
    from flax import nnx

    from siglip2_jax.checkpoint import save_checkpoint
    from siglip2_jax.config import Siglip2Config
    from siglip2_jax.model import Siglip2
    from siglip2_jax.model.build import params_of

    config = Siglip2Config.from_json(REPO / "configs" / "siglip2-base-patch16-224.json")
    vision = config.vision if layers is None else dataclasses.replace(config.vision, depth=layers)
    config = Siglip2Config(vision, None, name="random siglip2-base-patch16-224 image tower")
    params = params_of(Siglip2(config, rngs=nnx.Rngs(0)))
    return save_checkpoint(directory, config, params, overwrite=True)


def write_photos(folder: Path, count: int, seed: int = 0) -> None:
    """JPEGs the size of an average ImageNet photo (500 x 375), smooth enough to compress like photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (375, 500, 3))
        pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i:05d}.jpg", quality=90)


def model_only(pipeline, pixels: list[np.ndarray], batches: int) -> int:
    """The model on preprocessed batches, each dispatched before the previous one is collected."""
    previous = None
    for i in range(batches):
        result = pipeline.embed_preprocessed(pixels[i % len(pixels)])
        if previous is not None:
            previous.result()
        previous = result
    previous.result()
    return batches * len(pixels[0])


def end_to_end(pipeline, photos: Path, out: Path, batch_size: int, workers: int | None) -> int:
    """`embed` over a folder of JPEGs, one part per batch (each part fsynced)."""
    from siglip2_jax.embed import embed

    result = embed(pipeline, photos, out, batch_size=batch_size, part_size=batch_size, workers=workers,
                   progress=False)
    assert result.complete and result.embedded == result.inputs
    return result.embedded


class Meter:
    """Images, wall seconds and CPU seconds (this process and its children) of the calls it times."""

    def __init__(self):
        self.images = self.wall = self.cpu = 0.0

    def time(self, function, *args) -> None:
        cpu, wall = _cpu_seconds(), time.perf_counter()
        self.images += function(*args)
        self.wall += time.perf_counter() - wall
        self.cpu += _cpu_seconds() - cpu


def _cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def synthetic_out(out: Path, model_dir: Path, rows: int, dim: int = 768, part_size: int = 4096) -> None:
    """An `embed` output of `rows` random unit vectors (float16), written part by part."""
    from siglip2_jax.embed import FORMAT, FORMAT_VERSION, fingerprint

    (out / "parts").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    num_parts = -(-rows // part_size)
    for part in range(num_parts):
        n = min(part_size, rows - part * part_size)
        vectors = rng.standard_normal((n, dim), np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        np.save(out / "parts" / f"{part:06d}.npy", vectors.astype(np.float16))
        indices = list(range(part * part_size, part * part_size + n))
        index = {"part": part, "indices": indices, "paths": [f"/photos/{i:07d}.jpg" for i in indices],
                 "refused": [], "process": 0}
        (out / "parts" / f"{part:06d}.json").write_text(json.dumps(index))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "image",
                "model": {"source": str(model_dir), "fingerprint": fingerprint(model_dir)},
                "input": {"source": "/photos", "listing": "folder", "count": rows, "sha256": "synthetic"},
                "options": {"dtype": "float16", "batch_size": 128, "part_size": part_size, "max_num_patches": None,
                            "model_parallel": 1},
                "dim": dim, "num_parts": num_parts, "result": {"embedded": rows, "refused": 0}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def search_peak_memory(out: Path, image: Path) -> tuple[float, float]:
    """(peak resident MiB, seconds) of `siglip2-jax search OUT --image IMAGE` in a fresh process."""
    measure = ("import resource, subprocess, sys, time; start = time.perf_counter(); "
               "run = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "assert run.returncode == 0, run.stderr; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - start)")
    command = [sys.executable, "-m", "siglip2_jax.cli", "search", str(out), "--image", str(image), "--top-k", "10"]
    output = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True, check=True)
    peak, seconds = output.stdout.split()
    return float(peak), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="scale the tower down to this many layers")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of model only / end to end")
    parser.add_argument("--batches-per-round", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: embed's)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="embeddings for the search benchmark")
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()

    import jax

    import siglip2_jax
    from siglip2_jax.sharding import make_mesh

    with tempfile.TemporaryDirectory(prefix="siglip2-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "model", args.layers)
        pipeline = siglip2_jax.load(model_dir, mesh=make_mesh(1), batch_size=args.batch_size)
        devices = jax.local_devices()
        depth = pipeline.config.vision.depth
        from machine import describe
        print(describe(), flush=True)
        print(f"model: B/16@224 image tower, {depth} layers{' (full size)' if args.layers is None else ''}, "
              f"random weights; {len(devices)} x {devices[0].device_kind}; {os.cpu_count()} CPU cores")
        # Alternate short rounds of the two, so that the load of a shared machine weighs on both alike.
        rng = np.random.default_rng(0)
        size = pipeline.config.vision.image_size
        pixels = [rng.uniform(-1, 1, (args.batch_size, size, size, 3)).astype(np.float32) for _ in range(2)]
        pipeline.embed_preprocessed(pixels[0]).result()  # compile
        per_round = args.batches_per_round * args.batch_size
        for r in range(args.rounds):
            write_photos(tmp / f"photos{r}", per_round, seed=r)
        model, e2e = Meter(), Meter()
        for r in range(args.rounds):
            model.time(model_only, pipeline, pixels, args.batches_per_round)
            e2e.time(end_to_end, pipeline, tmp / f"photos{r}", tmp / f"out{r}", args.batch_size, args.workers)
        workers = "embed's default" if args.workers is None else args.workers
        print(f"{args.rounds} rounds of {args.batches_per_round} batches of {args.batch_size} each way; "
              f"decoding workers: {workers}")
        print(f"model only:  {model.images / model.wall:6.2f} images/s   {model.cpu / model.images:6.3f} CPU s/image")
        print(f"end to end:  {e2e.images / e2e.wall:6.2f} images/s   {e2e.cpu / e2e.images:6.3f} CPU s/image   "
              "(JPEG 500x375 files -> embeddings on disk)")
        print(f"ratio end to end / model only: {(e2e.images / e2e.wall) / (model.images / model.wall):.3f} by wall "
              f"clock, {(model.cpu / model.images) / (e2e.cpu / e2e.images):.3f} by CPU time")
        if args.skip_search:
            return
        image = next((tmp / "photos0").iterdir())
        for rows in (4096, args.rows):
            synthetic_out(tmp / f"search-{rows}", model_dir, rows)
            peak, seconds = search_peak_memory(tmp / f"search-{rows}", image)
            size = rows * 768 * 2 / 2**20
            print(f"search over {rows:>9,} x 768 float16 ({size:7.1f} MiB on disk): peak RSS {peak:7.1f} MiB, "
                  f"{seconds:5.1f} s")


if __name__ == "__main__":
    main()
