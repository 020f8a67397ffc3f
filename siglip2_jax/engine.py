"""The batching engine: how a batch of ready inputs reaches the compiled towers and comes back.

One component owns the decisions every caller used to make for itself:
- **buckets**: every compiled batch size is a power of two (times the mesh's data-parallel size), so a
  process compiles log2(max batch) shapes per kind and no more. On accelerators a batch of n rows runs as
  one call at the smallest bucket that holds it;
- **CPU micro-batching**: on CPU a batch runs as calls of at most `defaults.CPU_TOKENS_PER_CALL` tokens per
  device, and the rows past the last full call as a sum of smaller buckets, so padding is never computed
  for more than the data-parallel size minus one (`call_sizes`);
- **padding**: the rows past n are zeros, or what the kind's `pad_rows` makes (NaFlex images:
  `NaFlexBatch.pad_rows`);
- **placement**: rows are split over the mesh's "data" axis;
- **asynchronous dispatch with a bound**: `map` keeps at most `max_in_flight` batches on the device, so
  the next batch is prepared while one computes and host memory stays flat however long the input is.

It is told the input kind ("image", "image_tokens" or "text") and never guesses it. Users: the pipeline's
user API (`Siglip2Pipeline`), `embed`, and the HTTP server's dynamic batcher.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from . import defaults
from .sharding import batch_sharding

KINDS = ("image", "image_tokens", "text")


class Pending:
    """A dispatched batch: `result()` waits for it and returns its first n rows as a numpy array."""

    def __init__(self, outputs: list[jax.Array], n: int):
        self.outputs, self.n = outputs, n

    @property
    def device_array(self) -> jax.Array:
        """The padded result on the device (rows past n are padding), not waited for."""
        return self.outputs[0] if len(self.outputs) == 1 else jnp.concatenate(self.outputs)

    def result(self) -> np.ndarray:
        return np.concatenate([np.asarray(out) for out in self.outputs])[: self.n]


class BatchEngine:
    """Runs batches of preprocessed inputs through jitted tower functions.

    fns: {kind: fn(state, inputs) -> (rows, ...) array}; `state` is passed to every call.
    tokens_per_row: {kind: sequence length of one row} (for CPU micro-batching).
    mesh: a `jax.sharding.Mesh` with a "data" axis, or None for one device.
    pad_rows: {kind: fn(inputs, size) -> inputs grown to `size` rows (numpy)} for the kinds whose padding
        rows are not zeros (the input format's own rule, e.g. `NaFlexBatch.pad_rows`).
    """

    def __init__(self, fns: dict[str, Callable], state, tokens_per_row: dict[str, int], mesh=None,
                 pad_rows: dict[str, Callable] | None = None):
        self.fns, self.state, self.tokens_per_row, self.mesh = fns, state, tokens_per_row, mesh
        self.pad_rows = pad_rows or {}

    @property
    def data_parallel(self) -> int:
        return self.mesh.shape["data"] if self.mesh is not None else 1

    def bucket(self, n: int) -> int:
        """The compiled batch size that holds n rows: a power of two per data shard."""
        per_shard = -(-n // self.data_parallel)
        return self.data_parallel * (1 << max(per_shard - 1, 0).bit_length())

    def call_sizes(self, kind: str, n: int) -> list[int]:
        """The compiled sizes of the calls that run n rows, in order.

        Accelerators: one call, n padded up to its bucket. CPU: full calls of at most
        `defaults.tokens_per_call()` tokens per device (a power of two of rows per device), and the rest as
        a sum of smaller buckets (largest first): 17 rows at 8 per call run as 8 + 8 + 1, not as a bucket
        of 32 holding 15 rows of padding. A CPU computes padding rows at full cost, and an
        embedding does not depend on the rows beside it (`model.layers.in_row_blocks`), so this changes
        no result. Only the last call can hold padding, and then fewer rows than the data-parallel size."""
        tokens = defaults.tokens_per_call()
        if tokens is None:
            return [self.bucket(n)]
        per_device = max(1, tokens // self.tokens_per_row[kind])
        rows = self.data_parallel * (1 << (per_device.bit_length() - 1))
        sizes, left, unit = [], n, self.data_parallel
        while left > 0:
            size = min(rows, unit * (1 << ((max(left // unit, 1)).bit_length() - 1)))
            sizes.append(size)
            left -= size
        return sizes

    def buckets(self, kind: str, max_rows: int) -> list[int]:
        """Every call size that batches of 1..max_rows rows of `kind` run at (what to compile ahead)."""
        return sorted({size for n in range(1, max_rows + 1) for size in self.call_sizes(kind, n)})

    def dispatch(self, kind: str, inputs, n: int | None = None) -> Pending:
        """Pad `inputs` (a pytree of arrays of n rows: an array, a `NaFlexBatch`) to its call sizes, place it, run
        it; not waited for. Raises ValueError for an unknown kind."""
        if kind not in KINDS:
            raise ValueError(f"unknown input kind {kind!r}: expected one of {KINDS}")
        n = len(jax.tree.leaves(inputs)[0]) if n is None else n
        pad, fn, outputs, start = self.pad_rows.get(kind, _zero_rows), self.fns[kind], [], 0
        for size in self.call_sizes(kind, n):
            rows = min(size, n - start)
            chunk = pad(jax.tree.map(lambda x: np.asarray(x[start:start + rows]), inputs), size)
            outputs.append(fn(self.state, self._place(chunk)))
            start += size
        return Pending(outputs, n)

    def run(self, kind: str, inputs, n: int | None = None) -> np.ndarray:
        """`dispatch` and wait: (n, ...) numpy array."""
        return self.dispatch(kind, inputs, n).result()

    def map(self, kind: str, chunks: Iterable, max_in_flight: int = 2) -> np.ndarray:
        """Run an iterable of prepared batches (each one `dispatch`able) and concatenate the results.

        At most `max_in_flight` batches are dispatched and not yet read back, so the iterable (which may
        decode and preprocess lazily) runs ahead of the device by that many batches and no more."""
        pending: collections.deque[Pending] = collections.deque()
        results = []
        for inputs in chunks:
            if len(pending) >= max_in_flight:
                results.append(pending.popleft().result())
            pending.append(self.dispatch(kind, inputs))
        results.extend(p.result() for p in pending)
        if not results:
            raise ValueError("nothing to encode: the input is empty")
        return np.concatenate(results)

    def _place(self, batch):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(self.mesh, x.ndim)), batch)


def _zero_rows(inputs, size: int):
    """Every array of `inputs` grown to `size` rows with zeros (numpy)."""
    def grow(x):
        x = np.asarray(x)
        return x if len(x) == size else np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])

    return jax.tree.map(grow, inputs)
