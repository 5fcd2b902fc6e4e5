"""Pass flatten_per_example_matrices: per-example matrix-vector products, as users write them,
become matvec / vecmat over the matrix flattened to a row; elementwise ops on matrices inside
the loop work on flat rows where their neighbours do; the values stay the same."""
import pytest

import seqgraph as sg
from seqgraph.compiler.flatten_per_example_matrices import flatten_per_example_matrices
from seqgraph.compiler.hoist import classify
from seqgraph.compiler.pipeline import compile_plan
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
    after = simplify(flatten_per_example_matrices(before))
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
    assert "flatten_per_example_matrices: 2 product(s) and sum(s) of per-example matrices became" in after.notes[-2]


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
    assert mv.name == "scores" and mv.site.path.endswith("test_flatten_per_example_matrices.py")


def _additive(score=lambda e: sg.sum(e, dim=-1), query_shape=None):
    """Additive attention over a (4, 6) memory: tanh(keys + query), scored by `score`."""
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    memory = sg.Context((4, 6), name="memory")
    keys = sg.Linear(6, 6, bias=False, name="keys")(memory)
    query = sg.Linear(5, 6, name="query")(h)
    e = sg.tanh(keys + (sg.unsqueeze(query, 0) if query_shape is None else sg.reshape(query, query_shape)))
    weights = sg.softmax(sg.reshape(score(e), (4,)))
    read = sg.sum(memory * sg.unsqueeze(weights, -1), dim=0)
    h2 = sg.tanh(sg.Linear(3 + 6, 5)(sg.concat([x, read])) + h)
    return sg.Cell([x], {h: h2}, [h2])


@pytest.mark.parametrize("score", [lambda e: sg.sum(e, dim=-1), lambda e: sg.Linear(6, 1, bias=False)(e),
                                   lambda e: sg.Linear(6, 1)(e),
                                   lambda e: sg.sum(e * sg.Parameter(6, name="v"), dim=1, keepdim=True)],
                         ids=["sum", "one-column linear", "one-column linear with a bias", "weighted sum"])
def test_additive_attention_computes_its_matrices_on_flat_rows(score):
    after = _flattened(_additive(score))
    in_step = [n for n in after.order() if classify(after.order())[n.id] == "step"]
    assert [n.op for n in in_step if len(n.shape) > 1] == []
    assert {"tile", "tanh", "vecmat"} <= {n.op for n in in_step}
    assert " 0 elementwise op(s)" not in after.notes[-2]


@pytest.mark.parametrize("query_shape", [(6,), (1, 6)], ids=["vector", "row"])
def test_an_operand_broadcast_along_the_rows_is_tiled(query_shape):
    after = _flattened(_additive(query_shape=query_shape))
    (spread,) = [n for n in after.order() if n.op == "tile"]
    assert spread.attrs["times"] == 4 and spread.shape == (24,)


def test_an_operand_broadcast_along_the_columns_has_each_value_repeated():
    x, h, memory = sg.Input(2, name="x"), sg.State(4, name="h"), sg.Context((4, 6), name="memory")
    out = sg.sum(sg.tanh(memory * sg.unsqueeze(sg.Linear(4, 4)(h), -1)), dim=1)
    after = _flattened(sg.Cell([x], {h: sg.tanh(out + sg.Linear(2, 4)(x))}, [out]))
    (spread,) = [n for n in after.order() if n.op == "repeat_each"]
    assert spread.attrs["times"] == 6 and spread.inputs[0].shape == (4,)
    assert "sum_groups" in _ops(after)


def test_an_elementwise_op_between_matrix_ops_that_stay_matrices_is_not_flattened():
    # (a product with a parameter matrix is a GEMM's; a softmax down the columns keeps its matrix)
    x, h, memory = sg.Input(2, name="x"), sg.State(6, name="h"), sg.Context((4, 6), name="memory")
    mixed = sg.matmul(memory, sg.Parameter((6, 6), name="w")) + sg.unsqueeze(h, 0)
    out = sg.sum(sg.softmax(mixed, dim=0) * memory, dim=0)
    after = _flattened(sg.Cell([x], {h: sg.tanh(out + sg.Linear(2, 6)(x))}, [out]))
    assert "tile" not in _ops(after) and "0 elementwise op(s)" in after.notes[-2]


def test_multi_head_attention_has_no_per_example_matrix_left_in_the_step():
    after = _flattened(ZOO["multihead_attention"]())
    assert [n.op for n in after.order() if n.op != "reshape" and any(len(i.shape) > 1 and i.batched
                                                                     for i in n.inputs)] == []
    assert _ops(after).count("strided_matmul") == 2 and _ops(after).count("softmax_groups") == 1


def _heads_cell(result_of, S=5, heads=2, Dh=3):
    """A cell whose output is result_of(queries (heads, 1, Dh), keys (heads, S, Dh)), the keys a
    view of the memory (S, heads * Dh) as a Transformer splits it."""
    x, h = sg.Input(2, name="x"), sg.State(heads * Dh, name="h")
    memory = sg.Context((S, heads * Dh), name="memory")
    keys = sg.transpose(sg.reshape(memory, (S, heads, Dh)), 0, 1)
    queries = sg.reshape(sg.Linear(heads * Dh, heads * Dh)(h), (heads, 1, Dh))
    out = result_of(queries, keys)
    flat = sg.reshape(out, (out.elements,))
    nxt = sg.tanh(sg.Linear(flat.shape[0], heads * Dh)(flat) + sg.Linear(2, heads * Dh)(x))
    return sg.Cell([x], {h: nxt}, [flat])


@pytest.mark.parametrize("result_of", [
    lambda q, k: sg.matmul(sg.softmax(sg.matmul(q, sg.transpose(k))), k),
    lambda q, k: sg.matmul(k, sg.transpose(q)),
    lambda q, k: sg.matmul(sg.transpose(k, 1, 2), sg.transpose(sg.matmul(q, sg.transpose(k)), 1, 2)),
    lambda q, k: sg.matmul(sg.reshape(q, (2, 3)), sg.transpose(sg.reshape(sg.transpose(k, 0, 1), (10, 3)))),
    # (a transpose that moves only a dim of size 1 keeps the row-major order: reshaped freely)
    lambda q, k: sg.matmul(sg.reshape(sg.transpose(sg.reshape(q, (1, 6))), (2, 3)),
                           sg.transpose(sg.reshape(sg.transpose(k, 0, 1), (10, 3)))),
], ids=["attention over heads", "keys times queries", "transposed operands", "2-D views of the stacks",
        "a transposed row reshaped"])
def test_a_product_of_two_per_example_matrices_reads_their_rows_through_strides(result_of):
    after = _flattened(_heads_cell(result_of))
    assert "strided_matmul" in _ops(after) and "matmul" not in _ops(after)


def test_the_plan_writes_an_output_of_per_example_matrices_as_its_flat_row():
    from seqgraph.compiler.pipeline import compile_plan
    plan = compile_plan(_heads_cell(lambda q, k: sg.softmax(sg.matmul(q, sg.transpose(k)))))
    assert [o.shape for o in plan.step.outputs] == [(10,)]  # (the compiled module gives back (2, 1, 5))


def test_a_view_that_would_need_a_copy_keeps_its_matmul():
    # (the transposed keys reshaped to other dims are no strides over the memory's row)
    after = _flattened(_heads_cell(lambda q, k: sg.matmul(sg.reshape(sg.transpose(k), (2, 5, 3)), sg.transpose(q))))
    assert "matmul" in _ops(after) and "strided_matmul" not in _ops(after)


def test_a_product_of_two_matrices_before_the_loop_stays_torchs():
    x, h, memory = sg.Input(2, name="x"), sg.State(4, name="h"), sg.Context((4, 6), name="memory")
    gram = sg.matmul(memory, sg.transpose(memory))  # (once per call: a batched GEMM does better)
    out = sg.squeeze(sg.matmul(gram, sg.unsqueeze(h, -1)), -1)
    after = _flattened(sg.Cell([x], {h: sg.tanh(out + sg.Linear(2, 4)(x))}, [out]))
    assert "strided_matmul" not in _ops(after) and "matmul" in _ops(after)


def test_an_elementwise_op_read_by_a_softmax_over_the_matrix_is_not_flattened():
    after = _flattened(_cell(lambda m, q, w: sg.reshape(sg.softmax(m + sg.unsqueeze(q, 0), dim=0), (24,))))
    assert "tile" not in _ops(after)


@pytest.mark.parametrize("d0,d1", [(0, 0), (1, -1), (0, -2)])
def test_a_transpose_of_a_dim_with_itself_is_no_transpose(d0, d1):
    # (the memory is square: the product has the shape of a transposed one; found by a review)
    q, h, memory = sg.Input(3, name="q"), sg.State(1, name="h"), sg.Context((3, 3), name="memory")
    out = sg.matmul(sg.unsqueeze(q, 0), sg.transpose(memory, d0, d1))
    cell = sg.Cell([q], {h: h + sg.sum(sg.reshape(out, (3,)), keepdim=True)}, [out])
    before = StepGraph.from_cell(cell)
    after = flatten_per_example_matrices(before)
    assert [n.op for n in after.order() if n.op in ("matvec", "vecmat")] == ["vecmat"]
    same_values(before, after, cell)


def test_a_sum_of_a_matrix_that_stays_a_matrix_is_left_as_written():
    # (a softmax along the rows keeps its matrix: a flat sum of it would need a reshape of its own)
    x, h, memory = sg.Input(2, name="x"), sg.State(6, name="h"), sg.Context((4, 6), name="memory")
    weights = sg.softmax(memory * sg.unsqueeze(h, 0), dim=0)
    out = sg.sum(weights, dim=1)
    after = _flattened(sg.Cell([x], {h: sg.tanh(sg.Linear(4, 6)(out) + sg.Linear(2, 6)(x))}, [out]))
    assert "sum_groups" not in _ops(after) and "sum" in _ops(after)


@pytest.mark.parametrize("scores", [
    lambda m, q: sg.squeeze(sg.matmul(m, sg.unsqueeze(q, -1)) * 0.125, -1),
    lambda m, q: sg.squeeze(sg.sum(m * sg.unsqueeze(q, 0), dim=1, keepdim=True) + 1.0, -1),
], ids=["a product scaled before the squeeze", "a keepdim sum shifted"])
def test_an_elementwise_op_on_a_rewritten_products_column_works_on_the_flat_row(scores):
    x, h, memory = sg.Input(2, name="x"), sg.State(6, name="h"), sg.Context((4, 6), name="memory")
    weights = sg.softmax(scores(memory, h))
    read = sg.sum(memory * sg.unsqueeze(weights, -1), dim=0)
    after = _flattened(sg.Cell([x], {h: sg.tanh(read + sg.Linear(2, 6)(x))}, [weights]))
    step = classify(after.order())
    assert [n.op for n in after.order() if step[n.id] == "step" and len(n.shape) > 1] == []


def _fast_weights(D=3, I=2):
    """A linear-attention memory: C' = f C + v k^T, read as C' q."""
    x, C = sg.Input(I, name="x"), sg.State((D, D), name="C")
    k, v, q = (sg.Linear(I, D, name=n)(x) for n in "kvq")
    f = sg.sigmoid(sg.Linear(I, 1, name="f")(x))
    C2 = sg.unsqueeze(f, -1) * C + sg.matmul(sg.unsqueeze(v, -1), sg.unsqueeze(k, 0))
    return sg.Cell([x], {C: C2}, [sg.reshape(sg.matmul(C2, sg.unsqueeze(q, -1)), (D,))])


def test_a_matrix_state_is_carried_as_its_flat_row():
    after = _flattened(_fast_weights())
    (prev, nxt), = after.states
    assert prev.op == "state" and prev.name == "C" and prev.shape == (9,)
    assert nxt.shape == (9,) and nxt.op == "add"
    assert [n.op for n in after.order() if n.op != "reshape" and any(len(i.shape) == 2 and i.batched
                                                                     for i in n.inputs)] == []


def test_an_outer_product_of_per_step_vectors_is_computed_in_the_loop():
    after = _flattened(_fast_weights())
    assert "outer" in _ops(after) and "matmul" not in _ops(after)
    assert "matmul" in _ops(StepGraph.from_cell(_fast_weights()))  # (as written: a (3, 1) @ (1, 3) product)


def test_an_outer_product_read_only_before_the_loop_stays_there():
    x, h = sg.Input(2, name="x"), sg.State(3, name="h")
    k = sg.Linear(2, 3, name="k")(x)
    outer = sg.matmul(sg.unsqueeze(k, -1), sg.unsqueeze(k, 0))          # (3, 3), no state in it
    after = _flattened(sg.Cell([x], {h: h + sg.sum(outer, dim=0)}, [h]))
    cls = classify(after.order())
    (product,) = [n for n in after.order() if n.op == "matmul"]
    assert cls[product.id] == "hoisted"


@pytest.mark.parametrize("view,rows", [(lambda p: sg.tanh(sg.transpose(p)), 4), (lambda p: sg.narrow(p, 0, 1, 4), 5)],
                         ids=["transposed", "narrowed"])
def test_an_outer_product_read_through_a_transpose_or_slice_stays_before_the_loop(view, rows):
    x, h = sg.Input(2, name="x"), sg.State(4, name="h")
    a, b = sg.Linear(2, rows, name="a")(x), sg.Linear(2, 4, name="b")(x)
    Q = view(sg.matmul(sg.unsqueeze(a, -1), sg.unsqueeze(b, 0)))      # a (4, 4) view of the product
    h2 = sg.tanh(sg.reshape(sg.matmul(Q, sg.unsqueeze(h, -1)), (4,)) + h)
    plan = compile_plan(sg.Cell([x], {h: h2}, [h2]))
    assert [s.kind for s in plan.stages] == ["fused"]                # (a torch stage per view op if it moved in)
    assert [n.op for n in plan.hoisted if n.op == "matmul"] == ["matmul"]
