"""The compiled kernels (``ram_trl.native``): the torch path's bits, its refusals, its build.

Every kernel is checked against the torch code it replaces: the dtype conversions over every
16-bit pattern, the merge and the overlap count on random chunks (hypothesis), with every
dtype, index width, agent count and the edge cases a merge must refuse.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch
from conftest import require_native
from hypothesis import given
from hypothesis import strategies as st

from ram_trl import native
from ram_trl.merging.chunks import StoredChunk
from ram_trl.merging.engine import _apply_stored
from ram_trl.methods import ChunkContext, get_method, overlap_histogram
from ram_trl.methods.ram import RAMParams, ram_merge_stored, ram_rule_at

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.view({2: torch.int16, 4: torch.int32}[x.dtype.itemsize]).numpy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widening_every_16_bit_pattern_is_torchs(dtype):
    lib = require_native()
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    got = torch.empty(values.numel())
    lib.ram_widen(native.DTYPES[dtype], ctypes.c_void_p(values.data_ptr()),
                  ctypes.c_void_p(got.data_ptr()), ctypes.c_int64(values.numel()))  # fmt: skip
    want = values.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert np.array_equal(_bits(got[~nan]), _bits(want[~nan]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_is_torchs_to_nearest_even(dtype):
    """float32 -> 16 bits: random bit patterns, every halfway case between neighbours of the
    narrow type, subnormals, the largest values and those that overflow to Inf."""
    lib = require_native()
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    wide = torch.from_numpy(patterns.view(np.float32).copy())
    narrow = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    grid = narrow.float()
    grid = grid[torch.isfinite(grid)].sort().values
    halfway = (grid[:-1].double() + grid[1:].double()) / 2
    finfo = torch.finfo(dtype)
    edges = torch.tensor([0.0, -0.0, finfo.tiny, finfo.max, -finfo.max, 65519.0, 65520.0, 1e38])
    values = torch.cat([wide, grid, halfway.float(), edges, math.inf * torch.ones(1)])
    values = values[~torch.isnan(values)]
    got = torch.empty(values.numel(), dtype=dtype)
    lib.ram_round(native.DTYPES[dtype], ctypes.c_void_p(values.data_ptr()),
                  ctypes.c_void_p(got.data_ptr()), ctypes.c_int64(values.numel()))  # fmt: skip
    assert np.array_equal(_bits(got), _bits(values.to(dtype)))


def _torch_rows(base, positions, values, lambdas, epsilon, dtype):
    """The torch path: ``ram_rule_at`` on the float32 deltas, applied as the engine applies it;
    None where it refuses (a value not finite)."""
    changes = [(p, v.float() - base[p].float()) for p, v in zip(positions, values, strict=True)]
    ctx = ChunkContext(None if lambdas is None else torch.tensor(lambdas, dtype=torch.float32))
    merged = ram_rule_at(changes, base.numel(), RAMParams(epsilon=epsilon), ctx)
    base32 = [base[p].float() for p, _ in changes]
    chunk = StoredChunk(0, base.numel(), base, [], 0, [], [], changes, base32)
    rows = _apply_stored(chunk, merged, dtype)
    return rows if isinstance(rows, torch.Tensor) else None


def _chunk(base, indices, shift, values, epsilons):
    return StoredChunk(0, base.numel(), base, indices, shift, values, epsilons)


@st.composite
def stored_chunks(draw):
    """A chunk of ``n`` base elements and, per agent, increasing positions with values: changes
    of every size (below, at and above epsilon; equal and opposite ones that cancel; huge),
    positions shared by several agents or not."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 300))
    agents = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 100.0]))
    epsilon = draw(st.sampled_from([0.0, 1e-5, 1e-3]))
    scales = st.lists(st.floats(0.5, 3.0, width=32), min_size=agents, max_size=agents)
    lambdas = draw(st.none() | scales)
    wide = draw(st.booleans())
    shift = draw(st.sampled_from([0, 7, 1 << 20]))
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 2).to(dtype)
    hot = torch.rand(n, generator=g) < 0.5  # where agents tend to overlap
    positions, values = [], []
    for t in range(agents):
        keep = torch.rand(n, generator=g) < torch.where(hot, 0.6, 0.15)
        p = torch.nonzero(keep).flatten()
        delta = torch.randn(p.numel(), generator=g) * scale
        kind = torch.randint(0, 6, (p.numel(),), generator=g)
        if t > 0 and values:  # cancel agent 0's change where both changed
            first_deltas = values[0].float() - base[positions[0]].float()
            first = dict(zip(positions[0].tolist(), first_deltas.tolist(), strict=True))
            for i, pos in enumerate(p.tolist()):
                if kind[i] == 5 and pos in first:
                    delta[i] = -first[pos]
        delta = torch.where(kind == 4, delta * 1e-9, delta)
        positions.append(p)
        values.append((base[p].float() + delta).to(dtype))
    indices = [(p + shift).to(torch.int64 if wide else torch.int32) for p in positions]
    return dtype, base, positions, indices, shift, values, lambdas, epsilon


@given(stored_chunks())
def test_merge_is_the_torch_paths_bit_for_bit(case):
    lib = require_native()
    dtype, base, positions, indices, shift, values, lambdas, epsilon = case
    want = _torch_rows(base, positions, values, lambdas, epsilon, dtype)
    agents = len(values)
    out = torch.empty_like(base)
    status = native.merge_at(
        lib, base, out, indices, shift, values, lambdas or [1.0] * agents, [-1.0] * agents,
        epsilon,
    )  # fmt: skip
    if want is None:  # the torch path refuses (an overflow): so does the kernel
        assert status == native.NOT_FINITE
        return
    assert status == 0
    assert np.array_equal(_bits(out), _bits(want))
    # the method's hook: the same rows, and None (the torch path) for another output dtype
    ctx = ChunkContext(None if lambdas is None else torch.tensor(lambdas))
    chunk = _chunk(base, indices, shift, values, [-1.0] * agents)
    rows = ram_merge_stored(chunk, RAMParams(epsilon=epsilon), ctx, dtype)
    assert rows is not None and np.array_equal(_bits(rows), _bits(want))
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    assert ram_merge_stored(chunk, RAMParams(epsilon=epsilon), ctx, other) is None


def _merge(lib, base, indices, values, epsilons, epsilon=1e-5, lambdas=None):
    out = torch.empty_like(base)
    agents = len(indices)
    status = native.merge_at(
        lib, base, out, indices, 0, values, lambdas or [1.0] * agents, epsilons, epsilon
    )
    return status, out


def test_by_hand():
    """Unique 0.5 scaled by 2, shared 1.0 and 3.0 averaged, a change below epsilon ignored, two
    that cancel keep the base's bits (-0.0 stays -0.0)."""
    lib = require_native()
    base = torch.tensor([1.0, 2.0, -0.0, 4.0, 5.0])
    a = (torch.tensor([0, 1, 2, 4]), torch.tensor([1.5, 3.0, 1.0, 5.0 + 1e-7]))
    b = (torch.tensor([1, 2]), torch.tensor([5.0, -1.0]))
    status, out = _merge(lib, base, [a[0], b[0]], [a[1], b[1]], [-1.0, -1.0], lambdas=[2.0, 1.0])
    assert status == 0
    assert out.tolist() == [2.0, 4.0, 0.0, 4.0, 5.0]
    assert math.copysign(1, out[2]) == -1


def test_refusals_leave_the_scratch_clean():
    """A NaN, a stored change at or below the snapshot's epsilon, an index outside the chunk, a
    result beyond the dtype: a status, never a result; the next chunk merges correctly."""
    lib = require_native()
    base = torch.ones(100000, dtype=torch.bfloat16)
    good = (torch.tensor([3, 70000], dtype=torch.int32), torch.tensor([2.0, 3.0]).bfloat16())
    cases = {
        native.NOT_FINITE: ([3, 80000], [2.0, math.nan], [-1.0], torch.bfloat16),
        native.NOT_CHANGED: ([3, 80000], [2.0, 1.0], [0.0], torch.bfloat16),
        native.OUT_OF_RANGE: ([3, 100000], [2.0, 2.0], [-1.0], torch.bfloat16),
    }
    for status, (idx, vals, eps, dtype) in cases.items():
        at = [torch.tensor(idx, dtype=torch.int32)]
        got, _ = _merge(lib, base, at, [torch.tensor(vals).to(dtype)], eps)
        assert got == status
    ones = torch.ones(4, dtype=torch.bfloat16)
    at, big = [torch.tensor([1])], [torch.tensor([3e38]).bfloat16()]
    assert _merge(lib, ones, at, big, [-1.0], lambdas=[1.0])[0] == 0  # 3e38 fits bfloat16
    assert _merge(lib, ones, at, big, [-1.0], lambdas=[2.0])[0] == native.NOT_FINITE
    assert not native._scratch().any()
    status, out = _merge(lib, base, [good[0]], [good[1]], [-1.0])
    assert status == 0 and out[3] == 2 and out[70000] == 3 and out.float().sum() == 100003


@given(st.integers(1, 200_000), st.integers(1, 6), st.integers(0, 2**32 - 1), st.booleans())
def test_counting_is_the_torch_histogram(n, agents, seed, wide):
    lib = require_native()
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(agents, generator=g)
    mask = torch.rand(agents, n, generator=g) < density[:, None]
    shift = 5 * n
    indices = [
        (torch.nonzero(row).flatten() + shift).to(torch.int64 if wide else torch.int32)
        for row in mask
    ]
    got = native.count_at(lib, n, indices, shift)
    assert got is not None and torch.equal(got, overlap_histogram(mask))
    outside = [torch.tensor([n + shift], dtype=torch.int64)] * agents
    assert native.count_at(lib, n, outside, shift) is None
    assert not native._scratch().any()


def test_ram_family_methods_have_the_compiled_merge():
    for name in ("ram", "ram_plus", "ram_plus_s", "arm_r_v2"):
        assert get_method(name).merge_stored is ram_merge_stored
    assert get_method("ties").merge_stored is None


def test_build_is_cached_atomic_and_optional(tmp_path, monkeypatch, caplog):
    """Built once into the cache (a second load builds nothing), under a temporary name that a
    dead build leaves behind and the next one removes; without a compiler, or with
    RAM_TRL_NATIVE=0, there is no library, one log line says why, and merges take torch."""
    require_native()
    monkeypatch.setenv("RAM_TRL_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", [])
    folder = native.cache_dir()
    folder.mkdir(parents=True)
    dead = folder / ".ram_at-x.so.tmp-999999999-0123abcd"
    dead.write_bytes(b"half a build")
    assert native.library() is not None
    built = sorted(p.name for p in folder.iterdir())
    assert len(built) == 1 and built[0].startswith("ram_at-") and built[0].endswith(".so")
    stamp = (folder / built[0]).stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", [])
    assert native.library() is not None
    assert (folder / built[0]).stat().st_mtime_ns == stamp
    monkeypatch.setenv("RAM_TRL_NATIVE", "0")
    assert native.library() is None
    monkeypatch.delenv("RAM_TRL_NATIVE")
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("RAM_TRL_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "no-such-compiler")
    with caplog.at_level("INFO", logger="ram_trl.native"):
        assert native.library() is None
    assert "no C compiler 'no-such-compiler'" in caplog.text
    monkeypatch.setattr(native, "_loaded", [])
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    caplog.clear()
    with caplog.at_level("INFO", logger="ram_trl.native"):
        assert native.library() is None
    assert "false failed" in caplog.text
    assert not [p for p in (tmp_path / "other").rglob("*") if p.is_file()]


@given(st.integers(1, 50), st.integers(1, 40), st.integers(0, 2**32 - 1), st.booleans())
def test_row_offsets_are_the_binary_search(rows, row_numel, seed, wide):
    """Where each row starts in sorted indices (what a snapshot source locates rows with), and
    None for indices out of order, repeated, or past the tensor."""
    lib = require_native()
    g = torch.Generator().manual_seed(seed)
    numel = rows * row_numel
    mask = torch.rand(numel, generator=g) < torch.rand(1, generator=g)
    idx = torch.nonzero(mask).flatten().to(torch.int64 if wide else torch.int32)
    want = torch.searchsorted(idx, torch.arange(rows + 1, dtype=idx.dtype) * row_numel)
    got = native.row_offsets(lib, idx, row_numel, rows)
    assert got is not None and torch.equal(got, want.to(torch.int64))
    if idx.numel() >= 2:
        swapped = idx.clone()
        swapped[[0, 1]] = swapped[[1, 0]]
        assert native.row_offsets(lib, swapped, row_numel, rows) is None
        repeated = idx.clone()
        repeated[1] = repeated[0]
        assert native.row_offsets(lib, repeated, row_numel, rows) is None
    past = torch.cat([idx, torch.tensor([numel], dtype=idx.dtype)])
    assert native.row_offsets(lib, past, row_numel, rows) is None
