"""The snapshot store: layout, atomic publishing under concurrent writers and killed writers,
corrupt entries, base fingerprints, name checks, and the ``snapshot`` / ``store ls`` commands."""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ram_trl.cli.snapshot import add_parser as add_subcommands
from ram_trl.errors import InputError
from ram_trl.snapshot import (
    SnapshotStore,
    TaskVector,
    TaskVectorSource,
    resolve_store_agents,
    snapshot_folders,
)

ROOT = Path(__file__).resolve().parents[1]


def make_models(folder: Path, agents: int = 2, rows: int = 64, seed: int = 0) -> list[Path]:
    """A base and ``agents`` fine-tunes (about 5% changed), as checkpoint folders."""
    gen = torch.Generator().manual_seed(seed)
    base = {f"w{i}": torch.randn(rows, 32, generator=gen).bfloat16() for i in range(3)}
    paths = [folder / "base"]
    for tensors, path in [(base, paths[0])] + [(None, folder / f"agent{i}") for i in range(agents)]:
        if tensors is None:
            tensors = {}
            for name, b in base.items():
                t = b.clone().view(-1)
                pos = torch.randperm(t.numel(), generator=gen)[: t.numel() // 20]
                t[pos] = (t[pos].float() + 1).bfloat16()
                tensors[name] = t.view(b.shape)
            paths.append(path)
        path.mkdir(parents=True)
        save_file(tensors, path / "model.safetensors")
    return paths


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    return make_models(tmp_path / "models")


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "store")


def writer(base: Path, model: Path):
    return lambda d: snapshot_folders(base, model, d)


# --- the basics -------------------------------------------------------------------------------


def test_put_get_latest_list(store: SnapshotStore, models: list[Path]) -> None:
    base, a, b = models
    tv = TaskVector.from_folders(base, a, metrics={"mean_reward": 0.5})
    p1 = store.put(tv, "coder", 10)
    p2 = store.put(writer(base, b), "coder", 20)
    p3 = store.put(writer(base, a), "tool.user-2", 5)
    assert p1 == store.root / "agents" / "coder" / "step-10"
    assert (p2 / "manifest.json").is_file() and p3.is_dir()
    assert store.agents() == ["coder", "tool.user-2"]
    assert store.steps("coder") == [10, 20] and store.steps("nobody") == []
    assert store.latest("coder").path == p2 and store.latest("nobody") is None
    assert store.get("coder", 10).manifest().metrics == {"mean_reward": 0.5}
    manifest = json.loads((p2 / "manifest.json").read_text())
    assert (manifest["agent"], manifest["step"]) == ("coder", 20)  # filled in by put()
    rows = store.list()
    assert [(r.agent, r.step) for r in rows] == [("coder", 10), ("coder", 20), ("tool.user-2", 5)]
    assert all(r.valid and 0.04 < r.density < 0.06 and r.size > 0 and r.created for r in rows)
    assert rows[0].nnz == tv.nnz
    info = json.loads((store.root / "store.json").read_text())
    assert info["base_fingerprint"] == tv.base_fingerprint
    with store.get("coder", 20).open(base) as source:
        assert isinstance(source, TaskVectorSource) and source.agent == "coder"
    assert not [p for p in store.root.rglob(".tmp-*")]  # nothing left behind


def test_existing_step_and_replace(store: SnapshotStore, models: list[Path]) -> None:
    base, a, b = models
    store.put(writer(base, a), "x", 1)
    with pytest.raises(InputError, match="already exists"):
        store.put(writer(base, b), "x", 1)
    store.put(writer(base, b), "x", 1, replace=True)
    assert store.get("x", 1).load().nnz == TaskVector.from_folders(base, b).nnz


def test_prune_keeps_newest_valid(store: SnapshotStore, models: list[Path]) -> None:
    base, a, _ = models
    for step in (1, 2, 3, 4):
        store.put(writer(base, a), "x", step)
    (store.path("x", 4) / "manifest.json").write_text("garbage")
    removed = store.prune("x", keep_last=2)
    assert removed == [store.path("x", 1)]
    assert store.steps("x") == [2, 3, 4]  # 4 is corrupt: kept for inspection, not counted
    with pytest.raises(InputError, match="keep_last"):
        store.prune("x", keep_last=0)


def test_merged_dir(store: SnapshotStore) -> None:
    assert store.merged_dir("ram-plus.v1") == store.root / "merged" / "ram-plus.v1"
    for bad in ("..", "a/b", "", ".hidden"):
        with pytest.raises(InputError, match="not allowed"):
            store.merged_dir(bad)


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../evil", "a/b", "-x", ".x", "a" * 65, "a b", "a\n"]
)
def test_unsafe_agent_names(store: SnapshotStore, models: list[Path], name: str) -> None:
    base, a, _ = models
    with pytest.raises(InputError, match="not allowed"):
        store.put(writer(base, a), name, 1)
    with pytest.raises(InputError, match="not allowed"):
        store.latest(name)


def test_bad_steps(store: SnapshotStore, models: list[Path]) -> None:
    base, a, _ = models
    for step in (-1, 1.5, "3", True):
        with pytest.raises(InputError, match="step"):
            store.put(writer(base, a), "x", step)  # type: ignore[arg-type]


def test_other_base_is_refused(store: SnapshotStore, models: list[Path], tmp_path: Path) -> None:
    base, a, _ = models
    store.put(writer(base, a), "x", 1)
    other_base, other_agent = make_models(tmp_path / "other", agents=1, seed=7)
    tv = TaskVector.from_folders(other_base, other_agent)
    ours = store.base_fingerprint
    for attempt in (tv, writer(other_base, other_agent)):
        with pytest.raises(InputError) as err:
            store.put(attempt, "y", 1)
        assert ours in str(err.value) and tv.base_fingerprint in str(err.value)
        assert str(store.root) in str(err.value) and str(base) in str(err.value)
    assert store.steps("y") == []


def test_callback_with_other_agent_is_refused(store: SnapshotStore, models: list[Path]) -> None:
    base, a, _ = models
    with pytest.raises(InputError, match="says agent 'z'"):
        store.put(lambda d: snapshot_folders(base, a, d, agent="z"), "x", 1)
    assert store.steps("x") == []


def test_store_file_checks(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a snapshot store"):
        SnapshotStore(tmp_path / "missing", create=False)
    store = SnapshotStore(tmp_path / "s")
    info = json.loads((store.root / "store.json").read_text())
    (store.root / "store.json").write_text(json.dumps({**info, "format_version": 9}))
    with pytest.raises(InputError, match="format version 9"):
        SnapshotStore(tmp_path / "s")


# --- corrupt entries --------------------------------------------------------------------------


def test_corrupt_entry_is_flagged_and_skipped(store: SnapshotStore, models: list[Path]) -> None:
    base, a, b = models
    store.put(writer(base, a), "x", 1)
    bad = store.put(writer(base, b), "x", 2)
    os.truncate(bad / "task_vector.safetensors", 100)
    rows = {r.step: r for r in store.list()}
    assert rows[1].valid and not rows[2].valid
    assert str(bad) in rows[2].error and "truncated" in rows[2].error
    with pytest.warns(UserWarning, match="step-2"):
        assert store.latest("x").step == 1
    with pytest.raises(InputError, match=str(bad)):
        store.get("x", 2)
    with pytest.raises(InputError, match="step 3"):
        store.get("x", 3)
    with pytest.warns(UserWarning):
        assert resolve_store_agents(store, ["x"]) == {"x": store.path("x", 1)}


# --- resolving merge inputs -----------------------------------------------------------------


def test_resolve_store_agents(store: SnapshotStore, models: list[Path]) -> None:
    base, a, b = models
    for step in (1, 2):
        store.put(writer(base, a), "a", step)
    store.put(writer(base, b), "b", 7)
    assert resolve_store_agents(store, []) == {"a": store.path("a", 2), "b": store.path("b", 7)}
    assert resolve_store_agents(store, ["a@1", "b"]) == {
        "a": store.path("a", 1),
        "b": store.path("b", 7),
    }
    cases = {
        "a@x": "must be an integer",
        "a@3": "no snapshot of agent 'a' at step 3",
        "zed": "no agent 'zed'",
        "../a": "not allowed",
    }
    for spec, message in cases.items():
        with pytest.raises(InputError, match=message):
            resolve_store_agents(store, [spec])
    with pytest.raises(InputError, match="given twice"):
        resolve_store_agents(store, ["a", "a@1"])
    with pytest.raises(InputError, match="no snapshots"):
        resolve_store_agents(SnapshotStore(store.root.parent / "empty"), [])


# --- concurrency and crashes -------------------------------------------------------------------


# Writers are real processes. They are forked (as PyTorch's DataLoader workers are) rather than
# spawned only because a spawned child re-imports torch, which costs seconds per process.
CTX = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _concurrent_worker(root, base, model, agent, step, barrier, results) -> None:
    store = SnapshotStore(root)
    barrier.wait()
    store.put(writer(base, model), agent, step)
    store.put(writer(base, model), "shared", 9, replace=True)  # every process writes this step
    try:
        store.put(writer(base, model), "once", 1)  # ... and this one, but only one may
        results.put("won")
    except InputError:
        results.put("lost")


def test_concurrent_writers(tmp_path: Path) -> None:
    base, *agents = make_models(tmp_path / "models", agents=4, rows=512)
    root = tmp_path / "store"
    jobs = [("a", 1), ("b", 1), ("c", 1), ("c", 2)]  # two processes write agent c
    barrier, results = CTX.Barrier(len(jobs)), CTX.Queue()
    procs = [
        CTX.Process(
            target=_concurrent_worker,
            args=(root, base, agents[i], agent, step, barrier, results),
        )
        for i, (agent, step) in enumerate(jobs)
    ]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert outcomes == ["lost", "lost", "lost", "won"]
    store = SnapshotStore(root)
    rows = store.list()
    assert [(r.agent, r.step) for r in rows] == [
        ("a", 1), ("b", 1), ("c", 1), ("c", 2), ("once", 1), ("shared", 9)
    ]  # fmt: skip
    assert all(r.valid for r in rows)
    for r in rows:
        with TaskVectorSource(r.path, base) as source:
            assert source.read("w0", 0, 8).shape == (8, 32)
    assert not list(root.rglob(".tmp-*")) and not list(root.rglob(".trash-*"))


def _stalling_writer(root: Path, base: Path, model: Path, marker: Path) -> None:
    from ram_trl.io import ModelFolder

    class Stalling(ModelFolder):
        calls = 0

        def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
            Stalling.calls += 1
            if Stalling.calls == 2:  # the first tensor is on disk: stall mid-snapshot
                marker.touch()
                time.sleep(600)
            return super().read(name, start, stop)

    base_folder = Stalling(base)
    SnapshotStore(root).put(lambda d: snapshot_folders(base_folder, model, d), "victim", 1)


def test_killed_writer_leaves_no_entry(tmp_path: Path, models: list[Path]) -> None:
    base, a, _ = models
    root, marker = tmp_path / "store", tmp_path / "started"
    store = SnapshotStore(root)
    store.put(writer(base, a), "victim", 0)  # also caches the base's fingerprint
    child = CTX.Process(target=_stalling_writer, args=(root, base, a, marker))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.is_alive(), "the writer exited early"
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.02)
        leftovers = list((root / "agents" / "victim").glob(".tmp-*"))
        assert any(p.is_dir() and any(p.iterdir()) for p in leftovers)  # it is mid-write
        assert store.steps("victim") == [0]
        assert store.clean() == []  # its writer is alive: nothing to reap
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == -signal.SIGKILL
    assert store.steps("victim") == [0]
    assert [(r.step, r.valid) for r in store.list()] == [(0, True)]
    store.put(writer(base, a), "victim", 1)
    assert store.latest("victim").step == 1
    reaped = store.clean()
    assert reaped and not list((root / "agents" / "victim").glob(".tmp-*"))


def test_entries_being_read_are_not_pulled_away(store: SnapshotStore, models: list[Path]) -> None:
    base, a, _ = models
    for step in (1, 2, 3):
        store.put(writer(base, a), "x", step)
    with store.get("x", 1).open(base) as reading:
        assert store.remove("x", 1, wait=False) is False
        assert store.prune("x", keep_last=1) == [store.path("x", 2)]  # step 1 is in use
        assert store.steps("x") == [1, 3]
        reading.read("w0", 0, 4)
    assert store.prune("x", keep_last=1) == [store.path("x", 1)]
    leaked = store.get("x", 3).open(base)
    assert store.remove("x", 3, wait=False) is False
    del leaked  # never closed: garbage collection releases the lease
    gc.collect()
    assert store.remove("x", 3, wait=False) is True


def _replacer(root: Path, base: Path, model: Path, go) -> None:
    go.wait()
    SnapshotStore(root).put(writer(base, model), "x", 1, replace=True)


def test_replace_waits_for_readers(store: SnapshotStore, models: list[Path]) -> None:
    base, a, b = models
    old = store.put(writer(base, a), "x", 1)
    old_nnz = TaskVector.load(old).nnz
    go = CTX.Event()
    # forked before the lease is taken: a forked child would share (and keep) the lock
    child = CTX.Process(target=_replacer, args=(store.root, base, b, go))
    child.start()
    source = store.get("x", 1).open(base)
    try:
        go.set()
        child.join(timeout=1.5)
        assert child.is_alive()  # blocked on our read lease
        assert TaskVector.load(store.path("x", 1)).nnz == old_nnz
        source.read("w1", 0, 64)  # the files we read are still there
    finally:
        source.close()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert TaskVector.load(store.path("x", 1)).nnz == TaskVector.from_folders(base, b).nnz


# --- the command line ---------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ram-trl")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_snapshot_and_ls(tmp_path: Path, models: list[Path], capsys) -> None:
    base, a, _ = models
    ckpt = tmp_path / "run" / "checkpoint-300"
    ckpt.parent.mkdir()
    os.symlink(a, ckpt)
    store = tmp_path / "store"
    assert run_cli("snapshot", "--base", str(base), "--model", str(ckpt), "--store", str(store),
                   "--agent", "coder", "--metric", "mean_reward=0.25") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "agent coder" in out and "step 300" in out and "density 4.98" in out and "ratio" in out
    assert run_cli("snapshot", "--base", str(base), "--model", str(a), "--store", str(store),
                   "--agent", "coder") == 0  # fmt: skip
    assert "step 301" in capsys.readouterr().out  # no step in the name: the next free one
    assert run_cli("store", "ls", str(store)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    fingerprint = SnapshotStore(store).base_fingerprint
    assert lines[0] == f"base: {base.resolve()}  (fingerprint {fingerprint})"
    assert lines[1].split() == ["agent", "step", "density", "size", "created", "status"]
    assert [line.split()[:2] for line in lines[2:]] == [["coder", "300"], ["coder", "301"]]
    assert all(line.endswith("ok") for line in lines[2:])
    assert run_cli("store", "ls", str(store), "--json") == 0
    base_row, first = map(json.loads, capsys.readouterr().out.splitlines()[:2])
    assert base_row == {"kind": "base", "path": str(base.resolve()), "fingerprint": fingerprint}
    assert first["metrics"] == {"mean_reward": 0.25} and first["error"] is None
    assert run_cli("snapshot", "--base", str(base), "--model", str(a),
                   "--out", str(tmp_path / "loose")) == 0  # fmt: skip
    assert (tmp_path / "loose" / "manifest.json").is_file()
    with pytest.raises(InputError, match="--agent"):
        run_cli("snapshot", "--base", str(base), "--model", str(a), "--store", str(store))
    other_base, other = make_models(tmp_path / "other", agents=1, seed=7)
    with pytest.raises(InputError, match="one store per base"):
        run_cli("snapshot", "--base", str(other_base), "--model", str(other), "--store",
                str(store), "--agent", "coder")  # fmt: skip
    with pytest.raises(InputError, match="KEY=NUMBER"):
        run_cli("snapshot", "--base", str(base), "--model", str(a), "--store", str(store),
                "--agent", "x", "--metric", "oops")  # fmt: skip


def test_cli_import_is_lean() -> None:
    code = "import sys, ram_trl.cli.snapshot; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"
