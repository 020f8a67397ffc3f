"""Input pipelines on grain: list the inputs, give each process its share, decode and preprocess them in
worker processes while the devices compute.

    records -> this process's share -> shuffled (differently each epoch) -> repeated -> transform -> batches
                                                                                      (in worker processes)

`make_loader` is the one way this package reads data. `siglip2-jax embed` gives it planned batches of
image paths and `DecodeBatch` (decode a whole batch, record what cannot be read instead of failing);
training gives it (image, caption) records, a per-record transform and a `batch_size`:

    loader = make_loader(pairs, transform, batch_size=256, shard=process_shard(), shuffle=True, seed=0,
                         num_epochs=10, drop_remainder=True, workers=8)
    for batch in loader: ...

Workers are spawned processes: a transform must be picklable (a top-level function or class instance)
and should carry settings, not models; a script that uses workers needs the usual
`if __name__ == "__main__":` guard (a spawned process imports the main module again).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .images import ImageError, ImagePreprocessor  # noqa: F401 (ImagePreprocessor: the image transform, re-exported)

if TYPE_CHECKING:  # grain is imported where a loader is made: the CLI's --help must not wait for it
    import grain

# ------------------------------------------------------------------------------------------------ listing


def list_files(folder: str | Path) -> list[str]:
    """Every file under `folder`, recursively, as absolute paths in sorted order (the same on every host,
    so the order does not depend on the file system). Hidden files and folders (".name") are skipped;
    symlinks to files are listed, symlinks to folders are not followed (no cycles)."""
    root = os.path.abspath(folder)
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(os.path.join(directory, f) for f in files if not f.startswith("."))
    return sorted(found)


def read_path_list(list_file: str | Path) -> list[str]:
    """The paths in a text file, one per line, in the file's order; blank lines are skipped and relative
    paths are taken relative to the list file's folder. Returned absolute (not resolving symlinks)."""
    base = os.path.dirname(os.path.abspath(list_file))
    lines = Path(list_file).read_text(encoding="utf-8").splitlines()
    return [os.path.normpath(os.path.join(base, line)) for line in lines if line.strip()]


def read_lines(text_file: str | Path) -> list[str]:
    """Every line of a UTF-8 text file (empty ones too, so row i is line i + 1)."""
    return Path(text_file).read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------------------------------------ sharding


def process_shard() -> tuple[int, int]:
    """(index, count) of this JAX process: the usual way to split records over hosts."""
    import jax

    return jax.process_index(), jax.process_count()


def shard_records(records: Sequence, index: int, count: int, *, drop_remainder: bool = False) -> Sequence:
    """Records index, index + count, index + 2 * count, ...: the shares of `count` processes are disjoint
    and together are everything. `drop_remainder` first trims to a multiple of `count` so that every
    share has the same length (training needs all hosts to take the same number of steps)."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in 0..{count - 1}")
    if drop_remainder:
        records = records[: len(records) // count * count]
    return records[index::count]


# ------------------------------------------------------------------------------------------------ loader


def make_loader(records: Sequence, transform: Callable[[Any], Any], *, batch_size: int | None = None,
                shard: tuple[int, int] = (0, 1), shuffle: bool = False, seed: int = 0, num_epochs: int = 1,
                drop_remainder: bool = False, workers: int = 0, worker_buffer_size: int = 2) -> grain.IterDataset:
    """A grain pipeline over `records` (any sequence: paths, (path, caption) pairs, planned batches).

    shard: (index, count) of this process (see `process_shard`); the process reads only its share.
    shuffle: a new order every epoch, the same on every run for the same seed.
    transform: runs on each record in `workers` processes (0: in this process); it must be picklable.
    batch_size: stack that many transformed records (numpy leaves along a new first axis); None: no batching.
    Iterating yields the transformed records (or batches) in a deterministic order.
    """
    import grain

    index, count = shard
    dataset = grain.MapDataset.source(shard_records(list(records), index, count, drop_remainder=drop_remainder))
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if num_epochs != 1:
        dataset = dataset.repeat(num_epochs)  # after shuffle: each epoch is shuffled anew
    dataset = dataset.map(transform)
    if batch_size is not None:
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    iterable = dataset.to_iter_dataset()
    if workers > 0:
        _absl_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=worker_buffer_size)
        iterable = iterable.mp_prefetch(options, worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
    return iterable


def iterate(loader: grain.IterDataset):
    """Yields the loader's elements, then stops its workers and frees their shared memory at once
    (grain frees the last block of each worker only when the iterator is garbage collected)."""
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        getattr(iterator, "close", lambda: None)()
        del iterator
        gc.collect()


def _absl_flags_parsed() -> None:
    """grain 0.2.18 reads an absl flag when it starts workers in a JAX program and fails if absl never
    parsed the command line (google/grain#1355, fixed after 0.2.18): take the flags' defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
    """Workers wait forever on a full queue if their parent is killed (kill -9, OOM killer): watch it.
    `parent` is passed in, not read here: the parent may already have died while this worker started."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


# ------------------------------------------------------------------------------------------------ transforms


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    """A planned batch {"indices", "sources", ...} -> the same dict plus "inputs" (the preprocessed batch
    of the sources that could be read, or None), "kept" (their indices) and "refused" ((index, source,
    reason) of the others). One broken file never costs the rest of its batch.

    preprocess: `ImagePreprocessor` for images; a tokenizer's `encode` for texts (never refuses)."""

    preprocess: Callable

    def __call__(self, plan: dict) -> dict:
        kept, refused, inputs = [], [], []
        for index, source in zip(plan["indices"], plan["sources"]):
            try:
                inputs.append(self.preprocess([source]))
                kept.append(index)
            except ImageError as error:
                refused.append((int(index), source, _reason(error, source)))
            except MemoryError:
                raise  # this process's trouble, not the file's
            except Exception as error:  # decoders raise anything on hostile files; record it, go on
                refused.append((int(index), source, f"cannot read ({type(error).__name__}: {error})"))
        stacked = _concat(inputs) if inputs else None
        return {**plan, "inputs": stacked, "kept": np.asarray(kept, np.int64), "refused": refused}


def _concat(batches: list):
    """Concatenate single-item batches (arrays, or dicts of arrays for NaFlex) along the first axis."""
    if isinstance(batches[0], dict):
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    return np.concatenate(batches)


def _reason(error: ImageError, source: str) -> str:
    """ImageError messages are '<source>: <reason>'; the record keeps the path and reason apart."""
    text = str(error)
    return text[len(source) + 2:] if text.startswith(f"{source}: ") else text
