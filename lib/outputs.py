"""Write results and checkpoints so that an interrupted run leaves nothing half-written behind."""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import UserError


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


def _lock_holder(lock: str) -> int | None:
    try:
        with open(lock, encoding="ascii") as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def claimed_outputs(outputs: dict[str, str | None]):
    """Claim every output path (setting -> path) for this run while inside: a lock file beside each, created
    atomically, so a second run given the same output is refused up front instead of both writing it. A lock
    whose process is gone (a run killed with SIGKILL) is taken over."""
    locks: list[str] = []
    created: list[str] = []
    try:
        for setting, path in outputs.items():
            if not path:
                continue
            parent = os.path.dirname(os.path.abspath(path))
            created += make_parents(parent)
            lock = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.atp-lock")
            for _ in range(3):
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    holder = _lock_holder(lock)
                    if holder is not None and holder != os.getpid() and _alive(holder):
                        raise UserError(f"{path}: another run (process {holder}) is writing it; wait for it to "
                                        f"finish or choose another path", setting) from None
                    with contextlib.suppress(OSError):
                        os.unlink(lock)  # left by a run that no longer exists
                    continue
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(str(os.getpid()))
                locks.append(lock)
                break
        yield
    finally:
        for lock in locks:
            with contextlib.suppress(OSError):
                os.unlink(lock)
        remove_empty(created)


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


@contextlib.contextmanager
def termination_as_interrupt():
    """Within the block, SIGTERM (what `timeout` and cluster schedulers send) raises KeyboardInterrupt like
    Ctrl-C, so every atomic writer cleans up its temporary files before the process exits."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
