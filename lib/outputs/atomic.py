"""Write results and checkpoints whole or not at all: temporary files and directories renamed into place."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable


def make_parents(parent: str) -> list[str]:
    """Create `parent` and any missing ancestors; return the created ones, deepest first, for cleanup."""
    created = []
    path = parent
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    return created


def remove_empty(directories: list[str]) -> None:
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
    created = make_parents(parent)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(data), f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        remove_empty(created)
        raise


def save_model_atomic(model, tokenizer, directory: str) -> str:
    """save_pretrained into a temporary sibling directory, renamed into place only once complete; returns where
    the model went (see publish_directory)."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    created = make_parents(parent)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return publish_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_directory(tmp: str, directory: str) -> str:
    """Rename a finished temporary directory to `directory` with the usual permissions. When another run filled
    `directory` meanwhile (it was checked empty at the start), the finished work goes beside it, said in a line,
    instead of being lost; returns where it went."""
    mask = _umask()
    for root, dirs, files in os.walk(tmp):  # mkdtemp/mkstemp make private 0700/0600 entries
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    target = directory
    if os.path.isdir(directory) and not os.listdir(directory):
        os.rmdir(directory)
    if os.path.exists(directory):
        target = f"{directory}-{os.getpid()}"
        print(f"warning: {directory} was filled by something else during this run; saved to {target} instead",
              flush=True)
    os.replace(tmp, target)
    return target


def append_jsonl(path: str, record: dict, default: Callable[[Any], Any] | None = None) -> None:
    """Append one JSON line to `path` (created with its directories), flushed at once. A crash can leave a last
    line without its newline: such a line is closed first, so the new record is never glued onto it."""
    line = json.dumps(record, default=default)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "ab") as f:
        if f.tell() > 0:
            with open(path, "rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    f.write(b"\n")
        f.write((line + "\n").encode("utf-8"))
        f.flush()
