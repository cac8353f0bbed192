#!/usr/bin/env python
"""Query plans of the claim queries at a large backlog: builds N queued jobs (default 100,000)
through the fast admission path on a throwaway PostgreSQL, then prints EXPLAIN (ANALYZE, BUFFERS)
of every statement the submitter's lease (fairshare.fair_candidates + submitter.lease_queued) and
the poller's claim (poller.claim_due) send, exactly as they send them.

    python bench/plans.py                          # 100,000 queued jobs, 3 tenants
    python bench/plans.py --jobs 20000 --processing 2000

The statements are captured from the real functions (a cursor hook records SQL + parameters); each
is explained inside a transaction that is rolled back, so a claim's UPDATE changes nothing. Also
prints the producer's RSS before and after admitting the backlog.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from sqlalchemy import event, text, update  # noqa: E402

from worker.devtools import local  # noqa: E402


def log(message: str) -> None:
    print(f"[plans {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Recorder:
    """Records (statement, parameters) of every cursor execute on `engine` while on."""

    def __init__(self, engine):
        self.on = False
        self.seen: list[tuple[str, object]] = []
        event.listen(engine, "before_cursor_execute", self._hook)

    def _hook(self, conn, cursor, statement, parameters, context, executemany):
        if self.on and not executemany:
            self.seen.append((statement, parameters))

    def capture(self, fn):
        self.on, self.seen = True, []
        try:
            fn()
        finally:
            self.on = False
        return list(self.seen)


def explain(engine, statement: str, parameters) -> str:
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            raw = conn.connection.dbapi_connection
            with raw.cursor() as cur:
                cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters)
                lines = [row[0] for row in cur.fetchall()]
        finally:
            trans.rollback()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from scale import Stack  # type: ignore[import-not-found]  # bench/ is on sys.path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=100_000, help="queued jobs in the backlog")
    p.add_argument("--tenants", type=int, default=3, help="tenants the backlog is spread over")
    p.add_argument("--processing", type=int, default=1000, help="jobs moved to processing (the poller's side)")
    p.add_argument("--batch-size", type=int, default=1000)
    args = p.parse_args(argv)

    outdir = ROOT / "bench" / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-plans"
    outdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(outdir / "stack")
    try:
        stack.redis = stack._start(local.redis(stack.workdir / "redis"))
        stack.s3 = stack._start(local.s3(stack.workdir))
        stack._start_postgres()
        from admission import base_env, input_image, prepare  # type: ignore[import-not-found]

        _env, settings = prepare(stack, base_env(stack), "plans")
        from worker.adapters.database import get_engine, session_factory
        from worker.core.steps import RecordingPublisher
        from worker.engine import fairshare, poller, submitter
        from worker.producer import submit_edit_many

        image = input_image(outdir)
        proc = psutil.Process()
        rss0 = proc.memory_info().rss / 2**20
        peak = rss0
        t0 = time.perf_counter()
        publisher = RecordingPublisher()
        tenants = [f"tenant{i}" for i in range(args.tenants)]
        for start in range(0, args.jobs, args.batch_size):
            items = [
                {
                    "image": str(image),
                    "prompt": f"backlog {i}",
                    "seed": i,
                    "tenant": tenants[i % len(tenants)],
                    "priority": ("high", "normal", "low")[i // len(tenants) % 3],
                }
                for i in range(start, min(args.jobs, start + args.batch_size))
            ]
            submit_edit_many(items, settings=settings, publisher=publisher, batch_size=args.batch_size)
            publisher.sent.clear()
            peak = max(peak, proc.memory_info().rss / 2**20)
        seconds = time.perf_counter() - t0
        rss1 = proc.memory_info().rss / 2**20
        print(f"admitted {args.jobs} jobs in {seconds:.1f} s ({args.jobs / seconds:.0f} jobs/s), batches of {args.batch_size}")
        print(f"producer RSS: {rss0:.1f} MiB before, {peak:.1f} MiB peak, {rss1:.1f} MiB after")

        engine = get_engine(settings.database_url)
        sessions = session_factory(settings.database_url)
        with engine.begin() as conn:
            # Some jobs at the provider: the poller's claim has rows to find, the in-flight counts some to count.
            conn.execute(
                text(
                    "UPDATE jobs SET state='processing', next_poll_at = now() + (random() * interval '20 seconds') - interval '10 seconds' "
                    "WHERE id IN (SELECT id FROM jobs ORDER BY id LIMIT :n)"
                ),
                {"n": args.processing},
            )
            conn.execute(text("ANALYZE jobs"))
        deps = SimpleNamespace(
            settings=settings, sessions=sessions, clock=lambda: __import__("datetime").datetime.now(__import__("datetime").timezone.utc)
        )
        deps.rng = random.Random(1)
        recorder = Recorder(engine)
        queries = {
            "submitter: fairshare.fair_candidates(400)": lambda: fairshare.fair_candidates(deps, 400),
            "submitter: lease_queued(100)": lambda: submitter.lease_queued(deps, 100),
            "poller: claim_due(200)": lambda: poller.claim_due(deps, 200),
        }
        for title, fn in queries.items():
            t = time.perf_counter()
            captured = recorder.capture(fn)
            took = (time.perf_counter() - t) * 1000
            print(f"\n=== {title}: {len(captured)} statement(s), {took:.1f} ms in all ===")
            for statement, parameters in captured:
                if not statement.lstrip().upper().startswith(("SELECT", "UPDATE", "WITH")):
                    continue
                print("\n-- " + " ".join(statement.split())[:600])
                print(explain(engine, statement, parameters))
        # Leave the backlog as it was for a rerun's numbers (the lease bumped some rows).
        with sessions() as session:
            session.execute(update(__import__("models").Job).values(next_attempt_at=None))
            session.commit()

    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
