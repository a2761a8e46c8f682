"""SIGTERM handled like Ctrl-C, so atomic writers clean up when a scheduler stops a run."""
from __future__ import annotations

import contextlib
import signal


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
