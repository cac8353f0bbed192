"""`edit-worker demo`: the embedded default end to end — SQLite, a local Redis, a local S3 server,
the sandbox provider (unless WAVESPEED_API_KEY is set), a real Celery worker and beat — running a
few edits with a progress bar, then showing where the results are.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from worker.core.states import State
from worker.devtools import local
from worker.devtools.imaging import SheetRow

DEMO_PROMPTS = [
    "turn the sky into a warm sunset",
    "make it look like a watercolor painting",
    "add soft falling snow",
    "give it a neon cyberpunk glow",
    "render it as a pencil sketch",
]
CONTACT_SHEET = "contact-sheet.png"  # in the results folder, beside the local copies


def _sample_image(path: Path, index: int) -> Path:
    """A small generated picture (a gradient with a disc), so the demo needs no files of its own."""
    from PIL import Image, ImageDraw

    width, height = 640, 640
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    base = [(40, 90, 200), (200, 80, 60), (40, 160, 90), (150, 60, 170), (200, 170, 40)][index % 5]
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=tuple(int(c * (1 - t) + 255 * t * 0.6) for c in base))
    draw.ellipse([200, 200, 440, 440], fill=(250, 240, 210))
    img.save(path, "PNG")
    return path


def write_contact_sheet(rows: list[SheetRow], path: Path) -> Path:
    """Each job's input beside its output(s), the prompt as caption, as one PNG at `path`."""
    from worker.devtools.imaging import contact_sheet

    contact_sheet(rows).save(path, "PNG")
    return path


def _shown(path: Path) -> Path:
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def run_demo(*, jobs: int, latency: float, workdir: Path, timeout: float, console: Console) -> int:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results = workdir / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    logs = workdir / "logs"
    services: list[local.Service] = []
    real_provider = bool(os.environ.get("WAVESPEED_API_KEY"))

    env = dict(os.environ)
    env.setdefault("DATABASE_URL", f"sqlite:///{workdir / 'demo.db'}")
    env.setdefault("S3_BUCKET", "edit-worker-demo")
    env.setdefault("S3_PREFIX", "edits")
    env.setdefault("EDIT_WORKER_FIRST_POLL_DELAY", str(max(0.5, latency * 0.8)))
    env["EDIT_WORKER_SWEEP_INTERVAL"] = "2"

    try:
        with console.status("starting local services…"):
            redis = local.redis(workdir / "redis", port=None).start()
            services.append(redis)
            env["CELERY_BROKER_URL"] = f"redis://127.0.0.1:{redis.port}/0"
            env.pop("EDIT_WORKER_REDIS_URL", None)
            if not env.get("S3_ENDPOINT_URL"):
                s3 = local.s3(logs).start()
                services.append(s3)
                env["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{s3.port}"
                env["AWS_ACCESS_KEY_ID"] = "demo"
                env["AWS_SECRET_ACCESS_KEY"] = "demo"
            if not real_provider:
                sandbox = local.sandbox(logs, latency=latency).start()
                services.append(sandbox)
                env["WAVESPEED_BASE_URL"] = f"http://127.0.0.1:{sandbox.port}"
                env["WAVESPEED_API_KEY"] = "sandbox-key"
                # The sandbox serves outputs from 127.0.0.1; nothing else in the demo fetches URLs.

            # This process reads the same settings as its children.
            os.environ.update(env)
            from worker.config import get_settings

            get_settings.cache_clear()
            settings = get_settings()
            from worker.adapters.database import migrate
            from worker.adapters.storage import Storage

            migrate(settings.database_url)
            storage = Storage.from_settings(settings)
            storage.ensure_bucket()
            worker = local.celery_worker(logs, env, name="demo-worker", concurrency=2).start()
            services.append(worker)
            beat = local.celery_beat(workdir, env).start()
            services.append(beat)

        provider = "WaveSpeed (real API key)" if real_provider else f"sandbox provider at {settings.wavespeed_base_url}"
        console.print(f"[bold]edit-worker demo[/]: {jobs} edit(s) via {provider}")
        console.print(
            f"  database {settings.database_url}\n  broker   {settings.celery_broker_url}\n"
            f"  S3       {settings.s3_endpoint_url} bucket {settings.s3_bucket}",
            highlight=False,
        )

        from worker import producer

        inputs = workdir / "inputs"
        inputs.mkdir(exist_ok=True)
        submitted = []
        inputs_of: dict[str, tuple[Path, str]] = {}  # job id -> (input file, prompt)
        for i in range(jobs):
            image = _sample_image(inputs / f"input-{i}.png", i)
            prompt = DEMO_PROMPTS[i % len(DEMO_PROMPTS)]
            job = producer.submit_edit(str(image), prompt, size="1024*1024", seed=1000 + i, settings=settings)
            submitted.append(job.id)
            inputs_of[job.id] = (image, prompt)

        from worker.adapters.database import session_factory
        from worker.core.jobs import get_job

        sessions = session_factory(settings.database_url)
        final: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("editing", total=len(submitted))
            while len(final) < len(submitted) and time.monotonic() < deadline:
                states: dict[str, int] = {}
                for job_id in submitted:
                    job = get_job(sessions, job_id)
                    states[job.state] = states.get(job.state, 0) + 1
                    if State(job.state).terminal:
                        final[job_id] = job
                progress.update(
                    bar, completed=len(final), description="editing: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
                )
                time.sleep(0.3)

        lines: list[str] = []
        rows: list[SheetRow] = []
        ok = True
        for job_id in submitted:
            job = final.get(job_id) or get_job(sessions, job_id)
            if job.state != "succeeded":
                ok = False
                reason = escape(f"[{job.error_code}] {job.error_message}") if job.error_code else "did not finish in time"
                lines.append(f"[red]✗[/] {job_id} [red]{job.state}[/] {reason}")
                continue
            copies = []
            for uri in job.outputs:
                key = uri.split("/", 3)[3]
                copy = results / f"{job_id}-{Path(key).name}"
                copy.write_bytes(storage.get_bytes(key))
                copies.append(copy)
                lines.append(f"[green]✓[/] {job_id} [green]succeeded[/]\n    {uri}\n    local copy: {_shown(copy)}")
            image, prompt = inputs_of[job_id]
            rows.append(SheetRow(caption=prompt, before=image, after=copies))
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True)
        if rows:
            sheet = write_contact_sheet(rows, results / CONTACT_SHEET)
            console.print(f"before/after contact sheet: {_shown(sheet)}", highlight=False, soft_wrap=True)
        if ok:
            console.print(
                f"[bold green]all {len(submitted)} job(s) succeeded.[/] Outputs are in s3://{settings.s3_bucket}/{settings.s3_prefix}/ "
                f"on {settings.s3_endpoint_url or 'AWS'}; local copies in {results}",
                highlight=False,
            )
            console.print(
                f"Inspect a job: DATABASE_URL={settings.database_url} edit-worker status {submitted[0]} --events", highlight=False
            )
        else:
            console.print(f"[bold red]some jobs did not succeed[/]; logs in {logs}", highlight=False)
        return 0 if ok else 1
    finally:
        for service in reversed(services):
            service.stop()
