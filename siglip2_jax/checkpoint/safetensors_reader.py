"""Read HF safetensors checkpoints one tensor at a time, single-file or sharded.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian data. We read it ourselves because the `safetensors` numpy
backend cannot return bfloat16, and so that a tensor can be read straight into the array it ends up in
(peak memory stays near the size of what we build, not twice it).
Every inconsistency is reported with the file's name.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import first_line

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded: names the file (and key) and says why."""


class SafetensorsFile:
    """One .safetensors file: `.keys()`, `.shape(key)`, `.read(key) -> np.ndarray` (a fresh copy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise WeightsError(f"{self.path}: not a safetensors file (only {size} bytes)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise WeightsError(f"{self.path}: not a safetensors file, or truncated (header of "
                                       f"{header_len} bytes in a file of {size})")
                header = json.loads(f.read(header_len))
        except OSError as err:
            raise WeightsError(f"{self.path}: cannot read ({err.strerror or err})") from None
        except (ValueError, RecursionError) as err:  # not JSON or not UTF-8; or nested too deep for json
            raise WeightsError(f"{self.path}: corrupt safetensors header ({first_line(err)})") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path}: corrupt safetensors header")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = {}
        data_size = size - self._data_start
        for key, entry in header.items():
            try:
                dtype = np.dtype(_DTYPES[entry["dtype"]])
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{self.path}: corrupt or unsupported header entry for {key!r}: {entry}") from None
            # math.prod: numpy's product of huge dimensions wraps around (and can come out equal to end - begin)
            if any(d < 0 for d in shape) or end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise WeightsError(f"{self.path}: {key} has {end - begin} bytes for shape {shape} {dtype}")
            if end > data_size:
                raise WeightsError(f"{self.path}: truncated: {key} ends at byte {self._data_start + end} "
                                   f"but the file has {size} bytes")
            self._entries[key] = (dtype, shape, begin)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def read(self, key: str) -> np.ndarray:
        dtype, shape, _ = self._entries[key]
        out = np.empty(shape, dtype)
        self.read_into(key, out)
        return out

    def read_into(self, key: str, out: np.ndarray) -> None:
        """Fill `out` (C-contiguous, same dtype and size) with the tensor, straight from the file."""
        dtype, shape, begin = self._entries[key]
        assert out.dtype == dtype and out.size == int(np.prod(shape)) and out.flags.c_contiguous
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            while view.nbytes:
                n = f.readinto(view)
                if not n:
                    raise WeightsError(f"{self.path}: truncated while reading {key}")
                view = view[n:]


class HFCheckpoint:
    """All safetensors files of a HF model dir, as one key -> file mapping."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError) as err:
                raise WeightsError(f"{index}: not a valid safetensors index ({first_line(err)})") from None
            except OSError as err:
                raise WeightsError(f"{index}: cannot read ({err.strerror or err})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise WeightsError(f"{index}: not a valid safetensors index (weight_map is not "
                                   '{"tensor name": "file name"})')
            files = {name: SafetensorsFile(directory / name) for name in sorted(set(weight_map.values()))}
            self._where = {}
            for name, file in files.items():
                for key in file.keys():
                    self._where[key] = file
            listed_missing = sorted(k for k, name in weight_map.items() if k not in files[name].keys())
            if listed_missing:
                raise WeightsError(f"{index}: lists {listed_missing[0]} in {weight_map[listed_missing[0]]}, "
                                   f"which does not contain it ({len(listed_missing)} such keys)")
        elif single.exists():
            file = SafetensorsFile(single)
            self._where = {key: file for key in file.keys()}
        else:
            pickled = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise WeightsError(refuse_pickle_message(directory / pickled[0]))
            raise WeightsError(f"{directory}: no model.safetensors or model.safetensors.index.json")

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._where[key].dtype(key)

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)

    def read_into(self, key: str, out: np.ndarray) -> None:
        self._where[key].read_into(key, out)


def refuse_pickle_message(path: Path) -> str:
    return (f"{path}: refusing to load a pickle-based checkpoint (.bin/.pt can run arbitrary code when "
            f"loaded). Use the model's .safetensors files, or convert it yourself in a trusted environment: "
            f"transformers' `Model.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`")
