"""Input checks run before anything is queued: prompt, size, seed, idempotency key, image file,
base64 or URL (SSRF guard), and `validate_request`, the one validation the CLI, the Python
producer and the HTTP API share.

Each refusal is an `InvalidInput` (a ValueError) with a one-line message naming the field.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import hashlib
import io
import ipaddress
import json
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from worker.errors import InvalidInput

if TYPE_CHECKING:  # pragma: no cover
    from worker.config import Settings

MAX_PROMPT_CHARS = 120
MAX_IDEMPOTENCY_KEY_CHARS = 255
MIN_SIDE, MAX_SIDE = 512, 2048
DEFAULT_SIZE = "1328*1328"
MIN_SEED, MAX_SEED = -1, 2_147_483_647
DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024
# An input image's pixel count is refused above this (8192 x 8192): a tiny PNG can claim
# 20000 x 20000 and make every later decode allocate gigabytes.
MAX_IMAGE_PIXELS = 8192 * 8192
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MAX_URL_CHARS = 4096
_ANY_SPACE = re.compile(r"\s")
# How long an image URL's host may take to resolve before the request is refused.
DEFAULT_RESOLVE_TIMEOUT = 3.0

# re.ASCII: `\d` would otherwise accept any Unicode digit ("١٠٢٤*١٠٢٤").
_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*\*\s*(\d{1,5})\s*$", re.ASCII)

Resolver = Callable[[str], list[str]]


# Unicode category Cc (C0, DEL, C1) except tab, newline and carriage return; a regex, not a loop
# over characters: the API's image field may be megabytes of base64.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _check_text(value: str, what: str) -> str:
    """Refuse what no database column, provider or log line should take: lone surrogates (not
    encodable as UTF-8), NUL and other control characters (PostgreSQL refuses NUL in text)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None
    found = _CONTROL.search(value)
    if found:
        raise InvalidInput(f"{what} must not contain control characters (found U+{ord(found.group()):04X})")
    return value


def validate_prompt(prompt: str | None) -> str:
    if prompt is None or not str(prompt).strip():
        raise InvalidInput("prompt is required")
    prompt = _check_text(str(prompt).strip(), "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"prompt is {len(prompt)} characters; the provider accepts at most {MAX_PROMPT_CHARS}")
    return prompt


def validate_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    key = str(key).strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidInput(f"idempotency key must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} characters")
    return _check_text(key, "idempotency key")


def validate_size(size: str | None) -> str:
    if size is None or size == "":
        return DEFAULT_SIZE
    match = _SIZE_RE.match(str(size))
    if not match:
        raise InvalidInput(f"size must look like W*H (e.g. {DEFAULT_SIZE}), got {str(size)[:40]!r}")
    width, height = int(match.group(1)), int(match.group(2))
    for name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidInput(f"size {name} {side} is out of range {MIN_SIDE}..{MAX_SIDE}")
    return f"{width}*{height}"


def validate_seed(seed: int | str | None) -> int:
    if seed is None or seed == "":
        return -1
    if isinstance(seed, bool):
        raise InvalidInput(f"seed must be an integer, got {seed!r}")
    if isinstance(seed, str) and len(seed) > 20:
        raise InvalidInput(f"seed must be an integer in {MIN_SEED}..{MAX_SEED}")
    try:
        value = int(seed)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise InvalidInput(f"seed must be an integer, got {str(seed)[:40]!r}") from None
    if isinstance(seed, float) and seed != value:
        raise InvalidInput(f"seed must be an integer, got {seed!r}")
    if not MIN_SEED <= value <= MAX_SEED:
        raise InvalidInput(f"seed {value} is out of range {MIN_SEED}..{MAX_SEED}")
    return value


@dataclass(frozen=True)
class ImageInput:
    """A validated input image: a public URL the provider fetches itself, or the image's bytes
    (a local file, inline base64), which admission stores in S3 — never in the job row."""

    ref: str  # what to show and audit: the URL, "file:<name>" or "base64:<mime>:sha256=…"
    # The URL, or a data: URI with base64 (the form the HTTP API builds); empty when `data` is set.
    payload: str = field(default="", repr=False)
    data: bytes | None = field(default=None, repr=False)
    content_type: str | None = None

    @property
    def url(self) -> str | None:
        """The http(s) URL the provider fetches itself, or None for an image given as bytes."""
        return None if self.data is not None or self.payload[:5].lower() == "data:" else (self.payload or None)

    def content(self) -> tuple[bytes, str]:
        """The image's bytes and MIME type (from `data`, or decoded from a data: URI payload)."""
        if self.data is not None:
            return self.data, self.content_type or "application/octet-stream"
        head, sep, encoded = self.payload.partition(",")
        if not sep or not head[:5].lower() == "data:" or ";base64" not in head.lower():
            raise ValueError(f"image {self.ref!r} carries no bytes (a URL input)")
        return base64.b64decode(encoded), head[5:].split(";", 1)[0] or "application/octet-stream"

    @cached_property
    def sha256(self) -> str:
        """The hex sha256 of the image's bytes (computed once): the name of its stored object."""
        return hashlib.sha256(self.content()[0]).hexdigest()


DEFAULT_TENANT = "default"
PRIORITIES = ("high", "normal", "low")
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def validate_tenant(name: str | None) -> str:
    """A tenant name: 1-64 of a-z 0-9 _ . - (lower case), starting with a letter or digit."""
    value = (name or "").strip()
    if not _TENANT_RE.fullmatch(value):
        raise InvalidInput("tenant must be 1-64 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit")
    return value


def validate_callback_url(url: str | None, *, allow_private: bool = False, resolver: Resolver | None = None) -> str | None:
    """A producer's callback URL: http(s), no credentials, not a private address (checked again
    at every delivery: DNS may change). None or empty: no callback."""
    if url is None or (isinstance(url, str) and not url.strip()):
        return None
    if not isinstance(url, str):
        raise InvalidInput("callback_url must be a string")
    if resolver is None:
        return check_url(url.strip(), allow_private=allow_private, what="callback URL")
    return check_url(url.strip(), allow_private=allow_private, what="callback URL", resolver=resolver)


def validate_priority(value: str | None) -> str:
    """high | normal | low (default normal)."""
    priority = (value or "normal").strip().lower()
    if priority not in PRIORITIES:
        raise InvalidInput(f"priority must be one of {', '.join(PRIORITIES)}")
    return priority


@dataclass(frozen=True)
class NewJob:
    """A validated request (see validate_request): nothing here is checked again."""

    image: ImageInput
    prompt: str
    size: str
    seed: int
    idempotency_key: str | None = None
    enable_base64_output: bool = False
    tenant: str = DEFAULT_TENANT
    priority: str = "normal"
    callback_url: str | None = None  # None: the tenant's default callback URL, if it has one

    def fingerprint(self) -> str:
        """What makes two requests "the same request" for an idempotency key: every field that
        changes the work (the image by its content digest, not its name)."""
        data = self.image.data if self.image.data is not None else self.image.payload.encode("utf-8", "surrogatepass")
        fields = {
            "image": hashlib.sha256(data).hexdigest(),
            "prompt": self.prompt,
            "size": self.size,
            "seed": self.seed,
            "priority": self.priority,
            "base64": self.enable_base64_output,
            "callback_url": self.callback_url,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def sniff_image(data: bytes, *, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> str:
    """The MIME type of a decodable PNG/JPEG/WebP of at most `max_pixels`, else InvalidInput.
    Decoding is the dearest check of a request: an image already accepted (the same bytes, by
    sha256) is not decoded again — a batch of jobs on one image decodes it once."""
    digest = hashlib.sha256(data).hexdigest()
    known = _accepted_images.get((digest, max_pixels))
    if known is not None:
        return known
    mime = _sniff_image(data, what=what, max_pixels=max_pixels)
    with _accepted_lock:
        if len(_accepted_images) >= _ACCEPTED_IMAGES_MAX:
            _accepted_images.pop(next(iter(_accepted_images)))
        _accepted_images[(digest, max_pixels)] = mime
    return mime


# sha256 of accepted image bytes -> their MIME type (refusals are not remembered: their message
# names the caller's `what`). Bounded, oldest dropped first.
_ACCEPTED_IMAGES_MAX = 4096
_accepted_images: dict[tuple[str, int], str] = {}
_accepted_lock = threading.Lock()


def _sniff_image(data: bytes, *, what: str, max_pixels: int) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            width, height = img.size
            if width * height > max_pixels:
                raise InvalidInput(f"{what} is {width}x{height} pixels; the limit is {max_pixels} pixels")
            img.verify()  # walks the whole file: truncated or corrupt data fails here
    except InvalidInput:
        raise
    except Image.DecompressionBombError:
        raise InvalidInput(f"{what} has too many pixels; the limit is {max_pixels} pixels") from None
    except Exception as exc:
        # Pillow's parsers answer hostile bytes with a zoo of exception types (OSError,
        # SyntaxError, struct.error, IndexError, EOFError, ...): all of them mean "not an image".
        raise InvalidInput(f"{what} is not a decodable image ({type(exc).__name__})") from None
    if fmt not in IMAGE_FORMATS:
        raise InvalidInput(f"{what} is {fmt}; accepted formats are PNG, JPEG and WebP")
    return IMAGE_FORMATS[fmt]


def _system_resolver(host: str) -> list[str]:
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})
    except (socket.gaierror, UnicodeError):
        raise InvalidInput(f"image URL host {host!r} does not resolve") from None


# getaddrinfo has no timeout of its own: it runs on a small pool of threads and the caller waits
# at most `resolve_timeout`. A stuck lookup keeps its thread until the resolver gives up, but the
# request answers in time; with every thread stuck, new lookups time out while queued. One pool
# per process (threads do not survive a fork).
_pool_lock = threading.Lock()
_pool: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None


def _resolver_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="resolve"))
        return _pool[1]


def _resolve(resolver: Resolver, host: str, timeout: float) -> list[str]:
    future = _resolver_pool().submit(resolver, host)
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise InvalidInput(f"URL host {host!r} did not resolve within {timeout:g}s") from None


def check_url(
    url: str,
    *,
    allow_private: bool = False,
    resolver: Resolver = _system_resolver,
    resolve_timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    what: str = "image URL",
) -> str:
    """SSRF guard: http(s) only, and no private, loopback, link-local or reserved addresses.
    Refusals never name the address a host resolved to (that would map the internal network)."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(f"{what} is {len(url)} characters; the limit is {MAX_URL_CHARS}")
    _check_text(url, what)
    if _ANY_SPACE.search(url):
        # urlsplit drops tabs and newlines inside a URL: the host checked here would not be the
        # host another parser (the provider's, a downloader's) reads from the same text.
        raise InvalidInput(f"{what} must not contain whitespace")
    try:
        parts = urlsplit(url)
        hostname, username, password = parts.hostname, parts.username, parts.password
        parts.port  # noqa: B018 -- raises ValueError for a port out of range or not a number
    except ValueError:
        raise InvalidInput(f"{what} is malformed") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"{what} must be http or https, got {parts.scheme[:20] or 'no'} scheme")
    if not hostname:
        raise InvalidInput(f"{what} has no host")
    if username or password:
        raise InvalidInput(f"{what} must not carry credentials")
    if allow_private:
        return url
    _refuse_private(hostname, resolver, what, "; set EDIT_WORKER_ALLOW_PRIVATE_URLS=true to allow it", resolve_timeout=resolve_timeout)
    return url


def _refuse_private(host: str, resolver: Resolver, what: str, hint: str = "", *, resolve_timeout: float = DEFAULT_RESOLVE_TIMEOUT) -> None:
    """Refuse a host that is, or resolves to, a private, loopback, link-local, reserved or multicast
    address. The message never names the address (that would map the internal network)."""
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]  # an address literal: no lookup
    except ValueError:
        addresses = []
        for address in _resolve(resolver, host, resolve_timeout):
            try:
                addresses.append(ipaddress.ip_address(str(address).split("%", 1)[0]))
            except ValueError:
                raise InvalidInput(f"{what} host {host!r} does not resolve to an IP address") from None
    for ip in addresses:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
        if not ip.is_global or ip.is_multicast:
            raise InvalidInput(f"{what} host {host!r} resolves to a private address{hint}")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _trusted_origin(entry: str) -> tuple[str, int | None] | None:
    """("host", port) from "https://host:port/...", "host:port" or "host" (port None: the
    scheme's default port)."""
    parts = urlsplit(entry if "://" in entry else f"//{entry}")
    if not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    if port is None and parts.scheme in _DEFAULT_PORTS:
        port = _DEFAULT_PORTS[parts.scheme]
    return parts.hostname.lower(), port


def output_url_guard(trusted: list[str], *, resolver: Resolver = _system_resolver) -> Callable[[str], None]:
    """The guard for every hop of an output download (EDIT_WORKER_ALLOW_PRIVATE_URLS does not
    apply): http(s) only, no credentials in the URL, and a public address unless the URL's
    host:port is one the operator trusts (`trusted`: WAVESPEED_BASE_URL and
    EDIT_WORKER_OUTPUT_HOSTS). Raises InvalidInput (a ValueError) to refuse."""
    origins = {origin for origin in map(_trusted_origin, trusted) if origin is not None}

    def guard(url: str) -> None:
        parts = urlsplit(url)
        what = "output URL"
        if parts.scheme not in _DEFAULT_PORTS:
            raise InvalidInput(f"{what} must be http or https, got {parts.scheme or 'no'} scheme")
        if not parts.hostname:
            raise InvalidInput(f"{what} has no host")
        if parts.username or parts.password:
            raise InvalidInput(f"{what} must not carry credentials")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise InvalidInput(f"{what} has an invalid port") from None
        host = parts.hostname.lower()
        if (host, port) in origins or ((host, None) in origins and port == _DEFAULT_PORTS[parts.scheme]):
            return
        _refuse_private(host, resolver, what)

    return guard


def load_image(
    source: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    allow_private_urls: bool = False,
    resolver: Resolver = _system_resolver,
) -> ImageInput:
    """Turn a producer's image argument (local path or http(s) URL) into a checked ImageInput: a
    URL as given, a file as its bytes (admission stores them in S3)."""
    text = _check_text(str(source).strip(), "image")
    if not text:
        raise InvalidInput("image is required")
    if "://" in text:
        url = check_url(text, allow_private=allow_private_urls, resolver=resolver)
        return ImageInput(ref=url, payload=url)
    path = Path(text).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, an embedded NUL
        is_file = False
    if not is_file:
        raise InvalidInput(f"image file {text[:200]!r} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidInput(f"image file is {size} bytes; the limit is {max_bytes} bytes")
    if size == 0:
        raise InvalidInput("image file is empty")
    data = path.read_bytes()
    mime = sniff_image(data, what=f"image file {path.name!r}")
    return ImageInput(ref=f"file:{path.name}", data=data, content_type=mime)


# --- images as a remote caller sends them (the HTTP API) --------------------------------------

_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.IGNORECASE | re.DOTALL)
_WHITESPACE = re.compile(r"\s+")


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", "\\")) or value.lower().startswith("file:") or bool(re.match(r"^[A-Za-z]:[\\/]", value))


def _decode_base64_image(encoded: str, *, max_bytes: int, what: str) -> tuple[bytes, str]:
    encoded = _WHITESPACE.sub("", encoded)
    if not encoded:
        raise InvalidInput(f"{what} is empty")
    # Refuse an oversized payload before decoding it (base64 carries 3 bytes per 4 characters).
    if len(encoded) // 4 * 3 > max_bytes + 3:
        raise InvalidInput(f"{what} is about {len(encoded) // 4 * 3} bytes; the limit is {max_bytes} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64") from None
    if not data:
        raise InvalidInput(f"{what} is empty")
    if len(data) > max_bytes:
        raise InvalidInput(f"{what} is {len(data)} bytes; the limit is {max_bytes} bytes")
    return data, sniff_image(data, what=what)


def load_remote_image(
    value: str,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    allow_private_urls: bool = False,
    resolver: Resolver = _system_resolver,
) -> ImageInput:
    """An image as a remote caller may send it: an http(s) URL (SSRF-guarded), a
    `data:image/…;base64,` URI or bare base64 of a PNG/JPEG/WebP. Never a server path: unlike the
    CLI and the Python API, a remote caller must not make us read (or probe for) files here."""
    text_value = _check_text(str(value).strip(), "image")
    if not text_value:
        raise InvalidInput("image is required")
    if text_value[:5].lower() == "data:":
        match = _DATA_URI.match(text_value)
        params = [p.strip().lower() for p in (match.group("params") if match else "").split(";") if p.strip()]
        if not match or not match.group("mime").lower().startswith("image/") or "base64" not in params:
            raise InvalidInput("image data URI must look like data:image/<type>;base64,<data>")
        data, mime = _decode_base64_image(match.group("data"), max_bytes=max_bytes, what="image data")
    elif "://" in text_value:
        url = check_url(text_value, allow_private=allow_private_urls, resolver=resolver)
        return ImageInput(ref=url, payload=url)
    else:
        try:
            data, mime = _decode_base64_image(text_value, max_bytes=max_bytes, what="image data")
        except InvalidInput:
            if _looks_like_path(text_value):
                raise InvalidInput(
                    "local file paths are not accepted over HTTP; send the image as base64 "
                    "(or a data:image/...;base64 URI) or as an http(s) URL"
                ) from None
            raise
    digest = hashlib.sha256(data).hexdigest()[:16]
    return ImageInput(ref=f"base64:{mime}:sha256={digest}", data=data, content_type=mime)


# --- the one request validation ---------------------------------------------------------------


def validate_request(
    *,
    image: str,
    prompt: str,
    size: str | None = None,
    seed: int | str | None = None,
    idempotency_key: str | None = None,
    enable_base64_output: bool | None = None,
    tenant: str = DEFAULT_TENANT,
    priority: str | None = None,
    callback_url: str | None = None,
    settings: Settings,
    remote: bool = False,
    resolver: Resolver | None = None,
) -> NewJob:
    """Every check of a job request, before anything is written; raises InvalidInput.

    `remote=True` applies the HTTP API's image rules (base64 or URL, never a server path);
    otherwise the producer's (a local file or a URL). `resolver`: DNS by default (tests inject one)."""
    if not isinstance(image, (str, Path)):
        raise InvalidInput("image must be a string")
    if not isinstance(tenant, str) or (priority is not None and not isinstance(priority, str)):
        raise InvalidInput("tenant and priority must be strings")
    prompt = validate_prompt(prompt)
    size = validate_size(size)
    seed = validate_seed(seed)
    key = validate_idempotency_key(idempotency_key)
    extra = {"resolver": resolver} if resolver is not None else {}
    loader = load_remote_image if remote else load_image
    image_input = loader(image, max_bytes=settings.max_image_bytes, allow_private_urls=settings.allow_private_urls, **extra)
    base64_output = settings.base64_output if enable_base64_output is None else bool(enable_base64_output)
    return NewJob(
        image=image_input,
        prompt=prompt,
        size=size,
        seed=seed,
        idempotency_key=key,
        enable_base64_output=base64_output,
        tenant=validate_tenant(tenant),
        priority=validate_priority(priority),
        callback_url=validate_callback_url(callback_url, allow_private=settings.allow_private_urls, **extra),
    )
