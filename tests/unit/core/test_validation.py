"""Specification of input validation: prompt, size, seed, image files and the URL SSRF guard.
Every refusal is an InvalidInput (a ValueError) whose message names the field."""

from __future__ import annotations

import base64
import time

import pytest

from worker.core.validation import (
    DEFAULT_SIZE,
    ImageInput,
    check_url,
    load_image,
    sniff_image,
    validate_idempotency_key,
    validate_prompt,
    validate_request,
    validate_seed,
    validate_size,
)
from worker.errors import InvalidInput


def public(_host: str) -> list[str]:
    return ["93.184.216.34"]


def resolver_for(mapping: dict[str, list[str]]):
    def resolve(host: str) -> list[str]:
        return mapping[host]

    return resolve


# --- prompt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", None])
def test_an_empty_prompt_is_refused(prompt):
    with pytest.raises(InvalidInput, match="prompt is required"):
        validate_prompt(prompt)


def test_a_prompt_of_121_characters_is_refused_with_its_length():
    with pytest.raises(InvalidInput, match=r"prompt is 121 characters.*at most 120"):
        validate_prompt("a" * 121)


def test_a_prompt_of_120_characters_is_accepted():
    assert validate_prompt("a" * 120) == "a" * 120


def test_a_chinese_prompt_is_counted_in_characters_not_bytes():
    prompt = "把天空变成紫色" * 17 + "紫"  # 120 characters, 360 UTF-8 bytes
    assert len(prompt) == 120
    assert validate_prompt(prompt) == prompt
    with pytest.raises(InvalidInput):
        validate_prompt(prompt + "色")


def test_surrounding_whitespace_is_trimmed_before_counting():
    assert validate_prompt("  " + "a" * 120 + "  ") == "a" * 120


@pytest.mark.parametrize("prompt", ["a\x00b", "make it \ud800 purple", "bell\x07", "esc\x1b[31m"])
def test_a_prompt_with_nul_control_characters_or_lone_surrogates_is_refused(prompt):
    # PostgreSQL refuses NUL in text and no database encodes a lone surrogate: both must be a
    # 4xx refusal here, not a database error (which the API answered as 503 "unavailable").
    with pytest.raises(InvalidInput, match="prompt"):
        validate_prompt(prompt)


def test_a_prompt_may_span_lines():
    assert validate_prompt("line one\nline two\tend") == "line one\nline two\tend"


@pytest.mark.parametrize("key", ["order\x00-1", "\udfff", "k\x7f"])
def test_an_idempotency_key_with_nul_control_characters_or_lone_surrogates_is_refused(key):
    with pytest.raises(InvalidInput, match="idempotency key"):
        validate_idempotency_key(key)


# --- size -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [None, ""])
def test_a_missing_size_defaults_to_1328_square(size):
    assert validate_size(size) == DEFAULT_SIZE == "1328*1328"


@pytest.mark.parametrize(
    "size, expected", [("512*512", "512*512"), ("2048*2048", "2048*2048"), ("512*2048", "512*2048"), (" 1024 * 768 ", "1024*768")]
)
def test_sizes_within_512_to_2048_are_accepted_and_normalised(size, expected):
    assert validate_size(size) == expected


@pytest.mark.parametrize(
    "size, fragment",
    [("511*1024", "width 511"), ("1024*511", "height 511"), ("2049*1024", "width 2049"), ("1024*2049", "height 2049"), ("0*0", "width 0")],
)
def test_sizes_outside_the_range_are_refused_naming_the_side(size, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        validate_size(size)


@pytest.mark.parametrize("size", ["١٠٢٤*١٠٢٤", "abc", "1024x1024", "1024", "1024*", "*1024", "-512*512", "1024*1024*1", "1e3*1e3"])
def test_malformed_sizes_are_refused(size):
    with pytest.raises(InvalidInput, match="W\\*H"):
        validate_size(size)


# --- seed -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, expected", [(None, -1), ("", -1), (-1, -1), (0, 0), (2_147_483_647, 2_147_483_647), ("42", 42), (7.0, 7)])
def test_seeds_in_range_are_accepted(seed, expected):
    assert validate_seed(seed) == expected


@pytest.mark.parametrize("seed", [-2, 2_147_483_648, "-5"])
def test_seeds_out_of_range_are_refused(seed):
    with pytest.raises(InvalidInput, match="out of range"):
        validate_seed(seed)


@pytest.mark.parametrize("seed", ["abc", "1.5", 1.5, [1], "0x10", float("inf"), float("nan"), True, "9" * 5000])
def test_non_integer_seeds_are_refused(seed):
    with pytest.raises(InvalidInput, match="seed must be an integer"):
        validate_seed(seed)


# --- image files ----------------------------------------------------------------------------


def test_a_missing_image_file_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_a_directory_is_not_an_image_file(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        load_image(tmp_path)


def test_an_empty_image_argument_is_refused():
    with pytest.raises(InvalidInput, match="image is required"):
        load_image("  ")


def test_an_empty_image_file_is_refused(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty"):
        load_image(path)


def test_bytes_that_are_not_an_image_are_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"this is a text file pretending to be a PNG\n" * 10)
    with pytest.raises(InvalidInput, match="not a decodable image"):
        load_image(path)


def test_a_truncated_png_is_refused(tmp_path, make_image):
    data = make_image("PNG", size=(64, 64))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInput, match="not a decodable image"):
        load_image(path)


def test_a_png_with_a_corrupted_chunk_is_refused(make_image):
    data = bytearray(make_image("PNG", size=(32, 32)))
    data[40] ^= 0xFF  # inside IHDR/IDAT: the CRC no longer matches
    with pytest.raises(InvalidInput):
        sniff_image(bytes(data))


def test_a_png_claiming_20000_by_20000_pixels_is_refused_as_input_not_a_crash(decompression_bomb):
    # Pillow raises DecompressionBombError (not an OSError) for it: the API answered 500.
    with pytest.raises(InvalidInput, match="pixels"):
        sniff_image(decompression_bomb)


def test_a_png_over_the_pixel_limit_but_under_pillows_is_refused(make_image):
    with pytest.raises(InvalidInput, match=r"64x64 pixels; the limit is 4095 pixels"):
        sniff_image(make_image("PNG", size=(64, 64)), max_pixels=4095)


def test_a_gif_is_refused_naming_the_accepted_formats(tmp_path, make_image):
    path = tmp_path / "anim.gif"
    path.write_bytes(make_image("GIF"))
    with pytest.raises(InvalidInput, match="GIF; accepted formats are PNG, JPEG and WebP"):
        load_image(path)


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_png_jpeg_and_webp_files_are_read_as_their_bytes_and_type_for_admission_to_store(tmp_path, make_image, fmt, mime):
    data = make_image(fmt)
    path = tmp_path / f"in.{fmt.lower()}"
    path.write_bytes(data)
    image = load_image(path)
    assert image.ref == f"file:{path.name}"
    assert image.content() == (data, mime)
    assert image.url is None and image.payload == ""  # no base64 copy to end up in a row
    assert repr(data) not in repr(image)  # the bytes never show in a repr or a log line


def test_the_type_comes_from_the_content_not_the_file_name(tmp_path, make_image):
    path = tmp_path / "really-a-jpeg.png"
    path.write_bytes(make_image("JPEG"))
    assert load_image(path).content_type == "image/jpeg"


def test_an_image_input_given_as_a_data_uri_yields_its_bytes(make_image):
    data = make_image("PNG")
    image = ImageInput(ref="base64:image/png", payload="data:image/png;base64," + base64.b64encode(data).decode())
    assert image.url is None
    assert image.content() == (data, "image/png")
    with pytest.raises(ValueError):
        ImageInput(ref="u", payload="https://cdn.example.com/cat.png").content()


def test_an_image_over_max_bytes_is_refused_with_the_limit(tmp_path, make_image):
    data = make_image("PNG", size=(64, 64))
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(InvalidInput, match=f"{len(data)} bytes; the limit is {len(data) - 1} bytes"):
        load_image(path, max_bytes=len(data) - 1)
    assert load_image(path, max_bytes=len(data)).ref == "file:big.png"


# --- URLs (SSRF guard) ----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://example.com/cat.png", "file:///etc/passwd", "gopher://example.com/", "data:image/png;base64,AAAA"])
def test_only_http_and_https_urls_are_accepted(url):
    with pytest.raises(InvalidInput):
        check_url(url, resolver=public)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/cat.png",
        "http://10.0.0.1/cat.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/cat.png",
        "http://192.168.1.20:8080/cat.png",
        "http://172.16.0.5/cat.png",
        "http://0.0.0.0/cat.png",
        "http://[fe80::1]/cat.png",
        "http://[fd00::1]/cat.png",
    ],
)
def test_private_loopback_and_link_local_addresses_are_refused(url):
    with pytest.raises(InvalidInput, match="private address"):
        check_url(url)  # IP literals resolve to themselves without DNS


@pytest.mark.parametrize("url", ["http://127.0.0.1/cat.png", "http://10.0.0.1/cat.png", "http://169.254.169.254/x", "http://[::1]/x"])
def test_private_addresses_are_accepted_when_allowed(url):
    assert check_url(url, allow_private=True) == url


def test_a_hostname_resolving_to_a_private_address_is_refused_without_naming_the_address():
    # The caller learns the host is refused, not where it points: echoing resolved addresses
    # would let anyone map the internal network through the API.
    resolve = resolver_for({"images.internal.example": ["10.20.30.40"]})
    with pytest.raises(InvalidInput, match=r"images.internal.example.*resolves to a private address") as refused:
        check_url("https://images.internal.example/cat.png", resolver=resolve)
    assert "10.20.30.40" not in str(refused.value)


def test_a_host_that_resolves_slowly_is_refused_within_the_timeout():
    def stuck(_host: str) -> list[str]:
        time.sleep(3)
        return ["93.184.216.34"]

    started = time.monotonic()
    with pytest.raises(InvalidInput, match=r"did not resolve within 0\.2s"):
        check_url("https://slow.example/cat.png", resolver=stuck, resolve_timeout=0.2)
    assert time.monotonic() - started < 2


def test_a_resolver_answer_that_is_not_an_address_is_refused():
    with pytest.raises(InvalidInput, match="does not resolve to an IP address"):
        check_url("https://odd.example/cat.png", resolver=lambda _host: ["not-an-ip"])


@pytest.mark.parametrize("url", ["http://127.0.0.1\n.example.com/x.png", "http://exa\tmple.com/x.png", "http://example.com/a b.png"])
def test_a_url_with_whitespace_inside_is_refused(url):
    # urlsplit drops the newline: it would check 127.0.0.1.example.com, not what another parser reads.
    with pytest.raises(InvalidInput, match="whitespace"):
        check_url(url, resolver=public)


def test_checking_a_large_base64_image_field_for_control_characters_is_fast(settings):
    from worker.core.validation import load_remote_image

    started = time.monotonic()
    with pytest.raises(InvalidInput):
        load_remote_image("A" * 12_000_000 + "\x00", max_bytes=settings.max_image_bytes)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("url", ["http://example.com:99999/x.png", "http://[::1/x.png", "http://example.com:port/x.png"])
def test_a_malformed_url_is_refused(url):
    with pytest.raises(InvalidInput, match="malformed"):
        check_url(url, resolver=public)


def test_a_hostname_is_refused_if_any_of_its_addresses_is_private():
    resolve = resolver_for({"mixed.example": ["93.184.216.34", "127.0.0.1"]})
    with pytest.raises(InvalidInput):
        check_url("https://mixed.example/cat.png", resolver=resolve)


def test_a_public_hostname_is_accepted():
    resolve = resolver_for({"cdn.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]})
    url = "https://cdn.example.com/cat.png?x=1"
    assert check_url(url, resolver=resolve) == url


def test_a_public_ip_literal_is_accepted():
    assert check_url("http://93.184.216.34/cat.png") == "http://93.184.216.34/cat.png"


def test_a_url_with_credentials_is_refused():
    with pytest.raises(InvalidInput, match="credentials"):
        check_url("https://user:pass@cdn.example.com/cat.png", resolver=public)


def test_a_url_without_a_host_is_refused():
    with pytest.raises(InvalidInput, match="no host"):
        check_url("https:///cat.png", resolver=public)


def test_load_image_passes_a_checked_url_through_unchanged():
    image = load_image("https://cdn.example.com/cat.png", resolver=public)
    assert image.ref == image.payload == image.url == "https://cdn.example.com/cat.png"
    assert image.data is None


def test_load_image_applies_the_ssrf_guard_to_urls():
    with pytest.raises(InvalidInput):
        load_image("http://169.254.169.254/latest/meta-data/")
    assert load_image("http://169.254.169.254/x", allow_private_urls=True).payload == "http://169.254.169.254/x"


# --- the one request validation (CLI, Python producer, HTTP API) ----------------------------


@pytest.mark.parametrize("remote", [False, True])
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"prompt": "a\x00b"}, "prompt"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"idempotency_key": "k\x00"}, "idempotency key"),
        ({"seed": float("inf")}, "seed"),
        ({"image": "https://images.example.com/\x00.png"}, "image"),
        ({"image": 12}, "image"),
    ],
)
def test_validate_request_refuses_hostile_fields_on_every_path(settings, remote, overrides, field):
    request = {"image": "https://images.example.com/cat.png", "prompt": "ok", **overrides}
    with pytest.raises(InvalidInput, match=field):
        validate_request(settings=settings, remote=remote, resolver=public, **request)


def test_validate_request_applies_the_remote_image_rules_only_when_asked(settings, png_file):
    assert validate_request(image=str(png_file), prompt="ok", settings=settings).image.ref == f"file:{png_file.name}"
    with pytest.raises(InvalidInput, match="local file paths are not accepted"):
        validate_request(image=str(png_file), prompt="ok", settings=settings, remote=True)


def test_the_python_producer_shares_the_validation(settings, png_file):
    from worker import producer

    with pytest.raises(InvalidInput, match="prompt"):
        producer.validate_request(image=str(png_file), prompt="make it\x00 red", settings=settings)


def test_an_overlong_url_is_refused_before_it_is_parsed():
    with pytest.raises(InvalidInput, match="the limit is 4096"):
        check_url("https://images.example.com/" + "a" * 5000, resolver=public)
