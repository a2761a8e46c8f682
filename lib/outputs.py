"""Write results and checkpoints so that an interrupted run leaves nothing half-written behind."""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shutil
import tempfile
from typing import Any

from .errors import UserError


def check_output_paths(results: str | None, save_model: str | None) -> None:
    """Fail before any work when an output cannot be written (creating nothing: a failed run leaves no trace)."""
    if save_model and os.path.exists(save_model) and (not os.path.isdir(save_model) or os.listdir(save_model)):
        raise UserError(f"--save_model {save_model}: already exists and is not an empty directory; "
                        f"choose a new directory")
    for flag, path in (("--results", results), ("--save_model", save_model)):
        if not path:
            continue
        existing = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(existing):  # the directories still to create are made when writing
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UserError(f"{flag} {path}: cannot create its directory ({existing} is not a directory)")
        if not os.access(existing, os.W_OK):
            raise UserError(f"{flag} {path}: directory {existing} is not writable")
    if results and os.path.isdir(results):
        raise UserError(f"--results {results}: is a directory; give a file name such as run.json")


def _make_parents(parent: str) -> list[str]:
    """Create `parent` and any missing ancestors; return the created ones, deepest first, for cleanup."""
    created = []
    path = parent
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    return created


def _remove_empty(directories: list[str]) -> None:
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:
            break


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: str, data: dict) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    created = _make_parents(parent)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(data), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _remove_empty(created)
        raise


def save_model_atomic(model, tokenizer, directory: str) -> None:
    """save_pretrained into a temporary sibling directory, renamed into place only once complete."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    created = _make_parents(parent)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(directory):
            os.rmdir(directory)  # only an empty directory gets here (check_output_paths)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def versions() -> dict[str, str]:
    import torch
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("datasets", "accelerate", "lm_eval"):
        try:  # metadata only: importing lm_eval just for its version would be slow
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
