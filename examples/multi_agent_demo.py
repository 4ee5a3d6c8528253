"""The ``ram-trl demo`` pipeline as a script: RL agents in, one generalist out, measured.

    python examples/multi_agent_demo.py                       # the default run (~10 min, 2 cores)
    python examples/multi_agent_demo.py --config recipes/demo/quick.yaml
    python examples/multi_agent_demo.py --config recipes/demo/default.yaml --out runs/mine

Same as ``ram-trl demo`` (which takes the same flags); the recipe is a flat YAML mapping of
``ram_trl.demo.DemoConfig`` fields. Read ``ram_trl/demo/pipeline.py`` to see each stage: SFT of
a tiny base, GRPO specialists with ``RAMCallback`` sharing one store, a joint-RL baseline, final
merges tuned on validation with ``ram_trl.search``, and the test table.
"""

import sys

from ram_trl.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
