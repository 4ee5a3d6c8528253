"""Merges of the newest snapshot of every agent in a store, in process or in a subprocess.

:func:`merge_snapshots` is what an :class:`~ram_trl.training.AgentRun` merges, and what
``python -m ram_trl.training.jobs JOB.json`` runs in the background, so that a long merge does
not pause training: the subprocess writes the same folder, published atomically, and the
run picks up its ``ram_trl_merge.json`` when it has finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ram_trl.errors import InputError
from ram_trl.merging.engine import REPORT_NAME
from ram_trl.merging.report import MergeReport


def latest_snapshots(store: Any) -> dict[str, str]:
    """Agent -> folder of its newest valid snapshot, for every agent of the store."""
    refs = {agent: store.latest(agent) for agent in store.agents()}
    return {agent: str(ref.path) for agent, ref in refs.items() if ref is not None}


def merge_snapshots(
    base: str,
    snapshots: dict[str, str],
    out: str,
    *,
    method: str,
    params: dict[str, Any],
    dtype: str | None = None,
    output: str = "model",
    lora_rank: int = 16,
    fallback_out: str | None = None,
) -> MergeReport:
    """Merge ``snapshots`` (agent -> snapshot folder) over ``base`` into ``out`` with
    ``ram_trl.merge``: a full model folder, or with ``output="lora"`` a LoRA adapter of rank
    ``lora_rank`` (the merged delta, re-factorized by truncated SVD, whose errors the report's
    ``lora`` gives). Returns the merge report.

    Jobs sharing a store can merge at the same step number at the same moment; whoever
    publishes ``out`` second writes to ``fallback_out`` instead (the report's ``out`` says where).
    """
    from ram_trl.errors import OutputExistsError
    from ram_trl.merging import merge
    from ram_trl.snapshot import TaskVectorSource

    def attempt(target: str) -> MergeReport:
        sources = {agent: TaskVectorSource(path, base) for agent, path in snapshots.items()}
        lora = output == "lora"
        return merge(
            base,
            sources,
            method,
            target,
            params=params,
            dtype=None if lora else dtype,  # an adapter's deltas come from base-dtype rows
            lora_rank=lora_rank if lora else None,
            progress=False,
        )

    try:
        return attempt(out)
    except OutputExistsError:
        if fallback_out is None:
            raise
        return attempt(fallback_out)


class BackgroundMerge:
    """One merge running in a subprocess (``python -m ram_trl.training.jobs JOB.json``)."""

    def __init__(self, job: dict[str, Any], step: int):
        self.job, self.step, self.out = job, step, job["out"]
        fd, self.job_file = tempfile.mkstemp(
            prefix=".merge-job-", suffix=".json", dir=Path(self.out).parent
        )
        with os.fdopen(fd, "w") as f:
            json.dump(job, f)
        self.log = open(f"{self.job_file}.log", "w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ram_trl.training.jobs", self.job_file],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def done(self) -> bool:
        return self.process.poll() is not None

    def result(self) -> MergeReport:
        """Wait for the subprocess; its report, or InputError with its output."""
        code = self.process.wait()
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        for path in (self.job_file, f"{self.job_file}.log"):
            Path(path).unlink(missing_ok=True)
        if code != 0:
            raise InputError(f"background merge into {self.out} failed ({code}):\n{output[-2000:]}")
        out = output.strip().splitlines()[-1] if output.strip() else self.out  # main() prints it
        return MergeReport.from_dict(json.loads((Path(out) / REPORT_NAME).read_text()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ram_trl.training.jobs JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())
    report = merge_snapshots(**job)
    print(report.out)  # where it went: the fallback when another job took ``out`` first
    return 0


if __name__ == "__main__":
    sys.exit(main())
