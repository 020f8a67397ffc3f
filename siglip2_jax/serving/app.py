"""The HTTP API: OpenAI's embeddings endpoint (texts and images), zero-shot classification, ranking,
model list, health and Prometheus metrics, on FastAPI.

    POST /v1/embeddings   {"model", "input": str | [str | content part], "encoding_format": "float"|"base64"}
    POST /v1/classify     {"images": [image part | data URL], "labels": [str], "template"?, "top"?}
    POST /v1/rank         {"query": str | image part, "candidates": [images] | [texts], "top"?}
    GET  /v1/models, /health (200 once every batch shape is compiled, else 503), /metrics

Every refusal is one JSON error in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
with status 400 (bad input, naming its index), 401 (API key), 404 (model or route), 405 (method), 408 (body
too slow), 413 (body over the limit), 429 (too many requests in progress; with Retry-After) or 503 (starting
or stopping).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import os
import sys
import threading
import time

import jax
import numpy as np
from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..images import ImageError
from .. import __version__
from ..config import check_template
from ..pipeline import DEFAULT_TEMPLATE, sigmoid
from .batcher import DynamicBatcher
from .inputs import FetchPolicy, ImageRef, InputError, Text, checked_text, image_bytes, parse_item, parse_items

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What `siglip2-jax serve` was started with (see `command.py` for each flag's meaning)."""

    model_name: str
    api_key: str | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_request_bytes: int = 20 << 20
    max_inputs_per_request: int = 256
    body_timeout_s: float = 60.0   # a client that sends its body slower than this loses its place (408)
    decode_workers: int | None = None  # None: the cores, at most 4
    fetch: FetchPolicy = FetchPolicy()


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("siglip2_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("siglip2_request_latency_seconds", "Request latency by route", ["route"],
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("siglip2_batch_size", "Rows per model batch by input kind", ["kind"],
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.in_progress = Gauge("siglip2_requests_in_progress", "Requests admitted and not yet answered",
                                 registry=self.registry)
        self.queued_rows = Gauge("siglip2_queued_inputs", "Inputs waiting for a batch, by kind", ["kind"],
                                 registry=self.registry)
        self.compilations = Counter("siglip2_xla_compilations", "XLA compilations since start", registry=self.registry)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
                 headers=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    """One refusal in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)


def create_app(pipeline, settings: ServerSettings) -> FastAPI:
    """The ASGI app serving `pipeline` (a `Siglip2Pipeline`). Compiles every batch bucket at start-up, in a
    background thread; /health says 503 until that is done."""
    metrics = _Metrics()
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: metrics.compilations.inc() if event == COMPILE_EVENT else None)
    state = _State(pipeline, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="siglip2-jax", version=__version__, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request, error: ApiError):
        return error_response(error.status, str(error), error.kind, error.param, error.code, error.headers)

    @app.exception_handler(404)
    async def _not_found(request, error):
        return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")

    @app.exception_handler(405)
    async def _not_allowed(request, error):
        return error_response(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        if state.stopping:   # so that clients open no more requests on this connection while the server drains
            response.headers["Connection"] = "close"
        route = request.scope.get("route")
        name = route.path if route is not None else "other"
        metrics.requests.labels(name, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - started)
        return response

    @app.api_route("/health", methods=["GET", "HEAD"])   # load balancers probe with either
    async def health():
        if state.error:
            return JSONResponse({"status": "error", "error": state.error}, status_code=503)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        return {"status": "ready", "model": settings.model_name}

    @app.get("/metrics")
    async def prometheus():
        for kind in ("image", "text"):
            metrics.queued_rows.labels(kind).set(state.batcher.pending(kind) if state.batcher else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        state.authorize(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": state.created,
                                            "owned_by": "siglip2-jax"}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        async with state.admitted(request) as body:
            fmt = body.get("encoding_format", "float")
            if fmt not in ("float", "base64"):
                raise ApiError(400, f"encoding_format {fmt!r}: expected 'float' or 'base64'", param="encoding_format")
            items = _parsed(lambda: parse_items(body.get("input"), "input", settings.max_inputs_per_request))
            dimensions = body.get("dimensions")
            if dimensions is not None and dimensions != state.dim:
                raise ApiError(400, f"dimensions {dimensions!r}: this model's embeddings have {state.dim} "
                                    f"dimensions and cannot be shortened", param="dimensions")
            vectors, tokens = await state.embed(items, "input")
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()}
                    for i, v in enumerate(vectors)]
            return {"object": "list", "data": data, "model": settings.model_name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/classify")
    async def classify(request: Request):
        async with state.admitted(request) as body:
            images = _parsed(lambda: parse_items(body.get("images", body.get("image")), "images",
                                                 settings.max_inputs_per_request, strings="image"))
            _all_of(images, ImageRef, "images", "an image (image_url part or data URL)")
            labels = _labels(body.get("labels"), settings.max_inputs_per_request)
            template = body.get("template", DEFAULT_TEMPLATE)
            if not isinstance(template, str):
                raise ApiError(400, "template: must be a string with one {} where the label goes", param="template")
            try:
                check_template(checked_text(template, "template"))
            except ValueError as error:
                raise ApiError(400, str(error), param="template") from None
            top = _top(body.get("top"), len(labels))
            (image_vectors, image_tokens), (text_vectors, text_tokens) = await asyncio.gather(
                state.embed(images, "images"), state.embed([Text(template.format(label)) for label in labels], "labels"))
            probs = sigmoid(state.pipeline.logits(image_vectors, text_vectors))
            data = [{"index": i, "labels": [{"label": labels[j], "probability": float(row[j])} for j in _best(row, top)]}
                    for i, row in enumerate(probs)]
            return {"object": "list", "data": data, "model": settings.model_name,
                    "usage": {"prompt_tokens": image_tokens + text_tokens, "total_tokens": image_tokens + text_tokens}}

    @app.post("/v1/rank")
    async def rank(request: Request):
        async with state.admitted(request) as body:
            if "query" not in body:
                raise ApiError(400, "query: missing (a string, or an image_url part)", param="query")
            query = _parsed(lambda: parse_item(body["query"], "query"))
            other = Text if isinstance(query, ImageRef) else ImageRef
            candidates = _parsed(lambda: parse_items(body.get("candidates"), "candidates",
                                                     settings.max_inputs_per_request,
                                                     strings="text" if other is Text else "image"))
            _all_of(candidates, other, "candidates", "a text" if other is Text else "an image")
            top = _top(body.get("top"), len(candidates))
            (q, q_tokens), (c, c_tokens) = await asyncio.gather(state.embed([query], "query"),
                                                                state.embed(candidates, "candidates"))
            images, texts = (q, c) if isinstance(query, ImageRef) else (c, q)
            logits = state.pipeline.logits(images, texts)
            scores = logits[0] if isinstance(query, ImageRef) else logits[:, 0]
            probs = sigmoid(scores)
            data = [{"index": int(j), "probability": float(probs[j]), "logit": float(scores[j])} for j in _best(probs, top)]
            return {"object": "list", "data": data, "model": settings.model_name,
                    "usage": {"prompt_tokens": q_tokens + c_tokens, "total_tokens": q_tokens + c_tokens}}

    app.state.server = state
    return app


class _State:
    """The model, the batcher, admission control and start-up."""

    def __init__(self, pipeline, settings: ServerSettings, metrics: _Metrics):
        self.pipeline, self.settings, self.metrics = pipeline, settings, metrics
        self.batcher: DynamicBatcher | None = None
        self.warm_up: threading.Thread | None = None
        workers = settings.decode_workers or min(4, os.cpu_count() or 1)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="siglip2-decode")
        self.ready = threading.Event()
        self.error: str | None = None
        self.in_progress = 0
        self.stopping = False
        self.created = int(time.time())

    # ---- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher = DynamicBatcher(self.pipeline.engine, max_batch_size=self.settings.max_batch_size,
                                      max_wait_ms=self.settings.max_wait_ms, batch_sizes=self.metrics.batch_size)
        self.warm_up = threading.Thread(target=self._warm_up, name="siglip2-warm-up", daemon=True)
        self.warm_up.start()

    def _warm_up(self) -> None:
        """Compile every bucket a batch of 1..max_batch_size rows can land in, for each tower."""
        try:
            engine, started = self.pipeline.engine, time.perf_counter()
            for kind in self.kinds():
                row = jax.tree.map(lambda x: x[0], self._sample(kind))
                for size in engine.buckets(kind, self.settings.max_batch_size):
                    if self.stopping:
                        return
                    engine.run(kind, jax.tree.map(lambda x: np.stack([x] * size), row), size)
            self.ready.set()
            print(f"siglip2-jax serve: ready ({time.perf_counter() - started:.1f} s to compile)", file=sys.stderr,
                  flush=True)
        except Exception as error:  # noqa: BLE001 - reported by /health
            self.error = f"warm-up failed: {type(error).__name__}: {error}"
            print(f"siglip2-jax serve: {self.error}", file=sys.stderr, flush=True)

    def _sample(self, kind: str):
        if kind == "text":
            return self.pipeline.tokenize([""])
        return self.pipeline.preprocess([np.zeros((32, 32, 3), np.uint8)])

    def kinds(self) -> list[str]:
        config = self.pipeline.config
        return [k for k, tower in (("text", config.text), ("image", config.vision)) if tower is not None
                and (k != "text" or self.pipeline.tokenizer is not None)]

    def stop(self) -> None:
        self.stopping = True
        if self.batcher is not None:
            self.batcher.stop()
        # A stop during start-up waits for the compile in progress: the interpreter exiting under a thread
        # inside XLA aborted the process (SIGABRT) instead of exiting 0.
        if self.warm_up is not None:
            self.warm_up.join()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- admission --------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key")

    @contextlib.asynccontextmanager
    async def admitted(self, request: Request):
        """Checks key, readiness and the in-progress bound, reads the body within its limit, and counts the
        request as in progress until it is answered. Yields the JSON body (a dict)."""
        self.authorize(request)
        if self.stopping:
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down",
                           headers={"Retry-After": "5"})
        if not self.ready.is_set():
            raise ApiError(503, self.error or "the model is still compiling; retry shortly", kind="server_error",
                           code="not_ready", headers={"Retry-After": "1"})
        if self.in_progress >= self.settings.max_queue:
            raise ApiError(429, f"server busy: {self.in_progress} requests in progress (--max-queue "
                                f"{self.settings.max_queue}); retry later", kind="rate_limit_exceeded",
                           code="queue_full", headers={"Retry-After": "1"})
        self.in_progress += 1
        self.metrics.in_progress.set(self.in_progress)
        try:
            body = await self._read_json(request)
            model = body.get("model")
            if model is not None and model not in (self.settings.model_name, "siglip2"):
                raise ApiError(404, f"model {model!r} is not served here; this server serves "
                                    f"{self.settings.model_name!r}", param="model", code="model_not_found")
            yield body
        finally:
            self.in_progress -= 1
            self.metrics.in_progress.set(self.in_progress)

    async def _read_json(self, request: Request) -> dict:
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes",
                           code="request_too_large")
        chunks = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
                chunks.append(chunk)

        timeout = self.settings.body_timeout_s
        try:   # a client that stalls mid-body would otherwise hold its --max-queue place for ever
            await asyncio.wait_for(read(), timeout)
        except ClientDisconnect:   # nobody to answer; a 400 in the metrics instead of a traceback in the log
            raise ApiError(400, "the client went away before sending the whole body",
                           code="client_disconnected") from None
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--body-timeout-s); got "
                                f"{sum(map(len, chunks))} bytes", code="request_timeout",
                           headers={"Connection": "close"}) from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON ({error})") from None
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    # ---- work -------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        config = self.pipeline.config
        return config.text.projection_size if config.text is not None else config.vision.width

    async def embed(self, items: list, name: str) -> tuple[np.ndarray, int]:
        """Embeddings of parsed items in their order, and the tokens they used (text tokens up to and
        including EOS; image patches)."""
        loop = asyncio.get_running_loop()
        texts = [(i, item) for i, item in enumerate(items) if isinstance(item, Text)]
        images = [(i, item) for i, item in enumerate(items) if isinstance(item, ImageRef)]
        if texts and "text" not in self.kinds():
            raise ApiError(400, f"{name}: this model has no text tower or no tokenizer", param=name)
        if images and "image" not in self.kinds():
            raise ApiError(400, f"{name}: this model has no image tower", param=name)
        prepared = [loop.run_in_executor(self.pool, self._prepare_image, item) for _, item in images]
        if texts:
            prepared.append(loop.run_in_executor(self.pool, self.pipeline.tokenize, [t.text for _, t in texts]))
        try:
            ready = await asyncio.gather(*prepared)
        except InputError as error:
            raise ApiError(error.status, str(error), param=error.param) from None
        image_rows = [row for row, _ in ready[:len(images)]]
        text_ids = ready[len(images)] if texts else np.zeros((0, 0), np.int32)
        parts, tokens = [], sum(count for _, count in ready[:len(images)]) + int((text_ids != 0).sum())
        if image_rows:
            parts.append(self.batcher.embed("image", image_rows))
        if texts:
            parts.append(self.batcher.embed("text", list(text_ids)))
        results = await asyncio.gather(*parts)
        vectors = [None] * len(items)
        for (index, _), vector in zip(images + texts, [v for r in results for v in r]):
            vectors[index] = vector
        return np.stack(vectors), tokens

    def _prepare_image(self, ref: ImageRef):
        name = ref.name
        data = image_bytes(ref, name, self.settings.fetch)
        try:  # decoded by the pipeline's own preprocessor: what encode_images does with the same bytes
            inputs = self.pipeline.preprocess([data])
        except ImageError as error:
            raise InputError(f"{name}: {str(error).removeprefix('<bytes>: ')}", name) from None
        row = jax.tree.map(lambda x: x[0], inputs)
        vision = self.pipeline.config.vision
        patches = int(row.mask.sum()) if vision.naflex else vision.num_positions
        return row, patches


def _parsed(parse):
    try:
        return parse()
    except InputError as error:
        raise ApiError(error.status, str(error), param=error.param) from None


def _all_of(items, kind, name: str, what: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise ApiError(400, f"{name}[{i}]: expected {what}", param=f"{name}[{i}]")


def _labels(labels, limit: int) -> list[str]:
    if not isinstance(labels, list) or not labels:
        raise ApiError(400, "labels: give a non-empty list of strings", param="labels")
    if len(labels) > limit:
        raise ApiError(400, f"labels: {len(labels)} labels, more than the server's limit of {limit}", param="labels")
    seen = set()
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise ApiError(400, f"labels[{i}]: must be a non-empty string", param=f"labels[{i}]")
        _parsed(lambda: checked_text(label, f"labels[{i}]"))
        if label in seen:
            raise ApiError(400, f"labels[{i}]: {label!r} is given twice", param=f"labels[{i}]")
        seen.add(label)
    return labels


def _top(top, count: int) -> int:
    if top is None:
        return count
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ApiError(400, f"top {top!r}: must be a positive integer", param="top")
    return min(top, count)


def _best(scores: np.ndarray, top: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:top]
