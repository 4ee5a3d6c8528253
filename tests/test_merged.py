"""Merged entries of a store: one per store state, reuse, claims held by live and dead processes,
``latest``, retention, ``store clean`` and ``store ls``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_store import make_models, run_cli, writer

from ram_trl.errors import InputError
from ram_trl.snapshot import SnapshotStore
from ram_trl.training.jobs import MergeSettings, merge_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def filled(tmp_path: Path) -> tuple[SnapshotStore, Path, list[Path]]:
    base, a, b = make_models(tmp_path / "models")
    store = SnapshotStore(tmp_path / "store")
    store.put(writer(base, a), "a", 1)
    store.put(writer(base, b), "b", 1)
    return store, base, [a, b]


def test_one_entry_per_store_state(filled) -> None:
    store, base, (a, b) = filled
    first = merge_store(store, base, MergeSettings())
    assert first.made and first.entry.name == "merge-000001"
    assert first.entry.steps == {"a": 1, "b": 1}
    assert os.readlink(store.root / "merged" / "latest") == "merge-000001"
    again = merge_store(store, base, MergeSettings(params={"r": 0.1}))  # the defaults, spelled out
    assert not again.made and again.entry == first.entry
    other = merge_store(store, base, MergeSettings(method="ram"))  # other settings: another merge
    assert other.made and other.entry.sequence == 2
    store.put(writer(base, b), "a", 2)
    newer = merge_store(store, base, MergeSettings(), keep_last_merged=2)
    assert newer.entry.steps == {"a": 2, "b": 1} and newer.entry.sequence == 3
    assert [e.name for e in store.merged.entries()] == ["merge-000002", "merge-000003"]
    assert store.merged.latest() == newer.entry
    record = json.loads((newer.entry.path / "merge_inputs.json").read_text())
    assert record["inputs"]["a"]["step"] == 2 and record["settings"]["method"] == "ram_plus"
    # a snapshot rewritten at the same step (a resumed run) is another input
    store.put(writer(base, a), "a", 2, replace=True)
    assert merge_store(store, base, MergeSettings()).made
    store.put(writer(base, a), "c", 1)
    assert merge_store(store, base, MergeSettings(min_agents=4)) is None


HOLD = """
import sys, time
from ram_trl.snapshot import SnapshotStore
store = SnapshotStore(sys.argv[1])
claim = store.merged.claim({a: store.latest(a) for a in store.agents()}, {"method": "x"})
(claim.entry.path.parent / f".{claim.entry.name}.tmp-123-abcd").mkdir()  # as the engine would
print(claim.state, claim.entry.name, flush=True)
time.sleep(60)
"""


def test_claims_of_live_and_dead_processes(filled, capsys) -> None:
    store, _, _ = filled
    refs = {a: store.latest(a) for a in store.agents()}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store.root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().split() == ["new", "merge-000001"]
        running = store.merged.claim(refs, {"method": "x"})
        assert running.state == "running" and running.entry.name == "merge-000001"
        assert running.wait(timeout=0.5) is None  # still being made
        other = store.merged.claim(refs, {"method": "y"})  # another state: the next number
        assert other.state == "new" and other.entry.name == "merge-000002"
        other.release()
        assert store.clean() == []  # the live merge's marker and folder stay
    finally:
        proc.kill()
        proc.wait()
    merged = store.root / "merged"
    assert {p.name for p in merged.iterdir()} == {
        ".pending-merge-000001.json",
        ".merge-000001.tmp-123-abcd",
    }
    assert run_cli("store", "clean", str(store.root)) == 0
    assert "removed" in capsys.readouterr().out
    assert list(merged.iterdir()) == []  # the dead merge's leftovers are gone
    again = store.merged.claim(refs, {"method": "x"})  # made afresh
    assert again.state == "new" and again.entry.name == "merge-000001"
    again.release()


def test_a_waiter_gets_the_entry_another_process_made(filled, tmp_path) -> None:
    store, base, _ = filled
    code = (
        "import sys; from ram_trl.snapshot import SnapshotStore; "
        "from ram_trl.training.jobs import MergeSettings, merge_store; "
        "print(merge_store(SnapshotStore(sys.argv[1]), sys.argv[2], MergeSettings()).made)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(store.root), str(base)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    made = [p.communicate(timeout=120)[0].split()[-1] for p in procs]
    assert sorted(made) == ["False", "False", "True"]  # one merged, two reused or waited
    (entry,) = store.merged.entries()
    assert store.merged.latest() == entry


def test_store_ls_lists_merged_entries(filled, capsys) -> None:
    store, base, _ = filled
    merge_store(store, base, MergeSettings())
    assert run_cli("store", "ls", str(store.root)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].split() == ["merged", "inputs", "method", "output", "created"]
    assert out[-1].split()[:5] == ["merge-000001", "a@1", "b@1", "ram_plus", "model"]
    assert out[-1].endswith("<- latest")
    assert run_cli("store", "ls", str(store.root), "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in rows] == ["base", "snapshot", "snapshot", "merged"]
    assert rows[-1]["latest"] and rows[-1]["inputs"]["b"]["step"] == 1
    with pytest.raises(InputError, match="keep_last_merged"):
        store.merged.prune(0)


def test_stray_latest_links_are_cleaned(filled) -> None:
    store, _, _ = filled
    stray = store.root / "merged" / ".latest-dead"
    os.symlink("merge-000009", stray)
    assert store.clean() == []  # a link being swapped in right now
    old = time.time() - 120
    os.utime(stray, (old, old), follow_symlinks=False)
    assert store.clean() == [stray]
