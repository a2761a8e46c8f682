"""Claim output paths for one run, so two concurrent runs never write the same file."""
from __future__ import annotations

import contextlib
import os

from ..errors import UserError
from .atomic import make_parents, remove_empty


def _lock_holder(lock: str) -> int | None:
    try:
        with open(lock, encoding="ascii") as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts as alive)."""
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
                    if holder is not None and holder != os.getpid() and process_alive(holder):
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
