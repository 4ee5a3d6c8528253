"""``examples/train_agent.py`` under ``accelerate launch``, with a per-rank record for the tests.

    accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml \
        tests/distributed/run_train_agent.py --config recipes/grpo/digits.yaml \
        --record RECORD_DIR [train_agent.py's own options]

It runs the example's ``main`` unchanged, after wrapping (observation only, nothing else changes):

* ``AgentRun.snapshot_and_merge``: which rank snapshots which step, and whether its model is
  sharded;
* ``capture.snapshot_model``: the path each rank published (None off the main rank);
* ``SnapshotStore.put``: every publish call, per rank;
* ``jobs.merge_snapshots``: every merge a rank took part in (its output and the ranks the merge
  was split across);
* ``RAMCallback.on_train_end``: that the rank got there, its final ``log_history``, the
  distributed type, the DeepSpeed ZeRO stage and, under ZeRO-3, how many parameter elements
  this rank holds locally (partitioning is real when it is about half of the model).

Each rank writes ``RECORD_DIR/rank-<r>.json`` at train end; a rank that crashed or hung
leaves no file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]


def main() -> None:
    argv = sys.argv[1:]
    i = argv.index("--record")
    record_dir = Path(argv[i + 1])
    del argv[i : i + 2]
    record_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    record: dict = {"rank": rank, "checkpoints": [], "published": [], "puts": [], "merges": []}

    from ram_trl.callback import callback as cb
    from ram_trl.distributed import is_sharded
    from ram_trl.snapshot.store import SnapshotStore
    from ram_trl.training import jobs, run

    snapshot_model, put, merge_snapshots = (
        run.snapshot_model,
        SnapshotStore.put,
        jobs.merge_snapshots,
    )
    checkpoint, on_train_end = run.AgentRun.snapshot_and_merge, cb.RAMCallback.on_train_end

    def rec_snapshot_model(*args, **kwargs):
        path, seconds = snapshot_model(*args, **kwargs)
        record["published"].append([args[2], None if path is None else str(path)])
        return path, seconds

    def rec_checkpoint(self, step):
        record["checkpoints"].append([step, is_sharded(self.model)])
        return checkpoint(self, step)

    def rec_put(self, snapshot, agent, step, **kwargs):
        record["puts"].append([agent, step])
        return put(self, snapshot, agent, step, **kwargs)

    def rec_merge(base, snapshots, out, **kwargs):
        split = kwargs.get("split")
        record["merges"].append([out, 1 if split is None else split.world])
        return merge_snapshots(base, snapshots, out, **kwargs)

    def rec_train_end(self, args, state, control, **kwargs):
        result = on_train_end(self, args, state, control, **kwargs)
        acc = self.trainer.accelerator
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        params = list(self.trainer.model.parameters())
        record.update(
            world_size=acc.num_processes,
            process_index=acc.process_index,
            is_main=acc.is_main_process,
            distributed_type=str(acc.distributed_type),
            zero_stage=None if plugin is None else plugin.zero_stage,
            device=str(self.trainer.args.device),
            global_step=state.global_step,
            log_history=state.log_history,
            numel_full=sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
            numel_local=sum(
                int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in params
            ),
        )
        (record_dir / f"rank-{rank}.json").write_text(json.dumps(record, default=str))
        return result

    run.snapshot_model = rec_snapshot_model
    run.AgentRun.snapshot_and_merge = rec_checkpoint
    cb.RAMCallback.on_train_end = rec_train_end
    SnapshotStore.put = rec_put
    jobs.merge_snapshots = rec_merge

    import train_agent

    train_agent.main(argv)


if __name__ == "__main__":
    main()
