"""ram_trl.lora against real peft: LoRA task vectors, saved adapters, and SVD back to LoRA.

The reference for every delta is PEFT itself: ``merge_and_unload()`` minus the base weights, and
``layer.get_delta_weight(adapter)``. PEFT initialises ``lora_B`` to zero, so every adapter here is
first randomized with a seeded generator (a "trained" adapter).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft")

from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from ram_trl.errors import InputError  # noqa: E402
from ram_trl.lora import (  # noqa: E402
    base_weight_name,
    density_warning,
    factorize,
    is_peft_model,
    lora_deltas,
    lora_deltas_from_adapter,
    lora_state_deltas,
    save_lora_adapter,
)
from ram_trl.testing import build_tiny_model  # noqa: E402

ATTN_0 = "model.layers.0.self_attn"

pytestmark = pytest.mark.filterwarnings(
    # peft's own notes on what these tests do on purpose (embedding LoRA, lora_bias adapters)
    "ignore:Setting `save_embedding_layers` to `True`:UserWarning",
    "ignore:.*LoRA tensor\\(s\\) have invalid shape:UserWarning",
)


@pytest.fixture(scope="module")
def qwen() -> torch.nn.Module:
    """Tiny Qwen2 base (read-only: tests wrap deep copies)."""
    return build_tiny_model("qwen2", hidden_size=32, intermediate_size=64, seed=0)


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    """Tiny GPT-2 base, whose attention/MLP projections are Conv1D (weights stored in x out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
        )
    return model.eval()


def _randomize(model: torch.nn.Module, seed: int, adapter: str = "default") -> None:
    """Make an adapter look trained: noise on its LoRA factors and modules_to_save copies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("lora_" in name or "modules_to_save" in name) and f".{adapter}" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def _wrap(base: torch.nn.Module, seed: int = 0, **config: Any) -> PeftModel:
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    _randomize(model, seed)
    return model


def _merged_minus_base(model: PeftModel, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's own answer: every tensor merge_and_unload() changes, minus the base."""
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    reference = base.state_dict()
    return {
        k: merged[k] - reference[k] for k in reference if not torch.equal(merged[k], reference[k])
    }


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=atol, rtol=0, msg=name)


QWEN_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, "down_proj": 12},
    ),
    "embedding": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "k_proj"]),
    "modules_to_save": dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", [*QWEN_CASES, "gpt2_fan_in_fan_out"])
def test_deltas_match_peft_merge_live_and_from_disk(case, qwen, gpt2, tmp_path):
    if case == "gpt2_fan_in_fan_out":
        base = gpt2
        model = _wrap(
            base, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
        )
    else:
        base, model = qwen, _wrap(qwen, **QWEN_CASES[case])
    live = dict(lora_deltas(model))

    # the dense task vector PEFT merges, keyed by the base's own state-dict names
    _assert_same(live, _merged_minus_base(model, base), atol=1e-6)
    assert set(live) <= set(base.state_dict())
    assert all(d.dtype == torch.float32 and not d.requires_grad for d in live.values())
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):  # bit-exact with PEFT's own delta
            assert torch.equal(
                live[f"{base_weight_name(name)}.weight"], module.get_delta_weight("default")
            )

    # a separate job with only the adapter folder (and, for full tensors, the base) gets the same
    model.save_pretrained(tmp_path / "adapter")
    disk = dict(lora_deltas_from_adapter(tmp_path / "adapter", base=base.state_dict()))
    _assert_same(disk, live, atol=1e-7)


def test_modules_to_save_from_disk_needs_the_base(qwen, tmp_path):
    model = _wrap(qwen, **QWEN_CASES["modules_to_save"])
    model.save_pretrained(tmp_path)
    with pytest.raises(InputError, match=r"lm_head\.weight.*pass base="):
        lora_deltas_from_adapter(tmp_path)
    qwen.save_pretrained(tmp_path / "base")  # a checkpoint folder works as the base too
    from_folder = dict(lora_deltas_from_adapter(tmp_path, base=tmp_path / "base"))
    _assert_same(from_folder, dict(lora_deltas(model)), atol=1e-7)


def test_lora_state_deltas_takes_a_config_object(qwen):
    from peft import get_peft_model_state_dict

    model = _wrap(qwen, **QWEN_CASES["patterns"])
    deltas = dict(lora_state_deltas(get_peft_model_state_dict(model), model.peft_config["default"]))
    _assert_same(deltas, dict(lora_deltas(model)), atol=1e-7)
    with pytest.raises(InputError, match="adapter name"):
        lora_state_deltas(model.state_dict(), model.peft_config["default"])


def test_adapter_selection_dtype_and_grad_mode(qwen):
    model = _wrap(qwen, r=4, target_modules=["q_proj"])
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    _randomize(model, 1, "other")
    assert [n for n, _ in lora_deltas(model)] == [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)
    ]

    other = dict(lora_deltas(model, "other", dtype=torch.bfloat16))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert other[f"{ATTN_0}.v_proj.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(
        other[f"{ATTN_0}.v_proj.weight"], layer.get_delta_weight("other").to(torch.bfloat16)
    )

    deltas = lora_deltas(model)
    next(deltas)
    assert torch.is_grad_enabled()  # no no_grad() leaks out of the suspended generator

    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(InputError, match="several adapters are active"):
        lora_deltas(model)
    with pytest.raises(InputError, match="'missing' is not in the model"):
        lora_deltas(model, "missing")


def test_injected_adapters_and_is_peft_model(qwen):
    assert not is_peft_model(qwen)
    assert not is_peft_model(object())
    injected = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["q_proj"]), copy.deepcopy(qwen)
    )
    _randomize(injected, 0)
    assert is_peft_model(injected) and is_peft_model(_wrap(qwen, r=2, target_modules=["q_proj"]))
    deltas = dict(lora_deltas(injected))
    layer = injected.model.layers[0].self_attn.q_proj
    assert torch.equal(deltas[f"{ATTN_0}.q_proj.weight"], layer.get_delta_weight("default"))
    with pytest.raises(InputError, match="no PEFT adapter layers"):
        lora_deltas(qwen)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (dict(use_dora=True), rf"module {ATTN_0}\.q_proj: .*DoraLinearVariant"),
        (dict(lora_bias=True), rf"module {ATTN_0}\.q_proj: .*lora_bias=True"),
        (dict(bias="all"), r"bias='all'"),
    ],
)
def test_variants_are_refused_live_and_from_disk(config, match, qwen, tmp_path):
    model = _wrap(qwen, r=4, target_modules=["q_proj"], **config)
    with pytest.raises(InputError, match=match):
        lora_deltas(model)
    model.save_pretrained(tmp_path)
    if config.get("bias") == "all":  # on disk the trained biases are full tensors: base needed
        with pytest.raises(InputError, match="pass base="):
            lora_deltas_from_adapter(tmp_path)
        return
    with pytest.raises(InputError, match=rf"module {ATTN_0}\.q_proj"):
        lora_deltas_from_adapter(tmp_path)


def test_other_tuners_and_unfrozen_parameters_are_refused(qwen):
    loha = get_peft_model(copy.deepcopy(qwen), LoHaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(InputError, match=rf"module {ATTN_0}\.q_proj: peft\.tuners\.loha"):
        lora_deltas(loha)
    model = _wrap(qwen, r=2, target_modules=["q_proj"])
    model.base_model.model.model.norm.weight.requires_grad_(True)  # trained in place, no copy
    with pytest.raises(InputError, match=r"model\.norm\.weight are trainable"):
        lora_deltas(model)


@pytest.mark.parametrize(
    ("peft_name", "base_name"),
    [
        (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
            f"{ATTN_0}.q_proj.weight",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias",
            f"{ATTN_0}.q_proj.bias",
        ),
        ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
        ("base_model.model.lm_head.original_module.weight", "lm_head.weight"),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            f"{ATTN_0}.q_proj.weight",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            f"{ATTN_0}.q_proj.weight",
        ),
        ("base_model.model.model.embed_tokens.lora_embedding_A", "model.embed_tokens.weight"),
        ("model.norm.weight", "model.norm.weight"),
    ],
)
def test_base_weight_name(peft_name, base_name):
    assert base_weight_name(peft_name) == base_name


# ------------------------------------------------------------------------------------------------
# factorize
# ------------------------------------------------------------------------------------------------


def test_factorize_is_exact_at_the_true_rank_and_pads_beyond_it():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 3, generator=gen) @ torch.randn(3, 12, generator=gen)
    for rank in (3, 5, 15):  # 15 > min(20, 12): zero-padded factors
        a, b, error = factorize(delta, rank)
        assert a.shape == (rank, 12) and b.shape == (20, rank)
        assert error < 1e-5
        torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=0)
    a, b, error = factorize(delta, 3, method="lowrank")
    assert error < 1e-5


def test_factorize_error_is_the_svd_tail_and_splits_symmetrically():
    delta = torch.randn(24, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    singular = torch.linalg.svdvals(delta)
    errors = []
    for rank in range(1, 17):
        a, b, error = factorize(delta, rank)
        assert a.dtype == b.dtype == torch.float32
        tail = (singular[rank:] ** 2).sum().sqrt() / (singular**2).sum().sqrt()
        assert error == pytest.approx(float(tail), abs=1e-5)
        torch.testing.assert_close(b.T @ b, a @ a.T, atol=1e-4, rtol=1e-4)  # both diag(S_k)
        errors.append(error)
    assert all(x > y for x, y in zip(errors[:-1], errors[1:], strict=True)) and errors[-1] < 1e-5


def test_factorize_edge_cases():
    a, b, error = factorize(torch.zeros(5, 4), 2)
    assert error == 0.0 and not a.any() and not b.any()
    with pytest.raises(InputError, match="2-D"):
        factorize(torch.ones(5), 2)
    with pytest.raises(InputError, match="rank"):
        factorize(torch.ones(5, 4), 0)
    with pytest.raises(InputError, match="NaN"):
        factorize(torch.full((5, 4), float("nan")), 2)


# ------------------------------------------------------------------------------------------------
# save_lora_adapter
# ------------------------------------------------------------------------------------------------


def _load_merged(base: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    return PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload().state_dict()


def test_save_lora_adapter_round_trips_through_peft(qwen, tmp_path):
    agent = _wrap(qwen, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    deltas = dict(lora_deltas(agent))  # true rank 4 per module
    deltas[f"{ATTN_0}.q_proj.bias"] = torch.full((32,), 0.5)  # 1-D: not expressible as LoRA
    base = qwen.state_dict()

    report = save_lora_adapter(
        deltas, tmp_path / "full", rank=4, alpha=16, base_model_name_or_path="tiny-qwen2"
    )
    assert report["error"] < 1e-5 and report["max_error"] < 1e-5
    assert report["dropped"] == {
        f"{ATTN_0}.q_proj.bias": {
            "shape": [32],
            "norm": pytest.approx(0.5 * 32**0.5),
            "reason": "a 1-D tensor 'bias': LoRA expresses 2-D weights",
        }
    }
    assert report["modules"]["model.embed_tokens"]["kind"] == "embedding"
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == "tiny-qwen2"
    assert sorted(config["target_modules"]) == sorted(
        n.rsplit(".", 1)[0] for n in deltas if n.endswith("weight")
    )

    merged = _load_merged(qwen, tmp_path / "full")
    for name in base:
        if name in deltas and name.endswith(".weight"):
            torch.testing.assert_close(merged[name] - base[name], deltas[name], atol=1e-5, rtol=0)
        else:  # untouched, and the dropped bias is really not applied
            assert torch.equal(merged[name], base[name]), name
    # reading the written adapter back gives the factorized deltas
    back = dict(lora_deltas_from_adapter(tmp_path / "full", base=base))
    _assert_same(back, {n: d for n, d in deltas.items() if n.endswith(".weight")}, atol=1e-5)

    # below the true rank: the error is reported, grows as the rank shrinks, and is what PEFT gets
    errors = {}
    for rank in (1, 2):
        out = tmp_path / f"rank{rank}"
        report = save_lora_adapter(deltas, out, rank=rank, base_model_name_or_path="tiny-qwen2")
        merged = _load_merged(qwen, out)
        for module, info in report["modules"].items():
            name = f"{module}.weight"
            actual = torch.linalg.norm(
                merged[name] - base[name] - deltas[name]
            ) / torch.linalg.norm(deltas[name])
            assert float(actual) == pytest.approx(info["error"], rel=1e-3, abs=1e-6)
        errors[rank] = report["error"]
    assert errors[1] > errors[2] > 0.0


def test_save_lora_adapter_fan_in_fan_out(gpt2, tmp_path):
    agent = _wrap(gpt2, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    deltas = dict(lora_deltas(agent))
    report = save_lora_adapter(
        deltas.items(),
        tmp_path,
        rank=4,
        fan_in_fan_out=True,
        base_model_name_or_path="gpt2",
        overwrite=True,
    )
    assert report["error"] < 1e-5
    merged, base = _load_merged(gpt2, tmp_path), gpt2.state_dict()
    for name, delta in deltas.items():
        torch.testing.assert_close(merged[name] - base[name], delta, atol=1e-5, rtol=0)


def test_save_lora_adapter_is_atomic_and_refuses_to_overwrite(qwen, tmp_path):
    deltas = dict(lora_deltas(_wrap(qwen, r=2, target_modules=["q_proj"])))
    out = tmp_path / "adapter"
    save_lora_adapter(deltas, out, rank=2, base_model_name_or_path="b")
    with pytest.raises(InputError, match="already exists"):
        save_lora_adapter(deltas, out, rank=2, base_model_name_or_path="b")
    save_lora_adapter(deltas, out, rank=3, base_model_name_or_path="b", overwrite=True)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    with pytest.raises(InputError, match="no 2-D weight delta"):
        save_lora_adapter(
            {"model.norm.weight": torch.ones(32)},
            tmp_path / "x",
            rank=2,
            base_model_name_or_path="b",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders left


# ------------------------------------------------------------------------------------------------
# density_warning
# ------------------------------------------------------------------------------------------------


def _changed_and_shared(agents: list[dict[str, torch.Tensor]]) -> list[tuple[float, float]]:
    """Per agent: (changed fraction, shared fraction of its changed elements), epsilon 1e-5."""
    masks = [torch.cat([(d.abs() > 1e-5).flatten() for _, d in sorted(a.items())]) for a in agents]
    count = torch.stack(masks).sum(0)
    return [
        (m.float().mean().item(), (m & (count >= 2)).sum().item() / m.sum().item()) for m in masks
    ]


def test_density_warning_fires_for_lora_agents_not_for_sparse_ones(qwen):
    config = dict(r=4, target_modules=["q_proj", "v_proj"])
    lora_agents = [dict(lora_deltas(_wrap(qwen, seed, **config))) for seed in (1, 2)]
    for changed, shared in _changed_and_shared(lora_agents):
        assert changed > 0.99 and shared > 0.99
        message = density_warning(changed, shared)
        assert message is not None and "average" in message

    gen = torch.Generator().manual_seed(0)
    sparse_agents = [
        {"w": torch.randn(10_000, generator=gen) * (torch.rand(10_000, generator=gen) < 0.05)}
        for _ in range(2)
    ]
    for changed, shared in _changed_and_shared(sparse_agents):
        assert density_warning(changed, shared) is None
    assert density_warning(0.3, 0.95) is not None  # overlapping even though not dense
    with pytest.raises(InputError, match="shared_fraction"):
        density_warning(0.5, 1.5)
