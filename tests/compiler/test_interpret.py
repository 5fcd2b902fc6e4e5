"""seqgraph/compiler/interpret.py: the reference interpreter every backend is compared with."""
import pytest
import torch

import seqgraph as sg
from seqgraph.compiler.interpret import evaluate, run_step

DT = torch.float64


def _cell():
    x, h = sg.Input(3, name="x"), sg.State(4, name="h")
    lin = sg.Linear(7, 4, name="step")
    h_next = sg.tanh(lin(sg.concat([x, h])))
    return sg.Cell([x], {h: h_next}, outputs=[h_next * 2.0]), lin


def test_run_step_computes_the_cells_equations_with_the_given_parameters():
    cell, _ = _cell()
    w, b = torch.randn(4, 7, dtype=DT), torch.randn(4, dtype=DT)
    x, h = torch.randn(2, 3, dtype=DT), torch.randn(2, 4, dtype=DT)
    outs, nxt = run_step(cell, [x], [h], [], [], {"step.weight": w, "step.bias": b}, dtype=DT,
                         device=torch.device("cpu"))
    want = torch.tanh(torch.cat([x, h], 1) @ w.T + b)
    torch.testing.assert_close(nxt[0], want)
    torch.testing.assert_close(outs[0], 2 * want)


def test_evaluate_uses_values_bound_to_inner_nodes_instead_of_computing_them():
    x = sg.Input(3, name="x")
    t = sg.tanh(x)
    y = t + 1.0
    env = evaluate([t, y.inputs[1], y], {t.id: torch.zeros(2, 3, dtype=DT)}, dtype=DT, device=torch.device("cpu"))
    assert torch.equal(env[y.id], torch.ones(2, 3, dtype=DT))


def test_evaluate_with_wanted_drops_values_nothing_later_reads():
    x = sg.Input(3, name="x")
    a = sg.tanh(x)
    b = sg.sigmoid(a)
    env = evaluate([x, a, b], {x.id: torch.randn(2, 3, dtype=DT)}, dtype=DT, device=torch.device("cpu"), wanted=[b])
    assert a.id not in env and b.id in env


def test_evaluate_names_an_unbound_leaf():
    x = sg.Input(3, name="x")
    with pytest.raises(KeyError, match="no value bound for leaf <input 'x'"):
        evaluate([x, sg.tanh(x)], {}, dtype=DT, device=torch.device("cpu"))
