"""The LoRA configurations ram-trl refuses, because their delta is not ``B @ A * scaling``
against the base checkpoint (DoRA and other variants, base-rewriting initialisations, ...).

Shared by live models (:mod:`~ram_trl.lora.live`) and saved adapters
(:mod:`~ram_trl.lora.adapter`); peft is imported only to read its list of variant fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ram_trl.errors import InputError

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


def config_dict(config: Any) -> dict[str, Any]:
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


def check_config(config: Mapping[str, Any], *, where: str) -> None:
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
