"""The layout is part of the design (DESIGN.md §3): the folder tree answers where a thing lives,
every module says what it owns in its docstring, and the unit tests mirror the modules.

The mirror rule: a test module `tests/unit/<area>/test_<module>.py` tests `worker/<area>/<module>.py`,
or `test_<module>_<topic>.py` for one concern of that module (test_api_fuzz.py), where <area> is a
subpackage of worker/ (core, engine, adapters, devtools); the face — the modules
directly in worker/ (config, api, cli, producer, ...) — has its tests in `tests/unit/face/`. Tests
about the project as a whole sit directly in tests/unit/ and are listed in CROSS_CUTTING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "worker"
UNIT = ROOT / "tests" / "unit"
FACE = "face"  # tests/unit/face/test_<module>.py  <->  worker/<module>.py

# Test modules directly in tests/unit/, each about the whole project rather than one module.
CROSS_CUTTING = {
    "test_layout.py": "this file: where things live, docstrings, the mirror rule",
}

# Where to look for a role: (file, a name it defines).
HOMES = {
    "the poller (batch poll_due, task-mode run_poll)": ("worker/engine/poller.py", "poll_due"),
    "the submit step": ("worker/engine/submit.py", "run_submit"),
    "the batch submitter": ("worker/engine/submitter.py", "submit_due"),
    "the copy of outputs to S3": ("worker/engine/copier.py", "run_upload"),
    "the thin Celery tasks": ("worker/engine/tasks.py", "poll_due"),
    "the WaveSpeed client": ("worker/adapters/wavespeed.py", "WaveSpeedClient"),
    "the S3 storage": ("worker/adapters/storage.py", "Storage"),
    "the local WaveSpeed sandbox": ("worker/devtools/sandbox.py", "create_app"),
    "the job state machine": ("worker/core/states.py", "State"),
    "the settings": ("worker/config.py", "Settings"),
}


def areas() -> set[str]:
    """worker/'s subpackages."""
    return {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def unit_test_files() -> list[Path]:
    return sorted(UNIT.rglob("test_*.py"))


def defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def mirrored_module(test_file: Path) -> Path | None:
    """The module `test_file` mirrors under the rule in this file's docstring (None: no rule applies)."""
    relative = test_file.relative_to(UNIT)
    if len(relative.parts) != 2:
        return None  # directly in tests/unit (cross-cutting) or nested deeper
    area, name = relative.parts
    folder = PACKAGE if area == FACE else PACKAGE / area if area in areas() else None
    if folder is None:
        return None
    # test_<module>.py, or test_<module>_<topic>.py for one module's tests on one concern
    # (test_api_fuzz.py: the API, fuzzed); the longest module name that exists wins.
    stem = name.removeprefix("test_").removesuffix(".py")
    parts = stem.split("_")
    for cut in range(len(parts), 0, -1):
        candidate = folder / ("_".join(parts[:cut]) + ".py")
        if candidate.is_file():
            return candidate
    return folder / (stem + ".py")


@pytest.mark.parametrize("role", sorted(HOMES))
def test_the_folder_tree_says_where_each_role_lives(role):
    file, name = HOMES[role]
    path = ROOT / file
    assert path.is_file(), f"{role} should live in {file}"
    assert name in defined_names(path), f"{file} should define {name} ({role})"


def test_the_areas_are_the_ones_the_design_names():
    assert areas() == {"core", "engine", "adapters", "devtools"}


@pytest.mark.parametrize("module", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_says_what_it_owns(module):
    docstring = ast.get_docstring(ast.parse(module.read_text(encoding="utf-8")))
    assert docstring and docstring.strip(), f"{module.relative_to(ROOT)} needs a module docstring saying what it owns"


@pytest.mark.parametrize("test_file", unit_test_files(), ids=lambda p: str(p.relative_to(UNIT)))
def test_every_unit_test_module_mirrors_a_module(test_file):
    relative = test_file.relative_to(UNIT)
    if len(relative.parts) == 1:
        assert relative.name in CROSS_CUTTING, (
            f"tests/unit/{relative} is not in an area folder; move it to tests/unit/<area>/test_<module>.py "
            "or, if it is about the whole project, list it in CROSS_CUTTING"
        )
        return
    module = mirrored_module(test_file)
    assert module is not None, f"tests/unit/{relative}: the folders under tests/unit are {FACE} and {sorted(areas())}"
    assert module.is_file(), f"tests/unit/{relative} mirrors no module: {module.relative_to(ROOT)} does not exist"


def test_the_cross_cutting_list_names_only_files_that_exist():
    assert {name for name in CROSS_CUTTING if not (UNIT / name).is_file()} == set()


def test_the_mirror_rule_maps_each_kind_of_test_file():
    assert mirrored_module(UNIT / "engine" / "test_poller.py") == PACKAGE / "engine" / "poller.py"
    assert mirrored_module(UNIT / "adapters" / "test_wavespeed.py") == PACKAGE / "adapters" / "wavespeed.py"
    assert mirrored_module(UNIT / FACE / "test_config.py") == PACKAGE / "config.py"
    assert mirrored_module(UNIT / "test_layout.py") is None
    assert mirrored_module(UNIT / "misc" / "test_things.py") is None
    assert mirrored_module(UNIT / "engine" / "deeper" / "test_poller.py") is None


def test_same_named_modules_in_two_areas_can_both_have_mirrored_tests(pytestconfig):
    stems = [m.stem for m in modules() if m.stem != "__init__"]
    assert len(stems) > len(set(stems))  # e.g. adapters/webhooks.py and engine/webhooks.py
    # Imported by basename (pytest's default "prepend" mode), their test modules would clash.
    assert pytestconfig.getoption("importmode") == "importlib"
