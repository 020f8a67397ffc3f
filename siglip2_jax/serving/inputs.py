"""Request inputs: texts, image content parts, base64 data URLs and (only if the operator allows it)
remote image URLs fetched with guards against server-side request forgery.

An embeddings `input` is a string, or a list whose items are strings or content parts, the shape
multimodal embedding APIs accept:

    "a photo of a cat"
    {"type": "text", "text": "a photo of a cat"}
    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ..."}}
    {"type": "image_url", "image_url": "data:image/png;base64,..."}      (the url given directly)

Every refusal is an `InputError` whose message names the input (`input[3]`) and the reason.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

from ..tokenizer import check_text

MAX_REDIRECTS = 3
URL_SAFE = str.maketrans("-_", "+/")


class InputError(ValueError):
    """A request input that cannot be used; `param` names it in OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclasses.dataclass(frozen=True)
class Text:
    text: str
    name: str = "input"  # how errors name it: input[3]


@dataclasses.dataclass(frozen=True)
class ImageRef:
    url: str             # a data: URL, or an http(s) URL when fetching is allowed
    name: str = "input"


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """What the operator allowed: remote fetches at all, private addresses (tests only), limits."""

    allow_urls: bool = False
    allow_private: bool = False
    max_bytes: int = 20 << 20
    timeout_s: float = 10.0


def checked_text(text: str, name: str) -> str:
    """`text` itself; raises InputError naming `name` if the tokenizer cannot take it (`check_text`)."""
    try:
        return check_text(text, name)
    except ValueError as error:
        raise InputError(str(error), name) from None


def parse_item(item, name: str, strings: str = "text") -> Text | ImageRef:
    """One input: a string or a content part -> Text or ImageRef. A plain string is a text, or with
    strings="image" an image URL (where only images are expected). Raises InputError naming `name`."""
    if isinstance(item, str):
        return Text(checked_text(item, name), name) if strings == "text" else ImageRef(item, name)
    if not isinstance(item, dict):
        if strings == "text" and isinstance(item, (int, list)) and not isinstance(item, bool):
            raise InputError(f"{name}: token id input is not supported; send the text itself", name)
        raise InputError(f"{name}: expected a string or a content part object, got {type(item).__name__}", name)
    kind = item.get("type")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise InputError(f"{name}: a text part needs a string 'text'", name)
        return Text(checked_text(item["text"], name), name)
    if kind in ("image_url", "image"):
        value = item.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise InputError(f"{name}: an image_url part needs 'image_url': {{'url': 'data:image/...;base64,...'}}", name)
        return ImageRef(url, name)
    raise InputError(f"{name}: unknown content part type {kind!r} (expected 'text' or 'image_url')", name)


def parse_items(value, name: str, max_items: int, strings: str = "text") -> list[Text | ImageRef]:
    """A string, one content part, or a non-empty list of them -> parsed items (at most max_items)."""
    items = value if isinstance(value, list) else [value]
    if value is None or not items:
        raise InputError(f"{name}: give at least one input", name)
    if len(items) > max_items:
        raise InputError(f"{name}: {len(items)} inputs, more than the server's limit of {max_items} per request", name)
    if strings == "text" and all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise InputError(f"{name}: token id input is not supported; send the text itself", name)
    return [parse_item(item, f"{name}[{i}]" if isinstance(value, list) else name, strings)
            for i, item in enumerate(items)]


def image_bytes(ref: ImageRef, name: str, policy: FetchPolicy, client=None) -> bytes:
    """The encoded image an ImageRef points at: decoded from a data URL, or fetched (if allowed) with
    `client` (an `httpx.Client`; a new one by default)."""
    url = ref.url.strip()
    if url[:5].lower() == "data:":
        header, comma, payload = url[5:].partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise InputError(f"{name}: a data URL must be 'data:<mime>;base64,<data>'", name)
        # line breaks (MIME, the `base64` tool), the URL-safe alphabet and missing padding are still base64
        payload = "".join(payload.split()).translate(URL_SAFE)
        try:
            data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{name}: the data URL's payload is not valid base64", name) from None
        if not data:
            raise InputError(f"{name}: empty image data", name)
        return data
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as error:   # e.g. "Invalid IPv6 URL"
        raise InputError(f"{name}: not a valid URL ({error})", name) from None
    if scheme not in ("http", "https"):
        raise InputError(f"{name}: unsupported URL scheme {scheme or url[:16]!r}; send a base64 data URL", name)
    if not policy.allow_urls:
        raise InputError(f"{name}: remote image URLs are disabled on this server (start it with --allow-url-fetch); "
                         f"send a base64 data URL", name)
    import httpx

    # trust_env=False: an environment proxy would make the fetch, and the address checks, somewhere else
    with contextlib.nullcontext(client) if client is not None else httpx.Client(trust_env=False) as session:
        return _fetch(session, url, name, policy)


def _fetch(client, url: str, name: str, policy: FetchPolicy) -> bytes:
    """GET with a size limit and a timeout; every hop's address is checked, redirects are followed by hand."""
    import httpx

    for _ in range(MAX_REDIRECTS + 1):
        _check_address(url, name, policy)
        try:
            with client.stream("GET", url, follow_redirects=False, timeout=policy.timeout_s) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise InputError(f"{name}: fetching the image URL gave HTTP {response.status_code}", name)
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise InputError(f"{name}: the image at the URL is {declared} bytes, over the limit of "
                                     f"{policy.max_bytes}", name)
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > policy.max_bytes:
                        raise InputError(f"{name}: the image at the URL is over the limit of {policy.max_bytes} bytes", name)
                return bytes(data)
        except httpx.TimeoutException:
            raise InputError(f"{name}: fetching the image URL timed out after {policy.timeout_s:g} s", name) from None
        except httpx.HTTPError as error:
            raise InputError(f"{name}: fetching the image URL failed ({type(error).__name__})", name) from None
    raise InputError(f"{name}: more than {MAX_REDIRECTS} redirects", name)


def _check_address(url: str, name: str, policy: FetchPolicy) -> None:
    """Refuses a URL whose host resolves to a loopback, link-local, private or otherwise non-public address
    (unless --allow-private-urls). The check is made again on every redirect hop."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InputError(f"{name}: not an http(s) URL with a host", name)
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError):
        raise InputError(f"{name}: cannot resolve the image URL's host {parts.hostname!r}", name) from None
    if policy.allow_private:
        return
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise InputError(f"{name}: the image URL's host {parts.hostname!r} is a non-public address ({address}); "
                             f"refused", name)
