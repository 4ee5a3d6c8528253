"""Model Breadcrumbs (mergekit's ``breadcrumbs``): hand-computed cases through the method's own
hooks, and hypothesis properties. (Streaming equals an in-memory reference in test_engine.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ram_trl.errors import InputError
from ram_trl.methods import ModelPlan, get_method
from ram_trl.methods.breadcrumbs import band


class InMemoryTensor:
    """One tensor's (N, n) deltas as ``prepare_tensor`` sees a streamed one: a single chunk."""

    def __init__(self, deltas) -> None:
        self.deltas = torch.as_tensor(deltas, dtype=torch.float32)
        self.name, self.device = "w", torch.device("cpu")
        self.numel = self.deltas.shape[1]
        self.agents = [f"agent{t}" for t in range(self.deltas.shape[0])]

    def chunks(self, *, sparse: bool = True):
        return [SimpleNamespace(start=0, deltas=self.deltas, numel=self.numel)]

    def magnitudes(self):
        return lambda: [(self.deltas.abs(), 0)]


def merged(method: str, deltas, **params) -> torch.Tensor:
    """The method's tensor hook, then its rule, on one in-memory tensor."""
    spec = get_method(method)
    p = spec.make_params(params)
    tensor = InMemoryTensor(deltas)
    ((chunk, ctx),) = spec.prepare_tensor(p, spec.prepare_model(p, None), tensor)
    return spec.rule(chunk.deltas, p, ctx)


def test_band_counts():
    assert band(10, 0.5, 0.1) == (1, 5)
    assert band(1000, 0.9, 0.01) == (10, 900)
    assert band(1000, 0.995, 0.01) == (5, 995)  # the top shrinks so that density is kept
    assert band(10, 0.9, 0.01) == (0, 9)  # 0.1 elements: nothing to remove from the top
    assert band(3, 0.2, 0.0) == (0, 1)  # kept rounds up: a small tensor keeps something
    assert band(4, 0.0, 0.5) == (2, 0)


def test_one_agent_by_hand():
    # 10 elements, density 0.5, gamma 0.1: remove the largest (2.0), keep the next 5 by
    # magnitude (0.5, 0.4, 0.3, 0.25, 0.2), drop the rest
    delta = [[0.1, -0.5, 0.3, 0.05, 0.0, 2.0, -0.2, 0.4, 0.15, 0.25]]
    out = merged("breadcrumbs", delta, density=0.5, gamma=0.1)
    assert out.tolist() == pytest.approx([0, -0.5, 0.3, 0, 0, 0, -0.2, 0.4, 0, 0.25])


def test_two_agents_summed_and_scaled_by_hand():
    # density 0.5, gamma 0.25 of 4 elements: remove each agent's largest, keep the next two
    deltas = [
        [4.0, -3.0, 2.0, 1.0],  # -> [0, -3, 2, 0]
        [-1.0, 0.5, 0.0, 2.0],  # -> [-1, 0.5, 0, 0]
    ]
    out = merged("breadcrumbs", deltas, density=0.5, gamma=0.25, scale=0.5)
    assert out.tolist() == pytest.approx([-0.5, -1.25, 1.0, 0.0])


def test_gamma_gives_way_to_density():
    # density 0.75 of 4 keeps 3, so only 1 of the gamma = 0.5 (2 elements) can go from the top
    out = merged("breadcrumbs", [[4.0, 3.0, 2.0, 1.0]], density=0.75, gamma=0.5)
    assert out.tolist() == [0.0, 3.0, 2.0, 1.0]


def test_ties_at_a_boundary_are_all_kept():
    # the top 1 and the next 1 are asked for, but three elements tie at magnitude 1
    out = merged("breadcrumbs", [[1.0, -1.0, 1.0, 0.5]], density=0.25, gamma=0.25)
    assert out.tolist() == [1.0, -1.0, 1.0, 0.0]


def test_zero_density_keeps_nothing():
    assert merged("breadcrumbs", [[1.0, 2.0], [3.0, 0.0]], density=0.0).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "params", [{"density": 1.5}, {"density": -0.1}, {"gamma": 2.0}, {"scale": float("inf")}]
)
def test_bad_parameters_are_refused(params):
    with pytest.raises(InputError, match="breadcrumbs"):
        get_method("breadcrumbs").make_params(params)


# --- hypothesis properties -------------------------------------------------------------------


@st.composite
def deltas(draw, max_agents: int = 4, max_n: int = 40) -> torch.Tensor:
    n_agents = draw(st.integers(1, max_agents))
    n = draw(st.integers(1, max_n))
    atoms = st.sampled_from([0.0, 0.0, 5e-6, -1e-5, 0.25, -0.25, 0.5, 1.0, -3.0, 7.0])
    values = draw(st.lists(atoms, min_size=n_agents * n, max_size=n_agents * n))
    return torch.tensor(values, dtype=torch.float32).reshape(n_agents, n)


fractions = st.floats(0.0, 1.0)


@given(deltas(), fractions, fractions)
def test_each_agent_keeps_a_magnitude_band(d, density, gamma):
    """Per agent: kept elements form a band of magnitudes (nothing kept lies above a removed
    element of the top or below a dropped one), at least ``kept`` of them, and nothing else is
    touched."""
    top, kept = band(d.shape[1], density, gamma)
    for row in d:
        out = merged("breadcrumbs", row[None], density=density, gamma=gamma)
        assert torch.equal(out[out != 0], row[out != 0])  # kept deltas are the agent's own
        size = row.abs()
        ranked = size.sort(descending=True).values
        lo = ranked[top + kept - 1] if kept else torch.inf
        hi = ranked[min(top, len(ranked) - 1)] if top else torch.inf  # top = numel: kept = 0
        band_mask = (size >= lo) & (size <= hi)
        assert torch.equal(out, torch.where(band_mask, row, 0.0))
        assert int(band_mask.sum()) >= kept


@given(deltas())
def test_full_density_and_no_outliers_is_task_arithmetic(d):
    got = merged("breadcrumbs", d, density=1.0, gamma=0.0, scale=0.7)
    torch.testing.assert_close(got, merged("task_arithmetic", d, scale=0.7))


@given(deltas(), st.randoms(), fractions, fractions)
def test_agent_order_does_not_matter(d, rnd, density, gamma):
    order = list(range(d.shape[0]))
    rnd.shuffle(order)
    got = merged("breadcrumbs", d[order], density=density, gamma=gamma)
    want = merged("breadcrumbs", d, density=density, gamma=gamma)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@given(deltas())
def test_elements_no_agent_changed_stay_zero(d):
    untouched = (d == 0).all(0)
    assert (merged("breadcrumbs", d)[untouched] == 0).all()


def test_plan_is_empty():
    spec = get_method("breadcrumbs")
    assert spec.prepare_model(spec.make_params({}), None) == ModelPlan()
    assert not spec.needs_counts and spec.change_epsilon(spec.make_params({})) is None
