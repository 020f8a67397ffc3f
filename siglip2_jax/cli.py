"""The `siglip2-jax` command.

Building the parser imports no jax, flax, grain or orbax: every command declares its options in a module
that is light to import (`register(commands)`), and its `run` imports the heavy parts when it starts.
So `siglip2-jax --help` and `siglip2-jax COMMAND --help` answer at once (`tests/test_cli.py` checks it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .config import DEFAULT_MODEL, DEFAULT_TEMPLATE, check_template

DESCRIPTION = """\
SigLIP 2 vision-language encoders in JAX.

commands:
  convert SRC OUT              Hugging Face weights (hub id or local dir) or a big_vision .npz -> a
                               siglip2-jax checkpoint; --verify certifies it against a reference.
  export CKPT OUT              a siglip2-jax checkpoint (converted or fine-tuned) -> a Hugging Face
                               model directory that transformers loads.
  classify [MODEL] IMAGE...    zero-shot classification: sigmoid probability of each --labels entry.
  embed MODEL INPUT OUT        embed a folder / list of images (or --texts captions): sharded over all
                               devices and hosts, resumable after any crash.
  search OUT "query"           rank an embedded collection by a text (or --image) query.
  finetune --model M --data D --out O   fine-tune on image-text pairs with the sigmoid loss (LiT too).
  serve MODEL                  an OpenAI-compatible HTTP server: embeddings of texts and images,
                               zero-shot classification and ranking, with dynamic batching.

MODEL is a siglip2-jax checkpoint directory, a Hugging Face model directory, or a hub id
(default google/siglip2-base-patch16-224; hub ids need a network the first time).

Run `siglip2-jax COMMAND --help` for each command's options.
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: `PROG: error: MESSAGE (see PROG --help)`, exit status 2.
    Subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def int_at_least(minimum: int):
    """An argparse `type` for whole numbers >= minimum; anything else is a one-line usage error
    (a 0 or negative count is never quietly replaced by a default)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {minimum}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="siglip2-jax", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    from siglip2_convert.__main__ import EPILOG, add_arguments, run as run_convert
    convert = commands.add_parser("convert", help="convert Hugging Face weights to a siglip2-jax checkpoint",
                                  description="Convert Hugging Face SigLIP 2 weights to a siglip2-jax checkpoint.",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(convert)
    convert.set_defaults(run=run_convert)

    from siglip2_convert.__main__ import EXPORT_EPILOG, add_export_arguments, run_export
    export = commands.add_parser("export", help="export a siglip2-jax checkpoint to Hugging Face format",
                                 description="Export a siglip2-jax checkpoint (converted or fine-tuned) to a "
                                             "Hugging Face transformers model directory.",
                                 epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(export)
    export.set_defaults(run=run_export)

    classify = commands.add_parser(
        "classify", help="zero-shot image classification",
        description="Zero-shot classification: for each image, the sigmoid probability of each label "
                    "(independent per label: they need not sum to 1).",
        epilog=CLASSIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    # nargs="*": with no image left (all taken by --labels), run_classify says which ones were taken
    classify.add_argument("inputs", nargs="*", metavar="[MODEL] IMAGE",
                          help="optional model (checkpoint dir, HF dir or hub id), then image files")
    classify.add_argument("--labels", nargs="+", action="extend", default=[], metavar="LABEL",
                          help="candidate labels (takes every word up to the next option or --)")
    classify.add_argument("--label", action="append", dest="labels", metavar="LABEL",
                          help="one candidate label; repeat it for more (never takes an image)")
    classify.add_argument("--model", help=f"model, instead of the first positional (default {DEFAULT_MODEL})")
    classify.add_argument("--template", default=DEFAULT_TEMPLATE,
                          help="prompt with one {} where the label goes (default: %(default)r)")
    classify.add_argument("--max-num-patches", type=positive_int, default=None, metavar="N",
                          help="NaFlex models: patch budget per image (256, 576, 784, 1024)")
    classify.add_argument("--image-size", type=positive_int, default=None, metavar="S",
                          help="FixRes models: classify at S x S pixels (position table resized as transformers' "
                               "interpolate_pos_encoding does; default: the model's own size)")
    classify.add_argument("--top", type=positive_int, default=None, metavar="N",
                          help="only the best N labels per image, best first (in the table and in --json)")
    classify.add_argument("--json", action="store_true", help="print JSON instead of a table")
    classify.set_defaults(run=run_classify)

    # Commands that live in their own modules register themselves here: `register(commands)` adds a
    # subparser whose defaults include `run=function(args) -> exit status`. Their modules must import
    # without jax (heavy imports go inside `run`): `tests/test_cli.py` checks that --help stays light.
    for register in _command_modules():
        register(commands)
    return parser


def _command_modules() -> list:
    from .embed import register as register_embed
    from .search import register as register_search
    from .train.config import register as register_finetune
    from .serving.command import register as register_serve
    return [register_embed, register_search, register_finetune, register_serve]


CLASSIFY_EPILOG = """\
examples:
  siglip2-jax classify cat.jpg dog.png --labels cat dog "a red car"
  siglip2-jax classify ckpt/b16-224 photos/*.jpg --label cat --label dog --json
  siglip2-jax classify --labels cat dog -- cat.jpg dog.png          (-- ends the labels)

labels: --labels takes every following word up to the next option or `--`; --label takes exactly one
and may be repeated; both can be mixed. A label that names an existing file or ends like an image file
(.jpg, .png, ...) is refused, since it is almost surely an image that --labels took by mistake. Each
label must be non-empty and given once. --template needs exactly one {} (literal braces: {{ and }}).

--json prints [{"image": FILE, "probabilities": {LABEL: p, ...}}, ...]: labels in the order given, or
with --top N the best N, best first.

exit status: 0 all images classified; 1 some images could not be read (each named on stderr, the
others still classified); 2 bad arguments or model.
"""


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm"}


def _looks_like_model(arg: str) -> bool:
    path = Path(arg).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file()
    return not path.exists() and not path.is_symlink() and arg.count("/") == 1 and not arg.startswith((".", "/", "~")) \
        and Path(arg).suffix.lower() not in IMAGE_SUFFIXES


def _looks_like_image_path(label: str) -> bool:
    path = Path(label).expanduser()
    return path.suffix.lower() in IMAGE_SUFFIXES or path.is_file() or path.is_symlink()


def check_labels(labels: list[str]) -> list[str]:
    """The labels as given, or ValueError naming the first that is empty, repeated, or an image path."""
    seen = set()
    for number, label in enumerate(labels, 1):
        if not label.strip():
            raise ValueError(f"--labels: label {number} is empty")
        if label in seen:
            raise ValueError(f"--labels: {label!r} is given twice (each label is one column of the output)")
        if _looks_like_image_path(label):
            raise ValueError(f"--labels: {label!r} looks like an image file, not a label: put the images before "
                             f"--labels or end the labels with --")
        seen.add(label)
    return labels


def run_classify(args: argparse.Namespace) -> int:
    # every argument is checked before the model loads (seconds to minutes)
    if not args.labels:
        return _fail("--labels: give at least one label")
    try:
        labels = check_labels(args.labels)
        check_template(args.template)
    except ValueError as err:
        return _fail(str(err).replace("template ", "--template ", 1))
    inputs = list(args.inputs)
    model = args.model
    if model is None and len(inputs) > 1 and _looks_like_model(inputs[0]):
        model = inputs.pop(0)
    model = model or DEFAULT_MODEL
    if not inputs:
        return _fail("no images given (put them before --labels, or after --)")

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
        return 1
    from .pipeline import load

    try:
        pipeline = load(model, max_num_patches=args.max_num_patches, image_size=args.image_size)
        probs = pipeline.zero_shot(images, labels, template=args.template)
    except (ValueError, OSError) as err:
        return _fail(f"{model}: {err}" if str(model) not in str(err) else str(err))
    if args.json:
        rows = [{"image": n, "probabilities": {labels[i]: float(p[i]) for i in _shown(p, args.top)}}
                for n, p in zip(names, probs)]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(format_table(names, labels, probs, args.top))
    return 1 if failed else 0


def _shown(row, top: int | None) -> list[int]:
    """Indices of the labels to show: all, in the order given; or the best `top`, best first."""
    import numpy as np

    if top is None:
        return list(range(len(row)))
    return [int(i) for i in np.argsort(-np.asarray(row), kind="stable")[:top]]


def format_table(names, labels, probs, top=None) -> str:
    """One block per image: its labels best first (the best `top` only, if given), probability and a bar."""
    import numpy as np

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
