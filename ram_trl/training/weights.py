"""The weights of the model being trained, one tensor at a time, whatever the parallelism.

A snapshot compares every tensor of the live model with theta_0. How to see a full tensor
depends on how training shards it:

* single process / DDP: the module's own tensors (no copy; a DDP wrapper is never involved,
  since ``trainer.model`` is the bare module);
* DeepSpeed ZeRO-3: each parameter is gathered with ``GatheredParameters``, one at a time,
  copied to CPU on rank 0 and released;
* FSDP2: each ``DTensor`` is materialized with ``full_tensor()``, one at a time
  (:mod:`ram_trl.distributed` names these cases).

The last two are collective: every rank must iterate :func:`iter_state` to its end, in the same
order, even though only rank 0 uses the tensors (the others get ``None``).

PEFT models: the base weights (theta_0) are the frozen ``base_layer`` / ``original_module``
tensors under the base checkpoint's names; the trained weights are base + the LoRA deltas of
:func:`ram_trl.lora.lora_deltas`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ram_trl.distributed import full, gathered, is_dtensor, is_zero3, unwrap
from ram_trl.errors import InputError
from ram_trl.lora import base_weight_name, is_peft_model, root_module

_PEFT_ONLY = re.compile(r"(^|\.)(lora_[A-Za-z_]+|modules_to_save)\.")


def _entries(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``state_dict`` names and tensors, unique by identity (tied weights once, first name),
    without materializing anything: ZeRO-3 parameters are still partitioned here."""
    seen: set[int] = set()
    for prefix, mod in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        tensors = list(mod._parameters.items())
        tensors += [
            (n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set
        ]
        for name, t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield dot + name, t


def policy_of(model: nn.Module) -> nn.Module:
    """The policy inside an RL wrapper that also holds a value model, else ``model`` itself.

    PPO trains a value head beside the policy, and only the policy is an agent: its task vector
    and theta_0 must not hold the value (or reward) model, which the base never had. Recognized:
    TRL's ``PolicyAndValueWrapper`` (``.policy`` and ``.value_model``; the PPO trainer of TRL
    0.12-1.12, in ``trl.experimental.ppo`` from 0.26) and ``AutoModelForCausalLMWithValueHead``
    (``.pretrained_model`` and ``.v_head``; TRL <= 0.11), inside DDP or not. A hand-written loop
    passes its policy module.
    """
    inner = unwrap(model)
    if hasattr(inner, "policy") and hasattr(inner, "value_model"):
        return inner.policy
    if hasattr(inner, "pretrained_model") and hasattr(inner, "v_head"):
        return inner.pretrained_model
    return model


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))


def iter_state(
    module: nn.Module, *, rename: Callable[[str], str | None] = lambda n: n, main: bool = True
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(name, full tensor)`` for every tensor of ``module``; ``rename`` maps a name to the
    name to yield, or None to skip it. Collective under ZeRO-3/FSDP2 (see the module docstring):
    run it to the end on every rank; ranks with ``main=False`` get ``None`` tensors."""
    for raw, t in _entries(module):
        name = rename(raw)
        if name is None:
            continue
        if is_zero3(t):
            with gathered([t]):
                yield name, t.detach().to("cpu", copy=True) if main else None
        elif is_dtensor(t):
            whole = full(t)
            yield name, whole.detach().cpu() if main else None
        else:
            yield name, t.detach() if main else None


def base_rename(model: nn.Module) -> Callable[[str], str | None]:
    """For a PEFT model: keep the frozen base tensors under the base checkpoint's names."""
    if not is_peft_model(model):
        return lambda n: n
    return lambda n: None if _PEFT_ONLY.search(n) else base_weight_name(n)


def base_specs(
    model: nn.Module, dtype: torch.dtype | None = None
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of theta_0's tensors, in model order, without gathering; with
    ``dtype``, floating-point tensors are listed in it (see :func:`cast_stream`)."""
    root, rename = root_module(model), base_rename(model)
    return {
        n: (shape_of(t), dtype if dtype is not None and t.is_floating_point() else t.dtype)
        for raw, t in _entries(root)
        if (n := rename(raw))
    }


def cast_stream(
    stream: Iterator[tuple[str, torch.Tensor | None]], dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """The floating-point tensors of ``stream`` in ``dtype`` (the dtype checkpoints are
    stored in; rounding, as ``save_pretrained`` of a cast model does), the others as they are."""
    for name, t in stream:
        cast = dtype is not None and t is not None and t.is_floating_point()
        yield name, t.to(dtype) if cast else t


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str = ""


class Reordered:
    """A weight source (e.g. a ``ModelFolder``) whose ``tensors`` are listed in another order,
    so that a snapshot reads the base in the order the live model streams its tensors."""

    def __init__(self, source: Any, order: list[str]):
        self.source, self.path, self.config = source, source.path, source.config
        first = [n for n in order if n in source.tensors]
        self.tensors = {n: source.tensors[n] for n in first}
        self.tensors.update({n: i for n, i in source.tensors.items() if n not in self.tensors})

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.source.read(name, start, stop)


class StreamedWeights:
    """The trained model as a weight source, fed by a ``(name, tensor)`` stream.

    ``read(name)`` pulls from the stream until ``name`` arrives; tensors that arrive early wait
    in a buffer, so memory stays at one tensor when the reader follows the stream's order (see
    :class:`Reordered`). ``combine(name, streamed)`` turns a streamed tensor into the weight
    (PEFT: base + delta); ``missing(name)`` gives a weight the stream never yields (PEFT: the
    unchanged base tensor); without it a missing tensor is an error.
    """

    def __init__(
        self,
        stream: Iterator[tuple[str, torch.Tensor | None]],
        tensors: dict[str, _Info],
        *,
        label: str,
        combine: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        missing: Callable[[str], torch.Tensor] | None = None,
    ):
        self.path, self.config, self.tensors = Path(label), None, tensors
        self._stream, self._combine, self._missing = stream, combine, missing
        self._pending: dict[str, torch.Tensor] = {}
        self._name: str | None = None
        self._tensor: torch.Tensor | None = None
        self.extra: list[str] = []  # streamed names that no reader asked for

    def _get(self, name: str) -> torch.Tensor:
        if name == self._name:
            assert self._tensor is not None
            return self._tensor
        self._name, self._tensor = None, None
        tensor = self._pending.pop(name, None)
        while tensor is None:
            item = next(self._stream, None)
            if item is None:
                break
            got, t = item
            if got == name:
                tensor = t
            else:
                self._pending[got] = t
        if tensor is not None:
            tensor = self._combine(name, tensor) if self._combine else tensor
        elif self._missing is not None:
            tensor = self._missing(name)
        else:
            raise InputError(f"the trained model has no tensor {name!r} that theta_0 has")
        self._name, self._tensor = name, tensor
        return tensor

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self._get(name)
        return (t if t.dim() == 0 else t[start:stop]).to("cpu")

    def drain(self) -> None:
        """Run the stream to its end (its collectives must complete on every rank)."""
        self._name = self._tensor = None
        for name, _ in self._stream:
            self.extra.append(name)
        self.extra += list(self._pending)
        self._pending.clear()


def live_stream(
    model: nn.Module, *, main: bool, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """What :func:`trained_weights` streams: PEFT deltas, else the model's tensors (in
    ``dtype``). Collective under ZeRO-3/FSDP2."""
    if is_peft_model(model):
        from ram_trl.lora import lora_deltas

        return ((n, d if main else None) for n, d in lora_deltas(model))
    return cast_stream(iter_state(model, main=main), dtype)


def _weights(
    stream: Iterator[tuple[str, torch.Tensor | None]],
    base: Any,
    *,
    peft: bool,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
) -> StreamedWeights:
    if peft:

        def combine(name: str, delta: torch.Tensor) -> torch.Tensor:
            b = base.read(name)
            return (b.to(torch.float32) + delta.to("cpu", torch.float32)).to(b.dtype)

        infos = {n: _Info(tuple(i.shape), i.dtype) for n, i in base.tensors.items()}
        return StreamedWeights(
            stream, infos, label="<trained LoRA model>", combine=combine, missing=base.read
        )
    infos = {
        n: _Info(tuple(i.shape), specs.get(n, (None, i.dtype))[1]) for n, i in base.tensors.items()
    }
    return StreamedWeights(stream, infos, label="<trained model>")


def trained_weights(
    model: nn.Module, base: Any, *, main: bool = True, dtype: torch.dtype | None = None
) -> StreamedWeights:
    """The trained weights of ``model`` as a weight source with ``base``'s names: for a PEFT
    model base + LoRA deltas (computed one module at a time), else the model's own tensors
    (cast to ``dtype`` when given)."""
    peft = is_peft_model(model)
    specs = {} if peft else base_specs(model, dtype)
    return _weights(live_stream(model, main=main, dtype=dtype), base, peft=peft, specs=specs)


class TakenWeights:
    """A copy of the trained weights at one step, taken inside the training pause so that a
    background thread can compare and write them while training moves the live ones on.

    :meth:`take` copies what :func:`trained_weights` would stream (the model's tensors cast to
    ``dtype``, or a PEFT model's LoRA deltas) into CPU buffers kept from one take to the next:
    the memory cost is one copy of the model in the snapshot dtype (for PEFT, one full-size
    delta per adapted tensor), allocated at the first take and reused. A take overwrites the
    buffers, so the caller must not take again while a writer still reads them (one snapshot
    in flight: see :class:`~ram_trl.training.capture.BackgroundSnapshots`). The cast happens
    in the copy (``copy_`` into a buffer of the snapshot dtype): the same rounding as ``.to``.
    Collective under ZeRO-3/FSDP2 (the gathers, one module at a time, stay in the pause).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.order: list[str] = []
        self.peft = False
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def take(
        self, model: nn.Module, *, main: bool = True, dtype: torch.dtype | None = None
    ) -> None:
        self.peft = is_peft_model(model)
        self.order = list(base_specs(model))
        self._specs = {} if self.peft else base_specs(model, dtype)
        stream = live_stream(model, main=main, dtype=None)  # cast by the copy below
        taken: list[tuple[str, torch.Tensor]] = []
        for name, t in stream:
            if t is None:
                continue  # not the main rank: only the gathers
            cast = dtype is not None and not self.peft and t.is_floating_point()
            want = dtype if cast else t.dtype
            buf = self._buffers.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != want:
                buf = self._buffers[name] = torch.empty(t.shape, dtype=want, device="cpu")
            buf.copy_(t.detach())
            taken.append((name, buf))
        self.tensors = taken

    def weights(self, base: Any) -> StreamedWeights:
        """The taken tensors as :func:`trained_weights` gives the live ones."""
        return _weights(iter(self.tensors), base, peft=self.peft, specs=self._specs)
