"""Cold start: a fresh process that loads a checkpoint, compiles, and embeds its first image.

    python bench/cold_start.py                          # So400m/14@384, random weights, written once to --work
    python bench/cold_start.py --preset siglip2-base-patch16-224

Runs three fresh processes: without a compilation cache, then twice with JAX's persistent compilation
cache in an empty directory (the first fills it, the second reads it). Prints the time of each phase and
the peak resident memory of each process (inference memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import siglip2_jax
t_import = time.perf_counter()
model = siglip2_jax.load(sys.argv[1])
t_load = time.perf_counter()
image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
model.encode_images([image])
t_first = time.perf_counter()
model.encode_images([image])
t_second = time.perf_counter()
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps(dict(imports=t_import - t0, load=t_load - t_import, compile_and_first=t_first - t_load,
                      steady=t_second - t_first, total=t_first - t0, peak_gib=hwm / 2**30)))
"""


def make_checkpoint(preset: str, out: Path) -> Path:
    if (out / "config.json").exists():
        return out
    import numpy as np
    from flax import nnx

    from siglip2_jax.checkpoint import save_checkpoint
    from siglip2_jax.config import Siglip2Config
    from siglip2_jax.model import Siglip2
    from siglip2_jax.model.build import params_of

    config = Siglip2Config.preset(preset)
    model = Siglip2(config, rngs=nnx.Rngs(0))
    params = {path: np.asarray(value) for path, value in params_of(model).items()}
    del model
    save_checkpoint(out, config, params, source=f"random {preset}")
    return out


def run_child(checkpoint: Path, cache: Path | None) -> dict:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-so400m-patch14-384")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "siglip2-bench"),
                        help="where the random checkpoint is kept between runs")
    args = parser.parse_args(argv)
    from machine import describe
    print(describe(), flush=True)
    checkpoint = make_checkpoint(args.preset, Path(args.work) / args.preset)
    cache = Path(tempfile.mkdtemp(prefix="xla-cache-"))
    try:
        for label, cache_dir in [("no cache", None), ("cache, cold", cache), ("cache, warm", cache)]:
            r = run_child(checkpoint, cache_dir)
            print(f"{args.preset} [{label:>11}]: total {r['total']:5.1f} s = imports {r['imports']:.1f} + load "
                  f"{r['load']:.1f} + compile & first image {r['compile_and_first']:.1f}  (then {r['steady']:.2f} s "
                  f"per image; peak memory {r['peak_gib']:.2f} GiB)", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
