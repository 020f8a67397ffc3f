"""`siglip2-jax serve MODEL`: flags, --help, and the model and settings the server starts with
(`siglip2_jax.serving.server` runs it). Nothing heavy is imported until `run`."""

from __future__ import annotations

import argparse
import os

from . import CommandError, positive_int

EPILOG = """\
endpoints (OpenAI-compatible where OpenAI has one):
  POST /v1/embeddings  {"model": M, "input": "a cat" | ["a cat", {"type": "image_url",
                        "image_url": {"url": "data:image/jpeg;base64,..."}}], "encoding_format": "float"}
  POST /v1/classify    {"images": ["data:image/png;base64,..."], "labels": ["cat", "dog"],
                        "template": "This is a photo of {}.", "top": 5}
  POST /v1/rank        {"query": "a cat", "candidates": [image parts...]}  (or an image query, text candidates)
  GET  /v1/models   GET /health (200 once compiled)   GET /metrics (Prometheus)

example:
  siglip2-jax serve ckpt/b16-224 --port 8000 &
  curl -s localhost:8000/v1/embeddings -H 'Content-Type: application/json' \\
       -d '{"model": "ckpt/b16-224", "input": ["a photo of a cat", "a photo of a dog"]}'
  curl -s localhost:8000/v1/classify -H 'Content-Type: application/json' \\
       -d "{\\"images\\": [\\"data:image/jpeg;base64,$(base64 -w0 cat.jpg)\\"], \\"labels\\": [\\"cat\\", \\"dog\\"]}"

  from openai import OpenAI
  client = OpenAI(base_url="http://localhost:8000/v1", api_key="unused")
  client.embeddings.create(model="ckpt/b16-224", input=["a photo of a cat"])

Images are base64 data URLs; http(s) URLs are fetched only with --allow-url-fetch, and never from
loopback, link-local or private addresses. Each embedding is L2-normalized float32, bit-identical to
`siglip2_jax.load(MODEL).encode_images / encode_texts` on the same input.

exit status: 0 after a clean shutdown (SIGTERM or Ctrl-C: requests in flight are answered first);
2 bad arguments or model.
"""


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 0")
    return number


def _positive(value: str) -> float:
    number = _non_negative(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"{value}: must be more than 0")
    return number


def _at_most(limit: float, parse, unit: str):
    """An argparse type: `parse`, then refused above `limit` (a timeout of inf or 1e300 overflowed the
    batching thread's wait, which then died while /health still said ready)."""
    def checked(value: str):
        number = parse(value)
        if number > limit:
            raise argparse.ArgumentTypeError(f"{value}: must be at most {limit:g}{unit}")
        return number
    return checked


def _port(value: str) -> int:
    port = positive_int(value)
    if port > 65535:  # was accepted: the server compiled, said it was ready, and listened nowhere
        raise argparse.ArgumentTypeError(f"{port}: must be at most 65535")
    return port


def register(commands) -> None:
    parser = commands.add_parser(
        "serve", help="serve embeddings and zero-shot classification over HTTP (OpenAI-compatible)",
        description="Serve a SigLIP 2 model over HTTP: OpenAI-compatible embeddings for texts and images, "
                    "zero-shot classification and ranking, with dynamic batching of concurrent requests.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="siglip2-jax checkpoint dir, Hugging Face dir or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; "
                                                             "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=_port, default=8000, help="port (default %(default)s)")
    parser.add_argument("--model-name", default=None, help="the id clients send as 'model' (default: MODEL as given)")
    parser.add_argument("--max-batch-size", type=_at_most(4096, positive_int, ""), default=32,
                        help="most inputs of one kind per model batch; every bucket up to it is compiled at "
                             "start-up (default %(default)s)")
    parser.add_argument("--max-wait-ms", type=_at_most(60_000, _non_negative, " ms"), default=5.0,
                        help="longest an input waits for others to fill its batch (default %(default)s)")
    parser.add_argument("--max-queue", type=positive_int, default=256,
                        help="most requests in progress; past it requests get 429 + Retry-After (default %(default)s)")
    parser.add_argument("--max-request-bytes", type=positive_int, default=20 << 20,
                        help="largest request body; larger ones get 413 (default %(default)s = 20 MiB)")
    parser.add_argument("--max-inputs-per-request", type=positive_int, default=256,
                        help="most inputs (or labels) in one request (default %(default)s)")
    parser.add_argument("--body-timeout-s", type=_at_most(3600, _positive, " s"), default=60.0,
                        help="longest a request body may take to arrive; slower ones get 408 (default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("SIGLIP2_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $SIGLIP2_API_KEY; none if unset)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (default %(default)s; bfloat16: bf16 matmuls with float32 accumulation)")
    parser.add_argument("--max-num-patches", type=positive_int, default=None,
                        help="NaFlex models: patch budget per image (default: the checkpoint's, else 256)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="FixRes models: serve at this input size, the position table resized as transformers' "
                             "interpolate_pos_encoding does (default: the checkpoint's)")
    parser.add_argument("--model-parallel", type=positive_int, default=1,
                        help="devices that share one model replica; the batch is split over the rest (default 1)")
    parser.add_argument("--decode-workers", type=positive_int, default=None,
                        help="threads decoding and preprocessing images off the event loop (default: the cores, at most 4)")
    parser.add_argument("--allow-url-fetch", action="store_true",
                        help="fetch http(s) image URLs named in requests (public addresses only)")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="with --allow-url-fetch, also fetch from loopback/private addresses (tests only)")
    parser.add_argument("--fetch-max-bytes", type=positive_int, default=20 << 20,
                        help="largest fetched image, in bytes (default %(default)s = 20 MiB)")
    parser.add_argument("--fetch-timeout-s", type=_at_most(3600, _non_negative, " s"), default=10.0,
                        help="timeout of one fetch, in seconds (default %(default)s)")


def subject(args: argparse.Namespace) -> str:
    return args.model


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise CommandError(f"serve needs {error.name}: pip install 'siglip2-jax[serve]'") from None
    import jax
    import jax.numpy as jnp

    from ..pipeline import load
    from ..serving.app import ServerSettings
    from ..serving.inputs import FetchPolicy
    from ..serving.server import bound_socket, serve
    from ..sharding import make_mesh

    if args.allow_private_urls and not args.allow_url_fetch:
        raise CommandError("--allow-private-urls needs --allow-url-fetch")
    try:
        listener = bound_socket(args.host, args.port)
    except OSError as error:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    several = args.model_parallel > 1 or jax.local_device_count() > 1
    mesh = make_mesh(model_parallel=args.model_parallel) if several else None
    pipeline = load(args.model, dtype=getattr(jnp, args.dtype), mesh=mesh, max_num_patches=args.max_num_patches,
                    image_size=args.image_size, batch_size=args.max_batch_size)
    settings = ServerSettings(
        model_name=args.model_name or str(args.model), api_key=args.api_key or None,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes, max_inputs_per_request=args.max_inputs_per_request,
        body_timeout_s=args.body_timeout_s, decode_workers=args.decode_workers,
        fetch=FetchPolicy(args.allow_url_fetch, args.allow_private_urls, args.fetch_max_bytes, args.fetch_timeout_s))
    serve(pipeline, settings, listener)
    return 0
