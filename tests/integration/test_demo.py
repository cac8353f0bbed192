"""`edit-worker demo` end to end, small: it runs its own services (Redis, S3, the sandbox, a Celery
worker and beat) on free ports, and leaves a before/after contact sheet beside the local copies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from worker.devtools import imaging

pytestmark = pytest.mark.integration


def test_demo_writes_a_contact_sheet_of_each_input_beside_its_edit(tmp_path: Path):
    workdir = tmp_path / "demo"
    # The demo's own services only: none of the caller's settings leak in.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EDIT_WORKER_", "WAVESPEED_", "S3_", "AWS_", "CELERY_", "DATABASE_URL"))
    }
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--jobs", "2", "--latency", "0.5", "--dir", str(workdir), "--timeout", "150"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    sheet_path = workdir / "results" / "contact-sheet.png"
    assert "contact-sheet.png" in done.stdout
    with Image.open(sheet_path) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == imaging.sheet_size(rows=2, columns=2)
        sheet.load()
    outputs = sorted((workdir / "results").glob("*.png"))
    assert len(outputs) == 3  # two local copies and the sheet
    for output in outputs:
        if output != sheet_path:
            with Image.open(output) as edited:
                assert edited.size == (1024, 1024)
                assert len(edited.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 1  # an edit, not a flat square
