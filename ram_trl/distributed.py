"""What one rank holds of a model in training, and how the ranks wait for each other.

A live model's tensors are whole on every rank (single process, DDP, ZeRO-1/2) or partitioned:
DeepSpeed ZeRO-3 parameters (``ds_id``; gathered one module at a time with
``GatheredParameters``) and FSDP2 / tensor-parallel ``DTensor`` shards (``full_tensor()``).
Both gathers are collective: every rank must make them, in the same order. This module names
those cases once, for the LoRA deltas of a live model (:mod:`ram_trl.lora.live`) and the weight
streams of training (:mod:`ram_trl.training.weights`), and says which rank is the main one.

It imports torch only; deepspeed and accelerate are imported when a model or a run uses them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` wrappers."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def is_zero3(t: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: partitioned across ranks."""
    return hasattr(t, "ds_id")


def is_dtensor(t: torch.Tensor) -> bool:
    """An FSDP2 / tensor-parallel shard (checked by name: no torch.distributed import needed)."""
    return type(t).__name__ == "DTensor"


def is_sharded(model: nn.Module) -> bool:
    """ZeRO-3 or FSDP2: no rank holds whole tensors, so reading them is collective."""
    return any(is_zero3(p) or is_dtensor(p) for p in model.parameters())


@contextmanager
def gathered(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Gather the ZeRO-3 partitioned ones of ``params`` for the block (collective)."""
    partitioned = [p for p in params if is_zero3(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` shard (collective), else ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


@dataclass(frozen=True)
class Ranks:
    """This process's place in a job: whether it is the main rank, and a barrier."""

    is_main: bool = True
    barrier: Callable[[], None] = lambda: None

    @classmethod
    def from_torch(cls) -> Ranks:
        """From ``torch.distributed`` when a process group is up (torchrun, accelerate, a
        hand-written loop), else a single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank() == 0, dist.barrier)

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> Ranks:
        """From an ``accelerate.Accelerator`` (what a ``transformers.Trainer`` runs on)."""
        return cls(accelerator.is_main_process, accelerator.wait_for_everyone)
