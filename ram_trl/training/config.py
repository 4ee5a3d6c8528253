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
from ram_trl.validation import check_dataclass


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
        snapshot_epsilon: a snapshot keeps the elements with ``|tau| > snapshot_epsilon``; must
            not exceed the merge's epsilon. (Not ``epsilon``: ``GRPOConfig`` has one, and both
            configs parse side by side in ``HfArgumentParser``.)
        keep_last: keep only this agent's newest snapshots (``None``: keep all).
        overwrite: a fresh (not resumed) run may replace this agent's existing snapshots.
        merge_every: merge after every k-th snapshot (0: never merge).
        min_agents: merge only when the store holds at least this many agents.
        merge_method, merge_params, merge_dtype: as ``ram_trl.merge``'s method/params/dtype.
            ``merge_params`` and ``eval_tasks`` may also be given as JSON text, which is how a
            command line (``HfArgumentParser`` / ``trl.TrlParser``) passes them, as
            ``TrainingArguments`` does for its dict fields.
        merged_name: name of the merged model under ``<store>/merged/`` (``{step}``, ``{agent}``).
        merge_background: merge in a subprocess so that training is not paused by the merge.
        merge_output: ``"model"`` (a full HF folder) or ``"lora"`` (an adapter of rank
            ``lora_rank``, re-factorized by truncated SVD).
        eval_tasks: evaluate the merged model (and the agent, and optionally the base) on these.
        eval_base, eval_agent: also evaluate the base / the current agent on the same prompts.
        eval_batch_size, eval_max_new_tokens, eval_do_sample, eval_temperature, eval_top_p,
        eval_seed: generation settings (sampling is seeded and never disturbs training's RNG).
        eval_device: ``"cpu"`` or ``"train"`` (the training device) for the loaded models.
    """

    store: str
    agent: str
    base: str | None = None
    snapshot_steps: int | None = None
    snapshot_on_train_end: bool = True
    snapshot_epsilon: float = CHANGE_EPSILON
    keep_last: int | None = None
    overwrite: bool = False
    merge_every: int = 1
    min_agents: int = 2
    merge_method: str = "ram_plus"
    merge_params: dict[str, Any] | str | None = field(default_factory=dict)
    merge_dtype: str | None = None
    merged_name: str = "step-{step}"
    merge_background: bool = False
    merge_output: str = "model"
    lora_rank: int = 16
    eval_tasks: list[EvalTask] | str | None = field(default_factory=list)
    eval_base: bool = False
    eval_agent: bool = True
    eval_batch_size: int = 8
    eval_max_new_tokens: int = 64
    eval_do_sample: bool = False
    eval_temperature: float = 1.0
    eval_top_p: float = 1.0
    eval_seed: int = 0
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
        for name, low in (("snapshot_steps", 1), ("keep_last", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < low):
                raise InputError(f"{name} must be None or an integer >= {low}, got {value!r}")
        for name, low in (("merge_every", 0), ("min_agents", 1), ("lora_rank", 1)):
            value, ok = getattr(self, name), isinstance(getattr(self, name), int)
            if not ok or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("eval_batch_size", "eval_max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer")
        if self.merge_output not in ("model", "lora"):
            raise InputError(f"merge_output must be 'model' or 'lora', got {self.merge_output!r}")
        if self.eval_device not in ("cpu", "train"):
            raise InputError(f"eval_device must be 'cpu' or 'train', got {self.eval_device!r}")
        try:
            self.merged_name.format(step=0, agent=self.agent)
        except (KeyError, IndexError, ValueError) as e:
            message = f"merged_name {self.merged_name!r} may use only {{step}} and {{agent}}: {e}"
            raise InputError(message) from None

    @property
    def generation(self) -> GenerationSettings:
        """The ``eval_*`` generation fields, as :func:`ram_trl.evaluation.evaluate` takes them."""
        names = (f.name for f in dataclasses.fields(GenerationSettings))
        return GenerationSettings(**{name: getattr(self, f"eval_{name}") for name in names})

    def merged_model_name(self, step: int) -> str:
        return self.merged_name.format(step=step, agent=self.agent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> RAMConfig:
        if not isinstance(data, Mapping):
            raise InputError(f"{source}: expected a mapping of RAMConfig fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
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
