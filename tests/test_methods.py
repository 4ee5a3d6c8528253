"""The merge rules against the paper's worked examples (paper.md section 7) and hand computations,
plus hypothesis properties of RAM's invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ram_trl.errors import InputError
from ram_trl.methods import (
    ChunkContext,
    change_mask,
    get_method,
    overlap_histogram,
    overlap_histogram_at,
)
from ram_trl.methods.baselines import disjoint_mean
from ram_trl.methods.magnitude import kth_largest, trim_count
from ram_trl.methods.ram import RAMParams, overlap_ratio

EPS = 1e-5


def run(method: str, deltas, hist=None, **params) -> torch.Tensor:
    """Apply a method's rule to (N, n) deltas with lambdas from ``hist`` (default: the deltas')."""
    spec = get_method(method)
    p = spec.make_params(params)
    deltas = torch.as_tensor(deltas, dtype=torch.float32)
    scales = None
    if spec.scales is not None:
        hist = overlap_histogram(change_mask(deltas, p.epsilon)) if hist is None else hist
        scales = spec.scales(hist, p).float()
    thresholds = None
    if spec.name == "ties":
        k = trim_count(deltas.shape[1], p.keep)
        thresholds = torch.tensor(kth_largest(lambda: [(deltas.abs(), 0)], k))
    seeds = tuple(range(deltas.shape[0])) if spec.name.startswith("dare") else ()
    return spec.rule(deltas, p, ChunkContext(scales, thresholds, seeds))


def lambdas(method: str, hist, **params) -> list[float]:
    spec = get_method(method)
    return spec.scales(torch.as_tensor(hist), spec.make_params(params)).tolist()


TOY_A = [1, 1, 1, 0, 0, 0, 5e-6, 1e-5]
TOY_B = [3, 0, 0, 2, 0, 0, 0, 0]


# --- paper section 7 -------------------------------------------------------------------------


def test_unique_change_keeps_agent_delta_and_drops_subthreshold():  # 7.1
    out = run("ram", [[0.5, 0.0], [4e-6, 0.0]])
    assert out.tolist() == [0.5, 0.0]


def test_shared_change_is_plain_signed_mean_without_lambda():  # 7.2
    assert run("ram_plus", [[1.0, 0.3], [-1.0, 0.1]]).tolist() == pytest.approx([0.0, 0.2])


def test_unchanged_stays_base_even_with_subthreshold_deltas():  # 7.3
    assert run("ram_plus", [[1e-5, -9e-6], [5e-6, 1e-5]]).tolist() == [0.0, 0.0]


def test_single_agent_is_the_agent_with_subthreshold_zeroed():  # 7.4
    delta = [[0.2, -0.1, 3e-6, 0.0]]
    for method in ("ram", "ram_plus", "ram_plus_s", "arm_r_v2"):
        assert run(method, delta).tolist() == pytest.approx([0.2, -0.1, 0.0, 0.0])


def test_lambda_uses_counts_only():  # 7.5: 300 shared, 100 unique -> rho = 3
    hist = [[100, 300], [0, 0]]
    assert lambdas("ram_plus", hist)[0] == pytest.approx(1.2)
    assert lambdas("arm_r_v2", hist, r=1.1)[0] == pytest.approx(1.1)
    assert lambdas("ram_plus_s", hist, r=0.1)[0] == pytest.approx(1.075)  # == arm-r with 1.1
    assert lambdas("ram_plus", hist, r=0.1, alpha=0.2)[0] == pytest.approx(1.02)  # mergekit


def test_paper_toy_vector():  # 7.6
    deltas = [TOY_A, TOY_B]
    hist = overlap_histogram(change_mask(torch.tensor(deltas), EPS))
    assert overlap_ratio(hist).tolist() == [0.5, 1.0]
    assert run("ram", deltas).tolist() == [2, 1, 1, 2, 0, 0, 0, 0]
    expected_plus = [2, 1.05, 1.05, 2.2, 0, 0, 0, 0]
    assert run("ram_plus", deltas).tolist() == pytest.approx(expected_plus)
    assert run("arm_r_v2", deltas, r=1.1).tolist() == pytest.approx(expected_plus)
    arm_r = [2, 1 + 0.1 / 3, 1 + 0.1 / 3, 2.1, 0, 0, 0, 0]
    assert run("ram_plus_s", deltas, r=0.1).tolist() == pytest.approx(arm_r)
    mergekit = [2, 1.02, 1.02, 2.04, 0, 0, 0, 0]
    assert run("ram_plus", deltas, r=0.1, alpha=0.2).tolist() == pytest.approx(mergekit)


def test_global_and_tensor_scope_counts():  # 7.7
    a = torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 1]])
    b = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]])
    hist_a, hist_b = (overlap_histogram(change_mask(x, EPS)) for x in (a, b))
    whole = hist_a + hist_b
    assert overlap_ratio(whole).tolist() == pytest.approx([1 / 3, 1 / 2])
    assert run("ram_plus", a, hist=whole).tolist() == pytest.approx([1 + 0.1 / 3] * 3 + [1.05])
    assert run("ram_plus", a, hist=hist_a).tolist() == [1, 1, 1, 1]  # tensor scope: rho = 0
    assert run("ram_plus", b, hist=hist_b).tolist() == pytest.approx([1, 1.1, 0, 0])


def test_threshold_is_strict_in_float32():  # 7.8
    eps32 = torch.tensor(1e-5, dtype=torch.float32).item()  # float32(1e-5) < 1e-5
    assert eps32 < 1e-5
    assert run("ram", [[eps32, 2e-5]]).tolist() == [0.0, pytest.approx(2e-5)]


def test_agent_without_unique_elements_gets_lambda_one():  # 7.9
    deltas = [[1.0, 1.0, 0.0], [1.0, 1.0, 2.0]]  # agent 0: shared only
    for method in ("ram_plus", "ram_plus_s", "arm_r_v2"):
        assert lambdas(method, overlap_histogram(change_mask(torch.tensor(deltas), EPS)))[0] == 1
    hist = overlap_histogram(change_mask(torch.tensor(deltas), EPS))
    assert overlap_ratio(hist)[0] == math.inf
    # agent 1: rho = 2 shared / 1 unique = 2 -> lambda = 1.2
    assert run("ram_plus", deltas).tolist() == pytest.approx([1.0, 1.0, 2.4])


def test_agent_that_changed_nothing():
    deltas = [[0.0, 0.0], [1.0, 0.0]]
    hist = overlap_histogram(change_mask(torch.tensor(deltas), EPS))
    assert overlap_ratio(hist).tolist() == [0.0, 0.0]
    assert lambdas("ram_plus", hist) == [1.0, 1.0]


def test_overlap_histogram_counts_other_agents():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert overlap_histogram(mask).tolist() == [[1, 1, 1], [0, 1, 1], [1, 0, 1]]


@given(st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=5))
def test_overlap_histogram_from_positions_is_the_same(rows):
    """The counting pass of snapshots gives each agent's changed positions (in any order)."""
    mask = torch.tensor(rows, dtype=torch.bool)
    changed = [torch.nonzero(row).flatten().flip(0) for row in mask]
    assert torch.equal(overlap_histogram_at(changed, 6), overlap_histogram(mask))


@given(st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=1, max_size=6))
def test_overlap_histogram_is_the_count_by_definition(rows):
    """H[t, k]: what agent t changed that exactly k others changed too, counted one by one."""
    n = len(rows)
    expected = [[0] * n for _ in range(n)]
    for t, row in enumerate(rows):
        for i, changed in enumerate(row):
            if changed:
                expected[t][sum(r[i] for r in rows) - 1] += 1
    assert overlap_histogram(torch.tensor(rows, dtype=torch.bool)).tolist() == expected


# --- baselines, by hand ----------------------------------------------------------------------


def test_linear_and_task_arithmetic():
    deltas = [[1.0, -2.0, 0.0], [3.0, 0.0, 0.0]]
    assert run("linear", deltas).tolist() == [2.0, -1.0, 0.0]
    assert run("task_arithmetic", deltas, scale=0.5).tolist() == [2.0, -1.0, 0.0]


def test_ties_trims_elects_and_averages_by_hand():
    # keep 0.5 of 4 elements -> top 2 magnitudes per agent
    deltas = [
        [0.5, -0.1, 0.3, 0.05],  # trimmed to [0.5, 0, 0.3, 0]
        [-0.2, -0.4, 0.1, 0.0],  # trimmed to [-0.2, -0.4, 0, 0]
        [0.3, -0.2, -0.6, 0.01],  # trimmed to [0.3, 0, -0.6, 0]
    ]
    # element 0: sum 0.6 > 0 -> + ; mean(0.5, 0.3) = 0.4
    # element 1: only -0.4 -> -0.4 ; element 2: 0.3 - 0.6 < 0 -> - ; -0.6 ; element 3: nothing
    out = run("ties", deltas, keep=0.5, scale=1.0)
    assert out.tolist() == pytest.approx([0.4, -0.4, -0.6, 0.0])
    assert run("ties", deltas, keep=0.5, scale=0.5).tolist() == pytest.approx([0.2, -0.2, -0.3, 0])


def test_disjoint_mean_tie_goes_to_positive():
    assert disjoint_mean(torch.tensor([[1.0], [-1.0]])).tolist() == [1.0]


def test_trim_count_never_drops_a_small_tensor():
    assert trim_count(4, 0.2) == 1
    assert trim_count(10, 0.2) == 2
    assert trim_count(10, 1.0) == 10


def test_dare_drop_rescale_by_hand():
    spec = get_method("dare_linear")
    deltas = torch.ones(2, 10_000)
    out = spec.rule(deltas, spec.make_params({"drop": 0.75}), ChunkContext(seeds=(1, 2)))
    values = set(out.unique().tolist())
    assert values <= {0.0, 4.0, 8.0}  # each agent's survivors are rescaled by 1 / (1 - 0.75)
    assert out.mean().item() == pytest.approx(2.0, rel=0.05)  # unbiased in expectation
    again = spec.rule(deltas, spec.make_params({"drop": 0.75}), ChunkContext(seeds=(1, 2)))
    assert torch.equal(out, again)
    assert run("dare_linear", [[1.0, 2.0]], drop=0.0).tolist() == [1.0, 2.0]


def test_dare_ties_elects_sign_after_dropping():
    out = run("dare_ties", [[1.0, -1.0], [3.0, -2.0]], drop=0.0)
    assert out.tolist() == [2.0, -1.5]


def test_kth_largest_matches_kthvalue_across_chunks():
    values = torch.rand(3, 1001).abs()
    values[0, :10] = 0.0
    for k in (1, 7, 500, 1001):
        got = kth_largest(lambda: [(values[:, :333], 0), (values[:, 333:], 0)], k)
        want = [row.kthvalue(1001 - k + 1).values.item() for row in values]
        assert got == want


# --- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ram_plus", {"r": -0.1}),
        ("ram_plus", {"alpha": -1}),
        ("ram", {"epsilon": -1e-5}),
        ("ram_plus", {"rho_scope": "layer"}),
        ("ties", {"keep": 1.5}),
        ("ties", {"keep": -0.1}),
        ("dare_linear", {"drop": 1.0}),
        ("dare_ties", {"seed": 1.5}),
        ("task_arithmetic", {"scale": math.inf}),
        ("ram", {"r": 0.1}),
    ],
)
def test_bad_parameters_are_refused(method, params):
    with pytest.raises(InputError, match=method.split("_")[0]):
        get_method(method).make_params(params)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(InputError, match="ram_plus"):
        get_method("ram_pluss")
    assert get_method("ram-plus").name == "ram_plus"


# --- hypothesis properties -------------------------------------------------------------------

RAM_FAMILY = ("ram", "ram_plus", "ram_plus_s", "arm_r_v2")


@st.composite
def sparse_deltas(draw, max_agents: int = 4, max_n: int = 40) -> torch.Tensor:
    """(N, n) deltas mixing zeros, sub-threshold noise, the threshold itself and real changes."""
    n_agents = draw(st.integers(1, max_agents))
    n = draw(st.integers(1, max_n))
    atoms = st.sampled_from([0.0, 0.0, 0.0, 5e-6, -1e-5, 1e-5, 2e-5, 0.5, -0.25, 1.0, -3.0])
    values = draw(st.lists(atoms, min_size=n_agents * n, max_size=n_agents * n))
    return torch.tensor(values, dtype=torch.float32).reshape(n_agents, n)


@given(sparse_deltas(), st.sampled_from(RAM_FAMILY))
def test_unchanged_elements_stay_exactly_base(deltas, method):
    unchanged = ~change_mask(deltas, EPS).any(0)
    assert (run(method, deltas)[unchanged] == 0).all()


@given(sparse_deltas(max_agents=1), st.sampled_from(RAM_FAMILY))
def test_one_agent_gives_the_agent(deltas, method):
    expected = torch.where(change_mask(deltas, EPS), deltas, 0)[0]
    assert torch.equal(run(method, deltas), expected)


@given(
    sparse_deltas(max_agents=6),
    st.sampled_from([0.0, 5e-6, EPS, 0.5]),
    st.sampled_from([None, (1.0, 1.1, 1.5, 2.0, 1.25, 1.0)]),
)
def test_ram_rule_is_eq7_with_where_bit_for_bit(deltas, epsilon, lambdas_):
    """The rule's arithmetic shortcuts (``hardshrink`` for the masked deltas, a division by
    ``max(count, 1)``) give Eq. 7 written plainly with ``torch.where``, down to the sign of
    zero, for any epsilon."""
    scales = None if lambdas_ is None else torch.tensor(lambdas_[: deltas.shape[0]])
    got = get_method("ram").rule(deltas, RAMParams(epsilon=epsilon), ChunkContext(scales))
    mask = deltas.abs() > epsilon
    kept = torch.where(mask, deltas, 0.0)
    count, total = mask.sum(0), kept.sum(0) if deltas.shape[0] < 5 else None
    if total is None:  # agent order, as the rule sums (see agent_sum)
        total = kept[0].clone()
        for row in kept[1:]:
            total += row
    unique = total if scales is None else scales @ kept
    expected = torch.where(count >= 2, total / count, unique)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@given(sparse_deltas(), st.randoms(), st.sampled_from(RAM_FAMILY + ("linear", "ties")))
def test_agent_order_does_not_matter(deltas, rnd, method):
    order = list(range(deltas.shape[0]))
    rnd.shuffle(order)
    # shared means add in another order: equal up to float32 rounding of the sums
    permuted, original = run(method, deltas[order]), run(method, deltas)
    torch.testing.assert_close(permuted, original, rtol=1e-6, atol=1e-6)


@given(sparse_deltas(), sparse_deltas())
def test_scopes_differ_exactly_where_counts_differ(first, second):
    n = min(first.shape[0], second.shape[0])
    first, second = first[:n], second[:n]
    hist_first = overlap_histogram(change_mask(first, EPS))
    whole = hist_first + overlap_histogram(change_mask(second, EPS))
    params = get_method("ram_plus").make_params({})
    tensor_scope = run("ram_plus", first, hist=hist_first)
    global_scope = run("ram_plus", first, hist=whole)
    lam_tensor = get_method("ram_plus").scales(hist_first, params).float()
    lam_global = get_method("ram_plus").scales(whole, params).float()
    mask = change_mask(first, EPS)
    unique = mask & (mask.sum(0) == 1)
    # an element can differ only if it is unique to an agent whose lambda differs between scopes
    may_differ = (unique & (lam_tensor != lam_global)[:, None]).any(0)
    assert torch.equal(tensor_scope[~may_differ], global_scope[~may_differ])
    changed_by = unique & (first != 0)
    must_differ = (changed_by & (lam_tensor != lam_global)[:, None]).any(0)
    assert (tensor_scope[must_differ] != global_scope[must_differ]).all()


def rule_at_dense(method: str, deltas: torch.Tensor, scales, order=None) -> torch.Tensor:
    """``rule_at`` given each agent's nonzero deltas (stored positions may include exact
    zeros and sub-threshold noise too: every row's nonzero and ``order`` positions), scattered
    back into a dense merged delta."""
    spec = get_method(method)
    params = spec.make_params({})
    changes = []
    for row in deltas:
        positions = torch.nonzero(row != 0).flatten()
        if order is not None:  # some stored positions hold an unchanged value
            positions = torch.unique(torch.cat([positions, order]))
        changes.append((positions, row[positions]))
    pieces = spec.rule_at(changes, deltas.shape[1], params, ChunkContext(scales))
    assert len(pieces) == len(changes)  # per agent, the merged delta where it changed
    dense, written = torch.zeros(deltas.shape[1]), torch.zeros(deltas.shape[1], dtype=torch.bool)
    for (positions, _), (keep, merged) in zip(changes, pieces, strict=True):
        at = positions if keep is None else positions[keep]
        assert at.unique().numel() == at.numel() == merged.numel()  # each position once
        again = written[at]  # a shared position: every agent gives it the same bits
        assert torch.equal(dense[at][again].view(torch.int32), merged[again].view(torch.int32))
        dense[at], written[at] = merged, True
    return dense


def test_rule_at_by_hand():
    """Eq. 7 from positions: unique -> lambda_t * tau_t, shared -> the mean, the rest absent."""
    deltas = torch.tensor([[0.5, 1.0, 0.0, 5e-6, 2.0], [0.0, 3.0, 0.0, 0.0, -2.0]])
    scales = torch.tensor([1.5, 1.0])
    expected = torch.tensor([0.75, 2.0, 0.0, 0.0, 0.0])
    assert torch.equal(rule_at_dense("ram_plus", deltas, scales), expected)
    assert torch.equal(rule_at_dense("ram", deltas, None), torch.tensor([0.5, 2, 0, 0, 0]))


@given(
    sparse_deltas(max_agents=9, max_n=60),
    st.sampled_from(RAM_FAMILY),
    st.lists(st.floats(1.0, 3.0, width=32), min_size=9, max_size=9),
    st.lists(st.integers(0, 59), max_size=10),
)
def test_rule_at_is_the_rule_bit_for_bit(deltas, method, lambdas_, extra):
    """The store path's rule from stored positions gives the dense rule's float32 numbers
    exactly, for up to 9 agents (torch sums 5 or more rows in another order than one by one),
    with stored positions that hold exact zeros or sub-threshold changes."""
    spec = get_method(method)
    scales = None if spec.scales is None else torch.tensor(lambdas_[: deltas.shape[0]])
    dense = spec.rule(deltas, spec.make_params({}), ChunkContext(scales))
    order = torch.tensor([i for i in extra if i < deltas.shape[1]], dtype=torch.int64)
    got = rule_at_dense(method, deltas, scales, order)
    assert torch.equal(got.view(torch.int32), dense.view(torch.int32))


@given(
    sparse_deltas(max_agents=9, max_n=60),
    st.sampled_from(RAM_FAMILY + ("linear", "task_arithmetic", "ties")),
    st.lists(st.booleans(), min_size=60, max_size=60),
)
def test_an_element_merges_the_same_in_any_chunk(deltas, method, picked):
    """An element's merged delta does not depend on the other elements of its chunk (how many
    candidates a checkpoint chunk has, a snapshot union, the chunk size), for any number of
    agents: sums over agents run in agent order (``agent_sum``)."""
    columns = torch.tensor(picked[: deltas.shape[1]])
    spec = get_method(method)
    p = spec.make_params({})
    scales = None
    if spec.scales is not None:  # the same lambdas for both, as a global rho gives
        scales = spec.scales(overlap_histogram(change_mask(deltas, EPS)), p).float()
    thresholds = torch.full((deltas.shape[0],), 0.3) if method == "ties" else None
    ctx = ChunkContext(scales, thresholds)
    whole, part = spec.rule(deltas, p, ctx), spec.rule(deltas[:, columns], p, ctx)
    assert torch.equal(whole[columns].view(torch.int32), part.view(torch.int32))


def test_kth_largest_single_chunk_equals_radix_path():
    values = torch.rand(2, 500)
    pieces = [(values, 200)]
    for k in (0, 1, 250, 500, 501, 700):
        assert kth_largest(lambda: pieces, k) == kth_largest(lambda: iter(pieces), k)


def test_kth_largest_counts_implicit_zeros():
    values = torch.tensor([[3.0, 0.5, 2.0], [1.0, 4.0, 0.25]])
    full = torch.cat([values, torch.zeros(2, 5)], 1)
    for k in range(1, 9):
        want = [row.kthvalue(8 - k + 1).values.item() for row in full]
        assert kth_largest(lambda: [(values[:, :2], 3), (values[:, 2:], 2)], k) == want
        assert kth_largest(lambda: [(values, 5)], k) == want
