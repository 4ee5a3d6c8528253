"""Files in and out, and nothing else: the one safetensors reader (lazy row-range reads of
Hugging Face folders), the one writer (streamed ``save_pretrained``-style shards), atomic
publishing with fsync, dtype codes, the rule for names that become folder names, and YAML
recipes read with a clear error.

It imports only torch and :mod:`ram_trl.errors`; every other package of ram-trl builds on it.
"""

from __future__ import annotations

from ram_trl.io.atomic import atomic_directory, fsync_path, replace_file, write_synced
from ram_trl.io.checkpoint import ModelFolder, TensorInfo, TensorSpec, load_config, read_header
from ram_trl.io.encoding import SAFETENSORS_DTYPES, raw_bytes, safetensors_code, torch_dtype
from ram_trl.io.names import SAFE_NAME, check_name
from ram_trl.io.recipes import load_yaml
from ram_trl.io.rows import WeightSource, read_rows, row_chunks
from ram_trl.io.writer import (
    ShardedWriter,
    copy_model_files,
    parse_size,
    plan_shards,
    shard_names,
)

__all__ = [
    "SAFETENSORS_DTYPES",
    "SAFE_NAME",
    "ModelFolder",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "WeightSource",
    "atomic_directory",
    "check_name",
    "copy_model_files",
    "fsync_path",
    "load_config",
    "load_yaml",
    "parse_size",
    "plan_shards",
    "raw_bytes",
    "read_header",
    "read_rows",
    "replace_file",
    "row_chunks",
    "safetensors_code",
    "shard_names",
    "torch_dtype",
    "write_synced",
]
