"""Issue 9, "Reliability": one test (or a few) per item of the issue, on tiny models.

Each test drives the real ``ram-trl`` command in a subprocess, or the public API (``ram_trl.merge``,
``ram_trl.MergeConfig``, ``ram_trl.RAMConfig``, ``ram_trl.snapshot``), and states the behaviour it
expects. The contract for a failure is always the same: exit code 2, one line on stderr naming the
path (or key, or tensor) and the cause, no traceback, nothing partial left, no input touched.

Item 6 (temporaries of killed processes) and the full-disk part of item 5 need real SIGKILLs and
a real full disk: they are in ``test_faults.py``, next to the concurrency test of item 8.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import re
import shutil
import struct
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faults_helpers import (
    agent_args,
    assert_clean_error,
    assert_names_any,
    assert_store_unbound,
    copy_model,
    leftovers,
    names_key,
    read_only,
    run_cli,
    snapshot_args,
    strict_reads,
    tree,
    warning_lines,
)
from safetensors.torch import load_file, save_file

import ram_trl
from ram_trl.errors import InputError
from ram_trl.snapshot import SnapshotStore, TaskVector, snapshot_folders

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "model.safetensors"
TENSOR = "model.layers.0.mlp.down_proj.weight"  # (64, 256) float32 in the tiny base


@pytest.fixture(scope="module")
def tiny(tiny_base_factory, tiny_agents_factory) -> tuple[Path, dict[str, Path]]:
    """The cached tiny float32 base and two sparse agents (5% changed, half shared): read-only."""
    base = tiny_base_factory()
    return base, tiny_agents_factory(base, names=("a", "b"))


@pytest.fixture
def work(tmp_path: Path, tiny) -> tuple[Path, dict[str, Path]]:
    """Writable copies of the base and the agents, for tests that must prove nothing changed."""
    base, agents = tiny
    copies = {n: copy_model(p, tmp_path / "agents" / n) for n, p in agents.items()}
    return copy_model(base, tmp_path / "base"), copies


def edited_model(
    src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None], dtype=None
) -> Path:
    """A copy of model folder ``src`` at ``dst`` whose tensors went through ``edit`` (and a cast
    to ``dtype``, recorded in config.json as ``save_pretrained`` does)."""
    # not the source's fingerprint cache either: it describes other weights, and is hidden
    ignore = shutil.ignore_patterns("*.safetensors", "*.index.json", ".ram_trl_fingerprint.json")
    shutil.copytree(src, dst, ignore=ignore)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(file))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        config = json.loads((dst / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (dst / "config.json").write_text(json.dumps(config))
    edit(tensors)
    save_file(tensors, dst / WEIGHTS, metadata={"format": "pt"})
    return dst


def untouched_position(base: Path, agents: dict[str, Path], name: str = TENSOR) -> int:
    """A flat position of ``name`` that no agent changed (so a value put there is unique)."""
    b = load_file(base / WEIGHTS)[name].reshape(-1)
    same = torch.ones_like(b, dtype=torch.bool)
    for path in agents.values():
        same &= load_file(path / WEIGHTS)[name].reshape(-1) == b
    return int(torch.nonzero(same)[0])


def set_value(position: int, value: float, name: str = TENSOR) -> Callable:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name].view(-1)[position] = value

    return edit


def make_store(root: Path, base: Path, agents: dict[str, Path]) -> SnapshotStore:
    """A store holding step 0 of every agent, written through the public snapshot API."""
    store = SnapshotStore(root)
    for name, path in agents.items():
        store.put(lambda d, path=path: snapshot_folders(base, path, d), name, 0)
    return store


# =============================================================================================
# Item 1: no Inf weights. A merge never writes a non-finite weight that no input had: absurd
# parameters are refused, and the result is checked (per chunk, in the output dtype).
# =============================================================================================


@pytest.mark.parametrize(
    ("method", "flag", "value"),
    [("ram_plus", "--r", "inf"), ("task_arithmetic", "--scale", "1e300")],
)
def test_cli_refuses_parameters_that_overflow(tmp_path, tiny, method, flag, value) -> None:
    """Item 1: ``--r inf`` and ``--scale 1e300`` exit 0 today and write thousands of Inf weights.
    Expected: exit 2, one line naming the parameter (or the non-finite result), no output, no
    temporary left."""
    base, agents = tiny
    out = tmp_path / "out" / "merged"
    result = run_cli(
        "merge",
        "--base",
        base,
        *agent_args(agents),
        "--method",
        method,
        flag,
        value,
        "--out",
        out,
        "-q",
    )
    line = assert_clean_error(result)
    assert_names_any(line, "finite", "overflow", "too large", keys=[flag.lstrip("-")])
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ram_plus", {"r": 1e300}),
        ("ram_plus_s", {"r": 1e300}),
        ("arm_r_v2", {"r": 1e300}),
        ("ties", {"scale": 1e300}),
    ],
)
def test_api_never_writes_inf_for_absurd_parameters(tmp_path, tiny, method, params) -> None:
    """Item 1, through ``ram_trl.merge``: every one of these merged thousands of Inf weights.
    Expected: an InputError (naming the parameter or the tensor whose result is non-finite) and
    no output folder."""
    base, agents = tiny
    out = tmp_path / "merged"
    with pytest.raises(InputError):
        ram_trl.merge(base, agents, method, out, params=params, progress=False)
    assert not out.exists() and leftovers(tmp_path) == []


def test_result_overflow_with_default_parameters_is_refused(tmp_path, tiny) -> None:
    """Item 1: the parameters need not be absurd for the result to overflow. Agent 'a' holds a
    finite 3.3e38 (a unique element); RAM+ with its defaults scales it by lambda ~ 1.1, past
    float32's 3.4e38. Today the merge writes Inf and exits 0. Expected: exit 2, one line naming
    the tensor, nothing written."""
    base, agents = tiny
    position = untouched_position(base, agents)
    big = edited_model(agents["a"], tmp_path / "a", set_value(position, 3.3e38))
    out = tmp_path / "merged"
    result = run_cli(
        "merge",
        "--base",
        base,
        "--agent",
        f"a={big}",
        "--agent",
        f"b={agents['b']}",
        "--out",
        out,
        "-q",
    )
    assert_clean_error(result, TENSOR)
    assert not out.exists()


def test_output_dtype_overflow_is_refused(tmp_path, tiny) -> None:
    """Item 1: the result must also be finite in the *output* dtype. An agent's weight of 1e5 is
    fine in float32 but Inf in float16 (max 65504); ``dtype="float16"`` writes Inf today.
    Expected: an InputError naming the tensor, nothing written."""
    base, agents = tiny
    position = untouched_position(base, agents)
    big = edited_model(agents["a"], tmp_path / "a", set_value(position, 1e5))
    out = tmp_path / "merged"
    with pytest.raises(InputError, match=TENSOR):
        ram_trl.merge(base, {"a": big}, "ram", out, dtype="float16", progress=False)
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("value", "dtype"), [(3.3e38, None), (1e5, "float16")])
def test_store_merge_overflow_is_refused(tmp_path, tiny, monkeypatch, value, dtype) -> None:
    """Item 1 on the store path, where each agent's stored changes are merged into the base rows
    (``rule_at``): a unique 3.3e38 that RAM+'s lambda takes past float32, or a 1e5 that float16
    cannot hold, is refused with an InputError naming the tensor and the agent; nothing is
    written."""
    from ram_trl.methods import get_method
    from ram_trl.snapshot import open_store_agents

    base, agents = tiny
    position = untouched_position(base, agents)
    big = edited_model(agents["a"], tmp_path / "a", set_value(position, value))
    store = make_store(tmp_path / "store", base, {"a": big, "b": agents["b"]})
    spec, used = get_method("ram_plus"), []
    rule_at = spec.rule_at
    monkeypatch.setattr(spec, "rule_at", lambda *a: used.append(1) or rule_at(*a))
    sources = open_store_agents(store, [], base)
    out = tmp_path / "merged"
    try:
        with pytest.raises(InputError, match=TENSOR) as error:
            ram_trl.merge(base, sources, "ram_plus", out, dtype=dtype, progress=False)
    finally:
        for source in sources.values():
            source.close()
    assert used and "agent 'a'" in str(error.value)
    assert not out.exists() and leftovers(tmp_path) == []


# =============================================================================================
# Item 2: an output that is, contains or lies inside an input (base, agent, store entry) is
# refused, with or without --overwrite, before anything is written.
# =============================================================================================


@pytest.mark.parametrize("where", ["base", "parent"])
def test_merge_output_overlapping_an_input_is_refused(tmp_path, work, where) -> None:
    """Item 2: ``--out BASE --overwrite`` replaces the base with the merge today; ``--out`` on an
    agent or on a folder holding them deletes them, and ``--out BASE/sub`` writes into the base.
    Expected: exit 2, one line naming the output and the input it overlaps; every input byte
    unchanged."""
    base, agents = work
    out = {"base": base, "parent": tmp_path}[where]
    before = tree(tmp_path)
    result = run_cli(
        "merge", "--base", base, *agent_args(agents), "--out", out, "--overwrite", "-q"
    )
    assert_clean_error(result, out)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("where", ["agent", "inside-base"])
def test_api_output_overlapping_an_input_is_refused(tmp_path, work, where) -> None:
    """Item 2, through ``ram_trl.merge(..., overwrite=True)``: ``out`` on an agent deletes it
    today, ``out=BASE/merged`` writes into the base folder. Expected: an InputError naming the
    output; every input byte unchanged."""
    base, agents = work
    out = {"agent": agents["a"], "inside-base": base / "merged"}[where]
    before = tree(tmp_path)
    with pytest.raises(InputError, match=re.escape(str(out))):
        ram_trl.merge(base, agents, "ram", out, overwrite=True, progress=False)
    assert tree(tmp_path) == before


def test_store_merge_output_onto_an_entry_is_refused(tmp_path, tiny) -> None:
    """Item 2 for ``merge --store``: ``--out STORE/agents/a/step-0 --overwrite`` replaces the
    snapshot being merged today. Expected: exit 2, one line naming the output; store unchanged."""
    base, agents = tiny
    store = make_store(tmp_path / "store", base, agents)
    out = store.root / "agents" / "a" / "step-0"
    before = tree(store.root)
    result = run_cli("merge", "--store", store.root, "--out", out, "--overwrite", "-q")
    assert_clean_error(result, out)
    assert tree(store.root) == before


@pytest.mark.parametrize("where", ["agents", "store"])
def test_store_merge_output_holding_entries_is_refused(tmp_path, tiny, where) -> None:
    """Item 2: an output that holds snapshot entries (``STORE/agents``, the store itself)
    deletes them today (``MergeConfig(store=...).run()``, what ``merge --store`` runs).
    Expected: an InputError naming the output; the store unchanged."""
    base, agents = tiny
    store = make_store(tmp_path / "store", base, agents)
    out = {"agents": store.root / "agents", "store": store.root}[where]
    before = tree(store.root)
    config = ram_trl.MergeConfig(
        base=None, agents=[], store=str(store.root), out=str(out), overwrite=True
    )
    with pytest.raises(InputError, match=re.escape(str(out))):
        config.run(progress=False)
    assert tree(store.root) == before


def test_store_merge_into_merged_folder_is_allowed(tmp_path, tiny) -> None:
    """Item 2, the other side: ``STORE/merged/NAME`` is where merges of a store belong (the
    callback writes there); it overlaps no entry and must keep working."""
    base, agents = tiny
    store = make_store(tmp_path / "store", base, agents)
    out = store.merged_dir("m")
    result = run_cli("merge", "--store", store.root, "--out", out, "-q")
    assert result.rc == 0, result
    assert (out / WEIGHTS).is_file()


def test_snapshot_output_inside_an_input_is_refused(tmp_path, work) -> None:
    """Item 2 for ``ram-trl snapshot --out``: writing the snapshot inside the fine-tuned model's
    folder (or the base's) changes an input. Expected: exit 2, one line naming the output."""
    base, agents = work
    before = tree(tmp_path)
    out = agents["a"] / "task_vector"
    result = run_cli("snapshot", "--base", base, "--model", agents["a"], "--out", out)
    assert_clean_error(result, out)
    assert tree(tmp_path) == before


# =============================================================================================
# Item 3: recipes and configs are validated strictly: a bool is a YAML bool, a number a number,
# a path a string; an error names the key. The same rules for MergeConfig and RAMConfig.
# =============================================================================================


def recipe(tmp_path: Path, tiny, extra: str, name: str = "recipe.yaml") -> Path:
    base, agents = tiny
    text = f"base: {base}\nagents: {{a: {agents['a']}, b: {agents['b']}}}\n" + extra
    path = tmp_path / name
    path.write_text(text)
    return path


def test_recipe_overwrite_string_does_not_delete(tmp_path, tiny) -> None:
    """Item 3: ``overwrite: "no"`` is a string, taken as true today: the existing folder was
    deleted. Expected: exit 2, one line naming the key ``overwrite``; the folder untouched."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    path = recipe(tmp_path, tiny, f'out: {existing}\noverwrite: "no"\n')
    result = run_cli("merge", path, "-q")
    assert_clean_error(result, "overwrite")
    assert tree(existing) == {"keep.txt": tree(existing)["keep.txt"]}
    assert (existing / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("method: 5\n", "method"),
        ("out: 123\n", "out"),
        ("parameters: [1, 2]\n", "parameters"),
        ("dtype: [1]\n", "dtype"),
        ("device: 7\n", "device"),
        ("shard_size: [1]\n", "shard_size"),
        ("overwrite: 1\n", "overwrite"),
        ("parameters: {epsilon: true}\n", "epsilon"),
        ("parameters: {r: yes}\n", "r"),
        ("rho_scope: [global]\n", "rho_scope"),
    ],
)
def test_recipe_types_are_strict(tmp_path, tiny, extra, key) -> None:
    """Item 3: wrong types in a recipe, through ``MergeConfig.from_yaml`` (what ``ram-trl merge
    RECIPE`` reads). Today most give a raw TypeError/AttributeError/RuntimeError, and
    ``epsilon: true`` / ``overwrite: 1`` are used as 1.0 / true. Expected: an InputError naming the
    key, when the recipe is loaded (before any input is opened)."""
    out = "" if extra.startswith("out:") else f"out: {tmp_path / 'out'}\n"
    path = recipe(tmp_path, tiny, out + extra)
    with pytest.raises(InputError) as error:
        ram_trl.MergeConfig.from_yaml(path)
    assert names_key(str(error.value), key), error.value


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("base: [x]\nagents: {a: /nowhere}\n", "base"),
        ("base: /nowhere\nagents: {a: [1]}\n", "agents"),
        ("store: 5\n", "store"),
    ],
)
def test_recipe_path_types_are_strict(tmp_path, text, key) -> None:
    """Item 3: ``base: [x]`` gives an AttributeError traceback today, ``agents: {a: [1]}`` is
    turned into the path "[1]" and ``store: 5`` into "5". Expected: an InputError naming the
    key."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text + f"out: {tmp_path / 'out'}\n")
    with pytest.raises(InputError) as error:
        ram_trl.MergeConfig.from_yaml(path)
    assert names_key(str(error.value), key), error.value


def test_recipe_valid_types_still_load(tmp_path, tiny) -> None:
    """Item 3, the other side: strict does not mean fussy. YAML ints where floats are expected,
    a size given in bytes or as text, and real YAML bools all load."""
    extra = (
        f"out: {tmp_path / 'out'}\nparameters: {{r: 1, alpha: 2, epsilon: 1.0e-5}}\n"
        "shard_size: 1000000\noverwrite: false\ndtype: bfloat16\ndevice: cpu\n"
    )
    config = ram_trl.MergeConfig.from_yaml(recipe(tmp_path, tiny, extra))
    assert config.overwrite is False and config.parameters["r"] == 1


def test_merge_config_constructor_is_strict(tiny) -> None:
    """Item 3: the dataclass itself validates (as TRL's configs do in ``__post_init__``), so a
    Python caller gets the same refusal as a recipe."""
    base, agents = tiny
    with pytest.raises(InputError, match="overwrite"):
        ram_trl.MergeConfig(base=str(base), agents={"a": str(agents["a"])}, overwrite="no")


@pytest.mark.parametrize("kind", ["binary", "folder"])
def test_unreadable_recipe_is_an_input_error(tmp_path, tiny, kind) -> None:
    """Item 3: a binary file (UnicodeDecodeError) or a folder (IsADirectoryError) given as the
    recipe of ``ram-trl merge`` gives a traceback today. Expected: an InputError naming the
    recipe path (which the CLI prints as its one line)."""
    if kind == "binary":
        path = tmp_path / "recipe.yaml"
        path.write_bytes((tiny[0] / WEIGHTS).read_bytes()[:4096])
    else:
        path = tmp_path / "recipes"
        path.mkdir()
    for load in (ram_trl.MergeConfig.from_yaml, ram_trl.RAMConfig.from_yaml):
        with pytest.raises(InputError, match=re.escape(str(path))):
            load(path)


def test_recipe_type_error_through_the_cli(tmp_path, tiny) -> None:
    """Item 3 end to end: ``method: 5`` gives an AttributeError traceback today. Expected: exit
    2, one line naming the key and the recipe."""
    path = recipe(tmp_path, tiny, f"out: {tmp_path / 'out'}\nmethod: 5\n")
    assert_clean_error(run_cli("merge", path, "-q"), "method", path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"overwrite": "no"}, "overwrite"),
        ({"merge_background": "yes"}, "merge_background"),
        ({"snapshot_on_train_end": "no"}, "snapshot_on_train_end"),
        ({"eval_do_sample": "false"}, "eval_do_sample"),
        ({"keep_last": True}, "keep_last"),
        ({"merge_every": True}, "merge_every"),
        ({"eval_seed": 1.5}, "eval_seed"),
        ({"eval_temperature": "hot"}, "eval_temperature"),
        ({"merge_method": 5}, "merge_method"),
        ({"merged_name": 5}, "merged_name"),
        ({"merge_dtype": [1]}, "merge_dtype"),
        ({"merge_params": [1, 2]}, "merge_params"),
        ({"merge_params": {"epsilon": True}}, "epsilon"),
        ({"merge_params": {"epsilon": 2.0}, "snapshot_epsilon": True}, "snapshot_epsilon"),
        ({"base": [1]}, "base"),
        ({"store": 5}, "store"),
    ],
)
def test_ram_config_types_are_strict(tmp_path, fields, key) -> None:
    """Item 3 for ``RAMConfig`` (the training recipe's ``ram:`` section): today strings are
    accepted as bools, True as an integer, a float as a seed, lists as a dtype or a path, and
    some give AttributeError. Expected: an InputError naming the key."""
    import yaml

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"ram": {"store": str(tmp_path / "s"), "agent": "a", **fields}}))
    with pytest.raises(InputError) as error:
        ram_trl.RAMConfig.from_yaml(path, section="ram")
    assert names_key(str(error.value), key), error.value


def test_ram_config_constructor_is_strict(tmp_path) -> None:
    """Item 3: ``RAMConfig(overwrite="no")`` in Python is refused like the YAML key."""
    with pytest.raises(InputError, match="overwrite"):
        ram_trl.RAMConfig(store=str(tmp_path / "s"), agent="a", overwrite="no")


# =============================================================================================
# Item 4: a failed `ram-trl snapshot` leaves a new store uncreated, or empty and unbound.
# =============================================================================================


def test_failed_snapshot_does_not_bind_a_new_store(tmp_path, tiny, tiny_base_factory) -> None:
    """Item 4: a snapshot that fails (here: the model folder does not exist) with the wrong base
    creates the store today and records that base, so the next, correct snapshot is refused
    ("use one store per base model"). Expected: the failure is a clean exit 2, the store is not
    bound to any base, and the correct snapshot then succeeds."""
    base, agents = tiny
    wrong_base = tiny_base_factory(arch="llama")
    root = tmp_path / "store"
    failed = run_cli(*snapshot_args(wrong_base, tmp_path / "missing", root, "a", 0))
    assert_clean_error(failed, tmp_path / "missing")
    assert_store_unbound(root)
    store = SnapshotStore(root)  # the correct snapshot, as `ram-trl snapshot` writes it
    store.put(lambda d: snapshot_folders(base, agents["a"], d), "a", 0)
    assert store.steps("a") == [0]


def test_snapshot_with_bad_agent_name_does_not_create_a_store(tmp_path, tiny) -> None:
    """Item 4: a bad agent name is refused only after the store was created and bound. Expected:
    exit 2 naming the name; no store bound (or none at all)."""
    base, agents = tiny
    root = tmp_path / "store"
    result = run_cli(*snapshot_args(base, agents["a"], root, "bad/name", 0))
    assert_clean_error(result, "bad/name")
    assert_store_unbound(root)


# =============================================================================================
# Item 5: one clear line instead of a traceback (the full disk is in test_faults.py).
# =============================================================================================


def test_unknown_device_is_one_line(tmp_path, tiny) -> None:
    """Item 5: ``merge --device foo`` is a RuntimeError traceback from torch.device today.
    Expected: exit 2, one line naming 'foo'; and ``ram_trl.probe(device="foo")`` (what ``probe
    --device`` calls) an InputError."""
    base, agents = tiny
    out = tmp_path / "out"
    result = run_cli(
        "merge", "--base", base, *agent_args(agents), "--device", "foo", "--out", out, "-q"
    )
    assert_clean_error(result, "foo")
    assert not out.exists()
    with pytest.raises(InputError, match="foo"):
        ram_trl.probe(base, agents, device="foo", progress=False)


def test_probe_out_onto_a_file_is_one_line(tmp_path, tiny) -> None:
    """Item 5: ``probe --out FILE`` raises FileExistsError from mkdir today. Expected: exit 2,
    one line naming the file; the file untouched."""
    base, agents = tiny
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    result = run_cli("probe", "--base", base, *agent_args(agents), "--out", target, "-q")
    assert_clean_error(result, target)
    assert target.read_text() == "mine"


def test_output_under_a_file_is_one_line(tmp_path, tiny) -> None:
    """Item 5 (found beside the issue's list): an ``--out`` whose parent is a file is a
    FileExistsError traceback from mkdir today (merge, snapshot --out/--store, probe alike).
    Expected: exit 2, one line naming the path; the file untouched."""
    base, agents = tiny
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    out = blocker / "merged"
    result = run_cli("merge", "--base", base, *agent_args(agents), "--out", out, "-q")
    assert_clean_error(result, blocker)
    assert blocker.read_text() == "mine"


@pytest.fixture
def read_only_store(tmp_path, tiny):
    """A store with steps 0 and 1 of agent 'a' and step 0 of 'b', made read-only."""
    base, agents = tiny
    store = make_store(tmp_path / "store", base, agents)
    store.put(lambda d: snapshot_folders(base, agents["a"], d), "a", 1)
    with read_only(store.root) as cause:
        if cause is None:
            pytest.skip("cannot make a folder read-only here (root without mount)")
        yield store, cause


def test_snapshot_into_read_only_store_is_one_line(tmp_path, tiny, read_only_store) -> None:
    """Item 5: writing a snapshot into a read-only store is a raw OSError 30 traceback (from the
    store lock) today. Expected: exit 2, one line naming the store and "read-only"."""
    base, agents = tiny
    store, cause = read_only_store
    result = run_cli(*snapshot_args(base, agents["b"], store.root, "b", 5))
    assert_clean_error(result, store.root, cause)


def test_merge_and_prune_in_read_only_store_are_one_line(read_only_store) -> None:
    """Item 5: merging into ``STORE/merged/`` and pruning a read-only store give OSError 30
    tracebacks today. Expected: exit 2, one line naming the store path and "read-only"."""
    store, cause = read_only_store
    merged = run_cli("merge", "--store", store.root, "--out", store.merged_dir("m"), "-q")
    assert_clean_error(merged, store.root, cause)
    pruned = run_cli("store", "prune", store.root, "--keep-last", "1")
    assert_clean_error(pruned, store.root, cause)


def test_read_only_store_can_still_be_merged_elsewhere(tmp_path, read_only_store) -> None:
    """Item 5, the other side: reading a read-only store (a shared, archived run) is legitimate:
    ``merge --store RO --out ELSEWHERE`` and ``store ls`` work."""
    store, _ = read_only_store
    out = tmp_path / "merged"
    result = run_cli("merge", "--store", store.root, "--out", out, "-q")
    assert result.rc == 0, result
    assert (out / WEIGHTS).is_file()


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_malicious_adapter_bin_is_an_input_error(tmp_path) -> None:
    """Item 5: a legacy ``adapter_model.bin`` that is not a plain tensor pickle escapes as a raw
    ``pickle.UnpicklingError`` ("Weights only load failed ...") today. Expected: an InputError
    naming the file and saying it cannot be loaded safely; the code in it never runs."""
    from ram_trl.lora import lora_deltas_from_adapter

    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    torch.save({"base_model.model.x.lora_A.weight": _Evil()}, folder / "adapter_model.bin")
    with pytest.raises(InputError) as error:
        list(lora_deltas_from_adapter(folder))
    assert "adapter_model.bin" in str(error.value)
    assert not isinstance(error.value, pickle.UnpicklingError)


# =============================================================================================
# Item 7: snapshots carry checksums, verified when merged and by `store ls --verify`.
# =============================================================================================


def rewrite_values(entry: Path) -> str:
    """Change one stored value of a sparse tensor of a snapshot, headers left intact; returns the
    file changed. The value stays finite and the indices sorted: only a checksum can tell."""
    file = next(entry.glob("*.safetensors"))
    data = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    key = next(k for k, v in header.items() if k.endswith("::values") and v["shape"][0] > 0)
    assert header[key]["dtype"] == "F32"
    at = 8 + length + header[key]["data_offsets"][0]
    (value,) = struct.unpack("<f", data[at : at + 4])
    data[at : at + 4] = struct.pack("<f", value + 0.5)
    file.write_bytes(bytes(data))
    return file.name


@pytest.fixture
def corrupted_store(tmp_path, tiny) -> tuple[SnapshotStore, Path, str]:
    base, agents = tiny
    store = make_store(tmp_path / "store", base, agents)
    entry = store.root / "agents" / "a" / "step-0"
    return store, entry, rewrite_values(entry)


def test_rewritten_snapshot_values_are_refused_by_merge(tmp_path, corrupted_store) -> None:
    """Item 7: a snapshot whose values were rewritten (headers intact) merges with rc 0 into
    different weights today. Expected: exit 2, one line naming the snapshot and a checksum
    mismatch; no output."""
    store, entry, file = corrupted_store
    out = tmp_path / "merged"
    result = run_cli(
        "merge", "--store", store.root, "--agent", "a@0", "--agent", "b", "--out", out, "-q"
    )
    line = assert_clean_error(result, entry)
    assert_names_any(line, "checksum", "sha256", "hash")
    assert not out.exists()


def test_store_ls_verify_flags_rewritten_values(corrupted_store) -> None:
    """Item 7: ``store ls --verify`` (reads every byte and checks the manifest's checksums) does
    not exist today, and ``store ls`` reports the entry as ok. Expected: exit 0, the corrupted
    entry's row marked CORRUPT with the checksum, the intact one ok."""
    store, entry, file = corrupted_store
    result = run_cli("store", "ls", store.root, "--verify")
    assert result.rc == 0, result
    rows = {tuple(line.split()[:2]): line for line in result.stdout.splitlines()[1:]}
    assert "CORRUPT" in rows[("a", "0")] and file in rows[("a", "0")], result
    assert_names_any(rows[("a", "0")], "checksum", "sha256", "hash")
    assert rows[("b", "0")].rstrip().endswith("ok"), result


# =============================================================================================
# Item 8: readers of a store see the old or the new entry, never an error, while writers replace
# and prune (the bounded many-writer version is in test_faults.py).
# =============================================================================================

CTX = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _replacer(root: str, snapshots: list, stop, errors) -> None:
    try:
        store, k = SnapshotStore(root), 0
        while not stop.is_set():
            store.put(snapshots[k % len(snapshots)], "a", 0, replace=True)
            k += 1
    except BaseException:
        errors.put(traceback.format_exc())


def _pruner(root: str, snapshots: list, stop, errors) -> None:
    try:
        store, k = SnapshotStore(root), 1
        while not stop.is_set():
            store.put(snapshots[k % len(snapshots)], "b", k)
            store.prune("b", keep_last=1)
            k += 1
    except BaseException:
        errors.put(traceback.format_exc())


def test_latest_and_merge_survive_replace_and_prune(tmp_path, tiny) -> None:
    """Item 8: ``SnapshotStore.latest()`` racing ``put(replace=True)`` and ``prune`` returns None,
    warns "skipping corrupt snapshot" or raises FileNotFoundError today, and a store merge fails
    ("manifest.json is missing", "removed or replaced while being opened"). Expected, for about
    two seconds of churn: ``latest`` always returns an entry, with no warning and no exception;
    ``list`` shows no corrupt row (none is corrupt); a merge of the store never fails."""
    base, agents = tiny
    snapshots = [TaskVector.from_folders(base, agents[n]) for n in ("a", "b")]
    store = SnapshotStore(tmp_path / "store")
    store.put(snapshots[0], "a", 0)
    store.put(snapshots[1], "b", 0)
    stop, errors = CTX.Event(), CTX.Queue()
    workers = [
        CTX.Process(target=f, args=(str(store.root), snapshots, stop, errors))
        for f in (_replacer, _pruner)
    ]
    for w in workers:
        w.start()
    problems: list[str] = []
    try:
        deadline, merges = time.monotonic() + 2.0, 0
        while time.monotonic() < deadline:
            problems += strict_reads(store, ("a", "b"))[1]
            out = str(tmp_path / "merged" / f"m{merges}")
            config = ram_trl.MergeConfig(base=None, agents=[], store=str(store.root), out=out)
            try:
                config.run(progress=False)
            except Exception as e:
                problems.append(f"merge raised {e!r}")
            merges += 1
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    assert errors.empty(), errors.get()
    assert all(w.exitcode == 0 for w in workers)
    assert not problems, f"{len(problems)} failed reads, e.g. {sorted(set(problems))[:5]}"


# =============================================================================================
# Item 9: an agent stored at a lower precision than the base.
#
# Chosen behaviour: compare at the precision the agent and the base share. An agent stored in
# bfloat16 of a float32 base is compared with the base rounded to bfloat16, so bf16 rounding is
# not a "change": the changed fraction is the agent's real one, every element the agent did not
# change keeps the base's float32 value bit for bit, and one warning line says so. Refusing would
# push users to cast their base to bf16 themselves, losing its float32 values in the output;
# mergekit and PEFT users load such pairs every day (bf16 RL checkpoints of float32 bases).
# =============================================================================================


@pytest.fixture(scope="module")
def bf16_agent(tiny, tmp_path_factory) -> Path:
    """Agent 'a' saved in bfloat16, as a bf16 RL run of the float32 base writes it."""
    _, agents = tiny
    return edited_model(
        agents["a"], tmp_path_factory.mktemp("bf16") / "a", lambda t: None, torch.bfloat16
    )


def bf16_changed_fraction(base: Path, agent: Path) -> float:
    """The agent's real changed fraction: elements whose bf16 value differs from the bf16 base
    by more than epsilon."""
    b, a = load_file(base / WEIGHTS), load_file(agent / WEIGHTS)
    changed = sum(int(((a[k].float() - b[k].bfloat16().float()).abs() > 1e-5).sum()) for k in b)
    return changed / sum(t.numel() for t in b.values())


def test_bf16_agent_changes_are_counted_at_bf16(tiny, bf16_agent) -> None:
    """Item 9: today the bf16 agent is reported at about 60% changed (its rounding noise against
    the float32 base), truly about 5%. Expected: the changed fraction RAM reports equals the
    agent's real one (at bf16), and a float32 agent next to it is still compared at float32."""
    base, agents = tiny
    truth = bf16_changed_fraction(base, bf16_agent)
    assert 0.03 < truth < 0.07
    report = ram_trl.merge(
        base, {"a": bf16_agent, "b": agents["b"]}, "ram_plus", dry_run=True, progress=False
    )
    stats = {a.name: a for a in report.agents}
    assert stats["a"].changed_fraction == pytest.approx(truth, abs=1e-4)
    assert stats["b"].changed_fraction == pytest.approx(0.05, abs=0.005)


def test_bf16_agent_merge_keeps_unchanged_elements_at_base(tmp_path, tiny, bf16_agent) -> None:
    """Item 9: today a RAM merge of the bf16 agent writes its bf16-rounded values into about 60%
    of the float32 output. Expected: the output stays float32, every element the agent did not
    really change is the base's value bit for bit, and only about 5% differ from the base."""
    base, _ = tiny
    out = tmp_path / "merged"
    ram_trl.merge(base, {"a": bf16_agent}, "ram", out, progress=False)
    merged, b, a = (load_file(p / WEIGHTS) for p in (out, base, bf16_agent))
    differs = total = 0
    for name, value in b.items():
        assert merged[name].dtype == torch.float32
        unchanged = (a[name].float() - value.bfloat16().float()).abs() <= 1e-5
        assert torch.equal(merged[name][unchanged], value[unchanged]), name
        differs += int((merged[name] != value).sum())
        total += value.numel()
    assert differs / total < 0.07


def test_bf16_agent_is_announced(tmp_path, tiny, bf16_agent) -> None:
    """Item 9: the CLI accepts the pair silently today. Expected: exit 0 and one warning line
    naming the agent and both dtypes."""
    base, _ = tiny
    result = run_cli(
        "merge", "--base", base, "--agent", f"a={bf16_agent}", "--out", tmp_path / "merged", "-q"
    )
    assert result.rc == 0, result
    lines = [
        w
        for w in warning_lines(result)
        if any(d in w for d in ("bfloat16", "bf16")) and any(d in w for d in ("float32", "fp32"))
    ]
    assert len(lines) == 1 and "'a'" in lines[0], result


def test_bf16_agent_snapshot_density(tmp_path, tiny, bf16_agent) -> None:
    """Item 9 for snapshots: ``snapshot_folders`` of the bf16 agent stores about 60% of the
    elements today. Expected: the agent's real changes only (the same rule as the merge)."""
    base, _ = tiny
    manifest = snapshot_folders(base, bf16_agent, tmp_path / "snap")
    assert manifest.density == pytest.approx(bf16_changed_fraction(base, bf16_agent), abs=1e-4)


# =============================================================================================
# Item 10: minor.
# =============================================================================================


def test_failed_merge_leaves_no_empty_parent_folders(tmp_path, tiny) -> None:
    """Item 10: an agent with a NaN, merged by a method without a counting pass, is found while
    writing, and the parents created for ``--out`` stay behind, empty. Expected: exit 2 naming
    the agent's tensor; no new folder left."""
    base, agents = tiny
    position = untouched_position(base, agents)
    bad = edited_model(agents["a"], tmp_path / "inputs" / "a", set_value(position, float("nan")))
    out = tmp_path / "new" / "deeper" / "merged"
    result = run_cli(
        "merge",
        "--base",
        base,
        "--agent",
        f"a={bad}",
        "--method",
        "task_arithmetic",
        "--out",
        out,
        "-q",
    )
    assert_clean_error(result, TENSOR)
    assert not (tmp_path / "new").exists()


def test_failed_snapshot_leaves_no_empty_parent_folders(tmp_path, tiny) -> None:
    """Item 10: the same for ``snapshot --out a/b/c`` of a checkpoint with a NaN."""
    base, agents = tiny
    position = untouched_position(base, agents)
    bad = edited_model(agents["a"], tmp_path / "inputs" / "a", set_value(position, float("nan")))
    out = tmp_path / "new" / "deeper" / "snap"
    result = run_cli("snapshot", "--base", base, "--model", bad, "--out", out)
    assert_clean_error(result, TENSOR)
    assert not (tmp_path / "new").exists()


def test_existing_step_error_names_the_cli_flag(tmp_path, tiny) -> None:
    """Item 10: the CLI tells its user to "pass replace=True". Expected: the message names
    ``--replace``, the flag this user can pass."""
    base, agents = tiny
    store = make_store(tmp_path / "store", base, {"a": agents["a"]})
    result = run_cli(*snapshot_args(base, agents["a"], store.root, "a", 0))
    line = assert_clean_error(result, "--replace")
    assert "replace=True" not in line


def test_overflow_error_names_the_agent(tmp_path, tiny) -> None:
    """Item 10: two agents holding 3.4e38 at the same element make the float32 sum overflow; the
    error names the tensor but not the agent. Expected: one line naming the tensor and an agent
    (by name or path)."""
    base, agents = tiny
    position = untouched_position(base, agents)
    big = {
        n: edited_model(agents[n], tmp_path / n, set_value(position, 3.4e38)) for n in ("a", "b")
    }
    result = run_cli("merge", "--base", base, *agent_args(big), "--out", tmp_path / "merged", "-q")
    line = assert_clean_error(result, TENSOR)
    assert_names_any(line, "agent 'a'", "agent 'b'", str(big["a"]), str(big["b"]))


def test_suspicious_agents_are_warned_about(tmp_path, tiny) -> None:
    """Item 10: an "agent" that is the base itself (a wrong path), and the same folder given as
    two agents (a copy-paste slip, which double-counts it), merge silently today. Expected: the
    merge goes ahead (exit 0), with a warning line naming the agent identical to the base, and
    one naming both agents that share a folder."""
    base, agents = tiny
    result = run_cli(
        "merge",
        "--base",
        base,
        "--agent",
        f"a={agents['a']}",
        "--agent",
        f"again={agents['a']}",
        "--agent",
        f"same={base}",
        "--out",
        tmp_path / "merged",
        "-q",
    )
    assert result.rc == 0, result
    warned = warning_lines(result)
    assert any("'same'" in w for w in warned), result
    assert any("'a'" in w and "'again'" in w for w in warned), result
