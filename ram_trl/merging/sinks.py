"""Where the engine writes a merged model: the interface, and the full-model output.

The engine produces the merged model tensor by tensor, row chunk by row chunk, and hands each
chunk to a sink together with the same rows of the base. :class:`ModelSink` streams them into
``save_pretrained``-style shards; ``ram_trl.lora.LoraSink`` re-factorizes each tensor's delta into
a LoRA adapter instead, so neither needs a dense merged model on disk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

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
    """A full model: the merged rows streamed into safetensors files by ``writer``, a
    ``ShardedWriter`` of the whole model (:meth:`sharded`) or, in a merge split across ranks,
    a ``RegionWriter`` of this rank's tensors in the laid-out files."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def sharded(
        cls, directory: Path, specs: Sequence[TensorSpec], max_shard_bytes: int
    ) -> ModelSink:
        """Shards of at most ``max_shard_bytes`` in ``directory``, ``save_pretrained``-style."""
        return cls(ShardedWriter(directory, specs, max_shard_bytes=max_shard_bytes))

    def write(self, name: str, rows: torch.Tensor, base: torch.Tensor) -> None:
        self.writer.write(name, rows)

    def close(self) -> list[str]:
        return [path.name for path in self.writer.close()]

    def abort(self) -> None:
        self.writer.abort()


class BackgroundSink:
    """Hands another sink its chunks on a writer thread, so that writing (and a LoRA sink's
    SVDs) overlaps reading and merging the next chunks.

    The queue holds at most ``depth`` chunks, so a slow disk makes the merge wait instead of
    buffering the model. The chunks reach the sink in the order they were written, on one
    thread, so the files are the same bytes. The first error the sink raises is raised again
    from the next :meth:`write` or from :meth:`close`.
    """

    def __init__(self, sink: OutputSink, depth: int = 2) -> None:
        self.sink = sink
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ram-trl-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._stop.is_set():
                continue  # drain: the merge stops at its next write
            try:
                self.sink.write(*item)
            except BaseException as e:  # noqa: BLE001 - raised again on the merge's thread
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, name: str, rows: torch.Tensor, base: torch.Tensor) -> None:
        self._raise()
        self._queue.put((name, rows, base))

    def close(self) -> list[str]:
        self._queue.put(None)
        self._thread.join()
        self._raise()
        return self.sink.close()

    def abort(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join()
        self.sink.abort()
