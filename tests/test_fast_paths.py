"""The merge engine's fast paths give the same files as its reference paths, byte for byte.

* threads: the read-ahead thread, the writer thread and the threaded counting pass
  (``threads=2``) against everything on one thread (``threads=1``);
* sparse snapshots: a store merge that reads only the snapshots' stored positions
  (``TaskVectorSource.changed_rows``) against one that rebuilds every agent row (the source's
  ``read``, what any checkpoint goes through);

for RAM, RAM+ (global and per-tensor rho), TIES, DARE (seeded), task arithmetic; on one file
and on many shards, on chunked tensors, and with an agent stored in another dtype.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ram_trl
from ram_trl.merging import chunks
from ram_trl.merging import spill as spill_module
from ram_trl.snapshot.source import TaskVectorSource
from ram_trl.snapshot.task_vector import snapshot_folders

pytestmark = pytest.mark.filterwarnings("ignore:agent .b. .*is stored in bfloat16")

METHODS = [
    ("ram", {}),
    ("ram_plus", {}),
    ("ram_plus", {"rho_scope": "tensor"}),
    ("ties", {"keep": 0.3}),
    ("dare_ties", {"drop": 0.5, "seed": 3}),
    ("task_arithmetic", {"scale": 0.7}),
]


def files(folder: Path) -> dict[str, bytes]:
    """Every weight file and the index, by name: what must be identical."""
    names = [*folder.glob("*.safetensors"), *folder.glob("*.index.json")]
    return {p.name: p.read_bytes() for p in sorted(names)}


def merge_all(base, agents, out: Path, **kwargs) -> dict[str, dict[str, bytes]]:
    got = {}
    for method, params in METHODS:
        folder = out / f"{method}-{len(params)}"
        ram_trl.merge(base, agents, method, folder, params=params, progress=False, **kwargs)
        got[f"{method} {params}"] = files(folder)
    return got


@pytest.fixture(params=["one-file", "sharded-chunked"])
def layout(request, monkeypatch):
    if request.param == "sharded-chunked":
        monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 1000)
    return request.param == "sharded-chunked"


def test_threads_give_the_same_bytes(layout, tiny_base_factory, tiny_agents_factory, tmp_path):
    base = tiny_base_factory("qwen2", False, torch.bfloat16, layout)
    agents = tiny_agents_factory(base, ("a", "b", "c"), density=[0.05, 0.2, 0.3])
    one = merge_all(base, agents, tmp_path / "one", threads=1, shard_size="40KB")
    two = merge_all(base, agents, tmp_path / "two", threads=2, shard_size="40KB")
    assert any(len(f) > 1 for f in one.values())  # several shards and an index
    for key in one:
        assert one[key] == two[key], key


def test_threads_give_the_same_bytes_with_mixed_dtypes(
    tiny_base_factory, tiny_agents_factory, tmp_path, monkeypatch
):
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 1000)
    base = tiny_base_factory("qwen2", False, torch.float32, False)
    agents = tiny_agents_factory(base, ("a", "b"), density=[0.05, 0.1])
    narrow = tmp_path / "b16"
    shutil.copytree(agents["b"], narrow)
    weights = narrow / "model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(weights).items()}, weights)
    mixed = {"a": agents["a"], "b": narrow}
    one = merge_all(base, mixed, tmp_path / "one", threads=1)
    two = merge_all(base, mixed, tmp_path / "two", threads=2)
    for key in one:
        assert one[key] == two[key], key


def snapshots(base: Path, agents: dict[str, Path], root: Path) -> dict[str, Path]:
    out = {}
    for name, path in agents.items():
        out[name] = root / name
        snapshot_folders(base, path, out[name], agent=name)
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_store_reads_give_the_same_bytes(
    threads, layout, tiny_base_factory, tiny_agents_factory, tmp_path, monkeypatch
):
    base = tiny_base_factory("qwen2", True, torch.bfloat16, layout)
    agents = tiny_agents_factory(base, ("a", "b", "c"), density=[0.05, 0.2, 0.3])
    snaps = snapshots(base, agents, tmp_path / "snaps")

    def merged(out: Path) -> dict[str, dict[str, bytes]]:
        sources = {name: TaskVectorSource(path, base) for name, path in snaps.items()}
        try:
            return merge_all(base, sources, out, threads=threads, shard_size="40KB")
        finally:
            for source in sources.values():
                source.close()

    fast = merged(tmp_path / "fast")
    checkpoints = merge_all(base, agents, tmp_path / "folders", threads=1, shard_size="40KB")
    calls = []
    monkeypatch.setattr(
        TaskVectorSource, "changed_rows", lambda self, *a, **k: calls.append(a) or None
    )
    rebuilt = merged(tmp_path / "rebuilt")
    assert calls  # the reference run really rebuilt the rows
    for key in fast:
        assert fast[key] == rebuilt[key], key
        if not key.startswith("dare"):  # DARE reads every element: a checkpoint's own path
            assert fast[key] == checkpoints[key], key


def test_sparse_store_reads_skip_a_snapshot_of_another_dtype(
    tiny_base_factory, tiny_agents_factory, tmp_path
):
    """An agent stored in bf16 over a float32 base: its snapshot holds bf16 values, the rows are
    rounded copies of the base, so the fast path declines and the rows are rebuilt."""
    base = tiny_base_factory("qwen2", False, torch.float32, False)
    agents = tiny_agents_factory(base, ("a", "b"), density=[0.05, 0.1])
    narrow = tmp_path / "b16"
    shutil.copytree(agents["b"], narrow)
    weights = narrow / "model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(weights).items()}, weights)
    snaps = snapshots(base, {"a": agents["a"], "b": narrow}, tmp_path / "snaps")
    with TaskVectorSource(snaps["b"], base) as source:
        name = next(iter(source.tensors))
        assert source.changed_rows(name, 0, 1, source.base) is None
    sources = {name: TaskVectorSource(path, base) for name, path in snaps.items()}
    try:
        ram_trl.merge(base, sources, "ram_plus", tmp_path / "store", progress=False)
    finally:
        for source in sources.values():
            source.close()
    ram_trl.merge(
        base, {"a": agents["a"], "b": narrow}, "ram_plus", tmp_path / "ck", progress=False
    )
    assert files(tmp_path / "store") == files(tmp_path / "ck")


COUNTED = [
    ("ram_plus", {}, False),
    ("ram_plus", {"rho_scope": "tensor"}, False),
    ("ram_plus_s", {"epsilon": 3e-4}, False),  # an epsilon that leaves some stored changes out
    ("ram_plus", {}, True),  # dry run: counts only
]


def counted_runs(base, sources, out: Path) -> dict[str, tuple[list, dict[str, bytes]]]:
    """Report statistics and files of every counted method, for the store given."""
    got = {}
    for method, params, dry_run in COUNTED:
        folder = out / f"{method}-{len(params)}-{dry_run}"
        report = ram_trl.merge(
            base, sources, method, folder, params=params, progress=False, dry_run=dry_run,
            shard_size="40KB", threads=2,
        )  # fmt: skip
        stats = [
            (a.changed, a.unique, a.shared, a.overlap, a.rho, a.lambda_) for a in report.agents
        ]
        got[f"{method} {params} {dry_run}"] = (stats, {} if dry_run else files(folder))
    return got


def spy_stored_deltas(monkeypatch) -> list:
    """What every call of the counting pass's ``stored_deltas`` returned (None: declined)."""
    from ram_trl.merging import counting

    used, real = [], counting.stored_deltas

    def spy(*args):
        used.append(real(*args))
        return used[-1]

    monkeypatch.setattr(counting, "stored_deltas", spy)
    return used


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_counting_from_stored_positions(
    dtype, layout, tiny_base_factory, tiny_agents_factory, tmp_path, monkeypatch
):
    """The counting pass of a store merge looks only at the snapshots' stored positions
    (``chunks.stored_deltas``); its histograms, the report and the files are those of the
    counting pass that reads whole chunks, and of the agents' checkpoints."""
    from ram_trl.merging import counting

    base = tiny_base_factory("qwen2", True, dtype, layout)
    agents = tiny_agents_factory(base, ("a", "b", "c"), density=[0.05, 0.2, 0.3])
    snaps = snapshots(base, agents, tmp_path / "snaps")

    def runs(out: Path) -> dict[str, tuple[list, dict[str, bytes]]]:
        sources = {name: TaskVectorSource(path, base) for name, path in snaps.items()}
        try:
            return counted_runs(base, sources, out)
        finally:
            for source in sources.values():
                source.close()

    used = spy_stored_deltas(monkeypatch)
    fast = runs(tmp_path / "fast")
    assert used and all(u is not None for u in used)  # every chunk counted from stored positions
    monkeypatch.setattr(counting, "stored_deltas", lambda *a: None)
    whole = runs(tmp_path / "whole")
    checkpoints = counted_runs(base, agents, tmp_path / "folders")
    for key in fast:
        assert fast[key][0] == whole[key][0] == checkpoints[key][0], key
        assert fast[key][1] == whole[key][1], key
        assert fast[key][1] == checkpoints[key][1], key
    narrow = fast["ram_plus_s {'epsilon': 0.0003} False"][0]  # fewer changes counted
    assert any(a[0] < b[0] for a, b in zip(narrow, fast["ram_plus {} False"][0], strict=True))


def test_store_counting_declines_a_snapshot_of_another_dtype(
    tiny_base_factory, tiny_agents_factory, tmp_path, monkeypatch
):
    """A bf16 agent over a float32 base: its stored values are not the rows the merge compares,
    so the counting pass reads those chunks whole; counts and files match the checkpoints'."""

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 1000)
    base = tiny_base_factory("qwen2", False, torch.float32, False)
    agents = tiny_agents_factory(base, ("a", "b"), density=[0.05, 0.1])
    narrow = tmp_path / "b16"
    shutil.copytree(agents["b"], narrow)
    weights = narrow / "model.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(weights).items()}, weights)
    mixed = {"a": agents["a"], "b": narrow}
    snaps = snapshots(base, mixed, tmp_path / "snaps")
    used = spy_stored_deltas(monkeypatch)
    sources = {name: TaskVectorSource(path, base) for name, path in snaps.items()}
    try:
        store = counted_runs(base, sources, tmp_path / "store")
    finally:
        for source in sources.values():
            source.close()
    assert used and all(u is None for u in used)
    assert store == counted_runs(base, mixed, tmp_path / "folders")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_finite_bits_first_sum_then_bits(dtype):
    """The float32 sum only decides 'all finite'; a non-finite sum goes to the bit test, so
    large finite values whose sum overflows are still finite, and any NaN/Inf is found."""
    big = torch.finfo(dtype).max
    assert chunks.finite_bits(torch.full((1000,), big, dtype=dtype))  # the sum overflows
    assert chunks.finite_bits(torch.zeros(0, dtype=dtype))
    for bad in (math.nan, math.inf, -math.inf):
        values = torch.randn(5000).to(dtype)
        values[1234] = bad
        assert not chunks.finite_bits(values)


def spy(monkeypatch, owner, name: str) -> list:
    """What every call of ``owner.name`` returned."""
    used, real = [], getattr(owner, name)

    def call(*args, **kwargs):
        used.append(real(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(owner, name, call)
    return used


def open_snapshots(snaps: dict[str, Path], base: Path) -> dict[str, TaskVectorSource]:
    return {name: TaskVectorSource(path, base) for name, path in snaps.items()}


@pytest.mark.parametrize("agents", [3, 6])
def test_store_merges_count_from_indices_and_merge_from_positions(
    agents, layout, kernels, tiny_base_factory, tiny_agents_factory, tmp_path, monkeypatch
):
    """A RAM-family store merge counts from the snapshots' indices alone
    (``chunks.stored_changes``) and merges from each agent's stored positions (``rule_at``, no
    union of the agents' rows; or the compiled ``merge_stored``): the same report and files as
    the agents' checkpoints, with 3 agents and with 6 (where a float32 sum over agents is no
    longer torch's own order)."""
    from ram_trl.merging import counting
    from ram_trl.methods import get_method

    base = tiny_base_factory("qwen2", False, torch.bfloat16, layout)
    names = tuple("abcdef"[:agents])
    folders = tiny_agents_factory(base, names, density=[0.05, 0.2, 0.3, 0.1, 0.05, 0.15][:agents])
    snaps = snapshots(base, folders, tmp_path / "snaps")
    runs = [("ram_plus", {}), ("ram_plus", {"rho_scope": "tensor"})]
    want = [
        ram_trl.merge(base, folders, m, tmp_path / f"ck-{len(p)}", params=p, progress=False)
        for m, p in runs
    ]
    counted = spy(monkeypatch, counting, "stored_changes")
    merged = spy(monkeypatch, get_method("ram_plus"), "rule_at")
    compiled = spy(monkeypatch, get_method("ram_plus"), "merge_stored")
    sources = open_snapshots(snaps, base)
    try:
        for (method, params), expected in zip(runs, want, strict=True):
            out = tmp_path / f"store-{len(params)}"
            report = ram_trl.merge(base, sources, method, out, params=params, progress=False)
            assert files(out) == files(tmp_path / f"ck-{len(params)}")
            assert [a.overlap for a in report.agents] == [a.overlap for a in expected.agents]
    finally:
        for source in sources.values():
            source.close()
    assert counted and all(c is not None for c in counted)
    if kernels == "torch":
        assert merged
        assert all(rows is None for rows in compiled)
    else:  # every chunk merged by the kernel, none left to rule_at
        assert compiled and all(rows is not None for rows in compiled)
        assert not merged


def test_store_counting_from_indices_takes_a_coarser_snapshot(
    tiny_base_factory, tiny_agents_factory, tmp_path, monkeypatch
):
    """A snapshot taken at a larger epsilon than the merge's stores exactly its changes beyond
    the merge's epsilon too: its indices are counted alone, with the numbers the values give;
    one taken at a smaller epsilon than the merge's is counted from its values."""
    from ram_trl.merging import counting

    base = tiny_base_factory("qwen2", False, torch.bfloat16, False)
    folders = tiny_agents_factory(base, ("a", "b"), density=[0.1, 0.2])
    snaps = {}
    for name, path in folders.items():
        snaps[name] = tmp_path / name
        snapshot_folders(base, path, snaps[name], agent=name, epsilon=1e-3)

    def run(method: str, params: dict, out: str) -> tuple[list, dict[str, bytes]]:
        sources = open_snapshots(snaps, base)
        try:
            report = ram_trl.merge(
                base, sources, method, tmp_path / out, params=params, progress=False
            )
        finally:
            for source in sources.values():
                source.close()
        return [a.overlap for a in report.agents], files(tmp_path / out)

    counted = spy(monkeypatch, counting, "stored_changes")
    fast = run("ram_plus", {}, "fast")
    assert counted and all(c is not None for c in counted)
    finer = run("ram_plus", {"epsilon": 2e-3}, "finer")  # more than the snapshots' epsilon
    assert counted[-1] is None
    monkeypatch.setattr(counting, "stored_changes", lambda *a: None)
    assert run("ram_plus", {}, "values") == fast
    assert finer[0] != [[0, 0], [0, 0]]


def test_a_snapshot_storing_an_unchanged_element_is_refused(
    tiny_base_factory, tiny_agents_factory, tmp_path
):
    """A snapshot's indices are counted as changes; one whose stored element did not change
    (hand-made, or damaged behind valid checksums) would skew rho, so the merge stops with one
    line naming the snapshot and the tensor, and publishes nothing."""
    from ram_trl.errors import InputError
    from ram_trl.io import ModelFolder
    from ram_trl.snapshot import TaskVector

    base = tiny_base_factory("qwen2", False, torch.bfloat16, False)
    folders = tiny_agents_factory(base, ("a", "b"), density=[0.1, 0.2])
    snaps = snapshots(base, folders, tmp_path / "snaps")
    vector = TaskVector.load(snaps["b"])
    name, delta = next((n, d) for n, d in vector.deltas.items() if d.layout == "sparse")
    with ModelFolder(base) as folder:
        rows = folder.read(name).reshape(-1)
    free = next(i for i in range(delta.numel) if i not in set(delta.indices.tolist()))
    indices = torch.cat([delta.indices, torch.tensor([free], dtype=delta.indices.dtype)])
    order = indices.argsort()
    delta.indices = indices[order]
    delta.values = torch.cat([delta.values, rows[free : free + 1]])[order]
    delta.nnz += 1
    damaged = tmp_path / "damaged"
    vector.save(damaged)
    sources = open_snapshots({"a": snaps["a"], "b": damaged}, base)
    try:
        with pytest.raises(InputError, match=rf"snapshot {damaged}: tensor '{name}'.*epsilon"):
            ram_trl.merge(base, sources, "ram_plus", tmp_path / "out", progress=False)
    finally:
        for source in sources.values():
            source.close()
    assert not (tmp_path / "out").exists()


ONE_PASS = [
    ("ram_plus", {}),
    ("ram_plus", {"rho_scope": "tensor"}),
    ("ram_plus_s", {}),
    ("arm_r_v2", {}),
]


def merge_one_pass(base, agents, out: Path, threads: int) -> dict[str, dict[str, bytes]]:
    got = {}
    for method, params in ONE_PASS:
        folder = out / f"{method}-{len(params)}"
        ram_trl.merge(
            base, agents, method, folder, params=params, progress=False, threads=threads,
            shard_size="40KB",
        )  # fmt: skip
        got[f"{method} {params}"] = files(folder)
    return got


@pytest.mark.parametrize("threads", [1, 2])
def test_one_pass_merges_give_the_two_pass_bytes(
    layout, threads, tiny_base_factory, tiny_agents_factory, tmp_path, monkeypatch
):
    """The RAM family merges checkpoints while it counts (``merging.spill``): the files equal a
    two-pass merge's (no spill allowed), also when only some tensors fit the spill's budget and
    when the disk fills up while spilling. Nothing is left beside the outputs."""
    base = tiny_base_factory("qwen2", False, torch.bfloat16, layout)
    agents = tiny_agents_factory(base, ("a", "b", "c"), density=[0.05, 0.2, 0.6])
    replayed: list[str] = []
    take = spill_module.Spill.take
    monkeypatch.setattr(
        spill_module.Spill,
        "take",
        lambda self, name, start: replayed.append(name) or take(self, name, start),
    )
    one = merge_one_pass(base, agents, tmp_path / "one", threads)
    every = set(replayed)
    assert every and sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(
        f"{m}-{len(p)}" for m, p in ONE_PASS
    )

    monkeypatch.setattr(spill_module, "DISK_SHARE", 0.0)  # nothing with a change fits
    replayed.clear()
    two = merge_one_pass(base, agents, tmp_path / "two", threads)
    assert one == two and len(set(replayed)) < len(every)

    beside = spill_module.Spill.beside.__func__
    monkeypatch.setattr(spill_module, "DISK_SHARE", 0.5)
    monkeypatch.setattr(
        spill_module.Spill, "beside", classmethod(lambda cls, out, n: cls(tmp_path, 60_000))
    )
    replayed.clear()
    assert merge_one_pass(base, agents, tmp_path / "part", threads) == one
    assert 0 < len(set(replayed)) < len(every)

    writes = iter(range(10))
    pwritev = spill_module.os.pwritev

    def fills_up(fd, views, offset):
        if next(writes, None) is None:
            raise OSError(28, "No space left on device")
        return pwritev(fd, views, offset)

    monkeypatch.setattr(spill_module.Spill, "beside", classmethod(beside))
    monkeypatch.setattr(spill_module.os, "pwritev", fills_up)
    replayed.clear()
    assert merge_one_pass(base, agents, tmp_path / "full", threads) == one
    assert 0 < len(set(replayed)) < len(every)


def test_no_room_for_a_spill_merges_in_two_passes(
    tiny_base_factory, tiny_agents_factory, tmp_path, monkeypatch
):
    """A spill that cannot be created (no right to write there, say) is no error: the merge
    reads the agents twice, with the same bytes."""
    base = tiny_base_factory("qwen2", False, torch.bfloat16, False)
    agents = tiny_agents_factory(base, ("a", "b"), density=0.1)
    ram_trl.merge(base, agents, "ram_plus", tmp_path / "one", progress=False)

    def refuse(cls, out, output_bytes):
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(spill_module.Spill, "beside", classmethod(refuse))
    ram_trl.merge(base, agents, "ram_plus", tmp_path / "two", progress=False)
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_store_merge_on_several_threads_is_the_same_bits(
    tiny_base_factory, tiny_agents_factory, tmp_path, monkeypatch
):
    """A chunk of snapshots merged by the compiled kernel on several threads at once (cut into
    consecutive rows, ``engine._merged_stored``) gives the files one thread gives, and those of
    the checkpoints; so does a chunk cut into more parts than it has rows."""
    from conftest import require_native

    from ram_trl.merging import engine

    require_native()
    monkeypatch.setattr(engine, "SPLIT_ELEMENTS", 1)
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 3000)
    base = tiny_base_factory("qwen2", False, torch.bfloat16, False)
    folders = tiny_agents_factory(base, ("a", "b", "c"), density=[0.05, 0.2, 0.3])
    snaps = snapshots(base, folders, tmp_path / "snaps")
    ram_trl.merge(base, folders, "ram_plus", tmp_path / "ck", progress=False, threads=1)
    split = spy(monkeypatch, chunks.StoredChunk, "split")
    for threads in (1, 2, 5):
        sources = open_snapshots(snaps, base)
        try:
            out = tmp_path / f"t{threads}"
            ram_trl.merge(base, sources, "ram_plus", out, progress=False, threads=threads)
        finally:
            for source in sources.values():
                source.close()
        assert files(out) == files(tmp_path / "ck"), threads
    assert split and any(len(parts) == 5 for parts in split)
    assert any(len(parts) < 5 for parts in split)  # a chunk of fewer rows than threads


def test_stored_chunk_split_keeps_every_change_once():
    """``StoredChunk.split``: consecutive row ranges covering the chunk, each agent's indices
    cut at the row boundaries and shifted to each part, the base's rows sliced alike."""
    base = torch.arange(60, dtype=torch.float32)  # rows 2-8 of a tensor of rows of 10
    indices = [torch.tensor([20, 21, 38, 55, 79], dtype=torch.int32), torch.zeros(0).long()]
    values = [torch.arange(5.0), torch.ones(0)]
    chunk = chunks.StoredChunk(2, 8, base, indices, 20, values, [0.0, -1.0])
    parts = chunk.split(4)
    assert [(p.start, p.stop) for p in parts] == [(2, 3), (3, 5), (5, 6), (6, 8)]
    assert [(p.indices[0] - p.shift).tolist() for p in parts] == [[0, 1], [8], [5], [19]]
    assert [p.values[0].tolist() for p in parts] == [[0, 1], [2], [3], [4]]
    assert all(p.indices[1].numel() == 0 and p.epsilons == [0.0, -1.0] for p in parts)
    assert [p.base[0].item() for p in parts] == [0, 10, 30, 40]
    assert sum(p.numel for p in parts) == chunk.numel
    assert [(p.start, p.stop) for p in chunk.split(10)] == [(r, r + 1) for r in range(2, 8)]
