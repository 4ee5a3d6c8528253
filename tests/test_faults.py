"""Fault injection (issue 9): SIGKILL in the middle of a merge or a snapshot, a disk that fills up
while writing, and many writers, readers and pruners on one store at once.

What must hold, whatever the fault: no partial output or store entry is ever visible; no input
and no published data is lost; every failure is one clear line (exit code 2, no traceback); and
temporaries of dead processes are found and removed (by the next run into the same place, or by
``ram-trl store clean``) while a temporary that a live process is writing is never touched.

Processes are interrupted with SIGSTOP as soon as their temporary folder holds data (polled every
half millisecond), then killed or resumed, so "mid-write" is observed, not assumed.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faults_helpers import (
    agent_args,
    assert_clean_error,
    assert_names_any,
    assert_store_unbound,
    file_size_limit,
    finite_weights,
    hidden_entries,
    kill,
    leftovers,
    resume,
    run_cli,
    small_tmpfs,
    snapshot_args,
    start_ram_trl,
    stop_when,
    strerror_words,
    strict_reads,
    writing_into,
)
from safetensors.torch import load_file

import ram_trl
from ram_trl.errors import InputError
from ram_trl.snapshot import SnapshotStore, TaskVector, snapshot_folders

WEIGHTS = "model.safetensors"
TENSOR = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A 16M-parameter float32 base (61 MB) and two agents: 'a' sparse (5%), 'd' dense (60%,
    so its snapshot is stored densely). Large enough that writing takes a few tenths of a second,
    the window in which the tests stop or kill the writer."""
    from ram_trl.testing import make_sparse_agents, save_tiny_base

    root = tmp_path_factory.mktemp("big")
    base = save_tiny_base(root / "base", hidden_size=512, layers=4)
    agents = make_sparse_agents(base, root / "agents", ["a", "d"], density={"a": 0.05, "d": 0.6})
    return base, agents


@pytest.fixture(scope="module")
def big_store_template(big, tmp_path_factory) -> Path:
    base, agents = big
    store = SnapshotStore(tmp_path_factory.mktemp("big-store") / "store")
    for name, path in agents.items():
        store.put(lambda d, path=path: snapshot_folders(base, path, d), name, 0)
    return store.root


@pytest.fixture
def big_store(big_store_template, tmp_path) -> Path:
    """A private copy of a store holding step 0 of the big agents."""
    return Path(shutil.copytree(big_store_template, tmp_path / "store"))


def stop_mid_write(
    args: list,
    out: Path,
    *,
    folder: Path | None = None,
    reset: Callable[[], None] | None = None,
    tries: int = 3,
):
    """Start ``ram-trl ARGS`` and SIGSTOP it while it writes its temporary for ``out`` in
    ``folder`` (default: out's parent). Returns (process, the hidden entries it created). A run
    that finished before it could be caught is undone (``reset``, default: delete ``out``) and
    tried again."""
    folder = out.parent if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(tries):
        before = hidden_entries(folder)
        proc = start_ram_trl(*args)
        if stop_when(proc, writing_into(folder, before)):
            return proc, hidden_entries(folder) - before
        out_text, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{args} failed before it could be interrupted:\n{err}"
        reset() if reset is not None else shutil.rmtree(out)
    pytest.fail(f"ram-trl {args[0]} finished every time before it could be interrupted")


def merge_args(big, out: Path) -> list:
    base, agents = big
    return ["merge", "--base", base, *agent_args(agents), "--out", out, "-q"]


def assert_loads(folder: Path) -> None:
    bad, total = finite_weights(folder)
    assert total > 0 and bad == 0, folder


# =============================================================================================
# SIGKILL mid-merge (issue item 6)
# =============================================================================================


def test_sigkill_mid_merge_is_reaped_by_the_next_run(tmp_path, big) -> None:
    """Item 6: a killed ``ram-trl merge`` leaves its hidden temporary folder (265 MB at 0.2B)
    forever today. Expected: no output appears; the next merge into the same place succeeds and
    removes the dead process's temporary."""
    out = tmp_path / "runs" / "merged"
    args = merge_args(big, out)
    proc, stale = stop_mid_write(args, out)
    kill(proc)
    assert not out.exists(), "a killed merge published a partial output"
    assert stale, "the killed merge left no temporary: nothing to test"
    again = run_cli(*args)
    assert again.rc == 0, again
    assert_loads(out)
    left = hidden_entries(out.parent)
    assert left == set(), f"stale temporaries left: {left}"


def test_sigkill_mid_store_merge_is_removed_by_store_clean(big_store) -> None:
    """Item 6: a killed ``ram-trl merge --store`` leaves 513 MB under ``STORE/merged/`` that
    ``ram-trl store clean`` does not remove today. Expected: ``store clean`` removes it, and the
    store lists its entries as before."""
    merged = big_store / "merged"
    out = merged / "m"
    proc, stale = stop_mid_write(["merge", "--store", big_store, "--out", out, "-q"], out)
    kill(proc)
    assert not out.exists() and stale
    cleaned = run_cli("store", "clean", big_store)
    assert cleaned.rc == 0, cleaned
    assert hidden_entries(merged) == set(), f"store clean left {hidden_entries(merged)}"
    assert leftovers(big_store) == []
    assert all(i.valid for i in SnapshotStore(big_store, create=False).list())


def test_live_merge_temporary_is_never_touched(
    tmp_path, big, tiny_base_factory, tiny_agents_factory
) -> None:
    """Item 6, the other side: reaping must never touch a temporary that a live process is
    writing. A merge is stopped mid-write; another merge into the same folder runs meanwhile.
    Expected: the stopped merge's temporary survives, and once resumed it completes (exit 0)."""
    parent = tmp_path / "runs"
    first = parent / "first"
    proc, live = stop_mid_write(merge_args(big, first), first)
    try:
        tiny = tiny_base_factory()
        other = run_cli(*merge_args((tiny, tiny_agents_factory(tiny)), parent / "second"))
        assert other.rc == 0, other
        assert live <= hidden_entries(parent), "the live merge's temporary was removed"
    finally:
        rc, _, err = resume(proc)
    assert rc == 0, err
    assert_loads(first)
    assert hidden_entries(parent) == set()


def test_live_store_merge_survives_store_clean(big_store) -> None:
    """Item 6: ``store clean`` while a store merge is writing (stopped mid-write) must leave its
    temporary alone. Expected: the merge, resumed, completes (exit 0)."""
    merged = big_store / "merged"
    out = merged / "m"
    proc, live = stop_mid_write(["merge", "--store", big_store, "--out", out, "-q"], out)
    try:
        cleaned = run_cli("store", "clean", big_store)
        assert cleaned.rc == 0, cleaned
        assert live <= hidden_entries(merged), "store clean removed a live merge's temporary"
    finally:
        rc, _, err = resume(proc)
    assert rc == 0, err
    assert_loads(out)


# =============================================================================================
# SIGKILL mid-snapshot
# =============================================================================================


def test_sigkill_mid_snapshot_into_a_store(big_store, big) -> None:
    """A killed ``ram-trl snapshot --store`` (reported working in the issue; kept as a guard):
    no partial entry is listed, the earlier entries are intact, ``store clean`` removes the
    temporary, and the same step can then be written."""
    base, agents = big
    folder = big_store / "agents" / "d"
    args = snapshot_args(base, agents["d"], big_store, "d", 1)
    store = SnapshotStore(big_store, create=False)
    entry = store.path("d", 1)
    proc, stale = stop_mid_write(args, entry, folder=folder, reset=lambda: store.remove("d", 1))
    kill(proc)
    assert stale
    assert store.steps("d") == [0] and all(i.valid for i in store.list())
    cleaned = run_cli("store", "clean", big_store)
    assert cleaned.rc == 0, cleaned
    assert leftovers(big_store) == []
    store.put(lambda d: snapshot_folders(base, agents["d"], d), "d", 1)
    assert store.steps("d") == [0, 1]


def test_sigkill_mid_snapshot_out_is_reaped_by_the_next_run(tmp_path, big) -> None:
    """Item 6 for ``ram-trl snapshot --out DIR``: the killed writer's hidden temporary stays
    forever today. Expected: no partial DIR; the next snapshot into DIR succeeds and removes the
    dead process's temporary."""
    base, agents = big
    out = tmp_path / "snapshots" / "d"
    args = ["snapshot", "--base", base, "--model", agents["d"], "--out", out]
    proc, stale = stop_mid_write(args, out)
    kill(proc)
    assert not out.exists() and stale
    again = run_cli("snapshot", "--base", base, "--model", agents["a"], "--out", out)
    assert again.rc == 0, again
    left = hidden_entries(out.parent)
    assert left == set(), f"stale temporaries left: {left}"


# =============================================================================================
# A full disk (issue item 5): a small tmpfs (ENOSPC) where one can be mounted, and a file-size
# limit (EFBIG), which needs no privileges, everywhere.
# =============================================================================================


@pytest.fixture(params=["tmpfs", "fsize"])
def full_disk(request, tmp_path):
    """``(folder, preexec_fn, errno)``: writing more than about 256 KB under ``folder`` fails."""
    if request.param == "fsize":
        folder = tmp_path / "disk"
        folder.mkdir()
        yield folder, file_size_limit(256 * 1024), errno.EFBIG
        return
    with small_tmpfs(tmp_path / "disk", "256k") as folder:
        if folder is None:
            pytest.skip("cannot mount a tmpfs here (needs root); the fsize variant still runs")
        yield folder, None, errno.ENOSPC


@pytest.fixture(scope="module")
def dense_tiny(tiny_base_factory, tiny_agents_factory) -> tuple[Path, Path]:
    """The tiny base (526 KB) and an agent that changed 90% of it (a dense snapshot)."""
    base = tiny_base_factory()
    return base, tiny_agents_factory(base, names=("d",), density=0.9)["d"]


def test_disk_full_during_merge(full_disk, dense_tiny) -> None:
    """Item 5: a full disk while the merge writes is an OSError traceback today (errno 28 on a
    tmpfs, 27 under a file-size limit). Expected: exit 2, one line naming the output path and
    the cause; nothing left on the disk."""
    disk, limit, code = full_disk
    base, agent = dense_tiny
    out = disk / "merged"
    result = run_cli(
        "merge", "--base", base, "--agent", f"d={agent}", "--out", out, "-q", preexec_fn=limit
    )
    line = assert_clean_error(result, disk)
    assert_names_any(line, *strerror_words(code))
    assert not out.exists()
    assert list(disk.iterdir()) == [], f"left on the full disk: {list(disk.iterdir())}"


def test_disk_full_during_snapshot(full_disk, dense_tiny) -> None:
    """Item 5: a full disk while ``ram-trl snapshot --store`` writes is an OSError traceback
    today. Expected: exit 2, one line naming the store path and the cause; no entry and no
    temporary left, and the new store not bound to the base (item 4)."""
    disk, limit, code = full_disk
    base, agent = dense_tiny
    root = disk / "store"
    result = run_cli(*snapshot_args(base, agent, root, "d", 0), preexec_fn=limit)
    line = assert_clean_error(result, root)
    assert_names_any(line, *strerror_words(code))
    assert leftovers(disk) == []
    assert_store_unbound(root)


# =============================================================================================
# 8 concurrent writers, 2 readers and pruning, for a bounded time (issue item 8)
# =============================================================================================

CTX = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
CHURN_SECONDS = 3.0
SOLO = [f"solo{i}" for i in range(4)]
AGENTS = [*SOLO, "dup", "race"]


def _writer(root: str, index: int, snapshots: list, stop, results) -> None:
    """Writers 0-3: own agent, new steps, prune to 2. Writers 4-5: replace steps 0-2 of 'dup'.
    Writers 6-7: race each other for new steps of 'race' (the loser of a step gets an InputError,
    by design), pruning to 3. Every published entry is tagged (model, writer, seq)."""
    try:
        store, done, k = SnapshotStore(root), [], 0
        while not stop.is_set():
            k += 1
            model = (index + k) % len(snapshots)
            tv = snapshots[model]
            tv.metrics = {"model": float(model), "writer": float(index), "seq": float(k)}
            if index < 4:
                agent, step = SOLO[index], k
                store.put(tv, agent, step)
                store.prune(agent, keep_last=2)
            elif index < 6:
                agent, step = "dup", k % 3
                store.put(tv, agent, step, replace=True)
            else:
                agent, step = "race", k
                try:
                    store.put(tv, agent, step)
                except InputError:
                    continue  # the other racer published this step first
                if k % 4 == 0:
                    store.prune(agent, keep_last=3)
            done.append((agent, step, k, model))
        results.put(("ok", f"writer {index}", done))
    except BaseException:
        results.put(("error", f"writer {index}", traceback.format_exc()))


def _reader(root: str, index: int, base: str, expected: dict, out: str, stop, results) -> None:
    """Strict: ``latest`` always returns an entry, without warning or exception; ``list`` shows
    no corrupt row (none is corrupt); every opened entry is complete (its data is the model its
    tag names); every merge of the store succeeds. Opening an entry that ``latest`` returned may
    find it pruned since, the only error tolerated (it is counted)."""
    problems: list[str] = []
    counts = {"reads": 0, "gone": 0, "merges": 0}
    try:
        store = SnapshotStore(root, create=False)
        while not stop.is_set():
            refs, found = strict_reads(store, AGENTS)
            problems += found
            for ref in refs.values():
                try:
                    with ref.open(base) as source:
                        model = int(source.manifest.metrics["model"])
                        if not torch.equal(source.read(TENSOR), expected[model]):
                            problems.append(f"{ref.path} holds other data than its tag")
                    counts["reads"] += 1
                except InputError:
                    counts["gone"] += 1
            if index == 0:
                merged = str(Path(out) / f"m{counts['merges']}")
                agents = ["solo0", "dup"]
                config = ram_trl.MergeConfig(base=None, agents=agents, store=root, out=merged)
                try:
                    config.run(progress=False)
                    shutil.rmtree(merged)
                except Exception as e:
                    problems.append(f"merge raised {e!r}")
                counts["merges"] += 1
        results.put(("problems" if problems else "ok", f"reader {index}", (problems, counts)))
    except BaseException:
        results.put(("error", f"reader {index}", traceback.format_exc()))


def test_concurrent_writers_readers_and_pruning(
    tmp_path, tiny_base_factory, tiny_agents_factory
) -> None:
    """Item 8 at scale: 8 writer processes (new steps with pruning, replacing, racing for the
    same step), 2 reader processes and a ``ram-trl merge --store`` / ``store ls`` pair, for
    three seconds. Today readers get None, FileNotFoundError, "skipping corrupt snapshot"
    warnings and failing merges. Expected: no uncaught exception anywhere; readers never see an
    error or a partial entry; no published data lost (each writer's last entries are there,
    whole); no temporary or trash left once every writer has finished."""
    base = tiny_base_factory()
    paths = tiny_agents_factory(base, names=("a", "b", "c"))
    snapshots = [TaskVector.from_folders(base, paths[n]) for n in ("a", "b", "c")]
    expected = {m: load_file(paths[n] / WEIGHTS)[TENSOR] for m, n in enumerate(("a", "b", "c"))}
    store = SnapshotStore(tmp_path / "store")
    for agent in AGENTS:
        for step in (0, 1, 2) if agent == "dup" else (0,):
            snapshots[0].metrics = {"model": 0.0, "writer": -1.0, "seq": 0.0}
            store.put(snapshots[0], agent, step)
    root, outs = str(store.root), tmp_path / "reader-merges"
    outs.mkdir()

    stop, results = CTX.Event(), CTX.Queue()
    procs = [
        CTX.Process(target=_writer, args=(root, i, snapshots, stop, results)) for i in range(8)
    ]
    procs += [
        CTX.Process(target=_reader, args=(root, i, str(base), expected, str(outs), stop, results))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    cli = [
        start_ram_trl("merge", "--store", root, "--out", tmp_path / "cli-merged", "-q"),
        start_ram_trl("store", "ls", root),
    ]
    time.sleep(CHURN_SECONDS)
    stop.set()
    reports = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    cli_runs = [(c.args[3:5], *c.communicate(timeout=120)) for c in cli]

    errors = [f"{who}: {what}" for kind, who, what in reports if kind == "error"]
    assert not errors, "\n".join(errors)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    read_problems = [
        (who, what[0][:5], len(what[0])) for kind, who, what in reports if kind == "problems"
    ]
    assert not read_problems, read_problems
    for args, out, err in cli_runs:
        assert "Traceback" not in err and "CORRUPT" not in out, (args, out, err)
    assert [c.returncode for c in cli] == [0, 0], cli_runs

    # nothing published was lost, and every entry is whole
    store = SnapshotStore(root, create=False)
    assert all(i.valid for i in store.list()), [i.error for i in store.list() if not i.valid]
    done = {who: what for kind, who, what in reports if who.startswith("writer")}
    for index, agent in enumerate(SOLO):
        mine = [(step, seq) for _, step, seq, _ in done[f"writer {index}"]]
        assert mine, f"writer {index} published nothing in {CHURN_SECONDS} s"
        steps = store.steps(agent)
        assert steps[-2:] == [s for s, _ in ([(0, 0), *mine])[-2:]], (agent, steps, mine[-3:])
        last = store.get(agent, mine[-1][0]).manifest()
        assert last.metrics["seq"] == mine[-1][1] and last.metrics["writer"] == index
    assert {0, 1, 2} <= set(store.steps("dup"))
    raced = [step for i in (6, 7) for _, step, _, _ in done[f"writer {i}"]]
    assert store.steps("race")[-1] == max([0, *raced])
    for agent in AGENTS:
        ref = store.latest(agent)
        with ref.open(str(base)) as source:
            model = int(source.manifest.metrics["model"])
            assert torch.equal(source.read(TENSOR), expected[model]), ref.path
    assert leftovers(store.root) == [], leftovers(store.root)
    assert leftovers(outs) == [] and leftovers(tmp_path / "cli-merged") == []
