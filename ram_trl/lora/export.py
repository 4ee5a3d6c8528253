"""From a merged dense delta back to a PEFT LoRA adapter: truncated SVD per module.

:func:`factorize` splits one 2-D delta into ``B @ A`` of a given rank; :class:`AdapterWriter`
factorizes deltas one at a time and writes a folder that ``PeftModel.from_pretrained`` loads;
:func:`save_lora_adapter` does both for a mapping or a stream of deltas; :class:`LoraSink` is the
merge engine's LoRA output, fed the merged model's rows as they are computed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ram_trl.errors import InputError
from ram_trl.io import ShardedWriter, TensorSpec, atomic_directory
from ram_trl.lora.names import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DEFAULT_EMBEDDING_NAMES,
    PEFT_PREFIX,
    REPORT_NAME,
    base_weight_name,
    few,
    module_matcher,
    module_of,
)

logger = logging.getLogger(__name__)
ADAPTER_BASENAME = ADAPTER_WEIGHTS_NAME.removesuffix(".safetensors")


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


class AdapterWriter:
    """Dense deltas in, a PEFT LoRA adapter out: each delta is factorized as soon as it is given
    (:meth:`add`), so only the small factors are kept; :meth:`write` then writes the folder.

    What :func:`save_lora_adapter` and the LoRA output of a merge (:class:`LoraSink`) are built
    on; its keyword arguments are described under :func:`save_lora_adapter`.
    """

    def __init__(
        self,
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
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InputError(f"rank must be a positive integer, got {rank!r}")
        self.rank, self.lora_alpha = rank, float(rank if alpha is None else alpha)
        if not self.lora_alpha > 0:
            raise InputError(f"alpha must be positive, got {alpha!r}")
        self.base_model_name_or_path = base_model_name_or_path
        self.target_modules, self.fan_in_fan_out = target_modules, fan_in_fan_out
        self.method, self.dtype, self.task_type = method, dtype, task_type
        self._embedding_names = set(
            DEFAULT_EMBEDDING_NAMES if embedding_modules is None else embedding_modules
        )
        self._matches = module_matcher(target_modules)
        self._unscale = 1.0 / math.sqrt(self.lora_alpha / rank)
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, dict[str, Any]] = {}
        self.dropped: dict[str, dict[str, Any]] = {}
        self.zero: list[str] = []
        self._seen: set[str] = set()
        self._squared_error = self._squared_norm = 0.0

    @torch.no_grad()
    def add(self, name: str, delta: torch.Tensor) -> None:
        """Factorize one delta (a PEFT name is normalized with :func:`base_weight_name`); one that
        LoRA cannot express is recorded under ``dropped``, an all-zero one under ``zero``."""
        name = base_weight_name(name)
        if name in self._seen:
            raise InputError(f"delta {name} is given twice")
        self._seen.add(name)
        module = module_of(name)
        shape = list(delta.shape)
        reason = None
        if not delta.is_floating_point():
            reason = f"not a floating-point tensor ({delta.dtype})"
        elif delta.ndim != 2 or not name.endswith(".weight"):
            reason = (
                f"a {delta.ndim}-D tensor {name.rsplit('.', 1)[-1]!r}: LoRA expresses 2-D weights"
            )
        elif not self._matches(module):
            reason = "its module is not matched by target_modules"
        matrix = delta.detach().to(torch.float32)
        norm = float(torch.linalg.vector_norm(matrix)) if delta.is_floating_point() else 0.0
        if reason is not None:
            self.dropped[name] = {"shape": shape, "norm": norm, "reason": reason}
            return
        if norm == 0.0:
            self.zero.append(name)
            return
        names = self._embedding_names
        embedding = module in names or module.rsplit(".", 1)[-1] in names
        # PEFT: Linear delta = B @ A; Conv1D (fan_in_fan_out) and Embedding delta = (B @ A).T
        transpose = embedding or self.fan_in_fan_out
        a, b, error = factorize(matrix.T if transpose else matrix, self.rank, method=self.method)
        key = f"{PEFT_PREFIX}{module}"
        a_key, b_key = (
            (f"{key}.lora_embedding_A", f"{key}.lora_embedding_B")
            if embedding
            else (f"{key}.lora_A.weight", f"{key}.lora_B.weight")
        )
        self.tensors[a_key] = (a * self._unscale).to("cpu", self.dtype).contiguous()
        self.tensors[b_key] = (b * self._unscale).to("cpu", self.dtype).contiguous()
        self.modules[module] = {
            "shape": shape,
            "kind": "embedding" if embedding else "linear",
            "norm": norm,
            "error": error,
        }
        self._squared_error += (error * norm) ** 2
        self._squared_norm += norm**2

    def report(self, out_dir: str | os.PathLike) -> dict[str, Any]:
        """What :func:`save_lora_adapter` returns (see there); refuses an empty adapter."""
        if not self.modules:
            raise InputError(
                "no 2-D weight delta to write as LoRA"
                + (f"; dropped: {few(sorted(self.dropped))}" if self.dropped else "")
                + (f"; all-zero: {few(self.zero)}" if self.zero else "")
            )
        targets = self._targets()
        return {
            "out_dir": str(out_dir),
            "rank": self.rank,
            "lora_alpha": self.lora_alpha,
            "method": self.method,
            "target_modules": targets,
            "error": math.sqrt(self._squared_error / self._squared_norm),
            "max_error": max(m["error"] for m in self.modules.values()),
            "modules": self.modules,
            "dropped": self.dropped,
            "zero": self.zero,
        }

    def _targets(self) -> list[str] | str:
        targets = sorted(self.modules) if self.target_modules is None else self.target_modules
        return targets if isinstance(targets, str) else list(targets)

    def write(self, directory: Path, out_dir: str | os.PathLike) -> dict[str, Any]:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and the report into
        ``directory`` (the adapter's final place is ``out_dir``); returns the report."""
        from peft import LoraConfig

        report = self.report(out_dir)
        if self.dropped:
            logger.warning(
                "save_lora_adapter: %d delta(s) cannot be expressed as LoRA and are NOT in %s: %s",
                len(self.dropped),
                out_dir,
                few(
                    [f"{n} ({d['reason']}, norm {d['norm']:.3g})" for n, d in self.dropped.items()]
                ),
            )
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            target_modules=self._targets(),
            fan_in_fan_out=self.fan_in_fan_out,
            bias="none",
            base_model_name_or_path=self.base_model_name_or_path,
            task_type=self.task_type,
            inference_mode=True,
        )
        config.save_pretrained(str(directory))
        specs = [TensorSpec(k, tuple(t.shape), t.dtype) for k, t in self.tensors.items()]
        size = sum(spec.nbytes for spec in specs)  # one file: PEFT loads no sharded adapter
        with ShardedWriter(
            directory, specs, max_shard_bytes=max(1, size), basename=ADAPTER_BASENAME
        ) as writer:
            for key, tensor in self.tensors.items():
                writer.write(key, tensor)
        (directory / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        return report


def save_lora_adapter(
    deltas: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    **options: Any,
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
    writer = AdapterWriter(**options)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"output folder {out} already exists; pass overwrite=True to replace it")
    for name, delta in deltas.items() if isinstance(deltas, Mapping) else deltas:
        writer.add(name, delta)
    writer.report(out)  # refuse an empty adapter before anything is written
    with atomic_directory(out, overwrite=overwrite) as tmp:
        return writer.write(tmp, out)


class LoraSink:
    """The LoRA output of a merge: the merged model's rows come in chunk by chunk (with the base
    rows), each 2-D floating-point tensor's delta ``merged - base`` (float32, from the stored
    values) is assembled and handed to an :class:`AdapterWriter` as soon as it is complete, and
    the adapter is written at :meth:`close`. One tensor's delta is in memory at a time, never a
    dense merged model on disk. Other tensors (1-D, integer) cannot be expressed as LoRA and are
    left out; all-zero deltas too.
    """

    def __init__(
        self,
        directory: Path,
        specs: Sequence[TensorSpec],
        *,
        rank: int,
        base: str,
        out: str | os.PathLike,
    ) -> None:
        self.directory, self.out = directory, out
        self.writer = AdapterWriter(rank=rank, base_model_name_or_path=base)
        self._specs = {s.name: s for s in specs if s.dtype.is_floating_point and len(s.shape) == 2}
        self._name: str | None = None
        self._delta: torch.Tensor | None = None
        self._filled = 0
        self.report: dict[str, Any] | None = None  # save_lora_adapter's, once closed

    def write(self, name: str, rows: torch.Tensor, base: torch.Tensor) -> None:
        """The next merged rows of tensor ``name`` (output dtype) and the same rows of the base."""
        spec = self._specs.get(name)
        if spec is None:
            return
        if name != self._name:
            self._name, self._filled = name, 0
            self._delta = torch.empty(spec.numel, dtype=torch.float32)
        assert self._delta is not None
        piece = rows.reshape(-1).to(torch.float32) - base.reshape(-1).to(torch.float32)
        self._delta[self._filled : self._filled + piece.numel()] = piece
        self._filled += piece.numel()
        if self._filled == spec.numel:
            delta = self._delta.view(spec.shape)
            if bool(delta.any()):
                self.writer.add(name, delta)
            self._name, self._delta = None, None

    def abort(self) -> None:
        """Nothing is open before :meth:`close`."""

    def close(self) -> list[str]:
        """Write the adapter; returns the names of the files written."""
        self.report = self.writer.write(self.directory, self.out)
        return [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, REPORT_NAME]
