"""A merge's LoRA output carries every merged delta: 2-D weights to the stated error, biases and
norms exactly (PEFT's bias="all" and modules_to_save); rank "auto" meets a target error; a fixed
rank above it warns; ``ram-trl merge --output lora`` does the same offline."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ram_trl import merge


def _adapter_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _check_against_full(base: Path, full: Path, adapter: Path) -> dict:
    """Every tensor of the loaded adapter against the full merge; returns the report."""
    report = json.loads((adapter / "ram_trl_lora.json").read_text())
    want = load_file(full / "model.safetensors")
    basew = load_file(base / "model.safetensors")
    got = _adapter_merged(base, adapter)
    squared_error = squared_norm = 0.0
    for name, merged in want.items():
        delta = merged.float() - basew[name].float()
        if merged.ndim != 2:  # biases and norms: carried whole, bit for bit
            assert torch.equal(got[name], merged), name
            continue
        miss = float(torch.linalg.matrix_norm(got[name].float() - merged.float()))
        norm = float(torch.linalg.matrix_norm(delta))
        module = report["modules"][name.removesuffix(".weight")]
        assert miss <= module["error"] * norm * 1.001 + 1e-6, name  # as the report states
        squared_error, squared_norm = squared_error + miss**2, squared_norm + norm**2
    assert (squared_error / squared_norm) ** 0.5 == pytest.approx(report["error"], rel=1e-3)
    assert report["dropped"] == {}
    return report


def test_lora_output_carries_biases_and_norms(tiny_base_factory, tiny_agents_factory, tmp_path):
    base = tiny_base_factory()
    agents = tiny_agents_factory(base, ("a", "b"), density=0.2)
    one_d = [n for n, t in load_file(base / "model.safetensors").items() if t.ndim == 1]
    assert any(n.endswith(".bias") for n in one_d) and any("norm" in n for n in one_d)
    merge(base, agents, "ram_plus", tmp_path / "full", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the error asked for: no warning
        report = merge(
            base,
            agents,
            "ram_plus",
            tmp_path / "auto",
            progress=False,
            lora_rank="auto",
            lora_max_error=0.05,
        )
    assert report.lora.rank == "auto" and report.lora.error <= 0.05
    assert sorted(report.lora.exact) == sorted(one_d)
    lora = _check_against_full(base, tmp_path / "full", tmp_path / "auto")
    ranks = {m["rank"] for m in lora["modules"].values()}
    assert len(ranks) > 1 and all(m["error"] <= 0.05 for m in lora["modules"].values())
    config = json.loads((tmp_path / "auto" / "adapter_config.json").read_text())
    assert config["bias"] == "all" and config["modules_to_save"]
    card = (tmp_path / "auto" / "README.md").read_text()
    assert "carried whole" in card and "library_name: peft" in card
    with pytest.warns(UserWarning, match=r"misses .* of the merged delta .* above the 10.0%"):
        low = merge(
            base,
            agents,
            "ram_plus",
            tmp_path / "r2",
            progress=False,
            lora_rank=2,
            lora_max_error=0.1,
        )
    assert low.lora.error > 0.1
    _check_against_full(base, tmp_path / "full", tmp_path / "r2")


def test_cli_merge_lora_output(tiny_base_factory, tiny_agents_factory, tmp_path, capsys):
    from ram_trl.cli import main

    base = tiny_base_factory()
    agents = tiny_agents_factory(base, ("a", "b"), density=0.2)
    flags = [w for name, path in agents.items() for w in ("--agent", f"{name}={path}")]
    out = tmp_path / "adapter"
    args = ["merge", "--base", str(base), *flags, "--out", str(out), "--output", "lora", "-q"]
    assert main([*args, "--lora-rank", "auto", "--lora-max-error", "0.2"]) == 0
    report = json.loads((out / "ram_trl_merge.json").read_text())
    assert report["lora"]["rank"] == "auto" and report["lora"]["error"] <= 0.2
    assert (out / "adapter_config.json").is_file() and (out / "README.md").is_file()
    bad = ["merge", "--base", str(base), *flags, "--out", str(tmp_path / "x"), "--output", "lora"]
    assert main([*bad, "--lora-rank", "0"]) == 2
    assert "lora_rank must be an integer >= 1 or 'auto'" in capsys.readouterr().err
