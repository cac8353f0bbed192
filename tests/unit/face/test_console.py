"""Specification of the operator console (/ui): logging in with an API key (cookie, CSRF), tenant
isolation, the jobs page's filters and keyset pages, each action (cancel, retry, redeliver, bulk
by filter, settling a parked submit), health and charts — and that bad input is a 4xx page, never
a 5xx.

Everything real runs (SQLite migrated by Alembic, the engine's operator actions, the WaveSpeed
client over `httpx.MockTransport`, moto S3); the broker is a RecordingPublisher.
"""

from __future__ import annotations

import re
import warnings
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import event, func, select

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from models import CallbackDelivery, Job, Outbox
from worker.adapters.database import get_engine
from worker.api import create_app
from worker.console import SESSION_COOKIE, csrf_token
from worker.core import jobs, tenants
from worker.core.codes import ErrorCode
from worker.core.states import State

BASE = "http://127.0.0.1"


@pytest.fixture
def admin_key(sessions) -> str:
    return tenants.create_key(sessions, "default", admin=True).key.get_secret_value()


@pytest.fixture
def shop_key(sessions) -> str:
    return tenants.create_key(sessions, "shop").key.get_secret_value()


@pytest.fixture
def app(settings, deps, publisher):
    return create_app(settings, deps_factory=lambda: deps, publisher=publisher, storage=deps.storage)


def login(app, key: str, base_url: str = BASE) -> TestClient:
    """A browser that logged in with `key` through the login form."""
    browser = TestClient(app, base_url=base_url)
    form = browser.get("/ui/login")
    assert form.status_code == 200
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    answer = browser.post("/ui/login", data={"key": key, "csrf": token}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    return browser


def csrf_of(page: httpx.Response) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def fail(sessions, job_id: str, code: str = "task_failed", message: str = "the model could not process the image") -> None:
    with sessions() as session:
        assert jobs.transition(session, job_id, State.QUEUED, State.FAILED, "test: failed", error_code=code, error_message=message)
        session.commit()


def state_of(sessions, job_id: str) -> str:
    return jobs.get_job(sessions, job_id).state


# --- logging in -------------------------------------------------------------------------------


def test_without_a_key_every_page_leads_to_the_login_form(app):
    browser = TestClient(app, base_url=BASE)
    for path in ("/ui", "/ui/jobs", "/ui/health", "/ui/charts", "/ui/jobs/00000000-0000-0000-0000-000000000000"):
        answer = browser.get(path, follow_redirects=False)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/ui/"), path
    landed = browser.get("/ui/jobs?state=failed")
    assert landed.status_code == 200 and 'name="key"' in landed.text
    assert 'name="next" value="/ui/jobs?state=failed"' in landed.text
    assert browser.get("/ui/api/counts").status_code == 401


def test_a_good_key_logs_in_with_a_strict_httponly_cookie_and_is_never_shown(app, admin_key, new_job):
    new_job(prompt="find me")
    browser = TestClient(app, base_url=BASE)
    token = csrf_of(browser.get("/ui/login"))
    answer = browser.post("/ui/login", data={"key": admin_key, "csrf": token}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/jobs"
    cookie = next(h for h in answer.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http on 127.0.0.1 (the tests); https sets Secure
    page = browser.get("/ui/jobs")
    assert page.status_code == 200 and "find me" in page.text
    for path in ("/ui/jobs", "/ui/health", "/ui/charts"):
        assert admin_key not in browser.get(path).text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_over_https_the_cookie_is_secure(app, admin_key):
    browser = login(app, admin_key, base_url="https://console.example.com")
    assert browser.get("/ui/jobs").status_code == 200


def test_plain_http_off_loopback_refuses_to_take_a_key(app, admin_key):
    browser = TestClient(app, base_url="http://console.example.com")
    token = csrf_of(browser.get("/ui/login"))
    answer = browser.post("/ui/login", data={"key": admin_key, "csrf": token}, follow_redirects=False)
    assert answer.status_code == 400 and "https" in answer.text
    assert SESSION_COOKIE + "=" not in answer.headers.get("set-cookie", "")


def test_a_bad_or_revoked_key_is_refused_and_not_echoed(app, sessions):
    new = tenants.create_key(sessions, "shop")
    tenants.revoke_key(sessions, new.key_id)
    browser = TestClient(app, base_url=BASE)
    for key in ("ewk_not-a-key", new.key.get_secret_value()):
        token = csrf_of(browser.get("/ui/login"))
        answer = browser.post("/ui/login", data={"key": key, "csrf": token}, follow_redirects=False)
        assert answer.status_code == 401 and "unknown or revoked" in answer.text
        assert key not in answer.text
        assert SESSION_COOKIE + "=" not in answer.headers.get("set-cookie", "")


def test_the_login_form_needs_its_own_csrf_token(app, admin_key):
    browser = TestClient(app, base_url=BASE)
    browser.get("/ui/login")
    answer = browser.post("/ui/login", data={"key": admin_key, "csrf": "forged"}, follow_redirects=False)
    assert answer.status_code == 403
    assert browser.get("/ui/jobs", follow_redirects=False).status_code == 303  # not logged in


def test_login_goes_back_only_into_the_console(app, admin_key):
    browser = TestClient(app, base_url=BASE)
    token = csrf_of(browser.get("/ui/login"))
    answer = browser.post("/ui/login", data={"key": admin_key, "csrf": token, "next": "//evil.example.com/x"}, follow_redirects=False)
    assert answer.headers["location"] == "/ui/jobs"


def test_logout_needs_the_csrf_token_and_ends_the_session(app, admin_key):
    browser = login(app, admin_key)
    assert browser.post("/ui/logout", data={}, follow_redirects=False).status_code == 403
    assert browser.get("/ui/jobs", follow_redirects=False).status_code == 200
    answer = browser.post("/ui/logout", data={"csrf": csrf_token(admin_key)}, follow_redirects=False)
    assert answer.status_code == 303
    assert browser.get("/ui/jobs", follow_redirects=False).status_code == 303


# --- tenant isolation -------------------------------------------------------------------------


def test_a_tenant_key_sees_and_acts_only_on_its_own_jobs(app, shop_key, new_job, sessions):
    mine = new_job(prompt="shop's own edit", tenant="shop")
    theirs = new_job(prompt="another tenant's edit", tenant="other")
    fail(sessions, theirs)
    browser = login(app, shop_key)
    listing = browser.get("/ui/jobs").text
    assert "shop&#39;s own edit" in listing and "another tenant" not in listing
    assert browser.get(f"/ui/jobs/{mine}").status_code == 200
    assert browser.get(f"/ui/jobs/{theirs}").status_code == 404
    assert browser.get(f"/ui/jobs/{theirs}/outputs/0").status_code == 404
    token = csrf_token(shop_key)
    for action in ("cancel", "retry", "redeliver", "settle"):
        answer = browser.post(f"/ui/jobs/{theirs}/{action}", data={"csrf": token, "resubmit": "1"})
        assert answer.status_code == 404, action
    assert state_of(sessions, theirs) == "failed"
    assert browser.get("/ui/jobs?tenant=other").status_code == 403
    assert browser.get("/ui/api/counts").json()["total"] == 1
    # Bulk retry by a tenant touches only its own failed jobs.
    browser.post("/ui/bulk", data={"csrf": token, "action": "retry"})
    assert state_of(sessions, theirs) == "failed"


def test_an_admin_sees_every_tenant_and_filters_by_one(app, admin_key, new_job):
    new_job(prompt="edit for shop", tenant="shop")
    new_job(prompt="edit for blog", tenant="blog")
    browser = login(app, admin_key)
    everything = browser.get("/ui/jobs").text
    assert "edit for shop" in everything and "edit for blog" in everything
    only_blog = browser.get("/ui/jobs?tenant=blog").text
    assert "edit for blog" in only_blog and "edit for shop" not in only_blog


# --- CSRF on actions ----------------------------------------------------------------------------


def test_an_action_without_the_csrf_token_is_refused_and_changes_nothing(app, admin_key, new_job, sessions):
    job_id = new_job()
    browser = login(app, admin_key)
    for data in ({}, {"csrf": "0" * 64}, {"csrf": csrf_token("another key")}):
        answer = browser.post(f"/ui/jobs/{job_id}/cancel", data=data)
        assert answer.status_code == 403, data
    assert state_of(sessions, job_id) == "queued"
    assert browser.post("/ui/bulk", data={"action": "cancel"}).status_code == 403
    assert state_of(sessions, job_id) == "queued"


def test_an_action_without_a_session_is_refused(app, new_job, sessions):
    job_id = new_job()
    answer = TestClient(app, base_url=BASE).post(f"/ui/jobs/{job_id}/cancel", data={"csrf": "x"})
    assert answer.status_code == 401
    assert state_of(sessions, job_id) == "queued"


# --- the jobs page --------------------------------------------------------------------------


def test_filters_by_state_error_code_text_and_creation_time(app, admin_key, new_job, sessions, clock):
    early = new_job(prompt="an early edit", idempotency_key="order-17")
    clock.advance(3600)
    moderated = new_job(prompt="a moderated edit")
    fail(sessions, moderated, code="1200", message="moderation")
    timeout = new_job(prompt="a timed out edit")
    fail(sessions, timeout, code=ErrorCode.DEADLINE.value)
    browser = login(app, admin_key)

    def shown(query: str) -> set[str]:
        page = browser.get(f"/ui/jobs?{query}")
        assert page.status_code == 200, page.text
        return {jid for jid in (early, moderated, timeout) if f"/ui/jobs/{jid}" in page.text}

    assert shown("") == {early, moderated, timeout}
    assert shown("state=failed") == {moderated, timeout}
    assert shown("state=failed&error_code=1200") == {moderated}
    assert shown("q=TIMED") == {timeout}
    assert shown("q=order-17") == {early}
    assert shown("q=%25") == set()  # a literal %, not a wildcard
    cut = (clock.now() - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M")
    assert shown(f"created_from={cut}") == {moderated, timeout}
    assert shown(f"created_to={cut}") == {early}
    counts = browser.get("/ui/api/counts?error_code=1200").json()
    assert counts["counts"]["failed"] == 1 and counts["total"] == 1


def test_pages_follow_the_keyset_and_never_use_offset(app, admin_key, new_job, clock, database_url):
    ids = []
    for i in range(57):
        ids.append(new_job(prompt=f"edit {i}"))
        clock.advance(1)
    browser = login(app, admin_key)
    statements: list[str] = []
    engine = get_engine(database_url)

    def record(conn, cursor, statement, parameters, *args):
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        first = browser.get("/ui/jobs")
        older = re.search(r'href="(/ui/jobs\?[^"]*cursor=[^"]+)"', first.text).group(1).replace("&amp;", "&")
        second = browser.get(older)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    on_first = {jid for jid in ids if f"/ui/jobs/{jid}" in first.text}
    on_second = {jid for jid in ids if f"/ui/jobs/{jid}" in second.text}
    assert len(on_first) == 50 and len(on_second) == 7
    assert on_first | on_second == set(ids) and not on_first & on_second
    assert set(ids[-50:]) == on_first  # newest first
    assert 'data-testid="next-page"' not in second.text
    # SQLite's dialect always writes `LIMIT ? OFFSET ?`; the offset bound is 0 on every page.
    pages = [(s, p) for s, p in statements if "ORDER BY jobs.created_at DESC" in s]
    assert len(pages) == 2 and all(p[-1] == 0 for s, p in pages if "OFFSET" in s)
    assert "(jobs.created_at, jobs.id) <" in pages[1][0]  # the second page seeks by keyset


@pytest.mark.parametrize(
    "query",
    [
        "state=bogus",
        "state=%00",
        "created_from=yesterday",
        "created_from=2026-01-02T00:00&created_to=2026-01-01T00:00",
        "since=3w",
        "q=" + "x" * 300,
        "q=%00",
        "cursor=not-a-cursor",
        "cursor=" + "a" * 500,
        "tenant=" + "t" * 100,
    ],
)
def test_bad_filters_answer_4xx_pages_never_5xx(app, admin_key, query):
    browser = login(app, admin_key)
    answer = browser.get(f"/ui/jobs?{query}")
    assert 400 <= answer.status_code < 500, (query, answer.status_code)
    assert 'data-testid="error"' in answer.text
    assert 400 <= browser.get(f"/ui/api/counts?{query}").status_code < 500 or "cursor" in query
    assert 400 <= browser.get(f"/ui/bulk?action=retry&{query}").status_code < 500 or "cursor" in query


@pytest.mark.parametrize(
    "path",
    [
        "/ui/jobs/%00",
        "/ui/jobs/" + "a" * 80,
        "/ui/jobs/nope/outputs/0",
        "/ui/jobs/nope/outputs/-1",
        "/ui/jobs/nope/input",
        "/ui/charts?window=1y",
        "/ui/bulk?action=delete",
    ],
)
def test_bad_paths_answer_4xx(app, admin_key, path):
    browser = login(app, admin_key)
    answer = browser.get(path)
    assert 400 <= answer.status_code < 500, (path, answer.status_code)


# --- one job and its actions ------------------------------------------------------------------


def test_the_job_page_tells_why_a_job_failed_with_its_timeline_and_raw_json(app, admin_key, new_job, sessions):
    job_id = new_job(prompt="a failing edit")
    fail(sessions, job_id, code="1200", message="the prompt was refused by moderation")
    page = login(app, admin_key).get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200
    why = page.text[page.text.index('data-testid="job-error"') :]
    assert "1200" in why[:400] and "refused by moderation" in why[:400]
    timeline = page.text[page.text.index('data-testid="timeline"') :]
    assert "created" in timeline and "test: failed" in timeline
    assert f"&#34;id&#34;: &#34;{job_id}&#34;" in page.text  # the raw JSON, escaped
    assert 'data-testid="retry"' in page.text and 'data-testid="cancel"' not in page.text


def test_a_finished_job_shows_its_input_and_output_thumbnails(app, admin_key, new_job, drive, make_image):
    import base64

    job_id = new_job(image="data:image/png;base64," + base64.b64encode(make_image()).decode())
    drive(job_id)
    browser = login(app, admin_key)
    page = browser.get(f"/ui/jobs/{job_id}")
    assert f'src="/ui/jobs/{job_id}/input"' in page.text and f'src="/ui/jobs/{job_id}/outputs/0"' in page.text
    for path in (f"/ui/jobs/{job_id}/input", f"/ui/jobs/{job_id}/outputs/0"):
        link = browser.get(path, follow_redirects=False)
        assert link.status_code == 307 and "X-Amz-Signature" in link.headers["location"]
    assert browser.get(f"/ui/jobs/{job_id}/outputs/1", follow_redirects=False).status_code == 404


def test_cancel_from_the_console(app, admin_key, new_job, sessions):
    job_id = new_job()
    browser = login(app, admin_key)
    answer = browser.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": csrf_token(admin_key)})
    assert answer.status_code == 200 and "Job cancelled." in answer.text
    assert state_of(sessions, job_id) == "cancelled"
    again = browser.post(f"/ui/jobs/{job_id}/retry", data={"csrf": csrf_token(admin_key)})
    assert again.status_code == 409  # a cancelled job cannot be retried


def test_retry_from_the_console_replays_and_publishes(app, admin_key, new_job, sessions, publisher):
    job_id = new_job()
    fail(sessions, job_id)
    answer = login(app, admin_key).post(f"/ui/jobs/{job_id}/retry", data={"csrf": csrf_token(admin_key)})
    assert answer.status_code == 200 and "replayed" in answer.text
    job = jobs.get_job(sessions, job_id)
    assert job.state == "queued" and job.error_code is None
    assert publisher.sent  # the outbox row went out at once (the relay)


def test_redeliver_a_callback_from_the_console(app, admin_key, new_job, sessions, clock):
    job_id = new_job()
    with sessions() as session:
        session.execute(Job.__table__.update().where(Job.id == job_id).values(callback_url="https://hooks.example.com/done"))
        session.commit()
    fail(sessions, job_id)
    with sessions() as session:
        session.execute(CallbackDelivery.__table__.update().where(CallbackDelivery.job_id == job_id).values(status="failed", attempts=5))
        session.commit()
    browser = login(app, admin_key)
    assert 'data-testid="redeliver"' in browser.get(f"/ui/jobs/{job_id}").text
    answer = browser.post(f"/ui/jobs/{job_id}/redeliver", data={"csrf": csrf_token(admin_key)})
    assert answer.status_code == 200 and "due again" in answer.text
    with sessions() as session:
        assert session.scalar(select(CallbackDelivery.status).where(CallbackDelivery.job_id == job_id)) == "pending"


def test_redeliver_without_a_delivery_is_a_409(app, admin_key, new_job):
    job_id = new_job()
    answer = login(app, admin_key).post(f"/ui/jobs/{job_id}/redeliver", data={"csrf": csrf_token(admin_key)})
    assert answer.status_code == 409


# --- bulk actions -----------------------------------------------------------------------------


def test_bulk_retry_replays_exactly_the_failed_jobs_the_filter_shows(app, admin_key, new_job, sessions):
    deadline = [new_job(prompt=f"deadline {i}") for i in range(3)]
    moderated = new_job(prompt="moderated")
    waiting = new_job(prompt="still queued")
    for job_id in deadline:
        fail(sessions, job_id, code=ErrorCode.DEADLINE.value)
    fail(sessions, moderated, code="1200")
    browser = login(app, admin_key)
    confirm = browser.get("/ui/bulk?action=retry&error_code=deadline_exceeded&since=1h")
    assert confirm.status_code == 200
    assert re.search(r'data-testid="bulk-count"><b>3</b>', confirm.text)
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', confirm.text))
    assert form["error_code"] == "deadline_exceeded" and form["since"] == "1h"
    done = browser.post("/ui/bulk", data=form)
    assert done.status_code == 200 and "(3 job(s))" in done.text
    assert [state_of(sessions, j) for j in deadline] == ["queued"] * 3
    assert state_of(sessions, moderated) == "failed" and state_of(sessions, waiting) == "queued"


def test_bulk_cancel_by_filter(app, admin_key, new_job, sessions):
    keep = new_job(prompt="keep me")
    drop = [new_job(prompt=f"drop me {i}") for i in range(2)]
    browser = login(app, admin_key)
    done = browser.post("/ui/bulk", data={"csrf": csrf_token(admin_key), "action": "cancel", "q": "drop me"})
    assert done.status_code == 200 and "(2 job(s))" in done.text
    assert [state_of(sessions, j) for j in drop] == ["cancelled"] * 2
    assert state_of(sessions, keep) == "queued"


# --- settling a parked ambiguous submit ---------------------------------------------------------


def parked(deps, new_job, fake_provider, clock, load, prompts=("a", "b")) -> list[str]:
    """Ambiguous submits in one window, each of which made a task: parked for an operator."""
    from worker.engine.reconciler import resolve_ambiguous
    from worker.engine.submit import run_submit

    ids = []
    for prompt in prompts:
        fake_provider.script("submit", fake_provider.After(httpx.ReadTimeout("read timed out")))
        job_id = new_job(prompt=prompt)
        assert run_submit(deps, job_id) is None
        ids.append(job_id)
    s = deps.settings
    clock.advance(s.http_timeout + 2 * s.ambiguous_skew_seconds + s.ambiguous_list_grace_seconds + 1)
    for job_id in ids:
        assert resolve_ambiguous(deps, load(job_id)) == "needs_operator"
    return ids


def test_a_parked_submit_is_settled_by_choosing_its_provider_task(app, admin_key, deps, new_job, fake_provider, clock, load):
    a, b = parked(deps, new_job, fake_provider, clock, load)
    task_of = {t.body["prompt"]: t.id for t in fake_provider.submissions}
    browser = login(app, admin_key)
    page = browser.get(f"/ui/jobs/{a}")
    assert 'data-testid="settle"' in page.text
    assert task_of["a"] in page.text and task_of["b"] in page.text  # both candidates offered
    answer = browser.post(f"/ui/jobs/{a}/settle", data={"csrf": csrf_token(admin_key), "adopt": task_of["a"]})
    assert answer.status_code == 200 and "adopted" in answer.text
    assert load(a).prediction_id == task_of["a"] and load(a).state == "processing"
    # With one job and one task left in the window, the reconciler settles the other by itself.
    assert load(b).prediction_id == task_of["b"]
    assert len(fake_provider.submissions) == 2  # nothing paid twice


def test_settling_refuses_another_jobs_task_and_unclear_answers(app, admin_key, deps, new_job, fake_provider, clock, load, sessions):
    a, _b = parked(deps, new_job, fake_provider, clock, load)
    other = new_job(prompt="done elsewhere")
    with sessions() as session:
        session.execute(Job.__table__.update().where(Job.id == other).values(prediction_id="pred-elsewhere"))
        session.commit()
    browser = login(app, admin_key)
    token = csrf_token(admin_key)
    assert browser.post(f"/ui/jobs/{a}/settle", data={"csrf": token, "adopt": "pred-elsewhere"}).status_code == 409
    assert browser.post(f"/ui/jobs/{a}/settle", data={"csrf": token}).status_code == 422
    assert browser.post(f"/ui/jobs/{a}/settle", data={"csrf": token, "adopt": "x", "resubmit": "1"}).status_code == 422
    assert browser.post(f"/ui/jobs/{other}/settle", data={"csrf": token, "resubmit": "1"}).status_code == 409  # not submitting
    assert load(a).state == "submitting" and load(a).prediction_id is None


def test_a_parked_submit_can_be_resubmitted(app, admin_key, deps, new_job, fake_provider, clock, load):
    a, _b = parked(deps, new_job, fake_provider, clock, load)
    answer = login(app, admin_key).post(f"/ui/jobs/{a}/settle", data={"csrf": csrf_token(admin_key), "resubmit": "1"})
    assert answer.status_code == 200 and "submitted again" in answer.text
    assert load(a).state in ("queued", "submitting")


# --- health and charts --------------------------------------------------------------------------


def test_health_shows_the_breaker_the_slots_the_backlog_and_the_workers(app, admin_key, deps, new_job, sessions):
    for _ in range(2):
        new_job()
    deps.fleet.heartbeat("celery@node-1", {"pid": 4242, "host": "node-1"})
    deps.breaker.trip(30, "provider refused the credentials (401)")
    page = login(app, admin_key).get("/ui/health")
    assert page.status_code == 200
    assert "celery@node-1" in page.text and "4242" in page.text
    assert "provider refused the credentials" in page.text
    verdict = page.text[page.text.index('data-testid="verdict"') :][:400]
    assert "provider is the bottleneck" in verdict and "breaker is open" in verdict
    queued = page.text[page.text.index('data-testid="queued"') :][:80]
    assert ">2" in queued
    with sessions() as session:
        unsent = session.scalar(select(func.count()).select_from(Outbox).where(Outbox.sent_at.is_(None)))
    assert f">{unsent} unsent" in page.text


def test_health_names_full_provider_slots_as_the_bottleneck(app, admin_key, deps, new_job):
    new_job()
    deps.fleet.heartbeat("celery@node-1", {"pid": 1, "host": "node-1"})
    for i in range(deps.settings.max_concurrency):
        deps.limiter.acquire(f"job-{i}")
    page = login(app, admin_key).get("/ui/health")
    assert "concurrency slots are in use" in page.text


def test_health_says_when_no_worker_is_alive(app, admin_key):
    page = login(app, admin_key).get("/ui/health")
    assert "No worker has been seen" in page.text


@pytest.mark.parametrize("window", ["1h", "24h", "7d"])
def test_charts_render_svg_for_each_window(app, admin_key, new_job, sessions, drive, window):
    drive(new_job(prompt="fine"))
    fail(sessions, new_job(prompt="broken"), code="1200")
    page = login(app, admin_key).get(f"/ui/charts?window={window}")
    assert page.status_code == 200
    assert page.text.count("<svg") >= 5
    assert "succeeded: 1" in page.text and "failed: 1" in page.text  # bar tooltips
    assert "1200" in page.text


def test_the_console_is_not_in_the_openapi_document(app):
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]


def test_the_console_serves_its_static_files(app):
    client = TestClient(app)
    assert "refreshCounts" in client.get("/ui/static/console.js").text
    assert client.get("/ui/static/console.css").status_code == 200
    assert client.get("/ui/static/../console.py").status_code == 404
