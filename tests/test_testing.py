"""The tiny-model helpers must be right before anything tested with them can be trusted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from ram_trl import testing
from ram_trl.testing import CHANGE_THRESHOLD, build_tokenizer, make_sparse_agents

HETEROGENEOUS = {"code": 0.03, "tool": 0.2, "memory": 0.3}


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def change_masks(
    base: dict[str, torch.Tensor], agents: dict[str, Path]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{agent: {tensor: |agent - base| > 1e-5}}``, computed independently of the helper."""
    masks = {}
    for name, path in agents.items():
        weights = load_weights(path)
        assert weights.keys() == base.keys()
        masks[name] = {
            k: (weights[k].float() - base[k].float()).abs().reshape(-1) > CHANGE_THRESHOLD
            for k in base
        }
    return masks


def shared_unique(masks: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple[int, int]]:
    names = list(masks)
    tensors = next(iter(masks.values())).keys()
    out = dict.fromkeys(names, (0, 0))
    for k in tensors:
        count = torch.stack([masks[n][k] for n in names]).sum(0)
        for n in names:
            shared, unique = out[n]
            out[n] = (
                shared + int((masks[n][k] & (count >= 2)).sum()),
                unique + int((masks[n][k] & (count == 1)).sum()),
            )
    return out


# --- tokenizer and base models ---------------------------------------------------------------


def test_module_imports_without_transformers() -> None:
    code = "import sys, ram_trl.testing; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tokenizer_round_trips_and_has_chat_template() -> None:
    tok = build_tokenizer()
    ids = tok("ab 1+1=")["input_ids"]
    assert len(ids) == 7 and tok.decode(ids) == "ab 1+1="
    assert "token_type_ids" not in tok("x")
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "2+2"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "user: 2+2\nassistant: "


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_saved_base_loads_and_generates(tiny_base_factory, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_base_factory(arch)
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch
    prompt = tok("1+1=", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_saved_tokenizer_reloads_exactly_through_auto_tokenizer(tiny_base_factory, arch) -> None:
    """transformers rebuilds a Qwen2 folder's tokenizer as a byte-level Qwen2Tokenizer whatever
    class it names; a plain character vocabulary then lost every space (15 ids, not 17)."""
    from transformers import AutoTokenizer

    from ram_trl.testing import CHARS

    reloaded = AutoTokenizer.from_pretrained(tiny_base_factory(arch))
    built = build_tokenizer()
    text = "weather in paris?\ncall:weather(city=paris) " + CHARS
    assert len(reloaded("weather in paris?")["input_ids"]) == 17
    assert reloaded(text)["input_ids"] == built(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert reloaded.apply_chat_template(
        [{"role": "user", "content": "a b"}], tokenize=False, add_generation_prompt=True
    ) == built.apply_chat_template(
        [{"role": "user", "content": "a b"}], tokenize=False, add_generation_prompt=True
    )


def test_sharded_save_has_index_and_same_weights(tiny_base_factory) -> None:
    sharded, single = tiny_base_factory(sharded=True), tiny_base_factory()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and files == {p.name for p in sharded.glob("*.safetensors")}
    a, b = load_weights(sharded), load_weights(single)
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed must give the same weights"


def test_tied_embeddings_have_no_lm_head(tiny_base_factory) -> None:
    tied, untied = load_weights(tiny_base_factory(tie=True)), load_weights(tiny_base_factory())
    assert "lm_head.weight" not in tied and "lm_head.weight" in untied
    assert json.loads((tiny_base_factory(tie=True) / "config.json").read_text())[
        "tie_word_embeddings"
    ]


def test_bf16_base_is_stored_in_bf16(tiny_base_factory) -> None:
    weights = load_weights(tiny_base_factory(dtype=torch.bfloat16))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


# --- sparse agents ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("density", [0.05, HETEROGENEOUS], ids=["uniform", "heterogeneous"])
def test_agents_have_requested_density_and_overlap(
    tiny_base_factory, tiny_agents_factory, dtype: torch.dtype, density
) -> None:
    base_path = tiny_base_factory(dtype=dtype)
    agents = tiny_agents_factory(base_path, list(HETEROGENEOUS), density=density)
    base = load_weights(base_path)
    numel = sum(t.numel() for t in base.values())
    masks = change_masks(base, agents)
    counts = shared_unique(masks)
    report = json.loads((next(iter(agents.values())).parent / "agents.json").read_text())
    for name in agents:
        target = density if isinstance(density, float) else density[name]
        changed = sum(int(m.sum()) for m in masks[name].values())
        assert changed / numel == pytest.approx(target, abs=0.002)
        shared, unique = counts[name]
        assert shared > 0 and unique > 0
        assert shared + unique == changed
        entry = report["agents"][name]
        assert (entry["changed"], entry["shared"], entry["unique"]) == (changed, shared, unique)
        assert entry["rho"] == pytest.approx(shared / unique)
    if isinstance(density, float):  # equal densities: exactly `overlap` of the changes are shared
        assert all(s / (s + u) == pytest.approx(0.5, abs=0.01) for s, u in counts.values())


def test_unselected_elements_are_bit_identical(tiny_base_factory, tiny_agents_factory) -> None:
    base_path = tiny_base_factory(dtype=torch.bfloat16)
    base = load_weights(base_path)
    for path in tiny_agents_factory(base_path).values():
        agent = load_weights(path)
        for k, w in base.items():
            moved = (agent[k].float() - w.float()).abs() > CHANGE_THRESHOLD
            assert torch.equal(agent[k] != w, moved), f"{k}: a change below the threshold"


def test_agents_keep_layout_dtype_and_files(tiny_base_factory, tiny_agents_factory) -> None:
    from transformers import AutoModelForCausalLM

    base_path = tiny_base_factory(dtype=torch.bfloat16, sharded=True, tie=True)
    base_files = {p.name: p for p in base_path.iterdir()}
    base_index = json.loads(base_files["model.safetensors.index.json"].read_text())
    for path in tiny_agents_factory(base_path).values():
        files = {p.name for p in path.iterdir()}
        assert files == set(base_files)
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == base_index["weight_map"]
        for name in ("config.json", "generation_config.json", "tokenizer.json"):
            assert (path / name).read_bytes() == base_files[name].read_bytes()
        assert {t.dtype for t in load_weights(path).values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16


def test_agents_are_deterministic_and_layout_independent(tiny_base_factory, tmp_path) -> None:
    base_single, base_sharded = tiny_base_factory(), tiny_base_factory(sharded=True)
    first = make_sparse_agents(base_single, tmp_path / "one", ["x", "y"], seed=3)
    again = make_sparse_agents(base_sharded, tmp_path / "two", ["x", "y"], seed=3)
    resharded = make_sparse_agents(
        base_single, tmp_path / "three", ["x", "y"], seed=3, max_shard_size="30KB"
    )
    other = make_sparse_agents(base_single, tmp_path / "four", ["x", "y"], seed=4)
    assert (resharded["x"] / "model.safetensors.index.json").is_file()
    for name in ("x", "y"):
        ref = load_weights(first[name])
        for candidate in (again[name], resharded[name]):
            got = load_weights(candidate)
            assert all(torch.equal(ref[k], got[k]) for k in ref)
        assert not all(torch.equal(ref[k], v) for k, v in load_weights(other[name]).items())


@pytest.mark.parametrize(("overlap", "expect"), [(0.0, "no shared"), (1.0, "no unique")])
def test_overlap_extremes(tiny_base_factory, tiny_agents_factory, overlap, expect) -> None:
    base_path = tiny_base_factory()
    agents = tiny_agents_factory(base_path, ["x", "y"], overlap=overlap)
    report = json.loads((agents["x"].parent / "agents.json").read_text())["agents"]
    key = "shared" if expect == "no shared" else "unique"
    assert all(entry[key] == 0 for entry in report.values())
    assert all(entry["changed"] > 0 for entry in report.values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"density": 0.6, "overlap": 0.0},  # 1.2 of every tensor would be needed
        {"density": 1.5},
        {"density": {"x": 0.1}},  # y missing
        {"overlap": -0.1},
    ],
)
def test_invalid_agent_parameters_are_rejected(tiny_base_factory, tmp_path, kwargs) -> None:
    with pytest.raises(ValueError):
        make_sparse_agents(tiny_base_factory(), tmp_path, ["x", "y"], **kwargs)


# --- properties of the position sampler ------------------------------------------------------


@given(
    numel=st.integers(1, 5000),
    densities=st.lists(st.floats(0.0, 0.3), min_size=1, max_size=4),
    overlap=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_position_sampler_properties(numel, densities, overlap, seed) -> None:
    assume(max(overlap * d for d in densities) + sum((1 - overlap) * d for d in densities) <= 1)
    chosen = testing._choose_positions(
        numel, densities, overlap, torch.Generator().manual_seed(seed)
    )
    slack = len(densities) + 2  # stochastic rounding, and clipping on tiny tensors
    counts = torch.bincount(torch.cat(chosen), minlength=numel)
    shared_positions = int((counts >= 2).sum())
    assert shared_positions <= max(overlap * d * numel for d in densities) + 1, "only the pool"
    if overlap == 0:
        assert shared_positions == 0
    for positions, d in zip(chosen, densities, strict=True):
        assert positions.unique().numel() == positions.numel(), "each position at most once"
        assert positions.numel() == 0 or 0 <= int(positions.min()) <= int(positions.max()) < numel
        assert abs(positions.numel() - d * numel) <= slack
        unique = int((counts[positions] == 1).sum())
        assert unique >= (1 - overlap) * d * numel - slack, "private parts are never shared"
