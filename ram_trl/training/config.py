"""``RAMConfig``: what an agent's run (:class:`~ram_trl.training.AgentRun`, under
:class:`~ram_trl.callback.RAMCallback`) snapshots, merges and evaluates, and when.

Everything is validated when the config is built (unknown merge method, bad parameters, bad
agent name, bad cadence), so a typo fails before training starts, not at step 500. A config loads
from YAML (``RAMConfig.from_yaml``); there, reward functions are given as ``"module:function"``
import paths, since a YAML file cannot hold a Python callable.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ram_trl.errors import InputError
from ram_trl.evaluation import EvalTask, GenerationSettings
from ram_trl.io.recipes import load_yaml
from ram_trl.methods.base import CHANGE_EPSILON
from ram_trl.training.jobs import MergeSettings
from ram_trl.validation import check_dataclass, check_keys


def _from_json(value: Any, name: str, kind: type) -> Any:
    """A dict or list field, given as itself, as JSON text (from a command line) or as None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(f"{name}: not valid JSON ({e.msg}): {value!r}") from None
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise InputError(f"{name} must be a {kind.__name__} (or its JSON), got {value!r}")
    return value


@dataclass
class RAMConfig:
    """Configuration of :class:`~ram_trl.training.AgentRun` (and so of ``RAMCallback``).

    Attributes:
        store: the snapshot store folder shared by every agent's job (created if missing).
        agent: this job's agent name (``agents/<agent>/step-<N>/`` in the store).
        base: the base checkpoint folder (theta_0). ``None``: theta_0 is taken from the model at
            train begin and written once to ``<store>/base/`` (see ``RAMCallback``).
        snapshot_steps: ``None``: snapshot at every checkpoint save; ``N``: every N steps.
        snapshot_on_train_end: also snapshot the final weights if the last step was not.
        snapshot_dtype: the dtype checkpoints are stored in (e.g. ``"bfloat16"``): theta_0 and
            every snapshot are cast to it before they are compared, so that a task vector holds
            the changes a saved checkpoint shows. Training in float32 and saving bf16, as RL
            frameworks do, an update below bf16 resolution is no change, as in the paper's
            checkpoints. ``None``: the model's own dtype.
        snapshot_background: write snapshots in a background thread, so that training pauses
            only to copy its weights into a buffer kept for the run (one model copy in the
            snapshot dtype, in CPU memory; for PEFT, the LoRA deltas): comparing with theta_0,
            encoding, writing, fsync and the atomic publish happen while training goes on. One
            snapshot is in flight at a time: a save that finds the previous one still being
            written waits for it (``ram/snapshot_pause_seconds`` includes that wait). Its
            metrics (``ram/changed_fraction``, ...) are logged when it is published (the next
            step end), and a failure is raised there, or at train end, which waits for it.
            Under ZeRO-3 / FSDP2 the gathers stay in the pause. ``None`` (default): on when
            this job does not merge in process right after its snapshots (``merge="watcher"``,
            ``"never"``, or ``merge_background``).
        snapshot_epsilon: a snapshot keeps the elements with ``|tau| > snapshot_epsilon``; must
            not exceed the merge's epsilon. (Not ``epsilon``: ``GRPOConfig`` has one, and both
            configs parse side by side in ``HfArgumentParser``.)
        keep_last: keep only this agent's newest snapshots (``None``: keep all).
        overwrite: a fresh (not resumed) run may replace this agent's existing snapshots.
        merge: who merges the store's agents. ``"self"``: this job, after its snapshots (every
            job sharing the store may; they make one merge per state of the store, see
            ``ram_trl.snapshot.merged``); ``"watcher"``: a ``ram-trl watch STORE`` process does,
            and this job only snapshots; ``"never"``: nobody during training.
        watcher_timeout: with ``merge="watcher"``, how long train end waits (seconds) for the
            watcher's merge of this job's final snapshot, so that the job's final evaluation
            and logs refer to a generalist holding it; a warning if it expires. No live
            ``ram-trl watch`` of the store (it holds ``<store>/.watcher-*.lock``): a warning and
            no wait. 0: never wait.
        merge_every: with ``merge="self"``, merge after every k-th snapshot (0: never merge).
        min_agents: merge only when the store holds at least this many agents.
        merge_method, merge_params, merge_dtype: as ``ram_trl.merge``'s method/params/dtype.
            ``merge_params`` and ``eval_tasks`` may also be given as JSON text, which is how a
            command line (``HfArgumentParser`` / ``trl.TrlParser``) passes them, as
            ``TrainingArguments`` does for its dict fields.
        merge_background: merge in a subprocess so that training is not paused by the merge.
            Merges coalesce: snapshots taken while one runs are merged (their newest) as soon as
            it ends, and at train end the job waits for, or runs, the merge of every agent's
            newest snapshot, so the final generalist includes the last snapshots.
        keep_last_merged: keep only the newest merged entries of the store (``None``: all).
        merge_output: ``"model"`` (a full HF folder) or ``"lora"`` (a PEFT adapter: 2-D weights
            re-factorized by truncated SVD to rank ``lora_rank``, biases and norms carried whole).
        lora_rank, lora_max_error: the adapter's rank, or ``"auto"``: per module the smallest
            whose relative reconstruction error is at most ``lora_max_error``; a fixed rank
            above that error is warned about (``ram/lora_error`` logs it). On a command line
            (``HfArgumentParser`` / ``TrlParser``): ``--lora_rank 8`` or ``--lora_rank auto``
            (annotated ``int | str | None`` because that parser then types the field as text;
            ``None`` is refused).
        eval_tasks: evaluate the store's newest merged model (and the agent, and optionally the
            base) on these. Their reward functions are called once at construction (a broken
            one is an InputError naming the task and the function, before training starts).
        eval_every_steps: evaluate every N training steps (``None``: whenever this job sees a new
            merged model), independently of when merges happen.
        eval_base, eval_agent: also evaluate the base (once per store: the scores are cached in
            ``<store>/eval/``) / the current agent on the same prompts.
        eval_batch_size, eval_max_new_tokens, eval_do_sample, eval_temperature, eval_top_p,
        eval_top_k, eval_min_p, eval_repetition_penalty, eval_seed: generation settings
            (sampling is seeded and never disturbs training's RNG). Those left ``None`` follow
            the trainer's (``GRPOConfig.max_completion_length``, ``temperature``, ...), else
            :class:`~ram_trl.evaluation.GenerationSettings`' defaults; greedy unless
            ``eval_do_sample``. Reward weights come from a task's ``reward_weights``, else from
            the trainer's ``reward_weights`` when the task has the trainer's reward functions.
        eval_device: ``"cpu"`` or ``"train"`` (the training device) for the loaded models.
        eval_log_completions: keep the merged model's completions (step, task, prompt,
            completion, each reward, ``log_extra`` columns): appended to
            ``<store>/eval/completions-<agent>.jsonl`` and, as TRL's ``LogCompletionsCallback``
            does, logged as a table to wandb / Comet when the trainer reports to them.
    """

    store: str
    agent: str
    base: str | None = None
    snapshot_steps: int | None = None
    snapshot_on_train_end: bool = True
    snapshot_epsilon: float = CHANGE_EPSILON
    snapshot_dtype: str | None = None
    snapshot_background: bool | None = None
    keep_last: int | None = None
    overwrite: bool = False
    merge: str = "self"
    watcher_timeout: float = 600.0
    merge_every: int = 1
    min_agents: int = 2
    merge_method: str = "ram_plus"
    merge_params: dict[str, Any] | str | None = field(default_factory=dict)
    merge_dtype: str | None = None
    merge_background: bool = False
    keep_last_merged: int | None = None
    merge_output: str = "model"
    lora_rank: int | str | None = 16
    lora_max_error: float = 0.1
    eval_tasks: list[EvalTask] | str | None = field(default_factory=list)
    eval_every_steps: int | None = None
    eval_base: bool = False
    eval_agent: bool = True
    eval_batch_size: int = 8
    eval_max_new_tokens: int | None = None
    eval_do_sample: bool = False
    eval_temperature: float | None = None
    eval_top_p: float | None = None
    eval_top_k: int | None = None
    eval_min_p: float | None = None
    eval_repetition_penalty: float | None = None
    eval_seed: int = 0
    eval_log_completions: bool = False
    eval_device: str = "cpu"

    def __post_init__(self) -> None:
        from ram_trl.io import check_name
        from ram_trl.methods import get_method

        check_dataclass(self)  # a bool is a bool, a number a number: "no" is not False
        self.store, self.agent = str(self.store), check_name(str(self.agent))
        self.base = None if self.base is None else str(self.base)
        self.merge_params = _from_json(self.merge_params, "merge_params", dict)
        tasks = _from_json(self.eval_tasks, "eval_tasks", list)
        self.eval_tasks = [t if isinstance(t, EvalTask) else EvalTask(**t) for t in tasks]
        names = [t.name for t in self.eval_tasks]
        if len(set(names)) != len(names):
            raise InputError(f"eval task names must be unique, got {names}")
        method = get_method(self.merge_method)
        params = method.make_params(self.merge_params)  # validates
        mask_epsilon = method.change_epsilon(params)  # None: the method has no change mask
        merge_epsilon = math.inf if mask_epsilon is None else mask_epsilon
        eps = self.snapshot_epsilon
        if not (isinstance(eps, (int, float)) and 0 <= eps <= merge_epsilon):
            raise InputError(
                f"snapshot_epsilon={eps!r} must be >= 0 and <= the merge's epsilon "
                f"({merge_epsilon}): a snapshot drops changes below its epsilon"
            )
        if self.snapshot_dtype is not None:
            from ram_trl.merging.engine import parse_dtype

            parse_dtype(self.snapshot_dtype)  # validates
        optional = ("snapshot_steps", "keep_last", "keep_last_merged", "eval_every_steps")
        for name, low in ((n, 1) for n in optional):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise InputError(f"{name} must be None or an integer >= {low}, got {value!r}")
        if isinstance(self.lora_rank, str) and self.lora_rank.strip().isdigit():
            self.lora_rank = int(self.lora_rank)  # a command line's "8"
        rank = self.lora_rank
        if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise InputError(f"lora_rank must be an integer >= 1 or 'auto', got {rank!r}")
        timeout = self.watcher_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise InputError(f"watcher_timeout must be a number of seconds >= 0, got {timeout!r}")
        err = self.lora_max_error
        if isinstance(err, bool) or not isinstance(err, (int, float)) or not err >= 0:
            raise InputError(f"lora_max_error must be a number >= 0, got {err!r}")
        for name, low in (("merge_every", 0), ("min_agents", 1)):
            value, ok = getattr(self, name), isinstance(getattr(self, name), int)
            if not ok or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise InputError(
                f"eval_batch_size must be a positive integer, got {self.eval_batch_size!r}"
            )
        _ = self.generation  # validates the generation fields
        if self.merge not in ("self", "watcher", "never"):
            raise InputError(f"merge must be 'self', 'watcher' or 'never', got {self.merge!r}")
        if self.merge_output not in ("model", "lora"):
            raise InputError(f"merge_output must be 'model' or 'lora', got {self.merge_output!r}")
        if self.eval_device not in ("cpu", "train"):
            raise InputError(f"eval_device must be 'cpu' or 'train', got {self.eval_device!r}")

    @property
    def generation(self) -> GenerationSettings:
        """The ``eval_*`` generation fields, as :func:`ram_trl.evaluation.evaluate` takes them
        (those left None: :class:`GenerationSettings`' defaults)."""
        return self.generation_for({})

    def generation_for(self, trainer: Mapping[str, Any]) -> GenerationSettings:
        """The ``eval_*`` generation fields; those left None from ``trainer`` (the trainer's
        settings, by :class:`GenerationSettings` field name), else the defaults."""
        values = {}
        for f in dataclasses.fields(GenerationSettings):
            value = getattr(self, f"eval_{f.name}")
            value = trainer.get(f.name) if value is None else value
            if value is not None:
                values[f.name] = value
        return GenerationSettings(**values)

    @property
    def background_snapshots(self) -> bool:
        """Whether snapshots are written in the background (``snapshot_background``, or its
        default: when no merge follows a snapshot in the training path)."""
        if self.snapshot_background is not None:
            return self.snapshot_background
        return self.merge != "self" or self.merge_background

    @property
    def merge_settings(self) -> MergeSettings:
        """What and how this job merges, as :func:`ram_trl.training.jobs.merge_store` takes it."""
        return MergeSettings(
            method=self.merge_method,
            params=dict(self.merge_params),
            dtype=self.merge_dtype,
            output=self.merge_output,
            lora_rank=self.lora_rank,
            lora_max_error=self.lora_max_error,
            min_agents=self.min_agents,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> RAMConfig:
        data = check_keys(cls, data, source)
        try:
            return cls(**data)
        except (TypeError, InputError) as e:  # a required field is missing, or a bad value
            raise InputError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, section: str | None = None) -> RAMConfig:
        """Load from a YAML file; ``section`` picks a sub-mapping (e.g. ``ram`` of a training
        recipe that also holds the trainer's arguments)."""
        data = load_yaml(path, "config")
        if section is not None:
            if not isinstance(data, dict) or section not in data:
                raise InputError(f"config {path} has no section {section!r}")
            data = data[section]
        return cls.from_dict(data, source=str(path))
