"""Pass hoist_previous_inputs: a state whose next value is a per-step input is read as that
input delayed by a step, so products of it are hoisted."""
import seqgraph as sg
from seqgraph.compiler.hoist_previous_inputs import hoist_previous_inputs
from seqgraph.compiler.stepgraph import StepGraph


def _delay_cell(next_of_prev=None):
    x, h, p = sg.Input(3, name="x"), sg.State(4, name="h"), sg.State(3, name="x_prev")
    h2 = sg.tanh(sg.Linear(3, 4, name="a")(x) + sg.Linear(3, 4, name="b")(p) + sg.Linear(4, 4, name="c")(h))
    return sg.Cell([x], {h: h2, p: x if next_of_prev is None else next_of_prev(x)}, [h2])


def test_readers_of_a_state_holding_the_previous_input_read_a_new_input():
    step = hoist_previous_inputs(StepGraph.from_cell(_delay_cell()))
    assert len(step.inputs) == 2
    prev = step.inputs[1]
    assert prev.op == "input" and prev.attrs == {"previous_of": 0, "state": 1} and prev.name == "x_prev"
    readers = [n for n in step.order() if any(i is prev for i in n.inputs)]
    assert [n.op for n in readers] == ["linear"]
    assert step.states[1][1] is step.inputs[0]  # the state stays: its next value is still x
    assert not any(i is step.states[1][0] for n in step.order() for i in n.inputs)
    assert "1 state(s) holding the previous step's input" in step.notes[-1]


def test_a_state_whose_next_value_is_not_the_input_itself_is_left_alone():
    step = hoist_previous_inputs(StepGraph.from_cell(_delay_cell(lambda x: x * 2.0)))
    assert len(step.inputs) == 1
    assert "0 state(s)" in step.notes[-1]


def test_the_product_of_the_previous_input_is_hoisted():
    from seqgraph.compiler.pipeline import compile_plan
    plan = compile_plan(_delay_cell())
    assert sorted(n.name for n in plan.hoisted_gemms()) == ["a", "b"]
    assert [n.name for n in plan.step_gemms()] == ["c"]


def test_a_state_holding_the_state_before_reads_the_input_delayed_by_two_steps():
    x, h, p, q = sg.Input(3, name="x"), sg.State(4, name="h"), sg.State(3, name="p"), sg.State(3, name="q")
    h2 = sg.tanh(sg.Linear(3, 4)(q) + sg.Linear(4, 4)(h))
    step = hoist_previous_inputs(StepGraph.from_cell(sg.Cell([x], {h: h2, q: p, p: x}, [h2])))
    assert [(i.name, i.attrs) for i in step.inputs[1:]] == [("p", {"previous_of": 0, "state": 2}),
                                                            ("q", {"previous_of": 1, "state": 1})]


def test_a_state_nothing_reads_gets_no_delayed_input():
    x, h, last = sg.Input(3, name="x"), sg.State(4, name="h"), sg.State(3, name="last")
    h2 = sg.tanh(sg.Linear(3, 4)(x) + sg.Linear(4, 4)(h))
    step = hoist_previous_inputs(StepGraph.from_cell(sg.Cell([x], {h: h2, last: x}, [h2])))
    assert len(step.inputs) == 1 and "0 state(s)" in step.notes[-1]


def test_the_first_state_of_a_chain_gets_a_delayed_input_where_only_the_second_is_read():
    x, h, p, q = sg.Input(3, name="x"), sg.State(4, name="h"), sg.State(3, name="p"), sg.State(3, name="q")
    h2 = sg.tanh(sg.Linear(3, 4)(q) + sg.Linear(4, 4)(h))
    step = hoist_previous_inputs(StepGraph.from_cell(sg.Cell([x], {h: h2, p: x, q: p}, [h2])))
    assert [i.name for i in step.inputs] == ["x", "p", "q"]
