"""The settings reference and .env.example stay in step with `Settings` (worker/config.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import Field, TypeAdapter

from worker.config import Settings, _env
from worker.devtools import settings_doc

ROOT = Path(__file__).resolve().parents[3]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
ENV_EXAMPLE = ROOT / ".env.example"

# Names in .env.example that are not worker settings: docker-compose.yml reads them itself.
COMPOSE_ONLY = {"API_PUBLISH"}

# `NAME=value` or `# NAME=value` (a commented default); prose comments never start with NAME=.
_ENV_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")


def settings_env_names() -> dict[str, str]:
    """Every environment name a setting is read from -> the field's name."""
    return {env: name for name, info in Settings.model_fields.items() for env in settings_doc.env_names(info)}


def env_example_lines(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _ENV_LINE.match(line.strip())
        if match:
            found.setdefault(match.group(1), match.group(2).strip())
    return found


# --- docs/configuration.md ------------------------------------------------------------------------


def test_configuration_doc_is_up_to_date():
    expected = settings_doc.render()
    current = CONFIG_DOC.read_text(encoding="utf-8") if CONFIG_DOC.exists() else ""
    assert current == expected, "docs/configuration.md is stale: run `python -m worker.devtools.settings_doc > docs/configuration.md`"


def test_check_mode_tells_a_stale_doc_from_a_fresh_one(tmp_path, capsys):
    doc = tmp_path / "configuration.md"
    doc.write_text(settings_doc.render(), encoding="utf-8")
    assert settings_doc.main(["--check", str(doc)]) == 0
    doc.write_text(settings_doc.render().replace("EDIT_WORKER_POLL_INTERVAL", "EDIT_WORKER_POLL_EVERY"), encoding="utf-8")
    assert settings_doc.main(["--check", str(doc)]) == 1
    assert "stale" in capsys.readouterr().err


def test_every_setting_is_documented_with_its_env_name_default_and_description():
    text = settings_doc.render()
    for name, info in Settings.model_fields.items():
        assert info.description, f"Settings.{name} has no description= (docs/configuration.md takes it from there)"
        [row] = [line for line in text.splitlines() if line.startswith(f"| `{settings_doc.env_names(info)[0]}` ")]
        assert " ".join(info.description.split()).replace("|", "\\|") in row


def test_the_doc_shows_types_bounds_defaults_and_secrets():
    rows = {doc.env[0]: doc for doc in settings_doc.setting_docs()}
    assert rows["EDIT_WORKER_POLL_INTERVAL"].type == "number, ≥ 2"
    assert rows["EDIT_WORKER_POLL_INTERVAL"].default == "`2`"
    assert rows["EDIT_WORKER_POLL_MODE"].type == "one of `batch`, `task`"
    assert rows["WAVESPEED_API_KEY"].type == "string, *secret*, optional"
    assert rows["WAVESPEED_API_KEY"].default == "unset"
    assert rows["EDIT_WORKER_UPLOAD_INLINE"].default == "`true`"
    assert rows["WAVESPEED_WEBHOOK_SECRET"].env == ["WAVESPEED_WEBHOOK_SECRET"]  # its field is `webhook_secret`


def test_a_setting_filed_under_no_section_still_appears_under_other_settings():
    class WithNewKnob(Settings):
        shiny_new_knob: int = Field(
            default=7, ge=0, description="A knob nobody filed yet.", validation_alias=_env("EDIT_WORKER_SHINY_NEW_KNOB")
        )

    text = settings_doc.render(WithNewKnob)
    other = text.split("## Other settings", 1)[1]
    assert "| `EDIT_WORKER_SHINY_NEW_KNOB` | integer, ≥ 0 | `7` | A knob nobody filed yet. |" in other
    assert "## Other settings" not in settings_doc.render()  # today every setting has a section


def test_sections_name_only_existing_settings_once_each():
    filed = [name for _, _, names in settings_doc.GROUPS for name in names]
    assert len(filed) == len(set(filed))
    assert set(filed) <= set(Settings.model_fields), set(filed) - set(Settings.model_fields)


# --- .env.example -----------------------------------------------------------------------------------


def test_env_example_lists_every_setting():
    missing = sorted(set(settings_env_names()) - set(env_example_lines()))
    assert not missing, f".env.example misses {missing}"


def test_env_example_names_no_setting_that_does_not_exist():
    unknown = sorted(set(env_example_lines()) - set(settings_env_names()) - COMPOSE_ONLY)
    assert not unknown, f".env.example names settings that do not exist: {unknown}"


@pytest.mark.parametrize("env", sorted(settings_env_names()))
def test_env_example_shows_the_real_default(env):
    """A commented `# NAME=value` line is the default; it must be the one Settings has."""
    field = Settings.model_fields[settings_env_names()[env]]
    default = field.get_default(call_default_factory=True)
    value = env_example_lines().get(env)
    if value is None or value == "" or default is None:
        return  # not listed (the test above says so), left empty, or an example for a setting unset by default
    assert TypeAdapter(field.annotation).validate_python(value) == default, f".env.example shows {env}={value}; the default is {default!r}"


def test_the_env_example_parser_sees_set_and_commented_lines_but_not_prose(tmp_path):
    fake = tmp_path / ".env.example"
    fake.write_text("# Prose: the rate=limit line below\nWAVESPEED_API_KEY=\n# EDIT_WORKER_POLL_INTERVAL=2\n# EDIT_WORKER_NO_SUCH=1\n")
    names = env_example_lines(fake)
    assert names == {"WAVESPEED_API_KEY": "", "EDIT_WORKER_POLL_INTERVAL": "2", "EDIT_WORKER_NO_SUCH": "1"}
    assert "DATABASE_URL" in set(settings_env_names()) - set(names)


# --- README.md and CONTRIBUTING.md ------------------------------------------------------------------

_ENV_NAME = re.compile(r"\b(?:EDIT_WORKER|WAVESPEED|S3|AWS|DATABASE|CELERY)_[A-Z0-9_]*[A-Z0-9]\b")


def test_the_guides_name_only_settings_that_exist():
    """A renamed or removed setting must not live on in README.md or CONTRIBUTING.md. Names the
    code reads outside Settings (EDIT_WORKER_SUPERVISE, the tests' own) count as existing."""
    read_by_code = {
        name
        for folder in ("worker", "tests/integration")
        for path in (ROOT / folder).rglob("*.py")
        for name in _ENV_NAME.findall(path.read_text())
    }
    known = set(settings_env_names()) | read_by_code
    for guide in ("README.md", "CONTRIBUTING.md"):
        named = set(_ENV_NAME.findall((ROOT / guide).read_text(encoding="utf-8")))
        assert named, guide
        assert not named - known, f"{guide} names settings that do not exist: {sorted(named - known)}"
