"""RAMCallback inside real TRL / transformers training of a tiny model on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from ram_trl.callback import EvalTask, RAMCallback, RAMConfig, attach  # noqa: E402
from ram_trl.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["1+1=", "2*3=", "say hi:", "abc"]


def digits(prompts, completions, **kwargs):
    return [sum(c.isdigit() for c in t) / 8 for t in completions]


def letters(prompts, completions, **kwargs):
    return [sum(c.isalpha() for c in t) / 8 for t in completions]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from ram_trl.testing import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("base") / "base")


def grpo(base: Path, out: Path, reward, *, steps: int = 4, peft_config=None, model=None, **kw):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    kw = {"learning_rate": 1e-2, "max_completion_length": 8, **kw}
    args = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        max_steps=steps,
        save_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        report_to=[],
        logging_steps=1,
        gradient_checkpointing=False,
        seed=0,
        **kw,
    )
    return GRPOTrainer(
        model=model or AutoModelForCausalLM.from_pretrained(base),
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=AutoTokenizer.from_pretrained(base),
        peft_config=peft_config,
    )


def files_equal(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    sa = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    sb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def logged(trainer, prefix: str) -> list[dict]:
    return [h for h in trainer.state.log_history if any(k.startswith(prefix) for k in h)]


def test_two_agents_merge_matches_offline_merge(base, tmp_path):
    from ram_trl import merge
    from ram_trl.snapshot import SnapshotStore, TaskVectorSource

    store = tmp_path / "store"
    task = EvalTask("digits", PROMPTS[:2], [digits])
    for agent, reward in (("digits", digits), ("letters", letters)):
        trainer = grpo(base, tmp_path / agent, reward)
        attach(
            trainer,
            store=store,
            agent=agent,
            merge_params={"r": 0.1, "alpha": 2.0},
            eval_tasks=[task],
            eval_base=True,
            eval_max_new_tokens=8,
        )
        trainer.train()
    s = SnapshotStore(store)
    assert s.agents() == ["digits", "letters"] and s.steps("letters") == [2, 4]
    # one entry per state of the store, named by a store-wide number; train end reused the last
    entries = s.merged.entries()
    assert [(e.name, e.steps) for e in entries] == [
        ("merge-000001", {"digits": 4, "letters": 2}),
        ("merge-000002", {"digits": 4, "letters": 4}),
    ]
    assert os.readlink(store / "merged" / "latest") == "merge-000002"
    sources = {a: TaskVectorSource(s.get(a, 4).path, store / "base") for a in ("digits", "letters")}
    merge(
        store / "base",
        sources,
        "ram_plus",
        tmp_path / "offline",
        params={"r": 0.1, "alpha": 2.0},
        progress=False,
    )
    files_equal(store / "merged" / "latest", tmp_path / "offline")
    assert (store / "merged" / "latest" / "README.md").is_file()  # model card
    last = logged(trainer, "eval_merged/")[-1]
    for key in (
        "ram/changed_fraction",
        "ram/snapshot_mb",
        "ram/snapshot_seconds",
        "ram/merge_seconds",
        "ram/unique_share",
        "ram/rho/digits",
        "ram/lambda/letters",
        "ram/merge_lag_steps",
        "eval_merged/digits/reward",
        "eval_agent/digits/reward",
        "eval_base/digits/reward",
    ):
        assert key in last, key
    assert last["step"] == 4
    # the first agent had no partner yet: snapshots only
    assert not any("ram/merge_seconds" in h for h in logged(trainer, "ram/") if h["step"] < 2)


def test_lora_snapshot_matches_merge_and_unload(base, tmp_path):
    from peft import LoraConfig

    from ram_trl.io import ModelFolder
    from ram_trl.snapshot import SnapshotStore

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = grpo(base, tmp_path / "run", digits, steps=2, peft_config=lora, learning_rate=5e-2)
    attach(trainer, store=tmp_path / "store", agent="lora", base=str(base))
    trainer.train()
    assert not (tmp_path / "store" / "base").exists()  # theta_0 streamed from the given base
    tv = SnapshotStore(tmp_path / "store").get("lora", 2).load()
    rebuilt = tv.apply(base)
    merged = trainer.model.merge_and_unload().state_dict()
    with ModelFolder(base) as b:
        changed = 0
        for name in b.tensors:
            diff = (rebuilt[name].float() - merged[name].float()).abs().max()
            assert diff <= 1e-5, name  # sub-epsilon changes are dropped by design
            changed += int(not torch.equal(b.read(name), rebuilt[name]))
    assert changed == 2 * 2  # q_proj and v_proj of both layers
    assert "ram/lora_changed_fraction" in logged(trainer, "ram/")[-1]


def test_resume_keeps_theta0(base, tmp_path):
    from ram_trl.snapshot import SnapshotStore

    store = tmp_path / "store"
    first = grpo(base, tmp_path / "run", digits, steps=4)
    attach(first, store=store, agent="a")
    first.train()
    fp = SnapshotStore(store).base_fingerprint
    resumed = grpo(base, tmp_path / "run", digits, steps=6)  # built from the base, as usual
    attach(resumed, store=store, agent="a")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    s = SnapshotStore(store)
    assert s.base_fingerprint == fp and s.steps("a") == [2, 4, 6]
    weights = s.get("a", 6).load().apply(store / "base")  # against theta_0, not checkpoint-4
    live = resumed.model.state_dict()
    for name, t in weights.items():
        assert (t - live[name]).abs().max() <= 1e-5, name


def test_background_merge_with_lora_output(base, tmp_path):
    import json

    store = tmp_path / "store"
    for agent, reward in (("a", digits), ("b", letters)):
        trainer = grpo(base, tmp_path / agent, reward, steps=2)
        attach(
            trainer,
            store=store,
            agent=agent,
            merge_background=True,
            merge_output="lora",
            lora_rank=4,
            eval_tasks=[EvalTask("t", PROMPTS[:2], digits)],
            eval_max_new_tokens=4,
        )
        trainer.train()
    out = store / "merged" / "latest"
    assert (out / "adapter_config.json").is_file()
    report = json.loads((out / "ram_trl_merge.json").read_text())
    assert 0 <= report["lora"]["error"] < 1
    last = logged(trainer, "eval_merged/")[-1]
    assert "ram/lora_error" in last and "ram/merge_wait_seconds" in last


def test_background_merges_coalesce_and_the_last_snapshots_are_merged(base, tmp_path):
    """A merge in a subprocess takes seconds, a training step a fraction of one: the snapshots
    taken meanwhile are coalesced into the next merge (not dropped), and train end merges every
    agent's last snapshot, equal to ``ram-trl merge --store`` of them."""
    from ram_trl.cli import main
    from ram_trl.snapshot import SnapshotStore

    store = tmp_path / "store"
    first = grpo(base, tmp_path / "a", digits, steps=4)
    attach(first, store=store, agent="a")
    first.train()
    trainer = grpo(base, tmp_path / "b", letters, steps=8)
    attach(trainer, store=store, agent="b", merge_background=True)
    trainer.train()
    s = SnapshotStore(store)
    assert s.steps("b") == [2, 4, 6, 8]
    assert s.merged.latest().steps == {"a": 4, "b": 8}  # the final generalist is not stale
    entries = s.merged.entries()
    assert len(entries) < 4  # four saves, fewer merges: they coalesced
    assert [e.steps["b"] for e in entries] == sorted({e.steps["b"] for e in entries})
    offline = tmp_path / "offline"
    assert main(["merge", "--store", str(store), "--out", str(offline), "-q"]) == 0
    files_equal(store / "merged" / "latest", offline)
    lags = [h["ram/merge_lag_steps"] for h in logged(trainer, "ram/merge_lag_steps")]
    assert lags[-1] == 0 and min(lags) >= 0  # how stale each merge was when it landed
    assert not [p for p in (store / "merged").iterdir() if p.name.startswith(".")]


SEEN: list[dict] = []


def recording(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **kw):
    """A reward function that takes GRPO's keyword arguments by name and logs through them."""
    SEEN.append({"state": trainer_state, "lengths": [len(ids) for ids in completion_ids]})
    log_metric("mean_length", sum(map(len, completion_ids)) / len(completion_ids))
    log_extra("length", [len(ids) for ids in completion_ids])
    return digits(prompts, completions)


def test_evaluation_follows_the_trainer(base, tmp_path):
    """Own cadence (every step, merged or not), the trainer's max_completion_length and
    reward_weights, TRL's reward keyword arguments, and the base scored once per store."""
    import json

    store = tmp_path / "store"
    task = EvalTask("t", PROMPTS, [recording, letters])
    first = grpo(base, tmp_path / "a", digits, steps=2)
    attach(first, store=store, agent="a")
    first.train()
    trainer = grpo(
        base,
        tmp_path / "b",
        [recording, letters],
        steps=4,
        max_completion_length=3,
        reward_weights=[2.0, 0.5],
    )
    attach(
        trainer,
        store=store,
        agent="b",
        eval_tasks=[task],
        eval_every_steps=1,
        eval_base=True,
        eval_log_completions=True,
    )
    SEEN.clear()
    trainer.train()
    evals = logged(trainer, "eval_agent/")
    # every step, not only at merges; at train end, the final generalist (merged at step 4's save)
    assert [h["step"] for h in evals] == [1, 2, 3, 4, 4]
    assert "eval_merged/t/reward" not in evals[0]  # nothing merged yet at step 1
    last = evals[-1]
    assert last["ram/eval_merge_sequence"] == 2  # the newest merged model, {a: 2, b: 4}
    for prefix in ("eval_merged", "eval_agent", "eval_base"):
        r = {k.rsplit("/", 1)[1]: v for k, v in last.items() if k.startswith(f"{prefix}/t/")}
        assert r["reward"] == pytest.approx(2.0 * r["recording"] + 0.5 * r["letters"])
        assert 0 <= r["mean_length"] <= 3  # logged by the reward function through log_metric
    assert all(max(s["lengths"]) <= 3 for s in SEEN)  # GRPO's length, not 64
    assert all(s["state"] is trainer.state for s in SEEN[1:])  # [0]: the construction check
    rows = [json.loads(line) for line in (store / "eval" / "completions-b.jsonl").open()]
    assert len(rows) == 3 * len(PROMPTS)  # merged at step 2's save: steps 3, 4 and train end
    assert rows[-1].keys() == {
        "step",
        "merged",
        "task",
        "prompt",
        "completion",
        "recording",
        "letters",
        "length",
    }
    assert rows[-1]["merged"] == "merge-000002" and rows[-1]["length"] <= 3  # log_extra's column
    (cache,) = (store / "eval").glob("base-*.json")
    assert json.loads(cache.read_text()) == {k: v for k, v in last.items() if "eval_base" in k}
    cache.write_text(json.dumps({"eval_base/t/reward": 123.0}))  # a later job reads the cache
    again = grpo(
        base,
        tmp_path / "c",
        [recording, letters],
        steps=1,
        max_completion_length=3,
        reward_weights=[2.0, 0.5],
    )
    attach(again, store=store, agent="c", eval_tasks=[task], eval_every_steps=1, eval_base=True)
    again.train()
    assert logged(again, "eval_base/")[-1]["eval_base/t/reward"] == 123.0


def test_a_broken_reward_function_fails_at_construction(base, tmp_path):
    def boom(prompts, completions, **kwargs):
        raise KeyError("answer")

    def short(prompts, completions, **kwargs):
        return []

    def no_kwargs(prompts, completions):
        return [0.0] * len(completions)

    trainer = grpo(base, tmp_path / "run", digits)
    for func, message in (
        (boom, r"eval task 't': reward function 'boom' failed on the task's first prompt: KeyErr"),
        (short, "reward function 'short' returned 0 rewards for 1 completion"),
        (no_kwargs, "reward function 'no_kwargs' does not take GRPOTrainer's keyword arguments"),
    ):
        with pytest.raises(InputError, match=message):
            attach(
                trainer, store=tmp_path / "s", agent="a", eval_tasks=[EvalTask("t", PROMPTS, func)]
            )


def test_plain_trainer_and_rloo(base, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from trl import RLOOConfig, RLOOTrainer

    from ram_trl.snapshot import SnapshotStore

    tok = AutoTokenizer.from_pretrained(base)
    enc = tok(["1+1=2", "2*3=6"] * 4)
    data = Dataset.from_dict({**enc, "labels": enc["input_ids"]})
    args = TrainingArguments(
        str(tmp_path / "sft"),
        use_cpu=True,
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=1,
        report_to=[],
        learning_rate=1e-2,
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=args,
        train_dataset=data,
        processing_class=tok,
    )
    attach(trainer, store=tmp_path / "store", agent="sft", base=str(base))
    trainer.train()
    rloo = RLOOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        reward_funcs=letters,
        args=RLOOConfig(
            output_dir=str(tmp_path / "rloo"),
            use_cpu=True,
            bf16=False,
            max_steps=2,
            save_steps=2,
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=8,
            learning_rate=1e-2,
            report_to=[],
            gradient_checkpointing=False,
        ),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        processing_class=tok,
    )
    attach(rloo, store=tmp_path / "store", agent="rloo", base=str(base))
    rloo.train()
    (entry,) = SnapshotStore(tmp_path / "store").merged.entries()
    assert entry.steps == {"rloo": 2, "sft": 2}
    assert "ram/rho/sft" in logged(rloo, "ram/")[-1]


def test_bad_configuration_fails_at_construction(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ram_trl.testing import save_tiny_base

    with pytest.raises(InputError, match="unknown merge method"):
        RAMConfig(store=str(tmp_path), agent="a", merge_method="nope")
    with pytest.raises(InputError, match="takes no parameter"):
        RAMConfig(store=str(tmp_path), agent="a", merge_params={"bogus": 1})
    with pytest.raises(InputError, match="not allowed"):
        RAMConfig(store=str(tmp_path), agent="../x")
    trainer = grpo(base, tmp_path / "run", digits)
    with pytest.raises(InputError, match="needs its trainer"):  # GRPOTrainer(callbacks=[...])
        RAMCallback(RAMConfig(store=str(tmp_path), agent="a"))
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="cannot use"):
        attach(trainer, store=tmp_path / "file" / "store", agent="a")
    store = tmp_path / "store"
    attach(trainer, store=store, agent="a").on_train_begin(trainer.args, trainer.state, None)
    other = save_tiny_base(tmp_path / "other", seed=1)
    stranger = grpo(other, tmp_path / "run2", digits)
    with pytest.raises(InputError, match="base fingerprint"):
        attach(stranger, store=store, agent="a")
    with pytest.raises(InputError, match="fingerprint"):
        attach(stranger, store=store, agent="b", base=str(other))
    dora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
    )
    with pytest.raises(InputError, match="(?i)dora"):
        attach(grpo(base, tmp_path / "run3", digits, model=dora), store=tmp_path / "s3", agent="d")


def test_config_from_yaml(tmp_path):
    """A RAMConfig from YAML (the flat agent recipes: tests/test_recipes.py); typos are refused."""
    good = tmp_path / "ram.yaml"
    good.write_text(
        "store: s\nagent: a\nmerge_params: {r: 0.2}\n"
        "eval_tasks: [{name: t, prompts: ['1+1='], reward_funcs: ['test_callback:digits']}]\n"
    )
    config = RAMConfig.from_yaml(good)
    assert config.merge_method == "ram_plus" and config.merge_params == {"r": 0.2}
    assert config.eval_tasks[0].reward_funcs == [digits]
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: s\nagent: a\nmerge_evry: 2\n")
    with pytest.raises(InputError, match="unknown field"):
        RAMConfig.from_yaml(bad)


def launch_agent(agent: str, tmp_path: Path, *extra: str, launcher: tuple[str, ...] = ()):
    """examples/train_agent.py for one of recipes/grpo/, into ``tmp_path/store``, 8 steps."""
    return subprocess.Popen(
        [
            sys.executable,
            *launcher,
            "examples/train_agent.py",
            "--config",
            f"recipes/grpo/{agent}.yaml",
            "--store",
            str(tmp_path / "store"),
            "--tiny_base_dir",
            str(tmp_path / "base"),
            "--output_dir",
            str(tmp_path / agent),
            "--max_steps",
            "8",
            *extra,
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT / "examples"),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_two_concurrent_training_processes(tmp_path):
    """Two agents' jobs at once into one store (examples/train_agent.py, each launched with the
    one-GPU accelerate recipe, on CPU here; one trains LoRA): both race to write the tiny base,
    both publish, merges are valid, no store state is merged twice, and the last one holds both
    agents' final snapshots."""
    from ram_trl.snapshot import SnapshotStore, validate

    base = tmp_path / "base"  # neither job finds it: both write it, one publishes
    lora = {"digits": [], "letters": ["--use_peft", "--lora_r", "4"]}
    accelerate = (
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "recipes/accelerate/single_gpu.yaml",
    )
    procs = [
        launch_agent(agent, tmp_path, *lora[agent], launcher=accelerate)
        for agent in ("digits", "letters")
    ]
    started = time.time()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "digits", "letters", "store"]
    assert (base / "model.safetensors").is_file()  # the loser's temporary folder is gone
    store = SnapshotStore(tmp_path / "store")
    assert store.agents() == ["digits", "letters"]
    assert all(i.valid for i in store.list())
    lora_touched = {n for n, e in validate(store.path("letters", 8)).tensors.items() if e.nnz}
    assert lora_touched and all("q_proj" in n or "v_proj" in n for n in lora_touched)  # PEFT's
    entries = store.merged.entries()  # one merge per state of the store, whoever made it
    assert entries and all((e.path / "config.json").is_file() for e in entries)
    assert len({e.key for e in entries}) == len(entries)
    assert store.merged.latest().steps == {"digits": 8, "letters": 8}
    print(f"two concurrent jobs: {time.time() - started:.1f} s")


@pytest.mark.slow
def test_watch_merges_while_two_jobs_only_snapshot(tmp_path):
    """``ram-trl watch`` beside two concurrent jobs with ``merge: watcher``: the jobs never merge,
    the watcher merges the snapshots of both as they land (and scores each merged model), and
    its last merge holds both agents' final snapshots."""
    import json
    import signal

    from ram_trl.snapshot import SnapshotStore

    store = tmp_path / "store"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "examples"),
    }
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        "eval_tasks: [{name: arithmetic, prompts: ['1+1='], reward_funcs: [toy_rewards:digits]}]\n"
        "eval_max_new_tokens: 4\neval_base: true\n"
    )
    SnapshotStore(store)  # the watcher starts first, on an empty store
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ram_trl",
            "watch",
            str(store),
            "--interval",
            "0.2",
            "--eval",
            str(recipe),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watching = ("--save_steps", "2", "--merge", "watcher", "--eval_tasks", "[]")
    jobs = [launch_agent(agent, tmp_path, *watching) for agent in ("digits", "letters")]
    try:
        for job in jobs:
            out = job.communicate(timeout=300)[0]
            assert job.returncode == 0, out[-3000:]
        s, deadline = SnapshotStore(store), time.monotonic() + 120
        while time.monotonic() < deadline:
            latest = s.merged.latest()
            if latest is not None and latest.steps == {"digits": 8, "letters": 8}:
                break
            time.sleep(0.5)
    finally:
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err[-3000:]
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    entries = s.merged.entries()
    assert [line["entry"] for line in lines] == [e.name for e in entries]
    assert all(line["made"] for line in lines)  # made by the watcher: the jobs only snapshot
    assert entries[-1].steps == {"digits": 8, "letters": 8}
    assert len({e.key for e in entries}) == len(entries) >= 2  # it followed both jobs
    assert all("eval_merged/arithmetic/reward" in line["scores"] for line in lines)
    assert (store / "eval" / f"{entries[-1].name}.json").is_file()


def test_configs_parse_side_by_side_like_trl_scripts(tmp_path):
    """TRL scripts parse GRPOConfig and their own configs with one HfArgumentParser: no RAMConfig
    field may clash with a GRPOConfig one (``epsilon`` did)."""
    from transformers import HfArgumentParser
    from trl import GRPOConfig

    parser = HfArgumentParser((GRPOConfig, RAMConfig))
    args = [
        "--output_dir",
        str(tmp_path),
        "--use_cpu",
        "--store",
        str(tmp_path / "s"),
        "--agent",
        "a",
    ]
    grpo, ram = parser.parse_args_into_dataclasses([*args, "--snapshot_epsilon", "1e-6"])
    assert ram.agent == "a" and ram.snapshot_epsilon == 1e-6 and grpo.output_dir == str(tmp_path)
    # dict and list fields come from a command line as JSON, as TrainingArguments' dict fields do
    task = '[{"name": "t", "prompts": ["1+1="], "reward_funcs": ["test_callback:digits"]}]'
    json_args = ["--merge_params", '{"r": 0.3}', "--eval_tasks", task]
    _, ram = parser.parse_args_into_dataclasses([*args, *json_args])
    assert ram.merge_params == {"r": 0.3} and ram.eval_tasks[0].reward_funcs == [digits]
    with pytest.raises(InputError, match="merge_params: not valid JSON"):
        parser.parse_args_into_dataclasses([*args, "--merge_params", "{r: 0.3}"])
    with pytest.raises(InputError, match="eval_tasks must be a list"):
        parser.parse_args_into_dataclasses([*args, "--eval_tasks", '{"name": "t"}'])
    with pytest.raises(InputError, match="takes no parameter 'rr'"):
        parser.parse_args_into_dataclasses([*args, "--merge_params", '{"rr": 0.3}'])


def test_top_level_api_is_lazy():
    code = (
        "import sys, ram_trl; assert 'transformers' not in sys.modules; "
        "from ram_trl import RAMCallback, RAMConfig, attach, EvalTask, evaluate; "
        "assert RAMCallback.__name__ == 'RAMCallback'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
