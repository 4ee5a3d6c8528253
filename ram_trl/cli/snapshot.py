"""``ram-trl snapshot`` and ``ram-trl store``: the command-line side of task-vector snapshots.

The top-level CLI calls :func:`add_parser` and dispatches to ``args.func(args)``. Torch and
the snapshot machinery are imported inside the commands, so ``ram-trl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from ram_trl.errors import InputError


def add_parser(subparsers: Any) -> None:
    """Register ``snapshot`` and ``store {ls,prune,clean}`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "snapshot",
        help="store the task vector of a fine-tuned checkpoint (sparse, exact)",
        description="Extract the elements of CKPT that differ from BASE by more than epsilon and "
        "store them as a task-vector snapshot: in a store (agents/<agent>/step-<N>/) or a folder.",
    )
    p.add_argument("--base", required=True, help="the base model folder (theta_0)")
    p.add_argument("--model", required=True, help="the fine-tuned checkpoint folder")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help="snapshot store folder (created if missing)")
    where.add_argument("--out", help="write the snapshot to this new folder instead")
    p.add_argument("--agent", help="agent name (required with --store)")
    p.add_argument(
        "--step",
        type=int,
        help="training step (default: N of a checkpoint-N folder, else trainer_state.json's "
        "global_step, else the agent's next step in the store)",
    )
    p.add_argument("--epsilon", type=float, default=1e-5, help="change threshold (default 1e-5)")
    p.add_argument(
        "--metric", action="append", default=[], metavar="KEY=VALUE", help="e.g. mean_reward=0.7"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest snapshot file (default 5GB)")
    p.add_argument("--replace", action="store_true", help="overwrite an existing step")
    p.set_defaults(func=run_snapshot)

    s = subparsers.add_parser("store", help="inspect and maintain a snapshot store")
    commands = s.add_subparsers(dest="store_command", metavar="{ls,prune,clean}", required=True)
    ls = commands.add_parser(
        "ls", help="list the base, the agents' snapshots and the merged models with their inputs"
    )
    ls.add_argument("store")
    ls.add_argument("--agent", help="only this agent")
    ls.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    ls.add_argument(
        "--verify",
        action="store_true",
        help="read every byte and check it against the manifest's sha256 checksums",
    )
    ls.set_defaults(func=run_store_ls)
    pr = commands.add_parser("prune", help="keep only the newest valid snapshots of agents")
    pr.add_argument("store")
    pr.add_argument("--keep-last", type=int, required=True)
    pr.add_argument("--agent", action="append", help="agent(s) to prune (default: all)")
    pr.set_defaults(func=run_store_prune)
    cl = commands.add_parser(
        "clean", help="delete what killed writers and merges left behind (temporaries, markers)"
    )
    cl.add_argument("store")
    cl.set_defaults(func=run_store_clean)


# --------------------------------------------------------------------------------------------


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def infer_step(model: str | Path) -> int | None:
    """N of a ``checkpoint-N`` folder, else ``global_step`` of its trainer_state.json."""
    model = Path(model)
    match = re.fullmatch(r"checkpoint-(\d+)", model.name or model.resolve().name)
    if match:
        return int(match.group(1))
    try:
        return int(json.loads((model / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _metrics(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise InputError(f"--metric {item!r} is not KEY=NUMBER")
    return out


def _checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_snapshot(args: argparse.Namespace) -> int:
    from ram_trl.errors import OutputExistsError
    from ram_trl.io import ModelFolder, check_name
    from ram_trl.merging.inputs import check_output_disjoint
    from ram_trl.snapshot.fingerprint import fingerprint_folder
    from ram_trl.snapshot.store import STORE_FILE, SnapshotStore
    from ram_trl.snapshot.task_vector import snapshot_folders

    # Everything that can be refused is refused before a store is created or touched: a failed
    # command must not leave a new store behind, let alone one bound to the wrong base.
    metrics = _metrics(args.metric)
    step = args.step if args.step is not None else infer_step(args.model)
    if step is not None and step < 0:
        raise InputError(f"--step must be >= 0, got {step}")
    if args.store:
        if not args.agent:
            raise InputError("--agent NAME is required with --store")
        check_name(args.agent, "agent")
    else:
        path = Path(args.out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise InputError(f"--out {path} exists and is not an empty folder")
        check_output_disjoint(path, {"the base": args.base, "the fine-tuned model": args.model})
    with ModelFolder(args.base) as base, ModelFolder(args.model) as model:

        def write(folder: Path) -> None:
            snapshot_folders(
                base,
                model,
                folder,
                epsilon=args.epsilon,
                agent=args.agent,
                step=step,
                metrics=metrics,
                max_shard_size=args.max_shard_size,
            )

        if args.store:
            root = Path(args.store)
            if (root / STORE_FILE).is_file():
                # refuse a base of another store before the (long) extraction, not after it
                store = SnapshotStore(root, create=False)
                where = str(Path(args.base).resolve())
                store.check_base(fingerprint_folder(base), f"the base {where}", where, record=False)
            else:
                store = SnapshotStore(root)  # bound to the base when the entry is published
            if step is None:
                steps = store.steps(args.agent)
                step = steps[-1] + 1 if steps else 0
            try:
                path = store.put(write, args.agent, step, replace=args.replace)
            except OutputExistsError as e:
                raise OutputExistsError(f"{e}; pass --replace to overwrite it") from None
        else:
            write(path)
    _print_summary(path, Path(args.model))
    return 0


def _print_summary(path: Path, model: Path) -> None:
    from ram_trl.snapshot.format import validate

    m = validate(path)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    ckpt = _checkpoint_bytes(model)
    ratio = f"{size / ckpt:.2%}" if ckpt else "n/a"
    counts: dict[str, int] = {}
    for e in m.tensors.values():
        counts[e.layout] = counts.get(e.layout, 0) + 1
    layouts = ", ".join(f"{n} {k}" for k, n in counts.items())
    print(f"agent {m.agent}  step {m.step}  density {m.density:.4%}  ({m.nnz:,} of {m.numel:,})")
    print(f"snapshot {human_size(size)}  checkpoint {human_size(ckpt)}  ratio {ratio}  ({layouts})")
    print(f"wrote {path}")


def run_store_ls(args: argparse.Namespace) -> int:
    from ram_trl.snapshot.store import SnapshotStore

    store = SnapshotStore(args.store, create=False)
    rows = [i for i in store.list(verify=args.verify) if args.agent in (None, i.agent)]
    merged = store.merged.entries()
    latest = store.merged.latest()
    if args.json:
        base = {"path": store.base_path, "fingerprint": store.base_fingerprint}
        print(json.dumps({"kind": "base", **base}))
        keys = ("agent", "step", "size", "nnz", "numel", "density", "created", "metrics", "error")
        for i in rows:
            print(
                json.dumps(
                    {"kind": "snapshot", "path": str(i.path), **{k: getattr(i, k) for k in keys}}
                )
            )
        for e in merged:
            record = {"kind": "merged", "name": e.name, "path": str(e.path), **e.record()}
            print(json.dumps({**record, "latest": latest == e}))
        return 0
    print(f"base: {store.base_path or '-'}  (fingerprint {store.base_fingerprint or 'none yet'})")
    table = [("agent", "step", "density", "size", "created", "status")]
    for i in rows:
        density = "-" if i.density is None else f"{i.density:.4%}"
        size = "-" if i.error else human_size(i.size)
        status = "ok" if i.valid else f"CORRUPT: {i.error}"
        table.append((i.agent, str(i.step), density, size, i.created or "-", status))
    _print_table(table)
    if len(table) == 1:
        print(f"(no snapshots in {store.root})")
    table = [("merged", "inputs", "method", "output", "created", "")]
    for e in merged:
        inputs = " ".join(f"{agent}@{step}" for agent, step in e.steps.items())
        method, output = e.settings.get("method", "?"), e.settings.get("output", "?")
        mark = "<- latest" if latest == e else ""
        table.append((e.name, inputs, str(method), str(output), e.created or "-", mark))
    if merged:
        print()
        _print_table(table)
    return 0


def _print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]) - 1)]
    for r in table:
        cells = "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False))
        print(f"{cells}  {r[-1]}".rstrip())


def run_store_prune(args: argparse.Namespace) -> int:
    from ram_trl.snapshot.store import SnapshotStore

    store = SnapshotStore(args.store, create=False)
    for agent in args.agent or store.agents():
        for path in store.prune(agent, keep_last=args.keep_last):
            print(f"removed {path}")
    return 0


def run_store_clean(args: argparse.Namespace) -> int:
    from ram_trl.snapshot.store import SnapshotStore

    for path in SnapshotStore(args.store, create=False).clean():
        print(f"removed {path}")
    return 0
