"""``ram-trl demo``: multi-agent GRPO to one generalist, with the paper's Table 1 in miniature.

:mod:`~ram_trl.demo.tasks` holds the synthetic agentic tasks and their rewards,
:mod:`~ram_trl.demo.pretrain` the SFT warm-up of the built base, :mod:`~ram_trl.demo.agent` one
GRPO run (a process of its own), :mod:`~ram_trl.demo.runs` their concurrent launch,
:mod:`~ram_trl.demo.pipeline` the whole run and :mod:`~ram_trl.demo.report` its table.
"""

from ram_trl.demo.config import DemoConfig

__all__ = ["DemoConfig", "run"]


def run(config: DemoConfig, *, progress: bool = True):
    """Run the demo; returns its :class:`~ram_trl.demo.report.Results`."""
    from ram_trl.demo.pipeline import run as run_pipeline

    return run_pipeline(config, progress=progress)
