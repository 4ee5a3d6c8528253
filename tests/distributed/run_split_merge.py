"""Merges split across the ranks of a ``torchrun`` launch, with a per-rank record for the tests.

    torchrun --nproc-per-node 2 tests/distributed/run_split_merge.py JOBS.json RECORD_DIR

``JOBS.json`` lists merge recipes (``MergeConfig`` fields); every rank runs them in order in one
gloo process group (collectives time out after ``RAM_TRL_DIST_TIMEOUT`` seconds), each with
``Split.from_torch()``, and writes ``RECORD_DIR/rank-<r>.json``: per job, the report (its timings
left out) or the error it raised. A job that fails does not end the launch: the next job shows
that every rank left the failure at the same point, with the process group still usable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch.distributed as dist

    from ram_trl.errors import RAMError
    from ram_trl.merging.config import MergeConfig
    from ram_trl.merging.split import Split, init_from_env

    jobs, record_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    assert init_from_env(), "not launched with WORLD_SIZE > 1"
    split = Split.from_torch()
    records = []
    for job in jobs:
        job = dict(job)
        dry_run = job.pop("dry_run", False)
        try:
            report = MergeConfig.from_dict(job).run(dry_run=dry_run, progress=False, split=split)
        except RAMError as error:
            records.append({"ok": False, "type": type(error).__name__, "error": str(error)})
            continue
        data = report.to_dict()
        data.pop("seconds")
        records.append({"ok": True, "report": data})
    record_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ["RANK"])
    (record_dir / f"rank-{rank}.json").write_text(json.dumps(records))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
