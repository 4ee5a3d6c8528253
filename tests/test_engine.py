"""The streaming engine end to end: equal to an in-memory reference on real tiny models, loadable
output with its metadata, atomic writes, and clear errors for every kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ram_trl
from ram_trl.cli import main
from ram_trl.errors import InputError
from ram_trl.merging import chunks as inputs_module
from ram_trl.methods import ChunkContext, change_mask, get_method, overlap_histogram
from ram_trl.methods.breadcrumbs import band
from ram_trl.methods.magnitude import trim_count


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def reference_merge(base_dir: Path, agent_dirs: dict[str, Path], method: str, params: dict):
    """The whole model in memory, whole tensors at once; TIES thresholds by torch.kthvalue."""
    spec = get_method(method)
    p = spec.make_params(params)
    base = load_all(base_dir)
    agents = [load_all(agent_dirs[name]) for name in agent_dirs]
    deltas = {
        name: torch.stack([a[name].float().reshape(-1) - t.float().reshape(-1) for a in agents])
        for name, t in base.items()
    }
    hists = {
        n: overlap_histogram(change_mask(d, getattr(p, "epsilon", 1e-5))) for n, d in deltas.items()
    }
    whole = sum(hists.values())
    merged = {}
    for name, d in deltas.items():
        scales = None
        if spec.scales is not None:
            scope = getattr(p, "rho_scope", "global")
            scales = spec.scales(hists[name] if scope == "tensor" else whole, p).float()
        thresholds = ceilings = None
        if spec.name == "ties":
            k = trim_count(d.shape[1], p.keep)
            thresholds = d.abs().kthvalue(d.shape[1] - k + 1, dim=1).values
        if spec.name == "breadcrumbs":
            top, kept = band(d.shape[1], p.density, p.gamma)
            ordered = d.abs().sort(dim=1, descending=True).values
            thresholds = ordered[:, top + kept - 1]
            ceilings = ordered[:, top] if top else torch.full((d.shape[0],), torch.inf)
        delta = spec.rule(d, p, ChunkContext(scales, thresholds, ceilings=ceilings))
        b = base[name].float().reshape(-1)
        merged[name] = torch.where(delta != 0, b + delta, b).to(base[name].dtype)
        merged[name] = merged[name].reshape(base[name].shape)
    return merged


CASES = [
    ("qwen2", False, torch.float32, True),
    ("qwen2", True, torch.bfloat16, True),
    ("llama", False, torch.bfloat16, False),
    ("llama", True, torch.float32, False),
]
METHODS = [
    ("ram", {}),
    ("ram_plus", {}),
    ("ram_plus", {"rho_scope": "tensor", "alpha": 0.2}),
    ("ram_plus_s", {"r": 0.2}),
    ("ties", {"keep": 0.3}),
    ("task_arithmetic", {"scale": 0.5}),
    ("linear", {}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
]


@pytest.mark.parametrize(
    ("chunk", "sparse_limit"),
    [(None, 1.0), (1000, 1.0), (1000, 0.0)],
    ids=["whole-sparse", "chunked-sparse", "chunked-dense"],
)
@pytest.mark.parametrize(("arch", "tie", "dtype", "sharded"), CASES)
def test_streaming_equals_in_memory_reference(
    arch,
    tie,
    dtype,
    sharded,
    chunk,
    sparse_limit,
    tiny_base_factory,
    tiny_agents_factory,
    tmp_path,
    monkeypatch,
):
    """Whole tensors or row chunks, only the elements that differ from the base (sparse) or
    all of them (dense): the same bits as the in-memory reference."""
    monkeypatch.setattr(inputs_module, "SPARSE_LIMIT", sparse_limit)
    if chunk:
        monkeypatch.setattr(inputs_module, "CHUNK_ELEMENTS", chunk)
    base = tiny_base_factory(arch, tie, dtype, sharded)
    agents = tiny_agents_factory(base, ("code", "tool", "memory"), density=[0.05, 0.2, 0.3])
    for method, params in METHODS:
        out = tmp_path / f"{method}-{len(params)}"
        ram_trl.merge(base, agents, method, out, params=params, progress=False)
        got = load_all(out)
        want = reference_merge(base, agents, method, params)
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype, name
            assert torch.equal(got[name], want[name]), f"{method} {params}: {name}"


def test_unchanged_elements_are_bit_identical_to_base(
    tiny_base_factory, tiny_agents_factory, tmp_path
):
    base = tiny_base_factory("qwen2", False, torch.bfloat16, False)
    agents = tiny_agents_factory(base, ("a", "b"), density=0.1)
    ram_trl.merge(base, agents, "ram_plus", tmp_path / "out", progress=False)
    merged, original = load_all(tmp_path / "out"), load_all(base)
    tuned = [load_all(p) for p in agents.values()]
    for name, b in original.items():
        untouched = ~torch.stack(
            [change_mask(t[name].float() - b.float(), 1e-5) for t in tuned]
        ).any(0)
        same = merged[name][untouched].view(torch.int16) == b[untouched].view(torch.int16)
        assert same.all(), name


def test_output_is_a_loadable_model_with_metadata(tiny_base_factory, tiny_agents_factory, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_base_factory("qwen2", False, torch.float32, True)
    agents = tiny_agents_factory(base, ("code", "tool"), density=[0.05, 0.3])
    out = tmp_path / "merged"
    report = ram_trl.merge(
        base, agents, "ram_plus", out, shard_size="30KB", dtype="bfloat16", progress=False
    )
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files
    assert any(f.startswith("model-00001-of-") for f in files)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert name in files
    record = json.loads((out / "ram_trl_merge.json").read_text())
    assert record["method"] == "ram_plus" and record["params"]["r"] == 0.1
    assert [a["name"] for a in record["agents"]] == ["code", "tool"]
    assert [a["lambda"] for a in record["agents"]] == [a.lambda_ for a in report.agents]
    card = (out / "README.md").read_text()
    assert "ram-trl merge" in card and "lambda" in card and "code" in card
    assert all(v.dtype == torch.bfloat16 for v in load_all(out).values())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("1+1=", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4
    assert not list(tmp_path.glob(".*"))  # no temporary siblings left behind


def test_report_counts_match_probe_and_lambda_formula(tiny_base_factory, tiny_agents_factory):
    base = tiny_base_factory("qwen2", False, torch.float32, False)
    agents = tiny_agents_factory(base, ("a", "b", "c"), density=[0.05, 0.2, 0.3])
    report = ram_trl.merge(base, agents, "ram_plus", dry_run=True, progress=False)
    probed = ram_trl.probe(base, agents, progress=False)
    for merged_stats, probe_stats in zip(report.agents, probed.agents, strict=True):
        assert merged_stats == probe_stats
        assert merged_stats.changed == merged_stats.unique + merged_stats.shared > 0
        rho = merged_stats.shared / merged_stats.unique
        assert merged_stats.rho == pytest.approx(rho)
        assert merged_stats.lam == pytest.approx(1 + 0.1 * min(rho, 2.0))
    kinds = probed.by_kind
    assert {"embeddings", "attention", "mlp", "norms", "lm_head"} <= set(kinds)
    assert sum(k.elements for k in kinds.values()) == report.total_elements
    assert sum(sum(k.changed) for k in kinds.values()) == sum(a.changed for a in report.agents)
    assert {"0", "1"} <= set(probed.by_layer)


def test_dare_is_reproducible_and_seeded(tiny_base_factory, tiny_agents_factory, tmp_path):
    base = tiny_base_factory("qwen2", False, torch.float32, False)
    agents = tiny_agents_factory(base, ("a", "b"), density=0.3)
    runs = []
    for i, seed in enumerate((0, 0, 1)):
        out = tmp_path / str(i)
        ram_trl.merge(
            base, agents, "dare_ties", out, params={"seed": seed, "drop": 0.5}, progress=False
        )
        runs.append(load_all(out))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(runs[0][name], runs[1][name])
    assert not torch.equal(runs[0][name], runs[2][name])
    swapped = {"b": agents["b"], "a": agents["a"]}
    ram_trl.merge(base, swapped, "dare_ties", tmp_path / "s", params={"drop": 0.5}, progress=False)
    assert torch.equal(load_all(tmp_path / "s")[name], runs[0][name])


# --- bad input: one clear error, nothing written ---------------------------------------------


@pytest.fixture
def pair(tiny_base_factory, tiny_agents_factory, tmp_path):
    """A single-file base and an editable copy of one agent."""
    base = tiny_base_factory("qwen2", False, torch.float32, False)
    agent = tiny_agents_factory(base, ("a", "b"), density=0.1)["a"]
    editable = tmp_path / "agent"
    shutil.copytree(agent, editable)
    return base, editable


def edit(folder: Path, change) -> None:
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def expect_error(base, agents, tmp_path, *patterns, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(InputError) as caught:
        ram_trl.merge(base, agents, out=out, progress=False, **kwargs)
    for pattern in patterns:
        assert pattern in str(caught.value), str(caught.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return str(caught.value)


def test_missing_path(pair, tmp_path):
    base, _ = pair
    expect_error(base, {"a": tmp_path / "nowhere"}, tmp_path, "nowhere")


def test_folder_without_safetensors(pair, tmp_path):
    base, _ = pair
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(base, {"a": empty}, tmp_path, "empty")


def test_agent_lacks_a_tensor(pair, tmp_path):
    base, agent = pair
    edit(agent, lambda t: t.pop("model.norm.weight"))
    expect_error(base, {"a": agent}, tmp_path, "lacks", "model.norm.weight", str(agent))


def test_agent_has_an_extra_tensor(pair, tmp_path):
    base, agent = pair
    edit(agent, lambda t: t.update({"extra.weight": torch.zeros(3)}))
    expect_error(base, {"a": agent}, tmp_path, "extra.weight", str(agent))


def test_resized_vocabulary(pair, tmp_path):
    base, agent = pair

    def grow(tensors):
        name = "model.embed_tokens.weight"
        tensors[name] = torch.cat([tensors[name], tensors[name][:3]])

    edit(agent, grow)
    expect_error(base, {"a": agent}, tmp_path, "model.embed_tokens.weight", "vocabulary")


def test_shape_mismatch(pair, tmp_path):
    base, agent = pair
    name = "model.layers.0.mlp.up_proj.weight"
    edit(agent, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    message = expect_error(base, {"a": agent}, tmp_path, name, "shape")
    assert "vocabulary" not in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_agent_values(pair, tmp_path, bad):
    base, agent = pair
    name = "model.layers.1.self_attn.o_proj.weight"

    def poison(tensors):
        tensors[name][0, 0] = bad

    edit(agent, poison)
    expect_error(base, {"a": agent}, tmp_path, "NaN/Inf", name, "'a'", method="ram")


def test_different_architecture(pair, tiny_base_factory, tmp_path):
    base, _ = pair
    llama = tiny_base_factory("llama", False, torch.float32, False)
    expect_error(base, {"a": llama}, tmp_path, "llama", "qwen2")


def test_no_agents(pair, tmp_path):
    expect_error(pair[0], {}, tmp_path, "no agents")


def test_existing_output_needs_overwrite(pair, tmp_path):
    base, agent = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="--overwrite"):
        ram_trl.merge(base, {"a": agent}, out=out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    ram_trl.merge(base, {"a": agent}, out=out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_failed_overwrite_keeps_the_old_output(pair, tmp_path):
    base, agent = pair
    out = tmp_path / "out"
    ram_trl.merge(base, {"a": agent}, out=out, progress=False)
    before = (out / "model.safetensors").read_bytes()
    edit(agent, lambda t: t["lm_head.weight"].fill_(float("nan")))
    with pytest.raises(InputError, match="lm_head.weight"):
        ram_trl.merge(base, {"a": agent}, "ram", out=out, overwrite=True, progress=False)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent", "out"]


def test_unknown_method_and_bad_parameter(pair, tmp_path):
    base, agent = pair
    expect_error(base, {"a": agent}, tmp_path, "unknown merge method", method="magic")
    expect_error(base, {"a": agent}, tmp_path, "alpha", method="ram_plus", params={"alpha": -1})


@pytest.mark.parametrize("name", ["../evil", "a\n", ".", ""])
def test_bad_agent_name(pair, tmp_path, name):
    base, agent = pair
    expect_error(base, {name: agent}, tmp_path, repr(name))


# --- CLI -------------------------------------------------------------------------------------


def test_cli_merge_probe_and_dry_run(tiny_base_factory, tiny_agents_factory, tmp_path, capsys):
    base = tiny_base_factory("llama", False, torch.float32, False)
    agents = tiny_agents_factory(base, ("a", "b"), density=[0.1, 0.2])
    agent_args = [arg for name, path in agents.items() for arg in ("--agent", f"{name}={path}")]
    out = tmp_path / "merged"
    common = ["--base", str(base), *agent_args, "--method", "ram_plus", "--r", "0.2", "-q"]

    assert main(["merge", *common, "--out", str(out), "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out and not out.exists()

    assert main(["merge", *common, "--out", str(out)]) == 0
    assert f"merged into {out}" in capsys.readouterr().out
    record = json.loads((out / "ram_trl_merge.json").read_text())
    assert record["params"]["r"] == 0.2
    assert "--r 0.2" in (out / "README.md").read_text()

    assert main(["merge", *common, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    assert main(["probe", *common, "--out", str(tmp_path / "probe")]) == 0
    table = capsys.readouterr().out
    assert "overlap 0" in table and "mlp" in table
    probe_json = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert probe_json["agents"][0]["name"] == "a"
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 0


def test_cli_recipe_with_overrides(tiny_base_factory, tiny_agents_factory, tmp_path, capsys):
    base = tiny_base_factory("qwen2", False, torch.float32, False)
    agents = tiny_agents_factory(base, ("a", "b"), density=[0.1, 0.2])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"base: {base}\nagents:\n  a: {agents['a']}\n  b: {agents['b']}\n"
        f"method: ties\nparameters: {{keep: 0.5}}\nout: {tmp_path / 'out'}\n"
    )
    assert main(["merge", str(recipe), "--scale", "0.7", "-q"]) == 0
    record = json.loads((tmp_path / "out" / "ram_trl_merge.json").read_text())
    assert record["method"] == "ties" and record["params"] == {"keep": 0.5, "scale": 0.7}

    recipe.write_text("base: x\nagents: {a: y}\nmethd: ram\n")
    assert main(["merge", str(recipe)]) == 2
    assert "methd" in capsys.readouterr().err
    assert main(["merge", "--base", str(base), "--agent", "oops"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert (
        main(
            [
                "merge",
                "--base",
                str(base),
                "--agent",
                f"a={agents['a']}",
                "--keep",
                "0.2",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "keep" in capsys.readouterr().err


def test_non_finite_base_values(pair, tmp_path):
    base, agent = pair
    poisoned = tmp_path / "base"
    shutil.copytree(base, poisoned)
    name = "model.layers.0.mlp.down_proj.weight"

    def poison(tensors):
        tensors[name][1, 2] = float("nan")

    edit(poisoned, poison)
    edit(agent, poison)  # the agent keeps the base's NaN: only the base check can see it
    expect_error(poisoned, {"a": agent}, tmp_path, "the base", "NaN/Inf", name)


def test_agents_in_another_dtype_than_the_base(tiny_base_factory, tiny_agents_factory, tmp_path):
    base = tiny_base_factory("qwen2", False, torch.float32, False)
    agents = tiny_agents_factory(base, ("a", "b"), density=[0.05, 0.1])
    widened = tmp_path / "b64"
    shutil.copytree(agents["b"], widened)
    edit(widened, lambda t: t.update({k: v.double() for k, v in t.items()}))
    mixed = {"a": agents["a"], "b": widened}
    ram_trl.merge(base, mixed, "ram_plus", tmp_path / "mixed", progress=False)
    ram_trl.merge(base, agents, "ram_plus", tmp_path / "same", progress=False)
    got, want = load_all(tmp_path / "mixed"), load_all(tmp_path / "same")
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_cuda_without_a_gpu_is_a_clear_error(pair, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base, agent = pair
    expect_error(base, {"a": agent}, tmp_path, "cuda", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ram", "ram_plus", "ties", "task_arithmetic"])
def test_cuda_merge_equals_cpu_merge(method, tiny_base_factory, tiny_agents_factory, tmp_path):
    base = tiny_base_factory("qwen2", False, torch.bfloat16, True)
    agents = tiny_agents_factory(base, ("a", "b", "c"), density=[0.05, 0.2, 0.3])
    for device in ("cpu", "cuda"):
        ram_trl.merge(base, agents, method, tmp_path / device, device=device, progress=False)
    got, want = load_all(tmp_path / "cuda"), load_all(tmp_path / "cpu")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
