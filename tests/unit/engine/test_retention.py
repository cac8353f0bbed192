"""Specification of retention (`edit-worker prune`): finished jobs that finished before the cutoff go,
with their events and outbox rows and, with objects, their input and output objects in S3; nothing
unfinished or recent is touched; a dry run deletes nothing; S3 down deletes no row."""

from __future__ import annotations

import base64
import io
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from models import Job, JobEvent, Outbox
from worker.core.jobs import transition
from worker.core.states import State
from worker.engine.operator import cancel_job
from worker.engine.retention import parse_cutoff, prune_finished
from worker.errors import InvalidInput, StorageError

PREFIX = "edits"  # as in conftest.py


def counts(sessions) -> tuple[int, int, int]:
    with sessions() as s:
        return tuple(s.scalar(select(func.count()).select_from(m)) for m in (Job, JobEvent, Outbox))


def age(sessions, job_id: str, finished_at) -> None:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(finished_at=finished_at))
        session.commit()


@pytest.fixture
def finished_mix(deps, new_job, drive, sessions, clock, storage, make_image):
    """Jobs of every kind, with inputs in S3: three finished 40 days ago (succeeded with an output,
    failed after a partial copy, cancelled), one succeeded just now, one still queued from long ago."""

    colors = iter(range(1, 100))

    def stored(prompt: str) -> str:
        # Each job its own image: inputs are stored by content, one object per distinct image.
        image = make_image("PNG", color=(next(colors), 0, 0))
        return new_job(prompt=prompt, image="data:image/png;base64," + base64.b64encode(image).decode())

    old_ok, recent_ok = stored("old success"), stored("recent success")
    drive(old_ok)
    drive(recent_ok)
    old_failed = stored("old failure")
    with sessions() as session:
        transition(session, old_failed, State.QUEUED, State.FAILED, "the provider refused", clock=deps.clock, prediction_id="pred-old")
        session.commit()
    storage.put(storage.key_for(old_failed, 1, "png"), io.BytesIO(make_image("PNG")), "image/png")  # a copy cut short
    old_cancelled = stored("old cancel")
    cancel_job(deps, old_cancelled)
    still_queued = stored("still queued")
    long_ago = clock.now() - timedelta(days=40)
    for job_id in (old_ok, old_failed, old_cancelled):
        age(sessions, job_id, long_ago)
    with sessions() as session:
        session.execute(update(Job).where(Job.id == still_queued).values(created_at=long_ago, updated_at=long_ago))
        session.commit()
    return {"old": [old_ok, old_failed, old_cancelled], "kept": [recent_ok, still_queued]}


def keys_of(list_keys, job_id: str, sessions=None) -> list[str]:
    """The job's objects: its outputs (named by its id) and, given `sessions`, its stored input."""
    keys = list_keys()
    owned = [k for k in keys if job_id in k]
    if sessions is not None:
        with sessions() as s:
            uri = s.scalar(select(Job.image_uri).where(Job.id == job_id))
        owned += [k for k in keys if uri and uri.endswith("/" + k)]
    return sorted(owned)


def input_key(sessions, job_id: str) -> str:
    with sessions() as s:
        return s.scalar(select(Job.image_uri).where(Job.id == job_id)).split("/", 3)[3]


def test_prune_deletes_finished_jobs_older_than_the_cutoff_with_their_events_and_outbox_rows_but_keeps_objects(
    deps, finished_mix, sessions, clock, list_keys
):
    before_keys = list_keys()
    with sessions() as s:
        events = s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id.in_(finished_mix["old"])))
        outbox = s.scalar(select(func.count()).select_from(Outbox).where(Outbox.job_id.in_(finished_mix["old"])))
    jobs_before = counts(sessions)

    report = prune_finished(deps, clock.now() - timedelta(days=30))

    assert (report.jobs, report.events, report.outbox, report.objects) == (3, events, outbox, 0)
    assert counts(sessions) == (jobs_before[0] - 3, jobs_before[1] - events, jobs_before[2] - outbox)
    with sessions() as s:
        assert sorted(s.scalars(select(Job.id))) == sorted(finished_mix["kept"])
        assert s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id.in_(finished_mix["old"]))) == 0
    assert list_keys() == before_keys  # without --with-objects S3 is not touched


def test_prune_with_objects_deletes_the_inputs_outputs_and_partial_copies_of_pruned_jobs_only(
    deps, finished_mix, clock, list_keys, sessions
):
    old_ok, old_failed, old_cancelled = finished_mix["old"]
    assert len(keys_of(list_keys, old_cancelled, sessions)) == 1  # its input
    assert len(keys_of(list_keys, old_ok, sessions)) == 2  # its input and its output
    assert len(keys_of(list_keys, old_failed, sessions)) == 2  # its input and a partial copy
    old_inputs = [input_key(sessions, job_id) for job_id in finished_mix["old"]]
    kept = {job_id: keys_of(list_keys, job_id, sessions) for job_id in finished_mix["kept"]}

    report = prune_finished(deps, clock.now() - timedelta(days=30), with_objects=True)

    assert report.jobs == 3 and report.objects == 5  # 3 inputs, 1 output, 1 partial copy
    for job_id in finished_mix["old"]:
        assert keys_of(list_keys, job_id) == []
    assert not set(old_inputs) & set(list_keys())
    assert {job_id: keys_of(list_keys, job_id, sessions) for job_id in finished_mix["kept"]} == kept
    assert input_key(sessions, finished_mix["kept"][0]).startswith(f"{PREFIX}/inputs/sha256-")


def test_prune_with_objects_keeps_an_input_another_job_still_uses(deps, new_job, sessions, clock, list_keys, make_image):
    image = "data:image/png;base64," + base64.b64encode(make_image("PNG", color=(7, 7, 7))).decode()
    old, current = new_job(prompt="old", image=image), new_job(prompt="current", image=image)
    cancel_job(deps, old)
    age(sessions, old, clock.now() - timedelta(days=40))
    shared = input_key(sessions, old)
    assert shared == input_key(sessions, current)  # the same bytes: one object

    report = prune_finished(deps, clock.now() - timedelta(days=30), with_objects=True)

    assert (report.jobs, report.objects) == (1, 0)
    assert shared in list_keys()  # the queued job still needs it
    cancel_job(deps, current)
    age(sessions, current, clock.now() - timedelta(days=40))
    assert prune_finished(deps, clock.now() - timedelta(days=30), with_objects=True).objects == 1
    assert shared not in list_keys()


def test_a_dry_run_counts_what_prune_would_delete_and_deletes_nothing(deps, finished_mix, sessions, clock, list_keys):
    before = (counts(sessions), list_keys())
    cutoff = clock.now() - timedelta(days=30)

    dry = prune_finished(deps, cutoff, with_objects=True, dry_run=True, batch_size=2)

    assert (counts(sessions), list_keys()) == before
    real = prune_finished(deps, cutoff, with_objects=True, batch_size=2)
    assert (dry.jobs, dry.events, dry.outbox, dry.objects) == (real.jobs, real.events, real.outbox, real.objects) == (3, real.events, 3, 5)
    assert dry.dry_run and not real.dry_run


def test_nothing_finished_before_the_cutoff_means_nothing_deleted(deps, finished_mix, sessions, clock):
    before = counts(sessions)
    report = prune_finished(deps, clock.now() - timedelta(days=60), with_objects=True)
    assert (report.jobs, report.events, report.outbox, report.objects) == (0, 0, 0, 0)
    assert counts(sessions) == before


def test_s3_down_while_pruning_with_objects_deletes_no_row(deps, finished_mix, sessions, clock, down_storage):
    before = counts(sessions)
    deps.storage = down_storage

    with pytest.raises(StorageError, match="run prune again"):
        prune_finished(deps, clock.now() - timedelta(days=30), with_objects=True)

    assert counts(sessions) == before  # rows stay, so the objects are never orphaned


def test_a_failed_job_replayed_by_retry_is_not_finished_any_more_and_is_kept(deps, finished_mix, sessions, clock):
    from worker.engine.operator import retry_job

    old_failed = finished_mix["old"][1]
    retry_job(deps, old_failed)

    report = prune_finished(deps, clock.now() - timedelta(days=30))

    assert report.jobs == 2
    with sessions() as s:
        assert s.get(Job, old_failed).state == "queued"


@pytest.mark.parametrize("text, days", [("30d", 30), ("12h", 0.5), ("90m", 90 / 1440), ("3600s", 1 / 24), ("2w", 14), (" 7D ", 7)])
def test_the_cutoff_is_an_age_before_now(clock, text, days):
    assert parse_cutoff(text, clock.now()) == clock.now() - timedelta(days=days)


def test_the_cutoff_may_be_an_iso_time_in_utc_by_default(clock):
    assert parse_cutoff("2026-01-02T03:04:05Z", clock.now()).isoformat() == "2026-01-02T03:04:05+00:00"
    assert parse_cutoff("2026-01-02T03:04:05", clock.now()).isoformat() == "2026-01-02T03:04:05+00:00"


@pytest.mark.parametrize("text", ["", "thirty days", "30", "-5d", "30y", "2999-01-01T00:00:00Z"])
def test_a_bad_or_future_cutoff_is_invalid_input(clock, text):
    with pytest.raises(InvalidInput, match="finished-before"):
        parse_cutoff(text, clock.now())
