"""Snapshots written in the background (RAMConfig.snapshot_background), the wait of a
``merge="watcher"`` job for its final merge, and ``lora_rank`` from a TRL command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from test_callback import ROOT, digits, grpo  # noqa: E402

from ram_trl.callback import RAMCallback, RAMConfig  # noqa: E402
from ram_trl.errors import InputError, OutputError  # noqa: E402
from ram_trl.snapshot import SnapshotStore, validate  # noqa: E402
from ram_trl.training import AgentRun  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from ram_trl.testing import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("base") / "base")


def entry_bytes(path: Path) -> tuple[dict, dict]:
    """A snapshot's manifest (less its creation time) and its tensors."""
    from safetensors.torch import load_file

    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("created", None)
    manifest.pop("base_path", None)  # each store's own base/ (the fingerprint is compared)
    tensors = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
    return manifest, tensors


@pytest.mark.parametrize("kind", ["full", "bf16", "lora"])
def test_background_snapshot_equals_the_synchronous_one(base, tmp_path, kind):
    """One GRPO run, two callbacks at the same saves: one snapshots in the training path, one
    in the background while training moves the weights on. Every entry is the same, bit for
    bit; train end waited for the last one."""
    from peft import LoraConfig

    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = grpo(
        base,
        tmp_path / "out",
        digits,
        steps=4,
        learning_rate=1e-3,
        peft_config=peft if kind == "lora" else None,
    )
    extra = {"snapshot_dtype": "bfloat16"} if kind == "bf16" else {"base": str(base)}
    callbacks = {}
    for mode, background in (("sync", False), ("background", True)):
        config = RAMConfig(
            store=str(tmp_path / mode),
            agent="a",
            merge="never",
            snapshot_background=background,
            **extra,
        )
        callbacks[mode] = RAMCallback(trainer, config)
        trainer.add_callback(callbacks[mode])
    assert callbacks["background"].run._writer is not None
    assert callbacks["sync"].run._writer is None
    trainer.train()
    sync, background = SnapshotStore(tmp_path / "sync"), SnapshotStore(tmp_path / "background")
    assert sync.steps("a") == background.steps("a") == [2, 4]  # published before train() ended
    for step in (2, 4):
        (m1, t1), (m2, t2) = (entry_bytes(s.path("a", step)) for s in (sync, background))
        assert m1 == m2 and t1.keys() == t2.keys()
        assert all(t1[k].dtype == t2[k].dtype and torch.equal(t1[k], t2[k]) for k in t1), step
    assert validate(background.path("a", 4)).density > 0  # the weights did move
    history = [h for h in trainer.state.log_history if "ram/snapshot_pause_seconds" in h]
    assert len(history) == 4  # two saves, two callbacks
    assert sum("ram/snapshot_wait_seconds" in h for h in history) == 2
    assert sum("ram/changed_fraction" in h for h in trainer.state.log_history) == 4


def test_a_failing_background_snapshot_fails_the_job(base, tmp_path):
    """A write that fails in the thread is raised in the training job, once, naming it."""
    store = tmp_path / "store"
    SnapshotStore(store)
    (store / "agents" / "a").write_text("not a folder")  # the agent's folder cannot be made
    trainer = grpo(base, tmp_path / "out", digits, steps=4)
    trainer.add_callback(
        RAMCallback(trainer, RAMConfig(store=str(store), agent="a", base=str(base), merge="never"))
    )
    with pytest.raises(
        OutputError, match="background snapshot of agent 'a' at step 2 failed: cannot write"
    ):
        trainer.train()


def test_one_snapshot_in_flight_and_close_waits(tiny_base_factory, tmp_path):
    """A snapshot still being written when the next one is due is waited for (its buffers are
    reused: one copy of the weights, whatever the number of snapshots), and close() waits for
    the last; what was published is the step's weights, not the ones trained after."""
    from transformers import AutoModelForCausalLM

    base = tiny_base_factory()
    model = AutoModelForCausalLM.from_pretrained(base)
    run = AgentRun(
        model, RAMConfig(store=str(tmp_path / "s"), agent="a", base=str(base), merge="never")
    )
    run.start()
    gate, put = threading.Event(), run.store.put

    def held_put(*args, **kwargs):  # the disk is slow today
        assert gate.wait(60)
        return put(*args, **kwargs)

    run.store.put = held_put
    weight = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight[0].add_(1.0)
    first = run.snapshot(1)
    assert "ram/changed_fraction" not in first and run.store.steps("a") == []  # in flight
    pointers = [t.data_ptr() for _, t in run._writer.taken.tensors]
    assert run._writer.taken.nbytes == sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        weight[1].add_(1.0)  # training goes on: step 1's copy must not see this
    threading.Timer(0.2, gate.set).start()
    second = run.snapshot(2)  # waits for step 1 before it overwrites the buffers
    assert second["ram/changed_fraction"] > 0 and 1 in run.store.steps("a")
    assert [t.data_ptr() for _, t in run._writer.taken.tensors] == pointers
    assert "ram/changed_fraction" in run.close()
    assert run.store.steps("a") == [1, 2]
    rows = {
        s: validate(run.store.path("a", s)).tensors["model.layers.0.mlp.up_proj.weight"].nnz
        for s in (1, 2)
    }
    assert rows == {1: weight.shape[1], 2: 2 * weight.shape[1]}


def two_agent_store(base: Path, store: Path) -> None:
    """Agent ``a`` with one snapshot, so that a watcher has two agents to merge."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    run = AgentRun(model, RAMConfig(store=str(store), agent="a", base=str(base), merge="never"))
    run.start()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0].add_(1.0)
    run.snapshot(3)
    run.close()


def watcher_job(base: Path, store: Path, **kw) -> AgentRun:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = RAMConfig(store=str(store), agent="b", base=str(base), merge="watcher", **kw)
    run = AgentRun(model, config)
    run.start()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0].add_(1.0)
    run.snapshot_and_merge(5)
    return run


def test_watcher_job_without_a_watcher_warns_at_once(tiny_base_factory, tmp_path):
    base, store = tiny_base_factory(), tmp_path / "store"
    two_agent_store(base, store)
    run = watcher_job(base, store)
    started = time.monotonic()
    with pytest.warns(UserWarning, match="no `ram-trl watch .*` is running"):
        run.close()
    assert time.monotonic() - started < 60  # did not wait out watcher_timeout (600 s)


def test_watcher_job_waits_until_its_timeout(tiny_base_factory, tmp_path):
    """A watcher that holds its lock but never merges (busy elsewhere): the wait ends at
    watcher_timeout with a warning."""
    from ram_trl.io.atomic import hold_lock_file

    base, store = tiny_base_factory(), tmp_path / "store"
    two_agent_store(base, store)
    run = watcher_job(base, store, watcher_timeout=0.5)
    fd = hold_lock_file(store / ".watcher-1.lock")
    try:
        with pytest.warns(UserWarning, match="timed out before the watcher merged"):
            run.close()
    finally:
        os.close(fd)


def test_watcher_job_waits_for_the_merge_of_its_final_snapshot(base, tmp_path):
    """A GRPO job with merge: watcher beside ``ram-trl watch``: when train() returns, the
    store's newest merged model holds the job's final snapshot."""
    import signal

    from ram_trl.training.watch import watcher_running

    store = tmp_path / "store"
    two_agent_store(base, store)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "ram_trl", "watch", str(store), "--interval", "0.2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even if ignored here
    )
    try:
        deadline = time.monotonic() + 120
        while not watcher_running(SnapshotStore(store)) and time.monotonic() < deadline:
            assert watcher.poll() is None, watcher.stderr.read()
            time.sleep(0.2)
        trainer = grpo(base, tmp_path / "out", digits, steps=2)
        config = RAMConfig(store=str(store), agent="b", base=str(base), merge="watcher")
        trainer.add_callback(RAMCallback(trainer, config))
        trainer.train()
        assert SnapshotStore(store).merged.latest().steps == {"a": 3, "b": 2}
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.communicate(timeout=60)
    assert not watcher_running(SnapshotStore(store))  # the lock went with the process


def test_lora_rank_from_a_trl_command_line(tmp_path):
    """``--lora_rank auto`` and ``--lora_rank 8`` through TrlParser / HfArgumentParser beside
    GRPOConfig; Python ints keep working; anything else is one clear error."""
    from transformers import HfArgumentParser
    from trl import GRPOConfig, TrlParser

    args = ["--output_dir", str(tmp_path), "--use_cpu", "--store", str(tmp_path), "--agent", "a"]
    for parser in (TrlParser((GRPOConfig, RAMConfig)), HfArgumentParser((GRPOConfig, RAMConfig))):
        _, ram = parser.parse_args_into_dataclasses([*args, "--lora_rank", "auto"])
        assert ram.lora_rank == "auto" and ram.merge_settings.lora_rank == "auto"
        _, ram = parser.parse_args_into_dataclasses([*args, "--lora_rank", "8"])
        assert ram.lora_rank == 8 and ram.merge_settings.lora_rank == 8
        _, ram = parser.parse_args_into_dataclasses(args)
        assert ram.lora_rank == 16
        with pytest.raises(
            InputError, match="lora_rank must be an integer >= 1 or 'auto', got 'eight'"
        ):
            parser.parse_args_into_dataclasses([*args, "--lora_rank", "eight"])
    assert RAMConfig(store=str(tmp_path), agent="a", lora_rank=4).lora_rank == 4
    for bad in (0, None, True, 2.5):
        with pytest.raises(InputError, match="lora_rank"):
            RAMConfig(store=str(tmp_path), agent="a", lora_rank=bad)
