"""`siglip2-jax convert SRC OUT` (also `python -m siglip2_convert`): Hugging Face SigLIP / SigLIP 2 weights or a
big_vision `.npz` -> a siglip2-jax checkpoint directory, and its --verify against a reference (torch, in
`siglip2_convert.verify`)."""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time
from pathlib import Path

from . import CommandError

DESCRIPTION = "Convert Hugging Face SigLIP 2 weights to a siglip2-jax checkpoint."

EPILOG = """\
SRC is a Hugging Face hub id (downloaded with huggingface_hub; needs a network) or a local directory
holding config.json and model.safetensors (or sharded model-0000k-of-0000n.safetensors with
model.safetensors.index.json). Pickle files (.bin/.pt) are refused: they can run code when loaded.

SRC may also be a big_vision checkpoint: siglip2_VARIANT.npz (or a directory or hub id holding one).
The architecture comes from the variant in the file name (b16_224 ... g-opt16_384, b16_naflex,
so400m16_naflex) or from --config; the Gemma tokenizer from --tokenizer or a *.model beside the .npz.

OUT becomes a self-contained checkpoint (params written by Orbax, config.json, tokenizer and
preprocessor files) that `siglip2_jax.load(OUT)` reads without a network.

--verify runs transformers (needs torch) on the source weights and siglip2-jax on OUT, on the same random
pixels and token ids, prints the largest differences and exits 1 if they exceed the tolerances
(float32: normalized embeddings 2e-5, logits 1e-3; bfloat16 weights: embedding cosine 0.999).
For a FixRes .npz the reference is open_clip reading the .npz with its own loader (needs torch and
open-clip-torch); open_clip has no NaFlex model, so a NaFlex .npz is compared with transformers on
OUT exported to Hugging Face format (which checks the model, not the .npz key mapping).

exit status: 0 converted (and verified), 1 verification failed, 2 bad input.
"""


def register(commands) -> None:
    parser = commands.add_parser("convert", help="convert Hugging Face weights to a siglip2-jax checkpoint",
                                 description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="hub id (google/siglip2-base-patch16-224), local HF model directory, "
                                                   "or big_vision .npz")
    parser.add_argument("out", metavar="OUT", help="output checkpoint directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="storage dtype of the big weights (default %(default)s; patch/position embeddings and norms "
                             "stay float32)")
    parser.add_argument("--verify", action="store_true", help="compare against transformers afterwards (needs torch)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier output (a model directory, not the one being read)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--config", metavar="FILE", help=".npz sources: the architecture (configs/NAME.json or a preset "
                                                          "name) instead of the variant in the file name")
    parser.add_argument("--tokenizer", metavar="PATH", help=".npz sources: the Gemma tokenizer.model (or tokenizer.json) "
                                                             "to include (default: a *.model beside the .npz)")


def missing_modules(names) -> list[str]:
    """The modules among `names` that cannot be imported (checked without importing them)."""
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken parent
            missing.append(name)
    return missing


def verify_requirements(src: str, config=None) -> str | None:
    """Why --verify cannot run here (a one-line message), or None. A FixRes .npz is verified with open_clip."""
    from ..checkpoint.big_vision import find_npz, variant_config, variant_of

    try:
        npz = find_npz(src)
        fixres_npz = npz is not None and not (config or variant_config(variant_of(npz))).naflex
    except ValueError:
        fixres_npz = False  # the conversion reports it
    needed = {"torch": "torch", "transformers": "transformers"}
    if fixres_npz:  # without its torchvision requirement: see README, Conversion
        needed["open_clip"] = "--no-deps open-clip-torch==3.3.0 timm==1.0.31 ftfy"
    missing = missing_modules(needed)
    if missing:
        return (f"--verify needs {' and '.join(missing)}, which cannot be imported here: "
                + "; ".join(f"pip install {needed[m]}" for m in missing) + " (or convert without --verify)")
    return None


def _config_arg(value: str | None):
    from ..config import Siglip2Config, preset_names

    if value is None:
        return None
    if not Path(value).exists() and value.split("/")[-1] in preset_names():
        return Siglip2Config.preset(value)
    return Siglip2Config.from_json(value)


def run(args: argparse.Namespace) -> int:
    import ml_dtypes
    import numpy as np

    from ..checkpoint import convert

    param_dtype = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CommandError(f"{out}: already exists and is not empty (use --overwrite to replace it)")
    config = _config_arg(args.config)
    if args.verify and (problem := verify_requirements(args.src, config)):
        raise CommandError(problem)
    start = time.perf_counter()
    local = convert(args.src, out, param_dtype=param_dtype, overwrite=args.overwrite, progress=not args.quiet,
                    config=config, tokenizer=args.tokenizer)
    files = [local] if local.is_file() else list(local.glob("*.safetensors"))
    weight_bytes = sum(p.stat().st_size for p in files)
    kind = ".npz" if local.is_file() else "safetensors"
    print(f"converted {args.src} -> {out} in {time.perf_counter() - start:.1f} s; "
          f"{memory_summary(peak_resident_bytes(), weight_bytes, kind)}")
    if not args.verify:
        return 0
    from siglip2_convert.verify import verify, verify_big_vision  # torch: only here

    if local.is_file():
        report = verify_big_vision(local, out, bf16_weights=args.dtype == "bfloat16")
    else:
        report = verify(local, out, bf16_weights=args.dtype == "bfloat16")
        print("verification against transformers (eager attention, float32):")
    print("\n".join(report.lines()))
    return 0 if report.passed else 1


def memory_summary(peak: int, weight_bytes: int, kind: str) -> str:
    """'peak resident memory 2.46 GiB (0.58x the 4.23 GiB of safetensors)'. The ratio only from 256 MiB of
    weights on: below that the interpreter and JAX themselves (about 0.2 GiB) are most of the peak, and the
    line says 'peak resident memory 0.21 GiB (for 3.1 MiB of safetensors)'."""
    summary = f"peak resident memory {peak / 2**30:.2f} GiB"
    if weight_bytes >= 256 << 20:
        return summary + f" ({peak / weight_bytes:.2f}x the {weight_bytes / 2**30:.2f} GiB of {kind})"
    return summary + f" (for {weight_bytes / 2**20:.1f} MiB of {kind})"


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
