"""The HTTP API against its own OpenAPI document, fuzzed in-process (ASGI, no network) with
schemathesis: whatever a generated request holds — valid, invalid or hostile — the answer is
never a 5xx, and every answer matches the schema the route declares (errors included).

Bounded to a few seconds per route (FUZZ_EXAMPLES per operation and generation mode); set
EDIT_WORKER_FUZZ_EXAMPLES for a longer run.
"""

from __future__ import annotations

import ipaddress
import os
import warnings
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from pydantic import SecretStr
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance

from worker.api import create_app
from worker.errors import InvalidInput

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: F401 -- schemathesis' ASGI transport needs it importable

FUZZ_EXAMPLES = int(os.environ.get("EDIT_WORKER_FUZZ_EXAMPLES", "40"))
STATS: Counter[str] = Counter()


def fuzz_resolver(host: str) -> list[str]:
    """No DNS while fuzzing: IP literals are themselves, `*.example.com` is public, the rest does not resolve."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    if host.endswith(".example.com"):
        return ["93.184.216.34"]
    raise InvalidInput(f"image URL host {host[:40]!r} does not resolve")


@pytest.fixture
def api_schema(settings, deps, publisher):
    app_settings = settings.model_copy(update={"webhook_secret": SecretStr("whsec_fuzz-not-a-secret")})
    app = create_app(app_settings, deps_factory=lambda: deps, publisher=publisher, url_resolver=fuzz_resolver)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture
def admin_key(sessions) -> str:
    from worker.core import tenants

    return tenants.create_key(sessions, "default", admin=True).key.get_secret_value()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\nfuzz: {STATS['requests']} requests generated, {STATS['5xx']} answered 5xx, statuses {dict(sorted(STATS.items()))}")


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_answers_5xx_and_every_answer_matches_its_schema(case, admin_key):
    # With an admin key, so the generated requests reach every route's own checks (without one
    # nearly all would stop at the 401); a few go without it, to fuzz the refusals too.
    if STATS["requests"] % 8 != 7:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {admin_key}"}
    response = case.call()
    STATS["requests"] += 1
    STATS[str(response.status_code)] += 1
    if response.status_code >= 500:
        STATS["5xx"] += 1
    case.validate_response(
        response, checks=[not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
    )
