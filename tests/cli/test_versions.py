"""The transformers floor: one `error:` line before any work, from the CLI and from lib.sparse.register(), and the
same floor in requirements.txt."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import lib.sparse
from lib import versions
from lib.cli import main
from lib.errors import UserError
from lib.versions import MIN_TRANSFORMERS, check_transformers

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("found", ["4.57.6", "5.0.0", "5.9.1"])
def test_older_releases_are_refused_with_the_command_that_fixes_it(found):
    with pytest.raises(UserError, match=rf"transformers {re.escape(found)} is older .*transformers>="):
        check_transformers(found)


@pytest.mark.parametrize("found", [MIN_TRANSFORMERS, f"{MIN_TRANSFORMERS}.0.dev0", "5.24.0", "6.0.0"])
def test_the_floor_and_newer_releases_pass(found):
    check_transformers(found)


def test_the_installed_release_passes():
    check_transformers()


def test_cli_stops_with_one_error_line_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(versions, "installed_transformers", lambda: "4.57.6")
    code = main(["--demo", "tiny", "--save_model", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: transformers 4.57.6 is older")
    assert not (tmp_path / "out").exists()


def test_register_refuses_an_older_release(monkeypatch):
    monkeypatch.setattr(versions, "installed_transformers", lambda: "5.0.0")
    with pytest.raises(UserError, match="older than this tool needs"):
        lib.sparse.register()


def test_requirements_and_pyproject_state_the_same_floor():
    lines = (REPO / "requirements.txt").read_text().splitlines()
    assert f"transformers>={MIN_TRANSFORMERS}" in [line.strip() for line in lines]
    assert f'"transformers>={MIN_TRANSFORMERS}"' in (REPO / "pyproject.toml").read_text()
