"""Settings: the contract's environment names, secret-safe reprs, refused values."""

from __future__ import annotations

import pytest

from worker.config import Settings


def test_settings_never_show_secrets():
    settings = Settings(_env_file=None, wavespeed_api_key="ws-very-secret", aws_secret_access_key="aws-very-secret")
    for text in (repr(settings), str(settings), str(settings.model_dump())):
        assert "ws-very-secret" not in text and "aws-very-secret" not in text
    assert settings.wavespeed_api_key.get_secret_value() == "ws-very-secret"


def test_settings_read_the_contract_names_from_the_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "sqlite:///elsewhere.db")
    monkeypatch.setenv("S3_BUCKET", "from-env")
    monkeypatch.setenv("EDIT_WORKER_POLL_INTERVAL", "5")
    settings = Settings(_env_file=None)
    assert (settings.database_url, settings.s3_bucket, settings.poll_interval) == ("sqlite:///elsewhere.db", "from-env", 5.0)


def test_polling_faster_than_every_two_seconds_is_refused():
    with pytest.raises(ValueError):
        Settings(_env_file=None, poll_interval=1.0)


@pytest.mark.parametrize(
    "field, url, password",
    [
        ("database_url", "postgresql+psycopg://worker:db-pa55word@db:5432/jobs", "db-pa55word"),
        ("celery_broker_url", "redis://:broker-pa55@cache:6379/0", "broker-pa55"),
        ("redis_url", "rediss://default:limiter-pa55@cache:6380/1", "limiter-pa55"),
        ("database_url", "postgresql://db/jobs?user=w&password=query-pa55", "query-pa55"),
    ],
)
def test_settings_never_show_passwords_in_urls(field, url, password):
    settings = Settings(_env_file=None, **{field: url})

    for text in (repr(settings), str(settings), str(settings.model_dump()), repr(getattr(settings, field))):
        assert password not in text
    # Consumers still get the real URL.
    assert getattr(settings, field) == url
    assert f"{getattr(settings, field)}" == url
    assert password in str(getattr(settings, field))


def test_settings_urls_keep_their_user_and_host_when_shown():
    settings = Settings(_env_file=None, database_url="postgresql://worker:secret@db.internal:5432/jobs")
    assert "postgresql://worker:***@db.internal:5432/jobs" in repr(settings)


@pytest.mark.parametrize("url", ["http://api.wavespeed.ai", "http://10.0.0.5:8900", "http://sandbox:8900"])
def test_a_plain_http_provider_off_this_machine_is_refused(url):
    with pytest.raises(ValueError, match="WAVESPEED_BASE_URL must use https://") as refused:
        Settings(_env_file=None, wavespeed_base_url=url)
    line = next(line for line in str(refused.value).splitlines() if "WAVESPEED_BASE_URL" in line)
    assert "EDIT_WORKER_ALLOW_HTTP_PROVIDER" in line


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8900", "http://localhost:8900", "http://[::1]:8900", "https://api.wavespeed.ai", "https://10.0.0.5"]
)
def test_https_or_a_loopback_sandbox_is_accepted_as_the_provider(url):
    assert Settings(_env_file=None, wavespeed_base_url=url).wavespeed_base_url == url


def test_plain_http_to_a_remote_provider_can_be_allowed_explicitly():
    settings = Settings(_env_file=None, wavespeed_base_url="http://sandbox:8900", allow_http_provider=True)
    assert settings.wavespeed_base_url == "http://sandbox:8900"


@pytest.mark.parametrize("url", ["ftp://api.wavespeed.ai", "api.wavespeed.ai", "https://"])
def test_a_provider_url_that_is_not_http_is_refused(url):
    with pytest.raises(ValueError, match="WAVESPEED_BASE_URL"):
        Settings(_env_file=None, wavespeed_base_url=url)
