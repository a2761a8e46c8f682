"""The shared cell cache: records are whole or absent, claims are exclusive, a dead owner's claim is taken over, and
work_through finishes every step. No timing: staleness is decided by process liveness (same host) or by an mtime
set explicitly (other hosts)."""
import json
import os
import signal
import subprocess
import sys


from lib.compare.store import BLOCKED, DONE, PROGRESS, CellStore, work_through

from conftest import REPO

CLAIMER = """
import sys, time
sys.path.insert(0, {repo!r})
from lib.compare.store import CellStore
store = CellStore({root!r})
assert store.try_claim("cell-a")
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_record_is_written_whole_and_read_back(tmp_path):
    store = CellStore(str(tmp_path / "s"))
    assert store.get("k") is None
    store.put("k", {"ppl": 12.5, "sparsities": [0.5, 0.9]})
    fresh = CellStore(str(tmp_path / "s"))  # another process's view: from the file alone
    assert fresh.get("k") == {"ppl": 12.5, "sparsities": [0.5, 0.9], "key": "k"}
    assert list(fresh.records()) == ["k"]
    assert os.listdir(tmp_path / "s" / "tmp") == []


def test_a_half_written_record_never_counts(tmp_path):
    store = CellStore(str(tmp_path / "s"))
    partial = json.dumps({"key": "k", "ppl": 1.0})[:10]
    (tmp_path / "s" / "tmp" / f"{store.ident('k')}.123.abcd").write_text(partial)  # a writer killed mid-write
    assert store.get("k") is None and store.records() == {}
    assert store.try_claim("k")


def test_a_claim_is_exclusive_until_released_and_refused_once_done(tmp_path):
    first, second = CellStore(str(tmp_path / "s")), CellStore(str(tmp_path / "s"))
    second._stale = lambda path, holder: False  # pretend the first store is another live process
    assert first.try_claim("k")
    assert not second.try_claim("k")
    assert second.holder("k")["pid"] == os.getpid()
    first.put("k", {"ppl": 3.0})
    first.release("k")
    assert not second.try_claim("k")  # finished: nothing to claim
    assert second.claim_or_wait("k")["ppl"] == 3.0


def test_the_claim_of_a_killed_process_is_taken_over(tmp_path):
    root = str(tmp_path / "s")
    proc = subprocess.Popen([sys.executable, "-c", CLAIMER.format(repo=str(REPO), root=root)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "claimed"
        store = CellStore(root)
        assert not store.try_claim("cell-a")  # its owner is alive
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert store.try_claim("cell-a")  # its owner is gone
        assert store.holder("cell-a")["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()


def test_a_claim_from_another_host_is_stale_only_after_its_lease(tmp_path):
    store = CellStore(str(tmp_path / "s"), lease_s=600)
    path = store._claim_path("k")
    with open(path, "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "token": "t"}, f)
    assert not store.try_claim("k")  # fresh heartbeat
    os.utime(path, (os.stat(path).st_atime, os.stat(path).st_mtime - 601))
    assert store.try_claim("k")


def test_legacy_jsonl_cache_is_read(tmp_path):
    legacy = tmp_path / "t.cells.jsonl"
    legacy.write_text(json.dumps({"key": "old", "ppl": 7.0}) + "\n" + '{"key": "cut", "pp')
    store = CellStore(str(tmp_path / "t.cells"), legacy=str(legacy))
    assert store.get("old")["ppl"] == 7.0 and store.get("cut") is None


def test_work_through_restarts_after_progress_and_ends_when_all_are_done(tmp_path):
    store = CellStore(str(tmp_path / "s"))
    calls = []

    def step(name, needs=None):
        def run():
            calls.append(name)
            if store.has(name):
                return DONE
            if needs and not store.has(needs):
                return BLOCKED
            store.put(name, {})
            return PROGRESS
        return run

    work_through([step("b", needs="a"), step("a")], store, poll_s=0)
    assert store.has("a") and store.has("b")
    assert calls[:4] == ["b", "a", "b", "b"]  # after a's progress the scan restarts with b
