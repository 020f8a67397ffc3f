"""Dynamic batching: rows from concurrent requests are merged into the engine's compiled batch buckets.

One device thread owns the model. Request handlers (on the event loop) put single preprocessed rows
(one image or one text each) into a queue per input kind and await their futures. The thread takes the
kind whose oldest row has waited longest, waits at most `max_wait_ms` from that row's arrival for up to
`max_batch_size` rows of that kind, runs them as one batch through `BatchEngine.run`, and hands each row
its embedding. Texts and images are never mixed in a batch. An embedding does not depend on what shared
its batch (the model computes per-image rows in fixed blocks; see `model.layers.in_row_blocks`), so the
server returns bit for bit what `encode_images` / `encode_texts` return for the same input.

Admission is bounded one level up (`app.py` refuses requests past `--max-queue` before reading their
inputs), so the queues here hold at most max_queue * max_inputs_per_request rows.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time

import jax
import numpy as np

KINDS = ("image", "text")


@dataclasses.dataclass
class _Row:
    inputs: object            # one row: an array without the batch axis, or a NaFlex dict of such arrays
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float


class DynamicBatcher:
    """Merges rows of concurrent requests into batches of at most `max_batch_size` rows per kind.

    engine: a `BatchEngine`; batch_sizes: optional prometheus Histogram labelled by kind (rows per batch).
    """

    def __init__(self, engine, *, max_batch_size: int = 32, max_wait_ms: float = 5.0, batch_sizes=None):
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms >= 0")
        self.engine, self.max_batch_size, self.max_wait = engine, max_batch_size, max_wait_ms / 1000
        self.batch_sizes = batch_sizes
        self.queues: dict[str, collections.deque[_Row]] = {kind: collections.deque() for kind in KINDS}
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="siglip2-device", daemon=True)
        self.thread.start()

    def pending(self, kind: str) -> int:
        return len(self.queues[kind])

    async def embed(self, kind: str, rows: list) -> np.ndarray:
        """Embeddings of `rows` (each one preprocessed input, without the batch axis) -> (len(rows), D)."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Row(row, loop.create_future(), loop, now) for row in rows]
        with self.wakeup:
            if self.stopping:
                raise RuntimeError("the server is shutting down")
            self.queues[kind].extend(items)
            self.wakeup.notify()
        return np.stack(await asyncio.gather(*(item.future for item in items)))

    def stop(self) -> None:
        """Finish the rows already queued, then end the device thread."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join()

    # ---- the device thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.wakeup:
                kind = self._next_kind()
                while kind is None:
                    if self.stopping:
                        return
                    self.wakeup.wait()
                    kind = self._next_kind()
                queue = self.queues[kind]
                deadline = queue[0].arrived + self.max_wait
                while len(queue) < self.max_batch_size and not self.stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.wakeup.wait(left)
                batch = [queue.popleft() for _ in range(min(self.max_batch_size, len(queue)))]
            self._run(kind, batch)

    def _next_kind(self) -> str | None:
        """The kind whose oldest queued row arrived first (None when both queues are empty)."""
        waiting = [(queue[0].arrived, kind) for kind, queue in self.queues.items() if queue]
        return min(waiting)[1] if waiting else None

    def _run(self, kind: str, batch: list[_Row]) -> None:
        if self.batch_sizes is not None:
            self.batch_sizes.labels(kind).observe(len(batch))
        try:
            inputs = jax.tree.map(lambda *rows: np.stack(rows), *(item.inputs for item in batch))
            embeddings = self.engine.run(kind, inputs, len(batch))
        except Exception as error:  # noqa: BLE001 - every waiting request gets the error, the thread lives on
            for item in batch:
                item.loop.call_soon_threadsafe(_settle, item.future, None, error)
            return
        for item, embedding in zip(batch, embeddings):
            item.loop.call_soon_threadsafe(_settle, item.future, embedding, None)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # the request was cancelled (client gone)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
