"""Specification of the job pipeline (submit, poll, upload, cancel, retry) against the in-memory
provider, moto S3 and SQLite, on a fake clock. Celery is replaced by calling the step the
previous step returned (`drive`)."""

from __future__ import annotations

import base64
from datetime import timedelta

import httpx
import pytest

from conftest_helpers import After  # noqa: F401  (re-exported by conftest via pytest plugin path)
