"""The resumable cell cache that workers share: a directory of finished records and of claims.

Layout under the store's directory (e.g. `out/table.cells/`):

    done/<id>.json     one finished record (a table cell, a search trial, the table's manifest), written whole:
                       the bytes go to tmp/ first, are flushed and fsynced, then renamed into done/ (a rename is
                       atomic on POSIX file systems and NFS), so a record is either complete or absent
    claims/<id>        who is computing that record: created with O_CREAT|O_EXCL (atomic, NFS included), holding
                       the owner's host, pid, process start time and a token; refreshed (mtime) by a heartbeat
    tmp/               records being written; a writer killed mid-write leaves its partial file here, never read

A claim is stale, and may be taken over, when its owner is on this host and its process is gone (or the pid now
names another process), or when it is on another host and its heartbeat is older than the lease. Two workers
that both take over a stale claim at once both compute the record; records are deterministic and written
atomically, so that costs time, never correctness.

`<id>` is a hash of the record's key. A `legacy` JSONL file (the cache of earlier versions, one record per line)
is read too, so tables started before the store existed resume.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
import warnings
from typing import Any, Callable

from ..outputs.claims import process_alive

LEASE_S = 600.0  # a claim on another host whose heartbeat is older than this is stale
HOLD_ENV = "ATP_STORE_HOLD"  # testing aid: "KEY_PART=MARKER": stop mid-write of that record (see put)


def _process_start(pid: int) -> str | None:
    """The start time of `pid` (clock ticks since boot, Linux), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class CellStore:
    def __init__(self, root: str, legacy: str | None = None, lease_s: float = LEASE_S):
        self.root = os.path.abspath(root)
        self.done_dir = os.path.join(self.root, "done")
        self.claims_dir = os.path.join(self.root, "claims")
        self.tmp_dir = os.path.join(self.root, "tmp")
        for directory in (self.done_dir, self.claims_dir, self.tmp_dir):
            os.makedirs(directory, exist_ok=True)
        self.lease_s = lease_s
        self.host = socket.gethostname()
        self._records: dict[str, dict] = {}
        self._legacy: dict[str, dict] = self._read_legacy(legacy) if legacy else {}
        self._held: dict[str, tuple[str, str]] = {}  # key -> (claim path, token)
        self._lock = threading.Lock()

    # --- records ---------------------------------------------------------------------------------------------

    @staticmethod
    def ident(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]

    def _done_path(self, key: str) -> str:
        return os.path.join(self.done_dir, self.ident(key) + ".json")

    def get(self, key: str) -> dict | None:
        """The finished record of `key`, or None."""
        record = self._records.get(key)
        if record is None:
            record = self._read(self._done_path(key), key)
            if record is not None:
                self._records[key] = record
        return record if record is not None else self._legacy.get(key)

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def records(self) -> dict[str, dict]:
        """Every finished record, by key."""
        found = dict(self._legacy)
        for name in sorted(os.listdir(self.done_dir)):
            if name.endswith(".json"):
                record = self._read(os.path.join(self.done_dir, name), None)
                if record is not None:
                    found[record["key"]] = record
        return found

    def put(self, key: str, record: dict) -> dict:
        """Write `record` (with its key) whole, or not at all."""
        record = {**record, "key": key}
        data = (json.dumps(record, default=_plain) + "\n").encode("utf-8")
        tmp = os.path.join(self.tmp_dir, f"{self.ident(key)}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            half = len(data) // 2
            os.write(fd, data[:half])
            _hold_if_asked(key)
            view = memoryview(data)[half:]
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._done_path(key))
        _fsync_directory(self.done_dir)
        self._records[key] = record
        return record

    def discard(self, key: str) -> None:
        """Forget a finished record (e.g. a failure worth retrying)."""
        self._records.pop(key, None)
        self._legacy.pop(key, None)
        try:
            os.unlink(self._done_path(key))
        except FileNotFoundError:
            pass

    def _read(self, path: str, key: str | None) -> dict | None:
        try:
            with open(path, encoding="utf-8") as f:
                record = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            warnings.warn(f"{path}: unreadable cached record skipped ({exc}); it is computed again")
            return None
        if not isinstance(record, dict) or "key" not in record or (key is not None and record["key"] != key):
            return None
        return record

    @staticmethod
    def _read_legacy(path: str) -> dict[str, dict]:
        found: dict[str, dict] = {}
        if not os.path.exists(path):
            return found
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut off by a crash
                    continue
                if isinstance(record, dict) and isinstance(record.get("key"), str):
                    found[record["key"]] = record
        return found

    # --- claims ----------------------------------------------------------------------------------------------

    def _claim_path(self, key: str) -> str:
        return os.path.join(self.claims_dir, self.ident(key))

    def try_claim(self, key: str) -> bool:
        """Claim `key` for this process; False when it is finished or a live owner holds it."""
        if key in self._held:
            return True
        if self.has(key):
            return False
        path = self._claim_path(key)
        for _ in range(3):
            token = uuid.uuid4().hex
            owner = {"host": self.host, "pid": os.getpid(), "start": _process_start(os.getpid()), "token": token,
                     "since": time.time(), "key": key}
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.holder(key)
                if holder is not None and not self._stale(path, holder):
                    return False
                self._break(path, holder)
                continue
            try:
                os.write(fd, json.dumps(owner).encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                self._held[key] = (path, token)
            if self.has(key):  # finished by its previous owner between our look and our claim
                self.release(key)
                return False
            return True
        return False

    def release(self, key: str) -> None:
        with self._lock:
            held = self._held.pop(key, None)
        if held is None:
            return
        path, token = held
        holder = self._read_claim(path)
        if holder is None or holder.get("token") == token:  # never remove a claim someone took over
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def release_all(self) -> None:
        for key in list(self._held):
            self.release(key)

    def holder(self, key: str) -> dict | None:
        """The owner of the claim on `key` ({} when the claim file is still being written), or None."""
        return self._read_claim(self._claim_path(key))

    def _read_claim(self, path: str) -> dict | None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {}  # created, its owner not yet written (or the owner died right then)

    def _stale(self, path: str, holder: dict) -> bool:
        if holder.get("host") == self.host and isinstance(holder.get("pid"), int):
            pid = holder["pid"]
            if pid == os.getpid():
                return holder.get("token") not in {t for _, t in self._held.values()}
            return not process_alive(pid) or (holder.get("start") is not None
                                              and _process_start(pid) != holder["start"])
        try:
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return True
        return age > self.lease_s

    def _break(self, path: str, holder: dict | None) -> None:
        """Remove a stale claim; if a racing worker replaced it by a fresh one meanwhile, put that one back."""
        moved = f"{path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, moved)
        except FileNotFoundError:
            return
        taken = self._read_claim(moved)
        if holder and taken and taken.get("token") != holder.get("token"):
            try:
                os.link(moved, path)  # fails if a third worker already claimed: then two compute it
            except OSError:
                pass
        try:
            os.unlink(moved)
        except FileNotFoundError:
            pass

    def heartbeat(self) -> None:
        """Refresh the mtime of every claim this process holds (what other hosts judge staleness by)."""
        with self._lock:
            paths = [path for path, _ in self._held.values()]
        for path in paths:
            try:
                os.utime(path)
            except FileNotFoundError:
                pass

    def heartbeating(self, every_s: float | None = None) -> "_Heartbeat":
        """Context manager: a daemon thread refreshes this process's claims until exit, then releases them."""
        return _Heartbeat(self, every_s if every_s is not None else self.lease_s / 4)

    def claim_or_wait(self, key: str, poll_s: float = 0.5, on_wait: Callable[[dict], None] | None = None
                      ) -> dict | None:
        """The record of `key` once someone finished it, or None when this process now holds the claim and
        should compute it (blocking while a live owner computes it)."""
        told = False
        while True:
            record = self.get(key)
            if record is not None:
                return record
            if self.try_claim(key):
                return None
            if on_wait is not None and not told:
                on_wait(self.holder(key) or {})
                told = True
            time.sleep(poll_s)


class _Heartbeat:
    def __init__(self, store: CellStore, every_s: float):
        self.store, self.every_s = store, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="claim-heartbeat")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.store.heartbeat()

    def __enter__(self) -> CellStore:
        self._thread.start()
        return self.store

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.store.release_all()


def _fsync_directory(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return float(value)


def _hold_if_asked(key: str) -> None:
    """Testing aid for the kill-recovery test: with ATP_STORE_HOLD="KEY_PART=MARKER", the first process to write a
    record whose key contains KEY_PART writes its pid to MARKER (created exclusively) and stops here, half of the
    record written, until it is killed. Unset (always, outside that test) it does nothing."""
    asked = os.environ.get(HOLD_ENV)
    if not asked or "=" not in asked:
        return
    part, marker = asked.rsplit("=", 1)
    if part not in key:
        return
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode("ascii"))
    os.close(fd)
    while True:
        time.sleep(3600)


DONE, PROGRESS, BLOCKED = "done", "progress", "blocked"  # what one step of work achieved


def work_through(steps: list[Callable[[], str]], store: CellStore, poll_s: float = 0.5) -> None:
    """Run the steps until every one is DONE. Each step does at most one piece of work (a cell, a trial) and
    says PROGRESS, or BLOCKED when what it needs is claimed by another live worker. After any progress the
    scan restarts from the first step (the canonical order: searches before the cells that need them); when
    nothing can progress, wait for the others' records or for their claims to go stale."""
    while True:
        states = []
        for step in steps:
            state = step()
            if state == PROGRESS:
                break
            states.append(state)
        else:
            if all(state == DONE for state in states):
                return
            time.sleep(poll_s)
