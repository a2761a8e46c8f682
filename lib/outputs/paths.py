"""Checks of output paths made before any work, so a run never fails only when it finally writes."""
from __future__ import annotations

import os
import shutil

from ..errors import UserError


def _existing_ancestor(path: str) -> str:
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):  # the directories still to create are made when writing
        existing = os.path.dirname(existing)
    return existing


def check_path_length(path: str, setting: str) -> None:
    """Names the file system will refuse only when the file is finally written: too long a name or path."""
    existing = _existing_ancestor(path)
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    full = os.path.abspath(path)
    longest = max(len(os.fsencode(part)) for part in full.split(os.sep))
    if longest + 40 > name_max:  # room for the temporary names written beside it
        raise UserError(f"{path}: a name in this path is {longest} bytes long; this file system takes at most "
                        f"{name_max} (less the room for a temporary name)", setting)
    if len(os.fsencode(full)) + 40 > path_max:
        raise UserError(f"{path}: the path is too long for this file system ({path_max} bytes at most)", setting)


def resolved(path: str | None) -> str | None:
    """`path` with symbolic links resolved, so what is written, printed and recorded is where the data is."""
    return os.path.realpath(path) if path else path


def check_free_space(path: str, needed: int | None, setting: str) -> None:
    """Fail before any work when the file system holding `path` has clearly too little room for `needed` bytes."""
    if not needed:
        return
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < needed:
        raise UserError(f"{path}: needs about {needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free "
                        f"there", setting)


def write_error(path: str, exc: OSError, setting: str) -> UserError:
    """An OSError while writing an output (disk full, quota, a name the file system refuses) as one line."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return UserError(f"{path}: cannot write it ({reason}); nothing was left half-written", setting)


def check_writable_file(path: str, setting: str) -> None:
    """Fail before any work when a file cannot be created or appended to at `path` (creating nothing)."""
    check_path_length(path, setting)
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; give a file name", setting)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{path}: the file is not writable", setting)
    existing = _existing_ancestor(path)
    if not os.path.isdir(existing):
        raise UserError(f"{path}: cannot create its directory ({existing} is not a directory)", setting)
    if not os.access(existing, os.W_OK):
        raise UserError(f"{path}: directory {existing} is not writable", setting)


def check_output_paths(results: str | None, save_model: str | None) -> None:
    """Fail before any work when an output cannot be written (creating nothing: a failed run leaves no trace)."""
    if save_model and os.path.exists(save_model) and (not os.path.isdir(save_model) or os.listdir(save_model)):
        raise UserError(f"{save_model}: already exists and is not an empty directory; choose a new directory",
                        "save_model")
    for setting, path in (("results", results), ("save_model", save_model)):
        if not path:
            continue
        check_path_length(path, setting)
        existing = _existing_ancestor(path)
        if not os.path.isdir(existing):
            raise UserError(f"{path}: cannot create its directory ({existing} is not a directory)", setting)
        if not os.access(existing, os.W_OK):
            raise UserError(f"{path}: directory {existing} is not writable", setting)
    if results and os.path.isdir(results):
        raise UserError(f"{results}: is a directory; give a file name such as run.json", "results")
