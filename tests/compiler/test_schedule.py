"""seqgraph/compiler/schedule.py: a step's nodes cut into GEMM, fused and fallback stages."""
import seqgraph as sg
from seqgraph.compiler.schedule import node_fusable, schedule


def _nodes(*outs):
    from seqgraph.compiler.ir import topo_order
    return [n for n in topo_order(list(outs)) if n.inputs]


def test_a_product_then_elementwise_ops_make_one_gemm_and_one_fused_stage():
    h = sg.State(4, name="h")
    g = sg.Linear(4, 8, bias=False)(h)
    a, b = sg.chunk(g, 2)
    y = sg.tanh(a) * sg.sigmoid(b)
    stages = schedule(_nodes(y), {y.id})
    assert [s.kind for s in stages] == ["gemm", "fused"]
    assert stages[0].outputs == [g] and stages[1].outputs == [y]
    assert g in stages[1].inputs


def test_elementwise_ops_on_both_sides_of_a_product_are_two_regions():
    h = sg.State(4, name="h")
    u = sg.tanh(h)
    v = sg.sigmoid(sg.Linear(4, 4, bias=False)(u))
    assert [s.kind for s in schedule(_nodes(v), {v.id})] == ["fused", "gemm", "fused"]


def test_an_op_on_a_per_example_matrix_falls_back_to_torch_and_says_why():
    m = sg.State((2, 3), name="m")
    t = sg.transpose(m)
    ok, why = node_fusable(t)
    assert not ok and "per-example shape (3, 2)" in why  # the first wide value: the transpose itself
    (stage,) = schedule(_nodes(t), {t.id})
    assert stage.kind == "torch" and "transpose: works on per-example shape" in stage.why


def test_only_values_used_later_are_stage_outputs():
    h = sg.State(4, name="h")
    inner = sg.tanh(h)
    y = inner * 2.0
    (stage,) = schedule(_nodes(y), {y.id})
    assert stage.outputs == [y]


def test_a_chain_over_outside_values_joins_the_region_after_the_product_when_that_saves_a_region():
    h, c = sg.State(4, name="h"), sg.State(4, name="c")
    gate = sg.sigmoid(sg.tanh(c))  # reads only a value from outside the step's nodes
    y = gate * sg.Linear(4, 4, bias=False)(h)
    stages = schedule(_nodes(y), {y.id})
    assert [s.kind for s in stages] == ["gemm", "fused"]
    assert {n.op for n in stages[1].nodes} == {"tanh", "sigmoid", "mul"}


def test_a_chain_over_outside_values_stays_in_the_first_region_when_moving_it_saves_none():
    h, c = sg.State(4, name="h"), sg.State(4, name="c")
    u = sg.tanh(h)  # the first region exists anyway: the product reads it
    gate = sg.sigmoid(sg.tanh(c))
    y = gate * sg.Linear(4, 4, bias=False)(u) + gate
    stages = schedule(_nodes(y), {y.id})
    assert [s.kind for s in stages] == ["fused", "gemm", "fused"]
    assert {n.op for n in stages[0].nodes} == {"tanh", "sigmoid"} and len(stages[0].nodes) == 3
