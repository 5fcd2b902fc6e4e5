"""Pass hoist_loop_invariant_terms: state-free terms of a sum are added before the loop."""
import seqgraph as sg
from seqgraph.compiler.hoist import classify
from seqgraph.compiler.hoist_loop_invariant_terms import hoist_loop_invariant_terms
from seqgraph.compiler.stepgraph import StepGraph

from pass_checks import same_values


def test_hoist_loop_invariant_terms_moves_bias_next_to_the_input_projection():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    b = sg.Parameter(5, name="b")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(3, 5, bias=False)(x) + sg.Linear(5, 5, bias=False)(h) + b)})
    before = StepGraph.from_cell(cell)
    after = hoist_loop_invariant_terms(before)
    cls = classify(after.order())
    step_adds = [n for n in after.order() if n.op == "add" and cls[n.id] == "step"]
    assert len(step_adds) == 1  # only hoisted + h W_h is left in the loop
    same_values(before, after, cell)


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
    same_values(before, after, cell)
