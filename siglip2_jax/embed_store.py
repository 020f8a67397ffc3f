"""The output of `siglip2-jax embed` (what `siglip2-jax search` and `read_embeddings` read), format version 1.

Output (OUT/), version 1:

    manifest.json       what was embedded and how: {"format": "siglip2-jax-embeddings", "format_version": 1,
                        "kind": "image" | "text", "model": {"source", "fingerprint"},
                        "input": {"source", "listing": "folder" | "list" | "texts", "count", "sha256"},
                        "options": {"dtype", "batch_size", "part_size", "max_num_patches", "model_parallel",
                                    "image_size" (FixRes run at another size, else null)},
                        "dim", "num_parts", and, once every part is done, "result": {"embedded", "refused"}}
    parts/000123.npy    the embeddings of part 123 (inputs 123 * part_size ... 124 * part_size - 1 of the
                        listing, those that could be read, in listing order): a standard .npy array of shape
                        (rows, dim), float32 or float16, L2-normalized
    parts/000123.json   its index, written after the .npy, so its presence marks the part done:
                        {"part": 123, "indices": [listing position of each row], "paths": [input of each row],
                        "refused": [{"index", "path", "reason"}, ...], "process": the process that wrote it}
    refused.jsonl       all refused inputs, one {"index", "path", "reason"} per line (written at the end)

Paths are absolute (a folder's files; a list file's entries relative to its folder); for `--texts` the
"paths" are the captions. Every file is written under a temporary name, fsynced, then renamed into place:
a reader never sees a torn file. `read_embeddings(OUT)` returns (paths, array) in listing order.

The job that writes it is `siglip2_jax.embed`; this module is the format alone: naming, reading, the
manifest's fields, atomic writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np

from .errors import first_line

FORMAT, FORMAT_VERSION = "siglip2-jax-embeddings", 1


class EmbedError(ValueError):
    """A problem with the arguments, the model or OUT; the message is one line naming the culprit."""


def new_manifest(kind: str, model_source: str, model_fingerprint: str, inputs: str | Path, listing: str,
                 items: list[str], options: dict, dim: int) -> dict:
    """The manifest of a job (without its "result"): kind "image" or "text"; the model as recorded
    (`model_source`) and the `fingerprint` of its files; INPUT as listed (`listing`: "folder",
    "list" or "texts"; `items`: the inputs in order); `options` (dtype, batch_size, part_size,
    max_num_patches, model_parallel, image_size); `dim`, the embedding width."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
        "model": {"source": model_source, "fingerprint": model_fingerprint},
        "input": {"source": os.path.abspath(inputs), "listing": listing, "count": len(items),
                  "sha256": hashlib.sha256("\0".join(items).encode("utf-8", "surrogateescape")).hexdigest()},
        "options": options,
        "dim": dim, "num_parts": -(-len(items) // options["part_size"]),
    }


def fingerprint(directory: str | Path) -> str:
    """Identifies a model directory without reading all its weights: every file's name and size, small
    files in full, and the first and last MiB of large ones (where different weights differ)."""
    digest, chunk = hashlib.sha256(), 1 << 20
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(directory)}\0{size}\0".encode())
        with open(path, "rb") as file:
            digest.update(file.read(chunk))
            if size > 2 * chunk:
                file.seek(-chunk, os.SEEK_END)
                digest.update(file.read(chunk))
            elif size > chunk:
                digest.update(file.read())
    return "sha256:" + digest.hexdigest()


# ---- reading ---------------------------------------------------------------------------------------
def read_manifest(out: str | Path) -> dict:
    """OUT's manifest. Raises EmbedError if OUT has none, or not one of this format and version."""
    path = Path(out) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EmbedError(f"{out}: not an embed output (no manifest.json)") from None
    except (OSError, ValueError) as error:
        raise EmbedError(f"{path}: unreadable ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise EmbedError(f"{path}: not a {FORMAT} manifest of version {FORMAT_VERSION}")
    for field, kind in _MANIFEST_FIELDS.items():  # what readers use: a damaged one is named, not a KeyError
        value = manifest
        for key in field.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise EmbedError(f"{path}: damaged manifest ({field} is {json.dumps(value)}); restore it, or embed "
                             "into a new OUT")
    return manifest


# what every reader of the parts uses (read_embeddings, top_k_scores): the least a hand-made manifest holds
_MANIFEST_FIELDS = {"kind": str, "options": dict, "options.dtype": str, "dim": int, "num_parts": int}


def done_parts(out: str | Path, partial: bool = False) -> list[int]:
    """The finished parts of OUT, in order. Unless `partial`, refuses an unfinished OUT."""
    manifest = read_manifest(out)
    done = done_mask(out, manifest["num_parts"])
    if not partial and not done.all():
        raise EmbedError(f"{out}: unfinished ({int(done.sum())} of {len(done)} parts done); "
                         "run the same embed command again to finish it")
    return [int(p) for p in np.flatnonzero(done)]


def part_files(out: str | Path, part: int) -> tuple[Path, Path]:
    """(embeddings .npy, index .json) of one part."""
    return Path(out) / "parts" / f"{part:06d}.npy", Path(out) / "parts" / f"{part:06d}.json"


def read_embeddings(out: str | Path, partial: bool = False) -> tuple[list[str], np.ndarray]:
    """(paths, embeddings) of an `embed` output, in listing order: row i is the embedding of paths[i]
    (refused inputs have no row). Loads everything into memory (`siglip2-jax search` does not).
    Refuses an unfinished OUT unless `partial`."""
    manifest = read_manifest(out)
    paths, arrays = [], []
    for part in done_parts(out, partial):
        index = read_index(out, part)
        part_layout(out, part, manifest, index)  # a corrupt part: one line naming it, not numpy's error
        paths.extend(index["paths"])
        arrays.append(np.load(part_files(out, part)[0]))
    dtype = np.dtype(manifest["options"]["dtype"])
    return paths, np.concatenate(arrays) if arrays else np.zeros((0, manifest["dim"]), dtype)


def read_index(out: str | Path, part: int) -> dict | None:
    """The index of one part (see above), or None while the part is not done. Raises EmbedError naming
    the file for one that is not such an index (damaged after it was written)."""
    path = part_files(out, part)[1]
    try:
        index = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise EmbedError(_corrupt(path, first_line(error))) from None
    if not (isinstance(index, dict) and all(isinstance(index.get(k), list) for k in ("indices", "paths", "refused"))
            and len(index["indices"]) == len(index["paths"])):
        raise EmbedError(_corrupt(path, "not a part index"))
    return index


def part_layout(out: str | Path, part: int, manifest: dict, index: dict) -> tuple[int, tuple, np.dtype]:
    """(data offset, shape, dtype) of a done part's .npy, read from its header and checked against its
    `index` and the manifest (rows, dim, dtype, file size). Raises EmbedError naming the file if not."""
    path = part_files(out, part)[0]
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(file)
            offset, size = file.tell(), os.fstat(file.fileno()).st_size
    except (OSError, ValueError, EOFError) as error:  # numpy raises ValueError or EOFError on bad headers
        raise EmbedError(_corrupt(path, first_line(error))) from None
    expected = (len(index["indices"]), manifest["dim"])
    if fortran or shape != expected or dtype != np.dtype(manifest["options"]["dtype"]):
        raise EmbedError(_corrupt(path, f"holds {'Fortran-ordered ' if fortran else ''}{dtype} {shape}, "
                                        f"expected {manifest['options']['dtype']} {expected}"))
    if size != offset + int(np.prod(shape)) * dtype.itemsize:
        raise EmbedError(_corrupt(path, f"{size} bytes, its header says {offset + int(np.prod(shape)) * dtype.itemsize}"))
    return offset, shape, dtype


def _corrupt(path: Path, reason: str) -> str:
    part = path.with_suffix("")
    return (f"{path}: corrupt part ({reason}); delete {part.name}.npy and {part.name}.json and run the same "
            "embed command again to embed that part again")


def done_mask(out: str | Path, num_parts: int) -> np.ndarray:
    """(num_parts,) bool: which parts of OUT are done (their index exists)."""
    out = Path(out)
    names = set(os.listdir(out / "parts")) if (out / "parts").is_dir() else set()
    return np.array([f"{part:06d}.json" in names for part in range(num_parts)], bool)


# ---- writing ---------------------------------------------------------------------------------------
def write_atomic(path: Path, content) -> None:
    """Writes `content` (bytes, or a function of a binary file) so that `path` is either absent, the old
    file, or the whole new one, even after a crash: temporary name, fsync, rename, fsync the folder."""
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        file.write(content) if isinstance(content, bytes) else content(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def json_bytes(value, indent=None) -> bytes:
    """One JSON document as the format writes it: UTF-8 (paths that are not are kept as they are), newline."""
    return (json.dumps(value, ensure_ascii=False, indent=indent) + "\n").encode("utf-8", "surrogateescape")
