"""Generated region kernels: structure of the source, what is fused, and numbers against the
reference interpreter for regions cut from real cells and from their derivative graphs."""
import re

import pytest
import torch

import seqgraph as sg
from seqgraph.compiler import ops
from seqgraph.compiler.interpret import evaluate
from seqgraph.compiler.ops import REGISTRY, make
from seqgraph.kernels.codegen import generate, node_supported, region_from_outputs, region_supported
from seqgraph.kernels.launch import compile_region
from seqgraph.kernels.region import Region

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CUDA when present, else the interpreter

# The interpreter computes padded lanes too (zeros loaded past the row or column end), where
# x / 0 warns; stores and reductions mask them out.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def grad_leaf(node, name="g"):
    """A leaf standing for the incoming gradient of `node`."""
    return make("input", (), shape=node.shape, batched=node.batched, name=name)


def random_inputs(region, batch, positive=False):
    vals = []
    for n in region.inputs:
        if n.op == "const":
            vals.append(None)
            continue
        shape = ((batch,) if n.batched else ()) + n.shape
        t = torch.rand(shape) + 0.5 if positive else torch.randn(shape)
        vals.append(t.to(DEVICE))
    return vals


def reference(region, vals):
    leaves = {n.id: v.float().cpu() for n, v in zip(region.inputs, vals) if v is not None}
    consts = [n for n in region.inputs if n.op == "const"]
    env = evaluate(consts + region.nodes, leaves, dtype=torch.float32, device=torch.device("cpu"))
    return [env[o.id] for o in region.outputs]


def assert_matches_reference(region, batch=5, positive=False, atol=1e-5, rtol=1e-5):
    vals = random_inputs(region, batch, positive)
    got = compile_region(region)(vals)
    want = reference(region, vals)
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"output {k}"
        torch.testing.assert_close(g.cpu(), w, atol=atol, rtol=rtol, msg=lambda m: f"output {k}: {m}")


def lstm_region(hidden=6, features=5):
    x, h, c = sg.Input(features, name="x"), sg.State(hidden, name="h"), sg.State(hidden, name="c")
    xproj = sg.Linear(features, 4 * hidden, bias=False, name="xproj")(x)
    rec = sg.Linear(hidden, 4 * hidden, bias=False, name="rec")(h)
    bias = sg.Parameter(4 * hidden, name="bias")
    i, f, g, o = sg.chunk(xproj + rec + bias, 4)
    c_next = (sg.sigmoid(f) * c + sg.sigmoid(i) * sg.tanh(g)).named("c_next")
    h_next = (sg.sigmoid(o) * sg.tanh(c_next)).named("h_next")
    return region_from_outputs([h_next, c_next], [xproj, rec, bias, c], name="lstm")


def backward_region(outputs, inputs, wrt, name="backward"):
    """Reverse mode over the registry's VJP rules: the region computing d(outputs)/d(wrt) from
    incoming gradients of `outputs` and the forward inputs (the forward part is recomputed)."""
    gs = [grad_leaf(o, f"g_{o.label()}") for o in outputs]
    grads = {o.id: g for o, g in zip(outputs, gs)}
    for n in reversed(region_from_outputs(outputs, inputs).nodes):
        if n.id not in grads or n.op == "const":
            continue
        for a, ga in zip(n.inputs, REGISTRY[n.op].vjp(n, grads[n.id])):
            if ga is not None and a.op != "const":
                grads[a.id] = ops.add(grads[a.id], ga) if a.id in grads else ga
    return region_from_outputs([grads[w.id] for w in wrt], gs + list(inputs), name=name)


def vjp_region(node):
    """The gradients of `node`'s batched operands, from its VJP rule alone."""
    g = grad_leaf(node)
    grads = REGISTRY[node.op].vjp(node, g)
    outs = [gr for gr, a in zip(grads, node.inputs) if gr is not None and a.op != "const"]
    forward = [a for a in node.inputs if a.op != "const"]
    return region_from_outputs(outs, [g, node, *forward], name=f"vjp_{node.op}")


# ---------------------------------------------------------------------------------------
# building regions
# ---------------------------------------------------------------------------------------
def test_region_from_outputs_collects_the_nodes_between_inputs_and_outputs():
    x, p = sg.Input(4, name="x"), sg.Parameter(4, name="p")
    upstream = sg.tanh(x)
    mid = upstream * p
    out = sg.sigmoid(mid + 1.0)
    region = region_from_outputs([out], [upstream, p])
    assert [n.op for n in region.nodes] == ["mul", "const", "add", "sigmoid"]
    assert region.inputs == [upstream, p] and region.outputs == [out]


def test_region_from_outputs_rejects_a_leaf_that_is_not_an_input():
    x, p = sg.Input(4, name="x"), sg.Parameter(4, name="p")
    with pytest.raises(ValueError, match="'p'.*not among the region's inputs"):
        region_from_outputs([x * p], [x])


# ---------------------------------------------------------------------------------------
# the source
# ---------------------------------------------------------------------------------------
def test_every_computed_line_names_the_node_it_comes_from():
    region = lstm_region()
    source = generate(region).source
    body = source.split("# -- values --")[1].split("# -- stores --")[0].strip().splitlines()
    ids = {n.id for n in region.inputs + region.nodes}
    assert body
    for line in body:
        tag = re.search(r"# %(\d+) (\w+)", line)
        assert tag, line
        assert int(tag.group(1)) in ids


def test_chunks_of_an_input_are_loads_at_column_offsets():
    source = generate(lstm_region(hidden=6)).source
    assert "in0_ptr + rows * in0_rs + (cols_6 + 12) * in0_cs" in source
    assert "cols_24" not in source  # no tile of the whole (B, 4H) row is ever built


def test_a_concat_output_is_stored_piece_by_piece():
    a, b = sg.Input(3, name="a"), sg.Input(5, name="b")
    region = region_from_outputs([sg.concat([sg.tanh(a), sg.sigmoid(b)])], [a, b])
    source = generate(region).source
    assert "tl.store(out0_ptr + rows * 8 + cols_3," in source
    assert "tl.store(out0_ptr + rows * 8 + cols_5 + 3," in source


def test_a_pad_writes_zero_tiles_around_its_operand():
    g = sg.Input(4, name="g")
    padded = make("pad", (g,), dim=0, before=2, after=3)
    source = generate(region_from_outputs([padded], [g])).source
    assert "tl.zeros((BLOCK_ROWS, 2), tl.float32)" in source
    assert "tl.store(out0_ptr + rows * 9 + cols_4 + 2," in source


def test_a_constant_is_written_as_a_literal():
    x = sg.Input(3, name="x")
    region = region_from_outputs([x * 0.25 + float("inf")], [x])
    source = generate(region).source
    assert "0.25" in source and "float('inf')" in source and "in1_ptr" not in source


def test_constants_only_subexpressions_are_folded():
    x = sg.Input(3, name="x")
    two = ops.add(ops.const(1.5), ops.const(0.5))
    source = generate(region_from_outputs([x * two], [x])).source
    assert "(v0_x * 2.0)" in source


# ---------------------------------------------------------------------------------------
# what is fused and what is not
# ---------------------------------------------------------------------------------------
def test_layout_ops_are_fused_though_the_registry_marks_them_for_the_generator():
    x = sg.Input(6, name="x")
    a, b = sg.chunk(x, 2)
    for node in (a, sg.concat([b, a]), make("pad", (a,), dim=0, before=1, after=0), sg.reshape(x, (2, 3))):
        assert not ops.fusable(node)[0]
        assert node_supported(node) == (True, "")


def test_a_matrix_product_is_not_fused_and_says_why():
    x = sg.Input(4, name="x")
    lin = sg.Linear(4, 3, bias=False)
    y = lin(x)
    region = region_from_outputs([sg.tanh(y)], [x, lin.weight])
    ok, why = region_supported(region)
    assert not ok and "matrix products run through torch" in why
    with pytest.raises(NotImplementedError, match="matrix products run through torch"):
        generate(region)


def test_a_bias_gradient_summed_over_the_batch_is_not_fused():
    x, b = sg.Input(4, name="x"), sg.Parameter(4, name="b")
    y = x + b
    g = grad_leaf(y)
    _, gb = REGISTRY["add"].vjp(y, g)
    ok, why = region_supported(region_from_outputs([gb], [g]))
    assert not ok and "no batch dim" in why


def test_a_softmax_over_a_leading_dim_is_not_fused():
    x = sg.Input((3, 4), name="x")
    ok, why = region_supported(region_from_outputs([sg.softmax(x, dim=0)], [x]))
    assert not ok and "reduces a dim other than the last" in why


def test_a_broadcast_along_a_leading_dim_is_not_fused():
    x, p = sg.Input((2, 4), name="x"), sg.Parameter(4, name="p")
    ok, why = region_supported(region_from_outputs([x * p], [x, p]))
    assert not ok and "along a dim other than the row" in why


def test_compile_region_raises_not_implemented_for_an_unsupported_region():
    x = sg.Input((3, 4), name="x")
    with pytest.raises(NotImplementedError, match="cannot be fused"):
        compile_region(region_from_outputs([sg.transpose(x)], [x]))


def test_a_node_reading_a_value_outside_the_region_is_a_value_error():
    x, y = sg.Input(4, name="x"), sg.Input(4, name="y")
    region = Region(nodes=[x + y], inputs=[x], outputs=[])
    with pytest.raises(ValueError, match="neither an input nor computed earlier"):
        region_supported(region)


# ---------------------------------------------------------------------------------------
# numbers: regions of real cells
# ---------------------------------------------------------------------------------------
def test_lstm_step_matches_reference():
    assert_matches_reference(lstm_region(hidden=6), batch=7)


def test_gru_step_matches_reference():
    hidden = 5
    x, h = sg.Input(3, name="x"), sg.State(hidden, name="h")
    xp, hp = sg.Linear(3, 3 * hidden, name="wx")(x), sg.Linear(hidden, 3 * hidden, name="wh")(h)
    xr, xz, xn = sg.chunk(xp, 3)
    hr, hz, hn = sg.chunk(hp, 3)
    r, z = sg.sigmoid(xr + hr), sg.sigmoid(xz + hz)
    n = sg.tanh(xn + r * hn)
    h_next = (1.0 - z) * n + z * h
    # inputs: both GEMM outputs and both (3H,) biases, which the region slices
    region = region_from_outputs([h_next], [xp.inputs[0], xp.inputs[1], hp.inputs[0], hp.inputs[1], h])
    assert_matches_reference(region, batch=6)


def test_layer_norm_with_gain_and_bias_matches_reference():
    x = sg.Input(7, name="x")
    ln = sg.LayerNorm(7, name="ln")
    region = region_from_outputs([ln(x)], [x, ln.weight, ln.bias])
    assert_matches_reference(region, atol=1e-5)


def test_softmax_over_the_last_dim_matches_reference():
    x = sg.Input(10, name="x")
    assert_matches_reference(region_from_outputs([sg.softmax(x * 3.0)], [x]))


def test_unary_and_binary_math_matches_reference():
    x, y = sg.Input(9, name="x"), sg.Input(9, name="y")
    a = sg.maximum(sg.relu(x), sg.minimum(y, 0.3))
    b = sg.sqrt(sg.abs(x)) + sg.log(sg.abs(y) + 0.5) - sg.exp(sg.tanh(x * y))
    region = region_from_outputs([a, b / (1.0 + sg.abs(a))], [x, y])
    assert_matches_reference(region)


def test_parameters_and_scalars_broadcast_over_rows():
    x, q = sg.Input(6, name="x"), sg.Input((), name="q")  # q: one number per example
    p, s = sg.Parameter(6, name="p"), sg.Parameter((), name="s", init=0.5)
    y = x * p + s - q * 2.0
    region = region_from_outputs([y, q * s + 1.0], [x, q, p, s])
    assert_matches_reference(region)


def test_keepdim_and_dropped_dim_sums_match_reference():
    x = sg.Input(11, name="x")
    centred = x - sg.mean(x, keepdim=True)
    total = sg.sum(centred * centred)  # shape (): one number per example
    region = region_from_outputs([centred / sg.sum(sg.abs(x), keepdim=True), total], [x])
    assert_matches_reference(region)


def test_concat_consumed_by_elementwise_ops_matches_reference():
    a, b, w = sg.Input(5, name="a"), sg.Input(3, name="b"), sg.Parameter(8, name="w")
    cat = sg.concat([sg.tanh(a), b]) * w
    region = region_from_outputs([cat, sg.softmax(cat), sg.layer_norm(cat), sg.sum(cat)], [a, b, w])
    assert_matches_reference(region)


def test_slices_of_computed_values_are_recomputed_on_their_columns():
    x = sg.Input(9, name="x")
    sm, ln = sg.softmax(x), sg.layer_norm(sg.exp(x))
    left, right = sg.split(sm, [4, 5])
    region = region_from_outputs([right - sg.narrow(ln, -1, 2, 5), left * 2.0], [x])
    assert_matches_reference(region)


def test_pad_and_chunk_round_trip_matches_reference():
    x = sg.Input(8, name="x")
    a, b = sg.chunk(sg.tanh(x), 2)
    padded = make("pad", (a * b,), dim=0, before=1, after=2)
    mixed = padded + sg.concat([sg.narrow(x, -1, 0, 4), sg.narrow(x, -1, 5, 3)])  # breaks 1, 5 and 4
    region = region_from_outputs([padded, sg.concat([b, a]) * 2.0, mixed], [x])
    assert_matches_reference(region)


def test_flattened_multi_dim_values_match_reference():
    x, p = sg.Input((2, 3), name="x"), sg.Parameter((2, 3), name="p")
    y = sg.reshape(sg.tanh(x) * p, (6,))
    region = region_from_outputs([sg.softmax(y), sg.tanh(x) + 1.0], [x, p])
    assert_matches_reference(region)


# ---------------------------------------------------------------------------------------
# numbers: derivative graphs
# ---------------------------------------------------------------------------------------
def _forward_nodes():
    x, y = sg.Input(6, name="x"), sg.Input(6, name="y")
    cat_a = sg.Input(2, name="a")
    return [
        sg.sigmoid(x), sg.tanh(x), sg.relu(x - 1.0), sg.exp(x), sg.log(x), sg.abs(x - 1.0), sg.sqrt(x),
        x * y, x / y, sg.maximum(x, y), sg.minimum(x, y), sg.softmax(x), sg.layer_norm(x, eps=1e-3),
        sg.sum(x, keepdim=True), sg.mean(x), sg.narrow(x, -1, 1, 3), sg.concat([cat_a, x]),
    ]


@pytest.mark.parametrize("index", range(17), ids=lambda k: f"node{k}")
def test_vjp_region_of_each_op_matches_reference(index):
    node = _forward_nodes()[index]
    region = vjp_region(node)
    ok, why = region_supported(region)
    if node.op == "layer_norm":  # its derivative is one op that runs as torch's native kernel
        assert not ok and "native kernel" in why
        return
    assert ok, why
    assert_matches_reference(region, positive=True, atol=1e-5, rtol=1e-4)


def test_layer_norm_derivative_spelled_in_primitive_ops_fuses_and_matches_reference():
    from seqgraph.compiler.ops import _layer_norm_grad_composite
    x, g = sg.Input(6, name="x"), sg.Input(6, name="g")
    region = region_from_outputs([_layer_norm_grad_composite(g, x, 1e-3)], [g, x])
    assert region_supported(region) == (True, "")
    assert_matches_reference(region, atol=1e-5, rtol=1e-4)


def test_lstm_backward_region_with_recomputed_forward_matches_reference():
    forward = lstm_region(hidden=4)
    xproj, rec, bias, c = forward.inputs
    h_next, c_next = forward.outputs
    region = backward_region([h_next, c_next], [xproj, rec, bias, c], wrt=[xproj, c], name="lstm_backward")
    assert any(n.op == "pad" for n in region.nodes)  # the gate gradient is assembled from padded pieces
    assert_matches_reference(region, batch=3, atol=1e-5, rtol=1e-4)
