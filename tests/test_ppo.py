"""A hand-written PPO loop (policy + value head) driving AgentRun: TRL 1.16 has no PPO trainer, so
this is how PPO users merge. The value model trains too, but it is never part of theta_0 or of a
task vector; TRL's PPO wrappers (``PolicyAndValueWrapper``, ``AutoModelForCausalLMWithValueHead``)
are unwrapped to their policy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ram_trl import merge
from ram_trl.snapshot import SnapshotStore, TaskVectorSource
from ram_trl.training import AgentRun, RAMConfig

PROMPTS = ["1+1=", "abc", "2*3=", "say hi:"]


class PolicyAndValueWrapper(nn.Module):
    """The shape of TRL's PPO wrapper (``trl.experimental.ppo``, TRL 0.26-1.12): ``.policy`` and
    ``.value_model``."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy, self.value_model = policy, value_model


class WithValueHead(nn.Module):
    """The shape of TRL <= 0.11's ``AutoModelForCausalLMWithValueHead``."""

    def __init__(self, pretrained_model: nn.Module, v_head: nn.Module):
        super().__init__()
        self.pretrained_model, self.v_head = pretrained_model, v_head


def reward(text: str, kind: str) -> float:
    wanted = str.isdigit if kind == "digits" else str.isalpha
    return sum(map(wanted, text)) / max(len(text), 1)


def ppo_steps(policy, value_head, tokenizer, kind: str, steps: int, seed: int) -> None:
    """Clipped-ratio PPO with a learned baseline: sample, score, one update epoch per batch."""
    torch.manual_seed(seed)
    params = list(policy.parameters()) + list(value_head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    width = enc["input_ids"].shape[1]
    for _ in range(steps):
        with torch.no_grad():
            out = policy.generate(**enc, do_sample=True, max_new_tokens=4, min_new_tokens=4,
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            rewards = torch.tensor([reward(t, kind) for t in texts])
            old = _logprobs(policy, out, width)
        logits = policy(out, output_hidden_states=True)
        new = torch.log_softmax(logits.logits[:, width - 1 : -1], -1)
        new = new.gather(-1, out[:, width:, None]).squeeze(-1).sum(-1)
        value = value_head(logits.hidden_states[-1][:, width - 1].detach()).squeeze(-1)
        advantage = rewards - value.detach()
        ratio = torch.exp(new - old)
        policy_loss = -torch.min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage).mean()
        loss = policy_loss + 0.5 * (value - rewards).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _logprobs(policy, ids, width):
    logits = policy(ids).logits[:, width - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, width:, None]).squeeze(-1).sum(-1)


@pytest.mark.parametrize("wrapper", [PolicyAndValueWrapper, WithValueHead])
def test_a_ppo_loop_snapshots_its_policy_and_merges(tiny_base_factory, tmp_path, wrapper):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_base_factory()
    tokenizer = AutoTokenizer.from_pretrained(base)
    store, logs = tmp_path / "store", {}
    policy_names = set(load_file(base / "model.safetensors"))
    for seed, kind in enumerate(("digits", "letters")):
        policy = AutoModelForCausalLM.from_pretrained(base)
        value_head = nn.Linear(policy.config.hidden_size, 1)
        model = wrapper(policy, value_head)
        run = AgentRun(model, RAMConfig(store=str(store), agent=kind), tokenizer=tokenizer)
        run.start()  # theta_0: the policy at train begin, written to <store>/base
        head_before = value_head.weight.detach().clone()
        ppo_steps(policy, value_head, tokenizer, kind, steps=3, seed=seed)
        assert not torch.equal(value_head.weight, head_before)  # the value model trained too
        logs[kind] = run.snapshot_and_merge(3)
        run.close()
    assert set(load_file(store / "base" / "model.safetensors")) == policy_names
    snapshots = SnapshotStore(store)
    for kind in ("digits", "letters"):
        manifest = json.loads((snapshots.get(kind, 3).path / "manifest.json").read_text())
        names = set(manifest["tensors"])
        assert names == policy_names, names ^ policy_names  # no value head, nothing missing
    assert logs["digits"]["ram/changed_fraction"] > 0
    assert {"ram/lambda/digits", "ram/lambda/letters"} <= set(logs["letters"])
    sources = {k: TaskVectorSource(snapshots.get(k, 3).path, base) for k in ("digits", "letters")}
    merge(base, sources, "ram_plus", tmp_path / "offline", progress=False)
    assert snapshots.merged.latest().steps == {"digits": 3, "letters": 3}
    got = load_file(store / "merged" / "latest" / "model.safetensors")
    want = load_file(tmp_path / "offline" / "model.safetensors")
    assert got.keys() == want.keys() == policy_names
    assert all(torch.equal(got[k], want[k]) for k in got)
