"""Pass flatten_matvecs: per-example matrix-vector products, as users write them, become
matvec / vecmat over the matrix flattened to a row, and compute the same values."""
import pytest

import seqgraph as sg
from seqgraph.compiler.flatten_matvecs import flatten_matvecs
from seqgraph.compiler.simplify import simplify
from seqgraph.compiler.stepgraph import StepGraph

from pass_checks import same_values
from zoo import ZOO


def _ops(step):
    return [n.op for n in step.order()]


def _on_matrices(step):
    """The ops left that compute on a per-example matrix (other than flattening it)."""
    return [n.op for n in step.order() if n.op != "reshape" and any(len(i.shape) == 2 for i in n.inputs)]


def _flattened(cell):
    before = StepGraph.from_cell(cell)
    after = simplify(flatten_matvecs(before))
    same_values(before, after, cell)
    return after


def _cell(result_of):
    """A cell whose output is result_of(memory (4, 6), query (6,), weights (4,))."""
    q, w = sg.Input(6, name="q"), sg.Input(4, name="w")
    memory = sg.Context((4, 6), name="memory")
    h = sg.State(1, name="h")  # (reads q and w whichever the result reads)
    return sg.Cell([q, w], {h: h + sg.sum(q, keepdim=True) + sg.sum(w, keepdim=True)}, [result_of(memory, q, w)])


def test_dot_product_attention_has_no_per_example_matrix_left_in_the_step():
    after = _flattened(ZOO["attention"]())
    assert _ops(after).count("matvec") == 1 and _ops(after).count("vecmat") == 1
    assert "matmul" not in _ops(after)
    in_step = [n for n in after.order() if n.inputs and len(n.shape) > 1]
    assert all(n.op == "context" or n.inputs[0].op == "context" for n in in_step)  # only memory itself
    assert "flatten_matvecs: 2 per-example matrix-vector product(s) became row ops" in after.notes[-2]


@pytest.mark.parametrize("form,op", [
    (lambda m, q, w: sg.squeeze(sg.matmul(m, sg.unsqueeze(q, -1)), -1), "matvec"),
    (lambda m, q, w: sg.matmul(m, sg.unsqueeze(q, -1)), "matvec"),
    (lambda m, q, w: sg.sum(m * sg.unsqueeze(q, 0), dim=1), "matvec"),
    (lambda m, q, w: sg.sum(q * m, dim=-1), "matvec"),
    (lambda m, q, w: sg.sum(m * sg.unsqueeze(w, -1), dim=0), "vecmat"),
    (lambda m, q, w: sg.sum(sg.unsqueeze(w, -1) * m, dim=0, keepdim=True), "vecmat"),
    (lambda m, q, w: sg.matmul(sg.unsqueeze(w, 0), m), "vecmat"),
    (lambda m, q, w: sg.reshape(sg.matmul(sg.transpose(m), sg.unsqueeze(w, -1)), (6,)), "vecmat"),
    (lambda m, q, w: sg.matmul(sg.unsqueeze(q, 0), sg.transpose(m)), "matvec"),
], ids=["matmul column", "matmul column kept", "sum over columns", "sum with a broadcast vector",
        "sum over rows", "sum over rows keepdim", "matmul row", "transposed matmul column",
        "matmul row transposed"])
def test_each_written_form_becomes_one_row_op_of_the_same_value(form, op):
    after = _flattened(_cell(form))
    assert op in _ops(after) and _on_matrices(after) == []


def test_a_parameter_matrix_is_left_to_a_gemm():
    weight = sg.Parameter((4, 6), name="weight")
    after = _flattened(_cell(lambda m, q, w: sg.squeeze(sg.matmul(weight, sg.unsqueeze(q, -1)), -1)))
    assert _on_matrices(after) == ["matmul"] and "matvec" not in _ops(after)


def test_a_sum_of_a_product_that_is_not_a_weighting_is_left_as_it_is():
    after = _flattened(_cell(lambda m, q, w: sg.sum(m * m, dim=0)))
    assert _on_matrices(after) == ["mul", "sum"] and "vecmat" not in _ops(after)


def test_the_row_ops_keep_the_users_name_and_line():
    cell = _cell(lambda m, q, w: sg.squeeze(sg.matmul(m, sg.unsqueeze(q, -1), name="scores"), -1))
    (mv,) = [n for n in _flattened(cell).order() if n.op == "matvec"]
    assert mv.name == "scores" and mv.site.path.endswith("test_flatten_matvecs.py")
