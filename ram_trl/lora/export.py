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
import re
import warnings
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
    max_error: float | None = None,
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

    With ``max_error``, ``rank`` is an upper bound: the factors have the smallest rank whose
    error is at most ``max_error`` (by the singular values: ``sqrt(sum of the dropped s_i^2) /
    ||delta||``), or ``rank`` when none is, and are not padded.

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
    if max_error is not None:
        kept = torch.cumsum(s.double() ** 2, 0)
        tails = (float(norm) ** 2 - kept).clamp(min=0).sqrt() / float(norm)
        fits = (tails <= max_error).nonzero()
        k = int(fits[0]) + 1 if len(fits) else k
        u, s, vh = u[:, :k], s[:k], vh[:k]
        a, b = matrix.new_zeros(k, in_features), matrix.new_zeros(out_features, k)
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
        rank: int | Literal["auto"],
        base_model_name_or_path: str,
        target_modules: Sequence[str] | str | None = None,
        alpha: float | None = None,
        fan_in_fan_out: bool = False,
        embedding_modules: Iterable[str] | None = None,
        method: Literal["svd", "lowrank"] = "svd",
        dtype: torch.dtype = torch.float32,
        task_type: str | None = "CAUSAL_LM",
        max_error: float | None = None,
    ) -> None:
        auto = rank == "auto"
        if not auto and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise InputError(f"rank must be a positive integer or 'auto', got {rank!r}")
        if max_error is not None and not (isinstance(max_error, (int, float)) and max_error >= 0):
            raise InputError(f"max_error must be a number >= 0, got {max_error!r}")
        if auto and alpha is not None:
            raise InputError("rank='auto' sets each module's alpha to its rank; give no alpha")
        self.auto, self.max_error = auto, (0.1 if auto and max_error is None else max_error)
        self.rank: int | str = rank
        self.lora_alpha = float(1 if auto else rank if alpha is None else alpha)
        if not self.lora_alpha > 0:
            raise InputError(f"alpha must be positive, got {alpha!r}")
        self.base_model_name_or_path = base_model_name_or_path
        self.target_modules, self.fan_in_fan_out = target_modules, fan_in_fan_out
        self.method, self.dtype, self.task_type = method, dtype, task_type
        self._embedding_names = set(
            DEFAULT_EMBEDDING_NAMES if embedding_modules is None else embedding_modules
        )
        self._matches = module_matcher(target_modules)
        # rank 'auto': alpha = each module's rank, so scaling is 1 and the factors are stored as is
        self._unscale = 1.0 if auto else 1.0 / math.sqrt(self.lora_alpha / int(rank))
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, dict[str, Any]] = {}
        self.exact: dict[str, torch.Tensor] = {}  # merged values PEFT holds whole (bias, norms)
        self.dropped: dict[str, dict[str, Any]] = {}
        self.zero: list[str] = []
        self._seen: set[str] = set()
        self._squared_error = self._squared_norm = 0.0

    @torch.no_grad()
    def add(self, name: str, delta: torch.Tensor, merged: torch.Tensor | None = None) -> None:
        """Factorize one delta (a PEFT name is normalized with :func:`base_weight_name`).

        A delta LoRA cannot express (a bias, a norm: not a 2-D ``*.weight``) is carried whole
        when ``merged`` (its merged value) is given: a bias as PEFT's ``bias="all"``, any other
        parameter through ``modules_to_save``. Without it, or for a non-float tensor, it is
        recorded under ``dropped``. An all-zero delta is recorded under ``zero``."""
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
        if norm == 0.0 and delta.is_floating_point():
            self.zero.append(name)
            return
        if reason is not None and merged is not None and delta.is_floating_point():
            if tuple(merged.shape) != tuple(delta.shape):
                raise InputError(f"merged value of {name} has shape {tuple(merged.shape)}")
            self.exact[name] = merged.detach().to("cpu").contiguous()
            return
        if reason is not None:
            self.dropped[name] = {"shape": shape, "norm": norm, "reason": reason}
            return
        names = self._embedding_names
        embedding = module in names or module.rsplit(".", 1)[-1] in names
        # PEFT: Linear delta = B @ A; Conv1D (fan_in_fan_out) and Embedding delta = (B @ A).T
        transpose = embedding or self.fan_in_fan_out
        matrix = matrix.T if transpose else matrix
        bound = min(matrix.shape) if self.auto else int(self.rank)
        limit = self.max_error if self.auto else None
        a, b, error = factorize(matrix, bound, method=self.method, max_error=limit)
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
            "rank": int(a.shape[0]),
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
            "error_limit": self.max_error,
            "modules": self.modules,
            "exact": sorted(self.exact),
            "modules_to_save": self._modules_to_save(),
            "dropped": self.dropped,
            "zero": self.zero,
        }

    def _modules_to_save(self) -> list[str]:
        """Modules with a carried parameter other than a bias (norms): PEFT copies them whole."""
        return sorted({module_of(n) for n in self.exact if not n.endswith(".bias")})

    def _exact_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's names for the carried values: a bias of a LoRA module is its base layer's."""
        whole = set(self._modules_to_save())
        out = {}
        for name, value in self.exact.items():
            module = module_of(name)
            if name.endswith(".bias") and module in self.modules and module not in whole:
                out[f"{PEFT_PREFIX}{module}.base_layer.bias"] = value
            else:
                out[f"{PEFT_PREFIX}{name}"] = value
        return out

    def _rank_patterns(self) -> tuple[int, dict[str, int], dict[str, float]]:
        """``r`` and, for rank 'auto', PEFT's per-module ``rank_pattern`` / ``alpha_pattern``
        (full module names, which PEFT matches as a dotted suffix; alpha = rank, so every scaling
        is 1)."""
        if not self.auto:
            return int(self.rank), {}, {}
        ranks = [m["rank"] for m in self.modules.values()]
        r = max(set(ranks), key=ranks.count)
        others = {re.escape(k): m["rank"] for k, m in self.modules.items() if m["rank"] != r}
        return r, others, {k: float(v) for k, v in others.items()}

    def _targets(self) -> list[str] | str:
        targets = sorted(self.modules) if self.target_modules is None else self.target_modules
        return targets if isinstance(targets, str) else list(targets)

    def write(self, directory: Path, out_dir: str | os.PathLike) -> dict[str, Any]:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and the report into
        ``directory`` (the adapter's final place is ``out_dir``); returns the report."""
        from peft import LoraConfig

        report = self.report(out_dir)
        if self.dropped:
            dropped = [
                f"{n} ({d['reason']}, norm {d['norm']:.3g})" for n, d in self.dropped.items()
            ]
            warnings.warn(
                f"{len(self.dropped)} merged delta(s) cannot be carried by the LoRA adapter and "
                f"are NOT in {out_dir}: {few(dropped)}",
                stacklevel=2,
            )
        limit = self.max_error
        if limit is not None and report["error"] > limit:
            warnings.warn(
                f"the LoRA adapter {out_dir} (rank {self.rank}) misses {report['error']:.1%} of "
                f"the merged delta (relative Frobenius error, worst module "
                f"{report['max_error']:.1%}), above the {limit:.1%} allowed: raise the rank, or "
                "use rank 'auto'",
                stacklevel=2,
            )
        r, rank_pattern, alpha_pattern = self._rank_patterns()
        config = LoraConfig(
            r=r,
            lora_alpha=float(r) if self.auto else self.lora_alpha,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            target_modules=self._targets(),
            fan_in_fan_out=self.fan_in_fan_out,
            bias="all" if any(n.endswith(".bias") for n in self.exact) else "none",
            modules_to_save=self._modules_to_save() or None,
            base_model_name_or_path=self.base_model_name_or_path,
            task_type=self.task_type,
            inference_mode=True,
        )
        config.save_pretrained(str(directory))
        tensors = {**self.tensors, **self._exact_tensors()}
        specs = [TensorSpec(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
        size = sum(spec.nbytes for spec in specs)  # one file: PEFT loads no sharded adapter
        with ShardedWriter(
            directory, specs, max_shard_bytes=max(1, size), basename=ADAPTER_BASENAME
        ) as writer:
            for key, tensor in tensors.items():
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
    rows), each floating-point tensor's delta ``merged - base`` (float32, from the stored values)
    is assembled and handed to an :class:`AdapterWriter` as soon as it is complete, and the
    adapter is written at :meth:`close`. One tensor's delta is in memory at a time, never a
    dense merged model on disk. 2-D weights are factorized; biases and norms, which LoRA cannot
    express, are carried whole (their merged values: PEFT's ``bias="all"`` and
    ``modules_to_save``), so the adapter holds every merged delta; integer tensors are the base's.
    """

    def __init__(
        self,
        directory: Path,
        specs: Sequence[TensorSpec],
        *,
        rank: int | Literal["auto"],
        base: str,
        out: str | os.PathLike,
        max_error: float | None = None,
    ) -> None:
        self.directory, self.out = directory, out
        self.writer = AdapterWriter(rank=rank, base_model_name_or_path=base, max_error=max_error)
        self._specs = {s.name: s for s in specs if s.dtype.is_floating_point}
        self._name: str | None = None
        self._delta: torch.Tensor | None = None
        self._merged: torch.Tensor | None = None  # kept for what is carried whole (not 2-D)
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
            whole = len(spec.shape) != 2
            self._merged = torch.empty(spec.numel, dtype=spec.dtype) if whole else None
        assert self._delta is not None
        flat = rows.reshape(-1)
        piece = flat.to(torch.float32) - base.reshape(-1).to(torch.float32)
        stop = self._filled + piece.numel()
        self._delta[self._filled : stop] = piece
        if self._merged is not None:
            self._merged[self._filled : stop] = flat
        self._filled = stop
        if self._filled == spec.numel:
            delta = self._delta.view(spec.shape)
            if bool(delta.any()):
                merged = None if self._merged is None else self._merged.view(spec.shape)
                self.writer.add(name, delta, merged)
            self._name, self._delta, self._merged = None, None, None

    def abort(self) -> None:
        """Nothing is open before :meth:`close`."""

    def close(self) -> list[str]:
        """Write the adapter; returns the names of the files written."""
        self.report = self.writer.write(self.directory, self.out)
        return [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, REPORT_NAME]
