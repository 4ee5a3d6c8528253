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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ram_trl.errors import InputError, RAMError
from ram_trl.lora import is_peft_model, root_module
from ram_trl.training.weights import (
    Reordered,
    StreamedWeights,
    TakenWeights,
    base_rename,
    base_specs,
    cast_stream,
    iter_state,
    live_stream,
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
    started = time.perf_counter()
    if not main:
        for _ in live_stream(model, main=False, dtype=dtype):
            pass  # the gathers
        return None, time.perf_counter() - started
    peft = is_peft_model(model)
    path = _publish(
        store,
        agent,
        step,
        base,
        list(base_specs(model)),
        lambda view: trained_weights(model, view, main=main, dtype=dtype),
        epsilon=epsilon,
        metrics=metrics,
        replace=replace,
        peft=peft,
    )
    return path, time.perf_counter() - started


def _publish(
    store: Any,
    agent: str,
    step: int,
    base: str | os.PathLike,
    order: list[str],
    weights: Callable[[Any], StreamedWeights],
    *,
    epsilon: float,
    metrics: dict[str, float] | None,
    replace: bool,
    peft: bool,
) -> Path:
    """Stream ``weights(base)`` (the trained side, as a weight source over the base's names)
    against ``base`` into the store, as ``agent``'s ``step``."""
    from ram_trl.io import ModelFolder
    from ram_trl.snapshot import snapshot_folders

    with ModelFolder(base) as folder:
        base_view = Reordered(folder, order)
        tuned = weights(base_view)

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
        if tuned.extra and not peft:
            raise InputError(f"the trained model has tensors theta_0 lacks: {tuned.extra[:5]}")
    return path


class BackgroundSnapshots:
    """Snapshots written by a background thread, one in flight at a time, so that training
    pauses only for a copy of its weights.

    :meth:`submit` (every rank; collective under ZeRO-3/FSDP2) first waits for the previous
    snapshot, whose buffers it is about to overwrite (that wait is part of the pause, and
    :meth:`submit` reports it), then copies the step's weights (:class:`TakenWeights`), and on
    ``main`` hands comparing, encoding, writing, fsync and the store's atomic publish to the
    thread. The thread never reads the live model, so what it publishes is the submitted step's
    weights, whatever training does meanwhile. Memory: the one copy of the weights, plus what a
    synchronous snapshot holds (one tensor's delta). The heavy work (numpy/torch kernels, file
    writes, hashing) runs without the GIL, so the thread costs training little Python time.

    A failure in the thread is kept and raised by the next :meth:`result` (the next poll,
    snapshot or train end) as one error naming the agent and step.
    """

    def __init__(self) -> None:
        self.taken = TakenWeights()
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future[Any] | None = None
        self._label = ""

    @property
    def busy(self) -> bool:
        """A snapshot was submitted and its result not yet taken."""
        return self._future is not None

    def done(self) -> bool:
        return self._future is not None and self._future.done()

    def submit(
        self,
        model: nn.Module,
        job: Callable[[TakenWeights], Any] | None,
        label: str,
        *,
        dtype: torch.dtype | None = None,
    ) -> float:
        """Copy ``model``'s weights and run ``job(taken)`` in the thread (``job`` None: not the
        main rank, only the gathers). The previous result must have been taken (:meth:`result`).
        Returns the seconds spent copying."""
        if self._future is not None:
            raise RuntimeError("BackgroundSnapshots.submit: take the previous result first")
        started = time.perf_counter()
        self.taken.take(model, main=job is not None, dtype=dtype)
        seconds = time.perf_counter() - started
        if job is not None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="ram-trl-snapshot")
            self._future, self._label = self._pool.submit(job, self.taken), label
        return seconds

    def result(self) -> Any:
        """Wait for the snapshot in flight; what its job returned (None when none is)."""
        future, self._future = self._future, None
        if future is None:
            return None
        try:
            return future.result()
        except RAMError as e:  # one line, as the same error in the training path would be
            raise type(e)(f"background snapshot of {self._label} failed: {e}") from None
        except Exception as e:
            message = f"background snapshot of {self._label} failed: {type(e).__name__}: {e}"
            raise RuntimeError(message) from e

    def close(self) -> Any:
        """:meth:`result`, then stop the thread."""
        try:
            return self.result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def publish_taken(
    store: Any,
    agent: str,
    step: int,
    base: str | os.PathLike,
    taken: TakenWeights,
    *,
    epsilon: float,
    replace: bool = False,
) -> Path:
    """:func:`snapshot_model` of weights taken earlier (what a :class:`BackgroundSnapshots`
    thread runs)."""
    return _publish(
        store,
        agent,
        step,
        base,
        taken.order,
        taken.weights,
        epsilon=epsilon,
        metrics=None,
        replace=replace,
        peft=taken.peft,
    )
