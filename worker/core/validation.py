"""Input checks run before anything is queued: prompt, size, seed, image file or URL (SSRF guard).

Each refusal is an `InvalidInput` (a ValueError) with a one-line message naming the field.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from worker.errors import InvalidInput

MAX_PROMPT_CHARS = 120
MIN_SIDE, MAX_SIDE = 512, 2048
DEFAULT_SIZE = "1328*1328"
MIN_SEED, MAX_SEED = -1, 2_147_483_647
DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*\*\s*(\d{1,5})\s*$")

Resolver = Callable[[str], list[str]]


def validate_prompt(prompt: str | None) -> str:
    if prompt is None or not str(prompt).strip():
        raise InvalidInput("prompt is required")
    prompt = str(prompt).strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"prompt is {len(prompt)} characters; the provider accepts at most {MAX_PROMPT_CHARS}")
    return prompt


def validate_size(size: str | None) -> str:
    if size is None or size == "":
        return DEFAULT_SIZE
    match = _SIZE_RE.match(str(size))
    if not match:
        raise InvalidInput(f"size must look like W*H (e.g. {DEFAULT_SIZE}), got {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    for name, side in (("width", width), ("height", height)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidInput(f"size {name} {side} is out of range {MIN_SIDE}..{MAX_SIDE}")
    return f"{width}*{height}"


def validate_seed(seed: int | str | None) -> int:
    if seed is None or seed == "":
        return -1
    try:
        value = int(seed)
    except (TypeError, ValueError):
        raise InvalidInput(f"seed must be an integer, got {seed!r}") from None
    if isinstance(seed, float) and seed != value:
        raise InvalidInput(f"seed must be an integer, got {seed!r}")
    if not MIN_SEED <= value <= MAX_SEED:
        raise InvalidInput(f"seed {value} is out of range {MIN_SEED}..{MAX_SEED}")
    return value


@dataclass(frozen=True)
class ImageInput:
    ref: str  # what to show and audit: the URL, or "file:<name>"
    payload: str  # what the provider receives: the URL, or a data: URI with base64


def sniff_image(data: bytes, *, what: str = "image") -> str:
    """The MIME type of a decodable PNG/JPEG/WebP, else InvalidInput."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()  # walks the whole file: truncated or corrupt data fails here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"{what} is not a decodable image ({type(exc).__name__})") from None
    if fmt not in IMAGE_FORMATS:
        raise InvalidInput(f"{what} is {fmt}; accepted formats are PNG, JPEG and WebP")
    return IMAGE_FORMATS[fmt]


def _system_resolver(host: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except socket.gaierror:
        raise InvalidInput(f"URL host {host!r} does not resolve") from None


def check_url(url: str, *, allow_private: bool = False, resolver: Resolver = _system_resolver, what: str = "image URL") -> str:
    """SSRF guard: http(s) only, and no private, loopback, link-local or reserved addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"{what} must be http or https, got {parts.scheme or 'no'} scheme")
    if not parts.hostname:
        raise InvalidInput(f"{what} has no host")
    if parts.username or parts.password:
        raise InvalidInput(f"{what} must not carry credentials")
    if allow_private:
        return url
    _refuse_private(parts.hostname, resolver, what, "; set EDIT_WORKER_ALLOW_PRIVATE_URLS=true to allow it")
    return url


def _refuse_private(host: str, resolver: Resolver, what: str, hint: str = "") -> None:
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]  # an address literal: no lookup
    except ValueError:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(host)]
    for ip in addresses:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
        if not ip.is_global or ip.is_multicast:
            raise InvalidInput(f"{what} host {host!r} resolves to a non-public address {ip}{hint}")


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
    """Turn a producer's image argument (local path or http(s) URL) into what the provider receives."""
    text = str(source).strip()
    if not text:
        raise InvalidInput("image is required")
    if "://" in text:
        url = check_url(text, allow_private=allow_private_urls, resolver=resolver)
        return ImageInput(ref=url, payload=url)
    path = Path(text).expanduser()
    if not path.is_file():
        raise InvalidInput(f"image file {text!r} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidInput(f"image file is {size} bytes; the limit is {max_bytes} bytes")
    if size == 0:
        raise InvalidInput("image file is empty")
    data = path.read_bytes()
    mime = sniff_image(data, what=f"image file {path.name!r}")
    return ImageInput(ref=f"file:{path.name}", payload=f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}")
