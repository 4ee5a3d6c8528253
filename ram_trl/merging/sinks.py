"""Where the engine writes a merged model: the interface, and the full-model output.

The engine produces the merged model tensor by tensor, row chunk by row chunk, and hands each
chunk to a sink together with the same rows of the base. :class:`ModelSink` streams them into
``save_pretrained``-style shards; ``ram_trl.lora.LoraSink`` re-factorizes each tensor's delta into
a LoRA adapter instead, so neither needs a dense merged model on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from ram_trl.io import ShardedWriter, TensorSpec


class OutputSink(Protocol):
    """Receives a merged model in ``specs`` order, chunk by chunk."""

    def write(self, name: str, rows: torch.Tensor, base: torch.Tensor) -> None:
        """The next merged rows of tensor ``name`` (output dtype) and the base's same rows."""
        ...

    def close(self) -> list[str]:
        """Finish; the names of the files written."""
        ...

    def abort(self) -> None:
        """Give up after an error: close open files, write nothing more."""
        ...


class ModelSink:
    """A full model: the merged rows streamed into safetensors shards of ``max_shard_bytes``."""

    def __init__(self, directory: Path, specs: Sequence[TensorSpec], max_shard_bytes: int):
        self.writer = ShardedWriter(directory, specs, max_shard_bytes=max_shard_bytes)

    def write(self, name: str, rows: torch.Tensor, base: torch.Tensor) -> None:
        self.writer.write(name, rows)

    def close(self) -> list[str]:
        return [path.name for path in self.writer.close()]

    def abort(self) -> None:
        self.writer.abort()
