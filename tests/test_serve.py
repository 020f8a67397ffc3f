"""`siglip2-jax serve`: the real server in a subprocess on 127.0.0.1, spoken to by real clients (httpx and the
official `openai` package). Claims: every embedding equals the offline `encode_*` of the same input bit for
bit, whatever shared its batch; concurrent requests are merged into batches; every bad input is one
OpenAI-shaped JSON error naming it, and the server keeps serving; nothing compiles after /health is ready;
SIGTERM loses no request."""

import asyncio
import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import png_header_only
from PIL import Image

import siglip2_jax
from siglip2_jax.serving import inputs as inputs_module
from siglip2_jax.serving.inputs import FetchPolicy, ImageRef, InputError, image_bytes

openai = pytest.importorskip("openai")

TEXTS = ["a photo of a cat", "A PHOTO OF A DOG", "фотография кошки", "猫的照片", "", "café " * 40]
README = Path(__file__).parents[1] / "README.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`siglip2-jax serve MODEL ARGS...` on a free loopback port; waits for /health."""

    def __init__(self, model, *args, devices: int = 1, cache: Path, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "siglip2_jax.cli", "serve", str(model), "--port", str(self.port), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                 "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 **(env or {})})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not become ready in 300 s")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def compilations(self) -> float:
        text = httpx.get(self.url + "/metrics").text
        return float(re.search(r"^siglip2_xla_compilations_total (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def server(fixres, cache):
    """One device, batches of up to 4, a 3 MB body limit, 16 inputs per request, URL fetches allowed (also
    from loopback, for the test's image host). The last test of this file stops it with SIGTERM."""
    server = Server(fixres[1], "--max-batch-size", 4, "--max-wait-ms", 20, "--max-request-bytes", 3_000_000,
                    "--max-inputs-per-request", 16, "--allow-url-fetch", "--allow-private-urls", cache=cache)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def offline(fixres):
    return siglip2_jax.load(fixres[1])


def png(seed: int, size=None) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size or rng.integers(8, 200, 2)
    pixels = (np.cumsum(rng.integers(0, 9, (h, w, 3)), axis=1) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG" if seed % 2 else "JPEG")
    return buffer.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def test_openai_client_texts_and_images_equal_offline(server, offline):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    texts = client.embeddings.create(model=str(server_model(server)), input=TEXTS)   # base64 by default
    got = np.array([d.embedding for d in texts.data], np.float32)
    assert np.array_equal(got, offline.encode_texts(TEXTS))
    assert texts.usage.prompt_tokens == int((offline.tokenize(TEXTS) != 0).sum())
    floats = client.embeddings.create(model=str(server_model(server)), input="a photo of a cat", encoding_format="float")
    assert np.array_equal(np.array(floats.data[0].embedding, np.float32), offline.encode_texts(["a photo of a cat"])[0])
    photos = [png(i) for i in range(3)]
    # images go through the client's documented way of passing extra input: extra_body
    images = client.embeddings.create(model=str(server_model(server)), input=[],
                                      extra_body={"input": [image_part(p) for p in photos]})
    assert [d.index for d in images.data] == [0, 1, 2]
    assert np.array_equal(np.array([d.embedding for d in images.data], np.float32), offline.encode_images(photos))
    assert [m.id for m in client.models.list()] == [str(server_model(server))]


def server_model(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def test_concurrent_clients_are_batched_and_each_equals_offline(server, offline):
    """32 clients at once, text-only, image-only and mixed requests: every answer equals the offline
    embedding of its own inputs, and batches held more than one input on average."""
    photos = [png(100 + i) for i in range(12)]
    expected_images = {i: e for i, e in enumerate(offline.encode_images(photos))}
    expected_texts = {i: e for i, e in enumerate(offline.encode_texts(TEXTS))}
    before = metric_sums(server)
    compiled = server.compilations()

    def request_for(client_id: int):
        rng = np.random.default_rng(client_id)
        kind = client_id % 3
        chosen = []
        for _ in range(int(rng.integers(1, 5))):
            if kind == 0 or (kind == 2 and rng.random() < 0.5):
                chosen.append(("text", int(rng.integers(len(TEXTS)))))
            else:
                chosen.append(("image", int(rng.integers(len(photos)))))
        body = [TEXTS[i] if k == "text" else image_part(photos[i]) for k, i in chosen]
        return chosen, body

    async def one_client(client: httpx.AsyncClient, client_id: int):
        chosen, body = request_for(client_id)
        response = await client.post("/v1/embeddings", json={"input": body, "encoding_format": "base64"})
        assert response.status_code == 200, response.text
        for (kind, i), item in zip(chosen, response.json()["data"]):
            got = np.frombuffer(base64.b64decode(item["embedding"]), "<f4")
            want = expected_texts[i] if kind == "text" else expected_images[i]
            assert np.array_equal(got, want), (client_id, kind, i)
        return len(chosen)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one_client(client, c) for c in range(32)))

    inputs = sum(asyncio.run(main()))
    after = metric_sums(server)
    rows, batches = after[0] - before[0], after[1] - before[1]
    assert rows == inputs and rows / batches > 1, (rows, batches)
    assert server.compilations() == compiled


def metric_sums(server) -> tuple[float, float]:
    text = httpx.get(server.url + "/metrics").text
    total = sum(float(v) for v in re.findall(r"^siglip2_batch_size_sum\{[^}]*\} (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(r"^siglip2_batch_size_count\{[^}]*\} (\S+)$", text, re.M))
    return total, count


def test_classify_and_rank_equal_zero_shot(server, offline):
    photos = [png(7), png(8)]
    labels = ["cat", "dog", "a red car"]
    response = httpx.post(server.url + "/v1/classify", json={"images": [data_url(p) for p in photos],
                                                              "labels": labels, "top": 2}, timeout=60)
    assert response.status_code == 200, response.text
    probs = offline.zero_shot(photos, labels)
    for row, answer in zip(probs, response.json()["data"]):
        order = np.argsort(-row, kind="stable")[:2]
        assert [x["label"] for x in answer["labels"]] == [labels[j] for j in order]
        assert [x["probability"] for x in answer["labels"]] == [float(row[j]) for j in order]
    ranked = httpx.post(server.url + "/v1/rank", json={"query": "a cat", "candidates": [data_url(p) for p in photos]},
                        timeout=60).json()["data"]
    assert [(r["index"], r["probability"]) for r in ranked] == offline.rank_images("a cat", photos)
    ranked = httpx.post(server.url + "/v1/rank", json={"query": image_part(photos[0]), "candidates": labels},
                        timeout=60).json()["data"]
    assert [(r["index"], r["probability"]) for r in ranked] == offline.rank_texts(photos[0], labels)


BAD_IMAGES = {
    "broken": b"\x89PNG\r\n\x1a\nthis is not a png",
    "truncated": png(3, (120, 160))[:300],
    "not an image": b"%PDF-1.4 hello",
    "bomb": png_header_only(40_000, 40_000),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_is_a_400_naming_its_index(server, case):
    body = {"input": ["fine text", image_part(png(1)), image_part(BAD_IMAGES[case])]}
    response = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("input[2]: ") and error["param"] == "input[2]", error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, status, needle", [
    ({"input": [image_part(b"")]}, 400, "input[0]: "),
    ({"input": ["data:image/png;base64,@@@"]}, 200, None),   # a plain string is a text, whatever it says
    ({"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}, 400, "not valid base64"),
    ({"input": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}, 400, "fetching the image URL failed"),
    ({"input": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}, 400, "unsupported URL scheme"),
    ({"input": [{"type": "audio"}]}, 400, "unknown content part type"),
    ({"input": [1, 2, 3]}, 400, "token id input is not supported"),
    ({"input": []}, 400, "at least one input"),
    ({"input": ["x"] * 17}, 400, "more than the server's limit of 16"),
    ({"input": "x", "model": "someone/else"}, 404, "is not served here"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "dimensions": 3}, 400, "dimensions"),
    ({"nothing": 1}, 400, "at least one input"),
    ({"input": [True]}, 400, "input[0]: expected a string or a content part object, got bool"),
    ({"input": [{"type": "image_url", "image_url": {"url": "http://[::1/x.png"}}]}, 400, "input[0]: not a valid URL"),
    ({"input": ["fine", "\ud800"]}, 400, "input[1]: not valid Unicode"),            # JSON's escape of a lone surrogate
    ({"input": [{"type": "text", "text": "a\udfffb"}]}, 400, "input[0]: not valid Unicode"),
    pytest.param(b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply", id="deep"),
    # base64 as the `base64` tool writes it (76-character lines), URL-safe and unpadded is still base64
    ({"input": [{"type": "image_url", "image_url": "data:image/png;base64," + base64.encodebytes(png(1)).decode()}]},
     200, None),
    ({"input": [{"type": "image_url", "image_url": "data:image/png;base64,"
                 + base64.urlsafe_b64encode(png(1)).decode().rstrip("=")}]}, 200, None),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, needle):
    # json.dumps escapes a lone surrogate as JSON allows ("\ud800"); bytes are sent as they are
    content = body if isinstance(body, bytes) else json.dumps(body)
    response = httpx.post(server.url + "/v1/embeddings", content=content, timeout=60)
    assert response.status_code == status, response.text
    if needle:
        error = response.json()["error"]
        assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
], ids=["request-line", "two-lengths", "header", "chunk-size"])
def test_malformed_http_gets_a_json_error(server, raw):
    # h11 refuses these before the app sees them; the refusal is still one JSON error in the OpenAI shape
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(raw)
        response = http.client.HTTPResponse(connection)
        response.begin()
        body = response.read()
    assert response.status == 400, body
    assert response.getheader("content-type") == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and "not a valid HTTP/1.1 request" in error["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_classify_refusals(server):
    image = data_url(png(2))
    cases = [({"images": [image], "labels": ["a", "a"]}, "given twice"),
             ({"images": [image], "labels": []}, "non-empty list"),
             ({"images": [image], "labels": ["cat"], "template": "a {} and a {}"}, "exactly one {}"),
             ({"images": [image], "labels": ["cat"], "template": "a {} of {kind}"}, "exactly one {}"),
             ({"images": [image], "labels": ["cat"], "top": 0}, "positive integer"),
             ({"images": ["a text, not an image"], "labels": ["cat"]}, "images[0]: "),
             ({"images": [5], "labels": ["cat"]}, "images[0]: expected a string or a content part object, got int"),
             ({"images": [image], "labels": ["cat", "\ud83d"]}, "labels[1]: not valid Unicode"),
             ({"images": [image], "labels": ["cat"], "template": "a {} \udc00"}, "template: not valid Unicode"),
             ({"query": "\ud800", "candidates": [image]}, "query: not valid Unicode"),
             ({"query": "cat", "candidates": ["dog"]}, None)]
    for body, needle in cases:
        route = "/v1/rank" if "query" in body else "/v1/classify"
        response = httpx.post(server.url + route, content=json.dumps(body), timeout=60)
        assert response.status_code == 400, (body, response.text)
        if needle:
            assert needle in response.json()["error"]["message"], response.text


def test_body_limits_json_and_routes(server):
    big = {"input": [image_part(os.urandom(2_400_000))]}          # 3.2 MB of base64
    response = httpx.post(server.url + "/v1/embeddings", json=big, timeout=60)
    assert response.status_code == 413 and "over the limit" in response.json()["error"]["message"]

    def chunks():   # no Content-Length: the limit holds while streaming too
        for _ in range(40):
            yield b"x" * 100_000
    response = httpx.post(server.url + "/v1/embeddings", content=chunks(), timeout=60)
    assert response.status_code == 413
    response = httpx.post(server.url + "/v1/embeddings", content=b"{not json", timeout=60)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/embeddings", json=[1, 2], timeout=60).status_code == 400
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/embeddings").json()["error"]["code"] == "method_not_allowed"
    assert httpx.head(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/health").json()["status"] == "ready"


def test_client_gone_mid_body_is_a_400_not_a_traceback():
    """A client that closes its connection half-way through the body (in process: uvicorn would only log
    the exception): the app answers a 400 (to nobody, but counted) instead of raising ClientDisconnect."""
    from siglip2_jax.serving.app import ServerSettings, create_app

    app = create_app(None, ServerSettings("m"))
    app.state.server.ready.set()
    received = iter([{"type": "http.request", "body": b'{"inp', "more_body": True}])
    sent = []

    async def receive():
        return next(received, {"type": "http.disconnect"})

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/embeddings", "raw_path": b"/v1/embeddings", "query_string": b"", "root_path": "",
             "headers": [(b"content-length", b"100")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400 and json.loads(sent[1]["body"])["error"]["code"] == "client_disconnected"


def test_nothing_compiles_after_ready_and_metrics(server):
    compiled = server.compilations()
    for n in (1, 3, 5, 8, 13):
        body = {"input": [image_part(png(200 + i)) for i in range(n)] + TEXTS[: n % 3]}
        assert httpx.post(server.url + "/v1/embeddings", json=body, timeout=120).status_code == 200
    assert server.compilations() == compiled
    text = httpx.get(server.url + "/metrics").text
    for name in ("siglip2_requests_total{", "siglip2_request_latency_seconds_bucket{", "siglip2_batch_size_bucket{",
                 "siglip2_requests_in_progress ", "siglip2_queued_inputs{"):
        assert name in text, name
    assert re.search(r'siglip2_requests_total\{route="/v1/embeddings",status="400"\} [1-9]', text)


class _Images(BaseHTTPRequestHandler):
    """A loopback image host for the fetch tests: /photo.png, /redirect (to /photo.png), /huge."""

    def do_GET(self):
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/photo.png")
            self.end_headers()
            return
        body = png(5) if self.path == "/photo.png" else b"\0" * (3 << 20)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the fetcher stopped reading at its size limit
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    host = HTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()


def test_url_fetch_refuses_private_addresses_and_checks_every_redirect(image_host, monkeypatch):
    loopback = FetchPolicy(allow_urls=True)
    with pytest.raises(InputError, match="non-public address"):
        image_bytes(ImageRef(image_host + "/photo.png"), "input[0]", loopback)
    allowed = FetchPolicy(allow_urls=True, allow_private=True, max_bytes=1 << 20, timeout_s=5)
    assert image_bytes(ImageRef(image_host + "/redirect"), "input[0]", allowed) == png(5)
    with pytest.raises(InputError, match="over the limit"):
        image_bytes(ImageRef(image_host + "/huge"), "input[0]", allowed)
    # a public host that redirects to a private one: the second hop is refused (no network: mock transport)
    real = socket.getaddrinfo
    monkeypatch.setattr(inputs_module.socket, "getaddrinfo", lambda host, *a, **k: (
        [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80))] if host == "public.example"
        else real(host, *a, **k)))
    hops = []

    def handler(request):
        hops.append(str(request.url))
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data"})
    with pytest.raises(InputError, match="non-public address"):
        image_bytes(ImageRef("http://public.example/cat.png"), "input[0]", loopback,
                    client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert hops == ["http://public.example/cat.png"]


def test_server_fetches_urls_when_allowed(server, image_host, offline):
    body = {"input": [{"type": "image_url", "image_url": {"url": image_host + "/redirect"}}]}
    response = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert np.array_equal(np.array(response.json()["data"][0]["embedding"], np.float32),
                          offline.encode_images([png(5)])[0])


@pytest.fixture(scope="module")
def guarded(fixres, cache):
    """8 devices (the batch split over the mesh), an API key, at most 2 requests in progress, 3 s for a body."""
    server = Server(fixres[1], "--max-batch-size", 8, "--max-wait-ms", 200, "--max-queue", 2, "--body-timeout-s", 3,
                    devices=8, cache=cache, env={"SIGLIP2_API_KEY": "sesame"})
    yield server
    assert server.stop() == 0


def test_api_key_and_url_fetch_off_by_default(guarded, image_host):
    url = guarded.url + "/v1/embeddings"
    body = {"input": [{"type": "image_url", "image_url": {"url": image_host + "/photo.png"}}]}
    refused = httpx.post(url, json=body, headers={"Authorization": "Bearer sesame"})
    assert refused.status_code == 400 and "--allow-url-fetch" in refused.json()["error"]["message"]
    assert httpx.post(url, json={"input": "x"}).status_code == 401
    wrong = httpx.post(url, json={"input": "x"}, headers={"Authorization": "Bearer sesam"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sesame")
    assert len(client.embeddings.create(model=server_model_with_key(guarded), input=["a"]).data) == 1
    assert httpx.get(guarded.url + "/health").status_code == 200     # health and metrics stay open


def server_model_with_key(server) -> str:
    return httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer sesame"}).json()["data"][0]["id"]


def test_mesh_server_equals_offline_mesh(guarded, fixres):
    from siglip2_jax.sharding import make_mesh

    photos = [png(300 + i) for i in range(5)]
    response = httpx.post(guarded.url + "/v1/embeddings", headers={"Authorization": "Bearer sesame"},
                          json={"input": [image_part(p) for p in photos] + TEXTS}, timeout=60)
    assert response.status_code == 200, response.text
    got = np.array([d["embedding"] for d in response.json()["data"]], np.float32)
    sharded = siglip2_jax.load(fixres[1], mesh=make_mesh())
    assert np.array_equal(got[:5], sharded.encode_images(photos))
    assert np.array_equal(got[5:], sharded.encode_texts(TEXTS))


def test_full_queue_is_a_429_with_retry_after(guarded):
    async def main():
        async with httpx.AsyncClient(base_url=guarded.url, timeout=60,
                                     headers={"Authorization": "Bearer sesame"}) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": [f"text {i}"]})
                                          for i in range(12)))
    responses = asyncio.run(main())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "queue_full"
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_stalled_bodies_lose_their_place_with_a_408(guarded):
    """Two clients that send half a body and stall fill --max-queue 2; after --body-timeout-s each gets a
    408 and the server takes requests again."""
    stalled = [socket.create_connection(("127.0.0.1", guarded.port), timeout=15) for _ in range(2)]
    for connection in stalled:
        connection.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
                           b"Content-Length: 100\r\n\r\n{\"inp")
    headers = {"Authorization": "Bearer sesame"}
    time.sleep(0.5)
    assert httpx.post(guarded.url + "/v1/embeddings", json={"input": "x"}, headers=headers).status_code == 429
    for connection in stalled:
        with connection:
            answer = connection.makefile("rb").read().decode()   # until the server closes it
            assert answer.startswith("HTTP/1.1 408") and "did not arrive within 3 s" in answer, answer
    assert httpx.post(guarded.url + "/v1/embeddings", json={"input": "x"}, headers=headers).status_code == 200


def readme_serving_blocks() -> list[str]:
    text = README.read_text()
    return re.findall(r"<!-- readme-test: serve -->\s*```python\n(.*?)```", text, re.S)


def test_readme_serving_snippets_run(server, tmp_path):
    blocks = readme_serving_blocks()
    assert blocks, "README.md has no serving snippets marked <!-- readme-test: serve -->"
    (tmp_path / "samples").mkdir()  # the blocks run, like the README's other examples, from the repository's folder
    (tmp_path / "samples" / "cat.jpg").write_bytes(png(4))
    for block in blocks:
        code = block.replace("http://localhost:8000", server.url)
        code = code.replace('"ckpt/b16-224"', repr(server_model(server)))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, block + result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the SYN filter is Linux's")
def test_listener_refuses_new_handshakes_but_keeps_the_queued_ones():
    """What the drain's last step relies on: after `refuse_new_connections`, a connection already in the
    accept queue is still accepted and carries data both ways, `accept_queue` counts it, and a new connect
    gets no handshake (it times out, and would be refused once the listener closes)."""
    from siglip2_jax.serving.server import accept_queue, refuse_new_connections

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = listener.getsockname()
        with socket.create_connection(address, timeout=5) as queued:
            deadline = time.monotonic() + 5
            while accept_queue(listener) != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert accept_queue(listener) == 1
            refuse_new_connections(listener)
            with pytest.raises(TimeoutError):
                socket.create_connection(address, timeout=0.3).close()
            assert accept_queue(listener) == 1
            accepted, _ = listener.accept()
            with accepted:
                assert accept_queue(listener) == 0
                queued.sendall(b"request")
                assert accepted.recv(16) == b"request"
                accepted.sendall(b"answer")
                assert queued.recv(16) == b"answer"


def test_sigterm_while_compiling_exits_0(fixres, tmp_path):
    """A stop before the server was ready aborted the process (SIGABRT: the interpreter exited under the
    warm-up thread inside XLA); it now waits for the compile in progress and exits 0."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "siglip2_jax.cli", "serve", str(fixres[1]), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path)})  # a cold cache: 12 buckets to compile
    output = process.stdout.readline()
    assert "compiling every batch shape first" in output, output
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output += process.communicate(timeout=120)[0]
    assert "ready (" not in output, "the server became ready before the signal: nothing was tested"
    assert process.returncode == 0, output


def test_sigterm_during_load_answers_or_refuses_every_request(server):
    """Requests keep arriving while SIGTERM comes: each is answered (200), refused with a status, or refused
    at connect; none is cut off after it was sent. Connections opened before the signal whose request comes
    only after the last one in progress was answered (fresh, and idle after a keep-alive answer) still get a
    whole 503; a connection tried during the drain is refused at connect or answered. The server exits 0."""
    outcomes = []

    async def client_loop(client, i):
        for j in range(30):
            try:
                response = await client.post("/v1/embeddings", json={"input": [image_part(png(i * 100 + j % 3)), "x"]})
                outcomes.append(response.status_code)
                if response.status_code == 503:   # told the server is stopping: this client backs off
                    return
            except httpx.ConnectError:
                outcomes.append("refused at connect")
                return
            except httpx.HTTPError as error:
                outcomes.append(f"lost: {type(error).__name__}")
                return

    def open_connections():
        fresh = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(2)]
        for connection in fresh:
            connection.connect()
        kept_alive = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        kept_alive.request("GET", "/health")
        answer = kept_alive.getresponse()
        assert answer.status == 200 and answer.read()
        return [*fresh, kept_alive]

    async def main():
        limits = httpx.Limits(max_keepalive_connections=0)   # a new connection per request
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            tasks = [asyncio.create_task(client_loop(client, i)) for i in range(8)]
            while len(outcomes) < 10:
                await asyncio.sleep(0.05)
            idle = await asyncio.to_thread(open_connections)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.gather(*tasks)
            return idle

    idle = asyncio.run(main())
    time.sleep(1)   # nothing in progress now: a server that closed at once would have closed these by now
    try:
        late = socket.create_connection(("127.0.0.1", server.port), timeout=0.5)
    except (TimeoutError, ConnectionRefusedError):   # no new handshake completes while it drains
        late = None
    else:
        idle.append(http.client.HTTPConnection("127.0.0.1", server.port, timeout=30))
        idle[-1].sock = late
    for connection in idle:
        connection.request("POST", "/v1/embeddings", body=b'{"input": "x"}', headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        body = answer.read()
        assert answer.status == 503 and answer.getheader("connection") == "close", (answer.status, body)
        assert json.loads(body)["error"]["code"] == "shutting_down"
    assert server.process.wait(60) == 0
    lost = [o for o in outcomes if isinstance(o, str) and o.startswith("lost")]
    assert not lost, outcomes
    assert outcomes.count(200) >= 10 and set(outcomes) <= {200, 503, "refused at connect"}, outcomes
