"""The settings reference, docs/configuration.md, generated from `Settings` (worker/config.py):
every setting's environment name, type, default and description, grouped by what it tunes.

    python -m worker.devtools.settings_doc > docs/configuration.md     # regenerate
    python -m worker.devtools.settings_doc --check docs/configuration.md  # exit 1 when stale
"""

from __future__ import annotations

import argparse
import enum
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from worker.config import Settings

# Sections of the reference, in order: a title, one line on what they tune, and their fields (by
# field name, in this order). A setting listed nowhere still appears, under "Other settings", so a
# new setting is documented even before someone files it here.
GROUPS: list[tuple[str, str, list[str]]] = [
    (
        "Tenants, quotas and result links",
        "Per-tenant defaults (a tenant's own values from `edit-worker tenants set` win), idempotency and cost.",
        [
            "tenant_rate_per_minute",
            "tenant_max_in_flight",
            "tenant_daily_budget",
            "idempotency_ttl_seconds",
            "cost_per_submission",
            "result_link_seconds",
        ],
    ),
    (
        "Completion callbacks",
        "Signed POSTs of the job JSON to a job's `callback_url` on every terminal state, retried durably.",
        [
            "callback_secret",
            "callback_timeout",
            "callback_retry_seconds",
            "callback_backoff_base",
            "callback_backoff_max",
            "callback_batch_size",
            "callback_threads",
        ],
    ),
    (
        "Input images",
        "Where admitted input images live (S3, at admission) and how the provider gets them.",
        ["input_delivery", "input_url_expiry_seconds"],
    ),
    (
        "HTTP API hardening",
        "Limits `edit-worker api` applies to what callers and the provider send it.",
        ["allow_http_provider", "webhook_max_bytes"],
    ),
    (
        "Metrics",
        "What `/metrics` shows and how the worker processes feed it (docs/metrics.md).",
        ["metrics_cache_seconds", "metrics_tenants", "metrics_flush_seconds"],
    ),
    (
        "Tracing and logs",
        "One OpenTelemetry trace per job (off unless an OTLP endpoint is set) and the log line format.",
        ["otlp_endpoint", "service_name", "log_format"],
    ),
    (
        "Output downloads",
        "What a copy of the provider's outputs may fetch and how much.",
        ["output_hosts", "max_output_bytes", "download_timeout"],
    ),
    (
        "Provider",
        "WaveSpeed itself, and its webhooks.",
        ["wavespeed_api_key", "wavespeed_base_url", "webhook_secret", "webhook_url", "http_connect_timeout", "http_timeout"],
    ),
    (
        "Database, broker and storage",
        "Where jobs, messages and outputs live.",
        [
            "database_url",
            "celery_broker_url",
            "redis_url",
            "s3_endpoint_url",
            "s3_bucket",
            "s3_prefix",
            "aws_access_key_id",
            "aws_secret_access_key",
            "aws_region",
        ],
    ),
    (
        "Provider limits and the circuit breaker",
        "Your account tier's limits, shared by every worker through Redis, and when the fleet stops calling.",
        [
            "rate_limit_per_minute",
            "max_concurrency",
            "submit_pace_per_second",
            "breaker_open_seconds",
            "outage_failure_threshold",
            "outage_failure_window",
            "outage_open_seconds",
        ],
    ),
    (
        "Submitting",
        "How queued jobs go out to the provider.",
        [
            "submit_mode",
            "submit_batch_size",
            "submit_threads",
            "submit_passes_per_node",
            "submit_lease_seconds",
            "submit_backpressure_seconds",
            "adaptive_pacing",
            "adaptive_pace_floor",
            "batch_pass_seconds",
        ],
    ),
    (
        "Polling and copying outputs",
        "How running predictions are looked up and their outputs copied to S3.",
        [
            "poll_mode",
            "first_poll_delay",
            "adaptive_first_poll",
            "first_poll_max",
            "poll_interval",
            "poll_jitter",
            "poll_batch_size",
            "poll_threads",
            "poll_passes_per_node",
            "poll_lease_seconds",
            "upload_inline",
            "base64_output",
        ],
    ),
    (
        "Retries, deadlines and recovery",
        "Backoff, the per-job deadline, and what beat's reconciler does.",
        [
            "job_deadline_seconds",
            "backoff_base",
            "backoff_max",
            "stuck_after_seconds",
            "sweep_interval",
            "ambiguous_skew_seconds",
            "ambiguous_list_grace_seconds",
        ],
    ),
    ("Inputs", "What a producer may submit.", ["max_image_bytes", "batch_max_bytes", "allow_private_urls"]),
]
OTHER = ("Other settings", "Settings not filed under a section above yet.")

HEADER = """\
# Configuration

<!-- Generated from worker/config.py by `python -m worker.devtools.settings_doc > docs/configuration.md`.
     Do not edit by hand: change the Field's description in worker/config.py and regenerate. -->

Every setting is read from the environment, or from a `.env` file in the working directory (the
environment wins; `.env.example` lists them all). An empty value counts as unset. Names without the
`EDIT_WORKER_` prefix are read as they are (those in DESIGN.md §4 are a stable contract); the
`EDIT_WORKER_*` knobs tune the worker.
Secrets (marked *secret*) never appear in logs, job rows, reprs or error messages.
"""


@dataclass(frozen=True)
class SettingDoc:
    field: str
    env: list[str]
    type: str
    default: str
    description: str


def env_names(info: FieldInfo) -> list[str]:
    """The environment variable(s) a field is read from (its validation aliases, upper-cased, once each)."""
    alias = info.validation_alias
    choices = getattr(alias, "choices", None) or ([alias] if alias else [])
    names: list[str] = []
    for choice in choices:
        name = str(choice).upper()
        if name not in names:
            names.append(name)
    return names


def _type_name(annotation: object) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        names = [_type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(names) + (", optional" if type(None) in args else "")
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{value}`" for value in args)
    if annotation is SecretStr:
        return "string, *secret*"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(f"`{member.value}`" for member in annotation)
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )  # type: ignore[call-overload]


def _bounds(info: FieldInfo) -> str:
    words = []
    for item in info.metadata:
        for kind, attribute, symbol in ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<")):
            if isinstance(item, kind):
                words.append(f"{symbol} {_number(getattr(item, attribute))}")
    return ", ".join(words)


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{_number(value)}`" if value != "" else '`""`'


def setting_docs(settings_class: type[Settings] = Settings) -> list[SettingDoc]:
    docs = []
    for name, info in settings_class.model_fields.items():
        kind = _type_name(info.annotation)
        bounds = _bounds(info)
        docs.append(
            SettingDoc(
                field=name,
                env=env_names(info) or [name.upper()],
                type=f"{kind}, {bounds}" if bounds else kind,
                default=_default(info),
                description=" ".join((info.description or "").split()),
            )
        )
    return docs


def grouped(docs: list[SettingDoc]) -> Iterator[tuple[str, str, list[SettingDoc]]]:
    by_name = {doc.field: doc for doc in docs}
    filed: set[str] = set()
    for title, blurb, names in GROUPS:
        members = [by_name[name] for name in names if name in by_name]
        filed.update(doc.field for doc in members)
        if members:
            yield title, blurb, members
    rest = [doc for doc in docs if doc.field not in filed]
    if rest:
        yield OTHER[0], OTHER[1], rest


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(settings_class: type[Settings] = Settings) -> str:
    docs = setting_docs(settings_class)
    lines = [HEADER]
    sections = list(grouped(docs))
    lines.append("Sections: " + " · ".join(f"[{title}](#{_anchor(title)})" for title, _, _ in sections) + ".\n")
    for title, blurb, members in sections:
        lines.append(f"## {title}\n")
        lines.append(f"{blurb}\n")
        lines.append("| variable | type | default | description |")
        lines.append("| --- | --- | --- | --- |")
        for doc in members:
            env = " / ".join(f"`{name}`" for name in doc.env)
            lines.append(f"| {env} | {_cell(doc.type)} | {_cell(doc.default)} | {_cell(doc.description) or '—'} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_").replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.devtools.settings_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="PATH", type=Path, help="exit 1 if PATH differs from what would be generated")
    args = parser.parse_args(argv)
    text = render()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    current = args.check.read_text(encoding="utf-8") if args.check.exists() else ""
    if current != text:
        print(f"{args.check} is stale: run `python -m worker.devtools.settings_doc > {args.check}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
