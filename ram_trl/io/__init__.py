"""Checkpoint input and output: lazy row-range reads of Hugging Face safetensors folders, and
streaming, atomic writes of ``save_pretrained``-style sharded checkpoints."""

from __future__ import annotations

from ram_trl.io.checkpoint import ModelFolder, TensorInfo, TensorSpec, load_config
from ram_trl.io.writer import (
    ShardedWriter,
    atomic_directory,
    copy_model_files,
    parse_size,
    plan_shards,
)

__all__ = [
    "ModelFolder",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "atomic_directory",
    "copy_model_files",
    "load_config",
    "parse_size",
    "plan_shards",
]
