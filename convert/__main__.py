"""siglip2-jax's conversion program: HF SigLIP / SigLIP 2 weights -> a siglip2-jax checkpoint directory.

    python -m siglip2_convert google/siglip2-base-patch16-224 ./b16-224 --verify
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

EPILOG = """\
SRC is a Hugging Face hub id (downloaded with huggingface_hub; needs a network) or a local directory
holding config.json and model.safetensors (or sharded model-0000k-of-0000n.safetensors with
model.safetensors.index.json). Pickle files (.bin/.pt) are refused: they can run code when loaded.

OUT becomes a self-contained checkpoint (params written by Orbax, config.json, tokenizer and
preprocessor files) that `siglip2_jax.load(OUT)` reads without a network.

--verify runs transformers (needs torch) on the source weights and siglip2-jax on OUT, on the same random
pixels and token ids, prints the largest differences and exits 1 if they exceed the tolerances
(float32: normalized embeddings 2e-5, logits 1e-3; bfloat16 weights: embedding cosine 0.999).

exit status: 0 converted (and verified), 1 verification failed, 2 bad input.
"""


def build_parser(prog: str = "python -m siglip2_convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Convert Hugging Face SigLIP 2 weights to a siglip2-jax checkpoint.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="hub id (google/siglip2-base-patch16-224) or local HF model directory")
    parser.add_argument("out", metavar="OUT", help="output checkpoint directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="storage dtype of the big weights (patch/position embeddings and norms stay float32)")
    parser.add_argument("--verify", action="store_true", help="compare against transformers afterwards (needs torch)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import ml_dtypes
    import numpy as np

    from siglip2_jax.checkpoint import convert
    from siglip2_jax.config import ConfigError

    param_dtype = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out}: already exists and is not empty (use --overwrite to replace it)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        local = convert(args.src, out, param_dtype=param_dtype, overwrite=args.overwrite, progress=not args.quiet)
    except (ValueError, ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    peak_gib = peak_resident_bytes() / 2**30
    weight_bytes = sum(p.stat().st_size for p in local.glob("*.safetensors"))
    print(f"converted {args.src} -> {out} in {time.perf_counter() - start:.1f} s; "
          f"peak resident memory {peak_gib:.2f} GiB ({peak_gib * 2**30 / max(weight_bytes, 1):.2f}x the "
          f"{weight_bytes / 2**30:.2f} GiB of safetensors)")
    if not args.verify:
        return 0
    from .verify import verify

    report = verify(local, out, bf16_weights=args.dtype == "bfloat16")
    print("verification against transformers (eager attention, float32):")
    print("\n".join(report.lines()))
    return 0 if report.passed else 1


def peak_resident_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM belongs to this program alone; ru_maxrss would
    also count the parent's memory when we were started by fork + exec (e.g. from a test)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
