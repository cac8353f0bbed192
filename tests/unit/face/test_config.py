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
