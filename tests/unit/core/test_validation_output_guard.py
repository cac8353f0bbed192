"""Specification of the output-URL guard (core/validation.output_url_guard): public addresses pass,
private ones only on a trusted host:port, and no address literal escapes by spelling."""

from __future__ import annotations

import pytest

from worker.core.validation import output_url_guard
from worker.errors import InvalidInput


def dns(table: dict[str, list[str]]):
    return lambda host: table[host]


GUARD = output_url_guard(
    ["http://127.0.0.1:8900", "cdn.internal.example", "10.0.0.9:9000"],
    resolver=dns(
        {"cdn.example.com": ["93.184.216.34"], "cdn.internal.example": ["10.0.0.8"], "evil.example": ["93.184.216.34", "10.0.0.1"]}
    ),
)


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example.com/o.png",
        "http://127.0.0.1:8900/outputs/x/0.png",
        "https://cdn.internal.example/o.png",
        "http://cdn.internal.example/o.png",
        "http://10.0.0.9:9000/o.png",
    ],
)
def test_public_or_trusted_urls_pass(url):
    GUARD(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8901/",  # the sandbox's host, another port
        "http://127.0.0.1/",
        "https://cdn.internal.example:8443/o.png",  # a trusted name without a port: default ports only
        "http://10.0.0.9:9001/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::1]/",
        "http://0.0.0.0/",
        "http://evil.example/",  # one of its addresses is private
        "ftp://cdn.example.com/o.png",
        "http://user:pw@cdn.example.com/o.png",
    ],
)
def test_private_untrusted_or_odd_urls_are_refused(url):
    with pytest.raises(InvalidInput):
        GUARD(url)
