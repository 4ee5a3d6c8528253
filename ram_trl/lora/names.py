"""PEFT's names and patterns, mapped to the base checkpoint's.

A LoRA agent's parameters are named by PEFT (``base_model.model.<module>.lora_A.weight``,
``...base_layer.weight``, ``...modules_to_save.default.weight``); a task vector must be named
like the base checkpoint's tensors (``<module>.weight``) to line up with them. The rules for
``rank_pattern`` / ``alpha_pattern`` and ``target_modules`` are PEFT's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
#: the reconstruction report written next to an exported adapter
REPORT_NAME = "ram_trl_lora.json"

#: Module names (last component) treated as ``nn.Embedding`` by :func:`save_lora_adapter`.
DEFAULT_EMBEDDING_NAMES = frozenset(
    {"embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "tok_embeddings", "shared"}
)


_FACTOR_SUFFIX = re.compile(
    r"\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[^.]+)*$"
)


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
    name = peft_name.removeprefix(PEFT_PREFIX)
    name = re.sub(r"(^|\.)modules_to_save\.[^.]+\.", r"\1", name)
    for wrapper in ("original_module", "base_layer", "token_adapter"):
        name = re.sub(rf"(^|\.){wrapper}\.", r"\1", name)
    match = _FACTOR_SUFFIX.search(name)
    if match is not None:
        suffix = "bias" if match.group(0).endswith("lora_B.bias") else "weight"
        name = f"{name[: match.start()]}.{suffix}"
    return name


def module_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0] if "." in weight_name else ""


def few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def get_pattern_key(pattern_keys: Sequence[str], key_to_match: str) -> str:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: ``peft.utils.other.get_pattern_key``
    itself when peft is installed (imported here, not at module import: importing peft imports
    transformers). Without peft, the same rule: the first pattern matching the end of the module
    name at a ``.`` boundary, else the name itself."""
    try:
        from peft.utils.other import get_pattern_key as peft_rule
    except ImportError:  # pragma: no cover - saved adapters can be read without peft
        matches = (p for p in pattern_keys if re.match(rf"(.*\.)?({p})$", key_to_match))
        return next(matches, key_to_match)
    return peft_rule(pattern_keys, key_to_match)


def module_matcher(target_modules: Sequence[str] | str | None) -> Callable[[str], bool]:
    """PEFT's ``target_modules`` rule: a string is a full-match regex; a list matches a module
    whose name equals an entry or ends with ``.entry``."""
    if target_modules is None:
        return lambda module: True
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda module: pattern.fullmatch(module) is not None
    targets = list(target_modules)
    return lambda module: any(module == t or module.endswith(f".{t}") for t in targets)
