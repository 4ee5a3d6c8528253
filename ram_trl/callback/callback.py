"""``RAMCallback``: an :class:`~ram_trl.training.AgentRun` driven by ``transformers.Trainer``.

Add it to each agent's trainer (GRPO, RLOO or a plain ``Trainer``), all sharing one store::

    trainer.add_callback(RAMCallback(trainer, RAMConfig(store="runs/store", agent="math")))

At every save (or every N steps) the agent's task vector goes to the store; once the store holds
two or more agents, their newest snapshots are merged into the store's next
``merged/merge-<N>/`` (unless a job merged that state already) and the newest merged model is
evaluated next to the agent. The work is the run's; this module maps the trainer's
hooks onto it and logs what it returns through ``Trainer.log``. The hooks receive no trainer, so
the callback holds the one it is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from transformers import Trainer, TrainerCallback

from ram_trl.distributed import Ranks
from ram_trl.errors import InputError
from ram_trl.evaluation import TrainerContext
from ram_trl.training.config import RAMConfig
from ram_trl.training.run import AgentRun, as_config


class RAMCallback(TrainerCallback):
    """Snapshots this agent's task vector, merges the store's agents with RAM/RAM+ and evaluates
    the merged model, at checkpoints, from inside training (see :class:`AgentRun` for theta_0,
    memory and the metrics, which are logged through ``Trainer.log`` so wandb/tensorboard see
    them).

    Hooks: ``on_train_begin`` starts the run (a resumed trainer resumes it); ``on_save``
    snapshots (or ``on_step_end`` every ``snapshot_steps``) and merges when due; ``on_step_end``
    also picks up a finished background merge; ``on_train_end`` snapshots the final weights
    (``snapshot_on_train_end``) and waits for a background merge. Every rank calls the hooks;
    rank 0 writes, merges, evaluates and logs, the others take part in the gathers of sharded
    models and then wait at a barrier.
    """

    def __init__(
        self,
        trainer: Trainer,
        config: RAMConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    ) -> None:
        if config is None or not hasattr(trainer, "accelerator") or not hasattr(trainer, "args"):
            raise InputError(
                "RAMCallback needs its trainer (Trainer hooks are not given it): build it as "
                "trainer.add_callback(RAMCallback(trainer, config)), or attach(trainer, config), "
                f"not with {type(trainer).__name__!r} alone"
            )
        self.trainer = trainer
        self.run = AgentRun(
            trainer.model,
            config,
            tokenizer=getattr(trainer, "processing_class", None),
            ranks=Ranks.from_accelerator(trainer.accelerator),
            device=trainer.args.device,
            context=trainer_context(trainer),
        )

    @property
    def config(self) -> RAMConfig:
        return self.run.config

    def _model(self) -> None:
        self.run.model = self.trainer.model  # prepare() may have wrapped it (FSDP)

    def on_train_begin(self, args, state, control, **kwargs):
        self._model()
        self.run.context.state = state  # train() made a new one: what reward functions get
        self.run.start(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._model()
        self._log(self.run.poll(state.global_step))
        every = self.config.snapshot_steps
        if every is not None and state.global_step % every == 0:
            self._log(self.run.snapshot_and_merge(state.global_step))
        every = self.config.eval_every_steps
        if every is not None and state.global_step % every == 0:
            self._log(self.run.evaluate(state.global_step))

    def on_save(self, args, state, control, **kwargs):
        self._model()
        if self.config.snapshot_steps is None and state.global_step != self.run.last_step:
            self._log(self.run.snapshot_and_merge(state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self._model()
        if self.config.snapshot_on_train_end and state.global_step != self.run.last_step:
            self._log(self.run.snapshot_and_merge(state.global_step))
        self._log(self.run.close(state.global_step))

    def _log(self, logs: dict[str, float]) -> None:
        # Trainer.log itself, not the trainer's override: GRPO's log() would flush (and so
        # misattribute) its accumulated training metrics into this entry.
        if logs:
            Trainer.log(self.trainer, dict(logs))
        if self.run.completions:
            rows, self.run.completions = self.run.completions, []
            self._log_table(rows)

    def _log_table(self, rows: list[dict[str, Any]]) -> None:
        """The merged model's completions as a table, where TRL's LogCompletionsCallback puts
        its own: wandb and Comet, when the trainer reports to them (the rows are also in the
        store's ``eval/completions-<agent>.jsonl`` either way)."""
        import pandas as pd

        report_to = self.trainer.args.report_to or []
        table = pd.DataFrame(rows)
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"ram/completions": wandb.Table(dataframe=table)})
        if "comet_ml" in report_to:
            from trl.trainer.utils import log_table_to_comet_experiment

            log_table_to_comet_experiment(name="ram_completions.csv", table=table)


#: GRPOConfig / RLOOConfig fields -> GenerationSettings fields
_GENERATION_ARGS = {
    "max_completion_length": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}


def trainer_context(trainer: Trainer) -> TrainerContext:
    """What evaluation follows from the trainer: its generation settings, reward functions and
    weights (GRPO's and RLOO's names), and its state, which reward functions get as
    ``trainer_state``. A plain ``Trainer`` has none of the first three."""
    args = trainer.args
    generation = {
        ours: getattr(args, theirs)
        for theirs, ours in _GENERATION_ARGS.items()
        if getattr(args, theirs, None) is not None
    }
    weights = getattr(args, "reward_weights", None)
    return TrainerContext(
        generation=generation,
        reward_funcs=list(getattr(trainer, "reward_funcs", None) or []),
        reward_weights=None if weights is None else [float(w) for w in weights],
        state=trainer.state,
    )


def attach(
    trainer: Trainer, config: RAMConfig | Mapping[str, Any] | str | None = None, **kwargs: Any
) -> RAMCallback:
    """Build a :class:`RAMCallback` from a config (object, mapping or YAML path) and/or keyword
    fields, add it to ``trainer`` and return it."""
    if config is None:
        config = RAMConfig.from_dict(kwargs)
    elif kwargs:
        import dataclasses

        base = as_config(config)
        data = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        config = RAMConfig.from_dict({**data, **kwargs})
    callback = RAMCallback(trainer, config)
    trainer.add_callback(callback)
    return callback
