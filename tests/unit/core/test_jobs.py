"""Specification of job creation: validated, idempotent, one job + one event + one outbox row per
request, all in one transaction; and of the job JSON of the contract."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import undefer

from models import Job, JobEvent, Outbox
from worker import producer
from worker.adapters.storage import Storage
from worker.core.jobs import (
    Move,
    NewJob,
    create_jobs,
    get_job,
    job_events,
    list_jobs,
    observe_jobs,
    to_json,
    transition,
    transition_many,
    transition_now,
)
from worker.core.states import State
from worker.core.validation import ImageInput
from worker.errors import AdmissionUnavailable, IdempotencyMismatch, IllegalTransition, InvalidInput, JobNotFound, StorageError

URL = "https://images.example.com/cat.png"
BUCKET, PREFIX = "edit-worker-unit", "edits"  # as in conftest.py


def counts(sessions) -> tuple[int, int, int]:
    with sessions() as s:
        return tuple(s.scalar(select(func.count()).select_from(m)) for m in (Job, JobEvent, Outbox))


def request(key: str | None = None, prompt: str = "add a red hat") -> NewJob:
    return NewJob(image=ImageInput(ref=URL, payload=URL), prompt=prompt, size="1024*1024", seed=7, idempotency_key=key)


def test_create_jobs_writes_one_job_one_event_and_one_outbox_row_per_request(sessions, clock):
    pairs = create_jobs(sessions, [request(), request(prompt="b"), request(prompt="c")], deadline_seconds=600, clock=clock.now)
    assert [created for _, created in pairs] == [True, True, True]
    assert counts(sessions) == (3, 3, 3)
    with sessions() as s:
        for job, _ in pairs:
            row = s.get(Job, job.id)
            assert row.state == "queued" and row.attempts == 0 and row.poll_seq == 0
            assert row.created_at == clock.now()
            assert (row.deadline_at - row.created_at).total_seconds() == 600
            [event] = s.scalars(select(JobEvent).where(JobEvent.job_id == job.id))
            assert (event.from_state, event.to_state) == (None, "queued")
            [outbox] = s.scalars(select(Outbox).where(Outbox.job_id == job.id))
            assert outbox.task == "submit" and outbox.sent_at is None


def test_create_jobs_answers_in_input_order(sessions, clock):
    pairs = create_jobs(sessions, [request(prompt=p) for p in "abcde"], deadline_seconds=60, clock=clock.now)
    assert [job.prompt for job, _ in pairs] == list("abcde")


def test_the_same_idempotency_key_with_the_same_request_returns_the_same_job_and_writes_nothing(sessions, clock):
    [(first, created)] = create_jobs(sessions, [request("order-17")], deadline_seconds=60, clock=clock.now)
    assert created
    [(second, created_again)] = create_jobs(sessions, [request("order-17")], deadline_seconds=60, clock=clock.now)
    assert second.id == first.id and created_again is False
    assert counts(sessions) == (1, 1, 1)


def test_the_same_idempotency_key_with_a_different_request_is_refused_and_writes_nothing(sessions, clock):
    create_jobs(sessions, [request("order-17")], deadline_seconds=60, clock=clock.now)
    with pytest.raises(IdempotencyMismatch, match="different request"):
        create_jobs(sessions, [request("order-1"), request("order-17", prompt="a different prompt")], deadline_seconds=60, clock=clock.now)
    assert counts(sessions) == (1, 1, 1)  # not even the batch's other, new job


def test_idempotency_keys_are_per_tenant(sessions, clock):
    [(mine, _)] = create_jobs(sessions, [request("order-1")], deadline_seconds=60, clock=clock.now)
    [(theirs, created)] = create_jobs(
        sessions, [replace(request("order-1", prompt="another team's edit"), tenant="team-b")], deadline_seconds=60, clock=clock.now
    )
    assert created and theirs.id != mine.id and theirs.tenant == "team-b" and mine.tenant == "default"


def test_an_expired_idempotency_key_starts_a_new_job(sessions, clock):
    [(first, _)] = create_jobs(sessions, [request("order-9")], deadline_seconds=60, idempotency_ttl=3600, clock=clock.now)
    clock.advance(3599)
    assert create_jobs(sessions, [request("order-9")], deadline_seconds=60, idempotency_ttl=3600, clock=clock.now)[0][0].id == first.id
    clock.advance(2)
    [(again, created)] = create_jobs(
        sessions, [request("order-9", prompt="next day, new work")], deadline_seconds=60, idempotency_ttl=3600, clock=clock.now
    )
    assert created and again.id != first.id


def test_the_same_idempotency_key_twice_in_one_batch_gives_one_job(sessions, clock):
    pairs = create_jobs(sessions, [request("k1"), request("k2"), request("k1")], deadline_seconds=60, clock=clock.now)
    assert [created for _, created in pairs] == [True, True, False]
    assert pairs[0][0].id == pairs[2][0].id != pairs[1][0].id
    assert counts(sessions) == (2, 2, 2)


def test_jobs_without_a_key_are_never_merged(sessions, clock):
    create_jobs(sessions, [request(), request()], deadline_seconds=60, clock=clock.now)
    assert counts(sessions)[0] == 2


def test_get_job_of_an_unknown_id_raises_job_not_found(sessions):
    with pytest.raises(JobNotFound):
        get_job(sessions, "00000000-0000-0000-0000-000000000000")


def test_a_url_input_is_kept_as_its_url_with_no_payload_and_no_digest(sessions, new_job):
    job_id = new_job(image=URL)
    row = get_job(sessions, job_id, with_payloads=True)
    assert (row.image_ref, row.image_uri, row.image_sha256, row.image_payload) == (URL, URL, None, None)


def test_list_jobs_filters_by_state_newest_first(sessions, new_job, clock):
    first = new_job(prompt="first")
    clock.advance(1)
    second = new_job(prompt="second")
    from worker.core.states import State

    assert [j.id for j in list_jobs(sessions)] == [second, first]
    assert [j.id for j in list_jobs(sessions, state=State.QUEUED)] == [second, first]
    assert list_jobs(sessions, state=State.FAILED) == []


def test_job_json_has_the_contract_shape(sessions, new_job):
    job = get_job(sessions, new_job(idempotency_key="abc"))
    data = to_json(job)
    assert set(data) == {
        "id",
        "state",
        "prompt",
        "size",
        "seed",
        "idempotency_key",
        "prediction_id",
        "attempts",
        "outputs",
        "has_nsfw_contents",
        "error",
        "created_at",
        "updated_at",
        "finished_at",
        # DESIGN §4 additions for tenants
        "tenant",
        "priority",
        "callback_url",
        "output_urls",
        "paid_submissions",
        "cost",
    }
    assert data["tenant"] == "default" and data["priority"] == "normal" and data["cost"] == 0
    assert data["state"] == "queued" and data["error"] is None and data["outputs"] == []
    assert data["idempotency_key"] == "abc"
    assert data["created_at"].endswith("Z") and data["finished_at"] is None
    # The payload (possibly megabytes of base64) is not part of the job object.
    assert "image_payload" not in data


def test_job_events_lists_the_creation_event(sessions, new_job):
    [event] = job_events(sessions, new_job())
    assert (event.from_state, event.to_state, event.reason) == (None, "queued", "created")


# --- producer.enqueue / submit_edit ------------------------------------------------------------


def test_enqueue_inserts_the_job_and_publishes_its_first_step_once(settings, sessions, publisher, png_file, storage):
    req = producer.validate_request(image=str(png_file), prompt="make it night", settings=settings)
    [job] = producer.enqueue(settings, [req], publisher=publisher, storage=storage)
    assert counts(sessions) == (1, 1, 1)
    assert publisher.sent == [("submit", job.id, 0.0, None)]
    with sessions() as s:
        [outbox] = s.scalars(select(Outbox))
        assert outbox.sent_at is not None  # published eagerly: the relay will not send it again


def test_enqueue_keeps_the_outbox_row_when_the_broker_is_down(settings, sessions, png_file, storage):
    class DownBroker:
        def publish(self, *a, **kw):
            raise ConnectionError("broker down")

    req = producer.validate_request(image=str(png_file), prompt="make it night", settings=settings)
    [job] = producer.enqueue(settings, [req], publisher=DownBroker(), storage=storage)
    assert job.state == "queued"
    with sessions() as s:
        [outbox] = s.scalars(select(Outbox))
        assert outbox.sent_at is None  # the beat relay publishes it later


def test_submit_edit_with_the_same_idempotency_key_returns_the_same_job(settings, sessions, publisher, png_file, storage):
    first = producer.submit_edit(
        str(png_file), "make it night", idempotency_key="req-1", settings=settings, publisher=publisher, storage=storage
    )
    second = producer.submit_edit(
        str(png_file), "make it night", idempotency_key="req-1", settings=settings, publisher=publisher, storage=storage
    )
    assert first.id == second.id
    assert counts(sessions) == (1, 1, 1)
    digest = hashlib.sha256(png_file.read_bytes()).hexdigest()
    assert storage.list_keys(f"{PREFIX}/inputs/") == [f"{PREFIX}/inputs/sha256-{digest}"]  # the replay stored nothing
    assert [m[1] for m in publisher.sent] == [first.id]  # published once


def test_submit_edit_stores_a_local_file_in_s3_and_only_its_reference_and_digest_in_the_row(settings, sessions, publisher, png_file, s3):
    storage = Storage(s3, BUCKET, PREFIX)
    job = producer.submit_edit(
        str(png_file), "make it night", size="512*768", seed=3, settings=settings, publisher=publisher, storage=storage
    )
    row = get_job(sessions, job.id, with_payloads=True)
    data = png_file.read_bytes()
    key = f"{PREFIX}/inputs/sha256-{hashlib.sha256(data).hexdigest()}"
    stored = s3.get_object(Bucket=BUCKET, Key=key)
    assert (stored["Body"].read(), stored["ContentType"]) == (data, "image/png")
    assert row.image_ref == "file:input.png"
    assert row.image_uri == f"s3://{BUCKET}/{key}"
    assert row.image_sha256 == hashlib.sha256(data).hexdigest()
    assert row.image_payload is None  # no base64 in the row
    assert (row.size, row.seed) == ("512*768", 3)


def test_submit_edit_many_stores_every_distinct_input_once_under_its_digest(
    settings, sessions, publisher, png_file, tmp_path, storage, make_image
):
    jpeg = tmp_path / "second.jpg"
    jpeg.write_bytes(make_image("JPEG"))
    items = [
        {"image": str(png_file), "prompt": "one"},
        {"image": str(jpeg), "prompt": "two"},
        {"image": URL, "prompt": "three"},
        {"image": str(png_file), "prompt": "the first image again"},
    ]
    settings = settings.model_copy(update={"allow_private_urls": True})  # no DNS in unit tests
    jobs = producer.submit_edit_many(items, settings=settings, publisher=publisher, storage=storage)
    png_key, jpeg_key = (f"{PREFIX}/inputs/sha256-{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in (png_file, jpeg))
    assert storage.list_keys(f"{PREFIX}/inputs/") == sorted([png_key, jpeg_key])  # the same bytes: one object
    assert storage.get(jpeg_key) == (jpeg.read_bytes(), "image/jpeg")
    rows = [get_job(sessions, job.id) for job in jobs]
    assert [row.image_uri for row in rows] == [f"s3://{BUCKET}/{png_key}", f"s3://{BUCKET}/{jpeg_key}", URL, f"s3://{BUCKET}/{png_key}"]
    assert rows[2].image_sha256 is None  # the provider fetches a URL itself: nothing stored


def test_s3_down_at_admission_refuses_the_job_with_a_transient_error_and_writes_nothing(
    settings, sessions, publisher, png_file, down_storage
):
    with pytest.raises(AdmissionUnavailable, match="object storage is unavailable") as info:
        producer.submit_edit(str(png_file), "make it night", settings=settings, publisher=publisher, storage=down_storage)
    assert isinstance(info.value, StorageError)  # transient: the producer tries again
    assert "super-secret-s3-key" not in str(info.value)
    assert counts(sessions) == (0, 0, 0)
    assert publisher.sent == []


def test_a_url_input_needs_no_s3_at_admission(settings, sessions, publisher, down_storage):
    settings = settings.model_copy(update={"allow_private_urls": True})
    job = producer.submit_edit(URL, "make it night", settings=settings, publisher=publisher, storage=down_storage)
    assert get_job(sessions, job.id).image_uri == URL


def test_create_jobs_refuses_image_bytes_without_an_input_store(sessions, clock, make_image):
    image = ImageInput(ref="file:x.png", data=make_image("PNG"), content_type="image/png")
    with pytest.raises(ValueError, match="input store"):
        create_jobs(sessions, [NewJob(image=image, prompt="p", size="1024*1024", seed=1)], deadline_seconds=60, clock=clock.now)
    assert counts(sessions) == (0, 0, 0)


def test_the_base64_output_setting_is_the_default_for_new_jobs(settings, png_file):
    assert producer.validate_request(image=str(png_file), prompt="p", settings=settings).enable_base64_output is False
    on = settings.model_copy(update={"base64_output": True})
    assert producer.validate_request(image=str(png_file), prompt="p", settings=on).enable_base64_output is True
    assert producer.validate_request(image=str(png_file), prompt="p", settings=on, enable_base64_output=False).enable_base64_output is False


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": "x" * 121},
        {"prompt": "   "},
        {"size": "511*1024"},
        {"seed": -2},
        {"image": "/does/not/exist.png"},
        {"image": "http://127.0.0.1/cat.png"},
        {"idempotency_key": "k" * 256},
    ],
)
def test_a_validation_error_writes_no_row_and_publishes_nothing(settings, sessions, publisher, png_file, kwargs):
    args = {"image": str(png_file), "prompt": "ok", **kwargs}
    with pytest.raises(InvalidInput):
        producer.submit_edit(settings=settings, publisher=publisher, **args)
    assert counts(sessions) == (0, 0, 0)
    assert publisher.sent == []


def test_submit_edit_many_is_all_or_nothing(settings, sessions, publisher, png_file):
    items = [{"image": str(png_file), "prompt": "fine"}, {"image": str(png_file), "prompt": "y" * 121}]
    with pytest.raises(InvalidInput, match="item 2"):
        producer.submit_edit_many(items, settings=settings, publisher=publisher)
    assert counts(sessions) == (0, 0, 0)


# --- the observer (metrics) --------------------------------------------------------------------


class Observed:
    def __init__(self):
        self.calls: list[tuple] = []

    def job_created(self, tenant):
        self.calls.append(("created", tenant))

    def job_moved(self, src, dst, *, tenant, error_code, age_seconds):
        self.calls.append(("moved", src, dst, tenant, error_code, age_seconds))


def test_the_observer_hears_committed_creations_and_transitions_with_the_jobs_age(sessions, clock):
    observer = Observed()
    observe_jobs(sessions, observer)
    [(job, _)] = create_jobs(sessions, [request()], deadline_seconds=600, clock=clock.now)
    clock.advance(2.5)
    with sessions() as s:
        assert transition(s, job.id, State.QUEUED, State.SUBMITTING, "test", clock=clock.now)
        assert observer.calls == [("created", "default")]  # not before the commit
        s.commit()
    clock.advance(1.0)
    assert transition_now(sessions, job.id, State.SUBMITTING, State.FAILED, "test", clock=clock.now, error_code="rejected") is not None

    assert observer.calls == [
        ("created", "default"),
        ("moved", "queued", "submitting", "default", None, 2.5),
        ("moved", "submitting", "failed", "default", "rejected", 3.5),
    ]


def test_the_observer_never_hears_a_rolled_back_transition(sessions, clock):
    observer = Observed()
    observe_jobs(sessions, observer)
    [(job, _)] = create_jobs(sessions, [request()], deadline_seconds=600, clock=clock.now)
    with sessions() as s:
        assert transition(s, job.id, State.QUEUED, State.SUBMITTING, "test", clock=clock.now)
        s.rollback()
    with sessions() as s:
        s.commit()  # a later commit of the same kind of session reports nothing stale

    assert observer.calls == [("created", "default")]


def test_a_job_filter_pages_by_keyset_and_counts_every_state_it_selects(sessions, clock, new_job):
    from worker.core.jobs import JobFilter, count_by_state, filtered_page
    from worker.core.states import State

    wanted = []
    for i in range(5):
        wanted.append(new_job(prompt=f"a 100% red sky {i}", tenant="shop"))
        new_job(prompt=f"a blue sky {i}", tenant="shop")
        new_job(prompt=f"a 100% red sky elsewhere {i}", tenant="blog")
        clock.advance(1)
    flt = JobFilter(tenant="shop", text="100%")
    first = filtered_page(sessions, flt, limit=3)
    second = filtered_page(sessions, flt, limit=3, after=first.next_cursor)
    assert [j.id for j in first.jobs + second.jobs] == wanted[::-1]
    assert second.next_cursor is None
    assert count_by_state(sessions, JobFilter(states=(State.FAILED,), tenant="shop", text="100%")) == {"queued": 5}
    assert filtered_page(sessions, JobFilter(text="_")).jobs == []  # LIKE wildcards are literal


def test_a_batch_with_a_key_mismatch_against_an_existing_job_writes_nothing_of_the_batch(sessions, clock):
    create_jobs(sessions, [request("order-1")], deadline_seconds=60, clock=clock.now)
    before = counts(sessions)
    with pytest.raises(IdempotencyMismatch):
        create_jobs(
            sessions,
            [request(prompt="new 1"), request("order-2"), request("order-1", prompt="changed")],
            deadline_seconds=60,
            clock=clock.now,
        )
    assert counts(sessions) == before


def test_a_batch_of_many_jobs_is_one_row_each_in_order_with_keys_resolved_in_and_across_batches(sessions, clock):
    [(earlier, _)] = create_jobs(sessions, [request("k0")], deadline_seconds=60, clock=clock.now)
    batch = [request(f"k{i % 50}", prompt="add a red hat") for i in range(200)] + [request(prompt=f"unkeyed {i}") for i in range(300)]

    pairs = create_jobs(sessions, batch, deadline_seconds=60, clock=clock.now)

    assert pairs[0] == (pairs[0][0], False) and pairs[0][0].id == earlier.id
    assert [job.id for job, _ in pairs[:50]] == [job.id for job, _ in pairs[50:100]]  # the same key: the same job
    assert sum(created for _, created in pairs) == 49 + 300
    assert counts(sessions) == (1 + 49 + 300,) * 3
    assert [job.prompt for job, _ in pairs[200:]] == [f"unkeyed {i}" for i in range(300)]
    stored = get_job(sessions, pairs[-1][0].id)
    assert (stored.state, stored.prompt, stored.tenant, stored.priority, stored.paid_submissions) == (
        "queued",
        "unkeyed 299",
        "default",
        "normal",
        0,
    )


def test_submit_edit_many_over_a_tenants_rate_is_refused_whole(settings, sessions, publisher, storage):
    from worker.core import tenants
    from worker.errors import QuotaExceeded

    tenants.set_tenant(sessions, "default", rate_per_minute=3)
    settings = settings.model_copy(update={"allow_private_urls": True})
    items = [{"image": URL, "prompt": f"edit {i}"} for i in range(4)]
    with pytest.raises(QuotaExceeded):
        producer.submit_edit_many(items, settings=settings, publisher=publisher, storage=storage)
    assert counts(sessions) == (0, 0, 0) and publisher.sent == []
    assert len(producer.submit_edit_many(items[:3], settings=settings, publisher=publisher, storage=storage)) == 3


# --- transition_many ----------------------------------------------------------------------------


def _processing(sessions, job_ids: list[str], poll_seq: int) -> None:
    with sessions() as s:
        s.execute(update(Job).where(Job.id.in_(job_ids)).values(state="processing", poll_seq=poll_seq))
        s.commit()


def test_transition_many_moves_each_job_whose_claim_holds_and_writes_one_event_each(sessions, new_job):
    mine, stale, unclaimed = new_job(), new_job(), new_job()
    _processing(sessions, [mine, stale, unclaimed], poll_seq=3)
    moved = transition_many(
        sessions,
        State.PROCESSING,
        State.UPLOADING,
        [
            Move(mine, "completed (mine)", 3, {"provider_outputs": ["https://p/1.png"]}),
            Move(stale, "completed (stale)", 2, {"provider_outputs": ["https://p/2.png"]}),  # another poller holds seq 3
            Move(unclaimed, "completed (no claim)", None, {"provider_outputs": ["https://p/3.png"]}),
        ],
        next_poll_at=None,
    )
    assert set(moved) == {mine, unclaimed}
    with sessions() as s:
        rows = {j.id: j for j in s.scalars(select(Job).options(undefer(Job.provider_outputs)))}
    assert (rows[mine].state, rows[mine].provider_outputs) == ("uploading", ["https://p/1.png"])
    assert (rows[stale].state, rows[stale].provider_outputs) == ("processing", None)
    assert rows[unclaimed].provider_outputs == ["https://p/3.png"]
    assert [e.reason for e in job_events(sessions, mine)][-1] == "completed (mine)"
    assert [e.to_state for e in job_events(sessions, stale)] == ["queued"]


def test_transition_many_into_a_terminal_state_sets_finished_at_and_refuses_an_illegal_edge(sessions, new_job):
    job_id = new_job()
    with pytest.raises(IllegalTransition):
        transition_many(sessions, State.QUEUED, State.SUCCEEDED, [Move(job_id, "skip ahead")])
    _processing(sessions, [job_id], poll_seq=0)
    transition_many(sessions, State.PROCESSING, State.UPLOADING, [Move(job_id, "completed")])
    moved = transition_many(sessions, State.UPLOADING, State.SUCCEEDED, [Move(job_id, "stored", None, {"outputs": ["s3://b/k.png"]})])
    assert set(moved) == {job_id}
    job = get_job(sessions, job_id)
    assert (job.state, job.outputs) == ("succeeded", ["s3://b/k.png"])
    assert job.finished_at is not None
