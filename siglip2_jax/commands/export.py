"""`siglip2-jax export CKPT OUT`: a siglip2-jax checkpoint (converted or fine-tuned) -> a Hugging Face model
directory that transformers loads."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import CommandError
from .convert import memory_summary, peak_resident_bytes

EPILOG = """\
CKPT is any siglip2-jax checkpoint directory: converted (siglip2-jax convert) or fine-tuned
(runs/NAME/model). OUT becomes a Hugging Face model directory that transformers loads with
AutoModel.from_pretrained(OUT) and AutoProcessor.from_pretrained(OUT): config.json (model_type siglip
for FixRes, siglip2 for NaFlex), model.safetensors (sharded with model.safetensors.index.json past
--max-shard-size), the tokenizer files, preprocessor_config.json. OUT appears only when complete.

exit status: 0 exported, 2 bad input.
"""


def register(commands) -> None:
    parser = commands.add_parser("export", help="export a siglip2-jax checkpoint to Hugging Face format",
                                 description="Export a siglip2-jax checkpoint (converted or fine-tuned) to a "
                                             "Hugging Face transformers model directory.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="siglip2-jax checkpoint directory")
    parser.add_argument("out", metavar="OUT", help="output Hugging Face model directory")
    parser.add_argument("--format", choices=["hf"], default="hf", help="output format (Hugging Face transformers)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier output (a model directory, not the one being read)")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import export_hf, is_checkpoint
    from ..checkpoint.hf_export import parse_size

    checkpoint, out = Path(args.checkpoint), Path(args.out)
    if not is_checkpoint(checkpoint):
        raise CommandError(f"{checkpoint}: not a siglip2-jax checkpoint directory (no params/ and config.json)")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CommandError(f"{out}: already exists and is not empty (use --overwrite to replace it)")
    start = time.perf_counter()
    parse_size(args.max_shard_size)
    export_hf(checkpoint, out, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    weight_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    peak = peak_resident_bytes()
    print(f"exported {checkpoint} -> {out} in {time.perf_counter() - start:.1f} s; "
          f"{memory_summary(peak, weight_bytes, 'safetensors')}")
    return 0
