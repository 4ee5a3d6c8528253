"""``ram-trl demo --quick`` end to end (the real CLI, GRPOTrainer, RAMCallback, store, merges),
twice: every row, the JSON schema, the figures, and the same table from the same seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ram_trl.demo.config import DemoConfig
from ram_trl.demo.pipeline import candidates

ROWS = ["base", "tool", "arith", "memory", "joint RL", *candidates(DemoConfig())]


def _demo(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ram_trl", "demo", "--quick", "-q", "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    done = [_demo(root / name) for name in ("a", "b")]
    for run in done:
        assert run.returncode == 0, run.stderr[-3000:]
    return root, done


def test_quick_demo_has_every_row_and_the_schema(two_runs):
    root, (first, _) = two_runs
    results = json.loads((root / "a" / "results.json").read_text())
    assert results["schema"] == "ram-trl-demo/1"
    assert results["tasks"] == ["tool", "arith", "memory"]
    assert [r["name"] for r in results["rows"]] == ROWS
    for row in results["rows"]:
        assert set(row["scores"]) == set(results["tasks"])
        assert all(0.0 <= v <= 1.0 for v in row["scores"].values())
        assert row["average"] == pytest.approx(sum(row["scores"].values()) / 3)
        if row["kind"] == "merge":
            assert set(row["retention"]) == set(results["tasks"]) and row["validation"] is not None
    tuned = {r["name"]: r["setting"] for r in results["rows"]}
    assert tuned["ram_plus"] == "paper default" and tuned["task_arithmetic"].startswith("scale=")
    for name, agent in results["agents"].items():
        assert 0.0 < agent["density"] <= 1.0, name
        assert agent["unique_share"] + agent["shared_share"] == pytest.approx(1.0)
    # merges while the agents trained, each of at least two agents, evaluated on every task
    assert results["during_training"]
    for event in results["during_training"]:
        assert len(event["merged"]) >= 2 and set(event["eval_merged"]) == set(results["tasks"])
    for png in ("results.png", "probe.png"):
        assert (root / "a" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for line in ("ram_plus (r tuned)", "joint RL", "unique", "results.json"):
        assert line in first.stdout


def test_quick_demo_is_reproducible(two_runs):
    root, _ = two_runs
    rows = [json.loads((root / n / "results.json").read_text())["rows"] for n in ("a", "b")]
    assert rows[0] == rows[1]


def test_pretrained_base_is_cached_and_rebuilt_when_settings_change(tmp_path):
    from ram_trl.demo.pretrain import STAMP, pretrain
    from ram_trl.demo.tasks import splits

    data = [splits("arith", {"train": 8}, 0)["train"]]
    settings = {"hidden_size": 16, "layers": 1, "sft_steps": 2, "sft_lr": 1e-3,
                "sft_batch_size": 4, "seed": 0}  # fmt: skip
    folder = pretrain(tmp_path / "base", data, settings, progress=False)
    first = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrain(folder, data, settings, progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == first
    pretrain(folder, data, {**settings, "sft_steps": 3}, progress=False)
    assert json.loads((folder / STAMP).read_text())["sft_steps"] == 3


def test_bad_demo_arguments_are_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, message in (
        (["--agents", "9"], "agents must be"),
        (["--model", str(tmp_path)], "not a Hugging Face model folder"),
    ):
        cmd = [
            sys.executable,
            "-m",
            "ram_trl",
            "demo",
            "--quick",
            "--out",
            str(tmp_path / "o"),
            *args,
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_recipes_are_the_presets():
    root = Path(__file__).resolve().parents[1] / "recipes" / "demo"
    assert DemoConfig.from_yaml(root / "default.yaml") == DemoConfig()
    assert DemoConfig.from_yaml(root / "quick.yaml") == DemoConfig.preset(
        True, out="runs/demo-quick"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quick", "no"),
        ("learning_rate", "3e-6"),
        ("grpo_steps", 2.5),
        ("agents", True),
        ("scale_grid", [0.5, "x"]),
        ("model", 7),
    ],  # fmt: skip
)
def test_recipe_values_of_the_wrong_kind_name_the_field(tmp_path, field, value):
    import yaml

    from ram_trl.errors import InputError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({field: value}))
    with pytest.raises(InputError, match=field):
        DemoConfig.from_yaml(recipe)


def test_a_given_float32_model_becomes_a_cached_bf16_base(tiny_base_factory, tmp_path):
    import torch
    from safetensors.torch import load_file

    from ram_trl.demo.pretrain import bf16_copy

    fp32 = tiny_base_factory()
    copy = bf16_copy(fp32, tmp_path / "base")
    assert copy == tmp_path / "base"
    got, want = load_file(copy / "model.safetensors"), load_file(fp32 / "model.safetensors")
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    assert (copy / "tokenizer.json").is_file()
    assert bf16_copy(copy, tmp_path / "again") == copy  # already bf16: used as it is
    assert bf16_copy(fp32, tmp_path / "base") == copy  # cached
