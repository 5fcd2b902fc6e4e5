"""Hypothesis properties over random cells (see tests/strategies.py): every valid cell builds,
runs through sg.Recurrence and passes float64 gradcheck of its sequence output with respect to
its inputs and initial states; every broken cell raises sg.GraphError and nothing else."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqgraph as sg
from strategies import BREAKAGES, broken_recipes, build_cell, cell_recipes

T, B = 3, 2
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EXPECTED_TEXT = {
    "unused_input": "is not used by any output or next state",
    "wrong_next_shape": "but its next value",
    "linear_mismatch": "input features but its input",
    "state_without_next": "is read but has no next value",
    "unused_chunk_piece": "of the chunk/split declared at",
}


@SETTINGS
@given(recipe=cell_recipes(), seed=st.integers(0, 2**16))
def test_random_valid_cell_runs_and_passes_gradcheck(recipe, seed):
    torch.manual_seed(seed)
    cell, input_sizes = build_cell(recipe)
    rec = sg.Recurrence(cell).double()
    xs = tuple(torch.randn(T, B, s, dtype=torch.float64, requires_grad=True) for s in input_sizes)
    h0 = tuple(torch.randn((B,) + p.shape, dtype=torch.float64, requires_grad=True) for p, _ in cell.states)
    names = cell.state_names

    def run(*args):
        out, fin = rec(args[:len(xs)], dict(zip(names, args[len(xs):])))
        return (out, *fin.values())

    out = run(*xs, *h0)
    assert out[0].shape == (T, B, cell.outputs[0].shape[0])
    assert torch.autograd.gradcheck(run, xs + h0, eps=1e-6, atol=1e-5)


@SETTINGS
@given(recipe=broken_recipes())
def test_random_broken_cell_raises_graph_error(recipe):
    with pytest.raises(sg.GraphError) as err:
        build_cell(recipe)
    assert EXPECTED_TEXT[recipe.breakage] in str(err.value)


def test_every_breakage_has_an_expected_message():
    assert set(EXPECTED_TEXT) == set(BREAKAGES)
