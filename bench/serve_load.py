"""The HTTP server under load, against the library's own offline `encode_images`, same process, same
compiled model, alternating rounds.

    python bench/serve_load.py                          # B/16@224, full size, random weights; 1, 8, 32 clients
    python bench/serve_load.py --layers 2 --rounds 1    # a smoke run in a minute
    python bench/serve_load.py --model ckpt/so400m --price-per-hour 3.5   # any checkpoint; a GPU's price
    python bench/serve_load.py --infinity /path/to/venv/bin/infinity_emb   # and infinity-emb, same weights

The server (uvicorn + the app of `siglip2-jax serve`) runs in a thread of this process on the model that
`encode_images` uses, so both sides share compiled code and weights. Clients are asyncio + httpx in another
thread; each request carries one JPEG photo (640x480) as a base64 data URL, bodies serialized ahead of
time, embeddings returned as base64. A round runs `--requests-per-client` requests per client; then the
same number of photos goes through `pipeline.encode_images(list_of_jpeg_bytes)` (decode + preprocess +
model, batches of `--max-batch-size`). The ratio is server images/s over offline images/s in the same
round; the median over rounds is reported, with p50/p99 request latency. Cost per 1,000 images is
`--price-per-hour` / 3600 / (images/s) * 1000.

With `--infinity BIN`, infinity-emb (the PyTorch embedding server that serves CLIP/SigLIP) serves the same
weights, exported with `siglip2-jax export`, under the same load in the same rounds; its embeddings are
checked against ours first. infinity pins an older transformers, so the export is given the tokenizer files
that version reads (spiece.model, SiglipTokenizer). Install it in a venv of its own, next to the CPU torch:
`pip install torch==2.13.0 "infinity-emb[server,torch,vision]" sentencepiece aiohttp` (and uninstall the
CUDA-only torchvision it pulls in, which cannot load next to a CPU torch).
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRICE = 0.09   # $/hour: a 2-vCPU x86 on-demand cloud machine (e.g. AWS c7i.large, about $0.089/h)


def random_checkpoint(preset: str, layers: int | None, out: Path, tokenizer: Path | None) -> Path:
    """A checkpoint of `preset` with random weights (full size, or `layers` deep); with a tokenizer file
    both towers (what another server needs to start), else the image tower only."""
    import shutil

    from flax import nnx

    from siglip2_jax.checkpoint import save_checkpoint
    from siglip2_jax.config import Siglip2Config
    from siglip2_jax.model import Siglip2
    from siglip2_jax.model.build import params_of

    config = Siglip2Config.preset(preset)
    deep = (lambda tower: tower) if layers is None else (lambda tower: dataclasses.replace(tower, depth=layers))
    config = Siglip2Config(deep(config.vision), deep(config.text) if tokenizer else None, name=f"random {preset}")
    params = params_of(Siglip2(config, rngs=nnx.Rngs(0)))
    path = save_checkpoint(out, config, params, overwrite=True)
    if tokenizer:
        shutil.copy(tokenizer, path / "tokenizer.model")
    return path


def start_infinity(binary: str, checkpoint: Path, work: Path, max_batch_size: int):
    """infinity-emb serving `checkpoint` exported to Hugging Face format: (process, url, model id)."""
    import shutil
    import subprocess

    from siglip2_jax.checkpoint import export_hf

    hf = export_hf(checkpoint, work / "hf")
    shutil.copy(hf / "tokenizer.model", hf / "spiece.model")          # what SiglipTokenizer reads
    settings = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "SiglipTokenizer"}))
    port = free_port()
    process = subprocess.Popen([binary, "v2", "--model-id", str(hf), "--port", str(port), "--engine", "torch",
                                "--device", "cpu", "--batch-size", str(max_batch_size)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}", process)
    return process, f"http://127.0.0.1:{port}", str(hf)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process=None, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}: not healthy after {timeout_s:.0f} s")


def photos(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        pixels = (np.cumsum(rng.integers(0, 9, (480, 640, 3)), axis=1) % 256).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def start_server(pipeline, max_batch_size: int, max_wait_ms: float, decode_workers: int | None = None
                 ) -> tuple[uvicorn.Server, str]:
    settings = ServerSettings(model_name="bench", max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                              max_queue=4096, decode_workers=decode_workers)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipeline, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    wait_healthy(f"http://127.0.0.1:{port}")
    return server, f"http://127.0.0.1:{port}"


def request_bodies(jpegs: list[bytes], model: str, infinity: bool) -> list[bytes]:
    """One image per request: ours as an image_url content part, infinity's as its image modality."""
    urls = ["data:image/jpeg;base64," + base64.b64encode(j).decode() for j in jpegs]
    if infinity:
        return [json.dumps({"model": model, "modality": "image", "input": [u]}).encode() for u in urls]
    return [json.dumps({"model": model, "encoding_format": "base64",
                        "input": [{"type": "image_url", "image_url": {"url": u}}]}).encode() for u in urls]


def embedding_of(url: str, body: bytes) -> np.ndarray:
    item = httpx.post(url + "/embeddings", content=body,
                      headers={"Content-Type": "application/json"}, timeout=600).json()["data"][0]["embedding"]
    return np.frombuffer(base64.b64decode(item), "<f4") if isinstance(item, str) else np.asarray(item, np.float32)


def load_round(url: str, bodies: list[bytes], clients: int, per_client: int) -> tuple[float, list[float]]:
    """`clients` concurrent clients, each sending `per_client` requests back to back: (seconds, latencies)."""
    latencies: list[float] = []

    async def client(session: httpx.AsyncClient, c: int):
        for r in range(per_client):
            body = bodies[(c * per_client + r) % len(bodies)]
            started = time.perf_counter()
            response = await session.post("/embeddings", content=body,
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
    parser.add_argument("--decode-workers", type=int, default=None, help="the server's decode threads (default: "
                                                                         "serve's, the cores up to 4)")
    parser.add_argument("--price-per-hour", type=float, default=DEFAULT_PRICE,
                        help=f"machine price for the cost column (default ${DEFAULT_PRICE}/h, a 2-vCPU x86 VM)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--infinity", metavar="BIN", help="an infinity_emb executable: serve the same weights with "
                                                          "it too and compare (needs --tokenizer)")
    parser.add_argument("--tokenizer", type=Path, default=os.environ.get("SIGLIP2_TOKENIZER",
                                                                       REPO.parent / "shared/data/gemma_tokenizer.model"),
                        help="tokenizer.model for the random checkpoint, when a peer needs a text tower")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer if args.infinity else None
        model = args.model or random_checkpoint(args.preset, args.layers, Path(tmp) / "ckpt", tokenizer)
        pipeline = siglip2_jax.load(model, batch_size=args.max_batch_size)
        from machine import describe
        print(describe(), flush=True)
        print(f"# {jax.devices()[0].device_kind} x{jax.device_count()}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores; model {model if args.model else args.preset + ' random'}"
              f"{f' ({args.layers} layers)' if args.layers else ''}; max batch {args.max_batch_size}, "
              f"max wait {args.max_wait_ms} ms", flush=True)
        started = time.perf_counter()
        server, url = start_server(pipeline, args.max_batch_size, args.max_wait_ms, args.decode_workers)
        print(f"# server ready in {time.perf_counter() - started:.1f} s (every bucket compiled)", flush=True)
        jpegs = photos(16)
        sides = {"ours": (url + "/v1", request_bodies(jpegs, "bench", False))}
        infinity = None
        if args.infinity:
            infinity, infinity_url, infinity_model = start_infinity(args.infinity, Path(model), Path(tmp),
                                                                    args.max_batch_size)
            sides["infinity"] = (infinity_url, request_bodies(jpegs, infinity_model, True))
            ours_vector, theirs = (embedding_of(base, bodies[0]) for base, bodies in sides.values())
            cosine = float(ours_vector @ theirs / np.linalg.norm(theirs))
            print(f"# infinity-emb serves the same weights: cosine with ours {cosine:.6f}", flush=True)
            if cosine < 0.999:
                raise SystemExit("infinity-emb's embedding differs from ours: not comparable")
        pipeline.encode_images(jpegs[:1])  # compile nothing new later: the buckets were compiled by the server

        rows = []
        peer = " | infinity images/s | ours/infinity" if infinity else ""
        print(f"| clients | requests/s | images/s | p50 ms | p99 ms | offline images/s | server/offline | "
              f"$ per 1k images{peer} |")
        print("|---" * (8 + 2 * bool(infinity)) + "|")
        for clients in args.clients:
            per_client = args.requests_per_client or max(2, -(-32 // clients))
            count = clients * per_client
            rates = {name: [] for name in [*sides, "offline"]}
            latencies = []
            for round_ in range(args.rounds):
                order = [*sides, "offline"]
                # rotate which side goes first, so drifting load on the machine hits all alike
                for name in order[round_ % len(order):] + order[:round_ % len(order)]:
                    if name == "offline":
                        batch = [jpegs[i % len(jpegs)] for i in range(count)]
                        t = time.perf_counter()
                        pipeline.encode_images(batch)
                        rates["offline"].append(count / (time.perf_counter() - t))
                    else:
                        seconds, lat = load_round(sides[name][0], sides[name][1], clients, per_client)
                        rates[name].append(count / seconds)
                        latencies += lat if name == "ours" else []
            ratios = [a / b for a, b in zip(rates["ours"], rates["offline"])]
            rate, offline_rate = statistics.median(rates["ours"]), statistics.median(rates["offline"])
            p50, p99 = np.percentile(latencies, [50, 99]) * 1000
            row = dict(clients=clients, requests_per_s=rate, images_per_s=rate, p50_ms=p50, p99_ms=p99,
                       offline_images_per_s=offline_rate, ratio=statistics.median(ratios),
                       dollars_per_1k=args.price_per_hour / 3600 / rate * 1000)
            line = (f"| {clients} | {rate:.2f} | {rate:.2f} | {p50:.0f} | {p99:.0f} | {offline_rate:.2f} | "
                    f"{row['ratio']:.2f}x | {row['dollars_per_1k']:.4f}")
            if infinity:
                row["infinity_images_per_s"] = statistics.median(rates["infinity"])
                row["ours_over_infinity"] = statistics.median(a / b for a, b in zip(rates["ours"], rates["infinity"]))
                line += f" | {row['infinity_images_per_s']:.2f} | {row['ours_over_infinity']:.2f}x"
            rows.append(row)
            print(line + " |", flush=True)
        server.should_exit = True
        if infinity:
            infinity.terminate()
            infinity.wait()
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
