"""`siglip2-jax classify [MODEL] IMAGE... --labels ...`: zero-shot classification of image files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import DEFAULT_MODEL, DEFAULT_TEMPLATE, check_template
from . import CommandError, positive_int

EPILOG = """\
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


def register(commands) -> None:
    classify = commands.add_parser(
        "classify", help="zero-shot image classification",
        description="Zero-shot classification: for each image, the sigmoid probability of each label "
                    "(independent per label: they need not sum to 1).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    # nargs="*": with no image left (all taken by --labels), run says which ones were taken
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


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm"}


def _looks_like_model(arg: str) -> bool:
    path = Path(arg).expanduser()
    if path.is_dir():  # never an image: a damaged checkpoint is reported as one, not replaced by the default
        return True
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


def subject(args: argparse.Namespace) -> str:
    return args.model


def run(args: argparse.Namespace) -> int:
    # every argument is checked before the model loads (seconds to minutes)
    if not args.labels:
        raise CommandError("--labels: give at least one label")
    try:
        labels = check_labels(args.labels)
        check_template(args.template)
    except ValueError as err:
        raise CommandError(str(err).replace("template ", "--template ", 1)) from None
    inputs = list(args.inputs)
    if args.model is None and len(inputs) > 1 and _looks_like_model(inputs[0]):
        args.model = inputs.pop(0)
    args.model = args.model or DEFAULT_MODEL  # the subject of an error from here on
    if not inputs:
        raise CommandError("no images given (put them before --labels, or after --)")

    from ..images import ImageError, load_image

    images, names, failed = [], [], 0
    for name in inputs:
        try:
            images.append(load_image(Path(name)))
            names.append(name)
        except ImageError as err:  # the others are still classified
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    if not images:
        return 1
    from ..pipeline import load

    pipeline = load(args.model, max_num_patches=args.max_num_patches, image_size=args.image_size)
    probs = pipeline.zero_shot(images, labels, template=args.template)
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
