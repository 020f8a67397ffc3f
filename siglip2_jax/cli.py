"""The `siglip2-jax` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .pipeline import DEFAULT_MODEL, DEFAULT_TEMPLATE, load

DESCRIPTION = """\
SigLIP 2 vision-language encoders in JAX.

commands:
  convert SRC OUT              Hugging Face weights (hub id or local dir) -> a siglip2-jax checkpoint;
                               --verify certifies it against transformers.
  classify [MODEL] IMAGE...    zero-shot classification: sigmoid probability of each --labels entry.
  embed MODEL INPUT OUT        embed a folder / list of images (or --texts captions): sharded over all
                               devices and hosts, resumable after any crash.
  search OUT "query"           rank an embedded collection by a text (or --image) query.
  finetune --model M --data D --out O   fine-tune on image-text pairs with the sigmoid loss (LiT too).

MODEL is a siglip2-jax checkpoint directory, a Hugging Face model directory, or a hub id
(default google/siglip2-base-patch16-224; hub ids need a network the first time).

Run `siglip2-jax COMMAND --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siglip2-jax", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    from siglip2_convert.__main__ import EPILOG, add_arguments, run as run_convert
    convert = commands.add_parser("convert", help="convert Hugging Face weights to a siglip2-jax checkpoint",
                                  description="Convert Hugging Face SigLIP 2 weights to a siglip2-jax checkpoint.",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(convert)
    convert.set_defaults(run=run_convert)

    classify = commands.add_parser(
        "classify", help="zero-shot image classification",
        description="Zero-shot classification: for each image, the sigmoid probability of each label "
                    "(independent per label: they need not sum to 1).",
        epilog=CLASSIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    classify.add_argument("inputs", nargs="+", metavar="[MODEL] IMAGE",
                          help="optional model (checkpoint dir, HF dir or hub id), then image files")
    classify.add_argument("--labels", nargs="+", required=True, metavar="LABEL", help="candidate labels")
    classify.add_argument("--model", help=f"model, instead of the first positional (default {DEFAULT_MODEL})")
    classify.add_argument("--template", default=DEFAULT_TEMPLATE,
                          help="prompt with {} for the label (default: %(default)r)")
    classify.add_argument("--max-num-patches", type=int, default=None,
                          help="NaFlex models: patch budget per image (256, 576, 784, 1024)")
    classify.add_argument("--top", type=int, default=None, help="show only the best N labels per image")
    classify.add_argument("--json", action="store_true", help="print JSON instead of a table")
    classify.set_defaults(run=run_classify)

    # Commands that live in their own modules register themselves here: `register(commands)` adds a
    # subparser whose defaults include `run=function(args) -> exit status`.
    for register in _command_modules():
        register(commands)
    return parser


def _command_modules() -> list:
    from .embed import register as register_embed
    from .search import register as register_search
    from .train import register as register_finetune
    return [register_embed, register_search, register_finetune]


CLASSIFY_EPILOG = """\
examples:
  siglip2-jax classify cat.jpg dog.png --labels cat dog "a red car"
  siglip2-jax classify ckpt/b16-224 photos/*.jpg --labels cat dog --json

exit status: 0 all images classified; 1 some images could not be read (each named on stderr, the
others still classified); 2 bad arguments or model.
"""


def _looks_like_model(arg: str) -> bool:
    path = Path(arg).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    return not path.exists() and not path.is_symlink() and arg.count("/") == 1 and not arg.startswith((".", "/", "~")) \
        and Path(arg).suffix.lower() not in IMAGE_SUFFIXES


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm"}


def run_classify(args: argparse.Namespace) -> int:
    inputs = list(args.inputs)
    model = args.model
    if model is None and len(inputs) > 1 and _looks_like_model(inputs[0]):
        model = inputs.pop(0)
    model = model or DEFAULT_MODEL
    labels = [label for label in args.labels if label.strip()]
    if not labels:
        return _fail("--labels: give at least one non-empty label")
    if "{}" not in args.template:
        return _fail(f"--template {args.template!r}: needs {{}} where the label goes")

    from .images import ImageError, load_image

    images, names, failed = [], [], 0
    for name in inputs:
        try:
            images.append(load_image(Path(name)))
            names.append(name)
        except ImageError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    if not images:
        return 1 if failed else _fail("no images given")
    try:
        pipeline = load(model, max_num_patches=args.max_num_patches)
        probs = pipeline.zero_shot(images, labels, template=args.template)
    except (ValueError, OSError) as err:
        return _fail(f"{model}: {err}" if str(model) not in str(err) else str(err))
    if args.json:
        rows = [{"image": n, "probabilities": dict(zip(labels, map(float, p)))} for n, p in zip(names, probs)]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(format_table(names, labels, probs, args.top))
    return 1 if failed else 0


def format_table(names, labels, probs, top=None) -> str:
    lines = []
    width = max(len(label) for label in labels)
    for name, row in zip(names, probs):
        lines.append(name)
        for i in np.argsort(-row, kind="stable")[: top or len(labels)]:
            bar = "█" * int(round(row[i] * 30))
            lines.append(f"  {labels[i]:<{width}}  {row[i]:7.2%}  {bar}")
    return "\n".join(lines)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
