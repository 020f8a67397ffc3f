"""Embed a whole collection on every device of every host, resumably (`siglip2-jax embed MODEL INPUT OUT`).

The inputs (a folder's files in sorted order, the lines of a list file, or captions) are cut into parts of
`part_size` consecutive inputs. Each process embeds the parts dealt to it (round robin over the parts not
yet done) on a mesh of its local devices and writes each finished part as two files; a part whose index
file exists is done. A run killed at any moment (kill -9 included) is continued by the same command: it
redoes only the parts that were not finished, batch for batch as before, so the result is bit-identical
to an uninterrupted run and holds every input exactly once.

OUT's layout (manifest.json, parts/NNNNNN.npy and .json, refused.jsonl) is `siglip2_jax.embed_store`'s;
`read_embeddings(OUT)` (re-exported here) returns (paths, array) in listing order.

Multi-host: every process lists the inputs itself, reads only the files of its own parts, and writes only
its own part files; OUT must be on a file system all hosts share. The parts are global, so a job can be
continued with a different number of processes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gc
import itertools
import os
import sys
from pathlib import Path

import numpy as np

from . import defaults, distributed
from .data import DecodeBatch, iterate, list_files, make_loader, read_lines, read_path_list
# the output format; re-exported: `siglip2_jax.embed.read_embeddings` etc. are where users import them from
from .embed_store import (FORMAT, FORMAT_VERSION, EmbedError, done_mask, done_parts, fingerprint,  # noqa: F401
                          json_bytes, new_manifest, part_files, part_layout, read_embeddings, read_index, read_manifest,
                          write_atomic)

DTYPES = ("float32", "float16")
COMPUTE_DTYPES = ("float32", "bfloat16")
OPTION_FLAGS = {"dtype": "--dtype", "batch_size": "--batch-size", "part_size": "--part-size",
         "max_num_patches": "--max-num-patches", "model_parallel": "--model-parallel", "image_size": "--image-size",
         "compute_dtype": "--compute-dtype"}
# what an OUT started before an option existed ran with
OPTION_DEFAULTS = {"compute_dtype": "float32"}


@dataclasses.dataclass
class EmbedResult:
    out: Path
    inputs: int
    embedded: int
    refused: list[dict]
    complete: bool

    @property
    def exit_status(self) -> int:
        return 0 if self.complete and not self.refused else 1


# ------------------------------------------------------------------------------------------------ embed


def embed(model, inputs: str | Path, out: str | Path, *, texts: bool = False, dtype: str = "float32",
          compute_dtype: str | None = None, batch_size: int = 128, part_size: int | None = None, max_num_patches: int | None = None, model_parallel: int = 1,
          image_size: int | None = None, mesh=None, workers: int | None = None, progress: bool = True) -> EmbedResult:
    """Embeds INPUT (a folder, a text file of paths, or with `texts` a text file of captions) into OUT.

    model: a checkpoint dir, HF dir or hub id; or a `Siglip2Pipeline` loaded from one (it is then used
        as it is: its mesh, preprocessing (NaFlex patch budget, FixRes image size), compiled functions).
    dtype: the stored precision of the embeddings ("float32" or "float16").
    compute_dtype: the model's compute dtype, as `load(dtype=...)`: "float32" (the default) or "bfloat16"
        (bf16 matmuls with float32 accumulation: 2x on CPUs with AVX512-BF16/AMX, cosine with float32 >=
        0.9999; see the README's Performance section). A pipeline given as `model` runs at its own dtype.
    max_num_patches / image_size: as in `siglip2_jax.load`.
    mesh: where to run a model given by path (default: this process's devices as a (data,
        model_parallel) mesh).
    workers: decoding processes (0: decode in this process, while the devices compute). Default: 0 on
        CPU, one per CPU core but one (at most 32) with accelerators.
    part_size: inputs per part (the unit of resuming). Default: the part size OUT was started with when
        it is continued, else `defaults.embed_part_size`.
    Raises EmbedError (bad arguments, or OUT made with another model, input or options). Call
    `distributed.initialize` first for a multi-host job.
    """
    import jax

    from .model_source import ModelSource
    from .pipeline import Siglip2Pipeline, load
    from .sharding import make_mesh

    if dtype not in DTYPES:
        raise EmbedError(f"--dtype {dtype}: choose float32 or float16")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise EmbedError(f"--compute-dtype {compute_dtype}: choose float32 or bfloat16")
    out = Path(os.path.abspath(out))
    if part_size is None:
        part_size = _started_part_size(out) or defaults.embed_part_size(batch_size)
    for flag, value in (("--batch-size", batch_size), ("--part-size", part_size), ("--model-parallel", model_parallel)):
        if value < 1:
            raise EmbedError(f"{flag} {value}: must be at least 1")
    kind = "text" if texts else "image"
    listing, items = _list_inputs(inputs, texts, out)
    pipeline = model if isinstance(model, Siglip2Pipeline) else None
    if pipeline is not None and pipeline.source is None:
        raise EmbedError("this pipeline was not loaded from a directory: pass the model's path instead")
    source = pipeline.source if pipeline is not None else ModelSource(model)
    config = source.config  # as stored (a pipeline's may be at another image_size)
    if (config.vision if kind == "image" else config.text) is None:
        raise EmbedError(f"{source.source}: this checkpoint has no {kind} tower")
    if pipeline is not None:
        mesh = pipeline.mesh
        if compute_dtype is not None and compute_dtype != pipeline.dtype.name:
            raise EmbedError(f"--compute-dtype {compute_dtype}: the pipeline given computes in {pipeline.dtype.name}")
        compute_dtype = pipeline.dtype.name
    elif mesh is None:
        mesh = make_mesh(model_parallel, jax.local_devices())
    compute_dtype = compute_dtype or "float32"
    preprocess = _preprocessor(kind, source, max_num_patches, image_size, pipeline)
    budget = preprocess.max_num_patches if kind == "image" and config.naflex else None
    fixres_images = kind == "image" and not config.naflex
    # the FixRes input size when it is not the model's own (load(image_size=...)), else None
    size = preprocess.image_size if fixres_images and preprocess.image_size != config.vision.image_size else None
    options = {"dtype": dtype, "batch_size": batch_size, "part_size": part_size, "max_num_patches": budget,
               "model_parallel": int(mesh.shape["model"]) if mesh is not None else 1, "image_size": size,
               "compute_dtype": compute_dtype}
    manifest = new_manifest(kind, source.source, source.fingerprint, inputs, listing, items, options, config.embed_dim)
    _open(out, manifest)

    # Every process must deal the parts alike: all take process 0's view of which are done.
    done = distributed.broadcast_from_process_0(done_mask(out, manifest["num_parts"]))
    if done.any() and jax.process_index() == 0:
        print(f"continuing {out}: {int(done.sum())} of {len(done)} parts already done", file=sys.stderr)
    pending = [part for part in range(manifest["num_parts"]) if not done[part]]
    mine = pending[jax.process_index()::jax.process_count()]
    _remove_stale_temporaries(out / "parts", set(mine))
    if mine:
        plans = _plan_batches(mine, items, part_size, batch_size)
        if workers is None:
            workers = defaults.loader_workers()
        loader = iterate(make_loader(plans, DecodeBatch(preprocess), workers=workers,
                                     element_nbytes=_batch_nbytes(preprocess, items, batch_size)))
        try:
            batches = loader
            if pipeline is None:
                # Load and place the weights while the workers start and decode the first batch.
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    first = pool.submit(next, batches)
                    pipeline = load(source, mesh=mesh, max_num_patches=budget, image_size=size,
                                    batch_size=batch_size, dtype=compute_dtype)
                    batches = itertools.chain([first.result()], batches)
                    del first  # holds the first batch
            _embed_parts(pipeline, batches, manifest, sum(len(p["sources"]) for p in plans), out, progress)
        finally:
            # also on Ctrl-C: stop the workers and free their shared memory now (an exception's traceback
            # would keep the loader alive until exit, and Python would report the blocks as leaked)
            batches = None
            loader.close()
    distributed.barrier("siglip2_jax.embed: all parts written")
    return _finish(out, manifest, write=jax.process_index() == 0)


def _started_part_size(out: Path) -> int | None:
    """The part size of the job OUT holds, if it holds one (so that it is continued without the flag)."""
    try:
        return int(read_manifest(out)["options"]["part_size"])
    except (EmbedError, KeyError, TypeError, ValueError):
        return None  # a new OUT; or one that `_open` refuses, naming why


def _batch_nbytes(preprocess, items: list[str], batch_size: int) -> int | None:
    """Bytes of one preprocessed batch, from the first of the first few inputs that can be read (None if
    none can): bounds how far the loader reads ahead."""
    from .data import nbytes

    for item in items[:8]:
        try:
            return nbytes(preprocess([item])) * batch_size
        except Exception:  # the loader refuses it later, with its reason
            continue
    return None


def _plan_batches(parts: list[int], items: list[str], part_size: int, batch_size: int) -> list[dict]:
    """The batches of each part, planned before any file is read, so that a rerun computes a part with
    exactly the same batches (same shapes, same rows): bit-identical embeddings."""
    plans = []
    for part in parts:
        start, stop = part * part_size, min((part + 1) * part_size, len(items))
        for first in range(start, stop, batch_size):
            last = min(first + batch_size, stop)
            plans.append({"part": part, "ends_part": last == stop, "indices": np.arange(first, last),
                          "sources": items[first:last]})
    return plans


def _preprocessor(kind: str, source, max_num_patches: int | None, image_size: int | None, pipeline):
    """What the workers run on each input: settings and a tokenizer only, no weights. Images: the
    pipeline's preprocessor, or the model source's (its processor config)."""
    if kind == "image":
        if pipeline is not None:
            return pipeline.preprocessor
        return source.preprocessor(max_num_patches=max_num_patches, image_size=image_size)
    tokenizer = pipeline.tokenizer if pipeline is not None else source.tokenizer
    if tokenizer is None:
        raise EmbedError(f"{source.directory}: no tokenizer (tokenizer.model or tokenizer.json) to read captions with")
    return functools.partial(tokenizer.encode, max_length=source.config.text.max_length)


def _embed_parts(pipeline, batches, manifest: dict, total: int, out: Path, progress: bool) -> None:
    from tqdm import tqdm

    kind = manifest["kind"]
    bar = tqdm(total=total, unit=" img" if kind == "image" else " text", disable=not progress, file=sys.stderr,
               desc=_progress_name(), dynamic_ncols=True, smoothing=0.05)
    writer = _PartWriter(out / "parts", np.dtype(manifest["options"]["dtype"]), manifest["dim"], bar)
    try:
        in_flight = None
        for batch in batches:
            # Dispatch this batch before waiting for the previous one: the devices compute while the
            # host writes the previous batch and the workers decode the next ones.
            result = pipeline.embed_preprocessed(batch["inputs"], kind) if len(batch["kept"]) else None
            if in_flight is not None:
                writer.add(*in_flight)
            in_flight = (batch, result)
        if in_flight is not None:
            writer.add(*in_flight)
    finally:
        bar.close()
        # the last batches' shared-memory blocks can sit in reference cycles: free them now, or Python's
        # resource tracker reports them as leaked at exit
        in_flight = batch = None
        gc.collect()


class _PartWriter:
    """Collects the batches of one part and writes the part when its last batch arrives."""

    def __init__(self, parts_dir: Path, dtype: np.dtype, dim: int, bar):
        import jax

        self.parts_dir, self.dtype, self.dim, self.bar = parts_dir, dtype, dim, bar
        self.process = jax.process_index()
        self.embeddings, self.indices, self.refused, self.sources = [], [], [], {}

    def add(self, batch: dict, result) -> None:
        kept = np.asarray(batch["kept"], np.int64)
        if len(kept):
            self.embeddings.append(result.result().astype(self.dtype))
            self.indices.extend(int(i) for i in kept)
        for index, source, reason in batch["refused"]:
            self.refused.append({"index": int(index), "path": source, "reason": reason})
            self.bar.write(f"refused: {source}: {reason}", file=sys.stderr)
        self.sources.update(zip(map(int, batch["indices"]), batch["sources"]))
        self.bar.update(len(batch["sources"]))
        if batch["ends_part"]:
            self._write(int(batch["part"]))

    def _write(self, part: int) -> None:
        array = np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, self.dim), self.dtype)
        index = {"part": part, "indices": self.indices, "paths": [self.sources[i] for i in self.indices],
                 "refused": self.refused, "process": self.process}
        name = f"{part:06d}"
        write_atomic(self.parts_dir / f"{name}.npy", lambda f: np.save(f, array))
        write_atomic(self.parts_dir / f"{name}.json", json_bytes(index))  # last: marks the part done
        self.embeddings, self.indices, self.refused, self.sources = [], [], [], {}


def _finish(out: Path, manifest: dict, write: bool) -> EmbedResult:
    """Counts what all processes wrote; process 0 writes refused.jsonl and the result into the manifest."""
    embedded, refused, missing = 0, [], 0
    for part in range(manifest["num_parts"]):
        index = read_index(out, part)
        if index is None:
            missing += 1
            continue
        part_layout(out, part, manifest, index)  # damaged since it was written: refused, naming the file
        embedded += len(index["indices"])
        refused.extend(index["refused"])
    complete = missing == 0
    if write and complete:
        write_atomic(out / "refused.jsonl", b"".join(json_bytes(r) for r in refused))
        result = {**manifest, "result": {"embedded": embedded, "refused": len(refused)}}
        write_atomic(out / "manifest.json", json_bytes(result, indent=2))
    return EmbedResult(out, manifest["input"]["count"], embedded, refused, complete)


# ------------------------------------------------------------------------------------------------ inputs


def _list_inputs(inputs: str | Path, texts: bool, out: Path) -> tuple[str, list[str]]:
    path = Path(inputs)
    if texts:
        if not path.is_file():
            raise EmbedError(f"{inputs}: --texts needs a text file of captions, one per line")
        listing, items = "texts", _read_text_input(path, read_lines)
    elif path.is_dir():
        if out == Path(os.path.abspath(path)) or Path(os.path.abspath(path)) in out.parents:
            raise EmbedError(f"{out}: OUT is inside INPUT {inputs}; it would be listed as input")
        listing, items = "folder", list_files(path)
    elif path.is_file():
        listing, items = "list", _read_text_input(path, read_path_list)
    else:
        raise EmbedError(f"{inputs}: no such file or folder")
    if not items:
        raise EmbedError(f"{inputs}: no inputs in it")
    return listing, items


def _read_text_input(path: Path, read) -> list[str]:
    try:
        return read(path)
    except UnicodeDecodeError:
        raise EmbedError(f"{path}: not a UTF-8 text file (a folder, a list of paths, or --texts captions)") from None
    except OSError as error:
        raise EmbedError(f"{path}: cannot read ({error.strerror or error})") from None


# ------------------------------------------------------------------------------------------------ OUT


def _open(out: Path, manifest: dict) -> None:
    """Starts OUT, or checks that it was started by the same command (model, input, options)."""
    path = out / "manifest.json"
    if path.exists():
        _check_same_job(out, read_manifest(out), manifest)
    else:
        # another process of this job may have just written manifest.json and parts/
        if out.is_dir() and set(n for n in os.listdir(out) if not n.startswith(".")) - {"manifest.json", "parts"}:
            raise EmbedError(f"{out}: exists, is not empty and has no manifest.json; give a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json_bytes(manifest, indent=2))  # every process writes the same bytes
    (out / "parts").mkdir(exist_ok=True)


def _check_same_job(out: Path, old: dict, new: dict) -> None:
    advice = "rerun with the original options to continue, or give a new OUT"
    if old["kind"] != new["kind"]:
        raise EmbedError(f"{out}: holds {old['kind']} embeddings, this command embeds {new['kind']}s; {advice}")
    if old["model"]["fingerprint"] != new["model"]["fingerprint"]:
        raise EmbedError(f"{out}: was started with another model ({old['model']['source']}); {advice}")
    for key, flag in OPTION_FLAGS.items():
        started = old["options"].get(key, OPTION_DEFAULTS.get(key))   # (absent from older OUTs)
        if started != new["options"][key]:
            raise EmbedError(f"{out}: was started with {flag} {started}, this command gives "
                             f"{new['options'][key]}; {advice}")
    if (old["input"]["count"], old["input"]["sha256"]) != (new["input"]["count"], new["input"]["sha256"]):
        raise EmbedError(f"{out}: the input changed since this OUT was started ({old['input']['count']} inputs "
                         f"then, {new['input']['count']} now); give a new OUT")


def _remove_stale_temporaries(parts_dir: Path, parts: set[int]) -> None:
    """Temporaries of a killed run; only this process writes these parts now."""
    for name in os.listdir(parts_dir):
        if name.startswith(".") and name.endswith(".tmp") and name[1:7].isdigit() and int(name[1:7]) in parts:
            (parts_dir / name).unlink(missing_ok=True)


def _progress_name() -> str:
    import jax

    return "embed" if jax.process_count() == 1 else f"process {jax.process_index()} of {jax.process_count()}"
