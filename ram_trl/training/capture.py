"""theta_0 and task-vector snapshots of a model in training, streamed tensor by tensor.

theta_0 lives on disk, never as a second copy in memory: either the user's base checkpoint, or
``<store>/base/``, which the first job of a store writes from its model at train begin (and every
later or resumed job reuses, after checking its fingerprint). A snapshot then streams the live
tensors against that folder through :func:`ram_trl.snapshot.snapshot_folders`, so rank 0 holds
one tensor of each at a time (plus, under ZeRO-3, one gathered module).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ram_trl.errors import InputError
from ram_trl.lora import is_peft_model, root_module
from ram_trl.training.weights import (
    Reordered,
    base_rename,
    base_specs,
    cast_stream,
    iter_state,
    trained_weights,
)

BASE_DIR = "base"


def write_base(
    folder: Path,
    model: nn.Module,
    tokenizer: Any | None,
    *,
    main: bool,
    shard_size: str = "5GB",
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``model``'s current base weights (theta_0; for PEFT the frozen base layers) as a
    ``save_pretrained``-style folder at ``folder``, atomically, with config and tokenizer so that
    merged models built on it load with ``from_pretrained``. Collective under ZeRO-3/FSDP: call
    on every rank; only ``main`` writes. ``dtype``: store the weights in it (the checkpoints'
    dtype, ``RAMConfig.snapshot_dtype``)."""
    from ram_trl.io import ShardedWriter, TensorSpec, atomic_directory, parse_size

    specs = [TensorSpec(n, shape, dt) for n, (shape, dt) in base_specs(model, dtype).items()]
    stream = cast_stream(
        iter_state(root_module(model), rename=base_rename(model), main=main), dtype
    )
    if not main:
        for _ in stream:
            pass
        return
    with atomic_directory(folder) as tmp:
        with ShardedWriter(tmp, specs, max_shard_bytes=parse_size(shard_size)) as writer:
            for name, tensor in stream:
                writer.write(name, tensor.contiguous())
        root = root_module(model)
        root.config.save_pretrained(tmp)
        if getattr(root, "generation_config", None) is not None:
            root.generation_config.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)


def snapshot_model(
    store: Any,
    agent: str,
    step: int,
    model: nn.Module,
    base: str | os.PathLike,
    *,
    epsilon: float,
    metrics: dict[str, float] | None = None,
    replace: bool = False,
    main: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[Path | None, float]:
    """Publish the task vector of ``model`` against ``base`` as ``agent``'s ``step`` in
    ``store`` (on ``main``; the others only take part in the gathers). Returns the path (None
    off ``main``) and the seconds it took. ``dtype``: compare (and store) the model's weights
    cast to it, as a checkpoint saved in that dtype holds them."""
    from ram_trl.io import ModelFolder
    from ram_trl.snapshot import snapshot_folders

    started = time.perf_counter()
    with ModelFolder(base) as folder:
        order = list(base_specs(model))
        base_view = Reordered(folder, order)
        tuned = trained_weights(model, base_view, main=main, dtype=dtype)
        if not main:
            tuned.drain()
            return None, time.perf_counter() - started

        def write(directory: Path) -> None:
            snapshot_folders(
                base_view,
                tuned,
                directory,
                epsilon=epsilon,
                agent=agent,
                step=step,
                metrics=metrics,
            )

        try:
            path = store.put(write, agent, step, replace=replace)
        finally:
            tuned.drain()
        if tuned.extra and not is_peft_model(model):
            raise InputError(f"the trained model has tensors theta_0 lacks: {tuned.extra[:5]}")
    return path, time.perf_counter() - started
