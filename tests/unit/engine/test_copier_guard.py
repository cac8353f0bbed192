"""Specification of the output copy's guard: every hop of an output download passes the
private-address guard unless its host:port is trusted (WAVESPEED_BASE_URL, EDIT_WORKER_OUTPUT_HOSTS);
EDIT_WORKER_ALLOW_PRIVATE_URLS does not open it; only images are stored, within the size cap."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.conftest import CDN_HOST, image_bytes, public_dns
from worker.config import settings_from_env
from worker.core.steps import Next
from worker.engine.copier import run_upload
from worker.engine.deps import make_provider
from worker.engine.poller import run_poll
from worker.engine.submit import run_submit
from worker.errors import TransientProviderError

METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def to_upload(deps, job_id) -> None:
    first = run_submit(deps, job_id)
    assert run_poll(deps, job_id, first.poll_seq) == Next("upload", job_id)


def hosts_seen(fake_provider) -> set[str]:
    return {request.url.host for _, request in fake_provider.requests}


def with_provider(deps, settings, handler) -> None:
    deps.settings = settings
    deps.provider = make_provider(settings, httpx.MockTransport(handler), resolver=public_dns)


@pytest.mark.parametrize(
    "target",
    [METADATA, "http://127.0.0.1:6379/", "http://10.0.0.5/x.png", "http://[fd00::1]/x.png", "http://localhost:8080/admin"],
)
def test_an_output_redirected_to_a_private_address_is_never_fetched_nor_stored(deps, new_job, load, fake_provider, list_keys, target):
    # Before: the download followed the redirect and stored the metadata service's answer in S3.
    job_id = new_job()
    to_upload(deps, job_id)
    fake_provider.script("download", httpx.Response(302, headers={"location": target}))
    with pytest.raises(TransientProviderError, match="refused"):
        run_upload(deps, job_id)
    assert hosts_seen(fake_provider) <= {"api.wavespeed.test", CDN_HOST}
    assert list_keys() == []
    assert load(job_id).state == "uploading"  # not the provider's word: retried until the deadline


def test_an_output_url_that_is_itself_private_is_never_fetched(deps, new_job, load, fake_provider, list_keys):
    job_id = new_job()
    first = run_submit(deps, job_id)
    task = fake_provider.finish(load(job_id).prediction_id)
    task.outputs = [METADATA]
    assert run_poll(deps, job_id, first.poll_seq) == Next("upload", job_id)
    with pytest.raises(TransientProviderError, match="refused"):
        run_upload(deps, job_id)
    assert "169.254.169.254" not in hosts_seen(fake_provider)
    assert list_keys() == []


def test_allow_private_urls_does_not_open_output_downloads(deps, settings, new_job, fake_provider, list_keys):
    with_provider(deps, settings.model_copy(update={"allow_private_urls": True}), fake_provider)
    job_id = new_job()
    to_upload(deps, job_id)
    fake_provider.script("download", httpx.Response(302, headers={"location": METADATA}))
    with pytest.raises(TransientProviderError, match="refused"):
        run_upload(deps, job_id)
    assert "169.254.169.254" not in hosts_seen(fake_provider)


def test_a_host_listed_in_output_hosts_is_fetched_but_not_its_redirect_to_another_private_port(
    deps, settings, new_job, load, fake_provider, list_keys
):
    png = image_bytes("PNG")
    seen: list[str] = []

    def lan(request: httpx.Request) -> httpx.Response:
        if request.url.host != "10.1.2.3":
            return fake_provider(request)
        seen.append(str(request.url))
        if request.url.path == "/bounce.png":
            return httpx.Response(302, headers={"location": "http://10.1.2.3:9001/secret"})
        return httpx.Response(200, content=png, headers={"content-type": "image/png"})

    with_provider(deps, settings.model_copy(update={"output_hosts": "10.1.2.3:9000"}), lan)
    job_id = new_job()
    first = run_submit(deps, job_id)
    task = fake_provider.finish(load(job_id).prediction_id)
    task.outputs = ["http://10.1.2.3:9000/bounce.png"]
    assert run_poll(deps, job_id, first.poll_seq) == Next("upload", job_id)
    with pytest.raises(TransientProviderError, match="refused"):
        run_upload(deps, job_id)
    assert seen == ["http://10.1.2.3:9000/bounce.png"]

    task.outputs = ["http://10.1.2.3:9000/out.png"]
    job_id = new_job(prompt="another")
    first = run_submit(deps, job_id)
    fake_provider.tasks[load(job_id).prediction_id].outputs = ["http://10.1.2.3:9000/out.png"]
    fake_provider.tasks[load(job_id).prediction_id].status = "completed"
    assert run_poll(deps, job_id, first.poll_seq) == Next("upload", job_id)
    assert run_upload(deps, job_id) is None
    assert load(job_id).state == "succeeded"
    assert list_keys() == [f"edits/{job_id}/0.png"]


def test_output_hosts_are_read_from_the_environment():
    s = settings_from_env({"WAVESPEED_BASE_URL": "http://127.0.0.1:8900", "EDIT_WORKER_OUTPUT_HOSTS": " cdn.example.com, 10.0.0.9:9000 ,"})
    assert s.trusted_output_hosts == ["http://127.0.0.1:8900", "cdn.example.com", "10.0.0.9:9000"]


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html><body>Welcome to the hotel wifi</body></html>", headers={"content-type": "text/html"}),
        httpx.Response(200, text="<html>not a png</html>", headers={"content-type": "image/png"}),  # the bytes decide
        httpx.Response(200, json={"code": 200, "message": "success"}, headers={"content-type": "application/json"}),
    ],
    ids=["html", "html-as-png", "json"],
)
def test_a_download_that_is_not_an_image_is_not_stored(deps, new_job, load, fake_provider, list_keys, answer):
    job_id = new_job()
    to_upload(deps, job_id)
    fake_provider.script("download", answer)
    with pytest.raises(TransientProviderError, match="not an image"):
        run_upload(deps, job_id)
    assert list_keys() == [] and load(job_id).state == "uploading"
    assert run_upload(deps, job_id) is None  # the next try gets the real image
    assert load(job_id).state == "succeeded"


def test_a_download_over_the_size_cap_is_not_stored(deps, settings, new_job, load, fake_provider, list_keys):
    with_provider(deps, settings.model_copy(update={"max_output_bytes": 64}), fake_provider)
    job_id = new_job()
    to_upload(deps, job_id)
    with pytest.raises(TransientProviderError, match="larger than"):
        run_upload(deps, job_id)
    assert list_keys() == [] and load(job_id).state == "uploading"
