"""Pass split_linear_over_concat: a linear over concat([input, state]) becomes one per part."""
import seqgraph as sg
from seqgraph.compiler.hoist import classify
from seqgraph.compiler.split_linear_over_concat import split_linear_over_concat
from seqgraph.compiler.stepgraph import StepGraph

from pass_checks import same_values


def test_split_linear_over_concat_separates_input_and_state_parts():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(8, 5)(sg.concat([x, h])))})
    before = StepGraph.from_cell(cell)
    after = split_linear_over_concat(before)
    lins = [n for n in after.order() if n.op == "linear"]
    assert sorted(n.inputs[0].name for n in lins) == ["h", "x"]
    cls = classify(after.order())
    assert {cls[n.id] for n in lins} == {"hoisted", "step"}
    same_values(before, after, cell)
