"""What `edit-worker` imports to start: `--help` loads no worker module and not rich; `status` and
`list` read the database without Celery, boto3, FastAPI or Alembic. Each command runs in a fresh
interpreter (as an operator's shell would start it), which then reports its sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]

# Never needed to print help or to read jobs from the database.
HEAVY = ("celery", "kombu", "boto3", "botocore", "s3transfer", "fastapi", "starlette", "uvicorn", "alembic", "httpx", "redis", "PIL")
# --help needs typer (click) and nothing of the worker's.
HELP_HEAVY = (*HEAVY, "rich", "pygments", "markdown_it", "sqlalchemy", "pydantic", "pydantic_settings", "models")

CHILD = """
import json, sys
from worker.cli import app
try:
    app(sys.argv[2:], prog_name="edit-worker")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
with open(sys.argv[1], "w") as report:
    json.dump({"code": code, "modules": sorted(sys.modules)}, report)
"""


def run_cli(tmp_path: Path, database_url: str, *args: str) -> tuple[int, set[str], str]:
    report = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDIT_WORKER_", "WAVESPEED_", "S3_", "AWS_", "CELERY_"))}
    env.update(DATABASE_URL=database_url, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(report), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    data = json.loads(report.read_text())
    return data["code"], {name.split(".")[0] for name in data["modules"]}, done.stdout + done.stderr


def loaded(packages: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(set(forbidden) & packages)


def test_help_imports_only_the_command_line(tmp_path, database_url):
    code, packages, output = run_cli(tmp_path, database_url, "--help")
    assert code == 0 and "status" in output
    assert loaded(packages, HELP_HEAVY) == []
    assert "worker" in packages  # the check does see what was imported


@pytest.mark.parametrize("args", [["status", "{job}"], ["status", "{job}", "--json", "--events"], ["list"], ["list", "--json"]])
def test_reading_jobs_imports_no_broker_s3_or_web_stack(tmp_path, database_url, new_job, args):
    job_id = new_job()
    code, packages, output = run_cli(tmp_path, database_url, *[arg.format(job=job_id) for arg in args])
    assert code == 0, output
    assert job_id[:8] in output
    assert loaded(packages, HEAVY) == []
    assert {"sqlalchemy", "models"} <= packages  # it did read the database


def test_an_unknown_job_is_still_one_line_and_exit_2_without_heavy_imports(tmp_path, database_url):
    code, packages, output = run_cli(tmp_path, database_url, "status", "no-such-job")
    assert code == 2
    assert next(line for line in output.splitlines() if line.strip()).startswith("error:")
    assert loaded(packages, HEAVY) == []
