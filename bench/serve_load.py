"""The HTTP server under load, against the library's own offline `encode_images`, same process, same
compiled model, alternating rounds.

    python bench/serve_load.py                          # B/16@224, full size, random weights; 1, 8, 32 clients
    python bench/serve_load.py --layers 2 --rounds 1    # a smoke run in a minute
    python bench/serve_load.py --model ckpt/so400m --price-per-hour 3.5   # any checkpoint; a GPU's price

The server (uvicorn + the app of `siglip2-jax serve`) runs in a thread of this process on the model that
`encode_images` uses, so both sides share compiled code and weights. Clients are asyncio + httpx in another
thread; each request carries one JPEG photo (640x480) as a base64 data URL, bodies serialized ahead of
time, embeddings returned as base64. A round runs `--requests-per-client` requests per client; then the
same number of photos goes through `pipeline.encode_images(list_of_jpeg_bytes)` (decode + preprocess +
model, batches of `--max-batch-size`). The ratio is server images/s over offline images/s in the same
round; the median over rounds is reported, with p50/p99 request latency. Cost per 1,000 images is
`--price-per-hour` / 3600 / (images/s) * 1000.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import uvicorn
from PIL import Image

import siglip2_jax
from siglip2_jax.serving.app import ServerSettings, create_app

DEFAULT_PRICE = 0.09   # $/hour: a 2-vCPU x86 on-demand cloud machine (e.g. AWS c7i.large, about $0.089/h)


def random_checkpoint(preset: str, layers: int | None, out: Path) -> Path:
    """A checkpoint of `preset` with random weights (full size, or `layers` deep), image tower only."""
    from flax import nnx

    from siglip2_jax.checkpoint import save_checkpoint
    from siglip2_jax.config import Siglip2Config
    from siglip2_jax.model import Siglip2

    config = Siglip2Config.preset(preset)
    vision = config.vision if layers is None else dataclasses.replace(config.vision, depth=layers)
    config = Siglip2Config(vision, None, name=f"random {preset}")
    params = nnx.to_pure_dict(nnx.state(Siglip2(config, rngs=nnx.Rngs(0)), nnx.Param))
    return save_checkpoint(out, config, params, overwrite=True)


def photos(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        pixels = (np.cumsum(rng.integers(0, 9, (480, 640, 3)), axis=1) % 256).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def start_server(pipeline, max_batch_size: int, max_wait_ms: float) -> tuple[uvicorn.Server, str]:
    settings = ServerSettings(model_name="bench", max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                              max_queue=4096)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(pipeline, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def load_round(url: str, bodies: list[bytes], clients: int, per_client: int) -> tuple[float, list[float]]:
    """`clients` concurrent clients, each sending `per_client` requests back to back: (seconds, latencies)."""
    latencies: list[float] = []

    async def client(session: httpx.AsyncClient, c: int):
        for r in range(per_client):
            body = bodies[(c * per_client + r) % len(bodies)]
            started = time.perf_counter()
            response = await session.post("/v1/embeddings", content=body,
                                          headers={"Content-Type": "application/json"})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async def main():
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as session:
            started = time.perf_counter()
            await asyncio.gather(*(client(session, c) for c in range(clients)))
            return time.perf_counter() - started

    return asyncio.run(main()), latencies


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint; default: random-weight --preset")
    parser.add_argument("--preset", default="siglip2-base-patch16-224")
    parser.add_argument("--layers", type=int, default=None, help="random model this many layers deep (smoke runs)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=None,
                        help="default: enough for >= 32 images per round and >= 2 per client")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--price-per-hour", type=float, default=DEFAULT_PRICE,
                        help=f"machine price for the cost column (default ${DEFAULT_PRICE}/h, a 2-vCPU x86 VM)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_checkpoint(args.preset, args.layers, Path(tmp) / "ckpt")
        pipeline = siglip2_jax.load(model, batch_size=args.max_batch_size)
        print(f"# {jax.devices()[0].device_kind} x{jax.device_count()}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores; model {model if args.model else args.preset + ' random'}"
              f"{f' ({args.layers} layers)' if args.layers else ''}; max batch {args.max_batch_size}, "
              f"max wait {args.max_wait_ms} ms", flush=True)
        started = time.perf_counter()
        server, url = start_server(pipeline, args.max_batch_size, args.max_wait_ms)
        print(f"# server ready in {time.perf_counter() - started:.1f} s (every bucket compiled)", flush=True)
        jpegs = photos(16)
        bodies = [json.dumps({"model": "bench", "encoding_format": "base64", "input": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(j).decode()}}]}
        ).encode() for j in jpegs]
        pipeline.encode_images(jpegs[:1])  # compile nothing new later: the buckets were compiled by the server

        rows = []
        print("| clients | requests/s | images/s | p50 ms | p99 ms | offline images/s | server/offline | $ per 1k images |")
        print("|---|---|---|---|---|---|---|---|")
        for clients in args.clients:
            per_client = args.requests_per_client or max(2, -(-32 // clients))
            count = clients * per_client
            ratios, server_rates, offline_rates, latencies = [], [], [], []
            for round_ in range(args.rounds):
                # alternate which side goes first, so drifting load on the machine hits both alike
                for side in (("server", "offline") if round_ % 2 == 0 else ("offline", "server")):
                    if side == "server":
                        seconds, lat = load_round(url, bodies, clients, per_client)
                        server_rates.append(count / seconds)
                        latencies += lat
                    else:
                        batch = [jpegs[i % len(jpegs)] for i in range(count)]
                        t = time.perf_counter()
                        pipeline.encode_images(batch)
                        offline_rates.append(count / (time.perf_counter() - t))
                ratios.append(server_rates[-1] / offline_rates[-1])
            rate, offline_rate = statistics.median(server_rates), statistics.median(offline_rates)
            p50, p99 = np.percentile(latencies, [50, 99]) * 1000
            row = dict(clients=clients, requests_per_s=rate, images_per_s=rate, p50_ms=p50, p99_ms=p99,
                       offline_images_per_s=offline_rate, ratio=statistics.median(ratios),
                       dollars_per_1k=args.price_per_hour / 3600 / rate * 1000)
            rows.append(row)
            print(f"| {clients} | {rate:.2f} | {rate:.2f} | {p50:.0f} | {p99:.0f} | {offline_rate:.2f} | "
                  f"{row['ratio']:.2f}x | {row['dollars_per_1k']:.4f} |", flush=True)
        server.should_exit = True
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
