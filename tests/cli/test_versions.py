"""The transformers and torch floors: one `error:` line before any work, from the CLI and from lib.sparse.register(),
and the same floors in requirements.txt and pyproject.toml."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import lib.sparse
from lib import versions
from lib.cli import main
from lib.errors import UserError
from lib.versions import MIN_TORCH, MIN_TRANSFORMERS, check_torch, check_transformers

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
    check_torch()


@pytest.mark.parametrize("found", ["2.4.1", "2.5.1+cu124", "1.13.1"])
def test_older_torch_is_refused_with_the_command_that_fixes_it(found):
    with pytest.raises(UserError, match=rf"torch {re.escape(found)} is older .*torch>={MIN_TORCH}"):
        check_torch(found)


@pytest.mark.parametrize("found", [MIN_TORCH, "2.6.0+cpu", "2.13.0+cpu", "2.15.0+cu132", "3.0.0"])
def test_the_torch_floor_and_newer_releases_pass(found):
    check_torch(found)


@pytest.mark.parametrize("package, found", [("transformers", "4.57.6"), ("torch", "2.5.1")])
def test_cli_stops_with_one_error_line_before_any_work(monkeypatch, capsys, tmp_path, package, found):
    monkeypatch.setattr(versions, f"installed_{package}", lambda: found)
    code = main(["--demo", "tiny", "--save_model", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {package} {found} is older")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("package", ["transformers", "torch"])
def test_register_refuses_an_older_release(monkeypatch, package):
    monkeypatch.setattr(versions, f"installed_{package}", lambda: "2.5.0")
    with pytest.raises(UserError, match=f"{package} 2.5.0 is older than this tool needs"):
        lib.sparse.register()


def _requirement_lines(name):
    return [line.strip() for line in (REPO / name).read_text().splitlines()]


@pytest.mark.parametrize("requirement", [f"transformers>={MIN_TRANSFORMERS}", f"torch>={MIN_TORCH}"])
def test_requirements_and_pyproject_state_the_same_floor(requirement):
    assert requirement in _requirement_lines("requirements.txt")
    assert f'"{requirement}"' in (REPO / "pyproject.toml").read_text()


def test_the_cpu_requirements_state_the_torch_floor():
    assert f"torch>={MIN_TORCH}" in _requirement_lines("requirements-cpu.txt")
