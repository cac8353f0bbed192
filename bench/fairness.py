"""Fair share under a burst: tenant `bulk` has N jobs queued (default 2,000); tenant `interactive`
then submits one job. How long until that job is submitted, in how many submitter passes, and how
many of the burst's jobs went out before it?

Real parts: PostgreSQL (a throwaway cluster), Redis (the shared limiter and breaker), the sandbox
provider over HTTP. The submitter passes run in this process through the product's own
`submitter.submit_due` (what the `submit_due` Celery task runs), with the default settings but for
the provider tier (rate and concurrency raised so the tier is not what is measured). Without fair
share the one job would wait behind the whole burst (oldest first).

    python bench/fairness.py --jobs 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from models import Job  # noqa: E402
from worker.config import settings_from_env  # noqa: E402
from worker.core.steps import RecordingPublisher  # noqa: E402
from worker.devtools import local  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="the bulk tenant's queued jobs")
    parser.add_argument("--latency", type=float, default=10.0, help="the sandbox's inference time (s)")
    parser.add_argument("--after-passes", type=int, default=1, help="submitter passes over the burst before the single job arrives")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fairness-"))
    work.chmod(0o755)  # PostgreSQL runs as the postgres user when we are root
    services = []
    try:
        pg = local.postgres(work / "pg").start()
        services.append(pg)
        redis = local.redis(work / "redis").start()
        services.append(redis)
        sandbox = local.sandbox(work / "sandbox", latency=args.latency, outputs="flat").start()
        services.append(sandbox)
        db_url = local.create_database(f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/postgres", "fairness")
        env = {
            "DATABASE_URL": db_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis.port}/0",
            "WAVESPEED_API_KEY": "sandbox-key",
            "WAVESPEED_BASE_URL": f"http://127.0.0.1:{sandbox.port}",
            "EDIT_WORKER_RATE_LIMIT_PER_MINUTE": "1000000",
            "EDIT_WORKER_MAX_CONCURRENCY": "100000",
            "EDIT_WORKER_SUBMIT_BACKPRESSURE_SECONDS": "0",
        }
        settings = settings_from_env(env)
        from worker.adapters.database import migrate, session_factory
        from worker.engine import deps as deps_module
        from worker.engine import submitter
        from worker.producer import submit_edit_many

        migrate(settings.database_url)
        publisher = RecordingPublisher()
        image = "https://images.example.com/cat.png"  # the sandbox does not fetch it
        started = time.monotonic()
        submit_edit_many(
            [{"image": image, "prompt": f"bulk {i}", "size": "512*512", "tenant": "bulk"} for i in range(args.jobs)],
            settings=settings.model_copy(update={"allow_private_urls": True}),
            publisher=publisher,
        )
        admitted = time.monotonic() - started
        deps_module.reset_deps()
        deps = deps_module.build_deps(settings, publisher)
        sessions = session_factory(settings.database_url)

        def submitted_count() -> int:
            with sessions() as session:
                return len(session.scalars(select(Job.id).where(Job.submitted_at.is_not(None))).all())

        for _ in range(args.after_passes):
            submitter.submit_due(deps)
        before = submitted_count()
        [single] = submit_edit_many(
            [{"image": image, "prompt": "the one interactive job", "size": "512*512", "tenant": "interactive"}],
            settings=settings.model_copy(update={"allow_private_urls": True}),
            publisher=publisher,
        )
        arrived = time.monotonic()
        passes = 0
        while True:
            passes += 1
            report = submitter.submit_due(deps)
            with sessions() as session:
                job = session.get(Job, single.id)
            if job.submitted_at is not None or passes > 50:
                break
        waited = time.monotonic() - arrived
        with sessions() as session:
            ahead = len(
                session.scalars(
                    select(Job.id).where(Job.tenant == "bulk", Job.submitted_at.is_not(None), Job.submitted_at < job.submitted_at)
                ).all()
            )
        result = {
            "bulk_jobs_queued": args.jobs,
            "admission_seconds": round(admitted, 2),
            "bulk_submitted_before_the_single_job_arrived": before,
            "single_job_submitted_in_passes": passes,
            "single_job_admitted_to_submitted_seconds": round((job.submitted_at - job.created_at).total_seconds(), 3),
            "first_pass_seconds": round(waited, 3),
            "bulk_jobs_submitted_before_it_in_total": ahead,
            "bulk_jobs_submitted_after_it_arrived_before_it": ahead - before,
            "last_pass": {"leased": report.leased, "started": report.started},
            "single_job_state": job.state,
        }
        print(json.dumps(result, indent=2))
        return 0 if job.submitted_at is not None and passes == 1 else 1
    finally:
        for service in reversed(services):
            service.stop()


if __name__ == "__main__":
    sys.exit(main())
