"""Image-text pairs for fine-tuning: a captions file read and checked, and batches of pairs on the
package's grain loader (`siglip2_jax.data.make_loader`).

    captions.jsonl   one object per line: {"image": "cats/1.jpg", "caption": "a cat on a sofa"}
    captions.csv     a header row naming the columns (image or path, caption or text), then one pair a row

Image paths are relative to the captions file's folder (or absolute). Every problem is one line naming the
file and line: a missing image, an empty caption, a malformed row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import ImagePreprocessor, make_loader, process_shard, unreadable_reason

IMAGE_KEYS, CAPTION_KEYS = ("image", "path", "file"), ("caption", "text")


class DataError(ValueError):
    """A captions file that cannot be used. The message is one line: '<file>:<line>: <reason>'."""


@dataclasses.dataclass(frozen=True)
class Pair:
    image: Path
    caption: str


# ------------------------------------------------------------------------------------------ reading


def read_pairs(captions_file: str | Path, *, check_images: bool = True) -> list[Pair]:
    """All pairs of a JSONL or CSV captions file, checked (see the module docstring)."""
    path = Path(captions_file)
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory, not a captions file' if path.is_dir() else 'no such file'}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else _jsonl_rows(path, text)
    pairs = []
    for line, image, caption in rows:
        where = f"{path}:{line}"
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: the image path is empty or not a string")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{where}: the caption of {image} is empty or not a string")
        image_path = (path.parent / image).absolute()
        if check_images and not image_path.is_file():
            raise DataError(f"{where}: image {image} not found (looked for {image_path})")
        pairs.append(Pair(image_path, caption))
    if not pairs:
        raise DataError(f"{path}: no image-caption pairs in it")
    return pairs


def _jsonl_rows(path: Path, text: str):
    for line, raw in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: expected a JSON object like {{\"image\": ..., \"caption\": ...}}")
        yield line, _field(record, IMAGE_KEYS, path, line), _field(record, CAPTION_KEYS, path, line)


def _csv_rows(path: Path, text: str):
    reader = csv.reader(io.StringIO(text, newline=""))  # quoted captions may hold commas and newlines
    header = [cell.strip().lower() for cell in next(reader, [])]
    image_col = next((header.index(k) for k in IMAGE_KEYS if k in header), None)
    caption_col = next((header.index(k) for k in CAPTION_KEYS if k in header), None)
    if image_col is None or caption_col is None:
        raise DataError(f"{path}:1: the header row must name an image column ({' or '.join(IMAGE_KEYS)}) "
                        f"and a caption column ({' or '.join(CAPTION_KEYS)}), got {header}")
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: {len(row)} columns, the header has {len(header)} "
                            f"(quote captions that contain commas)")
        yield line, row[image_col].strip(), row[caption_col]


def _field(record: dict, names: Sequence[str], path: Path, line: int):
    for name in names:
        if name in record:
            return record[name]
    raise DataError(f"{path}:{line}: no {' or '.join(repr(n) for n in names)} field")


def split_holdout(pairs: list[Pair], count: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, `count` held-out pairs chosen at random by `seed`), both in file order."""
    if not 0 <= count < len(pairs):
        raise DataError(f"cannot hold out {count} of {len(pairs)} pairs for evaluation")
    held = set(np.random.default_rng(seed).permutation(len(pairs))[:count].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


# ------------------------------------------------------------------------------------------ batches


@dataclasses.dataclass(frozen=True)
class PairTransform:
    """One pair -> dict(images=the image tower's input for one image, token_ids=(max_length,) int32), with
    the model's own preprocessing and tokenizer. It holds settings and the tokenizer (which pickles), so
    grain runs it in worker processes."""

    images: ImagePreprocessor
    tokenizer: object
    max_length: int = 64

    def __call__(self, pair: Pair) -> dict:
        return dict(images=self.images.one(pair.image),
                    token_ids=self.tokenizer.encode([pair.caption], self.max_length)[0])


def pair_loader(pairs: Sequence[Pair], transform: PairTransform, global_batch: int, *, seed: int = 0,
                workers: int = 0, skipped: "SkippedImages | None" = None):
    """Endless training batches (`siglip2_jax.data.make_loader`): the pairs in a new seeded order every
    epoch, cut into global batches of `global_batch`, of which this process gets its rows (`global_batch /
    processes` pairs), preprocessed in `workers` processes. The batches do not depend on the number of
    processes. Its iterator's `get_state()` / `set_state()` resume it exactly; the state depends on the
    number of workers, so a resumed run keeps the count it started with.

    skipped: leave out the pairs whose image cannot be read (each recorded by `skipped`) instead of
        stopping with the image's error. The next readable pairs take their places in the batches."""
    index, count = process_shard()
    if global_batch % count:
        raise ValueError(f"batch size {global_batch} does not split over {count} processes")
    check_batch_size(len(pairs), global_batch)
    if skipped is not None:
        transform = _OrUnreadable(transform)
    return make_loader(pairs, transform, batch_size=global_batch // count, batch_share=(index, count),
                       shuffle=True, seed=seed, num_epochs=None, drop_remainder=True, keep=skipped, workers=workers)


def check_batch_size(num_pairs: int, global_batch: int) -> None:
    if num_pairs < global_batch:
        raise DataError(f"{num_pairs} training pairs are fewer than one batch of {global_batch}")


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """Stands for a pair whose image could not be read (see `SkippedImages`)."""

    image: str
    reason: str


@dataclasses.dataclass(frozen=True)
class _OrUnreadable:
    """A pair transform that returns `Unreadable` instead of raising on an image that cannot be read."""

    transform: PairTransform

    def __call__(self, pair: Pair):
        try:
            return self.transform(pair)
        except Exception as error:
            return Unreadable(str(pair.image), unreadable_reason(error, pair.image))


class SkippedImages:
    """The `keep` filter of `pair_loader` with skipping: drops `Unreadable` pairs, appends each image to
    `record` (JSONL: {"image", "reason", "process"}) and says so on stderr once per image, also over
    resumed runs (the images already in `record` are not said again). Raises DataError when so many images
    are unreadable that fewer readable pairs than one batch are left (the loader would wait forever)."""

    def __init__(self, record: Path, num_pairs: int, global_batch: int, process: int = 0):
        self.record, self.num_pairs, self.global_batch, self.process = Path(record), num_pairs, global_batch, process
        self.seen = set()
        if self.record.is_file():
            self.seen = {json.loads(line)["image"] for line in self.record.read_text().splitlines() if line.strip()}

    def __call__(self, element) -> bool:
        if not isinstance(element, Unreadable):
            return True
        if element.image not in self.seen:
            self.seen.add(element.image)
            with self.record.open("a", encoding="utf-8") as file:
                file.write(json.dumps({"image": element.image, "reason": element.reason, "process": self.process},
                                      ensure_ascii=False) + "\n")
            import sys

            print(f"skipped: {element.image}: {element.reason} (recorded in {self.record})", file=sys.stderr)
            if self.num_pairs - len(self.seen) < self.global_batch:
                raise DataError(f"{len(self.seen)} of {self.num_pairs} training images cannot be read (listed in "
                                f"{self.record}): fewer readable pairs than one batch of {self.global_batch}")
        return False
