"""Every recipe a user copies parses as its tool parses it: ``recipes/accelerate/*.yaml`` as
``accelerate launch`` reads a config file, ``recipes/grpo/*.yaml`` as ``examples/train_agent.py``
reads them (``trl.TrlParser``). The launches themselves are in tests/test_distributed.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
AGENTS = sorted((ROOT / "recipes" / "grpo").glob("*.yaml"))
sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture(scope="module")
def launch_options() -> dict[str, tuple | None]:
    """``accelerate launch``'s options: name -> its choices (None: any value)."""
    from accelerate.commands.launch import launch_command_parser

    return {a.dest: a.choices for a in launch_command_parser()._actions}


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_recipe_loads(path, launch_options):
    """It loads as accelerate's ClusterConfig (which refuses unknown top-level keys), and every
    nested DeepSpeed / FSDP key is a real ``accelerate launch`` option with a valid value (the
    launcher copies nested keys onto its options unchecked, so a typo would be ignored)."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.num_processes >= 1 and config.num_machines == 1 and config.machine_rank == 0
    nested = {**config.deepspeed_config, **config.fsdp_config}
    for key, value in nested.items():
        assert key in launch_options, f"{path.name}: {key} is not an accelerate launch option"
        choices = launch_options[key]
        assert choices is None or str(value) in choices, (path.name, key, value, choices)
    if config.distributed_type.value != "NO":
        assert config.main_process_port, path.name  # documented, and overridable per launch


def test_cpu_recipe_starts_two_processes():
    """``--cpu`` / ``use_cpu: true`` would run ONE process: the CPU recipe launches MULTI_GPU
    processes and leaves the device to the training arguments (the launch test runs it)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"))
    assert (config.distributed_type.value, config.num_processes) == ("MULTI_GPU", 2)
    assert not config.use_cpu


def test_zero3_recipe_gathers_and_partitions():
    """ZeRO-3: the 16-bit gather RAMCallback needs, a partitioning threshold that DeepSpeed's
    default (1e5 elements) does not leave to chance, and no top-level mixed_precision, which
    accelerate refuses next to a deepspeed_config_file (every rank fails at start-up)."""
    import yaml

    path = ROOT / "recipes" / "accelerate" / "deepspeed_zero3.yaml"
    raw = yaml.safe_load(path.read_text())
    assert "mixed_precision" not in raw
    ds = json.loads((ROOT / raw["deepspeed_config"]["deepspeed_config_file"]).read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "stage3_param_persistence_threshold" in zero


def _parse(*argv: str):
    import train_agent

    return train_agent.parse(list(argv))


def test_agent_recipes_parse_through_trl_parser():
    """Each agent recipe: its own agent, reward and output folder; one store and one tiny base
    for all, so that their jobs merge together; the same evaluation tasks for all."""
    import toy_rewards

    parsed = {path.stem: _parse("--config", str(path)) for path in AGENTS}
    assert sorted(parsed) == ["digits", "letters", "symbols"]
    for name, (script, training, model, ram) in parsed.items():
        assert ram.agent == name and script.reward_funcs == [getattr(toy_rewards, name)]
        assert training.output_dir.endswith(f"agents/{name}") and training.use_cpu
        assert model.model_name_or_path is None and ram.merge_method == "ram_plus"
        assert ram.eval_tasks[0].reward_funcs == [toy_rewards.digits]
    assert len({p[1].output_dir for p in parsed.values()}) == len(parsed)
    for pick in (lambda p: p[0].tiny_base_dir, lambda p: p[3].store,
                 lambda p: [(t.name, t.prompts) for t in p[3].eval_tasks]):  # fmt: skip
        assert len({repr(pick(p)) for p in parsed.values()}) == 1


def test_command_line_overrides_the_recipe():
    script, training, model, ram = _parse(
        "--config", str(AGENTS[0]), "--max_steps", "3", "--store", "elsewhere",
        "--overwrite", "--merge_params", '{"r": 0.3}', "--model_name_or_path", "some/model",
        "--reward_funcs", "toy_rewards:letters", "toy_rewards:symbols",
    )  # fmt: skip
    assert (training.max_steps, ram.store, ram.overwrite) == (3, "elsewhere", True)
    assert ram.merge_params == {"r": 0.3} and model.model_name_or_path == "some/model"
    assert [f.__name__ for f in script.reward_funcs] == ["letters", "symbols"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--merge_params", "{r: 1}"], "merge_params: not valid JSON"),
        (["--reward_funcs", "toy_rewards.digits"], "must be an import path 'module:function'"),
        (["--reward_funcs", "toy_rewards:nope"], "cannot import reward function"),
        (["--agent", "../up"], "agent name '../up' is not allowed"),
        (["--merge_method", "average"], "unknown merge method 'average'"),
        (["--load_in_4bit"], "unquantized"),
    ],
)
def test_mistakes_exit_with_one_line(extra, message):
    with pytest.raises(SystemExit) as exit_:
        _parse("--config", str(AGENTS[0]), *extra)
    assert message in str(exit_.value) and "\n" not in str(exit_.value)


def test_unknown_recipe_key_exits_with_one_line(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(AGENTS[0].read_text() + "merge_evry: 2\n")
    with pytest.raises(SystemExit, match="merge_evry"):
        _parse("--config", str(recipe))


def test_dataset_name_loads_like_trl_scripts(tmp_path):
    """``dataset_name`` goes to ``datasets.load_dataset`` (here a local folder of JSON lines);
    the test split is loaded only with an eval strategy. Without it: the offline prompts."""
    import train_agent

    for split, prompts in (("train", ["a", "b", "c"]), ("test", ["d"])):
        lines = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
        (tmp_path / f"{split}.jsonl").write_text(lines)
    script, training, _, _ = _parse("--config", str(AGENTS[0]), "--dataset_name", str(tmp_path))
    train, evaluation = train_agent.load_prompts(script, training)
    assert train["prompt"] == ["a", "b", "c"] and evaluation is None
    script, training, _, _ = _parse(
        "--config", str(AGENTS[0]), "--dataset_name", str(tmp_path), "--eval_strategy", "steps"
    )
    assert train_agent.load_prompts(script, training)[1]["prompt"] == ["d"]
    script, training, _, _ = _parse("--config", str(AGENTS[0]))
    offline, _ = train_agent.load_prompts(script, training)
    assert set(offline["prompt"]) == set(train_agent.OFFLINE_PROMPTS)
