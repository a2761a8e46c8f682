"""A small JSON file caching values computed from a model (e.g. AlphaPruning's per-block alphas)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .atomic import _umask


def cached_json_entry(cache_path: str | os.PathLike, key: str, compute_fn: Callable[[], Any]) -> Any:
    """The value for `key` in the JSON cache file at cache_path, or compute_fn() stored there under `key`.

    The file maps keys (e.g. model name + layer shapes) to JSON values; an unreadable file is treated as empty.
    """
    path = Path(os.path.expanduser(str(cache_path)))
    entries: dict = {}
    if path.is_file():
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            entries = {}
        if not isinstance(entries, dict):
            entries = {}
    if key in entries:
        return entries[key]
    value = compute_fn()
    entries[key] = value
    # write-then-rename so an interrupted run never leaves a truncated cache behind
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(handle, "w") as temp_file:
            json.dump(entries, temp_file, indent=1)
        os.chmod(temp_name, 0o666 & ~_umask())
        os.replace(temp_name, path)
    except OSError as exc:  # an unwritable cache costs the computation next time, nothing more
        print(f"warning: cannot write the cache {path} ({exc.strerror})", flush=True)
    return value
