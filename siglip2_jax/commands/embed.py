"""`siglip2-jax embed MODEL INPUT OUT`: the flags of `siglip2_jax.embed.embed`, and what it prints."""

from __future__ import annotations

import argparse
import errno
import sys

from .. import defaults
from ..embed import COMPUTE_DTYPES, DTYPES
from . import CommandError, add_multi_host_arguments, int_at_least, positive_int

OUT_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

# XLA, grain and jax.distributed failures: one line too, as `embed` has always reported them
ALSO_REFUSED = (RuntimeError,)

EPILOG = """\
INPUT is one of:
  a folder            every file under it, recursively, in sorted order (hidden files skipped)
  a text file         one image path per line (relative paths are relative to the file's folder)
  a text file --texts one caption per line: text embeddings instead of image embeddings

OUT (format version 1, described in full in the docstring of siglip2_jax/embed_store.py):
  manifest.json        the model, input and options; the result once finished
  parts/NNNNNN.npy     embeddings, (rows, dim), L2-normalized, float32 or --dtype float16
  parts/NNNNNN.json    which input each row is, and the inputs of that part that were refused, with reasons
  refused.jsonl        every refused input with its reason
Read it with `paths, embeddings = siglip2_jax.read_embeddings(OUT)`; search it with `siglip2-jax search`.

Resuming: killed or interrupted at any moment, the same command continues where it stopped and gives
the same result as an uninterrupted run (every input once, bit-identical embeddings). A command with a
different model, input or options than OUT was started with is refused.

Multi-host: run the same command on every host with --coordinator-address, --num-processes and a
distinct --process-id (or the JAX_* environment variables). Each process reads only its share of the
inputs and uses its local devices; OUT must be on a shared file system.

examples:
  siglip2-jax embed ckpt/b16-224 photos/ out/photos --dtype float16
  siglip2-jax embed ckpt/b16-224 photos/ out/photos --compute-dtype bfloat16   # 2x on a recent x86 CPU
  siglip2-jax embed ckpt/b16-224 captions.txt out/captions --texts
  siglip2-jax embed ckpt/so400m list.txt out/ --coordinator-address host0:1234 --num-processes 8 --process-id 3

exit status: 0 every input embedded; 1 finished, but some inputs were refused (named on stderr and in
OUT/refused.jsonl); 2 bad arguments or model, or OUT was started with another model, input or options;
130 interrupted (run the command again to continue).
"""


def register(commands) -> None:
    parser = commands.add_parser(
        "embed", help="embed a folder or list of images (or captions), sharded, multi-host, resumable",
        description="Embed every image of a folder or list (or every caption of a text file) into OUT,\n"
                    "on all local devices of every host; resumable after any crash.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="siglip2-jax checkpoint dir, Hugging Face model dir, or hub id")
    parser.add_argument("inputs", metavar="INPUT", help="folder, text file of image paths, or (--texts) of captions")
    parser.add_argument("out", metavar="OUT", help="output folder (created; continued if it holds this job)")
    parser.add_argument("--texts", action="store_true", help="INPUT is a text file of captions, one per line")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="stored precision (default float32)")
    parser.add_argument("--compute-dtype", default="float32", choices=COMPUTE_DTYPES,
                        help="the model's precision (default float32). bfloat16: bf16 matmuls with float32 "
                             "accumulation, about 2x faster on CPUs with AVX512-BF16/AMX and on GPUs/TPUs; "
                             "embeddings' cosine with float32 >= 0.9999")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="inputs per step over all local devices (default 128)")
    parser.add_argument("--part-size", type=positive_int, default=None,
                        help="inputs per output part, the unit of resuming (default: the one OUT was started with "
                             f"when continuing it; else {defaults.ACCELERATOR_PART_SIZE} with accelerators, and on CPU "
                             f"{defaults.CPU_PART_SIZE} or the "
                             "batch size if larger, so that a part is saved every minute or two)")
    parser.add_argument("--max-num-patches", type=positive_int, default=None,
                        help="NaFlex models: patch budget per image (default: the checkpoint's, usually 256)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="FixRes models: embed at this input size (position table resized as transformers' "
                             "interpolate_pos_encoding does; default: the model's own)")
    parser.add_argument("--model-parallel", type=positive_int, default=1,
                        help="devices that share one copy of the weights (default 1: pure data parallel)")
    parser.add_argument("--workers", type=int_at_least(0), default=None,
                        help="image decoding processes (default: CPU cores - 1, at most 32, with accelerators; "
                             "0 on CPU, where this process decodes while the model runs on the cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_multi_host_arguments(parser)


def subject(args: argparse.Namespace) -> str:
    return args.out


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..embed import embed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    try:
        result = embed(args.model, args.inputs, args.out, texts=args.texts, dtype=args.dtype,
                       compute_dtype=args.compute_dtype, batch_size=args.batch_size, part_size=args.part_size,
                       max_num_patches=args.max_num_patches, image_size=args.image_size,
                       model_parallel=args.model_parallel, workers=args.workers, progress=not args.no_progress)
    except OSError as error:
        if error.errno not in OUT_FULL_OR_READ_ONLY:
            raise
        # the finished parts stay: say so, as after Ctrl-C
        raise CommandError(f"{error.filename or args.out}: {error.strerror}; {_kept(args.out)}; make room (or "
                           "make OUT writable) and run the same command to continue") from None
    if not result.complete:
        raise CommandError(f"{result.out}: parts of other processes are missing; is OUT on a file system all "
                           "hosts share?")
    kind = "images" if not args.texts else "texts"
    note = f", {len(result.refused)} refused (listed in {result.out / 'refused.jsonl'})" if result.refused else ""
    print(f"embedded {result.embedded} of {result.inputs} {kind} into {result.out}{note}", file=sys.stderr)
    return result.exit_status


def interrupted(args: argparse.Namespace, error: KeyboardInterrupt) -> str:
    return f"interrupted: {_kept(args.out)}; run the same command to continue"


def _kept(out) -> str:
    """What an interrupted run leaves in OUT: its finished parts (the batches of an unfinished part are
    embedded again by the next run)."""
    import numpy as np

    from ..embed_store import EmbedError, done_mask, read_index, read_manifest

    try:
        manifest = read_manifest(out)
    except EmbedError:
        return f"nothing was saved in {out}"
    done = done_mask(out, manifest["num_parts"])
    rows = sum(len(read_index(out, int(part))["indices"]) for part in np.flatnonzero(done))
    return f"{int(done.sum())} of {len(done)} parts ({rows} embeddings) are saved in {out}"
