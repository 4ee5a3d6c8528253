"""Write a tiny base model and three synthetic RL agents for the ram-trl demo (offline, seconds).

    python examples/make_agents.py runs/synthetic [--arch qwen2|llama] [--density 0.05]
        [--overlap 0.5] [--seed 0] [--dtype float32|bfloat16]

Writes ``OUT_DIR/base`` (a 4-layer, hidden-128 Qwen2 or Llama with a character tokenizer, about
1M parameters) and ``OUT_DIR/agents/{code,tool,memory}``: each is the base plus a sparse delta, as
an ordinary Hugging Face checkpoint, plus ``OUT_DIR/agents/agents.json`` with the measured numbers.

Why heterogeneous densities: RAM's point is that RL agents update different, sparse fractions of
the model (the paper's 7B agents changed 3.2% to 54% of their parameters), so plain averaging
dilutes the sparse ones. ``--density d`` is a reference value; the agents change

    code: 0.6 * d    tool: 4 * d    memory: 6 * d      (d = 0.05 gives 3%, 20%, 30%)

of every tensor, and ``--overlap`` of each agent's changes come from a pool that the agents share
(see ``ram_trl.testing.make_sparse_agents`` for the exact definition). With the default overlap
``d`` can go up to about 0.12 before the agents no longer fit in the tensors.

Then merge them with ``ram-trl merge recipes/merge/synthetic.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ram_trl.merging import OUTPUT_DTYPES
from ram_trl.testing import make_sparse_agents, save_tiny_base

#: Agent name -> multiple of --density. Sparse, medium and dense, like the paper's agents.
DENSITY_FACTORS: dict[str, float] = {"code": 0.6, "tool": 4.0, "memory": 6.0}
MODEL_SIZE: dict[str, int] = {"hidden_size": 128, "layers": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write a tiny base model and three sparse synthetic agents (offline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path, help="writes OUT_DIR/base and OUT_DIR/agents/*")
    parser.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    parser.add_argument(
        "--density",
        type=float,
        default=0.05,
        help="reference density d: code changes 0.6d, tool 4d, memory 6d of every tensor",
    )
    parser.add_argument(
        "--overlap",
        type=float,
        default=0.5,
        help="fraction of each agent's changes drawn from the shared pool",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="float32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    densities = {name: factor * args.density for name, factor in DENSITY_FACTORS.items()}
    base = save_tiny_base(
        args.out_dir / "base",
        args.arch,
        dtype=OUTPUT_DTYPES[args.dtype],
        seed=args.seed,
        **MODEL_SIZE,
    )
    try:
        make_sparse_agents(
            base,
            args.out_dir / "agents",
            list(densities),
            density=densities,
            overlap=args.overlap,
            seed=args.seed,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = json.loads((args.out_dir / "agents" / "agents.json").read_text())
    print(f"base:   {base}  ({report['numel']:,} elements, {args.arch}, {args.dtype})")
    for name, info in report["agents"].items():
        rho = "n/a" if info["rho"] is None else f"{info['rho']:.3f}"
        print(
            f"{name:<7} {info['path']}  density {info['density']:.4f} "
            f"(target {info['target_density']:.4f})  shared {info['shared']:,}  "
            f"unique {info['unique']:,}  rho {rho}"
        )
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
