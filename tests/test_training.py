"""AgentRun in a hand-written training loop (no Trainer: how a PPO loop would use it), and the
merge report and model card it leads to."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from ram_trl import merge
from ram_trl.merging.card import hub_repo_id, render_model_card
from ram_trl.merging.report import MergeReport
from ram_trl.snapshot import SnapshotStore, TaskVectorSource
from ram_trl.training import AgentRun, RAMConfig

ROOT = Path(__file__).resolve().parents[1]


def train(model: torch.nn.Module, seed: int, steps: int = 3) -> None:
    """A few steps of plain SGD on a made-up loss, touching a sparse set of weights."""
    gen = torch.Generator().manual_seed(seed)
    weights = [p for n, p in model.named_parameters() if "mlp" in n]
    opt = torch.optim.SGD(weights, lr=1e-2)
    for _ in range(steps):
        loss = sum((p * torch.randn(p.shape, generator=gen)).sum() for p in weights[seed::2])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_hand_written_loop_snapshots_and_merges(tiny_base_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_base_factory()
    store = tmp_path / "store"
    logs = {}
    for seed, agent in enumerate(("a", "b")):
        model = AutoModelForCausalLM.from_pretrained(base)
        run = AgentRun(model, RAMConfig(store=str(store), agent=agent, base=str(base)))
        run.start()
        train(model, seed)
        logs[agent] = run.snapshot_and_merge(3)
        assert run.close() == {}
    assert "ram/merge_seconds" not in logs["a"]  # alone in the store: a snapshot only
    assert logs["a"]["ram/changed_fraction"] > 0
    assert {"ram/merge_seconds", "ram/lambda/a", "ram/rho/b"} <= set(logs["b"])
    s = SnapshotStore(store)
    sources = {a: TaskVectorSource(s.get(a, 3).path, base) for a in ("a", "b")}
    merge(base, sources, "ram_plus", tmp_path / "offline", progress=False)
    (entry,) = s.merged.entries()
    assert entry.steps == {"a": 3, "b": 3} and s.merged.latest() == entry
    got = load_file(store / "merged" / "latest" / "model.safetensors")
    want = load_file(tmp_path / "offline" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_snapshot_dtype_counts_the_changes_a_bf16_checkpoint_keeps(tmp_path):
    """Training in float32, saving bf16: theta_0 and snapshots are the bf16 views, so an update
    below bf16 resolution is no change and one above it is stored as the bf16 checkpoint has it."""
    from ram_trl.testing import build_tiny_model

    model = build_tiny_model(dtype=torch.bfloat16).float()  # loaded from a bf16 checkpoint
    run = AgentRun(
        model, RAMConfig(store=str(tmp_path / "s"), agent="a", snapshot_dtype="bfloat16")
    )
    run.start()
    weight = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        theta0 = weight.detach().clone()
        weight[0].mul_(1 + 2**-12)  # relative change far below bf16's 2**-8 spacing
        weight[1].add_(1.0)  # a change every checkpoint shows
    logs = run.snapshot(1)
    name = "model.layers.0.mlp.up_proj.weight"
    base = load_file(tmp_path / "s" / "base" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in base.values())
    assert torch.equal(base[name], theta0.to(torch.bfloat16))
    tuned = TaskVectorSource(
        SnapshotStore(tmp_path / "s").get("a", 1).path, tmp_path / "s" / "base"
    )
    after = tuned.read(name)
    assert after.dtype == torch.bfloat16
    assert torch.equal(after, weight.detach().to(torch.bfloat16))
    changed = (after.float() - base[name].float()).abs() > 1e-5
    assert not changed[0].any() and changed[1].all() and not changed[2:].any()
    total = sum(p.numel() for p in model.parameters())
    assert logs["ram/changed_fraction"] == pytest.approx(weight.shape[1] / total)


def test_background_merge_lag_and_final_merge(tiny_base_factory, tmp_path):
    """A background merge started at step 3 and picked up at step 10 is 7 steps stale; close()
    then merges the newer snapshot it did not include."""
    from transformers import AutoModelForCausalLM

    base = tiny_base_factory()
    store = tmp_path / "store"
    runs = {}
    for seed, agent in enumerate(("a", "b")):
        model = AutoModelForCausalLM.from_pretrained(base)
        cfg = RAMConfig(
            store=str(store),
            agent=agent,
            base=str(base),
            merge_background=True,
            snapshot_background=False,  # the merge starts in the call (background: next poll)
        )
        runs[agent] = run = AgentRun(model, cfg)
        run.start()
        train(model, seed)
        assert "ram/merge_lag_steps" not in run.snapshot_and_merge(3)  # a merge starts, for b
    run, deadline = runs["b"], time.monotonic() + 120
    while not (logs := run.poll(10)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert logs["ram/merge_lag_steps"] == 7 and logs["ram/merge_sequence"] == 1
    train(run.model, 5)
    run.snapshot(10)
    final = run.close(10)
    assert final["ram/merge_lag_steps"] == 0 and final["ram/merge_sequence"] == 2
    assert SnapshotStore(store).merged.latest().steps == {"a": 3, "b": 10}


def test_snapshot_before_start_is_an_error(tiny_base_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base_factory())
    run = AgentRun(model, {"store": str(tmp_path / "s"), "agent": "a"})
    with pytest.raises(RuntimeError, match="start"):
        run.snapshot(1)


# --- the report and the card ------------------------------------------------------------------


def test_report_survives_json(tiny_base_factory, tiny_agents_factory, tmp_path):
    base = tiny_base_factory()
    agents = tiny_agents_factory(base, ("a", "b"), density=[0.05, 0.2])
    params = {"rho_scope": "tensor"}
    report = merge(base, agents, "ram_plus", tmp_path / "m", params=params, progress=False)
    record = json.loads((tmp_path / "m" / "ram_trl_merge.json").read_text())
    again = MergeReport.from_dict(record)
    assert again.agents == report.agents and again.params == report.params
    assert again.counted and record["agents"][0]["lambda"] == report.agents[0].lambda_
    assert report.agents[0].lam == report.agents[0].lambda_  # the earlier name still reads


def test_card_of_per_tensor_scope_shows_ranges_and_says_so(
    tiny_base_factory, tiny_agents_factory, tmp_path
):
    base = tiny_base_factory()
    agents = tiny_agents_factory(base, ("a", "b"), density=[0.05, 0.2])
    report = merge(
        base, agents, "ram_plus", tmp_path / "m", params={"rho_scope": "tensor"}, progress=False
    )
    for agent in report.agents:
        lo, hi = agent.lambda_range
        assert 1 <= lo < hi <= 1.2 + 1e-6  # lambda differs by tensor, within RAM+ bounds (float32)
        assert agent.rho_range[0] <= agent.rho_range[1]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "rho_scope=tensor" in card and "lambda per tensor" in card
    assert f"{report.agents[0].lambda_range[0]:.4f} to" in card
    front = card.split("---")[1]
    assert "base_model" not in front and str(base) not in front  # a local path is no Hub id


def test_card_of_a_method_without_counts_shows_no_counts(
    tiny_base_factory, tiny_agents_factory, tmp_path
):
    base = tiny_base_factory()
    agents = tiny_agents_factory(base, ("a", "b"))
    report = merge(base, agents, "ties", tmp_path / "m", progress=False)
    assert not report.counted
    card = (tmp_path / "m" / "README.md").read_text()
    assert "| agent | path |" in card and "0.00%" not in card and "does not count" in card


def test_only_hub_ids_become_base_model(tmp_path):
    cached = tmp_path / "hub" / "models--Qwen--Qwen2-0.5B" / "snapshots" / "abc123"
    assert hub_repo_id(str(cached)) == "Qwen/Qwen2-0.5B"
    assert hub_repo_id(str(tmp_path / "runs" / "base")) is None
    report = MergeReport("ram", {"epsilon": 1e-5}, str(cached), [], 0, out="o", counted=False)
    card = ModelCard(render_model_card(report))  # what the Hub reads
    assert card.data.base_model == "Qwen/Qwen2-0.5B" and card.data.base_model_relation == "merge"


# --- entry points ----------------------------------------------------------------------------


def test_python_dash_m_ram_trl_and_any_method_parameter(
    tiny_base_factory, tiny_agents_factory, tmp_path
):
    base = tiny_base_factory()
    agents = tiny_agents_factory(base, ("a", "b"))
    listed = subprocess.run(
        [sys.executable, "-m", "ram_trl", "methods"], capture_output=True, text=True, cwd=ROOT
    )
    assert listed.returncode == 0 and "breadcrumbs" in listed.stdout
    args = [arg for name, path in agents.items() for arg in ("--agent", f"{name}={path}")]
    cmd = [sys.executable, "-m", "ram_trl", "merge", "--base", str(base), *args, "-q"]
    cmd += ["--method", "breadcrumbs", "--param", "density=0.5", "--param", "gamma=0.02"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "m" / "ram_trl_merge.json").read_text())
    assert record["params"] == {"density": 0.5, "gamma": 0.02, "scale": 1.0}
    bad = subprocess.run([*cmd, "--param", "gama=1", "--out", str(tmp_path / "x")], text=True,
                         capture_output=True)  # fmt: skip
    assert bad.returncode == 2 and "gama" in bad.stderr
