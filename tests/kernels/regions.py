"""Regions shared by the kernel tests of both generators (Triton and C): builders cut from
real cells and from derivative graphs, random inputs, and the reference interpreter's answer."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqgraph as sg
from seqgraph.compiler import ops
from seqgraph.compiler.interpret import evaluate
from seqgraph.compiler.ops import REGISTRY, make
from seqgraph.kernels.codegen import region_from_outputs


def grad_leaf(node, name="g"):
    """A leaf standing for the incoming gradient of `node`."""
    return make("input", (), shape=node.shape, batched=node.batched, name=name)


def random_inputs(region, batch, positive=False, dtype=torch.float32, device="cpu"):
    vals = []
    for n in region.inputs:
        if n.op == "const":
            vals.append(None)
            continue
        shape = ((batch,) if n.batched else ()) + n.shape
        t = torch.rand(shape, dtype=dtype) + 0.5 if positive else torch.randn(shape, dtype=dtype)
        vals.append(t.to(device))
    return vals


def reference(region, vals, dtype=torch.float32):
    leaves = {n.id: v.to(dtype).cpu() for n, v in zip(region.inputs, vals) if v is not None}
    consts = [n for n in region.inputs if n.op == "const"]
    env = evaluate(consts + region.nodes, leaves, dtype=dtype, device=torch.device("cpu"))
    return [env[o.id] for o in region.outputs]


def lstm_region(hidden=6, features=5):
    x, h, c = sg.Input(features, name="x"), sg.State(hidden, name="h"), sg.State(hidden, name="c")
    xproj = sg.Linear(features, 4 * hidden, bias=False, name="xproj")(x)
    rec = sg.Linear(hidden, 4 * hidden, bias=False, name="rec")(h)
    bias = sg.Parameter(4 * hidden, name="bias")
    i, f, g, o = sg.chunk(xproj + rec + bias, 4)
    c_next = (sg.sigmoid(f) * c + sg.sigmoid(i) * sg.tanh(g)).named("c_next")
    h_next = (sg.sigmoid(o) * sg.tanh(c_next)).named("h_next")
    return region_from_outputs([h_next, c_next], [xproj, rec, bias, c], name="lstm")


def lstm_step(hidden=6, carry=None, zero_masked=()):
    """The elementwise part of an LSTM step with h among its inputs (x-projection, recurrent
    GEMM, bias, c, h), so padded rows can carry h and c; outputs h, c and h again."""
    x, h, c = sg.Input(5, name="x"), sg.State(hidden, name="h"), sg.State(hidden, name="c")
    xproj = sg.Linear(5, 4 * hidden, bias=False)(x)
    rec = sg.Linear(hidden, 4 * hidden, bias=False)(h)
    bias = sg.Parameter(4 * hidden, name="bias")
    i, f, g, o = sg.chunk(xproj + rec + bias, 4)
    c_next = sg.sigmoid(f) * c + sg.sigmoid(i) * sg.tanh(g)
    h_next = sg.sigmoid(o) * sg.tanh(c_next)
    return region_from_outputs([h_next, c_next, h_next], [xproj, rec, bias, c, h], carry=carry or {},
                               zero_masked=zero_masked, name="lstm")


def lstm_step_inputs(batch, hidden=6):
    return [torch.randn(batch, 4 * hidden), torch.randn(batch, 4 * hidden), torch.randn(4 * hidden),
            torch.randn(batch, hidden), torch.randn(batch, hidden)]


def strided_lstm_step_inputs(batch, hidden=6):
    """lstm_step's inputs, none of the batched ones contiguous: a step and column range of a
    batch-first sequence, a column-major matrix, a row broadcast with stride 0, every other column."""
    seq = torch.randn(batch, 3, 8 * hidden)
    xproj = seq[:, 1, 4 * hidden:]
    rec = torch.randn(4 * hidden, batch).t()
    c = torch.randn(1, hidden).expand(batch, hidden)
    vals = [xproj, rec, torch.randn(4 * hidden), c, torch.randn(batch, 2 * hidden)[:, ::2]]
    assert not any(v.is_contiguous() for k, v in enumerate(vals) if k != 2)
    return vals


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


def forward_nodes():
    """One node of every fusable op with a derivative (for the VJP-region tests)."""
    x, y = sg.Input(6, name="x"), sg.Input(6, name="y")
    cat_a = sg.Input(2, name="a")
    return [
        sg.sigmoid(x), sg.tanh(x), sg.relu(x - 1.0), sg.exp(x), sg.log(x), sg.abs(x - 1.0), sg.sqrt(x),
        x * y, x / y, sg.maximum(x, y), sg.minimum(x, y), sg.softmax(x), sg.layer_norm(x, eps=1e-3),
        sg.sum(x, keepdim=True), sg.mean(x), sg.narrow(x, -1, 1, 3), sg.concat([cat_a, x]),
    ]


# ---------------------------------------------------------------------------------------
# regions cut from real cells, each with the batch its test uses
# ---------------------------------------------------------------------------------------
def _gru():
    hidden = 5
    x, h = sg.Input(3, name="x"), sg.State(hidden, name="h")
    xp, hp = sg.Linear(3, 3 * hidden, name="wx")(x), sg.Linear(hidden, 3 * hidden, name="wh")(h)
    xr, xz, xn = sg.chunk(xp, 3)
    hr, hz, hn = sg.chunk(hp, 3)
    r, z = sg.sigmoid(xr + hr), sg.sigmoid(xz + hz)
    n = sg.tanh(xn + r * hn)
    h_next = (1.0 - z) * n + z * h
    # inputs: both GEMM outputs and both (3H,) biases, which the region slices
    return region_from_outputs([h_next], [xp.inputs[0], xp.inputs[1], hp.inputs[0], hp.inputs[1], h])


def _layer_norm_affine():
    x = sg.Input(7, name="x")
    ln = sg.LayerNorm(7, name="ln")
    return region_from_outputs([ln(x)], [x, ln.weight, ln.bias])


def _softmax():
    x = sg.Input(10, name="x")
    return region_from_outputs([sg.softmax(x * 3.0)], [x])


def _math():
    x, y = sg.Input(9, name="x"), sg.Input(9, name="y")
    a = sg.maximum(sg.relu(x), sg.minimum(y, 0.3))
    b = sg.sqrt(sg.abs(x)) + sg.log(sg.abs(y) + 0.5) - sg.exp(sg.tanh(x * y))
    return region_from_outputs([a, b / (1.0 + sg.abs(a))], [x, y])


def _broadcasts():
    x, q = sg.Input(6, name="x"), sg.Input((), name="q")  # q: one number per example
    p, s = sg.Parameter(6, name="p"), sg.Parameter((), name="s", init=0.5)
    y = x * p + s - q * 2.0
    return region_from_outputs([y, q * s + 1.0], [x, q, p, s])


def _sums():
    x = sg.Input(11, name="x")
    centred = x - sg.mean(x, keepdim=True)
    total = sg.sum(centred * centred)  # shape (): one number per example
    return region_from_outputs([centred / sg.sum(sg.abs(x), keepdim=True), total], [x])


def _concat():
    a, b, w = sg.Input(5, name="a"), sg.Input(3, name="b"), sg.Parameter(8, name="w")
    cat = sg.concat([sg.tanh(a), b]) * w
    return region_from_outputs([cat, sg.softmax(cat), sg.layer_norm(cat), sg.sum(cat)], [a, b, w])


def _slices_of_computed_values():
    x = sg.Input(9, name="x")
    sm, ln = sg.softmax(x), sg.layer_norm(sg.exp(x))
    left, right = sg.split(sm, [4, 5])
    return region_from_outputs([right - sg.narrow(ln, -1, 2, 5), left * 2.0], [x])


def _pad_and_chunk():
    x = sg.Input(8, name="x")
    a, b = sg.chunk(sg.tanh(x), 2)
    padded = make("pad", (a * b,), dim=0, before=1, after=2)
    mixed = padded + sg.concat([sg.narrow(x, -1, 0, 4), sg.narrow(x, -1, 5, 3)])  # breaks 1, 5 and 4
    return region_from_outputs([padded, sg.concat([b, a]) * 2.0, mixed], [x])


def _flattened_multi_dim():
    x, p = sg.Input((2, 3), name="x"), sg.Parameter((2, 3), name="p")
    y = sg.reshape(sg.tanh(x) * p, (6,))
    return region_from_outputs([sg.softmax(y), sg.tanh(x) + 1.0], [x, p])


def _layer_norm_grad_composite():
    from seqgraph.compiler.ops import _layer_norm_grad_composite
    x, g = sg.Input(6, name="x"), sg.Input(6, name="g")
    return region_from_outputs([_layer_norm_grad_composite(g, x, 1e-3)], [g, x])


def _lstm_backward():
    forward = lstm_region(hidden=4)
    xproj, rec, bias, c = forward.inputs
    h_next, c_next = forward.outputs
    return backward_region([h_next, c_next], [xproj, rec, bias, c], wrt=[xproj, c], name="lstm_backward")


# name -> (builder, batch, positive inputs)
CELL_REGIONS = {
    "lstm_step": (lambda: lstm_region(hidden=6), 7, False),
    "gru_step": (_gru, 6, False),
    "layer_norm_with_gain_and_bias": (_layer_norm_affine, 5, False),
    "softmax_over_the_last_dim": (_softmax, 5, False),
    "unary_and_binary_math": (_math, 5, False),
    "parameters_and_scalars_broadcast_over_rows": (_broadcasts, 5, False),
    "keepdim_and_dropped_dim_sums": (_sums, 5, False),
    "concat_consumed_by_elementwise_ops": (_concat, 5, False),
    "slices_of_computed_values": (_slices_of_computed_values, 5, False),
    "pad_and_chunk_round_trip": (_pad_and_chunk, 5, False),
    "flattened_multi_dim_values": (_flattened_multi_dim, 5, False),
    "layer_norm_derivative_in_primitive_ops": (_layer_norm_grad_composite, 5, False),
    "lstm_backward_with_recomputed_forward": (_lstm_backward, 3, False),
}


# ---------------------------------------------------------------------------------------
# the row ops of flattened per-example matrices
# ---------------------------------------------------------------------------------------
def attention_region(S=5, D=7):
    """The attention part of a step: scores over a flattened (S, D) memory (read at an offset:
    a slice of a wider row), a padding mask added, softmax, the weighted sum of the memory,
    a query that is one column broadcast, and rows spread over the matrix and summed back."""
    wide, q, mask = sg.Input(3 + S * D, name="wide"), sg.Input(D, name="q"), sg.Input(S, name="mask")
    memory = sg.narrow(wide, -1, 3, S * D)
    weights = sg.softmax(make("matvec", (memory, q)) + mask * 3.0)
    one = sg.Input(1, name="one")
    column = make("matvec", (memory, make("broadcast_to", (one,), shape=(D,))))
    summed = make("vecmat", (weights, memory)) + sg.sum(column, keepdim=True)
    spread = make("tile", (q,), times=S) * make("repeat_each", (weights,), times=D) + memory
    sums = sg.concat([make("sum_tiles", (spread,), times=S), make("sum_groups", (memory,), times=D)])
    return region_from_outputs([weights, summed, make("outer", (weights, q)), sums], [wide, q, mask, one])


def matrix_row_op(op, M=3, N=4):
    """One node of each row op on flattened (M, N) matrices (the strided products take M, N = 3, 4)."""
    xm, xn, xmn = sg.Input(M, name="xm"), sg.Input(N, name="xn"), sg.Input(M * N, name="xmn")
    return {"matvec": lambda: make("matvec", (xmn, xn)), "vecmat": lambda: make("vecmat", (xm, xmn)),
            "outer": lambda: make("outer", (xm, xn)), "tile": lambda: make("tile", (xn,), times=M),
            "repeat_each": lambda: make("repeat_each", (xm,), times=N),
            "sum_tiles": lambda: make("sum_tiles", (xmn,), times=M),
            "sum_groups": lambda: make("sum_groups", (xmn,), times=N),
            "softmax_groups": lambda: make("softmax_groups", (xmn,), times=N),
            # rows of b added in (b and the result run along n), and dot products (b runs along k)
            "strided_matmul rows": lambda: make("strided_matmul", (xm, xmn), dims=(1, 1, 3, 4), sa=(0, 0, 1),
                                                sb=(0, 4, 1), so=(0, 0, 1)),
            "strided_matmul heads": lambda: make("strided_matmul", (xn, xmn), dims=(2, 1, 2, 3), sa=(2, 2, 1),
                                                 sb=(2, 1, 4), so=(3, 3, 1)),
            "strided_matmul transposed": lambda: make("strided_matmul", (xmn, xn), dims=(1, 3, 4, 1),
                                                      sa=(0, 1, 3), sb=(0, 1, 0), so=(0, 1, 0))}[op]()


def any_matrix_size(test):
    """Hypothesis over the (M, N) of matrix_region and the batch, for both kernel generators' tests."""
    sizes = given(M=st.integers(1, 6), N=st.integers(1, 7), batch=st.integers(1, 5))
    return settings(max_examples=15, deadline=None)(sizes(test))


def matrix_region(M, N):
    """Every row op on one flattened (M, N) matrix, with elementwise ops, a layer norm and the
    matrix itself among the outputs. Kernels hold padding past M rows and N columns; here it is
    nonzero (1 + ..., sigmoid), so a sum that failed to mask it would count it."""
    x, u, v = sg.Input(M * N, name="x"), sg.Input(M, name="u"), sg.Input(N, name="v")
    su, sv = sg.sigmoid(u), sg.sigmoid(v)
    mat = sg.tanh(x) + 1.0 + make("outer", (su, v)) * make("tile", (sv,), times=M) - make("repeat_each", (u,), times=N)
    outs = [make("matvec", (mat, sv)), make("vecmat", (su, mat)), make("sum_tiles", (mat,), times=M),
            make("sum_groups", (mat,), times=N), make("sum_groups", (make("softmax_groups", (mat,), times=N),), times=N),
            mat, sg.layer_norm(mat), sg.sum(mat, keepdim=True)]
    return region_from_outputs(outs, [x, u, v])


MATRIX_ROW_OPS = ["matvec", "vecmat", "outer", "tile", "repeat_each", "sum_tiles", "sum_groups", "softmax_groups",
                  "strided_matmul rows", "strided_matmul heads", "strided_matmul transposed"]


# ---------------------------------------------------------------------------------------
# random elementwise regions (for the property tests)
# ---------------------------------------------------------------------------------------
_UNARY = {
    "neg": lambda a: -a, "sigmoid": sg.sigmoid, "tanh": sg.tanh, "relu": sg.relu, "abs": sg.abs,
    "exp": lambda a: sg.exp(sg.tanh(a)), "log": lambda a: sg.log(sg.abs(a) + 1.0), "sqrt": lambda a: sg.sqrt(sg.abs(a)),
}
_BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (sg.abs(b) + 1.0), "maximum": sg.maximum, "minimum": sg.minimum,
}
RANDOM_STEPS = sorted(_UNARY) + sorted(_BINARY) + ["recut"]


def random_elementwise_region(width, steps, n_out):
    """A region of random elementwise steps over inputs x, y (B, width), q (B,), p (width,), s ()."""
    x, y = sg.Input(width, name="x"), sg.Input(width, name="y")
    q, p = sg.Input((), name="q"), sg.Parameter(width, name="p")
    s = sg.Parameter((), name="s", init=0.5)
    pool = [x, y, q, p, s, ops.const(0.75)]
    for name, i, j in steps:
        a, b = pool[i % len(pool)], pool[j % len(pool)]
        if name == "recut":  # concat of two slices: the value gets a column break
            if width < 2 or a.elements != width or b.elements != width or a.batched != b.batched:
                continue
            k = 1 + i % (width - 1)
            pool.append(sg.concat([sg.narrow(a, -1, 0, k), sg.narrow(b, -1, k, width - k)]))
        elif name in _UNARY:
            pool.append(_UNARY[name](a))
        else:
            pool.append(_BINARY[name](a, b))
    outs = [n for n in pool[6:] if n.batched][-n_out:] or [x * p]
    return region_from_outputs(outs, [x, y, q, p, s], name="random")


def random_region_inputs(batch, width):
    """Values for random_elementwise_region's inputs x, y, q, p, s."""
    return [torch.randn(batch, width), torch.randn(batch, width), torch.randn(batch), torch.randn(width),
            torch.randn(())]
