"""`siglip2-jax search OUT "query"`: the flags of `siglip2_jax.search.search`, and its table or JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..search import DEFAULT_CHUNK_ROWS
from . import positive_int

EPILOG = """\
examples:
  siglip2-jax search out/photos "a dog on a beach"
  siglip2-jax search out/photos --image query.jpg --top-k 20 --json
  siglip2-jax search out/captions --image photo.jpg          (image -> text: which caption fits best)

Scores are cosine similarities; text <-> image pairs also show the model's sigmoid probability of a match.
The query is encoded by the model recorded in OUT/manifest.json (--model to point at a moved copy).
Memory stays bounded by --chunk-rows, whatever the size of OUT.

exit status: 0 results printed; 2 bad arguments, OUT not an embed output, or the model missing or different.
"""


def register(commands) -> None:
    parser = commands.add_parser(
        "search", help="rank an embed output by similarity to a text or an image",
        description="Rank the embeddings in OUT (written by `siglip2-jax embed`) by similarity to a text\n"
                    "query or, with --image, to an image.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="OUT", help="an embed output folder")
    parser.add_argument("query", metavar="QUERY", nargs="?", help="the text to search for")
    parser.add_argument("--image", metavar="PATH", help="search by this image instead of a text")
    parser.add_argument("--top-k", type=positive_int, default=10, help="results to show (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--model", help="the model, if it has moved since embedding (must be the same weights)")
    parser.add_argument("--chunk-rows", type=positive_int, default=DEFAULT_CHUNK_ROWS,
                        help=f"embeddings scored per step: bounds memory (default {DEFAULT_CHUNK_ROWS})")
    parser.add_argument("--partial", action="store_true", help="search an unfinished OUT (the parts done so far)")


def subject(args: argparse.Namespace) -> str:
    return args.out


def run(args: argparse.Namespace) -> int:
    from ..search import search

    hits = search(args.out, args.query, image=args.image, top_k=args.top_k, model=args.model,
                  chunk_rows=args.chunk_rows, partial=args.partial)
    if args.json:
        print(json.dumps([dataclasses.asdict(h) for h in hits], indent=2, ensure_ascii=False))
    else:
        for hit in hits:
            probability = f"  {hit.probability:7.2%}" if hit.probability is not None else ""
            print(f"{hit.rank:4d}  {hit.score:+.4f}{probability}  {hit.path}")
    return 0
