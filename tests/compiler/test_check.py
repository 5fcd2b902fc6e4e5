"""Error-message tests for the checker and the DSL: the exact text matters.

Every GraphError names the offending node in the user's terms and the file:line where the user
created it, which here is this file. `here()` returns "test_check.py:<line of the caller>", so
`x, at_x = sg.Input(4, name="x"), here()` records the line that built `x`.
"""
from __future__ import annotations

import inspect
import os

import pytest

import seqgraph as sg


def here(offset: int = 0) -> str:
    """`test_check.py:<line>` of the line that calls here() (plus `offset` lines: `here(1)` names the
    next line, for statements that raise before they could record their own line)."""
    frame = inspect.currentframe().f_back
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno + offset}"


def test_here_names_this_file_and_line():
    assert here() == f"test_check.py:{inspect.currentframe().f_lineno}"
    assert here(1) == f"test_check.py:{inspect.currentframe().f_lineno + 1}"


def test_unused_input_names_it_and_its_line():
    x, at_x = sg.Input(4, name="x"), here()
    y = sg.Input(3, name="y")
    h = sg.State(5, name="h")
    h_next = sg.tanh(sg.Linear(3 + 5, 5)(sg.concat([y, h])))
    with pytest.raises(sg.WiringError) as err:
        sg.Cell(inputs=[x, y], states={h: h_next})
    assert str(err.value) == f"Input 'x' (declared at {at_x}) is not used by any output or next state"
    assert err.value.node is x


def test_state_read_without_next_value():
    x = sg.Input(4, name="x")
    h = sg.State(4, name="h")
    c, at_c = sg.State(4, name="c"), here()
    h_next = sg.tanh(x + h + c)
    with pytest.raises(sg.WiringError) as err:
        sg.Cell(inputs=[x], states={h: h_next})
    assert str(err.value) == (f"State 'c' (declared at {at_c}) is read but has no next value; "
                              "add it to states={prev: next}")
    assert err.value.node is c


def test_next_value_shape_mismatch_names_state_and_value():
    x = sg.Input(4, name="x")
    h, at_h = sg.State(6, name="h"), here()
    h_next, at_next = sg.Linear(4 + 6, 5, name="proj")(sg.concat([x, h])), here()
    with pytest.raises(sg.ShapeError) as err:
        sg.Cell(inputs=[x], states={h: h_next})
    assert str(err.value) == (f"State 'h' (declared at {at_h}) has shape (B,6) but its next value "
                              f"Linear 'proj' (declared at {at_next}) has shape (B,5) float")
    assert err.value.node is h_next


def test_next_value_without_batch_is_a_shape_error():
    x = sg.Input(4, name="x")
    h, at_h = sg.State(4, name="h"), here()
    w, at_w = sg.Parameter(4, name="w"), here()
    with pytest.raises(sg.ShapeError) as err:
        sg.Cell(inputs=[x], states={h: w}, outputs=[x + h])
    assert str(err.value) == (f"the next value of State 'h' (declared at {at_h}), Parameter 'w' (declared at "
                              f"{at_w}), does not depend on the batch (it is a parameter or constant); a state's "
                              f"next value must be a per-example value of shape (B,4)")


def test_a_parameter_named_as_a_state_is_a_wiring_error():
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    p = sg.Parameter(4, name="h")
    with pytest.raises(sg.WiringError, match=r"two leaves are named 'h': State 'h' .* and Parameter 'h'"):
        sg.Cell(inputs=[x], states={h: sg.tanh(x + h * p)})


def test_input_used_but_not_declared():
    x = sg.Input(4, name="x")
    y, at_y = sg.Input(4, name="y"), here()
    h = sg.State(4, name="h")
    with pytest.raises(sg.WiringError) as err:
        sg.Cell(inputs=[x], states={h: sg.tanh(x + y + h)})
    assert str(err.value) == f"Input 'y' (declared at {at_y}) is used but not listed in inputs=[...]"


def test_context_used_but_not_declared():
    x = sg.Input(4, name="x")
    mem, at_mem = sg.Context(4, name="mem"), here()
    with pytest.raises(sg.WiringError) as err:
        sg.Cell(inputs=[x], outputs=[x * mem], contexts=[])
    assert str(err.value) == f"Context 'mem' (declared at {at_mem}) is used but not listed in contexts=[...]"


def test_unused_chunk_piece_names_the_chunk_line():
    x = sg.Input(8, name="x")
    h = sg.State(4, name="h")
    (a, b), at_chunk = sg.chunk(x, 2), here()
    with pytest.raises(sg.WiringError) as err:
        sg.Cell(inputs=[x], states={h: sg.tanh(a + h)})
    assert str(err.value) == (f"piece 1 of the chunk/split declared at {at_chunk} is never used "
                              "(pieces used: 1 of 2); use sg.narrow to take only part of a value")
    assert err.value.node is b


def test_unused_split_piece_is_reported_like_a_chunk_piece():
    x = sg.Input(6, name="x")
    (_, b, c), at_split = sg.split(x, [1, 2, 3]), here()
    with pytest.raises(sg.WiringError, match=f"piece 0 of the chunk/split declared at {at_split} is never used "
                                             r"\(pieces used: 2 of 3\)"):
        sg.Cell(inputs=[x], outputs=[sg.concat([b, c])])


def test_narrow_may_leave_the_rest_unused():
    x = sg.Input(6, name="x")
    cell = sg.Cell(inputs=[x], outputs=[sg.narrow(x, -1, 2, 3)])
    assert cell.outputs[0].shape == (3,)


def test_duplicate_leaf_names():
    x1, at_1 = sg.Input(4, name="x"), here()
    x2, at_2 = sg.Input(4, name="x"), here()
    with pytest.raises(sg.WiringError) as err:
        sg.Cell(inputs=[x1, x2], outputs=[x1 + x2])
    assert str(err.value) == (f"two leaves are named 'x': Input 'x' (declared at {at_1}) and "
                              f"Input 'x' (declared at {at_2})")


def test_duplicate_module_names():
    x = sg.Input(4, name="x")
    g1, at_1 = sg.Linear(4, 4, name="gate"), here()
    g2, at_2 = sg.Linear(4, 4, name="gate"), here()
    with pytest.raises(sg.WiringError) as err:
        sg.Cell(inputs=[x], outputs=[g1(x) + g2(x)])
    assert str(err.value).startswith(f"two modules are named 'gate': one declared at {at_1} and one at {at_2}; "
                                     f"rename one")


def test_state_listed_twice():
    x = sg.Input(4, name="x")
    h, at_h = sg.State(4, name="h"), here()
    with pytest.raises(sg.WiringError) as err:
        sg.Cell(inputs=[x], states=[(h, x + h), (h, x * h)])
    assert str(err.value) == f"State 'h' (declared at {at_h}) appears twice in states="


def test_output_that_is_a_parameter():
    x = sg.Input(4, name="x")
    w, at_w = sg.Parameter(4, name="w"), here()
    with pytest.raises(sg.ShapeError) as err:
        sg.Cell(inputs=[x], outputs=[x * w, w])
    assert str(err.value) == (f"output Parameter 'w' (declared at {at_w}) does not depend on the batch "
                              "(it is a parameter or constant); an output must be a per-step value")


def test_linear_feature_mismatch_names_module_line_and_input():
    x = sg.Input(64, name="x")
    gate, at_gate = sg.Linear(128, 32, name="gate_i"), here()
    with pytest.raises(sg.ShapeError) as err:
        gate(x)
    at_call = f"{at_gate.rsplit(':', 1)[0]}:{int(at_gate.rsplit(':', 1)[1]) + 2}"
    assert str(err.value) == (f"Linear 'gate_i' (declared at {at_gate}), called at {at_call}, expects 128 input "
                              f"features but its input 'x' has 64; a Linear has one "
                              "input size: use another Linear, or concat the inputs first")


def test_operand_shape_mismatch_names_op_line_and_operands():
    x = sg.Input(4, name="x")
    h = sg.State(5, name="h")
    with pytest.raises(sg.ShapeError) as err:
        at_add = here(1)
        x + h
    assert str(err.value) == (f"add (declared at {at_add}): cannot broadcast shapes (4,) and (5,) "
                              "[operands: 'x' (B,4), 'h' (B,5)]")


def test_chunk_that_does_not_divide():
    x = sg.Input(7, name="x")
    with pytest.raises(sg.ShapeError) as err:
        at = here(1)
        sg.chunk(x, 2)
    assert str(err.value) == (f"chunk (declared at {at}): 'x' has size 7 along dim -1, "
                              "which does not divide into 2 equal pieces")


def test_module_called_on_a_module_suggests_second_parentheses():
    lin, at_lin = sg.Linear(4, 4), here()
    with pytest.raises(TypeError) as err:
        lin(sg.Tanh())
    assert str(err.value) == (f"Linear (declared at {at_lin}) was called on the module Tanh, not on a node; "
                              "did you forget a second set of parentheses, e.g. Tanh(...)(x)?")


def test_function_given_a_module_suggests_calling_it():
    with pytest.raises(TypeError, match=r"sg.tanh got the module Sigmoid where a node was expected; "
                                        r"did you forget to call it on a node, e.g. Sigmoid\(...\)\(x\)\?"):
        sg.tanh(sg.Sigmoid())


def test_operator_with_a_module_suggests_second_parentheses():
    x = sg.Input(4, name="x")
    with pytest.raises(TypeError, match="did you forget a second set of parentheses"):
        x + sg.Tanh()


def test_iterating_a_node_suggests_chunk_and_names_its_line():
    x, at_x = sg.Input(8, name="x"), here()
    with pytest.raises(TypeError) as err:
        a, b = x
    text = str(err.value)
    assert "'x'" in text and "cannot be iterated" in text
    assert "use sg.chunk(node, n) or sg.split(node, sizes)" in text
    assert f"(declared at {at_x})" in text


def test_cell_with_nothing_to_compute():
    with pytest.raises(sg.WiringError) as err:
        at = here(1)
        sg.Cell(inputs=[], states={}, outputs=[])
    assert str(err.value) == f"Cell declared at {at} has no outputs and no states"


def test_graph_with_a_state_points_to_cell():
    x = sg.Input(4, name="x")
    h, at_h = sg.State(4, name="h"), here()
    with pytest.raises(sg.WiringError) as err:
        sg.Graph([x], [x + h])
    assert str(err.value) == f"State 'h' (declared at {at_h}) is a State, but a Graph has no time steps; use sg.Cell"


def test_graph_with_unused_input():
    x, at_x = sg.Input(4, name="x"), here()
    y = sg.Input(4, name="y")
    with pytest.raises(sg.WiringError) as err:
        sg.Graph([x, y], [sg.tanh(y)])
    assert str(err.value) == f"Input 'x' (declared at {at_x}) is not used by any output"


def test_graph_called_with_wrong_shape():
    a = sg.Input(4, name="a")
    g, at_g = sg.Graph([a], sg.tanh(a), name="g"), here()
    z, at_z = sg.Input(5, name="z"), here()
    with pytest.raises(sg.ShapeError) as err:
        at_call = here(1)
        g(z)
    assert str(err.value) == (f"Graph g (declared at {at_g}), called at {at_call}, expects input 'a' of shape (4,) "
                              f"float, but got Input 'z' (declared at {at_z}) of shape (5,) float")


def test_graph_called_with_wrong_number_of_inputs():
    a, b = sg.Input(4, name="a"), sg.Input(4, name="b")
    g, at_g = sg.Graph([a, b], a + b, name="pair"), here()
    with pytest.raises(sg.WiringError) as err:
        at_call = here(1)
        g(a)
    assert str(err.value) == f"Graph pair (declared at {at_g}) takes 2 inputs but was called with 1 at {at_call}"


def test_every_checker_error_is_a_graph_error():
    assert issubclass(sg.ShapeError, sg.GraphError) and issubclass(sg.WiringError, sg.GraphError)


def test_an_input_listed_twice_is_a_wiring_error():
    x, at_x = sg.Input(3, name="x"), here()
    h = sg.State(4, name="h")
    with pytest.raises(sg.WiringError) as err:
        sg.Cell(inputs=[x, x], states={h: sg.tanh(sg.Linear(7, 4)(sg.concat([x, h])))})
    assert str(err.value).startswith(f"Input 'x' (declared at {at_x}) appears twice in inputs=")


def test_a_state_that_is_its_own_next_value_warns_at_the_users_line():
    x, h, c = sg.Input(3, name="x"), sg.State(4, name="h"), sg.State(4, name="c")
    with pytest.warns(UserWarning, match=r"State 'c' .* is its own next value, so it never changes") as record:
        sg.Cell([x], {h: sg.tanh(sg.Linear(7, 4)(sg.concat([x, h]))) + c, c: c}); at = here()
    assert record[0].filename.endswith("test_check.py") and f"test_check.py:{record[0].lineno}" == at


def test_a_module_name_with_a_dot_names_the_module_and_its_line():
    x = sg.Input(3, name="x")
    lin, at = sg.Linear(3, 4, name="enc.gate"), here()
    with pytest.raises(sg.WiringError, match=rf"module name 'enc.gate' contains a '.'; choose another name for the Linear declared at {at}"):
        sg.Cell([x], outputs=[lin(x)])


def test_calling_a_graph_on_a_tensor_says_it_builds_graphs_from_nodes():
    a = sg.Input(4, name="a")
    g = sg.Graph([a], sg.tanh(a), name="squash")
    import torch
    with pytest.raises(TypeError, match=r"Graph squash .* is called on nodes, to build a graph; got a Tensor"):
        g(torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"got a Tensor among its inputs .*make it a cell without states"):
        g([torch.randn(2, 4)])


def test_a_value_of_another_cell_with_a_leaf_of_the_same_name_says_so():
    def make(prev=None):
        x, h = sg.Input(4, name="x"), sg.State(4, name="h")
        v = sg.tanh(sg.Linear(4, 4)(x) + h)
        return sg.Cell(inputs=[x], states={h: v if prev is None else v + prev}), v
    _, first = make()
    with pytest.raises(sg.WiringError, match=r"Input 'x' .* is used but not listed in inputs=\[...\]; the one listed "
                                             r"\(declared at .*\) is a different node of the same name, so this one "
                                             r"comes in with a value of another graph"):
        make(first)
