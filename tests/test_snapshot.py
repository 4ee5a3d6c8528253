"""Task vectors: exact roundtrips, layout choice, size on disk, fingerprints, lazy reading, and the
errors a truncated or corrupted snapshot gives."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ram_trl.errors import InputError
from ram_trl.methods import change_mask
from ram_trl.snapshot import (
    TaskVector,
    TaskVectorSource,
    fingerprint_folder,
    fingerprint_state_dict,
    snapshot_folders,
    validate,
)
from ram_trl.snapshot.fingerprint import CACHE_FILE
from ram_trl.snapshot.task_vector import _DictReader, changed_positions, extract_tensor

EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare tensors bit for bit (NaN-safe, -0.0 != 0.0)."""
    return t.reshape(-1).view(torch.uint8)


def expected(base: dict, tuned: dict) -> dict:
    """The fine-tuned model with every sub-epsilon change reset to the base value."""
    out = {}
    for name, b in base.items():
        t = tuned[name]
        out[name] = torch.where((t.float() - b.float()).abs() > EPS, t, b)
    return out


def make_pair(dtype: torch.dtype, seed: int = 0) -> tuple[dict, dict]:
    """A small "model" and a fine-tune that exercises every layout: a sparse 2-D change, a dense
    1-D change, a changed 0-d scalar, an empty tensor, an unchanged tensor, sub-epsilon moves."""
    gen = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(64, 24, generator=gen),
        "layer.norm": torch.randn(24, generator=gen),
        "layer.scale": torch.randn((), generator=gen),
        "empty": torch.zeros(0, 8),
        "frozen.weight": torch.randn(16, 8, generator=gen),
        "big.weight": torch.randn(96, 40, generator=gen),
    }
    base = {k: v.to(dtype) for k, v in base.items()}
    tuned = {k: v.clone() for k, v in base.items()}
    flat = tuned["embed.weight"].view(-1)
    pos = torch.randperm(flat.numel(), generator=gen)[:60]
    flat[pos] = (flat[pos].float() * 1.5 + 0.25).to(dtype)
    tuned["layer.norm"] = (tuned["layer.norm"].float() + 0.5).to(dtype)
    tuned["layer.scale"] = (tuned["layer.scale"].float() + 1).to(dtype)
    big = tuned["big.weight"].view(-1)
    pos = torch.randperm(big.numel(), generator=gen)[:2000]
    big[pos] = (big[pos].float() - 0.75).to(dtype)
    if dtype == torch.float32:  # sub-epsilon moves only survive in float32
        flat[:5] += 3e-6
        big[-5:] -= 9e-6
    return base, tuned


def save_folder(path: Path, state_dict: dict, shards: int = 1) -> Path:
    """Write a state dict as a checkpoint folder, optionally over several files with an index."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(state_dict)
    if shards == 1:
        save_file(state_dict, path / "model.safetensors")
        return path
    weight_map = {}
    for i in range(shards):
        part = {n: state_dict[n] for n in names[i::shards]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, path / file)
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.fixture
def pair(tmp_path: Path, request: pytest.FixtureRequest):
    dtype = getattr(request, "param", torch.bfloat16)
    base, tuned = make_pair(dtype)
    return base, tuned, save_folder(tmp_path / "base", base), save_folder(tmp_path / "ft", tuned)


# --- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", DTYPES, indirect=True, ids=str)
def test_roundtrip_is_bit_exact(pair, tmp_path: Path) -> None:
    base, tuned, base_dir, ft_dir = pair
    want = expected(base, tuned)
    in_memory = TaskVector.from_state_dicts(base, tuned, agent="coder", step=3)
    snapshot_folders(base_dir, ft_dir, tmp_path / "snap", agent="coder", step=3)
    from_disk = TaskVector.load(tmp_path / "snap")
    for tv in (in_memory, from_disk):
        for source in (base, base_dir):
            got = tv.apply(source)
            assert set(got) == set(base)
            for name in base:
                assert got[name].dtype == base[name].dtype
                assert got[name].shape == base[name].shape
                assert torch.equal(bits(got[name]), bits(want[name])), name
    assert from_disk.changed_counts() == in_memory.changed_counts()
    assert from_disk.agent == "coder" and from_disk.step == 3


def test_layouts_follow_cost(pair) -> None:
    base, tuned, *_ = pair
    tv = TaskVector.from_state_dicts(base, tuned)
    layouts = {n: d.layout for n, d in tv.deltas.items()}
    # bf16 values with int32 indices: sparse costs 6 bytes per changed element and dense 2 per
    # element, so sparse wins strictly below a density of 1/3
    assert layouts == {
        "embed.weight": "sparse",  # 60 of 1536 changed
        "layer.norm": "dense",  # all changed
        "layer.scale": "dense",  # a changed scalar: 2 bytes dense beat 6 sparse
        "empty": "unchanged",
        "frozen.weight": "unchanged",
        "big.weight": "dense",  # about 2000 of 3840 changed
    }
    assert tv.deltas["embed.weight"].indices.dtype == torch.int32


@pytest.mark.parametrize("nnz,layout", [(0, "unchanged"), (1, "sparse"), (332, "sparse"),
                                        (333, "dense"), (999, "dense")])  # fmt: skip
def test_sparse_dense_threshold(nnz: int, layout: str) -> None:
    base = torch.zeros(999, dtype=torch.bfloat16)
    tuned = base.clone()
    tuned[torch.arange(nnz) * (999 // max(nnz, 1)) % 999] = 1.0
    delta = TaskVector.from_state_dicts({"w": base}, {"w": tuned}).deltas["w"]
    assert (delta.layout, delta.nnz) == (layout, nnz)


@pytest.mark.parametrize("density", [0.02, 0.2, 0.6])
def test_chunked_extraction_matches_one_chunk(density: float) -> None:
    """Tensors larger than a chunk are read in row chunks; switching to dense mid-tensor re-reads
    the earlier rows from the base. The result must not depend on the chunking."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(50, 7, generator=gen).to(torch.bfloat16)
    tuned = base.clone()
    changed = torch.rand(base.shape, generator=gen) < density
    tuned[changed] = (base[changed].float() + 1).to(torch.bfloat16)
    b, t = _DictReader({"w": base}, "b"), _DictReader({"w": tuned}, "t")
    whole = extract_tensor(b, t, "w", EPS)
    for chunk in (7, 21, 70, 1):
        part = extract_tensor(b, t, "w", EPS, chunk_elements=chunk)
        assert (part.layout, part.nnz) == (whole.layout, whole.nnz)
        assert torch.equal(bits(part.apply_to(base)), bits(tuned))


@pytest.mark.parametrize("rows,layout", [((0, 10), "sparse"), ((25, 50), "dense")])
def test_layout_is_optimal_when_density_varies_by_row(rows: tuple[int, int], layout: str) -> None:
    """Dense-looking first chunks switch extraction to dense early; if the tensor ends up sparse
    enough it is extracted again sparsely. Either way the smaller layout wins."""
    base = torch.randn(50, 7, generator=torch.Generator().manual_seed(4)).bfloat16()
    tuned = base.clone()
    tuned[rows[0] : rows[1]] += 1
    b, t = _DictReader({"w": base}, "b"), _DictReader({"w": tuned}, "t")
    for chunk in (7, 70, 350):
        delta = extract_tensor(b, t, "w", EPS, chunk_elements=chunk)
        assert (delta.layout, delta.nnz) == (layout, 7 * (rows[1] - rows[0]))
        assert torch.equal(bits(delta.apply_to(base)), bits(tuned))


def test_unchanged_model_has_no_files(pair, tmp_path: Path) -> None:
    base, _, base_dir, _ = pair
    m = snapshot_folders(base_dir, base_dir, tmp_path / "snap")
    assert (m.files, m.nnz) == ([], 0)
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["manifest.json"]
    got = TaskVector.load(tmp_path / "snap").apply(base_dir)
    assert all(torch.equal(bits(got[n]), bits(base[n])) for n in base)
    with TaskVectorSource(tmp_path / "snap", base_dir) as source:
        assert torch.equal(bits(source.read("big.weight", 2, 5)), bits(base["big.weight"][2:5]))


def test_non_finite_values_are_refused(pair) -> None:
    base, tuned, *_ = pair
    broken = dict(tuned, **{"big.weight": tuned["big.weight"].clone()})
    broken["big.weight"][7, 3] = float("nan")
    with pytest.raises(InputError, match="'big.weight' holds NaN/Inf"):
        TaskVector.from_state_dicts(base, broken)


@given(st.data())
def test_change_mask_is_the_engines(data: st.DataObject) -> None:
    """Same dtypes take a bitwise shortcut; both paths must give exactly the engine's mask, and
    the task vector must rebuild the expected tensor bit for bit."""
    dtype = data.draw(st.sampled_from(DTYPES))
    tuned_dtype = data.draw(st.sampled_from([dtype, torch.float32]))
    n = data.draw(st.integers(1, 40))
    values = data.draw(st.lists(st.floats(-4, 4, width=16), min_size=n, max_size=n))
    moves = [0.0, 1e-6, -1e-6, 1e-5, -1e-5, 1.1e-5, 1e-3, -0.5]
    deltas = data.draw(st.lists(st.sampled_from(moves), min_size=n, max_size=n))
    base = torch.tensor(values).to(dtype)
    tuned = (base.double() + torch.tensor(deltas, dtype=torch.float64)).to(tuned_dtype)
    if data.draw(st.booleans()):  # signed zeros differ in bits but not in value
        base[0], tuned[0] = 0.0, -0.0
    want = change_mask(tuned.float() - base.float(), EPS).nonzero().squeeze(1)
    assert torch.equal(changed_positions(base, tuned, EPS), want)
    delta = TaskVector.from_state_dicts({"w": base}, {"w": tuned}).deltas["w"]
    assert torch.equal(bits(delta.apply_to(base)), bits(torch.where(
        change_mask(tuned.float() - base.float(), EPS), tuned, base.to(tuned_dtype)
    )))  # fmt: skip


def test_does_not_modify_inputs() -> None:
    base, tuned = make_pair(torch.float32)
    copies = {k: v.clone() for k, v in tuned.items()}
    TaskVector.from_state_dicts(base, tuned)
    assert all(torch.equal(bits(tuned[k]), bits(copies[k])) for k in tuned)


# --- size on disk ---------------------------------------------------------------------------


def test_size_on_disk_is_density_times_entry_bytes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    base = {f"layer{i}.weight": torch.randn(256, 256, generator=gen).bfloat16() for i in range(8)}
    tuned = {}
    for name, b in base.items():
        t = b.clone().view(-1)
        pos = torch.randperm(t.numel(), generator=gen)[: t.numel() // 20]  # 5%
        t[pos] = (t[pos].float() + 0.5).bfloat16()
        tuned[name] = t.view(b.shape)
    tv = TaskVector.from_state_dicts(base, tuned)
    tv.save(tmp_path / "snap")
    size = sum(p.stat().st_size for p in (tmp_path / "snap").iterdir())
    payload = tv.nnz * (4 + 2)  # int32 index + bf16 value
    assert tv.density == pytest.approx(0.05, abs=1e-3)
    assert payload <= size <= 1.2 * payload + 4096 + 512 * len(base)
    checkpoint = sum(b.numel() * 2 for b in base.values())
    assert size < 0.2 * checkpoint


def test_sharded_snapshot(pair, tmp_path: Path) -> None:
    base, tuned, base_dir, ft_dir = pair
    m = snapshot_folders(base_dir, ft_dir, tmp_path / "snap", max_shard_size=100)
    assert len(m.files) == 3 and m.files[0].endswith(f"-of-{len(m.files):05d}.safetensors")
    got = TaskVector.load(tmp_path / "snap").apply(base)
    want = expected(base, tuned)
    assert all(torch.equal(bits(got[n]), bits(want[n])) for n in base)


# --- live modules and fingerprints -----------------------------------------------------------


def tiny_qwen2(tie: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_from_module_equals_from_folders(tmp_path: Path, tie: bool) -> None:
    model = tiny_qwen2(tie)
    model.save_pretrained(tmp_path / "base")
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            mask = torch.rand(p.shape, generator=gen) < 0.1
            p.add_(mask * torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(tmp_path / "ft")
    live = TaskVector.from_module(model, theta0, agent="a")
    offline = TaskVector.from_folders(tmp_path / "base", tmp_path / "ft")
    assert (
        live.base_fingerprint == offline.base_fingerprint == fingerprint_folder(tmp_path / "base")
    )
    assert set(live.deltas) == set(offline.deltas)
    for name, d in offline.deltas.items():
        mine = live.deltas[name]
        assert (mine.layout, mine.nnz) == (d.layout, d.nnz), name
        if d.layout == "sparse":
            assert torch.equal(mine.indices, d.indices) and torch.equal(mine.values, d.values)
        if d.layout == "dense":
            assert torch.equal(mine.values, d.values)
    if tie:
        assert "lm_head.weight" not in live.deltas


def test_fingerprint_folder_equals_state_dict(tmp_path: Path) -> None:
    base, _ = make_pair(torch.bfloat16)
    single = save_folder(tmp_path / "one", base)
    sharded = save_folder(tmp_path / "three", base, shards=3)
    fp = fingerprint_state_dict(base)
    assert fp.startswith("sha256:")
    assert fingerprint_folder(single, cache=False) == fp
    assert fingerprint_folder(sharded, cache=False) == fp  # independent of file layout and order
    changed = {k: v.clone() for k, v in base.items()}
    changed["big.weight"][3, 4] = changed["big.weight"][3, 4] + 1
    assert fingerprint_state_dict(changed) != fp
    renamed = {("x" + k if k == "empty" else k): v for k, v in base.items()}
    assert fingerprint_state_dict(renamed) != fp
    assert fingerprint_state_dict({k: v.float() for k, v in base.items()}) != fp


def test_public_names_resolve(tmp_path: Path) -> None:
    import inspect

    import ram_trl.snapshot as snapshot
    from ram_trl.snapshot import fingerprint_of

    for name in snapshot.__all__:  # a lazy name must not be shadowed by a submodule
        assert not inspect.ismodule(getattr(snapshot, name)), name
    base, _ = make_pair(torch.float16)
    folder = save_folder(tmp_path / "base", base)
    assert fingerprint_of(base) == fingerprint_of(folder) == fingerprint_of(str(folder))


def test_fingerprint_cache_is_invalidated(tmp_path: Path) -> None:
    base, _ = make_pair(torch.float32)
    folder = save_folder(tmp_path / "base", base)
    fp = fingerprint_folder(folder)
    cache = json.loads((folder / CACHE_FILE).read_text())
    assert cache["fingerprint"] == fp
    base["layer.norm"][0] += 1
    save_file(base, folder / "model.safetensors")  # same size, new content and mtime
    os.utime(folder / "model.safetensors", ns=(1, 1))  # even with a coarse mtime
    assert fingerprint_folder(folder) == fingerprint_state_dict(base) != fp


def test_fingerprint_of_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = make_pair(torch.float32)
    folder = save_folder(tmp_path / "base", base)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(Path, "write_text", refuse)
    assert fingerprint_folder(folder) == fingerprint_state_dict(base)
    assert not (folder / CACHE_FILE).exists()


# --- lazy reading for the engine -------------------------------------------------------------


@pytest.mark.parametrize("pair", DTYPES, indirect=True, ids=str)
def test_source_reads_fine_tuned_rows(pair, tmp_path: Path) -> None:
    base, tuned, base_dir, ft_dir = pair
    snapshot_folders(base_dir, ft_dir, tmp_path / "snap", max_shard_size=2000)
    want = expected(base, tuned)
    with TaskVectorSource(tmp_path / "snap", base_dir) as source:
        assert set(source.tensors) == set(base)
        for name, w in want.items():
            info = source.tensors[name]
            assert (info.shape, info.dtype) == (tuple(w.shape), w.dtype)
            if w.dim() == 0:
                assert torch.equal(bits(source.read(name)), bits(w))
                continue
            rows = w.shape[0]
            for start, stop in [(0, rows), (0, min(1, rows)), (rows // 3, rows // 2), (rows, rows)]:
                got = source.read(name, start, stop)
                assert torch.equal(bits(got), bits(w[start:stop])), (name, start, stop)
            assert torch.equal(bits(source.read(name)), bits(w))
        assert source.config is None  # copied from the base, which has no config.json here


def test_source_row_offsets_across_index_chunks(
    pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ram_trl.snapshot import source

    monkeypatch.setattr(source, "INDEX_CHUNK", 7)  # many chunks of sorted indices
    base, tuned, base_dir, ft_dir = pair
    snapshot_folders(base_dir, ft_dir, tmp_path / "snap")
    want = expected(base, tuned)["embed.weight"]
    with TaskVectorSource(tmp_path / "snap", base_dir) as source:
        assert source.tensors["embed.weight"].layout == "sparse"
        for start in range(0, 64, 5):
            stop = min(start + 5, 64)
            got = source.read("embed.weight", start, stop)
            assert torch.equal(bits(got), bits(want[start:stop]))


def test_merge_from_snapshots_equals_merge_from_folders(
    tmp_path: Path, tiny_base_factory, tiny_agents_factory
) -> None:
    from ram_trl.merging.engine import merge

    shared_base = tiny_base_factory(dtype=torch.bfloat16)
    agents = tiny_agents_factory(shared_base, names=("a", "b"), density=[0.05, 0.3])
    base = Path(shutil.copytree(shared_base, tmp_path / "base"))  # fixtures stay read-only
    sources = {}
    for name, folder in agents.items():
        snapshot_folders(base, folder, tmp_path / f"snap-{name}", agent=name)
        sources[name] = TaskVectorSource(tmp_path / f"snap-{name}", base)
    merge(base, agents, "ram_plus", tmp_path / "from-folders", progress=False)
    merge(base, sources, "ram_plus", tmp_path / "from-snapshots", progress=False)
    a = load_file(tmp_path / "from-folders" / "model.safetensors")
    b = load_file(tmp_path / "from-snapshots" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


# --- bad input --------------------------------------------------------------------------------


def test_wrong_base_is_refused(pair, tmp_path: Path) -> None:
    base, tuned, base_dir, ft_dir = pair
    snapshot_folders(base_dir, ft_dir, tmp_path / "snap")
    other = {k: v.clone() for k, v in base.items()}
    other["layer.norm"][0] += 1
    other_dir = save_folder(tmp_path / "other", other)
    fp, other_fp = fingerprint_folder(base_dir), fingerprint_folder(other_dir)
    with pytest.raises(InputError) as err:
        TaskVectorSource(tmp_path / "snap", other_dir)
    for part in (fp, other_fp, str(other_dir), str(tmp_path / "snap")):
        assert part in str(err.value)
    with pytest.raises(InputError, match="fingerprint"):
        TaskVector.load(tmp_path / "snap").apply(other)


def test_mismatched_models_are_refused(pair) -> None:
    base, tuned, *_ = pair
    bad = dict(tuned, **{"layer.norm": torch.zeros(25)})
    with pytest.raises(InputError, match="layer.norm"):
        TaskVector.from_state_dicts(base, bad)
    with pytest.raises(InputError, match="lacks"):
        TaskVector.from_state_dicts(base, {k: v for k, v in tuned.items() if k != "empty"})
    with pytest.raises(InputError, match="epsilon"):
        TaskVector.from_state_dicts(base, tuned, epsilon=-1)


def test_refuses_non_empty_target(pair, tmp_path: Path) -> None:
    base, tuned, *_ = pair
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "x").write_text("x")
    with pytest.raises(InputError, match="not an empty folder"):
        TaskVector.from_state_dicts(base, tuned).save(tmp_path / "snap")


@pytest.fixture
def snap(pair, tmp_path: Path) -> tuple[Path, Path]:
    _, _, base_dir, ft_dir = pair
    snapshot_folders(base_dir, ft_dir, tmp_path / "snap")
    return tmp_path / "snap", base_dir


def _edit_manifest(snap: Path, edit) -> None:
    data = json.loads((snap / "manifest.json").read_text())
    edit(data)
    (snap / "manifest.json").write_text(json.dumps(data))


def _indices_offset(snap: Path, name: str) -> int:
    from ram_trl.io.checkpoint import read_header

    return read_header(snap / "task_vector.safetensors")[f"{name}::indices"].offset


CORRUPTIONS = {
    "bad-json": (lambda s: (s / "manifest.json").write_text("{not json"), "not JSON"),
    "no-manifest": (lambda s: (s / "manifest.json").unlink(), "manifest.json is missing"),
    "version": (
        lambda s: _edit_manifest(s, lambda d: d.update(format_version=99)),
        "format version 99",
    ),
    "missing-file": (lambda s: (s / "task_vector.safetensors").unlink(), "is missing"),
    "truncated": (
        lambda s: os.truncate(s / "task_vector.safetensors", 5000),
        "truncated",
    ),
    "empty-file": (lambda s: os.truncate(s / "task_vector.safetensors", 0), "truncated"),
    "nnz-mismatch": (
        lambda s: _edit_manifest(s, lambda d: d["tensors"]["embed.weight"].update(nnz=59)),
        "nnz mismatch",
    ),
    "index-out-of-range": (
        lambda s: _poke(s, _indices_offset(s, "embed.weight") + 59 * 4, 10**6),
        "out of range",
    ),
    "bad-layout": (
        lambda s: _edit_manifest(s, lambda d: d["tensors"]["empty"].update(layout="zip")),
        "unknown layout",
    ),
}


def _poke(snap: Path, offset: int, value: int) -> None:
    with open(snap / "task_vector.safetensors", "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<i", value))


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_snapshots_are_named(snap, kind: str) -> None:
    path, base_dir = snap
    corrupt, message = CORRUPTIONS[kind]
    corrupt(path)
    for attempt in (validate, TaskVector.load, lambda p: TaskVectorSource(p, base_dir)):
        with pytest.raises(InputError, match=message) as err:
            attempt(path)
        assert str(path) in str(err.value)


def _rehash(snap: Path) -> None:
    """Record the files' current checksums in the manifest, as a tool that rewrites a snapshot
    and its manifest would: what is left to catch a bad index is the reader's own check."""
    import hashlib

    manifest = json.loads((snap / "manifest.json").read_text())
    for name, entry in manifest["checksums"].items():
        data = (snap / name).read_bytes()
        entry["data_sha256"] = hashlib.sha256(
            data[8 + struct.unpack("<Q", data[:8])[0] :]
        ).hexdigest()
    (snap / "manifest.json").write_text(json.dumps(manifest))


def test_unsorted_indices_are_caught_when_read(snap) -> None:
    path, base_dir = snap
    _poke(path, _indices_offset(path, "embed.weight") + 10 * 4, 0)  # duplicate of an earlier one
    validate(path)  # the cheap check reads only the first and last index
    with pytest.raises(InputError, match="checksum"):  # opening it for a merge reads every byte
        TaskVectorSource(path, base_dir)
    _rehash(path)
    with pytest.raises(InputError, match="strictly increasing"):
        TaskVector.load(path)
    with TaskVectorSource(path, base_dir) as source, pytest.raises(InputError, match=str(path)):
        source.read("embed.weight", 0, 4)


def test_cli_merge_from_store_equals_merge_of_checkpoints(tmp_path, capsys):
    """`ram-trl snapshot` each agent into a store, `ram-trl merge --store`: the same bits as
    merging the checkpoints, and a model card whose command redoes it from the store."""
    import json

    from safetensors.torch import load_file

    import ram_trl
    from ram_trl.cli import main
    from ram_trl.testing import make_sparse_agents, save_tiny_base

    base = save_tiny_base(tmp_path / "base", "qwen2", dtype=torch.bfloat16)
    agents = make_sparse_agents(base, tmp_path / "agents", ["code", "tool"], density=[0.05, 0.2])
    store = tmp_path / "store"
    for name, path in agents.items():
        args = ["snapshot", "--base", str(base), "--model", str(path), "--store", str(store)]
        assert main([*args, "--agent", name, "--step", "7"]) == 0
    out = tmp_path / "from-store"
    assert (
        main(["merge", "--store", str(store), "--out", str(out), "--method", "ram_plus", "-q"]) == 0
    )
    ram_trl.merge(base, agents, "ram_plus", tmp_path / "from-folders", progress=False)
    got, want = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "from-folders" / "model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    card = (out / "README.md").read_text()
    assert f"--store {store}" in card and "--agent code@7" in card
    record = json.loads((out / "ram_trl_merge.json").read_text())
    assert [a["name"] for a in record["agents"]] == ["code", "tool"]

    capsys.readouterr()
    assert (
        main(["merge", "--store", str(store), "--agent", "code@8", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "code" in capsys.readouterr().err
    assert main(["merge", "--store", str(tmp_path / "nostore"), "--out", str(tmp_path / "y")]) == 2
