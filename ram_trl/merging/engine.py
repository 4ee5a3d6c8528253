"""The streaming merge engine behind ``ram-trl merge`` and :func:`ram_trl.merge`.

The engine streams, asks the method, and writes; what a method computes beforehand (RAM+'s
lambdas, TIES' thresholds, DARE's seeds) is the method's own business (see
:mod:`ram_trl.methods.base`). Memory stays at a few chunks whatever the model size: tensors are
read a row chunk at a time from every input, merged in float32 by the method's rule, and handed to
an output sink (safetensors shards, or a LoRA adapter). I/O cost: ``ram`` and the baselines read
every input byte once. Methods that need overlap counts (RAM+, RAM+s, arm-r-v2) make a counting
pass first, because the paper's rho is a whole-model quantity; on checkpoints it merges every
chunk with lambda = 1 while it counts and keeps that in a spill (:mod:`ram_trl.merging.spill`,
about 9 bytes per changed element), so the merge pass reads only the base and the spill and
scales the unique deltas. Without room for a spill, and for snapshots (counted from their stored
indices), they read every byte twice. TIES reads a tensor larger than one chunk three times
(two sweeps for its exact thresholds). Both passes use the cores: the counting pass counts
chunks on several threads, and the merge reads the next chunk and writes the last one on their
own threads (``threads``, same bytes). Chunks of snapshots are merged by the method's compiled
``merge_stored`` (:mod:`ram_trl.native`) straight from the stored indices and values, each cut
into as many parts of rows as there are threads; without a C compiler, by its ``rule_at``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ram_trl import threads as worker_threads
from ram_trl.errors import InputError, OutputExistsError
from ram_trl.io import (
    TensorSpec,
    WeightSource,
    copy_model_files,
    parse_size,
    read_rows,
)
from ram_trl.merging.chunks import (
    Chunk,
    ReadAhead,
    StoredChunk,
    TensorView,
    chunk_at,
    default_threads,
    finite_bits,
    largest_agents,
    read_chunk,
    resolve_device,
    row_chunks,
    stored_deltas,
)
from ram_trl.merging.counting import agent_stats, count_overlaps
from ram_trl.merging.inputs import (
    MergeInputs,
    check_output_disjoint,
    input_paths,
    is_float_tensor,
    open_inputs,
)
from ram_trl.merging.report import AdapterReport, MergeReport
from ram_trl.merging.sinks import BackgroundSink, ModelSink, OutputSink
from ram_trl.merging.spill import Spill
from ram_trl.merging.split import Split
from ram_trl.methods import CHANGE_EPSILON, MergeMethod, ModelPlan, get_method

#: the output dtypes a user may ask for, by the names they type (not safetensors codes)
OUTPUT_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
REPORT_NAME = "ram_trl_merge.json"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in OUTPUT_DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of: {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[dtype]


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
    lora_rank: int | str | None = None,
    lora_max_error: float | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    split: Split | None = None,
    threads: int | None = None,
) -> MergeReport:
    """Merge ``agents`` (name -> model folder or weight source) of ``base`` into ``out``.

    ``params`` holds the method's parameters (e.g. ``{"r": 0.1, "alpha": 2.0}``). The output is
    a ``save_pretrained``-style folder published atomically: it appears complete or not at all.
    With ``lora_rank`` it is a PEFT LoRA adapter of that rank instead, the merged delta
    re-factorized by truncated SVD, biases and norms carried whole (``ram_trl.lora.LoraSink``);
    ``lora_rank="auto"`` gives each module the smallest rank within ``lora_max_error`` (default
    0.1), and with a fixed rank an error above ``lora_max_error`` is warned about. With
    ``dry_run`` every input is validated (headers, shapes, finiteness) and the statistics are
    computed, but nothing is written. ``extra_files`` (name -> content) join the folder before
    it is published, so that a record a store keeps with its merges (``merge_inputs.json``) is
    never missing from one. ``threads``: how many threads read, count, merge and write at once
    (default ``RAM_TRL_THREADS``, else the usable cores up to 4; 1 runs everything on this
    thread); the output is the same bits whatever the number.

    ``split`` (``Split.from_torch()``, called on every rank of a ``torch.distributed`` job)
    divides the work between the ranks and writes the same folder, byte for byte, but for the
    timings in the card and the report (see :mod:`ram_trl.merging.split`); every rank returns
    the report.
    """
    from ram_trl import __version__

    spec = get_method(method)
    params = params if dataclasses.is_dataclass(params) else spec.make_params(params)
    out_dtype = parse_dtype(dtype)
    device = resolve_device(device)
    max_shard_bytes = parse_size(shard_size)
    split = split or Split()
    progress = progress and split.is_main
    started = time.perf_counter()
    with split.together():  # a bad input on any rank stops every rank here
        if out is None and not dry_run:
            raise InputError("no output folder given (--out DIR)")
        if lora_rank is not None and split.active:
            raise InputError("a LoRA output is not split across ranks: merge it in one process")
        if out is not None and not dry_run:
            check_output_disjoint(out, input_paths(base, agents))
        if out is not None and not dry_run and Path(out).exists() and not overwrite:
            raise OutputExistsError(
                f"output folder {out} already exists; pass --overwrite to replace it"
            )
        inputs = open_inputs(base, agents)

    with inputs, _one_pass_spill(spec, inputs, out, out_dtype, device, split, dry_run) as spill:
        counts = None
        if spec.needs_counts or dry_run:
            epsilon = spec.change_epsilon(params)
            rule = spec.unscaled_rule
            unscaled = None if rule is None else functools.partial(rule, params=params)
            with split.together():
                counts = count_overlaps(
                    inputs, CHANGE_EPSILON if epsilon is None else epsilon, device=device,
                    progress=progress, names=split.counted(inputs), threads=threads,
                    check_values=dry_run or device.type != "cpu",  # else the merge pass does
                    spill=spill, unscaled=unscaled,
                )  # fmt: skip
            counts = split.combine(counts, inputs)
        plan = spec.prepare_model(params, counts)
        report = MergeReport(
            method=spec.name,
            params=dataclasses.asdict(params),
            base=str(inputs.base.path),
            agents=agent_stats(inputs, counts, plan),
            total_elements=inputs.float_elements,
            out=None if dry_run else str(out),
            dry_run=dry_run,
            ram_trl_version=__version__,
            counted=counts is not None,
        )
        if counts is not None:
            report.seconds["count_pass"] = time.perf_counter() - started
            for agent in report.agents:
                if agent.changed == 0 and split.is_main:
                    warnings.warn(
                        f"agent {agent.name!r} ({inputs.agents[agent.name].path}) changed no "
                        "element beyond epsilon: is it the base model?",
                        stacklevel=2,
                    )
        if dry_run:
            report.seconds["total"] = time.perf_counter() - started
            return report

        merging = time.perf_counter()
        specs = _output_specs(inputs, out_dtype)
        share = split.share(inputs, specs, max_shard_bytes)  # None in one process
        with split.publish(out, overwrite=overwrite, share=share) as tmp:
            sink: OutputSink
            if share is not None:
                sink = share.sink(tmp)
            elif lora_rank is None:
                sink = ModelSink.sharded(tmp, specs, max_shard_bytes)
            else:
                from ram_trl.lora import LoraSink

                sink = LoraSink(
                    tmp,
                    specs,
                    rank=lora_rank,
                    base=report.base,
                    out=str(out),
                    max_error=lora_max_error,
                )
            mine = specs if share is None else share.specs
            report.files = merge_into(
                sink, inputs, spec, params, plan, mine, device, progress, threads=threads,
                spill=spill,
            )  # fmt: skip
            if share is not None:
                report.files = share.files
            if lora_rank is not None:
                report.lora = AdapterReport.of(sink.report)  # type: ignore[attr-defined]
            if split.is_main:
                _write_metadata(tmp, inputs, report, out_dtype)
            report.seconds["merge_pass"] = time.perf_counter() - merging
            report.seconds["total"] = time.perf_counter() - started
            if split.is_main:
                (tmp / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
                for name, data in (extra_files or {}).items():
                    (tmp / name).write_bytes(data)
    return report


def _one_pass_spill(
    spec: MergeMethod,
    inputs: MergeInputs,
    out: str | os.PathLike | None,
    out_dtype: torch.dtype | None,
    device: torch.device,
    split: Split,
    dry_run: bool,
) -> Any:
    """A :class:`~ram_trl.merging.spill.Spill` (a context manager) when the merge can be one
    pass over the agents: a method that merges while it counts (``unscaled_rule``), on the CPU,
    in one process, from checkpoints. Snapshots are counted from their stored indices, which
    costs less than any spill. Otherwise, or when no spill can be made, ``nullcontext(None)``."""
    one_pass = spec.needs_counts and spec.unscaled_rule is not None and out is not None
    one_pass = one_pass and not dry_run and device.type == "cpu" and not split.active
    if not one_pass or any(hasattr(a, "changed_rows") for a in inputs.agents.values()):
        return nullcontext(None)
    try:
        return Spill.beside(out, sum(s.nbytes for s in _output_specs(inputs, out_dtype)))
    except OSError:  # no room or no right to write there: two passes (writing out will say why)
        return nullcontext(None)


def _output_specs(inputs: MergeInputs, out_dtype: torch.dtype | None) -> list[TensorSpec]:
    """The output's tensors: the base's, floating-point ones in ``out_dtype`` when given
    (integer buffers are copied from the base as they are)."""
    specs = []
    for name in inputs.names:
        info = inputs.base.tensors[name]
        dtype = out_dtype if out_dtype is not None and is_float_tensor(info) else info.dtype
        specs.append(TensorSpec(name, tuple(info.shape), dtype))
    return specs


def merge_into(
    sink: OutputSink,
    inputs: MergeInputs,
    spec: MergeMethod,
    params: Any,
    plan: ModelPlan,
    specs: list[TensorSpec],
    device: torch.device,
    progress: bool,
    *,
    threads: int | None = None,
    spill: Spill | None = None,
) -> list[str]:
    """Merge every tensor into ``sink`` and close it; returns the files it wrote.

    Tensors are merged one at a time in ``specs`` order (any subset of the model's). With
    ``threads`` > 1 (default: :func:`~ram_trl.merging.chunks.default_threads`) the next chunk is
    read on one thread and the last one written on another while this one is merged; the bytes
    are the same as with one thread. Tensors the counting pass already merged into ``spill``
    are read from it and the base, and only rescaled here.
    """
    threads = default_threads() if threads is None else threads
    if threads > 1:
        worker_threads.prepare()
        sink = BackgroundSink(sink)
    spilled = {out.name for out in specs if spill is not None and spill.holds(out.name)}
    pool = ThreadPoolExecutor(threads - 1, "ram-trl-merge") if threads > 1 else None
    ahead: Any = nullcontext()
    if threads > 1:
        names = [out.name for out in specs if out.name not in spilled]
        ahead = ReadAhead(inputs, names, stored=spec.rule_at is not None)
    try:
        with ahead, inputs.progress(progress, f"merging ({spec.name})") as bar:
            for out in specs:
                name, shape = out.name, out.shape
                info = inputs.base.tensors[name]
                if not is_float_tensor(info):
                    for start, stop in row_chunks(shape):
                        rows = read_rows(inputs.base, name, start, stop)
                        sink.write(name, rows, rows)
                    bar.update(info.nbytes)
                    continue
                merged_chunks = (
                    _replayed(inputs, spec, plan, name, spill)  # type: ignore[arg-type]
                    if name in spilled
                    else _merged(inputs, spec, params, plan, name, device, out.dtype, pool, threads)
                )
                for chunk, merged in merged_chunks:
                    apply = _apply_stored if isinstance(chunk, StoredChunk) else _apply
                    rows = apply(chunk, merged, out.dtype)
                    if not isinstance(rows, torch.Tensor):
                        failed, at = (chunk, merged) if rows is None else rows
                        raise _non_finite_result(inputs, spec, params, name, failed, at, out)
                    rows = rows.reshape((chunk.stop - chunk.start, *shape[1:]) if shape else ())
                    sink.write(name, rows, chunk.base)
                bar.update(info.nbytes)
        return sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def _merged(
    inputs: MergeInputs,
    spec: MergeMethod,
    params: Any,
    plan: ModelPlan,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    pool: ThreadPoolExecutor | None = None,
    threads: int = 1,
) -> Iterator[tuple[Chunk | StoredChunk, Any]]:
    """Each chunk of tensor ``name`` with its merged delta, read from the inputs: a
    :class:`Chunk` with the merged delta at its elements, or a :class:`StoredChunk` (sparse
    snapshots) with the output rows in ``dtype`` (the method's compiled ``merge_stored``) or
    else its ``rule_at`` result, per agent."""
    tensor = TensorView(inputs, name, device, stored=spec.rule_at is not None)
    for read, ctx in spec.prepare_tensor(params, plan, tensor):
        if isinstance(read, StoredChunk):
            rows = _merged_stored(spec, read, params, ctx, dtype, pool, threads)
            if rows is not None:
                yield read, rows
                continue
            read = stored_deltas(inputs, name, read)  # checked: says what the kernel found
            yield read, spec.rule_at(read.changes, read.numel, params, ctx)  # type: ignore[misc]
        else:
            yield read, spec.rule(read.deltas, params, ctx)


#: a chunk of snapshots is merged on several threads from this many elements on
SPLIT_ELEMENTS = 1 << 18


def _merged_stored(
    spec: MergeMethod,
    chunk: StoredChunk,
    params: Any,
    ctx: Any,
    dtype: torch.dtype,
    pool: ThreadPoolExecutor | None,
    threads: int,
) -> torch.Tensor | None:
    """The method's compiled ``merge_stored`` of ``chunk``: the output rows, or None (then
    ``rule_at`` runs). With a ``pool``, a large chunk is cut into ``threads`` parts of
    consecutive rows, one for this thread and the others for the pool's, merged into one
    output at once: the kernel is bound by a core's arithmetic and cache latency, not by
    memory bandwidth, so the cores add up."""
    merge = spec.merge_stored
    if merge is None:
        return None
    if pool is None or chunk.numel < SPLIT_ELEMENTS:
        return merge(chunk, params, ctx, dtype)
    pieces = chunk.split(threads)
    out = torch.empty(chunk.numel, dtype=dtype)
    views = out.split([piece.numel for piece in pieces])
    done = [
        pool.submit(merge, piece, params, ctx, dtype, view)
        for piece, view in zip(pieces[1:], views[1:], strict=True)
    ]
    results = [merge(pieces[0], params, ctx, dtype, views[0])] + [f.result() for f in done]
    return out if all(rows is not None for rows in results) else None


def _replayed(
    inputs: MergeInputs, spec: MergeMethod, plan: ModelPlan, name: str, spill: Spill
) -> Iterator[tuple[Chunk, torch.Tensor]]:
    """Each chunk of tensor ``name`` with its merged delta, from what the counting pass merged
    (``spill``) and the base, the plan's scales applied now."""
    for start, stop in row_chunks(tuple(inputs.base.tensors[name].shape)):
        positions, merged, owners = spill.take(name, start)
        base = read_rows(inputs.base, name, start, stop).reshape(-1)
        yield chunk_at(start, stop, base, positions), spec.rescale(merged, owners, plan, name)


def _apply(chunk: Chunk, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Base + merged delta in the output dtype. Where the merged delta is exactly zero (and
    outside the chunk's candidates) the base value is kept bit for bit.

    None if a value written would be NaN or Inf. The inputs are finite (``read_chunk`` checks),
    so that is an overflow of the method's arithmetic or of the output dtype, and writing it
    would publish a broken model. The check reads the exponent bits of the values computed
    (and of the whole chunk when the dtype changes), which costs little next to the merge.
    """
    values = torch.where(merged != 0, chunk.base32 + merged, chunk.base32).to(dtype).cpu()
    if not finite_bits(values):
        return None
    if chunk.index is None:
        return values
    rows = chunk.base.to(dtype, copy=True)
    if dtype != chunk.base.dtype and not finite_bits(rows):
        return None
    rows.index_copy_(0, chunk.index, values)  # ~40x faster than rows[index] = values
    return rows


def _apply_stored(
    chunk: StoredChunk,
    merged: torch.Tensor | list[tuple[torch.Tensor | None, torch.Tensor]],
    dtype: torch.dtype,
) -> torch.Tensor | tuple[Chunk, torch.Tensor]:
    """:func:`_apply` for a :class:`StoredChunk` and its ``rule_at`` result: the base, and
    each agent's merged deltas applied at the positions it changed (a shared position is
    written once per agent, with the same value). When a value would not be finite, the
    :class:`Chunk` and merged deltas where it happened, for the error. Rows the compiled
    ``merge_stored`` made are the result already."""
    if isinstance(merged, torch.Tensor):
        return merged
    rows = chunk.base.to(dtype, copy=True)
    if dtype != chunk.base.dtype and not finite_bits(rows):  # the base does not fit ``dtype``
        every = torch.arange(chunk.numel)
        return chunk_at(chunk.start, chunk.stop, chunk.base, every), torch.zeros(chunk.numel)
    for (positions, _), base32, (keep, deltas) in zip(
        chunk.changes or [], chunk.base32 or [], merged, strict=True
    ):
        if keep is not None:
            positions, base32 = positions.index_select(0, keep), base32.index_select(0, keep)
        values = torch.where(deltas != 0, base32 + deltas, base32).to(dtype)
        if not finite_bits(values):
            return chunk_at(chunk.start, chunk.stop, chunk.base, positions), deltas
        rows.index_copy_(0, positions, values)
    return rows


def _non_finite_result(
    inputs: MergeInputs,
    spec: MergeMethod,
    params: Any,
    name: str,
    chunk: Chunk,
    merged: torch.Tensor,
    out: TensorSpec,
) -> InputError:
    """The error for a chunk whose result is not finite: the tensor, the rows, the method and
    its parameters, and the agents whose deltas are largest there (the likely culprits)."""
    values = chunk.base32 + merged
    bad = ~torch.isfinite(values.to(out.dtype).float())
    deltas = chunk.deltas
    if deltas.shape[1] != merged.numel():  # merged from a StoredChunk: read the deltas there
        whole = read_chunk(inputs, name, chunk.start, chunk.stop, sparse=False)
        deltas = whole.deltas[:, chunk.index]
    agents = largest_agents(inputs, deltas[:, bad.to(deltas.device)])
    cause = f"overflows {out.dtype}" if bool(torch.isfinite(values).all()) else "is not finite"
    shown = dataclasses.asdict(params)
    return InputError(
        f"tensor {name!r}, rows {chunk.start}-{chunk.stop}: the {spec.name} result {cause} "
        f"at {int(bad.sum())} element(s) (too large; parameters {shown}; largest deltas "
        f"from {agents}); refusing to write non-finite weights: use smaller parameters "
        "or a wider --dtype"
    )


def _write_metadata(
    directory: Path, inputs: MergeInputs, report: MergeReport, out_dtype: torch.dtype | None
) -> None:
    """Config, generation config and tokenizer of the base (the dtype updated), and the card."""
    from ram_trl.merging.card import render_model_card

    copy_model_files(inputs.base.path, directory)
    config = directory / "config.json"
    if out_dtype is not None and config.is_file():  # say the dtype the weights now have
        data = json.loads(config.read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]
        data.update(dict.fromkeys(keys, str(out_dtype).removeprefix("torch.")))
        config.write_text(json.dumps(data, indent=2) + "\n")
    (directory / "README.md").write_text(render_model_card(report))
