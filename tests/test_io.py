"""Checkpoint reading and writing: bytes must survive exactly, errors must name the file."""

from __future__ import annotations

import gc
import json
import mmap
import os
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ram_trl.errors import InputError
from ram_trl.io import (
    ModelFolder,
    ShardedWriter,
    TensorSpec,
    atomic_directory,
    copy_model_files,
    load_config,
    parse_size,
    plan_shards,
)

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so NaNs and -0.0 count too)."""
    raw = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*raw)


def write_model(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    chunk_rows: int = 3,
    max_shard_bytes: int = 10**9,
) -> list[Path]:
    """Write ``tensors`` through a ShardedWriter in chunks of ``chunk_rows`` rows."""
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with ShardedWriter(directory, specs, max_shard_bytes=max_shard_bytes) as writer:
        for name, t in tensors.items():
            if t.dim() == 0:
                writer.write(name, t)
            for start in range(0, t.shape[0] if t.dim() else 0, chunk_rows):
                writer.write(name, t[start : start + chunk_rows])
    return writer.close()


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def raw_safetensors(
    path: Path, header: object, data: bytes = b"", length: int | None = None
) -> None:
    """A safetensors file with an arbitrary (possibly broken) header."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + text + data)


# --- writing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_every_dtype_in_chunks(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {
        "matrix": random_tensor((7, 5), dtype, 1),
        "vector": random_tensor((11,), dtype, 2),
        "scalar": random_tensor((), dtype, 3),
        "empty": random_tensor((0, 4), dtype, 4),
        "no_columns": random_tensor((3, 0), dtype, 5),
        "cube": random_tensor((4, 2, 3), dtype, 6),
    }
    assert [p.name for p in write_model(tmp_path, tensors)] == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert same(loaded[name], t), name
    with ModelFolder(tmp_path) as folder:
        assert list(folder.tensors) == list(tensors)  # on-disk order is the spec order
        for name, t in tensors.items():
            assert same(folder.read(name), t), name


def test_header_format_and_metadata(tmp_path: Path) -> None:
    spec = TensorSpec("w", (3,), torch.float32)
    with ShardedWriter(tmp_path, [spec], metadata={"merge_method": "ram"}) as writer:
        writer.write("w", torch.ones(3))
    raw = (tmp_path / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    assert length % 8 == 0
    assert raw[8 + length :] == torch.ones(3).numpy().tobytes()
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "merge_method": "ram"}
        assert torch.equal(f.get_slice("w")[1:3], torch.ones(2))


def test_sharding_naming_and_index(tmp_path: Path) -> None:
    tensors = {f"layer{i}.weight": random_tensor((10, 10), torch.float32, i) for i in range(5)}
    tensors["tiny"] = torch.zeros(2)
    files = write_model(tmp_path, tensors, chunk_rows=4, max_shard_bytes=900)  # 400 B + 400 B
    names = [p.name for p in files]
    assert names == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    for file in files[:-1]:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                assert index["weight_map"][key] == file.name
                assert same(f.get_tensor(key), tensors[key])
    assert index["weight_map"].keys() == tensors.keys()
    with ModelFolder(tmp_path) as folder:
        assert list(folder.tensors) == list(tensors)


def test_plan_shards() -> None:
    specs = [TensorSpec(str(i), (n,), torch.uint8) for i, n in enumerate([3, 3, 5, 20, 1, 0, 2])]
    shards = plan_shards(specs, 6)
    assert [[s.name for s in shard] for shard in shards] == [
        ["0", "1"],
        ["2"],
        ["3"],
        ["4", "5", "6"],
    ]
    assert [s for shard in shards for s in shard] == specs
    assert plan_shards([], 10) == []
    assert len(plan_shards(specs, 10**9)) == 1


def test_shard_of_only_empty_tensors_is_written(tmp_path: Path) -> None:
    specs = [TensorSpec("big", (8,), torch.uint8), TensorSpec("nothing", (0,), torch.uint8)]
    with ShardedWriter(tmp_path, specs, max_shard_bytes=4) as writer:
        writer.write("big", torch.arange(8, dtype=torch.uint8))
    assert len(writer.files) == 2 and all(f.is_file() for f in writer.files)
    assert load_all(tmp_path)["nothing"].shape == (0,)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("20KB", 20_000),
        ("20kb", 20_000),
        ("1.5MiB", 3 * 2**19),
        ("1000", 1000),
        (" 7 GB ", 7 * 10**9),
        (1000, 1000),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("garbage", ["lots", "5XB", "", "-1GB", "0", 0, -5, True, "1e3"])
def test_parse_size_rejects_garbage(garbage: object) -> None:
    with pytest.raises(InputError, match="size"):
        parse_size(garbage)  # type: ignore[arg-type]


def test_writer_protocol_errors(tmp_path: Path) -> None:
    specs = [
        TensorSpec("a", (4, 2), torch.float32),
        TensorSpec("s", (), torch.float16),
        TensorSpec("b", (3,), torch.bfloat16),
    ]
    writer = ShardedWriter(tmp_path, specs)
    with pytest.raises(ValueError, match="expected 'a'"):
        writer.write("b", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        writer.write("a", torch.zeros(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not fit"):
        writer.write("a", torch.zeros(1, 3))
    with pytest.raises(ValueError, match="do not fit"):
        writer.write("a", torch.zeros(5, 2))
    writer.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="incomplete"):
        writer.close()
    writer.write("a", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="do not fit"):
        writer.write("s", torch.zeros(1, dtype=torch.float16))
    writer.write("s", torch.tensor(1.0, dtype=torch.float16))
    with pytest.raises(ValueError, match="expected 'b'"):
        writer.write("s", torch.tensor(1.0, dtype=torch.float16))
    with pytest.raises(ValueError, match="expected 'b'"):
        writer.write("a", torch.zeros(1, 2))
    writer.write("b", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="expected None"):
        writer.write("b", torch.zeros(0, dtype=torch.bfloat16))
    assert writer.close() == [tmp_path / "model.safetensors"]
    assert writer.close() == [tmp_path / "model.safetensors"]  # idempotent
    with pytest.raises(ValueError, match="duplicate"):
        ShardedWriter(tmp_path, [specs[0], specs[0]])


def test_writer_accepts_noncontiguous_and_requires_grad(tmp_path: Path) -> None:
    t = torch.randn(4, 6, requires_grad=True)
    with ShardedWriter(tmp_path, [TensorSpec("t", (6, 4), torch.float32)]) as writer:
        writer.write("t", t.T[:2] * 1)
        writer.write("t", t.T[2:] * 1)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t"], t.detach().T)


@given(
    layout=st.lists(
        st.tuples(
            st.lists(st.integers(0, 5), max_size=3).map(tuple),
            st.sampled_from(DTYPES),
            st.integers(1, 4),  # rows per chunk
        ),
        min_size=1,
        max_size=5,
    ),
    max_shard_bytes=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_property_write_then_read_is_identity(
    layout: list[tuple[tuple[int, ...], torch.dtype, int]], max_shard_bytes: int, seed: int
) -> None:
    tensors = {f"t{i}": random_tensor(s, d, seed + i) for i, (s, d, _) in enumerate(layout)}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        with ShardedWriter(directory, specs, max_shard_bytes=max_shard_bytes) as writer:
            for (name, t), (_, _, rows) in zip(tensors.items(), layout, strict=True):
                if t.dim() == 0:
                    writer.write(name, t)
                for start in range(0, t.shape[0] if t.dim() else 0, rows):
                    writer.write(name, t[start : start + rows])
        loaded = load_all(directory)
        with ModelFolder(directory) as folder:
            assert list(folder.tensors) == list(tensors)
            for name, t in tensors.items():
                assert same(loaded[name], t)
                assert same(folder.read(name), t)
                if t.dim():
                    mid = t.shape[0] // 2
                    assert same(folder.read(name, mid), t[mid:])
                    assert same(folder.read(name, 0, mid), t[:mid])


# --- reading ------------------------------------------------------------------------------------


def test_reads_single_file_and_row_ranges(tmp_path: Path) -> None:
    tensors = {
        "odd_bf16": random_tensor(
            (3,), torch.bfloat16
        ),  # puts the next tensor off 4-byte alignment
        "w": random_tensor((13, 6), torch.float32),
        "x": random_tensor((9, 2, 3), torch.float16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    with ModelFolder(tmp_path) as folder:
        assert folder.config == {"model_type": "qwen2"} == load_config(tmp_path)
        assert folder.tensors.keys() == tensors.keys()
        offsets = [info.offset for info in folder.tensors.values()]
        assert offsets == sorted(offsets)
        info = folder.tensors["w"]
        assert (info.shape, info.dtype, info.rows, info.numel, info.nbytes) == (
            (13, 6),
            torch.float32,
            13,
            78,
            312,
        )
        for name, t in tensors.items():
            assert same(folder.read(name), t)
            for start, stop in [(0, 1), (1, 3), (2, 2), (0, t.shape[0]), (2, t.shape[0])]:
                assert same(folder.read(name, start, stop), t[start:stop])
        with pytest.raises(ValueError, match="out of range"):
            folder.read("w", 10, 14)


def test_reads_unindexed_shards_and_ignores_adapter_next_to_model(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "part-b.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "part-a.safetensors")
    with ModelFolder(tmp_path) as folder:
        assert list(folder.tensors) == ["b", "a"]  # file name order
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    with ModelFolder(tmp_path) as folder:
        assert list(folder.tensors) == ["w"]


def test_reads_are_valid_after_close_and_releases(tmp_path: Path) -> None:
    """Reads are views of a memory map: they must survive close(), and the page release that
    follows a read's death must not disturb another live tensor, even one that escaped the view
    tracking (detach() shares the storage without being a view)."""
    t = random_tensor((64, 4096), torch.float32)  # 16 KiB a row: every read spans many pages
    save_file({"t": t}, tmp_path / "model.safetensors")
    folder = ModelFolder(tmp_path)
    first = folder.read("t", 0, 8)
    escaped = first.detach()[2:]
    del first
    others = [folder.read("t", s, s + 8) for s in range(8, 64, 8)]
    del others
    gc.collect()
    assert torch.equal(escaped, t[2:8])
    again = folder.read("t", 0, 8)
    folder.close()
    gc.collect()
    assert torch.equal(again, t[:8]) and torch.equal(escaped, t[2:8])
    again.mul_(2)  # not supported (other reads see it), but it must never reach the file
    with ModelFolder(tmp_path) as fresh:
        assert torch.equal(fresh.read("t"), t)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"),
    reason="RSS from /proc and madvise are Linux-specific",
)
def test_streaming_reads_keep_resident_memory_bounded(tmp_path: Path) -> None:
    save_file({"t": torch.ones(4096, 4096)}, tmp_path / "model.safetensors")  # 64 MiB
    gc.collect()

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE

    with ModelFolder(tmp_path) as folder:
        before, peak = rss(), 0
        for start in range(0, 4096, 256):  # 4 MiB chunks
            chunk = folder.read("t", start, start + 256)
            assert float(chunk.sum()) == 256 * 4096
            del chunk
            peak = max(peak, rss() - before)
    assert peak < 24 * 2**20, f"resident memory grew by {peak / 2**20:.0f} MiB"


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.Qwen2ForCausalLM(config)
    root = tmp_path_factory.mktemp("tiny_qwen")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root / "single", root / "sharded"


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_reads_save_pretrained_folders(tiny_qwen: tuple[Path, Path], layout: str) -> None:
    path = tiny_qwen[0] if layout == "single" else tiny_qwen[1]
    files = sorted(path.glob("*.safetensors"))
    assert (len(files) > 1) == (layout == "sharded")
    expected = load_all(path)
    with ModelFolder(path) as folder:
        assert folder.config is not None and folder.config["model_type"] == "qwen2"
        assert folder.tensors.keys() == expected.keys()
        for name, t in expected.items():
            assert same(folder.read(name), t)
            if t.dim() and t.shape[0] > 3:
                assert same(folder.read(name, 1, 3), t[1:3])


def test_written_model_loads_with_transformers(
    tiny_qwen: tuple[Path, Path], tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    source = tiny_qwen[1]
    out = tmp_path / "copy"
    with ModelFolder(source) as folder, atomic_directory(out) as tmp:
        specs = [TensorSpec(n, i.shape, i.dtype) for n, i in folder.tensors.items()]
        with ShardedWriter(tmp, specs, max_shard_bytes=parse_size("30KB")) as writer:
            for name, info in folder.tensors.items():
                for start in range(0, info.rows, 5):
                    writer.write(name, folder.read(name, start, min(start + 5, info.rows)))
        assert copy_model_files(source, tmp) == ["config.json", "generation_config.json"]
    assert (out / "model.safetensors.index.json").is_file()
    original = transformers.Qwen2ForCausalLM.from_pretrained(source).state_dict()
    copied = transformers.Qwen2ForCausalLM.from_pretrained(out).state_dict()
    assert original.keys() == copied.keys()
    assert all(torch.equal(original[k], copied[k]) for k in original)


# --- input errors: always InputError, always naming the path ------------------------------------


def assert_input_error(path: Path, match: str, call, *args) -> None:  # noqa: ANN001
    with pytest.raises(InputError, match=match) as info:
        call(*args)
    assert str(path) in str(info.value)


def test_error_missing_not_a_folder_and_no_weights(tmp_path: Path) -> None:
    assert_input_error(tmp_path / "nope", "no such", ModelFolder, tmp_path / "nope")
    save_file({"a": torch.ones(1)}, tmp_path / "w.safetensors")
    assert_input_error(
        tmp_path / "w.safetensors", "not a folder", ModelFolder, tmp_path / "w.safetensors"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_input_error(empty, "no \\*.safetensors", ModelFolder, empty)
    (empty / "pytorch_model.bin").write_bytes(b"pickle")
    assert_input_error(empty, "convert to safetensors", ModelFolder, empty)


def test_error_index_problems(tmp_path: Path) -> None:
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / one)
    save_file({"c": torch.ones(2)}, tmp_path / two)
    index = tmp_path / "model.safetensors.index.json"

    def write_index(weight_map: dict[str, str]) -> None:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    write_index({"a": one, "b": one, "c": two})
    assert list(ModelFolder(tmp_path).tensors) == ["a", "b", "c"]
    write_index({"a": one, "b": one, "c": "model-00003-of-00003.safetensors"})
    assert_input_error(index, "model-00003-of-00003.safetensors.*missing", ModelFolder, tmp_path)
    write_index({"a": one, "b": one, "c": one})
    assert_input_error(index, "'c' to model-00001.*that file lacks it", ModelFolder, tmp_path)
    write_index({"a": two, "b": one, "c": two})
    assert_input_error(index, "'a' to model-00002.*it is in model-00001", ModelFolder, tmp_path)
    write_index({"a": one, "b": one, "c": two, "d": two})
    assert_input_error(index, "'d'.*that file lacks it", ModelFolder, tmp_path)
    index.write_text("{not json")
    assert_input_error(index, "not a valid safetensors index", ModelFolder, tmp_path)
    index.write_text('{"weight_map": [1, 2]}')
    assert_input_error(index, "not a valid safetensors index", ModelFolder, tmp_path)
    save_file({"a": torch.ones(2), "c": torch.ones(2)}, tmp_path / two)  # 'a' in both files
    write_index({"a": one, "b": one, "c": two})
    assert_input_error(tmp_path, "'a' is stored twice", ModelFolder, tmp_path)
    index.unlink()
    assert_input_error(tmp_path, "'a' is stored twice", ModelFolder, tmp_path)


GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "length", "match"),
    [
        ({"w": {**GOOD_ENTRY, "dtype": "F8_E4M3"}}, bytes(8), None, "dtype 'F8_E4M3'"),
        ({"w": {**GOOD_ENTRY, "dtype": "F4"}}, bytes(8), None, "does not support"),
        (b"{not json", b"", None, "not valid JSON"),
        (b"\xff\xfe", b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        ({"w": {"dtype": "F32"}}, bytes(8), None, "malformed .*'w'"),
        ({"w": {**GOOD_ENTRY, "shape": [-2]}}, bytes(8), None, "malformed .*'w'"),
        ({"w": {**GOOD_ENTRY, "shape": "2"}}, bytes(8), None, "malformed .*'w'"),
        ({"w": {**GOOD_ENTRY, "dtype": ["F32"]}}, bytes(8), None, "malformed .*'w'"),
        ({"w": [1, 2]}, bytes(8), None, "malformed .*'w'"),
        ({"w": {**GOOD_ENTRY, "data_offsets": [0]}}, bytes(8), None, "malformed .*'w'"),
        ({"w": {**GOOD_ENTRY, "data_offsets": [0, 12]}}, bytes(12), None, "needs 8 bytes"),
        ({"w": GOOD_ENTRY}, bytes(5), None, "truncated file"),
        ({"w": GOOD_ENTRY}, bytes(8), 10**6, "malformed safetensors header"),
    ],
)
def test_error_bad_safetensors_files(
    tmp_path: Path, header: object, data: bytes, length: int | None, match: str
) -> None:
    file = tmp_path / "model.safetensors"
    raw_safetensors(file, header, data, length)
    assert_input_error(file, match, ModelFolder, tmp_path)


def test_error_tiny_and_truncated_real_files(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"abc")
    assert_input_error(file, "truncated", ModelFolder, tmp_path)
    save_file({"w": torch.ones(100)}, file)
    os.truncate(file, file.stat().st_size - 1)
    assert_input_error(file, "truncated file: tensor 'w'", ModelFolder, tmp_path)


def test_error_unknown_tensor_and_bad_config(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    with ModelFolder(tmp_path) as folder:
        assert_input_error(tmp_path, "no tensor named 'v'", folder.read, "v")
    (tmp_path / "config.json").write_text("{oops")
    assert_input_error(tmp_path / "config.json", "not valid JSON", ModelFolder, tmp_path)


# --- atomic publication -------------------------------------------------------------------------


def test_atomic_directory_publishes_on_success(tmp_path: Path) -> None:
    final = tmp_path / "deep" / "out"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".out.tmp-")
        assert not final.exists() and list(tmp.iterdir()) == []
        (tmp / "f.txt").write_text("new")
    assert (final / "f.txt").read_text() == "new"
    assert os.listdir(final.parent) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_directory_leaves_nothing_on_error(tmp_path: Path, error: type) -> None:
    final = tmp_path / "out"
    with pytest.raises(error), atomic_directory(final) as tmp:
        (tmp / "half.safetensors").write_bytes(b"half")
        raise error("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_directory_overwrite_replaces(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final, overwrite=True) as tmp:
        assert (final / "old.txt").is_file()  # the old model stays usable while writing
        (tmp / "new.txt").write_text("new")
    assert os.listdir(final) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_directory_failed_overwrite_keeps_old(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError
    assert os.listdir(final) == ["old.txt"] and os.listdir(tmp_path) == ["out"]


def test_atomic_directory_refuses_existing_without_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    entered = False
    with (
        pytest.raises(InputError, match="exists; pass --overwrite") as info,
        atomic_directory(final),
    ):
        entered = True
    assert str(final) in str(info.value) and not entered
    assert os.listdir(final) == ["old.txt"] and os.listdir(tmp_path) == ["out"]


def test_writer_error_inside_atomic_directory_publishes_nothing(tmp_path: Path) -> None:
    final = tmp_path / "out"
    specs = [TensorSpec("w", (4,), torch.float32)]
    with (
        pytest.raises(ValueError, match="incomplete"),
        atomic_directory(final) as tmp,
        ShardedWriter(tmp, specs) as writer,
    ):
        writer.write("w", torch.ones(2))
    assert os.listdir(tmp_path) == []


def test_copy_model_files_follows_symlinks(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (tmp_path / "blob").write_text('{"model_type": "qwen2"}')
    (src / "config.json").symlink_to(tmp_path / "blob")
    for name in ("tokenizer.json", "merges.txt", "chat_template.jinja", "notes.md"):
        (src / name).write_text(name)
    copied = copy_model_files(src, dst)
    assert copied == ["config.json", "tokenizer.json", "merges.txt", "chat_template.jinja"]
    assert sorted(os.listdir(dst)) == sorted(copied)
    assert not (dst / "config.json").is_symlink()
    assert json.loads((dst / "config.json").read_text()) == {"model_type": "qwen2"}
