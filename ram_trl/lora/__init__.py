"""LoRA agents: their dense task vectors, and the way back from a merged delta to an adapter.

RAM merges task vectors ``tau_t = theta_t - theta_base`` element by element. For an agent trained
with a PEFT LoRA adapter, the task vector of an adapted module is its dense LoRA delta
``(lora_B @ lora_A) * scaling``, and that of a ``modules_to_save`` module its trained copy minus
the frozen original; every other tensor is unchanged. This package yields those deltas under the
base checkpoint's own tensor names, so they line up with the base's safetensors and with fully
fine-tuned agents:

* :mod:`~ram_trl.lora.names`: PEFT names -> base names, ``rank_pattern`` and ``target_modules``;
* :mod:`~ram_trl.lora.checks`: the variants refused (DoRA, VeRA/LoHa/..., PiSSA-style inits...),
  because a wrong task vector would be merged silently;
* :mod:`~ram_trl.lora.live`: deltas of a live model (:func:`lora_deltas`), ZeRO-3 / FSDP2 aware;
* :mod:`~ram_trl.lora.adapter`: deltas of a saved adapter folder (:func:`lora_deltas_from_adapter`);
* :mod:`~ram_trl.lora.export`: back to an adapter by truncated SVD (:func:`save_lora_adapter`),
  and the merge engine's LoRA output;
* :mod:`~ram_trl.lora.density`: why RAM on LoRA deltas is close to averaging
  (:func:`density_warning`): ``B @ A`` is dense.

It builds on :mod:`ram_trl.io` and :mod:`ram_trl.distributed`; ``peft`` is imported only by the
functions that need it, so importing this package is cheap.
"""

from __future__ import annotations

from ram_trl.lora.adapter import lora_deltas_from_adapter, lora_state_deltas
from ram_trl.lora.density import density_warning
from ram_trl.lora.export import AdapterWriter, LoraSink, factorize, save_lora_adapter
from ram_trl.lora.live import is_peft_model, lora_deltas, root_module
from ram_trl.lora.names import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DEFAULT_EMBEDDING_NAMES,
    base_weight_name,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_EMBEDDING_NAMES",
    "AdapterWriter",
    "LoraSink",
    "base_weight_name",
    "density_warning",
    "factorize",
    "is_peft_model",
    "lora_deltas",
    "lora_deltas_from_adapter",
    "lora_state_deltas",
    "root_module",
    "save_lora_adapter",
]
