"""`edit-worker`: the command line (typer), thin over the producer API, the engine and the dev tools.

Bad input: a one-line `error: …` on stderr and exit code 2; nothing is written.

Start-up time matters (an operator runs `status` and `list` in loops): each command imports what it
needs when it runs, so `--help` loads neither rich nor the worker's modules, and `status`/`list` read
the database without Celery, boto3 or FastAPI (tests/unit/face/test_cli_imports.py checks this;
bench/cli_start.py measures it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

# Plain (click) help and tracebacks: typer's rich help alone imports rich, markdown-it and pygments
# (about a quarter of a second at every `--help`).
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Durable WaveSpeed Dreamina V3.0 Edit jobs: Celery + S3 + SQL.",
)


class _LazyConsole:
    """A rich Console made on first use, so commands that print nothing through it never import rich."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


out: Any = _LazyConsole()
err: Any = _LazyConsole(stderr=True)


def escape(text: str) -> str:
    """rich.markup.escape, imported when first needed."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _settings():
    from pydantic import ValidationError

    from worker.config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:  # one line per bad setting, no traceback
        _fail("; ".join(str(error.get("msg", "invalid")).removeprefix("Value error, ") for error in exc.errors()))


def _job_json(job) -> dict:
    """The job JSON with result links (presigned locally, no call to S3) and cost."""
    from worker.views import job_view

    settings = _settings()
    if not job.outputs:  # no links to sign: no S3 client, no boto3 import
        return job_view(job, settings, None)
    from worker.adapters.storage import Storage

    return job_view(job, settings, Storage.from_settings(settings))


def _print_job(job, as_json: bool) -> None:
    data = _job_json(job)
    if as_json:
        typer.echo(json.dumps(data))
        return
    out.print(f"[bold]{data['id']}[/]  {data['state']}")
    for key in (
        "tenant",
        "priority",
        "prompt",
        "size",
        "seed",
        "idempotency_key",
        "prediction_id",
        "attempts",
        "created_at",
        "updated_at",
        "finished_at",
    ):
        if data[key] is not None:
            out.print(escape(f"  {key}: {data[key]}"), highlight=False)
    for uri in data["outputs"]:
        out.print(f"  output: {uri}", highlight=False)
    for url in data["output_urls"]:
        out.print(f"  link: {url}", highlight=False, soft_wrap=True)
    if data["error"]:
        out.print(escape(f"  error: [{data['error']['code']}] {data['error']['message']}"), highlight=False)


def _guard(fn):
    """Map the package's errors to clean exits (2 for bad input / unknown job / bad operation)."""
    from worker.errors import (
        DeliveryNotFound,
        EditWorkerError,
        IdempotencyMismatch,
        InvalidInput,
        InvalidJobOperation,
        JobNotFound,
        QuotaExceeded,
    )

    try:
        return fn()
    except (InvalidInput, JobNotFound, InvalidJobOperation, IdempotencyMismatch, DeliveryNotFound) as exc:
        _fail(str(exc), 2)
    except QuotaExceeded as exc:
        _fail(f"{exc}; try again in {exc.retry_after:.0f}s", 1)
    except EditWorkerError as exc:
        _fail(str(exc), 1)


# --- database and processes ------------------------------------------------------------------


@app.command()
def migrate(
    database_url: str | None = typer.Option(None, help="Defaults to DATABASE_URL."),
    bucket: bool = typer.Option(False, "--bucket", help="Also create S3_BUCKET if it does not exist."),
) -> None:
    """Run `alembic upgrade head` on DATABASE_URL (and, with --bucket, create the S3 bucket)."""
    from worker.adapters.database import migrate as run
    from worker.errors import UnsupportedDatabase

    settings = _settings()
    url = database_url or settings.database_url
    try:
        run(url)
    except UnsupportedDatabase as exc:
        _fail(str(exc), 2)
    out.print(f"database at head: {_redact_url(url)}", highlight=False)
    if bucket:
        from worker.adapters.storage import Storage

        _guard(lambda: Storage.from_settings(settings).ensure_bucket())
        out.print(f"bucket ready: s3://{settings.s3_bucket}", highlight=False)


@app.command(context_settings=PASSTHROUGH)
def worker(ctx: typer.Context) -> None:
    """Run a Celery worker (any `celery worker` option may follow, e.g. --concurrency 8).

    The worker runs supervised: if Celery exits on its own (e.g. kombu's Redis transport can raise
    an unrecoverable error while restoring unacked messages when Redis restarts, and exit 0), it is
    started again. A stop signal (TERM/INT/QUIT) is passed on and ends the supervisor too.
    EDIT_WORKER_SUPERVISE=0 runs Celery in this process instead. A Redis older than 6.2 is refused
    at start (exit 2)."""
    args = list(ctx.args)
    if not os.environ.get("_EDIT_WORKER_SUPERVISED"):
        _require_supported_redis()
    if os.environ.get("EDIT_WORKER_SUPERVISE", "1") != "0" and not os.environ.get("_EDIT_WORKER_SUPERVISED"):
        env = {**os.environ, "_EDIT_WORKER_SUPERVISED": "1"}
        raise typer.Exit(_supervise([sys.executable, "-m", "worker.cli", "worker", *args], env))
    from worker.engine.celery_app import QUEUE
    from worker.engine.celery_app import app as celery

    if not any(a in ("-c", "--concurrency") or a.startswith(("--concurrency=", "-c")) for a in args):
        # The batch loops each hold a slot while they run (poller and submitter passes per node),
        # and the sweep and retries need one more: not Celery's default of one per CPU.
        from worker.config import get_settings

        s = get_settings()
        args += ["--concurrency", str(max(4, s.poll_passes_per_node + s.submit_passes_per_node + 1))]
    if not any(a in ("-Q", "--queues") or a.startswith("--queues=") for a in args):
        args += ["-Q", QUEUE]
    if not any(a.startswith(("-l", "--loglevel")) for a in args):
        args += ["--loglevel", "INFO"]
    celery.worker_main(["worker", *args])


def _require_supported_redis() -> None:
    """Refuse to start on a Redis too old for the limiter's and breaker's scripts (one line, exit 2)."""
    import redis

    from worker.adapters.redis_client import connect, require_supported
    from worker.errors import UnsupportedRedis

    client = connect(_settings().limiter_redis_url)
    try:
        require_supported(client)
    except UnsupportedRedis as exc:
        _fail(str(exc), 2)
    except redis.RedisError:
        pass  # not up yet: Celery waits for its broker, and building the deps checks again
    finally:
        client.close()


def _supervise(argv: list[str], env: dict[str, str], *, max_restarts: int = 20, window: float = 300.0) -> int:
    """Run argv; restart it whenever it exits without having been told to stop (bounded: more than
    `max_restarts` within `window` seconds means something is really wrong — give up)."""
    import signal
    import subprocess
    from collections import deque

    stopping = False
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, forward)
    restarts: deque[float] = deque()
    while True:
        child = subprocess.Popen(argv, env=env)
        code = child.wait()
        if stopping:
            return code
        now = time.monotonic()
        restarts.append(now)
        while restarts and restarts[0] < now - window:
            restarts.popleft()
        if len(restarts) > max_restarts:
            err.print(f"edit-worker worker: Celery exited {len(restarts)} times in {window:.0f}s; giving up (code {code})")
            return code or 1
        err.print(f"edit-worker worker: Celery exited on its own (code {code}); restarting", highlight=False)
        time.sleep(1.0)


@app.command(context_settings=PASSTHROUGH)
def beat(ctx: typer.Context) -> None:
    """Run the beat scheduler: outbox relay, stuck-job sweep, ambiguous-submit resolution."""
    from worker.engine.celery_app import app as celery

    args = list(ctx.args)
    if not any(a.startswith(("-l", "--loglevel")) for a in args):
        args += ["--loglevel", "INFO"]
    celery.start(["beat", *args])


@app.command(context_settings=PASSTHROUGH)
def sandbox(ctx: typer.Context) -> None:
    """A local WaveSpeed-compatible server (see `edit-worker sandbox --help`)."""
    from worker.devtools.sandbox import main

    main(list(ctx.args))


@app.command()
def api(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8000)) -> None:
    """The HTTP API: submit, status, list, cancel, retry, webhook receiver, metrics."""
    import logging

    import uvicorn

    from worker import logs
    from worker.api import create_app

    settings = _settings()
    logs.install(logging.getLogger("worker"), level=logging.INFO, fmt=settings.log_format, secrets=settings.secret_values())
    uvicorn.run(create_app(), host=host, port=port, log_level="info")


# --- jobs ------------------------------------------------------------------------------------


@app.command()
def submit(
    image: str | None = typer.Option(None, "--image", help="A local PNG/JPEG/WebP file (sent as base64) or an http(s) URL."),
    prompt: str | None = typer.Option(None, "--prompt", help="What to change, at most 120 characters."),
    size: str | None = typer.Option(None, "--size", help="W*H, each side 512..2048 (default 1328*1328)."),
    seed: int | None = typer.Option(None, "--seed", help="-1..2147483647 (default -1: random)."),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="The same key with the same request gives the same job (per tenant, for a day)."
    ),
    tenant: str = typer.Option("default", "--tenant", help="The tenant the job belongs to."),
    priority: str | None = typer.Option(None, "--priority", help="high | normal | low (default normal)."),
    callback_url: str | None = typer.Option(None, "--callback-url", help="POST the signed job JSON here when it finishes."),
    from_file: Path | None = typer.Option(None, "--from-file", help="JSON Lines, one job per line with the same fields."),
    wait: bool = typer.Option(False, "--wait", help="Block until the job is finished (exit 0 only on succeeded)."),
    as_json: bool = typer.Option(False, "--json", help="Print the job object(s) as JSON."),
) -> None:
    """Create an edit job and print its id."""
    from worker import producer

    settings = _settings()
    if from_file is not None:
        if image or prompt:
            _fail("--from-file cannot be combined with --image/--prompt")
        items = [{"tenant": tenant, **({"priority": priority} if priority else {}), **item} for item in _read_jsonl(from_file)]
        jobs = _guard(lambda: producer.submit_edit_many(items, settings=settings))
        for job in jobs:
            _print_job(job, True) if as_json else typer.echo(job.id)
        return
    if not image:
        _fail("--image is required")
    if prompt is None:
        _fail("--prompt is required")
    assert image is not None and prompt is not None  # _fail exited otherwise
    job = _guard(
        lambda: producer.submit_edit(
            image,
            prompt,
            size=size,
            seed=seed,
            idempotency_key=idempotency_key,
            tenant=tenant,
            priority=priority,
            callback_url=callback_url,
            settings=settings,
        )
    )
    if wait:
        job = _wait_with_progress(job.id, None, quiet=as_json)
    _print_job(job, True) if as_json else (typer.echo(job.id) if not wait else _print_job(job, False))
    if wait and job.state != "succeeded":
        raise typer.Exit(1)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        _fail(f"{path} does not exist")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(f"{path}:{number}: not JSON ({exc.msg})")
        if not isinstance(item, dict):
            _fail(f"{path}:{number}: expected a JSON object")
        unknown = set(item) - {
            "image",
            "prompt",
            "size",
            "seed",
            "idempotency_key",
            "enable_base64_output",
            "tenant",
            "priority",
            "callback_url",
        }
        if unknown:
            _fail(f"{path}:{number}: unknown field(s) {', '.join(sorted(unknown))}")
        items.append(item)
    if not items:
        _fail(f"{path} holds no jobs")
    return items


@app.command()
def status(
    job_id: str,
    as_json: bool = typer.Option(False, "--json"),
    events: bool = typer.Option(False, "--events", help="Also show every state change and callback delivery."),
) -> None:
    """Show one job."""
    # Straight from the database: the producer module would import boto3 and Celery's app.
    from worker.adapters.database import session_factory
    from worker.core.deliveries import delivery_json, list_deliveries
    from worker.core.jobs import event_json, get_job, job_events

    sessions = session_factory(_settings().database_url)
    job = _guard(lambda: get_job(sessions, job_id))
    if as_json and events:
        data = _job_json(job)
        data["events"] = [event_json(e) for e in job_events(sessions, job_id)]
        data["deliveries"] = [delivery_json(d) for d in list_deliveries(sessions, job_id)]
        typer.echo(json.dumps(data))
        return
    _print_job(job, as_json)
    if events and not as_json:
        for e in job_events(sessions, job_id):
            out.print(escape(f"  {e.at:%Y-%m-%d %H:%M:%S} {e.from_state or '-'} -> {e.to_state}: {e.reason}"), highlight=False)
        for d in list_deliveries(sessions, job_id):
            line = f"  callback {d.id} ({d.state}): {d.status}, tries {d.attempts}"
            out.print(escape(line + (f", last: {d.last_error}" if d.last_error else "")), highlight=False)


@app.command("list")
def list_(
    state: str | None = typer.Option(None, "--state", help="queued|submitting|processing|uploading|succeeded|failed|cancelled"),
    limit: int = typer.Option(100, "--limit", min=1, max=10000),
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's jobs (default: every tenant's)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List jobs, newest first."""
    from worker.adapters.database import session_factory
    from worker.core.jobs import list_jobs

    st = _parse_state(state)
    jobs = list_jobs(session_factory(_settings().database_url), state=st, limit=limit, tenant=tenant)
    if as_json:
        typer.echo(json.dumps([_job_json(j) for j in jobs]))
        return
    from rich.table import Table

    table = Table("id", "tenant", "state", "prompt", "attempts", "outputs / error")
    for job in jobs:
        detail = ", ".join(job.outputs or []) or (f"[{job.error_code}] {job.error_message}" if job.error_code else "")
        table.add_row(job.id, escape(job.tenant), job.state, escape(job.prompt[:40]), str(job.attempts), escape(detail))
    out.print(table)


def _parse_state(state: str | None):
    from worker.core.states import State

    if state is None:
        return None
    try:
        return State(state)
    except ValueError:
        _fail(f"unknown state {state!r}; one of {', '.join(s.value for s in State)}")


@app.command()
def wait(job_id: str, timeout: float | None = typer.Option(None, "--timeout", help="Seconds; exit 124 when it passes.")) -> None:
    """Block until the job is finished: exit 0 on succeeded, 1 on failed/cancelled, 124 on timeout."""
    job = _wait_with_progress(job_id, timeout)
    _print_job(job, False)
    raise typer.Exit(0 if job.state == "succeeded" else 1)


def _wait_with_progress(job_id: str, timeout: float | None, quiet: bool = False):
    from worker import producer

    _guard(lambda: producer.get_job(job_id))
    console = err if quiet else out
    with console.status(f"job {job_id}: waiting") as spinner:

        def changed(job):
            spinner.update(f"job {job_id}: {job.state}")

        try:
            return producer.wait_for(job_id, timeout, on_change=changed)
        except producer.WaitTimeout as exc:
            err.print(f"timeout: {exc}", highlight=False)
            raise typer.Exit(124)


@app.command()
def cancel(
    job_id: str | None = typer.Argument(None, help="A job; or use the filters for a bulk cancel."),
    all_active: bool = typer.Option(False, "--all", help="Every unfinished job matching the filters."),
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's jobs."),
    state: str | None = typer.Option(None, "--state", help="Only jobs in this unfinished state."),
    error_code: str | None = typer.Option(None, "--error-code", help="Only jobs with this error code."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Cancel a job (or every unfinished job matching the filters), and its task at the provider."""
    from worker.engine.deps import build_deps
    from worker.engine.operator import cancel_job, cancel_matching

    if job_id and (all_active or tenant or state or error_code):
        _fail("give a job id or --all/--tenant/--state/--error-code, not both")
    if job_id:
        job = _guard(lambda: cancel_job(build_deps(), job_id))
        _print_job(job, as_json)
        return
    if not (all_active or tenant or state or error_code):
        _fail("give a job id, or --all / --tenant / --state / --error-code for a bulk cancel")
    wanted = _parse_state(state)
    cancelled = _guard(lambda: cancel_matching(build_deps(), tenant=tenant, state=wanted, error_code=error_code))
    if as_json:
        typer.echo(json.dumps([_job_json(j) for j in cancelled]))
    else:
        out.print(f"cancelled {len(cancelled)} job(s)")


@app.command()
def retry(
    job_id: str | None = typer.Argument(None, help="A failed job; or use the filters for a bulk replay."),
    all_failed: bool = typer.Option(False, "--all", help="Every failed job matching the filters."),
    error_code: str | None = typer.Option(None, "--error-code", help="Only failed jobs with this error code."),
    since: str | None = typer.Option(None, "--since", help="Only jobs failed after this: ISO time or a duration like 2h, 30m."),
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's jobs."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Replay failed jobs (the dead-letter set) from the furthest step already paid for."""
    from worker.engine.deps import build_deps
    from worker.engine.operator import retry_job, retry_matching

    deps = build_deps()
    if job_id and (all_failed or error_code or since or tenant):
        _fail("give a job id or --all/--error-code/--since/--tenant, not both")
    if job_id:
        job = _guard(lambda: retry_job(deps, job_id))
        _relay(deps)
        _print_job(job, as_json)
        return
    if not (all_failed or error_code or since or tenant):
        _fail("give a job id, or --all / --error-code / --since / --tenant for a bulk replay")
    when = _parse_since(since) if since else None
    replayed = _guard(lambda: retry_matching(deps, tenant=tenant, error_code=error_code, since=when))
    _relay(deps)
    if as_json:
        typer.echo(json.dumps([_job_json(j) for j in replayed]))
    else:
        out.print(f"replayed {len(replayed)} failed job(s)")


def _relay(deps) -> None:
    from worker.engine.reconciler import relay_outbox

    try:
        relay_outbox(deps)
    except Exception as exc:  # the beat relay publishes later
        err.print(f"note: broker unavailable ({type(exc).__name__}); beat will publish the replay", highlight=False)


def _parse_since(text: str) -> datetime:
    """`--since`: an age like 30m, 2h, 1d, 2w, or an ISO time (one line and exit 2 otherwise)."""
    from worker.engine.retention import parse_cutoff

    return _guard(lambda: parse_cutoff(text, datetime.now(timezone.utc), what="--since"))


callbacks_app = typer.Typer(no_args_is_help=True, help="Signed callbacks to producers: list a job's deliveries, send them again.")
app.add_typer(callbacks_app, name="callbacks")


def _print_deliveries(deliveries, as_json: bool) -> None:
    from worker.core.deliveries import delivery_json

    data = [delivery_json(d) for d in deliveries]
    if as_json:
        typer.echo(json.dumps(data))
        return
    for d in data:
        line = f"{d['id']}  {d['event']:<9}  {d['status']:<9}  tries {d['attempts']}  {d['webhook_id']}"
        if d["last_error"]:
            line += f"  last: {d['last_error']}"
        out.print(escape(line), highlight=False)


@callbacks_app.command("list")
def callbacks_list(job_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A job's callback deliveries (one per terminal state it reached), oldest first."""
    from worker.adapters.database import session_factory
    from worker.core.deliveries import list_deliveries
    from worker.core.jobs import get_job

    sessions = session_factory(_settings().database_url)
    _guard(lambda: get_job(sessions, job_id))
    _print_deliveries(list_deliveries(sessions, job_id), as_json)


@callbacks_app.command("redeliver")
def callbacks_redeliver(
    delivery_id: int | None = typer.Argument(None, help="A delivery id (from `callbacks list`)."),
    job_id: str | None = typer.Option(None, "--job", help="The job's latest delivery."),
    failed: bool = typer.Option(False, "--failed", help="Every delivery that ran out of retries."),
    since: str | None = typer.Option(None, "--since", help="With --failed: only those created after this (ISO time or 30m, 2h, 1d)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Send callbacks again now, under the same webhook-id, with a fresh retry window."""
    from worker.engine.callbacks import redeliver, redeliver_failed
    from worker.engine.deps import build_deps

    if sum((delivery_id is not None, job_id is not None, failed)) != 1:
        _fail("give a delivery id, --job JOB_ID or --failed")
    if since and not failed:
        _fail("--since goes with --failed")
    deps = build_deps()
    if failed:
        count = redeliver_failed(deps, _parse_since(since) if since else None)
        typer.echo(json.dumps({"redelivered": count})) if as_json else out.print(f"redelivering {count} failed callback(s)")
        return
    delivery = _guard(lambda: redeliver(deps, delivery_id=delivery_id, job_id=job_id))
    _print_deliveries([delivery], as_json)


@app.command()
def resolve(
    job_id: str,
    adopt: str | None = typer.Option(None, "--adopt", help="The provider prediction id that belongs to this job."),
    resubmit: bool = typer.Option(False, "--resubmit", help="The provider holds no task for it: submit again."),
) -> None:
    """Settle an ambiguous submit the reconciler left for an operator."""
    from worker.engine.deps import build_deps
    from worker.engine.reconciler import resolve_by_operator

    outcome = _guard(lambda: resolve_by_operator(build_deps(), job_id, adopt=adopt, resubmit=resubmit))
    out.print(f"{job_id}: {outcome}")


@app.command()
def prune(
    finished_before: str | None = typer.Option(None, "--finished-before", help="An age like 30d, 12h, 2w, or an ISO 8601 time."),
    with_objects: bool = typer.Option(False, "--with-objects", help="Also delete the jobs' input and output objects in S3."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be deleted; delete nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as a JSON object."),
) -> None:
    """Delete finished jobs (succeeded, failed, cancelled) that finished before a cutoff, with their
    events and outbox rows (and, with --with-objects, their S3 objects); print the counts."""
    from worker.engine.retention import parse_cutoff, prune_finished

    text = finished_before or ""
    if not text:
        _fail("--finished-before is required (e.g. --finished-before 30d)")
    cutoff = _guard(lambda: parse_cutoff(text, datetime.now(timezone.utc).replace(microsecond=0)))
    from worker.engine.deps import build_deps

    report = _guard(lambda: prune_finished(build_deps(), cutoff, with_objects=with_objects, dry_run=dry_run))
    if as_json:
        typer.echo(json.dumps(report.to_json()))
        return
    data = report.to_json()
    objects = f", {report.objects} object(s) in S3" if with_objects else " (S3 objects kept)"
    out.print(
        f"{'would prune' if dry_run else 'pruned'} {report.jobs} job(s) finished before {data['finished_before']}: "
        f"{report.events} event(s), {report.outbox} outbox row(s){objects}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def demo(
    jobs: int = typer.Option(3, "--jobs", min=1, max=50, help="How many edits to run."),
    latency: float = typer.Option(2.0, "--latency", help="Sandbox inference time in seconds."),
    workdir: Path = typer.Option(Path(".edit-worker-demo"), "--dir", help="Where the demo keeps its files and results."),
    timeout: float = typer.Option(180.0, "--timeout", help="Give up after this many seconds."),
) -> None:
    """Start what is needed locally and run a few edits end to end (needs the `local` extra)."""
    from worker.devtools.local import LOCAL_EXTRA_HINT, missing_local_extra

    missing = missing_local_extra()
    if missing:
        _fail(f"`edit-worker demo` needs the local services extra ({', '.join(missing)} not installed): {LOCAL_EXTRA_HINT}")
    from worker.devtools.demo import run_demo

    raise typer.Exit(run_demo(jobs=jobs, latency=latency, workdir=workdir, timeout=timeout, console=out.get()))


def _redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database url>"


# --- tenants and API keys ---------------------------------------------------------------------

keys_app = typer.Typer(help="API keys for `edit-worker api` (only a hash is stored; a key is shown once).", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants: weights and quotas.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")


def _sessions():
    from worker.adapters.database import session_factory

    return session_factory(_settings().database_url)


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="The tenant the key acts for (created if new)."),
    admin: bool = typer.Option(False, "--admin", help="An admin key sees and acts on every tenant."),
    as_json: bool = typer.Option(False, "--json", help='Print {"tenant", "key", "webhook_secret"}.'),
) -> None:
    """Create an API key and print it (the only time it is shown), with the tenant's callback secret."""
    from worker.core.tenants import create_key

    new = _guard(lambda: create_key(_sessions(), tenant, admin=admin))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "tenant": new.tenant,
                    "key": new.key.get_secret_value(),
                    "webhook_secret": new.webhook_secret.get_secret_value(),
                    "id": new.key_id,
                    "admin": new.admin,
                }
            )
        )
        return
    out.print(f"tenant:         {new.tenant}{' (admin)' if new.admin else ''}", highlight=False)
    out.print(f"key id:         {new.key_id}", highlight=False)
    out.print(f"key:            {new.key.get_secret_value()}", highlight=False)
    out.print(f"webhook secret: {new.webhook_secret.get_secret_value()}", highlight=False)
    err.print("store the key now: it is not shown again (use it as Authorization: Bearer <key>)", highlight=False)


@keys_app.command("list")
def keys_list(
    tenant: str | None = typer.Option(None, "--tenant"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List keys (ids, tenants, admin, created, revoked) — never the keys themselves."""
    from worker.core.jobs import iso
    from worker.core.tenants import list_keys

    rows = [
        {"id": k.id, "tenant": k.tenant, "admin": k.admin, "created_at": iso(k.created_at), "revoked_at": iso(k.revoked_at)}
        for k in list_keys(_sessions(), tenant=tenant)
    ]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        flags = " admin" if row["admin"] else ""
        revoked = f"  revoked {row['revoked_at']}" if row["revoked_at"] else ""
        out.print(f"{row['id']}  {row['tenant']}{flags}  created {row['created_at']}{revoked}", highlight=False)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (from `keys list`) or the key itself.")) -> None:
    """Revoke a key: requests with it answer 401 from now on."""
    from worker.core.tenants import revoke_key

    if not revoke_key(_sessions(), key_id):
        _fail(f"no live key {key_id}")
    out.print(f"revoked {key_id}", highlight=False)


@tenants_app.command("set")
def tenants_set(
    name: str,
    weight: int | None = typer.Option(None, "--weight", help="Its share of the submitter's turns (default 1)."),
    rate_per_minute: int | None = typer.Option(None, "--rate-per-minute", help="Admissions per minute (0: no limit)."),
    max_in_flight: int | None = typer.Option(None, "--max-in-flight", help="Jobs at the provider at once (0: no limit)."),
    daily_budget: int | None = typer.Option(None, "--daily-budget", help="Paid jobs per UTC day (0: no limit)."),
    callback_url: str | None = typer.Option(None, "--callback-url", help="Default callback URL of its jobs ('' removes it)."),
) -> None:
    """Create a tenant or change its weight, quotas and default callback URL."""
    from worker.core.tenants import set_tenant
    from worker.core.validation import validate_callback_url

    settings = _settings()
    checked = (
        None
        if callback_url is None
        else (_guard(lambda: validate_callback_url(callback_url, allow_private=settings.allow_private_urls)) or "")
    )

    row = _guard(
        lambda: set_tenant(
            _sessions(),
            name,
            weight=weight,
            rate_per_minute=rate_per_minute,
            max_in_flight=max_in_flight,
            daily_budget=daily_budget,
            callback_url=checked,
        )
    )
    out.print(
        f"{row.name}: weight {row.weight}, rate/min {row.rate_per_minute}, in flight {row.max_in_flight}, daily {row.daily_budget}, "
        f"callback {row.callback_url or '-'}",
        highlight=False,
        soft_wrap=True,
    )


@tenants_app.command("list")
def tenants_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Tenants with their weights and quotas (None: the deployment's default)."""
    from worker.core.tenants import list_tenants

    rows = [
        {
            "tenant": t.name,
            "weight": t.weight,
            "rate_per_minute": t.rate_per_minute,
            "max_in_flight": t.max_in_flight,
            "daily_budget": t.daily_budget,
            "callback_url": t.callback_url,
        }
        for t in list_tenants(_sessions())
    ]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        out.print(escape(" ".join(f"{k}={v}" for k, v in row.items())), highlight=False)


@tenants_app.command("usage")
def tenants_usage(
    tenant: str | None = typer.Option(None, "--tenant"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per tenant: jobs by state, paid jobs admitted today, paid submissions today and their cost."""
    from worker.core.tenants import usage

    rows = [vars(u) for u in usage(_sessions(), _settings(), tenant=tenant)]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        states = ", ".join(f"{k} {v}" for k, v in sorted(row["by_state"].items())) or "no jobs"
        out.print(
            escape(
                f"{row['tenant']}: {states}; paid today {row['paid_today']} (submissions {row['paid_submissions_today']}, "
                f"cost {row['cost_today']})"
            ),
            highlight=False,
        )


def main() -> None:
    """The `edit-worker` command: the app, with a database that is down or has no schema yet told
    in one line (exit 1) instead of a traceback."""
    try:
        app()
    except Exception as exc:
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(exc, SQLAlchemyError):
            raise
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
        missing = any(text in detail for text in ("no such table", "does not exist"))
        print(f"error: database: {detail}" + ("; run `edit-worker migrate` first" if missing else ""), file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
