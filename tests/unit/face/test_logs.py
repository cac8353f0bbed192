"""Log lines: text with key=value context, or one JSON object a line (time, level, logger,
message, the job's job_id, tenant, prediction_id, trace_id), and never a secret in either."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from worker import logs
from worker.config import Settings

ROOT = Path(__file__).resolve().parents[3]
TRACE_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
JOB = {"job_id": "job-1", "tenant": "acme", "prediction_id": "pred-9", "attempt": 2, "trace_parent": TRACE_PARENT}


def capture(fmt: str, secrets=()) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    logger = logging.getLogger(f"edit-worker-test-logs-{fmt}-{id(stream)}")
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(stream))
    logs.install(logger, level=logging.INFO, fmt=fmt, secrets=secrets)
    return logger, stream


def test_a_json_line_is_one_object_with_the_jobs_context_and_trace_id():
    logger, stream = capture("json")
    logger.warning("submit failed (transient), retry in %.1fs", 4.0, extra=JOB)
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == logger.name
    assert entry["message"] == "submit failed (transient), retry in 4.0s"
    assert (entry["job_id"], entry["tenant"], entry["prediction_id"], entry["attempt"]) == ("job-1", "acme", "pred-9", 2)
    assert entry["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert entry["time"].endswith("+00:00") and "T" in entry["time"]


def test_a_json_line_without_a_job_or_trace_has_no_such_fields():
    logger, stream = capture("json")
    logger.info("poller pass: %d claimed", 3)
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "poller pass: 3 claimed"
    assert not {"job_id", "tenant", "trace_id"} & entry.keys()


def test_an_exception_stays_on_the_one_json_line():
    logger, stream = capture("json")
    try:
        raise RuntimeError("S3 is down")
    except RuntimeError:
        logger.exception("copy failed", extra=JOB)
    [line] = stream.getvalue().splitlines()
    assert "RuntimeError: S3 is down" in json.loads(line)["exc"]


def test_text_lines_keep_their_shape_and_add_tenant_and_trace_id():
    logger, stream = capture("text")
    logger.info("job succeeded", extra={**JOB, "outputs": 1})
    line = stream.getvalue().strip()
    assert " INFO " in line and "job succeeded" in line
    assert line.endswith("[job_id=job-1 tenant=acme prediction_id=pred-9 attempt=2 outputs=1 trace_id=4bf92f3577b34da6a3ce929d0e0e4736]")


API_KEY = "ws-live-0123456789abcdef"
WEBHOOK_SECRET = "whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PRESIGNED = (
    "https://bucket.s3.amazonaws.com/edits/inputs/job-1?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20261203%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261203T060000Z"
    "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=9f2c0ffee1d2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c"
)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_are_masked_on_every_line(fmt):
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        wavespeed_api_key=SecretStr(API_KEY),
        aws_secret_access_key=SecretStr(AWS_SECRET),
        callback_secret=SecretStr("whsec_" + "Y2FsbGJhY2stc2VjcmV0LXZhbHVl"),
    )
    logger, stream = capture(fmt, settings.secret_values())
    logger.error("provider refused Authorization: Bearer %s", API_KEY, extra=JOB)
    logger.warning("signing with %s failed; S3 said %s", WEBHOOK_SECRET, AWS_SECRET)
    logger.info("input given to the provider: %s", PRESIGNED, extra=JOB)
    logger.info("callback secret is %s", settings.callback_secret.get_secret_value())
    text = stream.getvalue()
    for secret in (API_KEY, WEBHOOK_SECRET, AWS_SECRET, "9f2c0ffee1d2", "AKIAEXAMPLE", "Y2FsbGJhY2stc2VjcmV0LXZhbHVl"):
        assert secret not in text, f"{secret!r} leaked into: {text}"
    assert text.count(logs.MASK) >= 6
    assert "X-Amz-Expires=3600" in text  # what is not secret stays readable
    if fmt == "json":
        assert all(json.loads(line) for line in text.splitlines())  # masking keeps every line valid JSON


def test_the_worker_and_beat_logging_hook_follows_the_log_format_setting():
    # A fresh process, as a worker or beat starts: its settings come from its environment.
    code = (
        "import logging\n"
        "from celery.signals import after_setup_logger\n"
        "import worker.engine.tasks\n"
        "logger = logging.getLogger('edit-worker-hook')\n"
        "after_setup_logger.send(sender=None, logger=logger, loglevel=logging.INFO, logfile=None, format='', colorize=False)\n"
        "logger.warning('hello', extra={'job_id': 'job-1', 'tenant': 'acme'})\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDIT_WORKER_")}
    env.update(PYTHONPATH=str(ROOT), EDIT_WORKER_LOG_FORMAT="json", WAVESPEED_API_KEY=API_KEY)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    entry = json.loads(out.stderr.strip().splitlines()[-1])
    assert (entry["message"], entry["job_id"], entry["tenant"], entry["logger"]) == ("hello", "job-1", "acme", "edit-worker-hook")
