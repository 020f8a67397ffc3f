"""NaFlex at 256 patches vs FixRes B/16@256 (also 256 patches): images/s of our image tower, same process.

    python bench/naflex_vs_fixres.py [--batch 8] [--reps 7]

NaFlex does the same encoder work plus a per-image resize of the position grid and key masks; the goal
is >= 0.9x FixRes. Random weights of full size; the two runs alternate so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from siglip2_jax.config import Siglip2Config
from siglip2_jax.images import NaFlexBatch
from siglip2_jax.model import Siglip2

from machine import describe


def image_encoder(preset: str, batch: int):
    config = Siglip2Config.preset(preset)
    model = Siglip2(config, rngs=nnx.Rngs(0), stacked_layers=False)   # the inference layout, as load() builds
    graphdef, state = nnx.split(model)
    v = config.vision
    rng = np.random.default_rng(0)
    if v.naflex:
        # mixed aspect ratios, all within the 256-patch budget
        shapes = np.array([[16, 16], [12, 21], [14, 18], [3, 85], [85, 3], [8, 32], [10, 25], [16, 16]] * batch)[:batch]
        mask = (np.arange(256)[None] < (shapes[:, 0] * shapes[:, 1])[:, None]).astype(np.int32)
        x = NaFlexBatch(patches=rng.uniform(-1, 1, (batch, 256, v.patch_dim)).astype(np.float32), mask=mask,
                        spatial_shapes=shapes.astype(np.int32))
    else:
        x = rng.uniform(-1, 1, (batch, v.image_size, v.image_size, 3)).astype(np.float32)
    x = jax.tree.map(jnp.asarray, x)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_images(x)).lower(state, x).compile()
    return lambda: jax.block_until_ready(fn(state, x))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    print(describe(), flush=True)
    runs = {"FixRes B/16@256": image_encoder("siglip2-base-patch16-256", args.batch),
            "NaFlex B/16 (256 patches)": image_encoder("siglip2-base-patch16-naflex", args.batch)}
    for run in runs.values():
        run()
    times = {k: [] for k in runs}
    for r in range(args.reps):
        for k in (runs if r % 2 == 0 else reversed(list(runs))):
            t = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t)
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    for k, v in rate.items():
        print(f"{k:>26}: {v:6.2f} images/s (batch {args.batch}, {jax.devices()[0].device_kind})")
    fixres, naflex = rate.values()
    print(f"NaFlex / FixRes = {naflex / fixres:.2f}x")


if __name__ == "__main__":
    main()
