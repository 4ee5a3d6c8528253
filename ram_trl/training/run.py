"""``AgentRun``: one agent's RAM work inside any training loop.

Any loop (a ``transformers.Trainer`` through :class:`~ram_trl.callback.RAMCallback`, a PPO loop
written by hand, a veRL-style worker) drives one agent of a multi-agent run through four calls::

    run = AgentRun(model, RAMConfig(store="runs/store", agent="math"), tokenizer=tokenizer)
    run.start()                           # theta_0 on disk, the store checked
    for step in ...:
        ...                               # train
        if step % 100 == 0:
            log(run.snapshot_and_merge(step))  # the task vector; a merge when one is due
    log(run.close())                      # a background merge still running, finished

Every call is made on every rank (gathers of ZeRO-3 / FSDP2 weights are collective); rank 0
writes, evaluates and returns the metrics, the others return ``{}`` after a barrier.
The ranks come from ``torch.distributed`` unless given (``Ranks.from_accelerator``). An
in-process merge (``merge="self"``, a full-model output) of a job with several ranks is split
across them (:mod:`ram_trl.merging.split`): rank 0 decides whether one is due and which state
of the store it merges, every rank learns that one decision and merges its share; a background
merge is one subprocess of rank 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ram_trl.distributed import Ranks, is_sharded
from ram_trl.errors import InputError
from ram_trl.evaluation import TrainerContext
from ram_trl.lora import density_warning, is_peft_model, root_module
from ram_trl.merging.engine import parse_dtype
from ram_trl.merging.report import MergeReport
from ram_trl.merging.split import Split
from ram_trl.training.capture import (
    BASE_DIR,
    BackgroundSnapshots,
    TakenWeights,
    publish_taken,
    snapshot_model,
    write_base,
)
from ram_trl.training.config import RAMConfig
from ram_trl.training.jobs import BackgroundMerge, MergeOutcome, merge_store
from ram_trl.training.scoring import Scorer, timed
from ram_trl.training.weights import base_rename, cast_stream, iter_state, policy_of

if TYPE_CHECKING:
    from ram_trl.snapshot.merged import MergedEntry

logger = logging.getLogger(__name__)


def as_config(config: RAMConfig | Mapping[str, Any] | str | os.PathLike) -> RAMConfig:
    """A :class:`RAMConfig` from itself, a mapping of its fields, or a YAML path."""
    if isinstance(config, RAMConfig):
        return config
    if isinstance(config, Mapping):
        return RAMConfig.from_dict(config)
    return RAMConfig.from_yaml(config)


def _open_store(root: str) -> Any:
    from ram_trl.snapshot import SnapshotStore

    try:
        store = SnapshotStore(Path(root).absolute())  # reports and cards then name absolute paths
        probe = Path(root) / "agents" / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot use {root} as a snapshot store: {e}") from None
    return store


def _live_base_fingerprint(model: nn.Module, dtype: torch.dtype | None) -> str:
    from ram_trl.snapshot import fingerprint_state_dict

    state = dict(cast_stream(iter_state(root_module(model), rename=base_rename(model)), dtype))
    return fingerprint_state_dict(state)  # type: ignore[arg-type]


class AgentRun:
    """Snapshots one agent's task vector, merges the store's agents with RAM/RAM+ and evaluates
    the merged model, when its training loop says so.

    theta_0, and memory: with ``config.base`` (the base checkpoint the model was loaded from),
    snapshots stream it from disk; nothing stays in memory. Without it, the model's weights at
    :meth:`start` are theta_0: they are written once, streamed tensor by tensor, to
    ``<store>/base/`` (a loadable HF folder, published atomically), and every later snapshot
    streams that folder. Either way rank 0 holds one tensor of each side at a time, plus one
    gathered module under ZeRO-3; the store costs one base-size copy on disk instead of a
    second model in RAM. For a PEFT model theta_0 is the frozen base, which LoRA never changes.
    The base's fingerprint is checked against the store at construction (a store of another
    base is an InputError naming both); a resumed run (``start(step)`` with ``step > 0``) keeps
    the stored theta_0 instead of its resumed weights.

    Args:
        model: the model being trained, or a PPO wrapper of policy and value model, whose
            policy is the agent (a loop that re-wraps it assigns the new one to ``run.model``).
        config: a :class:`RAMConfig`, a mapping of its fields or a YAML path.
        tokenizer: saved with theta_0 and used by evaluation (a processor's ``tokenizer`` is).
        ranks: which rank is the main one, and a barrier (default: ``torch.distributed``).
        device: where ``eval_device="train"`` evaluates (default: the model's device).

    Snapshots in the background (``config.background_snapshots``): a call pauses only to copy
    the weights (see :class:`~ram_trl.training.capture.BackgroundSnapshots`); the snapshot is
    published by a thread, and its metrics come with the next call that finds it published
    (:meth:`poll`, the next snapshot, :meth:`close`), as does a merge due after it and any
    error it raised. :meth:`close` waits for it before the final merge.

    Metrics (the dicts the calls return): ``ram/changed_fraction``, ``ram/snapshot_mb``,
    ``ram/snapshot_seconds`` (writing it), ``ram/snapshot_pause_seconds`` (training paused for
    it: all of it, or in the background the copy and any wait for the previous one, which
    ``ram/snapshot_wait_seconds`` gives), and after a merge ``ram/merge_seconds`` (training
    paused), ``ram/unique_share``, ``ram/rho/<agent>``, ``ram/lambda/<agent>``,
    ``ram/overlap/<agent>``, ``eval_merged/<task>/reward``, ``eval_agent/<task>/reward`` and
    (``eval_base``) ``eval_base/<task>/reward``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: RAMConfig | Mapping[str, Any] | str | os.PathLike,
        *,
        tokenizer: Any | None = None,
        ranks: Ranks | None = None,
        device: torch.device | str | None = None,
        context: TrainerContext | None = None,
    ) -> None:
        self.model, self.config, self.tokenizer = model, as_config(config), tokenizer
        self.ranks = ranks if ranks is not None else Ranks.from_torch()
        output = self.config.merge_output  # an adapter is re-factorized whole, on rank 0
        self._split = Split.from_torch() if output == "model" else Split()
        self.device = device
        self.store = _open_store(self.config.store)
        self.peft = is_peft_model(self.model)
        if self.peft:
            from ram_trl.lora import lora_deltas

            lora_deltas(self.model)  # validates eagerly: DoRA & co. fail here, not at a snapshot
        self.base_dir: Path | None = None
        self.last_step: int | None = None  # the step of the last snapshot
        self._replace = self.config.overwrite
        self._dtype = parse_dtype(self.config.snapshot_dtype)
        self._snapshots = 0
        self._background: BackgroundMerge | None = None
        # a merge split across the ranks follows its snapshot on every rank: no deferring it
        background = self.config.background_snapshots and not self._splits
        self._writer = BackgroundSnapshots() if background else None
        self._merge_due: int | None = None  # a merge due once the snapshot in flight lands
        self._coalesce = False  # snapshots arrived while a background merge ran
        self._logged_entry: str | None = None  # the merged entry last logged / evaluated
        self._evaluated: str | None = None
        self._step: int | None = None  # the loop's step at the last call
        self.completions: list[dict[str, Any]] = []  # eval_log_completions rows not yet taken
        cfg, self.context = self.config, context or TrainerContext()
        self.scorer = (
            Scorer(
                cfg.eval_tasks,
                cfg.generation_for(self.context.generation),
                self.context,
                tokenizer=tokenizer,
                cache=self.store.root / "eval",
            )
            if cfg.eval_tasks
            else None
        )
        self._base_rewards: dict[str, float] | None = None
        self._warned = False
        self._touched_fraction = 0.0
        self._check_base()

    @property
    def model(self) -> nn.Module:
        """The policy being trained (a PPO wrapper's value model is left out: see
        :func:`~ram_trl.training.weights.policy_of`)."""
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self._model = policy_of(model)

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    # -- theta_0 -----------------------------------------------------------------------------

    def _check_base(self) -> None:
        from ram_trl.snapshot import fingerprint_folder

        if self.config.base is not None:
            fp = fingerprint_folder(self.config.base)
            self.store.check_base(fp, self.config.base, self.config.base)
            self.base_dir = Path(self.config.base)
            return
        recorded = self.store.base_fingerprint
        if recorded is None:
            return  # a new store: theta_0 is written at start
        if not is_sharded(self.model):
            fp = _live_base_fingerprint(self.model, self._dtype)
            if fp != recorded:
                raise InputError(
                    f"the model of agent {self.config.agent!r} has base fingerprint {fp}, but the "
                    f"store {self.store.root} holds task vectors of base {recorded} (from "
                    f"{self.store.base_path}): use one store per base model, or build the model "
                    "from the original base and resume with train(resume_from_checkpoint=...)"
                )
        for candidate in (self.store.root / BASE_DIR, self.store.base_path):
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
            # another job may publish it first (an InputError here): checked just below
            with contextlib.suppress(InputError):
                write_base(folder, self.model, self.tokenizer, main=self.is_main, dtype=self._dtype)
        self.ranks.barrier()
        if self.is_main:
            from ram_trl.snapshot import fingerprint_folder

            self.store.check_base(fingerprint_folder(folder), folder, str(folder))
        self.base_dir = folder
        self._check_base()  # the live weights against what is now recorded

    # -- the loop's calls --------------------------------------------------------------------

    def start(self, step: int = 0) -> None:
        """Before training: theta_0 on disk, and this agent's snapshots checked. ``step > 0``
        resumes: snapshots the abandoned run took after ``step`` are removed; otherwise existing
        snapshots of this agent are an error unless ``config.overwrite``."""
        resumed = step > 0
        self._ensure_base(resumed)
        agent, steps = self.config.agent, self.store.steps(self.config.agent)
        if resumed:
            self._replace = True
            if self.is_main:  # snapshots the abandoned run wrote after its last checkpoint
                for later in (s for s in steps if s > step):
                    self.store.remove(agent, later)
        elif steps and not self.config.overwrite:
            raise InputError(
                f"the store {self.store.root} already holds snapshots of agent {agent!r} (steps "
                f"{steps}): resume with train(resume_from_checkpoint=...), pick another agent "
                "name, or set overwrite=True"
            )
        self.ranks.barrier()

    def snapshot(self, step: int) -> dict[str, float]:
        """Snapshot the current weights as ``step`` (and prune to ``keep_last``)."""
        logs = self._snapshot(step)
        self.ranks.barrier()
        return logs

    def merge(self, step: int) -> dict[str, float]:
        """Merge the store's newest snapshots now (when it holds ``min_agents``), in process or
        in the background, and evaluate the result."""
        logs = self._merge(step) if self.is_main or self._splits else {}
        self.ranks.barrier()
        return logs

    def snapshot_and_merge(self, step: int) -> dict[str, float]:
        """Snapshot as ``step``, then merge when ``merge="self"`` and ``merge_every`` say one is
        due (a background merge still running makes the next one take the newest snapshots as
        soon as it ends, instead)."""
        logs = self._snapshot(step)
        self._step = step
        every = self.config.merge_every
        due = bool(self._merges_here and every and self._snapshots % every == 0)
        if self._splits:  # a split merge: rank 0's decision, on every rank
            due = self._split.on_main(lambda: due)
        if due and self._writer is not None and self.is_main:
            self._merge_due = step  # started by poll() once the snapshot is published
        elif due and (self.is_main or self._splits):
            logs.update(self._merge(step))
        elif self.is_main and not self._merges_here and self.config.eval_every_steps is None:
            latest = self.store.merged.latest()  # a watcher's merge: evaluated when it is new
            if latest is not None and latest.name != self._evaluated:
                logs.update(self._evaluate(latest))
        self.ranks.barrier()
        return logs

    def poll(self, step: int | None = None) -> dict[str, float]:
        """The metrics of a background merge that has finished since, else ``{}`` (no wait);
        ``step`` is the loop's current step (for ``ram/merge_lag_steps``)."""
        self._step = self._step if step is None else step
        logs: dict[str, float] = {}
        if self.is_main and self._writer is not None and self._writer.done():
            logs.update(self._finish_snapshot())
            if self._merge_due is not None:
                due, self._merge_due = self._merge_due, None
                logs.update(self._merge(due))
        if self._background is not None and self.is_main and self._background.done():
            logs.update(self._finish_background(step, restart=True))
        return logs

    def close(self, step: int | None = None) -> dict[str, float]:
        """At train end: wait for a background merge still running, then (``merge="self"``)
        make sure the newest snapshot of every agent is merged (reusing an entry of that state
        made by any job); the metrics."""
        logs: dict[str, float] = {}
        self._step = step = self.last_step if step is None else step
        if self._writer is not None and self.is_main:
            due, self._merge_due = self._merge_due, None
            logs.update(self._finish_snapshot(close=True))
            if due is not None:  # as if the snapshot had been published in the call
                logs.update(self._merge(due))
        if self.is_main and self.config.merge == "watcher":
            self._wait_for_watcher()
        if self.is_main and self._background is not None:
            logs.update(self._finish_background(step, restart=False))
        final = bool(self._merges_here and self.config.merge_every)
        if final and (self.is_main or self._splits):
            outcome = merge_store(
                self.store,
                self._base(),
                self.config.merge_settings,
                keep_last_merged=self.config.keep_last_merged,
                split=self._split if self._splits else None,
            )
            if self.is_main and outcome is not None and outcome.entry.name != self._logged_entry:
                logs.update(self._outcome_logs(outcome, step, "ram/merge_seconds"))
        if self.is_main:
            latest = self.store.merged.latest()
            if latest is not None and latest.name != self._evaluated:
                logs.update(self._evaluate(latest))  # the final generalist
        return logs

    def _wait_for_watcher(self) -> None:
        """With ``merge="watcher"``: wait (``watcher_timeout``) until the store's newest merged
        model holds this job's final snapshot, so that the final evaluation is of it."""
        from ram_trl.training.watch import watcher_running

        cfg, agent, step, root = self.config, self.config.agent, self.last_step, self.store.root

        def merged() -> bool:
            latest = self.store.merged.latest()
            return latest is not None and latest.steps.get(agent) == step

        if step is None or not cfg.watcher_timeout or merged():
            return
        if len(self.store.agents()) < cfg.min_agents:
            return  # nothing a watcher would merge yet
        if not watcher_running(self.store):
            warnings.warn(
                f"agent {agent!r} has merge='watcher', but no `ram-trl watch {root}` is "
                f"running: the store's merged models do not hold its final snapshot (step "
                f"{step}) until one runs",
                stacklevel=3,
            )
            return
        logger.warning(
            "agent %r: waiting up to %gs for the watcher to merge its final snapshot (step %d)",
            agent,
            cfg.watcher_timeout,
            step,
        )
        deadline = time.monotonic() + cfg.watcher_timeout
        while not merged():
            expired = time.monotonic() > deadline
            if expired or not watcher_running(self.store):
                why = "timed out" if expired else "the watcher stopped"
                warnings.warn(
                    f"agent {agent!r}: {why} before the watcher merged its final snapshot (step "
                    f"{step}): the final evaluation is of an older merged model, if any",
                    stacklevel=3,
                )
                return
            time.sleep(0.2)

    @property
    def _merges_here(self) -> bool:
        return self.config.merge == "self"

    @property
    def _splits(self) -> bool:
        """In-process merges run on every rank, split across them."""
        return self._merges_here and self._split.active and not self.config.merge_background

    # -- the work ----------------------------------------------------------------------------

    def _snapshot(self, step: int) -> dict[str, float]:
        if self.base_dir is None:
            raise RuntimeError("AgentRun.start() has not run")
        if self._writer is not None:
            return self._snapshot_in_background(step)
        path, seconds = snapshot_model(
            self.store,
            self.config.agent,
            step,
            self.model,
            self.base_dir,
            epsilon=self.config.snapshot_epsilon,
            replace=self._replace,
            main=self.is_main,
            dtype=self._dtype,
        )
        self.last_step, self._snapshots = step, self._snapshots + 1
        if not self.is_main:
            return {}
        assert path is not None
        logs = self._published(path, seconds)
        logs["ram/snapshot_pause_seconds"] = seconds
        self._touched(logs)
        return logs

    def _published(self, path: Path, seconds: float) -> dict[str, float]:
        """A published snapshot's metrics, after pruning to ``keep_last`` (run by the thread
        of a background snapshot)."""
        logs = self._snapshot_logs(path, seconds)
        keep = self.config.keep_last  # prune reads every entry: only when there is one too many
        if keep is not None and len(self.store.steps(self.config.agent)) > keep:
            self.store.prune(self.config.agent, keep)
        return logs

    def _snapshot_in_background(self, step: int) -> dict[str, float]:
        """Wait for the snapshot in flight (its buffers are about to be overwritten), copy the
        weights, and hand the rest to the thread."""
        assert self._writer is not None
        started = time.perf_counter()
        logs = self._finish_snapshot() if self.is_main else {}
        waited = time.perf_counter() - started
        cfg, agent, base, replace = self.config, self.config.agent, self._base(), self._replace

        def job(taken: TakenWeights) -> dict[str, float]:
            began = time.perf_counter()
            path = publish_taken(
                self.store, agent, step, base, taken, epsilon=cfg.snapshot_epsilon, replace=replace
            )
            return self._published(path, time.perf_counter() - began)

        self._writer.submit(
            self.model,
            job if self.is_main else None,
            f"agent {agent!r} at step {step}",
            dtype=self._dtype,
        )
        self.last_step, self._snapshots = step, self._snapshots + 1
        if not self.is_main:
            return {}
        logs["ram/snapshot_pause_seconds"] = time.perf_counter() - started
        logs["ram/snapshot_wait_seconds"] = waited
        return logs

    def _finish_snapshot(self, *, close: bool = False) -> dict[str, float]:
        """The metrics of the background snapshot in flight, once it is published (waiting
        for it); its error, raised; ``{}`` when none is in flight."""
        assert self._writer is not None
        logs = self._writer.close() if close else self._writer.result()
        if logs is None:
            return {}
        self._touched(logs)
        return logs

    def _touched(self, logs: dict[str, float]) -> None:
        key = "ram/lora_changed_fraction" if self.peft else "ram/changed_fraction"
        self._touched_fraction = logs[key]

    def _snapshot_logs(self, path: Path, seconds: float) -> dict[str, float]:
        from ram_trl.snapshot import validate

        manifest = validate(path)
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        logs = {
            "ram/changed_fraction": manifest.density,
            "ram/snapshot_mb": size / 1e6,
            "ram/snapshot_seconds": seconds,
        }
        if self.peft:
            touched = [e for e in manifest.tensors.values() if e.nnz]
            nnz, numel = sum(e.nnz for e in touched), max(1, sum(e.numel for e in touched))
            logs["ram/lora_changed_fraction"] = nnz / numel
        return logs

    def _base(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("AgentRun.start() has not run")
        return self.base_dir

    def _merge(self, step: int) -> dict[str, float]:
        cfg = self.config
        if not cfg.merge_background:  # a state another job is merging right now is its to make
            outcome = merge_store(
                self.store,
                self._base(),
                cfg.merge_settings,
                wait=False,
                keep_last_merged=cfg.keep_last_merged,
                split=self._split if self._splits else None,
            )
            if not self.is_main:
                return {}
            return self._outcome_logs(outcome, step, "ram/merge_seconds")
        if self._background is None:
            self._start_background(step)
        else:
            self._coalesce = True  # merged as soon as the running one ends
        return {}

    def _start_background(self, step: int | None) -> None:
        cfg = self.config
        self._background = BackgroundMerge(
            self.store.root,
            self._base(),
            cfg.merge_settings,
            keep_last_merged=cfg.keep_last_merged,
            step=step,
        )

    def _finish_background(self, step: int | None, *, restart: bool) -> dict[str, float]:
        assert self._background is not None
        job, self._background = self._background, None
        started = time.perf_counter()
        outcome = job.result()
        logs = self._outcome_logs(outcome, step)
        logs["ram/merge_wait_seconds"] = time.perf_counter() - started
        if restart and self._coalesce:
            self._coalesce = False
            self._start_background(step)
        return logs

    def _outcome_logs(
        self, outcome: MergeOutcome | None, step: int | None, seconds_key: str | None = None
    ) -> dict[str, float]:
        """Statistics of a merged entry, how stale it is, and its evaluation."""
        if outcome is None:
            return {}
        entry = outcome.entry
        logs = self._merge_logs(outcome.report())
        if seconds_key is not None:
            logs[seconds_key] = outcome.seconds
        logs["ram/merge_sequence"] = float(entry.sequence)
        logs["ram/merge_reused"] = float(not outcome.made)
        own = entry.steps.get(self.config.agent)
        if own is not None and step is not None:
            logs["ram/merge_lag_steps"] = float(step - own)
        self._logged_entry = entry.name
        if self.config.eval_every_steps is None:  # else on its own cadence
            logs.update(self._evaluate(entry))
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
                    warnings.warn(f"agent {name!r}: {message}", stacklevel=3)
                    self._warned = True
        if report.lora is not None:
            logs["ram/lora_error"] = report.lora.error
        return logs

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, step: int | None = None) -> dict[str, float]:
        """Evaluate the store's newest merged model, the agent and (once per store) the base
        now, as ``eval_every_steps`` asks; every rank calls it."""
        self._step = self._step if step is None else step
        logs = self._evaluate(self.store.merged.latest()) if self.is_main else {}
        self.ranks.barrier()
        return logs

    def _evaluate(self, entry: MergedEntry | None) -> dict[str, float]:
        if self.scorer is None:
            return {}
        return timed(lambda: self._scores(entry))

    def _scores(self, entry: MergedEntry | None) -> dict[str, float]:
        cfg, scorer, base = self.config, self.scorer, self._base()
        assert scorer is not None
        device = torch.device("cpu") if cfg.eval_device == "cpu" else self._train_device()
        logs: dict[str, float] = {}
        if entry is not None:
            logs.update(scorer.merged(entry.path, base, device, lora=entry.is_adapter))
            logs["ram/eval_merge_sequence"] = float(entry.sequence)
            self._evaluated = entry.name
            if cfg.eval_log_completions:
                self._log_completions(entry)
        if cfg.eval_agent:
            logs.update(scorer.score("eval_agent", self._agent_model(device)))
        if cfg.eval_base:
            if self._base_rewards is None:
                self._base_rewards = scorer.base(base, device)
            logs.update(self._base_rewards)
        return logs

    def _log_completions(self, entry: MergedEntry) -> None:
        """The merged model's completions, as rows: kept for the caller (``completions``: the
        callback logs them as a table) and appended to the store's
        ``eval/completions-<agent>.jsonl``."""
        import json

        assert self.scorer is not None
        step, merged = self._step, entry.name
        rows = [{"step": step, "merged": merged, **row} for row in self.scorer.last_table]
        self.completions.extend(rows)
        path = self.store.root / "eval" / f"completions-{self.config.agent}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.writelines(json.dumps(row, default=str) + "\n" for row in rows)

    def _train_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return next(self.model.parameters()).device

    def _agent_model(self, device: torch.device) -> nn.Module:
        """The live model when this rank holds it whole; else rebuilt from its last snapshot."""
        if not is_sharded(self.model):
            return self.model
        from transformers import AutoModelForCausalLM

        from ram_trl.evaluation import whole_on_this_rank

        ref = self.store.latest(self.config.agent)
        state = ref.load().apply(self.base_dir)
        with whole_on_this_rank():
            rebuilt = AutoModelForCausalLM.from_pretrained(self.base_dir)
        rebuilt.load_state_dict(state, strict=False)  # strict=False: tied aliases are absent
        return rebuilt.to(device)
