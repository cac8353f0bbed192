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
from dataclasses import dataclass, field
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
        raise InvalidInput(f"image URL host {host!r} does not resolve") from None


def check_url(url: str, *, allow_private: bool = False, resolver: Resolver = _system_resolver) -> str:
    """SSRF guard: http(s) only, and no private, loopback, link-local or reserved addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"image URL must be http or https, got {parts.scheme or 'no'} scheme")
    if not parts.hostname:
        raise InvalidInput("image URL has no host")
    if parts.username or parts.password:
        raise InvalidInput("image URL must not carry credentials")
    if allow_private:
        return url
    for address in resolver(parts.hostname):
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global or ip.is_multicast:
            raise InvalidInput(
                f"image URL host {parts.hostname!r} resolves to a non-public address {ip}; "
                "set EDIT_WORKER_ALLOW_PRIVATE_URLS=true to allow it"
            )
    return url


def load_image(
    source: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    allow_private_urls: bool = False,
    resolver: Resolver = _system_resolver,
) -> ImageInput:
    """Turn a producer's image argument (local path or http(s) URL) into a checked ImageInput: a
    URL as given, a file as its bytes (admission stores them in S3)."""
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
    return ImageInput(ref=f"file:{path.name}", data=data, content_type=mime)
