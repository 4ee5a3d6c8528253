"""RAMCallback under real 2-process launches of ``examples/train_agent.py`` with the accelerate
recipes users copy (``recipes/accelerate/``): DDP on CPU (gloo) through ``cpu_ddp.yaml`` and
``multi_gpu.yaml``, DeepSpeed ZeRO-2 and ZeRO-3 on CPU, and (``@pytest.mark.gpu``) one GPU, FSDP2
and ZeRO-3 on a CUDA machine. ``RECIPES`` says which test launches each recipe, and a test
checks that none is left out.

Every launch goes through ``tests/distributed/run_train_agent.py`` (which records, per rank,
what the callback did) on an agent recipe of ``recipes/grpo/``, shortened on the command line
(``TINY_RUN``): 4 GRPO steps, a save at steps 2 and 4, lr 1e-2. Each launch has its own port,
its own process group and a wall-clock timeout, so a hung rank fails the test instead of CI.

CPU notes (see the project's environment notes): ``accelerate launch --cpu --num_processes 2``
silently runs ONE process, so the recipes say ``distributed_type: MULTI_GPU`` / ``DEEPSPEED``
with ``num_processes`` >= 2 while the agent recipes keep ``use_cpu: true``; DeepSpeed needs
``DS_ACCELERATOR=cpu`` and JIT-builds a comm op once (about a minute, cached under
``TORCH_EXTENSIONS_DIR``, /tmp/ram-trl-torch-ext unless set).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from launching import TEARDOWN_ABORT, free_port, launch_env, run_launch

pytest.importorskip("trl")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "tests" / "distributed" / "run_train_agent.py"
ACCELERATE = ROOT / "recipes" / "accelerate"
AGENTS = ROOT / "recipes" / "grpo"
# every accelerate recipe, and where it is launched: "cpu" here on any machine, "gpu" on CUDA
RECIPES = {
    "cpu_ddp.yaml": "cpu",
    "multi_gpu.yaml": "cpu",  # on CPU too: MULTI_GPU + use_cpu is what cpu_ddp.yaml does
    "deepspeed_zero2.yaml": "cpu",
    "deepspeed_zero3.yaml": "cpu",
    "single_gpu.yaml": "gpu",
    "fsdp2.yaml": "gpu",
}
# the agent recipes, shortened; save_only_model: the callback needs no optimizer state
TINY_RUN = ["--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-2",
            "--save_only_model", "true"]  # fmt: skip
SAVES = [2, 4]  # max_steps 4, save_steps 2
EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/ram-trl-torch-ext")
TIMEOUT_DDP = 300  # s, a launch measured at about 25 s on 2 cores
TIMEOUT_DS = 600  # s, the first DeepSpeed launch JIT-builds a comm op (about 60-90 s)

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)
pytestmark = pytest.mark.slow


@dataclass
class Run:
    out: Path  # the trainer's output_dir (checkpoint-N/)
    store: Path
    ranks: list[dict]  # run_train_agent.py's record of each rank, by rank
    log: str
    seconds: float


def launch(
    config: str,
    workdir: Path,
    *,
    base: Path,
    store: Path | None = None,
    agent: str = "digits",
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = TIMEOUT_DDP,
    num_processes: int | None = 2,
    retry: bool = True,
) -> Run:
    """``accelerate launch --config_file recipes/accelerate/<config>`` the example on
    ``recipes/grpo/<agent>.yaml`` with ``num_processes`` processes; fail with the log's tail if
    it does not exit 0 within ``timeout`` or if a rank wrote no record (crashed or never
    finished). ``num_processes=None`` keeps the recipe's own count (then it must start two)."""
    assert config in RECIPES, config
    processes = ["--num_processes", str(num_processes)] if num_processes else []
    num_processes = num_processes or 2
    store = store or workdir / "store"
    out, record = workdir / f"out-{agent}", workdir / f"record-{agent}"
    before = workdir / f"store-before-{agent}"  # the store as this launch found it
    if retry and store.exists():
        shutil.copytree(store, before)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE / config),
        "--main_process_port", str(free_port()),
        *processes,
        str(WRAPPER), "--config", str(AGENTS / f"{agent}.yaml"),
        "--record", str(record),
        "--store", str(store), "--tiny_base_dir", str(base), "--output_dir", str(out),
        *TINY_RUN, *args,
    ]  # fmt: skip
    full_env = launch_env({"TORCH_EXTENSIONS_DIR": EXT_DIR, **(env or {})})
    returncode, log, seconds = run_launch(cmd, env=full_env, timeout=timeout, label=config)
    files = sorted(record.glob("rank-*.json"))
    expected = [f"rank-{r}.json" for r in range(num_processes)]
    if returncode != 0 and TEARDOWN_ABORT in log and [f.name for f in files] == expected:
        # Every rank finished training and wrote its record, then one aborted in C++ teardown
        # at interpreter exit (seen about once in ten launches under load, never reproduced
        # alone; see the session notes). Launch once more; a second failure fails the test.
        warnings.warn(
            f"{config}: a rank aborted at exit after finishing; relaunching", stacklevel=2
        )
        for f in files:
            f.unlink()
        if not retry:
            pytest.fail(f"{config}: aborted at exit twice\n{log[-6000:]}")
        # the relaunch starts from the store as the first launch found it: its snapshots and
        # merges would otherwise be merged again (replaced snapshots are new inputs)
        shutil.rmtree(store, ignore_errors=True)
        if before.exists():
            shutil.copytree(before, store)
        return launch(
            config,
            workdir,
            base=base,
            store=store,
            agent=agent,
            args=(*args, "--overwrite", "true"),  # the first launch's snapshots are in the store
            env=env,
            timeout=timeout,
            num_processes=num_processes,
            retry=False,
        )
    assert returncode == 0, f"{config}: exit {returncode}\n{log[-6000:]}"
    assert [f.name for f in files] == expected, (files, log[-4000:])  # else a rank died
    ranks = [json.loads(f.read_text()) for f in files]
    print(f"\n{config} ({agent}, {num_processes} processes): {seconds:.1f} s")
    return Run(out, store, ranks, log, seconds)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from ram_trl.testing import save_tiny_base

    # one base for every launch, written once (each launch would otherwise write its own)
    return save_tiny_base(tmp_path_factory.mktemp("dist-base") / "base")


def test_every_accelerate_recipe_is_launched():
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == sorted(RECIPES)


@pytest.fixture(scope="module")
def ddp_run(base, tmp_path_factory) -> Run:
    # the recipe's own num_processes: the laptop config must start two processes by itself
    return launch("cpu_ddp.yaml", tmp_path_factory.mktemp("ddp"), base=base, num_processes=None)


DS_ENV = {"DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def zero2_run(base, tmp_path_factory) -> Run:
    pytest.importorskip("deepspeed")
    work = tmp_path_factory.mktemp("zero2")
    return launch("deepspeed_zero2.yaml", work, base=base, env=DS_ENV, timeout=TIMEOUT_DS)


@pytest.fixture(scope="module")
def zero3_run(base, tmp_path_factory) -> Run:
    pytest.importorskip("deepspeed")
    work = tmp_path_factory.mktemp("zero3")
    return launch("deepspeed_zero3.yaml", work, base=base, env=DS_ENV, timeout=TIMEOUT_DS)


# -- checks ------------------------------------------------------------------------------------


def ram_entries(log_history: list[dict]) -> dict[int, dict]:
    """step -> the log entry holding the callback's snapshot metrics."""
    return {h["step"]: h for h in log_history if "ram/changed_fraction" in h}


def assert_same_snapshot(a: Path, b: Path) -> None:
    """Two snapshot folders hold the same task vector, bit for bit."""
    from ram_trl.snapshot import TaskVector

    ta, tb = TaskVector.load(a), TaskVector.load(b)
    assert ta.base_fingerprint == tb.base_fingerprint and ta.epsilon == tb.epsilon
    assert ta.deltas.keys() == tb.deltas.keys()
    for name, da in ta.deltas.items():
        db = tb.deltas[name]
        assert (da.layout, da.shape, da.dtype, da.nnz) == (db.layout, db.shape, db.dtype, db.nnz)
        for x, y in ((da.indices, db.indices), (da.values, db.values)):
            assert (x is None) == (y is None), name
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y), name


def check_run(run: Run, tmp_path: Path, *, distributed_type: str, zero_stage, sharded: bool):
    from ram_trl.snapshot import SnapshotStore, snapshot_folders, validate

    r0, others, world = run.ranks[0], run.ranks[1:], len(run.ranks)
    # the launch really was `world` processes of the intended kind
    for i, r in enumerate(run.ranks):
        assert (r["rank"], r["process_index"], r["world_size"]) == (i, i, world)
        assert r["distributed_type"].endswith(distributed_type), r["distributed_type"]
        assert r["zero_stage"] == zero_stage
        assert r["global_step"] == SAVES[-1]
        # the callback ran on every rank at every save step (collective gathers under ZeRO-3)
        assert r["checkpoints"] == [[s, sharded] for s in SAVES], r["checkpoints"]
    assert r0["is_main"] and not any(r["is_main"] for r in others)
    if sharded and world == 2 and zero_stage == 3:
        for r in run.ranks:  # the recipe's persistence threshold: each rank holds about half
            assert r["numel_local"] <= 0.6 * r["numel_full"], r
    # exactly one snapshot per save, published by rank 0 only
    assert r0["puts"] == [["digits", s] for s in SAVES]
    assert [p[0] for p in r0["published"]] == SAVES
    assert all(p[1] is not None for p in r0["published"])
    for r in others:
        assert r["puts"] == [] and all(p[1] is None for p in r["published"])
        assert not ram_entries(r["log_history"])  # only rank 0 logs the callback's metrics
    store = SnapshotStore(run.store)
    assert store.agents() == ["digits"] and store.steps("digits") == SAVES
    leftovers = [p.name for p in (run.store / "agents" / "digits").iterdir()]
    assert sorted(leftovers) == [f"step-{s}" for s in SAVES], leftovers  # no .tmp-/.trash-
    assert not any((run.store / "merged").iterdir())  # one agent: nothing to merge
    # each snapshot equals, bit for bit, the task vector of the checkpoint the trainer saved
    for step in SAVES:
        ckpt = run.out / f"checkpoint-{step}"
        assert (ckpt / "model.safetensors").is_file(), sorted(p.name for p in ckpt.iterdir())
        published = store.path("digits", step)
        offline = tmp_path / f"offline-{step}"
        snapshot_folders(run.store / "base", ckpt, offline, epsilon=validate(published).epsilon)
        assert_same_snapshot(published, offline)
        assert 0.5 < validate(published).density <= 1.0  # lr 1e-2: nearly every element moves
    # the ram/ metrics reach trainer_state.json (of the checkpoint after the snapshot: see
    # test_checkpoint_holds_its_own_snapshot_metrics) and the final log history, once per save
    state = json.loads((run.out / "checkpoint-4" / "trainer_state.json").read_text())
    assert sorted(ram_entries(state["log_history"])) == [2]
    final = ram_entries(r0["log_history"])
    assert sorted(final) == SAVES
    for step, entry in final.items():
        assert entry["ram/changed_fraction"] == pytest.approx(
            validate(store.path("digits", step)).density
        )
        assert entry["ram/snapshot_mb"] > 0 and entry["ram/snapshot_seconds"] >= 0
    assert ram_entries(state["log_history"])[2] == final[2]


# -- CPU: DDP, ZeRO-2, ZeRO-3 ----------------------------------------------------------------


def test_ddp_one_snapshot_per_save(ddp_run, tmp_path):
    check_run(ddp_run, tmp_path, distributed_type="MULTI_CPU", zero_stage=None, sharded=False)
    assert all(r["device"].startswith("cpu") for r in ddp_run.ranks)


def test_ddp_second_agent_merges_split_across_ranks(ddp_run, base, tmp_path):
    """A second agent's 2-process job on a copy of the store merges at each save, once, split
    across its two ranks, into what a single-process ``ram-trl merge --store`` of the same
    snapshots writes; it is launched with the multi-GPU recipe, which runs on CPU exactly as
    cpu_ddp.yaml does."""
    store = tmp_path / "store"
    shutil.copytree(ddp_run.store, store)
    run = launch("multi_gpu.yaml", tmp_path, base=base, store=store, agent="letters")
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in run.ranks)
    _check_second_agent(run, tmp_path)


def _check_second_agent(run: Run, tmp_path: Path) -> None:
    from ram_trl.merging.config import MergeConfig
    from ram_trl.snapshot import SnapshotStore

    r0, r1 = run.ranks
    assert r0["puts"] == [["letters", s] for s in SAVES] and r1["puts"] == []
    assert [c[0] for c in r1["checkpoints"]] == SAVES  # rank 1 took part in the snapshots
    assert SnapshotStore(run.store).agents() == ["digits", "letters"]
    entries = SnapshotStore(run.store).merged.entries()
    assert [e.steps["letters"] for e in entries] == SAVES, entries  # merged once each
    # every merge was split across both ranks (rank 0 claimed it, both merged their share)
    assert r0["merges"] == r1["merges"] == [[str(e.path), 2] for e in entries]
    for entry in entries:
        assert (entry.path / "config.json").is_file()
        # the same model as a single-process merge of the same snapshots, byte for byte
        ref = tmp_path / f"ref-{entry.sequence}"
        settings = entry.settings
        MergeConfig(
            base=None,
            agents=[f"{a}@{s}" for a, s in entry.steps.items()],
            store=str(run.store),
            method=settings["method"],
            parameters=settings["params"],
            dtype=settings["dtype"],
            out=str(ref),
        ).run(progress=False)
        weights = sorted(p.name for p in ref.iterdir() if "safetensors" in p.name)
        assert weights == sorted(p.name for p in entry.path.iterdir() if "safetensors" in p.name)
        for name in [*weights, "config.json"]:
            assert (ref / name).read_bytes() == (entry.path / name).read_bytes(), name
    logs = ram_entries(r0["log_history"])
    for step in SAVES:
        for key in ("ram/merge_seconds", "ram/rho/digits", "ram/lambda/letters",
                    "eval_merged/arithmetic/reward", "eval_agent/arithmetic/reward"):  # fmt: skip
            assert key in logs[step], (step, key)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run.store / "merged" / "latest")  # it loads


@needs_deepspeed
def test_zero2_one_snapshot_per_save(zero2_run, tmp_path):
    check_run(zero2_run, tmp_path, distributed_type="DEEPSPEED", zero_stage=2, sharded=False)


@needs_deepspeed
def test_zero3_one_snapshot_per_save(zero3_run, tmp_path):
    check_run(zero3_run, tmp_path, distributed_type="DEEPSPEED", zero_stage=3, sharded=True)


@needs_deepspeed
def test_zero3_snapshot_matches_ddp(ddp_run, zero3_run):
    """Same seed, data and steps: same theta_0 and the same changed fraction; the weights agree
    to Adam-amplified rounding (ZeRO-3 reduce-scatters gradients in another order than DDP's
    all-reduce, so bit-identity is not expected; measured max |diff| about 1.2e-5 at lr 1e-2)."""
    from transformers import AutoModelForCausalLM

    from ram_trl.snapshot import SnapshotStore

    ddp, z3 = SnapshotStore(ddp_run.store), SnapshotStore(zero3_run.store)
    assert ddp.base_fingerprint == z3.base_fingerprint
    for step in SAVES:
        a, b = ddp.get("digits", step).load(), z3.get("digits", step).load()
        assert abs(a.density - b.density) < 0.01, (a.density, b.density)
        wa, wb = a.apply(ddp_run.store / "base"), b.apply(zero3_run.store / "base")
        worst = max((wa[n] - wb[n]).abs().max().item() for n in wa)
        moved = max((wa[n] - w0).abs().max().item() for n, w0 in _base_state(ddp_run).items())
        print(f"\nstep {step}: ddp density {a.density:.4f}, zero3 {b.density:.4f}, "
              f"max |w_ddp - w_zero3| {worst:.2e} (max |tau| {moved:.2e})")  # fmt: skip
        assert worst < 1e-3 and worst < 0.1 * moved
    model = AutoModelForCausalLM.from_pretrained(zero3_run.store / "base")
    state = z3.get("digits", SAVES[-1]).load().apply(zero3_run.store / "base")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "lm_head" not in m]


def _base_state(run: Run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run.store / "base" / "model.safetensors")


@needs_deepspeed
def test_zero3_second_agent_merges_split_across_ranks(zero3_run, base, tmp_path):
    """Merging (split across the ranks) and evaluating (the agent rebuilt from its snapshot)
    with a sharded model."""
    store = tmp_path / "store"
    shutil.copytree(zero3_run.store, store)
    run = launch(
        "deepspeed_zero3.yaml", tmp_path, base=base, store=store, agent="letters", env=DS_ENV,
        timeout=TIMEOUT_DS,
    )  # fmt: skip
    _check_second_agent(run, tmp_path)


@pytest.mark.xfail(
    strict=True,
    reason="RAMCallback snapshots in on_save, which transformers calls after checkpoint-N's "
    "trainer_state.json is written: step N's ram/ metrics land only in later checkpoints "
    "(snapshotting in on_step_end instead desynchronized the ranks' collectives under DDP)",
)
def test_checkpoint_holds_its_own_snapshot_metrics(ddp_run):
    for step in SAVES:
        state = json.loads((ddp_run.out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert step in ram_entries(state["log_history"]), step


# -- GPU: FSDP and ZeRO-3 on CUDA (skipped without one) ---------------------------------------


def _gpu_launch(config: str, base: Path, tmp_path: Path, *, processes: int = 2) -> Run:
    """Up to ``processes`` ranks, one per GPU: on a 1-GPU machine 1 rank (NCCL refuses two ranks
    on one GPU), which still runs the sharded code paths (DTensor / ZeRO-3 parameters) end to
    end. The agent recipe's fp32 (bf16: false) keeps the bit-for-bit checks exact."""
    n = min(processes, torch.cuda.device_count())
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n)))}
    return launch(
        config, tmp_path, base=base, args=("--use_cpu", "false"), env=env, timeout=TIMEOUT_DS,
        num_processes=n,
    )  # fmt: skip


@pytest.mark.gpu
def test_gpu_single_gpu_one_snapshot_per_save(base, tmp_path):
    run = _gpu_launch("single_gpu.yaml", base, tmp_path, processes=1)
    check_run(run, tmp_path, distributed_type="NO", zero_stage=None, sharded=False)
    assert run.ranks[0]["device"].startswith("cuda")


@pytest.mark.gpu
def test_gpu_fsdp_one_snapshot_per_save(base, tmp_path):
    """FSDP2 through accelerate/Trainer, which does not run on CPU."""
    run = _gpu_launch("fsdp2.yaml", base, tmp_path)
    check_run(run, tmp_path, distributed_type="FSDP", zero_stage=None, sharded=True)
    assert all(r["device"].startswith("cuda") for r in run.ranks)


@pytest.mark.gpu
@needs_deepspeed
def test_gpu_zero3_one_snapshot_per_save(base, tmp_path):
    run = _gpu_launch("deepspeed_zero3.yaml", base, tmp_path)
    check_run(run, tmp_path, distributed_type="DEEPSPEED", zero_stage=3, sharded=True)
    assert all(r["device"].startswith("cuda") for r in run.ranks)
