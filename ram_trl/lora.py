"""LoRA agents: their dense task vectors, and the way back from a merged delta to a LoRA adapter.

RAM merges task vectors ``tau_t = theta_t - theta_base`` element by element. When an agent was
trained with a PEFT LoRA adapter, the task vector of an adapted module is its dense LoRA delta
``(lora_B @ lora_A) * scaling`` (transposed for ``fan_in_fan_out`` / GPT-2 ``Conv1D`` layers, and
always for ``nn.Embedding`` LoRA), and the task vector of a ``modules_to_save`` module is its
trained copy minus the frozen original. Every other tensor is unchanged. This module yields
those deltas under the base checkpoint's own tensor names (``model.layers.0.self_attn.q_proj
.weight``: no ``base_model.model.`` prefix, no ``.base_layer``), so they line up with the base's
safetensors and with full-fine-tuned agents, from a live model (:func:`lora_deltas`) or from an
adapter folder on disk (:func:`lora_deltas_from_adapter`), one tensor at a time.

Only variants whose delta really is ``B @ A * scaling`` are accepted. DoRA, ``lora_bias``, the
other LoRA variants (aLoRA, VeLoRA, MonteCLoRA, MiCA, KaSA, Arrow, BD-LoRA, QALoRA), non-LoRA
tuners (VeRA, LoHa, LoKr, AdaLoRA, ...), quantized base layers, initialisations that rewrite the
base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) and parameters trained in place without a
frozen copy (``bias="all"``) are refused with an :class:`~ram_trl.errors.InputError` naming the
module and the variant, because a wrong task vector would be merged silently.

The way back, :func:`save_lora_adapter`, factorizes each merged 2-D delta by truncated SVD
(:func:`factorize`) and writes a folder that ``PeftModel.from_pretrained`` loads.

A caveat for RAM itself, see :func:`density_warning`: ``B @ A`` is dense, so a LoRA agent changes
nearly every element of the modules it adapts, and RAM's unique/shared split then degenerates into
plain averaging there.

``peft`` is imported only by the functions that need it; importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ram_trl.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_EMBEDDING_NAMES",
    "base_weight_name",
    "density_warning",
    "factorize",
    "is_peft_model",
    "lora_deltas",
    "lora_deltas_from_adapter",
    "lora_state_deltas",
    "save_lora_adapter",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_ADAPTER_BIN_NAME = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
_REPORT_NAME = "ram_trl_lora.json"

#: ``init_lora_weights`` values whose initialisation rewrites the base weights (W <- W - B0 A0 s):
#: the adapter's delta is then not relative to the base checkpoint.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
#: ``LoraConfig`` fields that switch on a variant whose delta is not ``B @ A * scaling``. Fields
#: tagged ``is_lora_variant`` in the installed peft are added to these at run time.
_VARIANT_FIELDS = (
    "use_dora",
    "lora_bias",
    "use_bdlora",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "arrow_config",
    "use_qalora",
)
#: Module names (last component) treated as ``nn.Embedding`` by :func:`save_lora_adapter`.
DEFAULT_EMBEDDING_NAMES = frozenset(
    {"embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "tok_embeddings", "shared"}
)

_FACTOR_SUFFIX = re.compile(
    r"\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[^.]+)*$"
)


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------


def base_weight_name(peft_name: str) -> str:
    """Map a PEFT parameter name to the base checkpoint's name of the tensor it belongs to.

    Strips the ``base_model.model.`` prefix, the ``.base_layer`` of wrapped layers, the
    ``modules_to_save.<adapter>`` / ``original_module`` of ``modules_to_save`` wrappers and the
    ``token_adapter`` of trainable-token wrappers; a LoRA factor (``lora_A`` / ``lora_B`` /
    ``lora_embedding_*``, with or without the adapter name) maps to the weight it adapts, except
    ``lora_B.bias`` (``lora_bias=True``), which maps to the module's bias.

    >>> base_weight_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    >>> base_weight_name("base_model.model.lm_head.modules_to_save.default.weight")
    'lm_head.weight'
    >>> base_weight_name("base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight")
    'model.layers.0.mlp.up_proj.weight'
    """
    name = peft_name.removeprefix(_PEFT_PREFIX)
    name = re.sub(r"(^|\.)modules_to_save\.[^.]+\.", r"\1", name)
    for wrapper in ("original_module", "base_layer", "token_adapter"):
        name = re.sub(rf"(^|\.){wrapper}\.", r"\1", name)
    match = _FACTOR_SUFFIX.search(name)
    if match is not None:
        suffix = "bias" if match.group(0).endswith("lora_B.bias") else "weight"
        name = f"{name[: match.start()]}.{suffix}"
    return name


def _module_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0] if "." in weight_name else ""


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------
# Live models
# ------------------------------------------------------------------------------------------------


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` / ``PeftMixedModel`` / ``LoraModel``-style tuner, or any module
    with PEFT adapter layers injected (``inject_adapter_in_model``, transformers' ``load_adapter``).

    Never imports peft: an object can only be a PEFT model if peft was imported to build it.
    """
    peft = sys.modules.get("peft")
    if peft is None or not isinstance(model, nn.Module):
        return False
    model = _unwrap_ddp(model)
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    if isinstance(model, (peft.PeftModel, peft.PeftMixedModel, BaseTuner)):
        return True
    return any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in model.modules())


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _root_module(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT's wrappers, whose module names are the base's names."""
    import peft
    from peft.tuners.tuners_utils import BaseTuner

    model = _unwrap_ddp(model)
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
    for holder in (_unwrap_ddp(model), root):
        configs = getattr(holder, "peft_config", None)
        if isinstance(configs, Mapping) and adapter in configs:
            return configs[adapter]
    return None


def _plan_live(model: nn.Module, adapter_name: str | None) -> tuple[str, list[_LivePlan]]:
    from peft.tuners import lora
    from peft.utils import ModulesToSaveWrapper

    root = _root_module(model)
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
        config = _config_dict(config)
        _check_config(config, where=f"adapter {adapter!r}")
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
            f"parameters {_few(in_place)} are trainable but PEFT keeps no frozen original of "
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
    return type(t) in (torch.Tensor, nn.Parameter) or _is_dtensor(t)


def _is_dtensor(t: torch.Tensor) -> bool:
    """FSDP2 / tensor-parallel shards (checked by name: no torch.distributed import needed)."""
    return type(t).__name__ == "DTensor"


@contextmanager
def _gathered(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for the duration of the block (collective)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _f32(t: torch.Tensor) -> torch.Tensor:
    if _is_dtensor(t):  # collective: every rank must get here
        t = t.full_tensor()
    return t.detach().to(torch.float32)


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
            with _gathered([param, orig]):
                out.append((f"{item.name}.{pname}", _f32(param) - _f32(orig)))
        return out
    scaling = float(module.scaling[adapter])
    if item.kind == "embedding":
        a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
        with _gathered([a, b]):
            delta = (_f32(b) @ _f32(a)).T * scaling
    else:
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        with _gathered([a, b]):
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


# ------------------------------------------------------------------------------------------------
# Saved adapters
# ------------------------------------------------------------------------------------------------


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    raise InputError(f"peft_config must be a LoraConfig or a dict, got {type(config).__name__}")


def _variant_fields() -> tuple[str, ...]:
    fields = list(_VARIANT_FIELDS)
    try:
        from peft import LoraConfig

        fields += [
            f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")
        ]
    except ImportError:  # pragma: no cover - peft is optional for reading saved adapters
        pass
    return tuple(dict.fromkeys(fields))


def _check_config(config: Mapping[str, Any], *, where: str) -> None:
    """Refuse adapter configurations whose deltas are not ``B @ A * scaling`` against the base."""
    peft_type = str(config.get("peft_type", "LORA")).rsplit(".", 1)[-1].upper()
    if peft_type != "LORA":
        raise InputError(
            f"{where}: peft_type {peft_type} is not supported; ram-trl reads plain LoRA adapters "
            "only (merge_and_unload() other adapters and merge the full models)"
        )
    variants = [f"{f}={config[f]!r}" for f in _variant_fields() if config.get(f)]
    if variants:
        raise InputError(
            f"{where}: LoRA variant {', '.join(variants)} is not supported, its delta is not "
            "lora_B @ lora_A * scaling; merge_and_unload() it and merge the full model"
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS + ("mica",)):
        raise InputError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights (or is a variant), so "
            "the adapter's delta is not relative to the base checkpoint; convert it to a plain "
            "LoRA first (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    if config.get("target_parameters"):
        raise InputError(
            f"{where}: target_parameters={config['target_parameters']!r} (LoRA on raw parameters) "
            "is not supported"
        )
    if config.get("trainable_token_indices"):
        raise InputError(
            f"{where}: trainable_token_indices is not supported yet; use modules_to_save for the "
            "embedding instead, or merge_and_unload() and merge the full model"
        )
    if config.get("layer_replication"):
        raise InputError(f"{where}: layer_replication changes the architecture; not supported")


def _get_pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """PEFT's rule (``peft.utils.other.get_pattern_key``) for ``rank_pattern`` / ``alpha_pattern``:
    the first pattern that matches the end of the module name, at a ``.`` boundary."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


class _SafetensorsFiles(Mapping[str, torch.Tensor]):
    """A read-only, lazy ``name -> tensor`` mapping over safetensors files (a tensor is read only
    when asked for), so a big ``modules_to_save`` or a base checkpoint is never loaded whole."""

    def __init__(self, files: Sequence[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                self._where.update(dict.fromkeys(f.keys(), file))  # noqa: SIM118

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _open_base(base: Mapping[str, torch.Tensor] | str | os.PathLike | None) -> Any:
    if base is None or isinstance(base, Mapping):
        return base
    folder = Path(base)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return _SafetensorsFiles([folder / f for f in dict.fromkeys(weight_map.values())])
    if (folder / "model.safetensors").is_file():
        return _SafetensorsFiles([folder / "model.safetensors"])
    raise InputError(
        f"base {folder} has neither model.safetensors nor model.safetensors.index.json"
    )


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
    config = _config_dict(peft_config)
    _check_keys(list(state_dict.keys()))  # first: its messages name the module
    _check_config(config, where="adapter config")
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
        weights = _SafetensorsFiles([folder / ADAPTER_WEIGHTS_NAME])
    elif (folder / _ADAPTER_BIN_NAME).is_file():
        weights = torch.load(folder / _ADAPTER_BIN_NAME, map_location="cpu", weights_only=True)
    else:
        raise InputError(f"{folder} has neither {ADAPTER_WEIGHTS_NAME} nor {_ADAPTER_BIN_NAME}")
    try:
        return lora_state_deltas(weights, config, base=base, dtype=dtype)
    except InputError as exc:  # name the folder: a job may read several adapters
        raise InputError(f"adapter {folder}: {exc}") from None


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
                f"module {_module_of(base_weight_name(key))}: {what} is not supported, its delta "
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
        module = prefix.removeprefix(_PEFT_PREFIX)
        rank = int(state_dict[key].shape[0])
        r_config = rank_pattern.get(_get_pattern_key(rank_pattern, module), r_default)
        if rank != r_config:
            raise InputError(
                f"module {module}: lora_A has rank {rank} but the adapter config gives r={r_config}"
            )
        alpha = float(alpha_pattern.get(_get_pattern_key(alpha_pattern, module), alpha_default))
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
        if ".base_layer." in key and key.endswith(".weight") and _module_of(name) in lora_modules:
            plan.append(_DiskPlan("frozen_base", name, (key,)))  # save_embedding_layers copy
            continue
        plan.append(_DiskPlan("full", name, (key,)))
        missing_base.append(name)
    if missing_base and not has_base:
        raise InputError(
            f"the adapter stores full tensors ({_few(missing_base)}: modules_to_save copies or "
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


# ------------------------------------------------------------------------------------------------
# Back to LoRA
# ------------------------------------------------------------------------------------------------


def factorize(
    delta: torch.Tensor,
    rank: int,
    *,
    method: Literal["svd", "lowrank"] = "svd",
    niter: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factorization ``B @ A ~= delta`` by truncated SVD, in float32.

    With ``delta = U S V^T``, ``B = U_k sqrt(S_k)`` (``out x rank``) and ``A = sqrt(S_k) V_k^T``
    (``rank x in``): the singular values are split symmetrically, so ``A`` and ``B`` have equal
    norms (``B^T B = A A^T = S_k``), which keeps both well scaled for further LoRA training in low
    precision. When ``rank`` exceeds ``min(out, in)`` the factors are zero-padded to ``rank``, so
    one adapter can use one ``r`` for all modules.

    ``method="svd"`` (default) uses ``torch.linalg.svd``: exact, deterministic, and by
    Eckart-Young the smallest error any rank-``rank`` adapter can reach, so the reported error
    is a property of the delta, not of the solver. Merged RL task vectors have flat spectra, where
    randomized solvers lose the most. ``method="lowrank"`` uses ``torch.svd_lowrank`` (randomized,
    ``niter`` power iterations, ``rank + 8`` columns): O(out * in * rank) instead of
    O(out * in * min(out, in)), for very large matrices on CPU; check the error it reports.

    Returns:
        ``(A, B, error)`` with ``error = ||delta - B @ A||_F / ||delta||_F`` measured on the
        returned factors (0.0 for a zero delta). ``A`` and ``B`` are float32 on ``delta``'s device.
    """
    if delta.ndim != 2:
        raise InputError(f"factorize needs a 2-D delta, got shape {tuple(delta.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"rank must be a positive integer, got {rank!r}")
    if method not in ("svd", "lowrank"):
        raise InputError(f"method must be 'svd' or 'lowrank', got {method!r}")
    matrix = delta.detach().to(torch.float32)
    if not torch.isfinite(matrix).all():
        raise InputError(f"the delta of shape {tuple(delta.shape)} has NaN or infinite values")
    out_features, in_features = matrix.shape
    a = matrix.new_zeros(rank, in_features)
    b = matrix.new_zeros(out_features, rank)
    norm = torch.linalg.matrix_norm(matrix) if matrix.numel() else matrix.new_zeros(())
    if norm == 0:
        return a, b, 0.0
    k = min(rank, out_features, in_features)
    if method == "svd":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        q = min(k + 8, out_features, in_features)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
        u, s, vh = u[:, :k], s[:k], v[:, :k].T
    root = s.sqrt()
    b[:, :k] = u * root
    a[:k] = root[:, None] * vh
    error = torch.linalg.matrix_norm(matrix - b @ a) / norm
    return a, b, float(error)


def _module_matcher(target_modules: Sequence[str] | str | None) -> Callable[[str], bool]:
    """PEFT's ``target_modules`` rule: a string is a full-match regex; a list matches a module
    whose name equals an entry or ends with ``.entry``."""
    if target_modules is None:
        return lambda module: True
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda module: pattern.fullmatch(module) is not None
    targets = list(target_modules)
    return lambda module: any(module == t or module.endswith(f".{t}") for t in targets)


def save_lora_adapter(
    deltas: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    *,
    rank: int,
    base_model_name_or_path: str,
    target_modules: Sequence[str] | str | None = None,
    alpha: float | None = None,
    fan_in_fan_out: bool = False,
    embedding_modules: Iterable[str] | None = None,
    method: Literal["svd", "lowrank"] = "svd",
    dtype: torch.dtype = torch.float32,
    task_type: str | None = "CAUSAL_LM",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write dense deltas (e.g. a RAM merge of LoRA agents) as a PEFT LoRA adapter folder.

    Each 2-D ``<module>.weight`` delta is factorized to rank ``rank`` (:func:`factorize`) and
    stored under PEFT's names (``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``,
    or ``.lora_embedding_A`` / ``_B`` for embeddings), with ``adapter_config.json`` for
    ``LoraConfig(r=rank, lora_alpha=alpha, target_modules=...)``. ``alpha`` defaults to ``rank``
    so that ``scaling = alpha / r = 1`` and the stored factors are the SVD factors themselves;
    with another alpha the factors are divided by ``sqrt(alpha / rank)`` each, so
    ``B @ A * scaling`` is the same. ``PeftModel.from_pretrained(base, out_dir)`` then loads it
    and ``merge_and_unload()`` gives ``base + factorized deltas``.

    A LoRA can only express 2-D weight changes. Other deltas (biases and norms, 1-D; anything
    not named ``*.weight``; deltas of modules that ``target_modules`` does not match) are not
    written: they are listed under ``dropped`` in the returned report, with their Frobenius
    norm, and logged as a warning. All-zero deltas are skipped (listed under ``zero``).

    Args:
        deltas: ``{base weight name: delta}`` or an iterable of pairs, consumed one at a time
            (PEFT names are normalized with :func:`base_weight_name`).
        out_dir: the adapter folder, written atomically (a temporary sibling, then a rename).
        rank: the LoRA rank ``r`` of every module (factors are zero-padded for small matrices).
        base_model_name_or_path: recorded in the config, for ``AutoPeftModel*`` loading.
        target_modules: ``LoraConfig.target_modules``; ``None`` means exactly the modules with a
            delta (full names, so nothing else is adapted). Deltas it does not match are dropped.
        alpha: ``lora_alpha``; default ``rank``.
        fan_in_fan_out: the deltas of Linear-like modules are stored ``(in, out)`` (GPT-2
            ``Conv1D``). PEFT applies it to every targeted module, so do not mix with ``nn.Linear``.
        embedding_modules: modules that are ``nn.Embedding`` (full names or last name
            components; PEFT stores their LoRA transposed under other keys). Default:
            ``DEFAULT_EMBEDDING_NAMES`` (``embed_tokens``, ``wte``, ``word_embeddings``, ...).
        method: SVD solver, see :func:`factorize`.
        dtype: dtype of the stored factors.
        task_type: ``LoraConfig.task_type`` (``"CAUSAL_LM"`` for ``AutoPeftModelForCausalLM``).
        overwrite: replace an existing ``out_dir``.

    Returns:
        A report (also written to ``ram_trl_lora.json`` in the folder): ``modules`` (per module:
        ``shape``, ``kind``, ``norm``, ``error`` = relative Frobenius reconstruction error),
        ``error`` (overall: ``sqrt(sum ||delta - BA||^2) / sqrt(sum ||delta||^2)`` over the
        written modules), ``max_error``, ``dropped`` (name -> ``shape``, ``norm``, ``reason``),
        ``zero``, ``target_modules``, ``rank``, ``lora_alpha``, ``out_dir``.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    from ram_trl.io import atomic_directory

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"rank must be a positive integer, got {rank!r}")
    lora_alpha = float(rank if alpha is None else alpha)
    if not lora_alpha > 0:
        raise InputError(f"alpha must be positive, got {alpha!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"output folder {out} already exists; pass overwrite=True to replace it")
    embedding_names = set(
        DEFAULT_EMBEDDING_NAMES if embedding_modules is None else embedding_modules
    )
    matches = _module_matcher(target_modules)
    unscale = 1.0 / math.sqrt(lora_alpha / rank)

    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    dropped: dict[str, dict[str, Any]] = {}
    zero: list[str] = []
    seen: set[str] = set()
    squared_error = squared_norm = 0.0
    pairs = deltas.items() if isinstance(deltas, Mapping) else deltas
    for raw_name, delta in pairs:
        name = base_weight_name(raw_name)
        if name in seen:
            raise InputError(f"delta {name} is given twice")
        seen.add(name)
        module = _module_of(name)
        shape = list(delta.shape)
        reason = None
        if not delta.is_floating_point():
            reason = f"not a floating-point tensor ({delta.dtype})"
        elif delta.ndim != 2 or not name.endswith(".weight"):
            reason = (
                f"a {delta.ndim}-D tensor {name.rsplit('.', 1)[-1]!r}: LoRA expresses 2-D weights"
            )
        elif not matches(module):
            reason = "its module is not matched by target_modules"
        matrix = delta.detach().to(torch.float32)
        norm = float(torch.linalg.vector_norm(matrix)) if delta.is_floating_point() else 0.0
        if reason is not None:
            dropped[name] = {"shape": shape, "norm": norm, "reason": reason}
            continue
        if norm == 0.0:
            zero.append(name)
            continue
        embedding = module in embedding_names or module.rsplit(".", 1)[-1] in embedding_names
        # PEFT: Linear delta = B @ A; Conv1D (fan_in_fan_out) and Embedding delta = (B @ A).T
        a, b, error = factorize(
            matrix.T if embedding or fan_in_fan_out else matrix, rank, method=method
        )
        key = f"{_PEFT_PREFIX}{module}"
        a_key, b_key = (
            (f"{key}.lora_embedding_A", f"{key}.lora_embedding_B")
            if embedding
            else (f"{key}.lora_A.weight", f"{key}.lora_B.weight")
        )
        tensors[a_key] = (a * unscale).to("cpu", dtype).contiguous()
        tensors[b_key] = (b * unscale).to("cpu", dtype).contiguous()
        modules[module] = {
            "shape": shape,
            "kind": "embedding" if embedding else "linear",
            "norm": norm,
            "error": error,
        }
        squared_error += (error * norm) ** 2
        squared_norm += norm**2
        del matrix, a, b

    if not modules:
        raise InputError(
            "no 2-D weight delta to write as LoRA"
            + (f"; dropped: {_few(sorted(dropped))}" if dropped else "")
            + (f"; all-zero: {_few(zero)}" if zero else "")
        )
    if dropped:
        logger.warning(
            "save_lora_adapter: %d delta(s) cannot be expressed as LoRA and are NOT in %s: %s",
            len(dropped),
            out,
            _few([f"{n} ({d['reason']}, norm {d['norm']:.3g})" for n, d in dropped.items()]),
        )
    targets = sorted(modules) if target_modules is None else target_modules
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        target_modules=targets if isinstance(targets, str) else list(targets),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        inference_mode=True,
    )
    errors = [m["error"] for m in modules.values()]
    report: dict[str, Any] = {
        "out_dir": str(out),
        "rank": rank,
        "lora_alpha": lora_alpha,
        "method": method,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "error": math.sqrt(squared_error / squared_norm),
        "max_error": max(errors),
        "modules": modules,
        "dropped": dropped,
        "zero": zero,
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / _REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ------------------------------------------------------------------------------------------------
# RAM on LoRA deltas
# ------------------------------------------------------------------------------------------------


def density_warning(
    changed_fraction: float,
    shared_fraction: float,
    *,
    shared_threshold: float = 0.9,
    changed_threshold: float = 0.99,
    lora: bool = True,
) -> str | None:
    """A message when RAM on these task vectors degenerates into averaging, else ``None``.

    ``changed_fraction``: the fraction of an agent's elements (within the modules considered,
    e.g. the LoRA-adapted ones) with ``|tau| > epsilon``; ``shared_fraction``: the fraction of
    those changed elements that at least one other agent changed too (``shared / changed``, as
    in the probe's per-agent statistics).

    Why: RAM keeps (and, in RAM+, rescales) elements unique to one agent and averages shared
    ones. ``lora_B @ lora_A`` is dense, so a LoRA agent changes nearly every element of each
    module it adapts, two LoRA agents share nearly all of them, and the merge there is just the
    mean of the task vectors. The callback and the probe log this message so that nobody reads
    a LoRA merge as a test of RAM. ``lora=False`` words the message for a dense full fine-tune.
    """
    for value, what in (
        (changed_fraction, "changed_fraction"),
        (shared_fraction, "shared_fraction"),
    ):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{what} must lie in [0, 1], got {value!r}")
    reasons = []
    if changed_fraction >= changed_threshold:
        reasons.append(f"{changed_fraction:.1%} of the elements changed")
    if shared_fraction > shared_threshold:
        reasons.append(
            f"{shared_fraction:.1%} of the changed elements are shared with other agents"
        )
    if not reasons:
        return None
    cause = (
        "This is expected for LoRA agents (lora_B @ lora_A is dense: a LoRA agent changes nearly "
        "every element of each module it adapts). "
        if lora
        else "This full fine-tune is dense, typically from a high learning rate. "
    )
    return (
        " and ".join(reasons)
        + ": RAM's unique/shared split carries almost no information here, so the merge is close "
        "to a plain average of the task vectors. "
        + cause
        + "RAM pays off on sparse, heterogeneous task vectors, such as full fine-tuning at small "
        "learning rates."
    )
