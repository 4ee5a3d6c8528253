"""A merge split across the ranks of a ``torch.distributed`` job, bit-identical to one process.

``torchrun --nproc-per-node K -m ram_trl merge ...`` and the in-process merge of a multi-GPU
training job run :func:`ram_trl.merge` on every rank with a :class:`Split`. Every rank computes
the same plan from the inputs' headers: which rank owns which tensor (:func:`owners`: the
tensors in on-disk order cut into K contiguous runs of about equal bytes) and the output's
shard layout (``plan_shards``, as one process would write it). Then:

1. the counting pass (RAM+'s whole-model rho) counts each rank's tensors, and one
   ``all_reduce`` of the per-tensor overlap histograms (one int64 tensor) gives every rank the
   counts of the whole model, so every rank makes the same plan (lambdas, TIES and DARE need no
   counts; DARE's seeds depend on the tensor name and row, not on who merges it);
2. rank 0 creates the hidden temporary folder and lays out every shard file (header, final
   size, index: :func:`ram_trl.io.parts.lay_out`); each rank merges its tensors and writes them
   at their offsets, so the files are those of a single-process merge byte for byte;
3. rank 0 writes the config, tokenizer, card and report, and publishes the folder atomically
   once every rank has said it succeeded.

Failures: each phase ends with :meth:`Split.together`, one all-reduced flag; when it is set,
the ranks exchange their error messages and every rank raises (the failing one its own error,
the others a :class:`~ram_trl.errors.RankError` naming the rank and its message), and rank 0
removes the temporary folder. No rank is left waiting at a collective; a rank that dies outright
is caught by the process group's timeout. Between two agreements a rank runs no collective.

Not split: a LoRA output (refused with several ranks: the re-factorization writes one adapter).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from ram_trl.errors import RAMError, RankError
from ram_trl.io import TensorSpec, atomic_directory, plan_shards, shard_names
from ram_trl.io.checkpoint import INDEX_NAME
from ram_trl.io.parts import RegionWriter, lay_out
from ram_trl.merging.inputs import MergeInputs, is_float_tensor
from ram_trl.merging.sinks import ModelSink
from ram_trl.methods import OverlapCounts

T = TypeVar("T")

#: seconds a collective of a split merge launched by ``ram-trl merge`` may wait for a rank
DEFAULT_TIMEOUT = 1800.0


def owners(sizes: Sequence[tuple[str, int]], world: int) -> dict[str, int]:
    """Tensor -> rank: ``sizes`` (name, bytes, in order) cut into ``world`` contiguous runs of
    about equal bytes (a tensor goes to the rank whose share holds its middle byte). The same
    on every rank; contiguous, so each rank reads and writes few regions of each file."""
    total = sum(size for _, size in sizes)
    out, before = {}, 0
    for name, size in sizes:
        middle = before + size / 2
        out[name] = min(world - 1, int(middle * world / total)) if total else 0
        before += size
    return out


@dataclass
class Share:
    """This rank's part of a split merge's output: its tensors (``specs``), the whole output's
    shard files (``layout``: file -> tensors, as one process writes them) and their names."""

    specs: list[TensorSpec]
    layout: dict[str, list[TensorSpec]]

    @property
    def files(self) -> list[str]:
        """The files of the whole output, as ``ShardedWriter.close`` lists them."""
        index = [INDEX_NAME] if len(self.layout) > 1 else []
        return [*self.layout, *index]

    def sink(self, directory: Path) -> ModelSink:
        """This rank's tensors, written in place into the laid-out files."""
        return ModelSink(RegionWriter(directory, self.layout, {s.name for s in self.specs}))


@dataclass(frozen=True)
class Split:
    """This process's place in a merge split across ``world`` ranks (``world == 1``: one
    process, and every method here does what a plain merge does)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_torch(cls) -> Split:
        """The default ``torch.distributed`` process group's ranks, or one process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- who does what ----------------------------------------------------------------------

    def _owners(self, inputs: MergeInputs) -> dict[str, int]:
        tensors = inputs.base.tensors
        return owners([(name, tensors[name].nbytes) for name in inputs.names], self.world)

    def counted(self, inputs: MergeInputs) -> list[str] | None:
        """The tensors this rank counts (None: all of them)."""
        if not self.active:
            return None
        return [name for name, rank in self._owners(inputs).items() if rank == self.rank]

    def share(
        self, inputs: MergeInputs, specs: Sequence[TensorSpec], max_shard_bytes: int
    ) -> Share | None:
        """This rank's part of the output ``specs`` (None for one process)."""
        if not self.active:
            return None
        plan = plan_shards(list(specs), max_shard_bytes) or [[]]
        layout = dict(zip(shard_names(len(plan)), plan, strict=True))
        mine = self._owners(inputs)
        return Share([s for s in specs if mine[s.name] == self.rank], layout)

    # -- collectives ------------------------------------------------------------------------

    def _device(self) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def combine(self, counts: OverlapCounts, inputs: MergeInputs) -> OverlapCounts:
        """Every rank's histograms summed, in one ``all_reduce``: the whole model's counts, per
        tensor in on-disk order (as one process counts them)."""
        if not self.active:
            return counts
        import torch.distributed as dist

        names = [n for n in inputs.names if is_float_tensor(inputs.base.tensors[n])]
        n = counts.agents
        stacked = torch.zeros((len(names), n, n), dtype=torch.int64)
        for i, name in enumerate(names):
            if name in counts.tensors:
                stacked[i] = counts.tensors[name]
        stacked = stacked.to(self._device())
        dist.all_reduce(stacked)
        stacked = stacked.cpu()
        return OverlapCounts(n, {name: stacked[i] for i, name in enumerate(names)})

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Run the block on every rank, then agree: if it raised on any rank, it raises on
        every rank (the failing rank's own error; elsewhere a RankError with its message)."""
        if not self.active:
            yield
            return
        try:
            yield
        except BaseException as error:
            self._agree(error)
            raise
        self._agree(None)

    def _agree(self, error: BaseException | None) -> None:
        import torch.distributed as dist

        flag = torch.tensor([0 if error is None else 1], device=self._device())
        dist.all_reduce(flag)
        if int(flag.item()) == 0:
            return
        messages: list[Any] = [None] * self.world
        dist.all_gather_object(messages, None if error is None else _describe(error))
        if error is None:
            rank = next(r for r, m in enumerate(messages) if m is not None)
            raise RankError(f"rank {rank} of {self.world} failed: {messages[rank]}")

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 and its (picklable) result on every rank; its error raises on
        every rank. How decisions that depend on shared state are made once for all ranks."""
        if not self.active:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = (fn(), None)
            except BaseException as e:
                error, box[0] = e, (None, _describe(e))
        dist.broadcast_object_list(box, src=0, device=self._device())
        if error is not None:
            raise error
        value, failure = box[0]
        if failure is not None:
            raise RankError(f"rank 0 of {self.world} failed: {failure}")
        return value

    # -- the output folder ------------------------------------------------------------------

    @contextlib.contextmanager
    def publish(
        self, out: str | os.PathLike, *, overwrite: bool, share: Share | None
    ) -> Iterator[Path]:
        """:func:`~ram_trl.io.atomic.atomic_directory` for every rank: rank 0 creates the
        temporary folder and lays out ``share``'s files, every rank writes into it, and rank 0
        publishes it when the block succeeded on every rank (else removes it)."""
        if not self.active:
            with atomic_directory(out, overwrite=overwrite) as tmp:
                yield tmp
            return
        folder = atomic_directory(out, overwrite=overwrite) if self.is_main else None

        def enter() -> str:
            assert folder is not None
            tmp = folder.__enter__()
            try:
                if share is not None:
                    lay_out(tmp, share.layout)
            except BaseException as error:
                _leave(folder, error)
                raise
            return str(tmp)

        tmp = Path(self.on_main(enter))
        try:
            with self.together():
                yield tmp
        except BaseException as error:
            if folder is not None:
                _leave(folder, error)  # removes the temporary, raises (an OSError as OutputError)
            raise
        self.on_main(lambda: _leave(folder, None))


def _leave(folder: Any, error: BaseException | None) -> None:
    if error is None:
        folder.__exit__(None, None, None)
    else:
        folder.__exit__(type(error), error, error.__traceback__)


def _describe(error: BaseException) -> str:
    """An error as the other ranks report it: a ram-trl error by its message, anything else
    (a bug, an interrupt) with its type too."""
    if isinstance(error, RAMError):
        return str(error)
    if isinstance(error, OSError):
        from ram_trl.errors import describe_os_error

        return describe_os_error(error)
    return f"{type(error).__name__}: {error}"


def init_from_env(device: str | None = None, timeout: float | None = None) -> bool:
    """Start the default process group when launched by torchrun / accelerate (``WORLD_SIZE``
    > 1) and none is up: NCCL for a CUDA ``device``, else gloo; collectives give up after
    ``timeout`` seconds (``RAM_TRL_DIST_TIMEOUT``, default 30 min). Returns whether this call
    started it (its caller then destroys it)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    seconds = timeout or float(os.environ.get("RAM_TRL_DIST_TIMEOUT", DEFAULT_TIMEOUT))
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=seconds))
    return True
