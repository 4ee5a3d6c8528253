"""How tensors are stored in safetensors files: dtype codes and raw little-endian bytes.

The codes (``"BF16"``, ``"F32"``, ...) are the file format's names for dtypes. They are not the
dtype names a user types (``bfloat16``, ``bf16``): those are
``ram_trl.merging.engine.OUTPUT_DTYPES``.
"""

from __future__ import annotations

import torch

from ram_trl.errors import InputError

#: safetensors dtype code -> torch dtype, for every dtype ram-trl reads and writes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def safetensors_code(dtype: torch.dtype | str) -> str:
    """The safetensors code (``"BF16"``) of a torch dtype; codes pass through."""
    if isinstance(dtype, str):
        if dtype in SAFETENSORS_DTYPES:
            return dtype
        raise InputError(f"unsupported tensor dtype {dtype!r}")
    if dtype not in _CODES:
        raise InputError(f"unsupported tensor dtype {dtype}")
    return _CODES[dtype]


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype of a safetensors code; torch dtypes pass through."""
    return dtype if isinstance(dtype, torch.dtype) else SAFETENSORS_DTYPES[safetensors_code(dtype)]


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (any dtype, 0-d included), as safetensors stores
    them; no copy when it is a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
