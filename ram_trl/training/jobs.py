"""Merges of a store's newest snapshots, one per state of the store, in process or in a subprocess.

:func:`merge_store` is what an :class:`~ram_trl.training.AgentRun`, ``ram-trl watch`` and
``python -m ram_trl.training.jobs JOB`` (a :class:`BackgroundMerge`) run: it takes the newest
valid snapshot of every agent *when it starts*, claims that state in the store
(:mod:`ram_trl.snapshot.merged`) and either reuses the entry of an earlier merge of the same
inputs, waits for the process already making it, or merges it into the next ``merge-<N>/`` and
points ``merged/latest`` at it. So N jobs sharing a store make one merge per state, not N, and a
background merge started late picks up every snapshot written while the previous one ran.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ram_trl.errors import InputError
from ram_trl.merging.engine import REPORT_NAME
from ram_trl.merging.report import MergeReport
from ram_trl.merging.split import Split


def latest_snapshots(store: Any) -> dict[str, str]:
    """Agent -> folder of its newest valid snapshot, for every agent of the store."""
    refs = {agent: store.latest(agent) for agent in store.agents()}
    return {agent: str(ref.path) for agent, ref in refs.items() if ref is not None}


@dataclass(frozen=True)
class MergeSettings:
    """How a store's snapshots are merged; two merges of the same snapshots with equal
    :meth:`identity` are the same merge (and the second reuses the first)."""

    method: str = "ram_plus"
    params: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    output: str = "model"
    lora_rank: int | str = 16
    lora_max_error: float | None = 0.1
    min_agents: int = 2

    def identity(self) -> dict[str, Any]:
        from ram_trl.methods import get_method

        spec = get_method(self.method)
        params = dataclasses.asdict(spec.make_params(dict(self.params)))
        out = {"method": spec.name, "params": params, "output": self.output}
        if self.output == "lora":
            out["lora_rank"], out["lora_max_error"] = self.lora_rank, self.lora_max_error
        else:
            out["dtype"] = self.dtype
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "params": dict(self.params)}

    def merge_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`merge_snapshots` these settings stand for."""
        data = self.to_dict()
        del data["min_agents"]
        return data


@dataclass(frozen=True)
class MergeOutcome:
    """A merged entry of the store, and whether this call made it (``made``) or found it."""

    entry: Any  # ram_trl.snapshot.merged.MergedEntry
    made: bool
    seconds: float

    def report(self) -> MergeReport:
        return MergeReport.from_dict(json.loads((self.entry.path / REPORT_NAME).read_text()))


def merge_snapshots(
    base: str,
    snapshots: dict[str, str],
    out: str,
    *,
    method: str,
    params: dict[str, Any],
    dtype: str | None = None,
    output: str = "model",
    lora_rank: int | str = 16,
    lora_max_error: float | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    split: Split | None = None,
) -> MergeReport:
    """Merge ``snapshots`` (agent -> snapshot folder) over ``base`` into ``out`` with
    ``ram_trl.merge``: a full model folder, or with ``output="lora"`` a LoRA adapter of rank
    ``lora_rank`` (or ``"auto"``: per module, the smallest within ``lora_max_error``), the merged
    delta re-factorized by truncated SVD with biases and norms carried whole; the report's
    ``lora`` gives its errors. Returns the merge report."""
    from ram_trl.merging import merge
    from ram_trl.snapshot import TaskVectorSource

    sources = {agent: TaskVectorSource(path, base) for agent, path in snapshots.items()}
    lora = output == "lora"
    return merge(
        base,
        sources,
        method,
        out,
        params=params,
        dtype=None if lora else dtype,  # an adapter's deltas come from base-dtype rows
        lora_rank=lora_rank if lora else None,
        lora_max_error=lora_max_error,
        progress=False,
        extra_files=extra_files,
        split=split,
    )


def merge_store(
    store: Any,
    base: str | Path,
    settings: MergeSettings,
    *,
    wait: bool = True,
    keep_last_merged: int | None = None,
    split: Split | None = None,
) -> MergeOutcome | None:
    """Merge the newest snapshot of every agent of ``store`` unless that state is merged already.

    Returns None when the store holds fewer than ``settings.min_agents`` agents, or when another
    process is merging this very state and ``wait`` is false; otherwise the entry (made here, or
    reused). ``keep_last_merged`` prunes older entries after publishing.

    With ``split`` (called on every rank of a job, a full-model output only), rank 0 reads the
    store and claims its state, every rank learns the one decision, and the merge is split
    across the ranks (:mod:`ram_trl.merging.split`); rank 0 publishes.
    """
    from ram_trl.snapshot.merged import INPUTS_FILE

    split = split or Split()
    started = time.perf_counter()
    held: list[Any] = []  # rank 0: the claim of the state being merged

    def decide() -> tuple[Any, ...]:
        found = _claim(store, settings, wait, started)
        if not isinstance(found, tuple):
            return ("found", found)
        claim, refs = found
        held.append(claim)
        paths = {agent: str(ref.path) for agent, ref in refs.items()}
        return ("merge", paths, str(claim.entry.path), claim.record_bytes())

    decision = split.on_main(decide)
    if decision[0] == "found":
        return decision[1]
    _, paths, out, record = decision
    try:
        merge_snapshots(
            str(base),
            paths,
            out,
            **settings.merge_kwargs(),
            extra_files={INPUTS_FILE: record},
            split=split,
        )
    except BaseException:
        for claim in held:
            claim.release()
        raise

    def publish() -> Any:
        held[0].publish(keep_last_merged)
        return held[0].entry

    return MergeOutcome(split.on_main(publish), True, time.perf_counter() - started)


def _claim(
    store: Any, settings: MergeSettings, wait: bool, started: float
) -> MergeOutcome | None | tuple[Any, dict[str, Any]]:
    """The store's newest state: its entry (reused, or made by a process we waited for), None
    (too few agents; or being made elsewhere and ``wait`` is false), or our claim to make it
    and the snapshots it holds."""
    while True:
        refs = {a: r for a in store.agents() if (r := store.latest(a)) is not None}
        if len(refs) < settings.min_agents:
            return None
        claim = store.merged.claim(refs, settings.identity())
        if claim.state == "done":
            return MergeOutcome(claim.entry, False, time.perf_counter() - started)
        if claim.state == "running":
            if not wait:
                return None
            entry = claim.wait()
            if entry is not None:
                return MergeOutcome(entry, False, time.perf_counter() - started)
            continue  # its process failed or died: look again, and make it ourselves
        return claim, refs


class BackgroundMerge:
    """:func:`merge_store` in a subprocess (``python -m ram_trl.training.jobs JOB``), so that
    training goes on while it runs. The job travels on the command line and the subprocess's
    output goes to an anonymous temporary file: a crash leaves nothing in the store but what
    :meth:`SnapshotStore.clean` recognizes (a marker no process holds)."""

    def __init__(
        self,
        store: str | Path,
        base: str | Path,
        settings: MergeSettings,
        *,
        keep_last_merged: int | None = None,
        step: int | None = None,
    ) -> None:
        self.step, self.started = step, time.perf_counter()
        job = {
            "store": str(store),
            "base": str(base),
            "settings": settings.to_dict(),
            "keep_last_merged": keep_last_merged,
        }
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in result()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ram_trl.training.jobs", json.dumps(job)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def done(self) -> bool:
        return self.process.poll() is not None

    def result(self) -> MergeOutcome | None:
        """Wait for the subprocess; its outcome, or InputError with its output."""
        from ram_trl.snapshot.merged import MergedEntry

        code = self.process.wait()
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        lines = output.strip().splitlines()
        if code != 0 or not lines:
            raise InputError(f"background merge failed ({code}):\n{output[-2000:]}")
        data = json.loads(lines[-1])  # main() prints its outcome last
        if data is None:
            return None
        entry = MergedEntry.read(Path(data["path"]))
        if entry is None:
            raise InputError(f"background merge wrote {data['path']}, which has no record")
        return MergeOutcome(entry, data["made"], data["seconds"])


def main(argv: list[str] | None = None) -> int:
    from ram_trl.snapshot import SnapshotStore

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ram_trl.training.jobs JOB_JSON", file=sys.stderr)
        return 2
    job = json.loads(args[0])
    outcome = merge_store(
        SnapshotStore(job["store"], create=False),
        job["base"],
        MergeSettings(**job["settings"]),
        keep_last_merged=job["keep_last_merged"],
    )
    if outcome is None:
        print("null")
    else:
        e = outcome.entry
        print(json.dumps({"path": str(e.path), "made": outcome.made, "seconds": outcome.seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
