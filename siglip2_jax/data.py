"""Input pipelines on grain: list the inputs, give each process its share, decode and preprocess them in
worker processes while the devices compute.

    records -> this process's share -> shuffled (differently each epoch) -> repeated -> transform -> batches
                                                                                      (in worker processes,
                                                                                       a few batches ahead)

`make_loader` is the one way this package reads data. `siglip2-jax embed` gives it planned batches of
image paths and `DecodeBatch` (decode a whole batch, record what cannot be read instead of failing);
training gives it (image, caption) records, a per-record transform and a `batch_size`:

    loader = make_loader(pairs, transform, batch_size=256, batch_share=process_shard(), shuffle=True, seed=0,
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

from .images import ImageError, ImagePreprocessor, NaFlexBatch  # noqa: F401 (ImagePreprocessor: the image transform, re-exported)

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
    return [os.path.normpath(os.path.join(base, line)) for line in read_lines(list_file) if line.strip()]


def read_lines(text_file: str | Path) -> list[str]:
    """Every line of a UTF-8 text file (empty ones too, so row i is line i + 1). Lines end at "\n", "\r\n"
    or "\r" only: `str.splitlines` would also split at U+2028, form feeds and other characters a caption
    may hold. A leading byte-order mark (Windows editors write one) is dropped. Raises UnicodeDecodeError."""
    lines = Path(text_file).read_text(encoding="utf-8-sig").split("\n")  # universal newlines: all are "\n"
    return lines[:-1] if lines[-1] == "" else lines  # "" after a final newline (or of an empty file)


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


READ_AHEAD = 4                # elements (batches) prepared ahead of the consumer, at most
READ_AHEAD_BYTES = 1 << 30    # and at most this many bytes of them


def make_loader(records: Sequence, transform: Callable[[Any], Any], *, batch_size: int | None = None,
                shard: tuple[int, int] = (0, 1), batch_share: tuple[int, int] | None = None, shuffle: bool = False,
                seed: int = 0, num_epochs: int | None = 1, drop_remainder: bool = False,
                keep: Callable[[Any], bool] | None = None, workers: int = 0, read_ahead: int = READ_AHEAD,
                read_ahead_bytes: int = READ_AHEAD_BYTES, element_nbytes: int | None = None) -> grain.IterDataset:
    """A grain pipeline over `records` (any sequence: paths, (path, caption) pairs, planned batches).

    shard: (index, count) of this process (see `process_shard`); the process reads only its share of the
        records (every `count`-th one).
    batch_share: (index, count) of this process, the multi-host way to split global batches instead: every
        process reads the same order of records in global batches of `batch_size * count`, and takes rows
        index * batch_size ... (index + 1) * batch_size - 1 of each. The batches together are exactly those
        of one process with `batch_size * count`, so the result does not depend on the number of processes.
    shuffle: a new order every epoch, the same on every run for the same seed. num_epochs None: endless.
    transform: runs on each record in `workers` processes (0: threads of this process); it must be picklable.
    keep: runs in this process on each transformed record, in order; records it returns False for are left
        out of the batches (it may record them: see `siglip2_jax.train_data`).
    batch_size: stack that many transformed records (numpy leaves along a new first axis); None: no batching.
    read_ahead, read_ahead_bytes: what is prepared ahead of the consumer is bounded by both: at most
        `read_ahead` elements (batches, or records without `batch_size`) and at most `read_ahead_bytes` of
        them, over all workers (and at least one element per worker). grain's own default (500 elements in
        every process) holds hundreds of preprocessed batches when the device is slower than decoding.
    element_nbytes: bytes of one transformed record (before batching); None: measured on the first record
        that transforms (in this process, once).
    Iterating yields the transformed records (or batches) in a deterministic order; the iterator's
    get_state()/set_state() resume it exactly (with the same number of workers).
    """
    import grain

    records = list(records)
    if batch_share is not None:
        records = _global_rows(records, batch_size, *batch_share, shuffle=shuffle, seed=seed, num_epochs=num_epochs)
    else:
        index, count = shard
        dataset = grain.MapDataset.source(shard_records(records, index, count, drop_remainder=drop_remainder))
        records = _epochs(dataset, shuffle, seed, num_epochs)
    dataset = records.map(transform)
    per_element = batch_size or 1
    if element_nbytes is None:
        element_nbytes = _measure(dataset)
    # elements in flight in each process that prepares them (the workers, or this one)
    preparers = max(workers, 1)
    ahead = max(1, min(read_ahead * per_element // preparers,
                       read_ahead_bytes // max(1, element_nbytes * preparers) if element_nbytes else 1 << 30))
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=min(ahead, 16), prefetch_buffer_size=ahead))
    if workers > 0:
        _absl_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1)
        iterable = iterable.mp_prefetch(options, worker_init_fn=functools.partial(_init_worker, os.getpid()))
    if keep is not None:
        iterable = iterable.filter(keep)
    if batch_size is not None:
        # batched here, after the workers, so that the batches do not depend on their number
        iterable = iterable.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_stack)
    return iterable


def _epochs(dataset, shuffle: bool, seed: int, num_epochs: int | None):
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if num_epochs != 1:
        dataset = dataset.repeat(num_epochs)  # after shuffle: each epoch is shuffled anew
    return dataset


def _global_rows(records: list, batch_size: int, index: int, count: int, *, shuffle, seed, num_epochs):
    """This process's rows of every global batch (see `make_loader`'s batch_share), as a MapDataset."""
    import grain

    if batch_size is None or not 0 <= index < count:
        raise ValueError(f"batch_share ({index}, {count}) needs a batch_size and 0 <= index < count")
    everything = _epochs(grain.MapDataset.source(records), shuffle, seed, num_epochs)
    rows = len(everything) // (batch_size * count) * batch_size  # whole global batches only
    return grain.MapDataset.range(rows).map(_RowOf(everything, batch_size, index, count))


@dataclasses.dataclass(frozen=True)
class _RowOf:
    """Position p of one process's stream -> the record at its place in the global order."""

    records: Any
    share: int
    index: int
    count: int

    def __call__(self, position: int):
        batch, row = divmod(position, self.share)
        return self.records[batch * self.share * self.count + self.index * self.share + row]


def _measure(dataset) -> int | None:
    """Bytes of the first of the first few elements that can be made (None if none can)."""
    for position in range(min(len(dataset), 8)):
        try:
            return nbytes(dataset[position])
        except Exception:  # an unreadable first record: the loader reports it in order, later
            continue
    return None


def nbytes(tree) -> int:
    """Bytes of the numpy arrays in nested dicts, lists and tuples (other leaves count as 0)."""
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(v) for v in tree)
    return int(tree.nbytes) if isinstance(tree, np.ndarray) else 0


def _stack(elements: list):
    """Records (arrays, or nested dicts of arrays and NaFlex rows) -> one batch, stacked along a new first axis."""
    first = elements[0]
    if isinstance(first, dict):
        return {key: _stack([e[key] for e in elements]) for key in first}
    if isinstance(first, NaFlexBatch):
        return NaFlexBatch(*(_stack(list(field)) for field in zip(*elements)))
    return np.stack([np.asarray(e) for e in elements])


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


def _init_worker(parent: int, worker_index: int, worker_count: int) -> None:
    """Workers ignore Ctrl-C (a terminal sends it to every process of the job): the parent decides what
    an interrupt means (finish the step, keep what is done) and stops them. And they wait forever on a
    full queue if their parent is killed (kill -9, OOM killer): watch it. `parent` is passed in, not read
    here: the parent may already have died while this worker started."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)

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
            except Exception as error:
                refused.append((int(index), source, unreadable_reason(error, source)))
        stacked = _concat(inputs) if inputs else None
        return {**plan, "inputs": stacked, "kept": np.asarray(kept, np.int64), "refused": refused}


def _concat(batches: list):
    """Concatenate single-item batches (arrays, or `NaFlexBatch`es) along the first axis."""
    if isinstance(batches[0], NaFlexBatch):
        return NaFlexBatch(*(np.concatenate(field) for field in zip(*batches)))
    return np.concatenate(batches)


def unreadable_reason(error: Exception, source) -> str:
    """Why `source` could not be read, for a record that keeps the path and the reason apart (ImageError
    messages are '<source>: <reason>'). Decoders raise anything on hostile files: any exception is the
    file's, but MemoryError, which is this process's trouble and is raised again."""
    if isinstance(error, MemoryError):
        raise error
    if not isinstance(error, ImageError):
        return f"cannot read ({type(error).__name__}: {error})"
    text = str(error)
    return text[len(str(source)) + 2:] if text.startswith(f"{source}: ") else text
