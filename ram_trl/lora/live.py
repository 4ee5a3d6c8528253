"""LoRA task vectors of a live model: one dense delta per adapted tensor, in float32.

For each LoRA-adapted ``nn.Linear`` / GPT-2 ``Conv1D`` the delta is ``(lora_B @ lora_A) *
scaling`` (transposed for ``fan_in_fan_out``, and always for ``nn.Embedding`` LoRA), for each
``modules_to_save`` module the trained copy minus the frozen original, under the base
checkpoint's names. ram-trl computes these itself in float32 rather than calling PEFT's
``get_delta_weight``, which works in the adapter's dtype: a bf16 product would move elements across
the ``|tau| > 1e-5`` change mask. Under DeepSpeed ZeRO-3 each module's parameters are gathered
while its delta is computed, one module at a time; FSDP2 shards are materialized with
``full_tensor()`` (see :mod:`ram_trl.distributed`).

``peft`` is imported only by the functions that need it; importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ram_trl.distributed import full, gathered, is_dtensor, unwrap
from ram_trl.errors import InputError
from ram_trl.lora.checks import check_config, config_dict
from ram_trl.lora.names import base_weight_name, few


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` / ``PeftMixedModel`` / ``LoraModel``-style tuner, or any module
    with PEFT adapter layers injected (``inject_adapter_in_model``, transformers' ``load_adapter``).

    Never imports peft: an object can only be a PEFT model if peft was imported to build it.
    """
    peft = sys.modules.get("peft")
    if peft is None or not isinstance(model, nn.Module):
        return False
    model = unwrap(model)
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    if isinstance(model, (peft.PeftModel, peft.PeftMixedModel, BaseTuner)):
        return True
    return any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in model.modules())


def root_module(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP and PEFT wrappers. For a PEFT model its module names are
    the base's plus PEFT's own (``base_layer``, ``lora_A``...), see :func:`base_weight_name`."""
    model = unwrap(model)
    peft = sys.modules.get("peft")
    if peft is None:  # nothing can be wrapped by PEFT
        return model
    from peft.tuners.tuners_utils import BaseTuner

    while isinstance(model, (peft.PeftModel, peft.PeftMixedModel)):
        model = model.base_model
    while isinstance(model, BaseTuner):
        model = model.model
    return model


@dataclasses.dataclass(frozen=True)
class _LivePlan:
    """What :func:`lora_deltas` will compute, decided and validated before anything is yielded."""

    kind: Literal["linear", "embedding", "modules_to_save"]
    name: str  # base name of the weight (LoRA) or of the module (modules_to_save)
    module: nn.Module


def lora_deltas(
    model: nn.Module, adapter_name: str | None = None, *, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(base_weight_name, delta)`` for every tensor a PEFT LoRA adapter changes.

    For each LoRA-adapted ``nn.Linear`` (or GPT-2 ``Conv1D``), ``delta = (lora_B.weight @
    lora_A.weight) * scaling``, transposed when the layer is ``fan_in_fan_out``; for an
    ``nn.Embedding`` LoRA, ``delta = (lora_embedding_B @ lora_embedding_A).T * scaling``. The
    ``scaling`` is read from the layer itself, so ``rank_pattern`` / ``alpha_pattern`` /
    ``use_rslora`` (``alpha / sqrt(r)``) are honoured exactly as in the forward pass. The result
    equals ``layer.get_delta_weight(adapter)`` and ``merge_and_unload()`` minus the base weight.
    For each ``modules_to_save`` module (e.g. ``lm_head``), every parameter of the trained copy
    is yielded as ``copy - original`` (a full-size delta). Tensors the adapter does not touch
    are not yielded: their delta is zero.

    Deltas are computed in float32 on the parameters' device, one at a time (at most one module's
    delta is alive inside this function), then cast to ``dtype``. They do not require grad.
    Under DeepSpeed ZeRO-3 each module's parameters are gathered while its delta is computed,
    and FSDP2 ``DTensor`` parameters are materialized with ``full_tensor()``; both are
    collective, so iterate on every rank, to the end.

    Args:
        model: a ``peft.PeftModel``, a ``LoraModel``, or a model with LoRA layers injected. An
            adapter that is already merged into the base weights still yields its delta.
        adapter_name: the adapter to read. ``None`` means the active adapter; an error is
            raised when several adapters are active at once, since their deltas would add up.
        dtype: dtype of the yielded deltas.

    Raises:
        InputError: (before anything is yielded) no LoRA layer; several active adapters; an
            unknown adapter; a refused variant or layer (DoRA, ``lora_bias``, VeRA/LoHa/LoKr/
            AdaLoRA/..., quantized or convolutional base layers, trainable tokens); a
            base-rewriting init (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA); or parameters trained in
            place with no frozen original (``bias="all"`` / ``"lora_only"``, unfrozen tensors),
            whose deltas cannot be recovered from the model.
    """
    adapter, plan = _plan_live(model, adapter_name)  # validates everything, eagerly
    return _iter_live(plan, adapter, dtype)


def _adapters_of(module: nn.Module) -> set[str]:
    """Names of the adapters a PEFT layer or wrapper holds weights for."""
    names: set[str] = set()
    for attr in getattr(module, "adapter_layer_names", ()):
        holder = getattr(module, attr, None)
        if isinstance(holder, (nn.ModuleDict, nn.ParameterDict, dict)):
            names.update(holder.keys())
    return names


def _peft_layers(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every PEFT tuner layer and auxiliary wrapper (modules_to_save, trainable tokens)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    return [
        (name, module)
        for name, module in root.named_modules()
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
    ]


def _resolve_adapter(root: nn.Module, adapter_name: str | None) -> str:
    layers = _peft_layers(root)
    if not layers:
        raise InputError(
            f"model {type(root).__name__} has no PEFT adapter layers; lora_deltas needs a "
            "peft.PeftModel or a model with LoRA layers injected"
        )
    available = sorted(set().union(*(_adapters_of(m) for _, m in layers)))
    if adapter_name is not None:
        if adapter_name not in available:
            raise InputError(
                f"adapter_name={adapter_name!r} is not in the model; it has {available}"
            )
        return adapter_name
    active: set[str] = set()
    for _, module in layers:
        active.update(a for a in module.active_adapters if a in _adapters_of(module))
    if len(active) > 1:
        raise InputError(
            f"several adapters are active at once ({sorted(active)}); their deltas would add up. "
            "Pass adapter_name= to read one of them"
        )
    if not active:
        raise InputError(f"no adapter is active; pass adapter_name= (one of {available})")
    return active.pop()


def _peft_config_of(model: nn.Module, root: nn.Module, adapter: str) -> Any:
    for holder in (unwrap(model), root):
        configs = getattr(holder, "peft_config", None)
        if isinstance(configs, Mapping) and adapter in configs:
            return configs[adapter]
    return None


def _plan_live(model: nn.Module, adapter_name: str | None) -> tuple[str, list[_LivePlan]]:
    from peft.tuners import lora
    from peft.utils import ModulesToSaveWrapper

    root = root_module(model)
    adapter = _resolve_adapter(root, adapter_name)

    plan: list[_LivePlan] = []
    allowed: set[int] = set()  # ids of parameters PEFT trains with a frozen original kept
    for name, module in _peft_layers(root):
        held = _adapters_of(module)
        if isinstance(module, ModulesToSaveWrapper):
            for copy in module.modules_to_save.values():
                allowed.update(id(p) for p in copy.parameters())
            if adapter in held:
                plan.append(_LivePlan("modules_to_save", base_weight_name(name), module))
            continue
        if isinstance(module, lora.LoraLayer):
            for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                allowed.update(id(p) for p in getattr(module, attr).parameters())
        if adapter not in held:
            continue
        where = base_weight_name(name)
        kind = _check_lora_layer(module, adapter, where)
        plan.append(_LivePlan(kind, f"{where}.weight", module))

    # Layer checks first (their messages name the module), then what only the config shows.
    config = _peft_config_of(model, root, adapter)
    if config is not None:
        config = config_dict(config)
        check_config(config, where=f"adapter {adapter!r}")
        if config.get("bias", "none") != "none":
            raise InputError(
                f"adapter {adapter!r} has bias={config['bias']!r}: PEFT trains those biases in "
                "place and keeps no original, so their task vector cannot be computed from the "
                "model. Use bias='none', or read the saved adapter with "
                "lora_deltas_from_adapter(folder, base=...)"
            )
    in_place = [
        base_weight_name(n)
        for n, p in root.named_parameters()
        if p.requires_grad and id(p) not in allowed
    ]
    if in_place:
        raise InputError(
            f"parameters {few(in_place)} are trainable but PEFT keeps no frozen original of "
            "them (LoraConfig(bias='all'/'lora_only') or tensors unfrozen by hand), so their task "
            "vector cannot be computed from the model. Freeze them or use bias='none', read the "
            "saved adapter with lora_deltas_from_adapter(folder, base=...), or snapshot the full "
            "model instead"
        )
    if not plan:
        raise InputError(f"adapter {adapter!r} adapts no module of the model")
    return adapter, plan


def _check_lora_layer(
    module: nn.Module, adapter: str, where: str
) -> Literal["linear", "embedding"]:
    """Refuse every layer whose delta is not ``B @ A * scaling`` against the base checkpoint."""
    from peft.tuners import lora
    from transformers.pytorch_utils import Conv1D

    layer_type = type(module).__name__
    if type(module) not in (lora.Linear, lora.Embedding):
        hint = {
            "Conv1d": "convolutional LoRA",
            "Conv2d": "convolutional LoRA",
            "Conv3d": "convolutional LoRA",
            "ParamWrapper": "LoRA on parameters (target_parameters)",
            "MultiheadAttention": "LoRA on nn.MultiheadAttention",
        }.get(layer_type, "another PEFT tuner, or a quantized or parallel LoRA layer")
        raise InputError(
            f"module {where}: {type(module).__module__}.{layer_type} is not a plain LoRA layer "
            f"({hint}); ram-trl reads plain LoRA on nn.Linear, Conv1D and nn.Embedding only"
        )
    variant = module.lora_variant.get(adapter)
    if variant is not None or module.use_dora.get(adapter, False):
        variant_name = type(variant).__name__ if variant is not None else "DoRA"
        raise InputError(
            f"module {where}: adapter {adapter!r} uses the LoRA variant {variant_name}, whose "
            "delta is not lora_B @ lora_A * scaling; merge_and_unload() it and merge the full "
            "model instead"
        )
    if module.lora_bias.get(adapter, False):
        raise InputError(
            f"module {where}: adapter {adapter!r} has lora_bias=True (a trained bias in lora_B), "
            "which a LoRA weight delta cannot express; merge_and_unload() it and merge the full "
            "model instead"
        )
    base = module.get_base_layer()
    expected = (nn.Embedding,) if isinstance(module, lora.Embedding) else (nn.Linear, Conv1D)
    weight = getattr(base, "weight", None)
    if (
        not isinstance(base, expected)
        or weight is None
        or not weight.is_floating_point()
        or not _is_plain_tensor(weight)
    ):
        raise InputError(
            f"module {where}: base layer {type(base).__module__}.{type(base).__name__} "
            f"(weight {type(weight).__name__}, {getattr(weight, 'dtype', None)}) looks quantized "
            "or wrapped; its LoRA delta would not be relative to the base checkpoint's weights"
        )
    return "embedding" if isinstance(module, lora.Embedding) else "linear"


def _is_plain_tensor(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) or is_dtensor(t)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return full(t).detach().to(torch.float32)  # full() is collective for DTensors: every rank


@torch.no_grad()
def _live_deltas(item: _LivePlan, adapter: str) -> list[tuple[str, torch.Tensor]]:
    # Kept out of the generator: a ``no_grad`` (or gather) context held across a ``yield`` would
    # leak into the caller's code while the generator is suspended.
    module = item.module
    if item.kind == "modules_to_save":
        copy, original = module.modules_to_save[adapter], module.original_module
        out = []
        for pname, param in copy.named_parameters():
            orig = original.get_parameter(pname)
            with gathered([param, orig]):
                out.append((f"{item.name}.{pname}", _f32(param) - _f32(orig)))
        return out
    scaling = float(module.scaling[adapter])
    if item.kind == "embedding":
        a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
        with gathered([a, b]):
            delta = (_f32(b) @ _f32(a)).T * scaling
    else:
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        with gathered([a, b]):
            delta = (_f32(b) @ _f32(a)) * scaling
        if module.fan_in_fan_out:
            delta = delta.T
    return [(item.name, delta)]


def _iter_live(
    plan: list[_LivePlan], adapter: str, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    for item in plan:
        for name, delta in _live_deltas(item, adapter):
            yield name, delta.to(dtype).contiguous()
