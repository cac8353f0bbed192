"""How long `edit-worker` takes to start and answer, each command timed as a whole process (what an
operator's shell sees), against a throwaway SQLite database holding a few queued jobs.

Baselines in the same run: `python -c pass` (the interpreter alone) and `python -c "import typer"`
(the CLI framework alone). With --base PATH the same commands also run on another checkout (e.g. main,
unpacked with `git archive main | tar -x -C /tmp/cli-base`) through PYTHONPATH, interleaved with this
tree's runs so that both see the same machine load. `submit` runs against a local Redis and a local
S3 server (moto) started here, so it does its real work (validate, store the input, insert, publish).

    python bench/cli_start.py --runs 15 --base /tmp/cli-base
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker.devtools import local  # noqa: E402


def seed_database(url: str, image: Path, jobs: int) -> str:
    """Migrate `url` and insert `jobs` queued jobs (as admission would, the image kept as a URL); one id."""
    from worker.adapters.database import migrate, session_factory
    from worker.config import Settings
    from worker.core import validation
    from worker.core.jobs import create_jobs

    migrate(url)
    settings = Settings(_env_file=None, database_url=url, allow_private_urls=True)  # type: ignore[call-arg]
    requests = [
        validation.validate_request(image="http://127.0.0.1:9/input.png", prompt=f"bench job {i}", settings=settings) for i in range(jobs)
    ]
    pairs = create_jobs(session_factory(url), requests, deadline_seconds=3600.0, inputs=None)
    return pairs[0][0].id


def sample_png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 64), (30, 90, 200)).save(path, "PNG")
    return path


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="runs per command and tree")
    parser.add_argument("--jobs", type=int, default=5, help="queued jobs in the database")
    parser.add_argument("--base", type=Path, default=None, help="another checkout to time the same commands on (a baseline)")
    parser.add_argument("--no-submit", action="store_true", help="skip `submit` (it starts a local Redis and S3 server)")
    args = parser.parse_args()

    trees = [("this tree", ROOT)] + ([("base", args.base.resolve())] if args.base else [])
    services: list[local.Service] = []
    with tempfile.TemporaryDirectory(prefix="cli-start-") as tmp:
        work = Path(tmp)
        url = f"sqlite:///{work / 'jobs.db'}"
        image = sample_png(work / "input.png")
        job_id = seed_database(url, image, args.jobs)
        clean = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("EDIT_WORKER_", "WAVESPEED_", "S3_", "AWS_", "CELERY_", "DATABASE_URL"))
        }
        env = {**clean, "DATABASE_URL": url, "CELERY_BROKER_URL": "redis://127.0.0.1:9/0"}
        try:
            if not args.no_submit:
                redis = local.redis(work / "redis").start()
                s3 = local.s3(work).start()
                services += [redis, s3]
                env.update(
                    CELERY_BROKER_URL=f"redis://127.0.0.1:{redis.port}/0",
                    S3_ENDPOINT_URL=f"http://127.0.0.1:{s3.port}",
                    S3_BUCKET="cli-start",
                    AWS_ACCESS_KEY_ID="bench",
                    AWS_SECRET_ACCESS_KEY="bench",
                )
                subprocess.run(
                    [sys.executable, "-m", "worker.cli", "migrate", "--bucket"],
                    env={**env, "PYTHONPATH": str(ROOT)},
                    cwd=work,
                    check=True,
                    capture_output=True,
                )

            py = sys.executable
            cases: list[tuple[str, str, list[str], Path | None]] = [
                ("python -c pass", "-", [py, "-c", "pass"], None),
                ('python -c "import typer"', "-", [py, "-c", "import typer"], None),
            ]
            commands = [
                ("--help", ["--help"]),
                ("status ID", ["status", job_id]),
                ("status ID --json", ["status", job_id, "--json"]),
                ("list", ["list"]),
                ("list --json", ["list", "--json"]),
            ]
            if not args.no_submit:
                commands.append(("submit --image F --prompt P", ["submit", "--image", str(image), "--prompt", "bench submit"]))
            for name, argv in commands:
                for label, tree in trees:
                    cases.append((f"edit-worker {name}", label, [py, "-m", "worker.cli", *argv], tree))

            timings: dict[int, list[float]] = {index: [] for index in range(len(cases))}
            for _ in range(args.runs):  # round-robin: every case sees the same load over the run
                for index, (name, _label, argv, tree) in enumerate(cases):
                    case_env = {**env, "PYTHONPATH": str(tree)} if tree else env
                    started = time.perf_counter()
                    done = subprocess.run(argv, env=case_env, cwd=work, capture_output=True)
                    timings[index].append(time.perf_counter() - started)
                    if done.returncode != 0:
                        print(f"{name} ({_label}) exited {done.returncode}: {done.stderr.decode()[-500:]}", file=sys.stderr)
                        return 1
        finally:
            for service in reversed(services):
                service.stop()

    print(f"{'command':<38} {'code':<10} {'median s':>9} {'p90 s':>7} {'runs':>5}")
    for index, (name, label, _argv, _tree) in enumerate(cases):
        values = timings[index]
        print(f"{name:<38} {label:<10} {statistics.median(values):>9.3f} {percentile(values, 0.9):>7.3f} {len(values):>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
