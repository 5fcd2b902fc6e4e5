"""Pass simplify: common subexpressions, folded constants, identities; values unchanged."""
import pytest
import torch

import seqgraph as sg
from seqgraph.compiler.simplify import simplify
from seqgraph.compiler.stepgraph import StepGraph

from pass_checks import same_values


def _cell_with_redundancy():
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    a = sg.tanh(x * 1.0 + h) + (2.0 * 3.0) * sg.tanh(x + h - 0.0)
    return sg.Cell([x], {h: a})


def test_simplify_merges_common_subexpressions_and_drops_identities():
    cell = _cell_with_redundancy()
    before = StepGraph.from_cell(cell)
    after = simplify(before)
    assert sum(n.op == "tanh" for n in after.order()) == 1
    assert not any(n.op == "sub" for n in after.order())
    consts = [n.attrs["value"] for n in after.order() if n.op == "const"]
    assert consts == [6.0]
    same_values(before, after, cell)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_zero_and_negative_zero_constants_stay_apart(backend):
    # 1 / (0 * x) and 1 / (-0 * x) are +inf and -inf for positive x: merging the two zeros,
    # or sharing compiled code between the two cells, would flip one sign
    def run(zero):
        x = sg.Input(3, name="x")
        y = sg.Input(3, name="y")
        cell = sg.Cell([x, y], outputs=[1.0 / (x * 0.0) + 1.0 / (y * zero)])
        rec = sg.Recurrence(cell) if backend == "reference" else sg.compile(sg.Recurrence(cell), backend=backend)
        return rec((torch.ones(1, 1, 3), torch.ones(1, 1, 3)))[0]
    assert (run(0.0) == float("inf")).all()  # +inf + +inf
    assert torch.isnan(run(-0.0)).all()  # +inf + -inf


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_adding_plus_zero_is_kept_since_it_turns_minus_zero_into_plus_zero(backend):
    x = sg.Input(3, name="x")
    rec = sg.Recurrence(sg.Cell([x], outputs=[1.0 / ((x * -0.0) + 0.0)]))  # -0 + 0 = +0: +inf
    xs = torch.ones(1, 1, 3)
    assert torch.equal(sg.compile(rec, backend=backend)(xs)[0], rec(xs)[0])
    assert (rec(xs)[0] == float("inf")).all()


def test_adding_minus_zero_and_subtracting_plus_zero_are_dropped():
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    cell = sg.Cell([x], {h: sg.tanh((x + -0.0) - 0.0 + h)})
    after = simplify(StepGraph.from_cell(cell))
    assert [n.op for n in after.order() if n.inputs] == ["add", "tanh"]


def test_a_transpose_of_a_dim_with_itself_is_dropped():
    x, h = sg.Input((2, 3), name="x"), sg.State(3, name="h")
    cell = sg.Cell([x], {h: sg.tanh(sg.sum(sg.transpose(x, 1, -1), dim=0) + h)})
    before = StepGraph.from_cell(cell)
    after = simplify(before)
    assert "transpose" not in [n.op for n in after.order()]
    same_values(before, after, cell)
