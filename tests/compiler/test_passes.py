"""Each compiler pass: structure first, then numbers against the reference."""
import torch

import seqgraph as sg
from seqgraph.compiler.fuse_gate_matmuls import fuse_gate_matmuls
from seqgraph.compiler.hoist import classify
from seqgraph.compiler.hoist_loop_invariant_terms import hoist_loop_invariant_terms
from seqgraph.compiler.split_linear_over_concat import split_linear_over_concat
from seqgraph.compiler.interpret import evaluate
from seqgraph.compiler.simplify import simplify
from seqgraph.compiler.stepgraph import StepGraph


def _values(step, cell, B=3):
    torch.manual_seed(0)
    leaves = {}
    for n in cell.order:
        if n.op in ("input", "state", "context"):
            leaves[n.id] = torch.randn((B,) + n.shape, dtype=torch.float64)
        elif n.op == "param":
            leaves[n.id] = torch.randn(n.shape, dtype=torch.float64)
    env = evaluate(step.order(), leaves, dtype=torch.float64, device=torch.device("cpu"))
    return [env[r.id] for r in step.results]


def _same_values(before, after, cell):
    for a, b in zip(_values(before, cell), _values(after, cell)):
        torch.testing.assert_close(b, a)


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
    _same_values(before, after, cell)


def test_split_linear_over_concat_separates_input_and_state_parts():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(8, 5)(sg.concat([x, h])))})
    before = StepGraph.from_cell(cell)
    after = split_linear_over_concat(before)
    lins = [n for n in after.order() if n.op == "linear"]
    assert sorted(n.inputs[0].name for n in lins) == ["h", "x"]
    cls = classify(after.order())
    assert {cls[n.id] for n in lins} == {"hoisted", "step"}
    _same_values(before, after, cell)


def test_fuse_gate_matmuls_concatenates_weights_of_linears_sharing_an_operand():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    gates = [sg.Linear(5, 5, name=f"g{k}")(h) for k in range(3)]
    cell = sg.Cell([x], {h: sg.tanh(gates[0] + sg.Linear(3, 5)(x)) * gates[1] + gates[2]})
    before = StepGraph.from_cell(cell)
    after = fuse_gate_matmuls(before)
    lins = [n for n in after.order() if n.op == "linear" and n.inputs[0].op == "state"]
    assert len(lins) == 1 and lins[0].shape == (15,)
    _same_values(before, after, cell)


def test_hoist_loop_invariant_terms_moves_bias_next_to_the_input_projection():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    b = sg.Parameter(5, name="b")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(3, 5, bias=False)(x) + sg.Linear(5, 5, bias=False)(h) + b)})
    before = StepGraph.from_cell(cell)
    after = hoist_loop_invariant_terms(before)
    cls = classify(after.order())
    step_adds = [n for n in after.order() if n.op == "add" and cls[n.id] == "step"]
    assert len(step_adds) == 1  # only hoisted + h W_h is left in the loop
    _same_values(before, after, cell)


def test_hoist_loop_invariant_terms_sums_the_biases_once_before_adding_them_to_the_projection():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(3, 5)(x) + sg.Linear(5, 5)(h))})  # a bias on each side
    before = StepGraph.from_cell(cell)
    after = hoist_loop_invariant_terms(before)
    cls = classify(after.order())
    hoisted_adds = [n for n in after.order() if n.op == "add" and cls[n.id] == "hoisted"]
    assert len(hoisted_adds) == 1 and hoisted_adds[0].inputs[0].op == "linear"  # x W + (b_x + b_h)
    biases = hoisted_adds[0].inputs[1]
    assert biases.op == "add" and [i.op for i in biases.inputs] == ["param", "param"]
    _same_values(before, after, cell)
