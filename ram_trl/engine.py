"""The streaming merge engine behind ``ram-trl merge`` and :func:`ram_trl.merge`.

Memory stays at a few chunks whatever the model size: tensors are read a row chunk at a time
from every input, merged in float32 by a registered rule, and streamed into the output shards.
I/O cost: ``ram`` and the baselines read every input byte once. Methods whose lambda depends on
overlap counts (RAM+, RAM+s, arm-r-v2) first make a counting pass, because the paper's rho is a
whole-model quantity, so they read every byte twice. TIES reads a tensor larger than one chunk
three times (two histogram sweeps find its exact trim threshold; see ``kth_largest``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ram_trl.errors import InputError, OutputExistsError
from ram_trl.inputs import (
    Chunk,
    MergeInputs,
    WeightSource,
    is_float_tensor,
    iter_chunks,
    open_inputs,
    read_chunk,
    read_rows,
    row_chunks,
)
from ram_trl.methods import ChunkContext, MergeMethod, change_mask, get_method, overlap_histogram
from ram_trl.methods.baselines import kth_largest, trim_count
from ram_trl.methods.ram import overlap_ratio, shared_unique

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class AgentStats:
    """One agent's change statistics and the scale RAM-family methods give its unique deltas."""

    name: str
    path: str
    changed: int
    unique: int
    shared: int
    overlap: list[int]  # overlap[k]: changed elements that exactly k other agents changed too
    rho: float | None  # None when undefined (no unique elements)
    lam: float

    @property
    def changed_fraction(self) -> float:
        return self.changed / max(1, self.total)

    total: int = 0  # elements of the floating-point tensors the agent could change


@dataclass
class MergeReport:
    """What a merge did: inputs, method, parameters, per-agent statistics, output, timings."""

    method: str
    params: dict[str, Any]
    base: str
    agents: list[AgentStats]
    total_elements: int
    out: str | None = None
    files: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False
    ram_trl_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for agent, stats in zip(data["agents"], self.agents, strict=True):
            agent["changed_fraction"] = stats.changed_fraction
        return data


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available here")
    return device


def merge(
    base: str | os.PathLike | WeightSource,
    agents: Mapping[str, str | os.PathLike | WeightSource],
    method: str = "ram_plus",
    out: str | os.PathLike | None = None,
    *,
    params: Mapping[str, Any] | Any | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
) -> MergeReport:
    """Merge ``agents`` (name -> model folder or weight source) of ``base`` into ``out``.

    ``params`` holds the method's parameters (e.g. ``{"r": 0.1, "alpha": 2.0}``). The output is
    a ``save_pretrained``-style folder published atomically: it appears complete or not at all.
    With ``dry_run`` every input is validated (headers, shapes, finiteness) and the statistics
    are computed, but nothing is written.
    """
    from ram_trl import __version__
    from ram_trl.io import atomic_directory, parse_size

    spec = get_method(method)
    params = params if dataclasses.is_dataclass(params) else spec.make_params(params)
    out_dtype = parse_dtype(dtype)
    device = resolve_device(device)
    max_shard_bytes = parse_size(shard_size)
    if out is None and not dry_run:
        raise InputError("no output folder given (--out DIR)")
    if out is not None and not dry_run and Path(out).exists() and not overwrite:
        raise OutputExistsError(
            f"output folder {out} already exists; pass --overwrite to replace it"
        )

    started = time.perf_counter()
    with open_inputs(base, agents) as inputs:
        report = MergeReport(
            method=spec.name,
            params=dataclasses.asdict(params),
            base=str(inputs.base.path),
            agents=[],
            total_elements=_float_elements(inputs),
            out=None if dry_run else str(out),
            dry_run=dry_run,
            ram_trl_version=__version__,
        )
        histograms = None
        if spec.needs_counts or dry_run:
            epsilon = getattr(params, "epsilon", 1e-5)
            histograms = count_overlaps(inputs, epsilon, device=device, progress=progress)
            report.seconds["count_pass"] = time.perf_counter() - started
        report.agents = agent_stats(inputs, spec, params, histograms)
        if dry_run:
            report.seconds["total"] = time.perf_counter() - started
            return report

        merging = time.perf_counter()
        with atomic_directory(out, overwrite=overwrite) as tmp:
            report.files = _merge_into(
                tmp, inputs, spec, params, histograms, out_dtype, device, max_shard_bytes, progress
            )
            _write_metadata(tmp, inputs, report, out_dtype)
            report.seconds["merge_pass"] = time.perf_counter() - merging
            report.seconds["total"] = time.perf_counter() - started
            (tmp / "ram_trl_merge.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def count_overlaps(
    inputs: MergeInputs,
    epsilon: float,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "counting",
) -> dict[str, torch.Tensor]:
    """The counting pass: an overlap histogram ``(N, N)`` per floating-point tensor (see
    :func:`~ram_trl.methods.ram.overlap_histogram`). Also validates every value."""
    histograms = {}
    with _progress(inputs, progress, desc) as bar:
        for name in inputs.names:
            info = inputs.base.tensors[name]
            if not is_float_tensor(info):
                bar.update(info.nbytes)
                continue
            hist = torch.zeros((len(inputs.agents),) * 2, dtype=torch.int64)
            for chunk in iter_chunks(inputs, name, device):
                hist += overlap_histogram(change_mask(chunk.deltas, epsilon)).cpu()
            histograms[name] = hist
            bar.update(info.nbytes)
    return histograms


def agent_stats(
    inputs: MergeInputs,
    spec: MergeMethod,
    params: Any,
    histograms: Mapping[str, torch.Tensor] | None,
) -> list[AgentStats]:
    """Per-agent counts over the whole model, with the global rho and the lambda the method uses
    for unique elements (1 for methods without scales; per-tensor scopes report the global one)."""
    n = len(inputs.agents)
    total = _float_elements(inputs)
    if histograms is None:
        return [
            AgentStats(name, str(source.path), 0, 0, 0, [], None, 1.0, total)
            for name, source in inputs.agents.items()
        ]
    hist = sum(histograms.values(), torch.zeros((n, n), dtype=torch.int64))
    shared, unique = shared_unique(hist)
    rho = overlap_ratio(hist)
    lam = spec.scales(hist, params) if spec.scales is not None else torch.ones(n)
    return [
        AgentStats(
            name=name,
            path=str(source.path),
            changed=int(hist[t].sum()),
            unique=int(unique[t]),
            shared=int(shared[t]),
            overlap=[int(x) for x in hist[t]],
            rho=None if unique[t] == 0 else float(rho[t]),
            lam=float(lam[t]),
            total=total,
        )
        for t, (name, source) in enumerate(inputs.agents.items())
    ]


def _merge_into(
    directory: Path,
    inputs: MergeInputs,
    spec: MergeMethod,
    params: Any,
    histograms: Mapping[str, torch.Tensor] | None,
    out_dtype: torch.dtype | None,
    device: torch.device,
    max_shard_bytes: int,
    progress: bool,
) -> list[str]:
    from ram_trl.io import ShardedWriter, TensorSpec

    base_tensors = inputs.base.tensors
    dtypes = {name: out_dtype or base_tensors[name].dtype for name in inputs.names}
    for name, info in base_tensors.items():
        if not is_float_tensor(info):
            dtypes[name] = info.dtype  # integer buffers are copied from the base as they are
    specs = [
        TensorSpec(name, tuple(base_tensors[name].shape), dtypes[name]) for name in inputs.names
    ]
    scales = _scales(inputs, spec, params, histograms)
    with (
        ShardedWriter(directory, specs, max_shard_bytes=max_shard_bytes) as writer,
        _progress(inputs, progress, f"merging ({spec.name})") as bar,
    ):
        for name in inputs.names:
            info = base_tensors[name]
            shape = tuple(info.shape)
            if not is_float_tensor(info):
                for start, stop in row_chunks(shape):
                    writer.write(name, read_rows(inputs.base, name, start, stop))
                bar.update(info.nbytes)
                continue
            keep = params.keep if spec.trims else None
            chunks, thresholds = _chunks(inputs, name, device, keep, sparse=not spec.random)
            for chunk in chunks:
                ctx = ChunkContext(
                    scales=scales(name),
                    thresholds=thresholds,
                    seeds=_seeds(params, inputs, name, chunk.start) if spec.random else (),
                )
                rows = _apply(chunk, spec.rule(chunk.deltas, params, ctx), dtypes[name])
                writer.write(
                    name, rows.reshape((chunk.stop - chunk.start, *shape[1:]) if shape else ())
                )
            bar.update(info.nbytes)
        return [p.name for p in writer.close()]


def _scales(
    inputs: MergeInputs,
    spec: MergeMethod,
    params: Any,
    histograms: Mapping[str, torch.Tensor] | None,
) -> Callable[[str], torch.Tensor | None]:
    """``name -> per-agent lambdas`` (float32) for RAM-family methods, in the requested scope."""
    if spec.scales is None or histograms is None:
        return lambda name: None
    n = len(inputs.agents)
    if getattr(params, "rho_scope", "global") == "tensor":
        per_tensor = {name: spec.scales(h, params).float() for name, h in histograms.items()}
        return per_tensor.__getitem__
    whole_model = spec.scales(
        sum(histograms.values(), torch.zeros((n, n), dtype=torch.int64)), params
    )
    whole_model = whole_model.float()
    return lambda name: whole_model


def _apply(chunk: Chunk, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Base + merged delta in the output dtype. Where the merged delta is exactly zero (and
    outside the chunk's candidates) the base value is kept bit for bit."""
    values = torch.where(merged != 0, chunk.base32 + merged, chunk.base32).to(dtype).cpu()
    if chunk.index is None:
        return values
    rows = chunk.base.to(dtype, copy=True)
    rows[chunk.index] = values
    return rows


def _chunks(
    inputs: MergeInputs, name: str, device: torch.device, keep: float | None, *, sparse: bool
) -> tuple[Iterable[Chunk], torch.Tensor | None]:
    """A tensor's chunks and, when ``keep`` is given, its TIES trim thresholds (per agent, the
    k-th largest |delta|). A tensor that fits in one chunk is read once for both; a larger one
    is swept twice more to find its thresholds in bounded memory."""
    spans = row_chunks(tuple(inputs.base.tensors[name].shape))
    if len(spans) == 1:
        chunks: Iterable[Chunk] = [read_chunk(inputs, name, *spans[0], device, sparse=sparse)]
        sweep: Callable[[], Iterable] = lambda: [_magnitudes(chunks[0])]  # noqa: E731
    else:
        chunks = iter_chunks(inputs, name, device, sparse=sparse)
        sweep = lambda: map(_magnitudes, iter_chunks(inputs, name, device, sparse=sparse))  # noqa: E731
    if keep is None:
        return chunks, None
    k = trim_count(inputs.base.tensors[name].numel, keep)
    return chunks, torch.tensor(kth_largest(sweep, k), dtype=torch.float32, device=device)


def _magnitudes(chunk: Chunk) -> tuple[torch.Tensor, int]:
    """|deltas| at the chunk's candidates, and how many implicit zeros each row has besides."""
    return chunk.deltas.abs(), chunk.numel - chunk.deltas.shape[1]


def _seeds(params: Any, inputs: MergeInputs, name: str, start: int) -> tuple[int, ...]:
    """Seeds for random dropping, derived from (seed, agent, tensor, chunk): reproducible and
    independent of agent order and device."""

    def seed(agent: str) -> int:
        key = f"{params.seed}\0{agent}\0{name}\0{start}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    return tuple(seed(agent) for agent in inputs.agents)


def _float_elements(inputs: MergeInputs) -> int:
    return sum(i.numel for i in inputs.base.tensors.values() if is_float_tensor(i))


def _write_metadata(
    directory: Path, inputs: MergeInputs, report: MergeReport, out_dtype: torch.dtype | None
) -> None:
    from ram_trl.card import render_model_card
    from ram_trl.io import copy_model_files

    copy_model_files(inputs.base.path, directory)
    config = directory / "config.json"
    if out_dtype is not None and config.is_file():  # say the dtype the weights now have
        data = json.loads(config.read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
        data.update(dict.fromkeys(keys, str(out_dtype).removeprefix("torch.")))
        config.write_text(json.dumps(data, indent=2) + "\n")
    (directory / "README.md").write_text(render_model_card(report))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress(inputs: MergeInputs, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    total = sum(info.nbytes for info in inputs.base.tensors.values())
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False)
