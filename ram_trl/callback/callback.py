"""``RAMCallback``: task-vector snapshots and RAM merges inside any ``transformers.Trainer``.

Add it to each agent's trainer (GRPO, RLOO, PPO or a plain ``Trainer``), all sharing one store::

    trainer.add_callback(RAMCallback(trainer, RAMConfig(store="runs/store", agent="math")))

At every save (or every N steps) the agent's task vector goes to the store; once the store holds
two or more agents, their newest snapshots are merged into ``<store>/merged/step-<N>/`` and the
merged model is evaluated next to the agent. The hooks receive no trainer, so the callback holds
the one it is given. All the work is done by :mod:`ram_trl.callback.capture`,
:mod:`~ram_trl.callback.merging` and :mod:`ram_trl.evaluation`; this module only
decides when, on which rank, and what to log.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ram_trl.callback.capture import BASE_DIR, snapshot_model, write_base
from ram_trl.callback.config import RAMConfig
from ram_trl.callback.merging import BackgroundMerge, latest_snapshots, merge_snapshots
from ram_trl.callback.weights import base_rename, iter_state, root_module
from ram_trl.errors import InputError
from ram_trl.lora import density_warning, is_peft_model
from ram_trl.merging.report import MergeReport


def _as_config(config: RAMConfig | Mapping[str, Any] | str | os.PathLike) -> RAMConfig:
    if isinstance(config, RAMConfig):
        return config
    if isinstance(config, Mapping):
        return RAMConfig.from_dict(config)
    return RAMConfig.from_yaml(config)


def _open_store(root: str) -> Any:
    from ram_trl.snapshot import SnapshotStore

    try:
        store = SnapshotStore(root)
        probe = Path(root) / "agents" / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot use {root} as a snapshot store: {e}") from None
    return store


def _sharded(model: torch.nn.Module) -> bool:
    """ZeRO-3 or FSDP2: no rank holds whole tensors, so reading them is collective."""
    return any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in model.parameters())


def _live_base_fingerprint(model: torch.nn.Module) -> str:
    from ram_trl.snapshot import fingerprint_state_dict

    state = dict(iter_state(root_module(model), rename=base_rename(model)))
    return fingerprint_state_dict(state)  # type: ignore[arg-type]


class RAMCallback(TrainerCallback):
    """Snapshots this agent's task vector, merges the store's agents with RAM/RAM+ and evaluates
    the merged model, at checkpoints, from inside training.

    theta_0, and memory: with ``config.base`` (the base checkpoint the model was loaded from),
    snapshots stream it from disk; nothing stays in memory. Without it, the model's weights at
    train begin are theta_0: they are written once, streamed tensor by tensor, to
    ``<store>/base/`` (a loadable HF folder, published atomically), and every later snapshot
    streams that folder. Either way rank 0 holds one tensor of each side at a time, plus one
    gathered module under ZeRO-3; the store costs one base-size copy on disk instead of a
    second model in RAM. For a PEFT model theta_0 is the frozen base, which LoRA never changes.
    The base's fingerprint is checked against the store at construction (a store of another
    base is an InputError naming both); a resumed run (``train(resume_from_checkpoint=...)``)
    keeps the stored theta_0 instead of its resumed weights.

    Ranks: every rank calls the hooks; rank 0 writes, merges, evaluates and logs, the others
    take part in the gathers of sharded models and then wait at a barrier.

    Metrics (through ``Trainer.log``, so wandb/tensorboard see them): ``ram/changed_fraction``,
    ``ram/snapshot_mb``, ``ram/snapshot_seconds``, and after a merge ``ram/merge_seconds``
    (training paused), ``ram/unique_share``, ``ram/rho/<agent>``, ``ram/lambda/<agent>``,
    ``ram/overlap/<agent>``, ``eval_merged/<task>/reward``, ``eval_agent/<task>/reward`` and
    (``eval_base``) ``eval_base/<task>/reward``.
    """

    def __init__(self, trainer: Trainer, config: RAMConfig | Mapping[str, Any] | str | os.PathLike):
        self.trainer, self.config = trainer, _as_config(config)
        self.store = _open_store(self.config.store)
        self.peft = is_peft_model(trainer.model)
        if self.peft:
            from ram_trl.lora import lora_deltas

            lora_deltas(trainer.model)  # validates eagerly: DoRA & co. fail here, not at a save
        self.base_dir: Path | None = None
        self._replace = self.config.overwrite
        self._last_step: int | None = None
        self._snapshots = 0
        self._background: BackgroundMerge | None = None
        self._base_rewards: dict[str, float] | None = None
        self._warned = False
        self._touched_fraction = 0.0
        self._check_base()

    # -- theta_0 -----------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.trainer.accelerator.is_main_process

    def _barrier(self) -> None:
        self.trainer.accelerator.wait_for_everyone()

    def _recorded_base(self) -> str | None:
        return self.store.base_path

    def _check_base(self) -> None:
        from ram_trl.snapshot import fingerprint_folder

        if self.config.base is not None:
            fp = fingerprint_folder(self.config.base)
            self.store.check_base(fp, self.config.base, self.config.base)
            self.base_dir = Path(self.config.base)
            return
        recorded = self.store.base_fingerprint
        if recorded is None:
            return  # a new store: theta_0 is written at train begin
        if not _sharded(self.trainer.model):
            fp = _live_base_fingerprint(self.trainer.model)
            if fp != recorded:
                raise InputError(
                    f"the model of agent {self.config.agent!r} has base fingerprint {fp}, but the "
                    f"store {self.store.root} holds task vectors of base {recorded} (from "
                    f"{self._recorded_base()}): use one store per base model, or build the model "
                    "from the original base and resume with train(resume_from_checkpoint=...)"
                )
        for candidate in (self.store.root / BASE_DIR, self._recorded_base()):
            if candidate is not None and (Path(candidate) / "config.json").is_file():
                self.base_dir = Path(candidate)
                return

    def _ensure_base(self, resumed: bool) -> None:
        if self.base_dir is not None:
            return
        folder = self.store.root / BASE_DIR
        if not folder.is_dir() and resumed:
            raise InputError(
                f"resuming agent {self.config.agent!r}, but the store {self.store.root} has no "
                "theta_0 (base/): pass RAMConfig(base=...) with the original base checkpoint"
            )
        if not folder.is_dir():
            try:
                tokenizer = getattr(self.trainer, "processing_class", None)
                write_base(folder, self.trainer.model, tokenizer, main=self.is_main)
            except InputError:  # another job published it first: checked just below
                pass
        self._barrier()
        if self.is_main:
            from ram_trl.snapshot import fingerprint_folder

            self.store.check_base(fingerprint_folder(folder), folder, str(folder))
        self.base_dir = folder
        self._check_base()  # the live weights against what is now recorded

    # -- hooks -------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        resumed = state.global_step > 0
        self._ensure_base(resumed)
        agent, steps = self.config.agent, self.store.steps(self.config.agent)
        if resumed:
            self._replace = True
            if self.is_main:  # snapshots the abandoned run wrote after its last checkpoint
                for step in (s for s in steps if s > state.global_step):
                    self.store.remove(agent, step)
        elif steps and not self.config.overwrite:
            raise InputError(
                f"the store {self.store.root} already holds snapshots of agent {agent!r} (steps "
                f"{steps}): resume with train(resume_from_checkpoint=...), pick another agent "
                "name, or set overwrite=True"
            )
        self._barrier()

    def on_step_end(self, args, state, control, **kwargs):
        self._poll_background()
        every = self.config.snapshot_steps
        if every is not None and state.global_step % every == 0:
            self.checkpoint(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.config.snapshot_steps is None and state.global_step != self._last_step:
            self.checkpoint(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.config.snapshot_on_train_end and state.global_step != self._last_step:
            self.checkpoint(state.global_step)
        if self._background is not None and self.is_main:
            self._finish_background()

    # -- the work ----------------------------------------------------------------------------

    def checkpoint(self, step: int) -> None:
        """Snapshot the current weights as ``step``; merge and evaluate when due. Call on every
        rank (the hooks do)."""
        assert self.base_dir is not None, "on_train_begin has not run"
        path, seconds = snapshot_model(
            self.store,
            self.config.agent,
            step,
            self.trainer.model,
            self.base_dir,
            epsilon=self.config.snapshot_epsilon,
            replace=self._replace,
            main=self.is_main,
        )
        self._last_step, self._snapshots = step, self._snapshots + 1
        if self.is_main:
            assert path is not None
            logs = self._snapshot_logs(path, seconds)
            if self.config.keep_last is not None:
                self.store.prune(self.config.agent, self.config.keep_last)
            every = self.config.merge_every
            if every and self._snapshots % every == 0:
                logs.update(self._merge(step))
            self._log(logs)
        self._barrier()

    def _snapshot_logs(self, path: Path, seconds: float) -> dict[str, float]:
        from ram_trl.snapshot import validate

        manifest = validate(path)
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        logs = {
            "ram/changed_fraction": manifest.density,
            "ram/snapshot_mb": size / 1e6,
            "ram/snapshot_seconds": seconds,
        }
        touched = [e for e in manifest.tensors.values() if e.nnz]
        self._touched_fraction = (
            sum(e.nnz for e in touched) / max(1, sum(e.numel for e in touched))
            if self.peft
            else manifest.density
        )
        if self.peft:
            logs["ram/lora_changed_fraction"] = self._touched_fraction
        return logs

    def _merge(self, step: int) -> dict[str, float]:
        snapshots = latest_snapshots(self.store)
        if len(snapshots) < self.config.min_agents:
            return {}
        out = self.store.merged_dir(self.config.merged_model_name(step))
        fallback = self.store.merged_dir(f"{out.name}-{self.config.agent}")
        if out.exists():  # another agent's job merged at this step number
            out = fallback
        cfg = self.config
        job = dict(
            base=str(self.base_dir),
            snapshots=snapshots,
            out=str(out),
            fallback_out=str(fallback) if fallback != out else None,
            method=cfg.merge_method,
            params=dict(cfg.merge_params),
            dtype=cfg.merge_dtype,
            output=cfg.merge_output,
            lora_rank=cfg.lora_rank,
        )
        if cfg.merge_background:
            if self._background is None:
                self._background = BackgroundMerge(job, step)
            return {}
        started = time.perf_counter()
        report = merge_snapshots(**job)
        logs = self._merge_logs(report)
        logs["ram/merge_seconds"] = time.perf_counter() - started
        logs.update(self._evaluate(Path(report.out)))
        return logs

    def _merge_logs(self, report: MergeReport) -> dict[str, float]:
        logs: dict[str, float] = {"ram/merged_agents": float(len(report.agents))}
        for a in report.agents:
            name, changed = a.name, max(1, a.changed)
            logs[f"ram/lambda/{name}"] = a.lambda_
            logs[f"ram/overlap/{name}"] = a.shared / changed
            if a.rho is not None:
                logs[f"ram/rho/{name}"] = a.rho
            if name == self.config.agent:
                logs["ram/unique_share"] = a.unique / changed
                message = (
                    density_warning(
                        min(1.0, self._touched_fraction), a.shared / changed, lora=self.peft
                    )
                    if a.changed
                    else None
                )
                logs["ram/averaging_warning"] = float(message is not None)
                if message and not self._warned:
                    warnings.warn(f"agent {name!r}: {message}", stacklevel=2)
                    self._warned = True
        if report.lora is not None:
            logs["ram/lora_error"] = report.lora.error
        return logs

    def _poll_background(self) -> None:
        if self._background is not None and self.is_main and self._background.done():
            self._finish_background()

    def _finish_background(self) -> None:
        assert self._background is not None
        job, self._background = self._background, None
        started = time.perf_counter()
        report = job.result()
        logs = self._merge_logs(report)
        logs["ram/merge_wait_seconds"] = time.perf_counter() - started
        logs.update(self._evaluate(Path(report.out)))
        self._log(logs)

    # -- evaluation --------------------------------------------------------------------------

    def _evaluate(self, merged: Path) -> dict[str, float]:
        from ram_trl.evaluation import evaluate, load_model

        cfg = self.config
        if not cfg.eval_tasks:
            return {}
        started = time.perf_counter()
        tokenizer = getattr(self.trainer, "processing_class", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps one
        device = torch.device("cpu") if cfg.eval_device == "cpu" else self.trainer.args.device
        logs: dict[str, float] = {}

        def run(prefix: str, model: torch.nn.Module) -> dict[str, float]:
            out = {}
            for task in cfg.eval_tasks:
                for key, value in evaluate(model, tokenizer, task, cfg.generation).items():
                    out[f"{prefix}/{task.name}/{key}"] = value
            return out

        model = load_model(merged, self.base_dir, device, lora=cfg.merge_output == "lora")
        logs.update(run("eval_merged", model))
        del model
        if cfg.eval_agent:
            logs.update(run("eval_agent", self._agent_model(device)))
        if cfg.eval_base:
            if self._base_rewards is None:
                base = load_model(self.base_dir, self.base_dir, device, lora=False)
                self._base_rewards = run("eval_base", base)
            logs.update(self._base_rewards)
        logs["ram/eval_seconds"] = time.perf_counter() - started
        return logs

    def _agent_model(self, device: torch.device) -> torch.nn.Module:
        """The live model when this rank holds it whole; else rebuilt from its last snapshot."""
        model = self.trainer.model
        if not _sharded(model):
            return model
        from transformers import AutoModelForCausalLM

        from ram_trl.evaluation import whole_on_this_rank

        ref = self.store.latest(self.config.agent)
        state = ref.load().apply(self.base_dir)
        with whole_on_this_rank():
            rebuilt = AutoModelForCausalLM.from_pretrained(self.base_dir)
        rebuilt.load_state_dict(state, strict=False)  # strict=False: tied aliases are absent
        return rebuilt.to(device)

    def _log(self, logs: dict[str, float]) -> None:
        # Trainer.log itself, not the trainer's override: GRPO's log() would flush (and so
        # misattribute) its accumulated training metrics into this entry.
        if logs:
            Trainer.log(self.trainer, dict(logs))


def attach(
    trainer: Trainer, config: RAMConfig | Mapping[str, Any] | str | None = None, **kwargs: Any
) -> RAMCallback:
    """Build a :class:`RAMCallback` from a config (object, mapping or YAML path) and/or keyword
    fields, add it to ``trainer`` and return it."""
    if config is None:
        config = RAMConfig.from_dict(kwargs)
    elif kwargs:
        import dataclasses

        base = _as_config(config)
        data = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        config = RAMConfig.from_dict({**data, **kwargs})
    callback = RAMCallback(trainer, config)
    trainer.add_callback(callback)
    return callback
