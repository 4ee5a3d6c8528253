"""LoRA task vectors of a saved adapter (``adapter_config.json`` plus its weights), for a job
that has the adapter on disk but not the training process.

Each module's rank comes from its ``lora_A`` (checked against ``r`` / ``rank_pattern``), its alpha
from ``alpha_pattern`` (PEFT's matching rule) or ``lora_alpha``; ``modules_to_save`` copies and
trained biases are full tensors whose delta is ``saved - base``. Weights are read lazily through
``ram_trl.io.ModelFolder``, one tensor at a time; ``peft`` is not needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ram_trl.errors import InputError
from ram_trl.io import ModelFolder
from ram_trl.lora.checks import check_config, config_dict
from ram_trl.lora.names import (
    ADAPTER_BIN_NAME,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    base_weight_name,
    few,
    get_pattern_key,
    module_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig


class _LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only ``name -> tensor`` mapping over a checkpoint folder: a tensor is read (a
    zero-copy view of its file) only when asked for, so a big ``modules_to_save`` copy or a base
    checkpoint is never loaded whole."""

    def __init__(self, folder: ModelFolder) -> None:
        self._folder = folder

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._folder.tensors:
            raise KeyError(name)
        return self._folder.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._folder.tensors)

    def __len__(self) -> int:
        return len(self._folder.tensors)


def _open_base(base: Mapping[str, torch.Tensor] | str | os.PathLike | None) -> Any:
    if base is None or isinstance(base, Mapping):
        return base
    return _LazyTensors(ModelFolder(base))


@dataclasses.dataclass(frozen=True)
class _DiskPlan:
    """One tensor :func:`lora_state_deltas` will yield (or, for ``frozen_base``, only check)."""

    kind: Literal["lora", "full", "frozen_base"]
    name: str  # base weight name
    keys: tuple[str, ...]  # (lora_A key, lora_B key) or (full tensor key,)
    scaling: float = 1.0
    transpose: bool = False


_FACTOR_KEY = re.compile(
    r"(?P<prefix>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)"
)


def lora_state_deltas(
    state_dict: Mapping[str, torch.Tensor],
    peft_config: LoraConfig | Mapping[str, Any],
    *,
    base: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`lora_deltas` for a saved adapter: its state dict and its ``LoraConfig`` (or dict).

    ``state_dict`` is what ``PeftModel.save_pretrained`` writes (and
    ``peft.get_peft_model_state_dict(model)`` returns): keys ``base_model.model.<module>.lora_A
    .weight`` / ``.lora_B.weight`` / ``.lora_embedding_A`` / ``.lora_embedding_B`` without the
    adapter name, plus full tensors. Each module's rank is read from its ``lora_A`` (and checked
    against ``r`` / ``rank_pattern``); its alpha comes from ``alpha_pattern`` (PEFT's matching
    rule) or ``lora_alpha``; ``use_rslora`` and ``fan_in_fan_out`` from the config. The
    mapping is only indexed, so a lazy one (see :func:`lora_deltas_from_adapter`) is read one
    tensor at a time.

    Full tensors are ``modules_to_save`` copies and, with ``bias="all"`` / ``"lora_only"``,
    trained biases. Their delta is ``saved - base``, so ``base`` (the base model's state dict,
    or its safetensors checkpoint folder) is then required. The frozen copy of an embedding's
    base weight that PEFT saves next to an embedding LoRA (``...embed_tokens.base_layer.weight``)
    carries no change and is not yielded; with ``base`` it is checked to equal the base weight
    (a resized vocabulary cannot be merged as a task vector).

    Raises:
        InputError: before anything is yielded, for everything :func:`lora_deltas` refuses, for
            a full ``PeftModel.state_dict()`` (keys with adapter names) and for full tensors
            without ``base``; while iterating, for a full tensor missing from ``base`` or
            shaped differently, or a modified frozen base weight.
    """
    config = config_dict(peft_config)
    _check_keys(list(state_dict.keys()))  # first: its messages name the module
    check_config(config, where="adapter config")
    plan = _plan_disk(state_dict, config, has_base=base is not None)
    return _iter_disk(plan, state_dict, _open_base(base), dtype)


def lora_deltas_from_adapter(
    folder: str | os.PathLike,
    *,
    base: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`lora_state_deltas` of an adapter folder (``adapter_config.json`` and
    ``adapter_model.safetensors``, read lazily, or a legacy ``adapter_model.bin``, read whole).

    For a job that has only the adapter on disk, not the training process. ``peft`` is not
    needed (when installed, its list of LoRA variant fields is used for the refusals).
    """
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise InputError(f"{folder} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{config_path} is not valid JSON: {exc}") from exc
    weights: Mapping[str, torch.Tensor]
    if (folder / ADAPTER_WEIGHTS_NAME).is_file():
        weights = _LazyTensors(ModelFolder(folder, files=[ADAPTER_WEIGHTS_NAME]))
    elif (folder / ADAPTER_BIN_NAME).is_file():
        weights = _load_bin(folder / ADAPTER_BIN_NAME)
    else:
        raise InputError(f"{folder} has neither {ADAPTER_WEIGHTS_NAME} nor {ADAPTER_BIN_NAME}")
    try:
        return lora_state_deltas(weights, config, base=base, dtype=dtype)
    except InputError as exc:  # name the folder: a job may read several adapters
        raise InputError(f"adapter {folder}: {exc}") from None


def _load_bin(path: Path) -> Mapping[str, torch.Tensor]:
    """A legacy ``adapter_model.bin``, loaded with ``weights_only`` (no code in it ever runs).
    Anything but plain tensors (a crafted pickle, a truncated file) is an InputError."""
    import pickle

    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(
            f"{path} is not a plain tensor pickle ({reason}); refusing to load it: convert the "
            "adapter to safetensors (adapter_model.safetensors)"
        ) from None
    if not isinstance(weights, Mapping):
        raise InputError(f"{path} holds a {type(weights).__name__}, not a state dict of tensors")
    return weights


def _check_keys(keys: list[str]) -> None:
    """Refuse saved adapters whose tensors show a variant or a non-adapter state dict."""
    named = [k for k in keys if re.search(r"\.lora_[AB]\.[^.]+\.weight$", k)]
    if named:
        raise InputError(
            f"state dict keys like {named[0]} carry an adapter name: this looks like a full "
            "PeftModel.state_dict(). Pass peft.get_peft_model_state_dict(model, adapter_name=...) "
            "or use lora_deltas(model)"
        )
    for key in keys:
        if ".lora_magnitude_vector" in key or key.endswith(".lora_B.bias"):
            what = "DoRA (lora_magnitude_vector)" if "magnitude" in key else "lora_bias=True"
            raise InputError(
                f"module {module_of(base_weight_name(key))}: {what} is not supported, its delta "
                "is not lora_B @ lora_A * scaling; merge_and_unload() it and merge the full model"
            )


def _plan_disk(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, has_base: bool
) -> list[_DiskPlan]:
    keys = list(state_dict.keys())
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern: Mapping[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: Mapping[str, float] = config.get("alpha_pattern") or {}
    use_rslora, fan_in_fan_out = bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))
    key_set = set(keys)
    plan: list[_DiskPlan] = []
    lora_modules: set[str] = set()
    for key in keys:
        match = _FACTOR_KEY.fullmatch(key)
        if match is None:
            continue
        prefix, kind = match.group("prefix", "kind")
        other = {
            "lora_A.weight": "lora_B.weight",
            "lora_B.weight": "lora_A.weight",
            "lora_embedding_A": "lora_embedding_B",
            "lora_embedding_B": "lora_embedding_A",
        }[kind]
        if f"{prefix}.{other}" not in key_set:
            raise InputError(f"adapter has {key} but not its partner {prefix}.{other}")
        if kind not in ("lora_A.weight", "lora_embedding_A"):
            continue
        module = prefix.removeprefix(PEFT_PREFIX)
        rank = int(state_dict[key].shape[0])
        r_config = rank_pattern.get(get_pattern_key(rank_pattern, module), r_default)
        if rank != r_config:
            raise InputError(
                f"module {module}: lora_A has rank {rank} but the adapter config gives r={r_config}"
            )
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern, module), alpha_default))
        embedding = kind == "lora_embedding_A"
        plan.append(
            _DiskPlan(
                "lora",
                f"{module}.weight",
                (key, f"{prefix}.{other}"),
                scaling=alpha / math.sqrt(rank) if use_rslora else alpha / rank,
                transpose=embedding or fan_in_fan_out,  # PEFT transposes embedding deltas always
            )
        )
        lora_modules.add(module)

    missing_base = []
    for key in keys:
        if _FACTOR_KEY.fullmatch(key):
            continue
        name = base_weight_name(key)
        if ".base_layer." in key and key.endswith(".weight") and module_of(name) in lora_modules:
            plan.append(_DiskPlan("frozen_base", name, (key,)))  # save_embedding_layers copy
            continue
        plan.append(_DiskPlan("full", name, (key,)))
        missing_base.append(name)
    if missing_base and not has_base:
        raise InputError(
            f"the adapter stores full tensors ({few(missing_base)}: modules_to_save copies or "
            "trained biases); their delta is saved - base, so pass base= (the base model's "
            "state dict or checkpoint folder)"
        )
    if not plan:
        raise InputError("the adapter state dict holds no LoRA weights")
    return plan


def _base_tensor(base: Mapping[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    if name not in base:
        raise InputError(f"the adapter changes {name}, which the base does not have")
    tensor = base[name]
    if tensor.shape != shape:
        raise InputError(
            f"{name}: the adapter's copy has shape {tuple(shape)} but the base's is "
            f"{tuple(tensor.shape)} (a resized vocabulary cannot be merged as a task vector)"
        )
    return tensor


@torch.no_grad()
def _disk_delta(
    item: _DiskPlan, state_dict: Mapping[str, torch.Tensor], base: Any
) -> torch.Tensor | None:
    if item.kind == "lora":
        a, b = (state_dict[k].to(torch.float32) for k in item.keys)
        delta = (b @ a.to(b.device)) * item.scaling
        return delta.T if item.transpose else delta
    saved = state_dict[item.keys[0]]
    if base is None:  # only a frozen base copy can get here without a base
        return None
    reference = _base_tensor(base, item.name, saved.shape)
    delta = saved.to(torch.float32) - reference.to(saved.device, torch.float32)
    if item.kind == "frozen_base":
        if delta.abs().max() > 0:
            raise InputError(
                f"{item.name}: the adapter carries a copy of this base weight that differs from "
                "the base (different base model, or resized/retrained embeddings)"
            )
        return None
    return delta


def _iter_disk(
    plan: list[_DiskPlan], state_dict: Mapping[str, torch.Tensor], base: Any, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    for item in plan:
        delta = _disk_delta(item, state_dict, base)
        if delta is not None:
            yield item.name, delta.to(dtype).contiguous()
