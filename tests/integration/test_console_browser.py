"""The operator console in a real browser (Chromium driven by Playwright) against the real stack:
`edit-worker api` on 127.0.0.1, Celery workers and beat, PostgreSQL, Redis, the S3 server and the
sandbox provider with its fault injection. An operator logs in, filters, finds why jobs failed,
retries one, bulk-retries the rest by filter, settles parked ambiguous submits by choosing their
provider tasks, and reads the health and chart pages. Each page is saved as a screenshot under
EDIT_WORKER_ARTIFACTS (default: pytest's tmp dir).

Skipped when /usr/bin/chromium is absent, unless EDIT_WORKER_REQUIRE_BROWSER=1 (CI sets it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.devtools import local

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FAST_AMBIGUITY = dict(EDIT_WORKER_AMBIGUOUS_SKEW_SECONDS="2", EDIT_WORKER_AMBIGUOUS_LIST_GRACE_SECONDS="2")

if not CHROMIUM.exists():
    if os.environ.get("EDIT_WORKER_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"EDIT_WORKER_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is not installed (set EDIT_WORKER_REQUIRE_BROWSER=1 to fail instead)", allow_module_level=True)

if os.environ.get("EDIT_WORKER_REQUIRE_BROWSER") == "1":
    from playwright.sync_api import sync_playwright  # missing: an ImportError fails the run, never a skip
else:
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    where = os.environ.get("EDIT_WORKER_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("console-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Console:
    """The API process with the console, an admin key, and a logged-in browser page."""

    def __init__(self, cluster, browser, artifacts: Path, name: str):
        port = local.free_port()
        self.api = local.Service(
            "api", [sys.executable, "-m", "worker.cli", "api", "--port", str(port)], port, cluster.workdir / "api.log", env=cluster.env
        ).start()
        cluster.processes.append(self.api)
        self.base = f"http://127.0.0.1:{port}"
        self.key = json.loads(cluster.cli("keys", "create", "--tenant", "default", "--admin", "--json").stdout)["key"]
        self.context = browser.new_context(viewport={"width": 1360, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.page.on("dialog", lambda dialog: dialog.accept())  # the actions' confirm() questions
        self.artifacts = artifacts
        self.name = name

    def open(self, path: str) -> None:
        self.page.goto(self.base + path)

    def login(self) -> None:
        self.open("/ui/jobs")
        assert "/ui/login" in self.page.url
        self.page.fill("input[name=key]", self.key)
        self.page.click("button:has-text('Log in')")
        self.page.wait_for_url(re.compile(r".*/ui/jobs.*"))
        assert self.key not in self.page.content()

    def shot(self, what: str) -> Path:
        path = self.artifacts / f"{self.name}-{what}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def reload_until(self, predicate, timeout: float, what: str, cluster) -> None:
        cluster.wait_until(lambda: (self.page.reload(), predicate())[1], timeout, what, poll=1.0)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def console(cluster, browser, artifacts, request) -> Iterator[Console]:
    c = Console(cluster, browser, artifacts, request.node.name.removeprefix("test_")[:40])
    try:
        yield c
    finally:
        c.close()


def submit(cluster, image, n: int, tag: str):
    return [cluster.submit(str(image), f"{tag} #{i}", size="512*512", seed=i) for i in range(n)]


def test_an_operator_finds_why_jobs_failed_retries_one_and_bulk_retries_the_rest(cluster, sample_image, console):
    cluster.sandbox_config(fail_rate=1.0)
    cluster.start_worker("w1", concurrency=2)
    cluster.start_beat()
    failing = submit(cluster, sample_image, 3, "doomed edit")
    cluster.wait_all_terminal(3, timeout=60)
    cluster.sandbox_config(fail_rate=0.0)

    page = console.page
    console.login()
    # Live counts (refreshed by the page's fetch) and the state filter.
    page.wait_for_selector("[data-count-state=failed]:has-text('3')")
    page.select_option("select[name=state]", "failed")
    page.click("button:has-text('Filter')")
    page.wait_for_url(re.compile(r".*state=failed.*"))
    rows = page.locator("[data-testid=jobs] tbody tr")
    assert rows.count() == 3
    console.shot("jobs-failed")

    # One job: why it failed, its timeline, its raw JSON.
    first = failing[0]
    page.click(f"a[href='/ui/jobs/{first.id}']")
    page.wait_for_selector("[data-testid=job-error]")
    assert "sandbox: injected task failure" in page.inner_text("[data-testid=job-error]")
    assert "task_failed" in page.inner_text("[data-testid=job-error]")
    assert "processing" in page.inner_text("[data-testid=timeline]")
    console.shot("job-failed")

    # Retry it (confirm() accepted): it runs again and succeeds.
    page.click("[data-testid=retry]")
    page.wait_for_selector(".notice")
    console.reload_until(lambda: page.inner_text("[data-testid=job-state]") == "succeeded", 60, "the retried job to succeed", cluster)
    page.wait_for_selector(f"img[src='/ui/jobs/{first.id}/outputs/0']")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.thumbs img')].every(img => img.complete && img.naturalWidth > 0)", timeout=20_000
    )
    console.shot("job")

    # Bulk: every job that failed with task_failed in the last hour, from the filter.
    console.open("/ui/jobs?state=failed&error_code=task_failed&since=1h")
    assert page.locator("[data-testid=jobs] tbody tr").count() == 2
    page.click("[data-testid=bulk-retry]")
    assert "2" in page.inner_text("[data-testid=bulk-count]")
    console.shot("bulk-confirm")
    page.click("[data-testid=bulk-confirm]")
    page.wait_for_selector(".notice:has-text('2 job(s)')")
    done = cluster.wait_all_terminal(3, timeout=60)
    assert [j.state for j in done] == ["succeeded"] * 3
    for job in done:
        cluster.assert_outputs_byte_equal(job)
    assert all(j.attempts == 2 for j in done)  # one failed submission and one replay each, nothing more

    console.open("/ui/jobs")
    page.wait_for_selector("[data-count-state=succeeded]:has-text('3')")
    console.shot("jobs")


@pytest.mark.worker_env(**FAST_AMBIGUITY)
def test_an_operator_settles_parked_ambiguous_submits_by_choosing_their_provider_tasks(cluster, sample_image, console):
    # Every submit creates its task, then answers after 8 s: past the 5 s client timeout. Three at
    # once in one window cannot be told apart from the provider's list: they are parked.
    cluster.sandbox_config(slow_submit_rate=1.0, slow_submit_seconds=8.0)
    cluster.start_worker("w1", concurrency=4)
    cluster.start_beat()
    jobs = submit(cluster, sample_image, 3, "ambiguous edit")
    cluster.wait_until(lambda: cluster.sandbox_stats()["submissions"] == 3, 20, "every submit to arrive")
    cluster.sandbox_config(slow_submit_rate=0.0)

    def all_parked():
        current = cluster.jobs()
        return all(j.state == "submitting" and j.error_code == "ambiguous_submit_needs_operator" for j in current) and current

    cluster.wait_until(all_parked, 40, "every ambiguous submit to be parked for the operator")
    task_of = {t["prompt"]: t["id"] for t in cluster.sandbox_stats()["tasks"]}

    page = console.page
    console.login()
    console.open("/ui/health")
    assert "waiting for an operator" in page.inner_text("main")
    console.open("/ui/jobs?state=submitting&error_code=ambiguous_submit_needs_operator")
    assert page.locator("[data-testid=jobs] tbody tr").count() == 3

    for job in jobs[:-1]:
        console.open(f"/ui/jobs/{job.id}")
        page.wait_for_selector("[data-testid=settle]")
        settle = page.inner_text("[data-testid=settle]")
        # Its own task is offered, among the others of its submit's time window.
        assert task_of[job.prompt] in settle
        if job is jobs[0]:
            console.shot("settle")
        page.check(f"input[name=adopt][value='{task_of[job.prompt]}']")
        page.click("[data-testid=adopt]")
        page.wait_for_selector(".notice:has-text('adopted')")
        assert page.inner_text("[data-testid=prediction-id]") == task_of[job.prompt]
    # With one job and one task left in the window, the reconciler settled the last by itself.
    done = cluster.wait_all_terminal(3, timeout=60)
    assert [j.state for j in done] == ["succeeded"] * 3
    assert {j.prompt: j.prediction_id for j in done} == {j.prompt: task_of[j.prompt] for j in jobs}
    cluster.assert_one_submission_per_job(done)


def test_health_and_charts_show_the_workers_the_provider_and_the_history(cluster, sample_image, console):
    cluster.start_worker("w1", concurrency=2)
    cluster.start_worker("w2", concurrency=2)
    cluster.start_beat()
    submit(cluster, sample_image, 4, "charted edit")
    cluster.wait_all_terminal(4, timeout=60)

    page = console.page
    console.login()
    console.open("/ui/health")
    # Every worker pool process beats (Fleet.heartbeat, named host:pid): two workers of two
    # processes each are four rows, all on this host.
    cluster.wait_until(
        lambda: (page.reload(), page.locator("[data-testid=workers] tbody tr").count() == 4)[1], 30, "four worker processes seen", poll=1.0
    )
    hosts = page.locator("[data-testid=workers] tbody tr td:nth-child(2)").all_inner_texts()
    assert hosts == [socket.gethostname()] * 4
    assert "closed" in page.inner_text("[data-testid=breaker]")
    assert "No bottleneck" in page.inner_text("[data-testid=verdict]")
    console.shot("health")

    console.open("/ui/charts?window=1h")
    assert page.locator("svg.chart").count() >= 3
    # The paid-work table: tenant, jobs, paid submissions, cost.
    assert re.search(r"<td>default</td><td>4</td><td>4</td>", page.content())
    console.shot("charts")
