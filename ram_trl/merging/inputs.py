"""Opening and validating the inputs of a merge or probe: one base and N agents.

Everything that can be checked from headers is checked before any tensor is read, so a bad input
fails in seconds with a message naming the file, the tensor and the problem. Any
:class:`~ram_trl.io.WeightSource` can be an input: a checkpoint folder (opened from its path) or a
task-vector snapshot (``ram_trl.snapshot.TaskVectorSource``). Reading them chunk by chunk is
:mod:`ram_trl.merging.chunks`' job.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ram_trl.errors import InputError
from ram_trl.io import ModelFolder, WeightSource, check_name


@dataclass
class MergeInputs:
    """A validated base and its agents, in the order the user gave them."""

    base: WeightSource
    agents: dict[str, WeightSource]
    names: list[str]  # tensor names in the base's on-disk order
    #: (tensor, first row) of the chunks already checked for NaN/Inf, so a second pass skips them
    checked: set[tuple[str, int]] = field(default_factory=set)
    #: a ``ram_trl.merging.chunks.ReadAhead`` reading the next chunk in the background, or None
    read_ahead: Any = None

    @property
    def agent_names(self) -> list[str]:
        return list(self.agents)

    @property
    def float_elements(self) -> int:
        """Elements of the floating-point tensors: what the agents could change."""
        return sum(i.numel for i in self.base.tensors.values() if is_float_tensor(i))

    def progress(self, enabled: bool, desc: str) -> Any:
        """A progress bar over the base's bytes (tqdm on stderr), or one that shows nothing."""
        if not enabled:
            return _NoBar()
        from tqdm.auto import tqdm

        total = sum(info.nbytes for info in self.base.tensors.values())
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False)

    def close(self) -> None:
        for source in (self.base, *self.agents.values()):
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> MergeInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def is_float_tensor(info: Any) -> bool:
    return info.dtype.is_floating_point


def open_source(source: str | os.PathLike | WeightSource) -> WeightSource:
    """A path opens as a checkpoint folder; any other weight source passes through."""
    return ModelFolder(source) if isinstance(source, (str, os.PathLike)) else source


def input_paths(
    base: str | os.PathLike | WeightSource | None,
    agents: Mapping[str, str | os.PathLike | WeightSource],
) -> dict[str, Path]:
    """Every folder a merge reads, labelled for messages: the base, each agent, and for an agent
    read from a snapshot both the snapshot and the base it is applied to."""
    paths: dict[str, Path] = {}

    def add(label: str, source: Any) -> None:
        if isinstance(source, (str, os.PathLike)):
            paths[label] = Path(source)
        elif getattr(source, "path", None) is not None:
            paths[label] = Path(source.path)
            inner = getattr(source, "base", None)
            if inner is not None and getattr(inner, "path", None) is not None:
                paths.setdefault("the base", Path(inner.path))

    if base is not None:
        add("the base", base)
    for name, agent in agents.items():
        add(f"agent {name!r}", agent)
    return paths


def check_output_disjoint(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike]) -> None:
    """Refuse an output folder that is, contains or lies inside one of ``inputs`` (label ->
    folder), before anything is written: publishing it (``--overwrite`` renames the old folder
    away) would delete or rewrite an input. Symlinks are resolved first."""
    target = Path(out).resolve()
    for label, path in inputs.items():
        theirs = Path(path).resolve()
        if target == theirs:
            relation = "is"
        elif theirs.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(theirs):
            relation = "lies inside"
        else:
            continue
        raise InputError(
            f"output {out} {relation} {label} ({path}): an output may not overlap an input; "
            "choose another output folder"
        )


def open_inputs(
    base: str | os.PathLike | WeightSource,
    agents: Mapping[str, str | os.PathLike | WeightSource],
) -> MergeInputs:
    """Open the base and the agents and check that they can be merged, reading headers only."""
    if not agents:
        raise InputError("no agents to merge: give at least one agent (--agent NAME=PATH)")
    for name in agents:
        check_name(name)
    base_source = open_source(base)
    inputs = MergeInputs(base_source, {}, list(base_source.tensors))
    try:
        for name, agent in agents.items():
            inputs.agents[name] = source = open_source(agent)
            _check_architecture(base_source, name, source)
            _check_tensors(base_source, name, source)
    except BaseException:
        inputs.close()
        raise
    _warn_same_folders(inputs)
    for name, source in inputs.agents.items():
        _warn_narrower(base_source, name, source)
    return inputs


def _warn_narrower(base: WeightSource, name: str, agent: WeightSource) -> None:
    """Say once per agent that it is compared at its own, lower precision (see
    ``ram_trl.methods.base.compared_base``): its changed fractions are then its real ones."""
    for tensor, info in base.tensors.items():
        theirs = agent.tensors[tensor].dtype
        if theirs.is_floating_point and theirs.itemsize < info.dtype.itemsize:
            warnings.warn(
                f"agent {name!r} ({agent.path}) is stored in {_dtype_name(theirs)}, the base in "
                f"{_dtype_name(info.dtype)} (tensor {tensor!r}): it is compared with the base "
                f"rounded to {_dtype_name(theirs)}, so rounding is not counted as a change, and "
                f"the elements it did not change keep the base's {_dtype_name(info.dtype)} values",
                stacklevel=4,
            )
            return


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _warn_same_folders(inputs: MergeInputs) -> None:
    """Warn when two agents are one folder (a copy-paste slip that counts it twice)."""
    seen: dict[tuple[int, int], str] = {}
    for name, source in inputs.agents.items():
        try:
            st = os.stat(source.path)
        except (OSError, TypeError):
            continue
        first = seen.setdefault((st.st_dev, st.st_ino), name)
        if first != name:
            warnings.warn(
                f"agents {first!r} and {name!r} are the same folder ({source.path}): it is "
                "merged twice, as two agents",
                stacklevel=3,
            )


def _architecture(config: dict | None) -> tuple[str | None, tuple[str, ...]]:
    if not config:
        return None, ()
    return config.get("model_type"), tuple(config.get("architectures") or ())


def _check_architecture(base: WeightSource, name: str, agent: WeightSource) -> None:
    base_type, base_arch = _architecture(base.config)
    agent_type, agent_arch = _architecture(agent.config)
    if base_type and agent_type and (base_type, base_arch) != (agent_type, agent_arch):
        raise InputError(
            f"agent {name!r} ({agent.path / 'config.json'}) is a {agent_type} model "
            f"{list(agent_arch)}, but the base ({base.path / 'config.json'}) is a {base_type} "
            f"model {list(base_arch)}: only fine-tunes of the same base can be merged"
        )


def _check_tensors(base: WeightSource, name: str, agent: WeightSource) -> None:
    missing = [t for t in base.tensors if t not in agent.tensors]
    extra = [t for t in agent.tensors if t not in base.tensors]
    where = f"agent {name!r} ({agent.path})"
    if missing:
        raise InputError(
            f"{where} lacks {len(missing)} tensor(s) that the base ({base.path}) has: "
            f"{_few(missing)}"
        )
    if extra:
        raise InputError(
            f"{where} has {len(extra)} tensor(s) that the base ({base.path}) lacks: {_few(extra)}"
        )
    for tensor, info in base.tensors.items():
        theirs = agent.tensors[tensor]
        if tuple(theirs.shape) == tuple(info.shape):
            continue
        message = (
            f"tensor {tensor!r} has shape {tuple(theirs.shape)} in {where}, file "
            f"{theirs.file}, but {tuple(info.shape)} in the base, file {info.file}"
        )
        if _is_vocabulary_resize(tensor, info.shape, theirs.shape):
            message += (
                f": the agent's vocabulary was resized ({info.shape[0]} -> {theirs.shape[0]} "
                "rows); merge agents that keep the base's vocabulary, or resize the base first"
            )
        raise InputError(message)


def _is_vocabulary_resize(tensor: str, base_shape: tuple, agent_shape: tuple) -> bool:
    same_rest = tuple(base_shape[1:]) == tuple(agent_shape[1:]) and len(base_shape) >= 1
    return same_rest and any(key in tensor for key in ("embed", "lm_head", "wte", "output"))


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
