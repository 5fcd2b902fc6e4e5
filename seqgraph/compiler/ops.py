"""The op registry: every op seqgraph knows, declared once, with all of its rules.

Each `register(...)` call gives an op its kind, its shape rule, its torch reference (what the
interpreter and the torch backend run), its vector-Jacobian product written with the same
node builders (so a derivative is itself a graph that every backend can compile), its
Triton emitter and its C emitter (each an expression over operand strings, or `NOT_FUSED`
with the reason), and the properties the passes ask about (`pole`, `cheap`,
`piecewise_constant`, `sums_rows`, `commutative`: see OpDef). Registration fails if a rule is
missing. The tests, the interpreter, the compiler passes and the code generators read this one
table (the generators place slices, concats and aliases themselves, by layout). This module
must not know about cells, time or modules: it speaks only of one node and its operands.

Conventions. A value at run time has shape (B, *node.shape) when `node.batched`, else
node.shape. Dims in attrs are non-negative and count the per-example dims (batch excluded).
Binary elementwise ops broadcast numpy-style over the per-example dims, and an unbatched
operand (a parameter, a constant) broadcasts over the batch. Triton emitters see 2-D tiles
[rows, columns] in float32; `cmask_W` names the valid-column mask of a width-W operand. C
emitters of elementwise ops see one element of each operand, of C type `real` (float or
double); those of reductions get the output row `dst`, the input row width `w` and an element
expression (indexed by `j`) of each operand row, and return statements (kernels/c_codegen.py).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..errors import ShapeError, mention, user_site
from .ir import LEAF_OPS, Node, default_site


class ShapeProblem(Exception):
    """Raised by a shape rule; `make` turns it into a ShapeError that names the node."""


NOT_FUSED = "not fused"  # triton=(NOT_FUSED, why): the op runs through torch, the plan says so


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: str  # leaf | elementwise | reduction | layout | matmul | gather
    shape: Callable  # (inputs, attrs) -> (shape, batched, dtype)
    torch: Callable  # (node, *values) -> tensor
    vjp: Optional[Callable]  # (node, g) -> tuple of grads (Node | None), one per input
    triton: object  # (node, *arg_strings) -> str, or (NOT_FUSED, reason)
    c: object  # elementwise: (node, *element_strings) -> str; reduction: (node, dst, w, *xs) -> str; or (NOT_FUSED, reason)
    doc: str = ""
    # The operand at which the op's value or derivative is infinite for a finite value (at 0,
    # or a large one that overflows: exp), or None; or a function of the node giving that, where
    # the attributes decide (layer_norm: a constant row, only with eps=0). A compiled prologue,
    # which computes padded rows too, feeds those rows `pole_fill` there, a torch expression of
    # the operand {x} (their results are dropped, and 0 * inf would be nan in a weight's gradient).
    pole: Optional[int | Callable] = None
    cheap: bool = False  # a few flops a value: the backward recomputes it rather than save it (rematerialize)
    piecewise_constant: bool = False  # a comparison: its value jumps at equality, so what it reads stays bit-exact
    sums_rows: bool = False  # a sum over the batch's rows: a derivative may run it once after the time loop
    commutative: bool = False  # its operands may be swapped (pictures number the operands of the others)
    # (node, *element_strings) -> GridRule or None: the op computed inside a C loop over the
    # columns of a per-example (M, N) matrix (kernels/c_codegen.py), without an array of its own
    c_grid: Optional[Callable] = None
    pole_fill: str = "1.0"  # (see pole)


class GridRule(NamedTuple):
    """How a C loop over a per-example (M, N) matrix, its rows m and columns n_ (flat column
    j = m * N + n_), computes an op as it goes. role "value": `expr` is the op's value at (m,
    n_), a spread of vectors (outer, tile, repeat_each). "row_sum": the op's value at m adds
    `expr` over the row's columns (matvec, sum_groups); "column_sum": its value at n_ adds
    `expr` over the rows (vecmat, sum_tiles); "total": its one value adds `expr` over all
    columns (M and N are then None: any loop will do). `matrix`: the operand that the loop
    itself computes (what a sum reads at j), None for a spread."""

    M: Optional[int]
    N: Optional[int]
    role: str
    expr: str
    matrix: Optional[int]


REGISTRY: dict[str, OpDef] = {}
KINDS = {"leaf", "elementwise", "reduction", "layout", "matmul", "gather"}


def register(name, *, kind, shape, torch, vjp, triton, c=None, doc="", pole=None, pole_fill="1.0", cheap=False,
             piecewise_constant=False, sums_rows=False, commutative=False, c_grid=None):
    missing = [k for k, v in (("shape", shape), ("torch", torch), ("triton", triton), ("c", c)) if v is None]
    if kind not in KINDS:
        raise ValueError(f"op {name!r}: unknown kind {kind!r}")
    if missing or (vjp is None and kind != "leaf"):
        raise ValueError(f"op {name!r} is missing rules: {missing + (['vjp'] if vjp is None and kind != 'leaf' else [])}")
    if name in REGISTRY:
        raise ValueError(f"op {name!r} registered twice")
    REGISTRY[name] = OpDef(name, kind, shape, torch, vjp, triton, c, doc, pole, cheap, piecewise_constant, sums_rows,
                           commutative, c_grid, pole_fill)


def make(op: str, inputs, *, name=None, site=None, module=None, **attrs) -> Node:
    """Build a node of `op`, inferring its shape; a bad operand raises ShapeError here."""
    d = REGISTRY[op]
    inputs = tuple(inputs)
    site = site or default_site()
    try:
        shape, batched, dtype = d.shape(inputs, attrs)
    except ShapeProblem as e:
        label = type(module).__name__ if module is not None else op
        nm = f" '{name}'" if name else ""
        operands = ", ".join(_describe_operand(i) for i in inputs)
        failed = failed_node(op, inputs, attrs, name=name, site=site, module=module) if inputs else None
        err = ShapeError(f"{label}{nm} (declared at {site}): {e} [operands: {operands}]", node=failed)
        _attach_picture(err)
        raise err from None
    return Node(op, inputs, attrs, shape, batched, dtype, name=name, site=site, module=module)


def failed_node(op: str, inputs: tuple, attrs: dict | None = None, *, name=None, site=None, module=None) -> Node:
    """The node that could not be built, for an error picture: the op, drawn red, with all its
    operands (it has no shape)."""
    return Node(op, inputs, dict(attrs or {}, failed=True), (), any(i.batched for i in inputs),
                name=name, site=site, module=module)


def _attach_picture(err) -> None:
    from ..viz import attach_error_picture  # drawing is optional; it never raises
    attach_error_picture(err)


def _describe_operand(n: Node) -> str:
    b = "B," if n.batched else ""
    return f"{mention(n)} ({b}{','.join(map(str, n.shape))})"


# ---------------------------------------------------------------------------------------
# helpers for the rules
# ---------------------------------------------------------------------------------------
def broadcast_shapes(a: tuple, b: tuple) -> tuple:
    out = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        if x != y and 1 not in (x, y):
            raise ShapeProblem(f"cannot broadcast shapes {a} and {b}")
        out.append(max(x, y) if 1 in (x, y) else x)
    return tuple(reversed(out))


def norm_dim(dim: int, rank: int) -> int:
    if not -rank <= dim < rank:
        raise ShapeProblem(f"dim {dim} is out of range for a value with {rank} per-example dim"
                           f"{'' if rank == 1 else 's'} (dims {-rank} to {rank - 1})" if rank else
                           f"dim {dim} is out of range: the value has no per-example dims")
    return dim % rank


def _floats(inputs):
    for i in inputs:
        if i.dtype != "float":
            raise ShapeProblem(f"operand {mention(i)} has dtype {i.dtype}, expected float")


def _tdim(node: Node, dim: int) -> int:
    """Tensor dim of per-example dim `dim` for a value of `node`."""
    return dim + 1 if node.batched else dim


def _aligned(node: Node, values):
    """Give batched operands of lower rank singleton dims after the batch, so that torch's
    trailing-dim broadcasting lines up per-example dims (numpy rules) for every operand."""
    rank = len(node.shape)
    out = []
    for src, v in zip(node.inputs, values):
        if src.batched and len(src.shape) < rank:
            v = v.reshape(v.shape[0], *([1] * (rank - len(src.shape))), *src.shape)
        out.append(v)
    return out


# ---------------------------------------------------------------------------------------
# node builders used by the VJP rules (and re-exported, with sugar, by seqgraph.dsl)
# ---------------------------------------------------------------------------------------
def const(value: float) -> Node:
    return make("const", (), value=float(value))


def lift(x) -> Node:
    if isinstance(x, Node):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return const(float(x))  # Python's numbers and numpy's scalars (numpy's bool_ is not Real)
    hint = {"Tensor": ": a tensor is not part of a step's graph; use sg.Parameter for a trained one, "
                      "sg.Context for one given with each call, or a Python number",
            "list": ": combine a list of nodes first (sg.concat([...]) side by side, or a sum)",
            "tuple": ": combine the nodes first (sg.concat([...]) side by side, or a sum)"}
    kind = "Tensor" if isinstance(x, torch.Tensor) else type(x).__name__
    raise TypeError(f"expected a seqgraph node or a Python number, got {kind}{hint.get(kind, '')} "
                    f"(at {user_site()})")


def add(a, b):
    return make("add", (lift(a), lift(b)))


def sub(a, b):
    return make("sub", (lift(a), lift(b)))


def mul(a, b):
    return make("mul", (lift(a), lift(b)))


def div(a, b):
    return make("div", (lift(a), lift(b)))


def neg(a):
    return make("neg", (a,))


def sum_to(g: Node, like: Node) -> Node:
    """Reduce a gradient `g` to the shape (and batchedness) of operand `like`."""
    if g.shape == like.shape and g.batched == like.batched:
        return g
    return make("sum_to", (g,), shape=like.shape, batched=like.batched)


def transpose(a, d0=-2, d1=-1):
    r = len(a.shape)
    return make("transpose", (a,), d0=norm_dim_or_raise(d0, r, "transpose"), d1=norm_dim_or_raise(d1, r, "transpose"))


def norm_dim_or_raise(dim: int, rank: int, op: str) -> int:
    """`dim` as an index in [0, rank), or a ShapeError naming `op` and the user's line."""
    try:
        return norm_dim(dim, rank)
    except ShapeProblem as e:
        raise ShapeError(f"{op} (declared at {user_site()}): {e}") from None


def reshape(a, shape):
    return make("reshape", (a,), shape=tuple(shape))


# ---------------------------------------------------------------------------------------
# leaves
# ---------------------------------------------------------------------------------------
def const_key(v: float) -> str:
    """A constant's identity for caches and merging: 0.0 and -0.0 differ (1/x tells them apart),
    and nan equals nan."""
    return repr(float(v))


def py_literal(v: float) -> str:
    """A number as a Python (and Triton) expression; inf and nan are not Python literals."""
    v = float(v)
    return repr(v) if math.isfinite(v) else f"float('{v}')"


def c_literal(v: float) -> str:
    """A number as a C constant of the kernel's `real` type."""
    v = float(v)
    if math.isnan(v):
        return "((real)NAN)"
    if math.isinf(v):
        return "((real)INFINITY)" if v > 0 else "(-(real)INFINITY)"
    return f"((real){v!r})"


_C_ONE = "((real)1)"


def _leaf_shape(inputs, attrs):
    return attrs["shape"], attrs["batched"], attrs.get("dtype", "float")


def _no_torch(node, *values):
    raise RuntimeError(f"leaf {node!r} has no torch rule: the runtime binds its value")


for _leaf in ("input", "state", "context", "param", "noise"):
    register(_leaf, kind="leaf", shape=_leaf_shape, torch=_no_torch, vjp=None,
             triton=(NOT_FUSED, "a leaf is loaded, not computed"), c=(NOT_FUSED, "a leaf is loaded, not computed"))

register("const", kind="leaf", shape=lambda i, a: ((), False, "float"),
         torch=lambda n: torch.tensor(n.attrs["value"]), vjp=None,
         triton=lambda n: py_literal(n.attrs["value"]), c=lambda n: c_literal(n.attrs["value"]),
         doc="a Python number")


# ---------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------
def _unary_shape(inputs, attrs):
    _floats(inputs)
    (a,) = inputs
    return a.shape, a.batched, "float"


def _binary_shape(inputs, attrs):
    _floats(inputs)
    a, b = inputs
    return broadcast_shapes(a.shape, b.shape), a.batched or b.batched, "float"


def _unary(name, fn, vjp, tri, c, doc="", **flags):
    register(name, kind="elementwise", shape=_unary_shape, torch=lambda n, x: fn(x), vjp=vjp,
             triton=tri, c=c, doc=doc, **flags)


def _binary(name, fn, vjp, tri, c, doc="", **flags):
    register(name, kind="elementwise", shape=_binary_shape,
             torch=lambda n, x, y: fn(*_aligned(n, (x, y))), vjp=vjp, triton=tri, c=c, doc=doc, **flags)


def _bin_grads(n, ga, gb):
    a, b = n.inputs
    return (None if ga is None else sum_to(ga, a), None if gb is None else sum_to(gb, b))


_ARITH_C = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def _arith_c(op):
    return lambda n, a, b: f"({a} {_ARITH_C[op]} {b})"


_binary("add", torch.add, lambda n, g: _bin_grads(n, g, g), lambda n, a, b: f"({a} + {b})", _arith_c("add"), cheap=True,
        commutative=True)
_binary("sub", torch.sub, lambda n, g: _bin_grads(n, g, neg(g)), lambda n, a, b: f"({a} - {b})", _arith_c("sub"),
        cheap=True)
_binary("mul", torch.mul, lambda n, g: _bin_grads(n, mul(g, n.inputs[1]), mul(g, n.inputs[0])),
        lambda n, a, b: f"({a} * {b})", _arith_c("mul"), cheap=True, commutative=True)
_binary("div", torch.div,
        lambda n, g: _bin_grads(n, div(g, n.inputs[1]), neg(div(mul(g, n), n.inputs[1]))),
        lambda n, a, b: f"({a} / {b})", _arith_c("div"), pole=1)
def _share(g: Node, loses: Node, a: Node, b: Node) -> Node:
    """torch's gradient for one operand of maximum/minimum: none where it `loses`, half at a tie
    of a and b, all of g otherwise (a nan operand, compared false both ways, gets all of it).
    Chosen with selects, never multiplied by a 0/1 factor: an infinite g must give 0, not nan."""
    tie = mul(make("ge", (a, b)), make("le", (a, b)))
    return select(loses, 0.0, select(tie, mul(g, 0.5), g))


def _max_vjp(n, g):
    a, b = n.inputs
    return _bin_grads(n, _share(g, make("gt", (b, a)), a, b), _share(g, make("gt", (a, b)), a, b))


def _min_vjp(n, g):
    a, b = n.inputs
    return _bin_grads(n, _share(g, make("gt", (a, b)), a, b), _share(g, make("gt", (b, a)), a, b))


_binary("maximum", torch.maximum, _max_vjp,
        lambda n, a, b: f"tl.maximum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)", lambda n, a, b: f"sg_max({a}, {b})",
        doc="a tie splits the gradient equally, as in torch", cheap=True, commutative=True)
_binary("minimum", torch.minimum, _min_vjp,
        lambda n, a, b: f"tl.minimum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)", lambda n, a, b: f"sg_min({a}, {b})",
        doc="a tie splits the gradient equally, as in torch", cheap=True, commutative=True)
# comparisons give 0/1 floats; their derivative is zero almost everywhere
_binary("ge", lambda x, y: (x >= y).to(torch.promote_types(x.dtype, y.dtype)),
        lambda n, g: (None, None), lambda n, a, b: f"(({a}) >= ({b})).to(tl.float32)",
        lambda n, a, b: f"((real)(({a}) >= ({b})))", piecewise_constant=True)
_binary("le", lambda x, y: (x <= y).to(torch.promote_types(x.dtype, y.dtype)),
        lambda n, g: (None, None), lambda n, a, b: f"(({a}) <= ({b})).to(tl.float32)",
        lambda n, a, b: f"((real)(({a}) <= ({b})))", piecewise_constant=True)
_binary("gt", lambda x, y: (x > y).to(torch.promote_types(x.dtype, y.dtype)),
        lambda n, g: (None, None), lambda n, a, b: f"(({a}) > ({b})).to(tl.float32)",
        lambda n, a, b: f"((real)(({a}) > ({b})))", piecewise_constant=True)

def _select_shape(inputs, attrs):
    _floats(inputs)
    m, a, b = inputs
    shape = broadcast_shapes(broadcast_shapes(m.shape, a.shape), b.shape)
    return shape, m.batched or a.batched or b.batched, "float"


def select(m, a, b) -> Node:
    return make("select", (m, lift(a), lift(b)))


register("select", kind="elementwise", shape=_select_shape,
         torch=lambda n, m, a, b: torch.where(*_aligned(n, (m > 0, a, b))),
         vjp=lambda n, g: (None, sum_to(select(n.inputs[0], g, 0.0), n.inputs[1]),
                           sum_to(select(n.inputs[0], 0.0, g), n.inputs[2])),
         triton=lambda n, m, a, b: f"tl.where({m} > 0, {a}, {b})",
         c=lambda n, m, a, b: f"(({m}) > 0 ? ({a}) : ({b}))",
         doc="a where m > 0, else b (m is a 0/1 mask: masking of padded steps)", cheap=True)


_unary("neg", torch.neg, lambda n, g: (neg(g),), lambda n, a: f"(-{a})", lambda n, a: f"(-{a})", cheap=True)
_unary("stop_gradient", torch.Tensor.detach, lambda n, g: (None,), lambda n, a: a, lambda n, a: a,
       doc="the value itself, with no gradient flowing back through it (torch's detach)", cheap=True)
_unary("sigmoid", torch.sigmoid, lambda n, g: (make("sigmoid_grad", (g, n)),),
       lambda n, a: f"tl.sigmoid({a})", lambda n, a: f"sg_sigmoid({a})")
def _tanh_triton(n, a):
    # 2 sigmoid(2x) - 1 cancels near 0 (tanh(1e-8) came out 0): there, tanh's odd Taylor
    # polynomial, whose first dropped term is below float32's rounding for |x| < 0.125
    x2 = f"({a} * {a})"
    small = f"{a} * (1.0 + {x2} * (-0.3333333333333333 + {x2} * (0.13333333333333333 + {x2} * -0.05396825396825397)))"
    return f"tl.where(tl.abs({a}) < 0.125, {small}, 2.0 * tl.sigmoid(2.0 * {a}) - 1.0)"


_unary("tanh", torch.tanh, lambda n, g: (make("tanh_grad", (g, n)),), _tanh_triton, lambda n, a: f"sg_tanh({a})")


def _sigmoid_grad_composite(g, y):
    return mul(g, mul(y, sub(1.0, y)))


def _tanh_grad_composite(g, y):
    return mul(g, sub(1.0, mul(y, y)))


# The derivatives of sigmoid and tanh from their outputs, each one op (torch has a kernel for
# each), so a backward step issues one call where the spelled-out form would issue three.
_binary("sigmoid_grad", lambda g, y: torch.ops.aten.sigmoid_backward(*torch.broadcast_tensors(g, y)),
        lambda n, g: composite_vjp(_sigmoid_grad_composite(*n.inputs), n.inputs, g),
        lambda n, g, y: f"({g} * {y} * (1.0 - {y}))", lambda n, g, y: f"({g} * (({_C_ONE} - {y}) * {y}))", doc="g * y * (1 - y): sigmoid's derivative given y")
_binary("tanh_grad", lambda g, y: torch.ops.aten.tanh_backward(*torch.broadcast_tensors(g, y)),
        lambda n, g: composite_vjp(_tanh_grad_composite(*n.inputs), n.inputs, g),
        lambda n, g, y: f"({g} * (1.0 - {y} * {y}))", lambda n, g, y: f"({g} * ({_C_ONE} - {y} * {y}))", doc="g * (1 - y^2): tanh's derivative given y")
# relu's derivative selects, as torch's threshold_backward: 0 where x <= 0 (an infinite g there
# gives 0, where a 0/1 factor gave nan), g elsewhere, a nan x included
_unary("relu", torch.relu, lambda n, g: (select(make("le", (n.inputs[0], const(0.0))), 0.0, g),),
       lambda n, a: f"tl.maximum({a}, 0.0, propagate_nan=tl.PropagateNan.ALL)", lambda n, a: f"sg_relu({a})")
_unary("exp", torch.exp, lambda n, g: (mul(g, n),), lambda n, a: f"tl.exp({a})", lambda n, a: f"sg_exp({a})",
       pole=0)
_unary("log", torch.log, lambda n, g: (div(g, n.inputs[0]),), lambda n, a: f"tl.log({a})", lambda n, a: f"SG_LOG({a})",
       pole=0)
# abs's derivative multiplies by sign(x): at x = 0 an infinite g gives nan, as torch's does
_unary("abs", torch.abs, lambda n, g: (mul(g, make("sign", n.inputs)),), lambda n, a: f"tl.abs({a})", lambda n, a: f"SG_ABS({a})")
_unary("sign", torch.sign, lambda n, g: (None,),
       lambda n, a: f"((({a}) > 0).to(tl.float32) - (({a}) < 0).to(tl.float32))", lambda n, a: f"sg_sign({a})",
       piecewise_constant=True)
_unary("sqrt", torch.sqrt, lambda n, g: (div(mul(g, 0.5), n),), lambda n, a: f"tl.sqrt({a})", lambda n, a: f"SG_SQRT({a})",
       pole=0)


# ---------------------------------------------------------------------------------------
# reductions (over one per-example dim, or a gradient back to an operand's shape)
# ---------------------------------------------------------------------------------------
def _reduce_shape(inputs, attrs):
    _floats(inputs)
    (a,) = inputs
    if not a.shape:
        raise ShapeProblem("cannot reduce a value with no per-example dims")
    d = norm_dim(attrs["dim"], len(a.shape))
    attrs["dim"] = d
    shape = list(a.shape)
    if attrs.get("keepdim", False):
        shape[d] = 1
    else:
        del shape[d]
    return tuple(shape), a.batched, "float"


def _unreduce(n: Node, g: Node) -> Node:
    """Broadcast the gradient of a reduction back over the reduced dim."""
    (a,) = n.inputs
    if not n.attrs.get("keepdim", False):
        shape = list(a.shape)
        shape[n.attrs["dim"]] = 1
        g = reshape(g, shape)
    return make("broadcast_to", (g,), shape=a.shape)


def _row_width(n: Node) -> int:
    return n.inputs[0].shape[-1]


def _last_dim_only(emit):
    def triton(n, *args):
        a = n.inputs[0]
        if a.shape and n.attrs.get("dim", len(a.shape) - 1) != len(a.shape) - 1:
            return (NOT_FUSED, "reduces a dim other than the last")
        return emit(n, *args)
    return triton


def _c_for(w: int, body: str, sums: str = "") -> str:
    """A column loop; `sums` names the accumulators it adds into (e.g. "m" or "mg, mgy"), which
    lets it vectorise (OpenMP simd: the additions are reordered, as torch's own sums are)."""
    simd = f'_Pragma("omp simd reduction(+:{sums})") ' if sums else ""
    return f"{simd}for (int64_t j = 0; j < {w}; ++j) {body}"


def _sum_c(n, dst, w, x):
    return f"{{ real acc = 0; {_c_for(w, f'acc += {x};', 'acc')} {dst}[0] = acc; }}"


def _mean_c(n, dst, w, x):
    return f"{{ real acc = 0; {_c_for(w, f'acc += {x};', 'acc')} {dst}[0] = acc / (real){w}; }}"


def _total_c_grid(n, x):
    """A sum of a whole row to one value adds up inside the loop that computes the row (the op's
    C rule decides what it can sum at all)."""
    src = n.inputs[0]
    if n.elements != 1 or src.elements == 1 or src.batched != n.batched:
        return None
    return GridRule(None, None, "total", x, 0)


register("sum", kind="reduction", shape=_reduce_shape,
         torch=lambda n, x: x.sum(_tdim(n.inputs[0], n.attrs["dim"]), keepdim=n.attrs.get("keepdim", False)),
         vjp=lambda n, g: (_unreduce(n, g),),
         triton=_last_dim_only(lambda n, a: f"tl.sum(tl.where(cmask_{_row_width(n)}, {a}, 0.0), axis=1)[:, None]"),
         c=_last_dim_only(_sum_c), c_grid=_total_c_grid)
register("mean", kind="reduction", shape=_reduce_shape,
         torch=lambda n, x: x.mean(_tdim(n.inputs[0], n.attrs["dim"]), keepdim=n.attrs.get("keepdim", False)),
         vjp=lambda n, g: (_unreduce(n, div(g, float(n.inputs[0].shape[n.attrs["dim"]]))),),
         triton=_last_dim_only(lambda n, a: f"(tl.sum(tl.where(cmask_{_row_width(n)}, {a}, 0.0), axis=1)[:, None] / {float(_row_width(n))})"),
         c=_last_dim_only(_mean_c))


def _softmax_shape(inputs, attrs):
    _floats(inputs)
    (a,) = inputs
    attrs["dim"] = norm_dim(attrs["dim"], len(a.shape))
    return a.shape, a.batched, "float"


def _softmax_vjp(n, g):
    d = n.attrs["dim"]
    s = make("sum", (mul(g, n),), dim=d, keepdim=True)
    return (mul(n, sub(g, s)),)


def _softmax_triton(n, a):
    w = _row_width(n)
    x = f"tl.where(cmask_{w}, {a}, float('-inf'))"
    e = f"tl.exp({x} - tl.max({x}, axis=1)[:, None])"
    return f"({e} / tl.sum({e}, axis=1)[:, None])"


def _softmax_c(n, dst, w, x):
    return ("{ real mx = -(real)INFINITY; " + _c_for(w, f"mx = sg_max(mx, {x});") + " real s = 0; "
            + _c_for(w, f"{{ real e = sg_exp({x} - mx); {dst}[j] = e; s += e; }}", "s") + " "
            + _c_for(w, f"{dst}[j] = {dst}[j] / s;") + " }")


register("softmax", kind="reduction", shape=_softmax_shape,
         torch=lambda n, x: torch.softmax(x, _tdim(n.inputs[0], n.attrs["dim"])),
         vjp=_softmax_vjp, triton=_last_dim_only(_softmax_triton), c=_last_dim_only(_softmax_c))


def _layer_norm_shape(inputs, attrs):
    _floats(inputs)
    (a,) = inputs
    if not a.shape:
        raise ShapeProblem("layer_norm needs at least one per-example dim")
    return a.shape, a.batched, "float"


def _layer_norm_vjp(n, g):
    return (make("layer_norm_grad", (g, n.inputs[0]), eps=n.attrs["eps"]),)


def _layer_norm_grad_composite(g, x, eps):
    """dx of y = layer_norm(x): rstd * (g - mean(g) - y * mean(g * y)), in primitive ops."""
    last = len(x.shape) - 1
    xc = sub(x, make("mean", (x,), dim=last, keepdim=True))
    rstd = div(1.0, make("sqrt", (add(make("mean", (mul(xc, xc),), dim=last, keepdim=True), eps),)))
    y = mul(xc, rstd)
    mg = make("mean", (g,), dim=last, keepdim=True)
    mgy = make("mean", (mul(g, y),), dim=last, keepdim=True)
    return mul(rstd, sub(sub(g, mg), mul(y, mgy)))


def _layer_norm_grad_torch(n, g, x):
    shape = n.shape[-1:]
    g, x = torch.broadcast_tensors(g, x)  # (a batched gradient of an unbatched value, say)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, None, None, n.attrs["eps"])
    return torch.ops.aten.native_layer_norm_backward(g, x, shape, mean, rstd, None, None, [True, False, False])[0]


def composite_vjp(out: Node, leaves: tuple, g: Node) -> tuple:
    """Gradients w.r.t. `leaves` of the primitive-op graph `out`, by reverse accumulation."""
    from .ir import topo_order
    grads: dict[int, Node] = {out.id: g}
    leaf_ids = {x.id for x in leaves}
    for node in reversed(topo_order([out])):
        if node.id not in grads or node.id in leaf_ids or not node.inputs:
            continue
        for inp, gi in zip(node.inputs, REGISTRY[node.op].vjp(node, grads[node.id])):
            if gi is not None and inp.op != "const":
                grads[inp.id] = gi if inp.id not in grads else add(grads[inp.id], gi)
    return tuple(grads.get(x.id) for x in leaves)


def layer_norm_stats_c(w: int, x: str, eps: float, m: str, r: str) -> str:
    """C statements declaring `m` and `r`, the mean and rstd of the row x (an element expression
    indexed by j) of w values: the mean, then the biased variance of the centred row, as torch.
    The mean is summed in double and kept as two reals, `m` and the remainder `m_lo` (0 in
    double): a row of nearly equal values (1000 + 1e-3 noise, say) is centred to float's own
    precision instead of to the rounding of its mean (`_centred_c`)."""
    return (f"double {m}_sum = 0; " + _c_for(w, f"{m}_sum += (double)({x});", f"{m}_sum")
            + f" double {m}_exact = {m}_sum / {w}.0; real {m} = (real){m}_exact; "
            f"real {m}_lo = (real)({m}_exact - (double){m}); real {r} = 0; "
            + _c_for(w, f"{{ real d = {_centred_c(x, m)}; {r} += d * d; }}", r)
            + f" {r} = {_C_ONE} / SG_SQRT({r} / (real){w} + {c_literal(eps)});")


def _centred_c(x: str, m: str) -> str:
    """x minus the mean `m` (+ `m_lo`) of layer_norm_stats_c: x - m is exact where x is near m."""
    return f"((({x}) - {m}) - {m}_lo)"


def _layer_norm_grad_c(n, dst, w, g, x, stats=None):
    """rstd * (g - mean(g) - y * mean(g * y)) with y = (x - mean) * rstd; `stats`: the names of
    x's mean and rstd, already computed in the row (else computed here)."""
    m, r = stats or ("m", "r")
    y = f"{_centred_c(x, m)} * {r}"
    return ("{ " + ("" if stats else layer_norm_stats_c(w, x, n.attrs["eps"], m, r) + " ") + "real mg = 0, mgy = 0; "
            + _c_for(w, f"{{ mg += {g}; mgy += ({g}) * ({y}); }}", "mg, mgy")
            + f" mg = mg / (real){w}; mgy = mgy / (real){w}; "
            + _c_for(w, f"{dst}[j] = {r} * (({g}) - mg - ({y}) * mgy);") + " }")


def _layer_norm_grad_triton(n, g, x):
    # rstd * (g - mean(g) - y * mean(g * y)), x's statistics computed again as in C (a helper of
    # kernels/triton_rows.py: its four row sums, each written once)
    return f"sg_layer_norm_grad({g}, {x}, cmask_{_row_width(n)}, {_row_width(n)}, {n.attrs['eps']!r})"


def _layer_norm_grad_shape(inputs, attrs):
    _floats(inputs)
    g, x = inputs
    if g.shape != x.shape:
        raise ShapeProblem(f"takes a gradient and an input of the same shape, got {g.shape} and {x.shape}")
    return g.shape, g.batched or x.batched, "float"


register("layer_norm_grad", kind="reduction", shape=_layer_norm_grad_shape,
         torch=_layer_norm_grad_torch,
         vjp=lambda n, g: composite_vjp(_layer_norm_grad_composite(*n.inputs, n.attrs["eps"]), n.inputs, g),
         triton=_layer_norm_grad_triton,
         c=_layer_norm_grad_c,
         doc="the derivative of layer_norm w.r.t. its input, given the output gradient g and the input x")


def _layer_norm_triton(n, a):
    w = _row_width(n)
    mean = f"(tl.sum(tl.where(cmask_{w}, {a}, 0.0), axis=1)[:, None] / {float(w)})"
    xc = f"tl.where(cmask_{w}, {a} - {mean}, 0.0)"
    var = f"(tl.sum({xc} * {xc}, axis=1)[:, None] / {float(w)})"
    # times the reciprocal, as the C kernel and the Triton generator's split rows (from_row_stats) do
    return f"({xc} * (1.0 / tl.sqrt({var} + {n.attrs['eps']!r})))"


def _layer_norm_c(n, dst, w, x, stats=None):
    # (x - mean) * rstd; `stats` as for _layer_norm_grad_c
    m, r = stats or ("m", "r")
    return ("{ " + ("" if stats else layer_norm_stats_c(w, x, n.attrs["eps"], m, r) + " ")
            + _c_for(w, f"{dst}[j] = {_centred_c(x, m)} * {r};") + " }")


register("layer_norm", kind="reduction", shape=_layer_norm_shape,
         torch=lambda n, x: F.layer_norm(x, n.shape[-1:], eps=n.attrs["eps"]),
         vjp=_layer_norm_vjp, triton=_layer_norm_triton, c=_layer_norm_c,
         doc="normalises the last dim to zero mean and unit variance (no affine part)", cheap=True,
         # with eps=0 a constant row (a padded row of zeros) divides by 0: padded rows get 0, 1, 0, 1...
         pole=lambda n: 0 if n.attrs["eps"] == 0 else None,
         pole_fill="(torch.arange({x}.shape[-1], device={x}.device) % 2).to({x}.dtype)")


def _sum_to_shape(inputs, attrs):
    (a,) = inputs
    shape, batched = tuple(attrs["shape"]), attrs["batched"]
    if batched and not a.batched:
        raise ShapeProblem("cannot reduce an unbatched value to a batched one")
    try:
        if broadcast_shapes(a.shape, shape) != a.shape:
            raise ShapeProblem("")
    except ShapeProblem:
        raise ShapeProblem(f"cannot reduce shape {a.shape} to {shape}") from None
    return shape, batched, "float"


def _sum_to_torch(n, x):
    (a,) = n.inputs
    lead = len(a.shape) - len(n.shape)
    off = 1 if a.batched else 0
    dims = list(range(off, off + lead))
    dims += [off + lead + i for i, s in enumerate(n.shape) if s == 1 and a.shape[lead + i] != 1]
    if a.batched and not n.attrs["batched"]:
        dims = [0] + dims
    y = x.sum(dims, keepdim=True) if dims else x
    return y.reshape((x.shape[0],) + n.shape if n.attrs["batched"] else n.shape)


def _sum_to_vjp(n, g):
    (a,) = n.inputs
    if a.batched != n.batched:
        raise NotImplementedError("the derivative of a batch reduction (a second-order gradient) "
                                  "is not supported")
    return (make("broadcast_to", (g,), shape=a.shape),)


def _sum_to_row(n) -> tuple | None:
    """Why a kernel cannot compute sum_to `n` within a row, or None: it sums a row of values to
    its shape, to one value ((1,) or ()) or to itself."""
    src = n.inputs[0]
    if src.batched != n.batched or len(n.shape) > 1 or len(src.shape) > 1:
        return (NOT_FUSED, "sums over the batch or broadcast dims; the plan runs it outside the step")
    return None


def _sum_to_triton(n, a):
    src, why = n.inputs[0], _sum_to_row(n)
    if why:
        return why
    if n.elements == src.elements:  # (W,) to itself, or one value between () and (1,)
        return a
    return f"tl.sum(tl.where(cmask_{src.shape[-1]}, {a}, 0.0), axis=1)[:, None]"


def _sum_to_c(n, dst, w, x):
    why = _sum_to_row(n)
    if why:
        return why
    if n.elements == n.inputs[0].elements:
        return _c_for(w, f"{dst}[j] = {x};")
    return _sum_c(n, dst, w, x)


register("sum_to", kind="reduction", shape=_sum_to_shape, torch=_sum_to_torch, vjp=_sum_to_vjp,
         triton=_sum_to_triton, c=_sum_to_c, c_grid=_total_c_grid,
         doc="sums a gradient back to an operand's shape; to an unbatched shape it sums the batch too", sums_rows=True)


def _broadcast_to_shape(inputs, attrs):
    (a,) = inputs
    shape = tuple(attrs["shape"])
    if broadcast_shapes(a.shape, shape) != shape:
        raise ShapeProblem(f"cannot broadcast shape {a.shape} to {shape}")
    return shape, a.batched, a.dtype


def _broadcast_to_torch(n, x):
    (a,) = n.inputs
    if a.batched:
        x = x.reshape(x.shape[0], *([1] * (len(n.shape) - len(a.shape))), *a.shape)
        return x.expand(x.shape[0], *n.shape)
    return x.expand(*n.shape)


register("broadcast_to", kind="layout", shape=_broadcast_to_shape, torch=_broadcast_to_torch,
         vjp=lambda n, g: (sum_to(g, n.inputs[0]),),
         triton=lambda n, a: a if n.shape[-1:] == n.inputs[0].shape[-1:] or not n.shape else
         f"({a} + tl.zeros_like(tl.where(cmask_{n.shape[-1]}, 0.0, 0.0)))",
         c=lambda n, a: a, cheap=True)  # a row of one value read at column 0 (the C generator aliases it)


# ---------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------
def _concat_shape(inputs, attrs):
    if not inputs:
        raise ShapeProblem("concat needs at least one operand")
    ref = inputs[0]
    rank = len(ref.shape)
    if rank == 0:
        raise ShapeProblem("cannot concat values with no per-example dims")
    d = norm_dim(attrs["dim"], rank)
    attrs["dim"] = d
    total = 0
    for i in inputs:
        if len(i.shape) != rank or any(s != t for k, (s, t) in enumerate(zip(i.shape, ref.shape)) if k != d):
            raise ShapeProblem(f"concat along dim {d} needs equal other dims, got {ref.shape} and {i.shape}")
        if i.dtype != ref.dtype:
            raise ShapeProblem(f"concat needs one dtype, got {ref.dtype} and {i.dtype}")
        total += i.shape[d]
    if len({i.batched for i in inputs}) != 1:
        raise ShapeProblem("concat cannot mix batched values with parameters")
    shape = list(ref.shape)
    shape[d] = total
    return tuple(shape), ref.batched, ref.dtype


def _concat_vjp(n, g):
    out, start = [], 0
    for i in n.inputs:
        stop = start + i.shape[n.attrs["dim"]]
        out.append(make("slice", (g,), dim=n.attrs["dim"], start=start, stop=stop))
        start = stop
    return tuple(out)


register("concat", kind="layout", shape=_concat_shape,
         torch=lambda n, *xs: torch.cat(xs, _tdim(n, n.attrs["dim"])), vjp=_concat_vjp,
         triton=lambda n, *a: (NOT_FUSED, "concat is a store layout, handled by the kernel generator"),
         c=(NOT_FUSED, "concat is a layout, handled by the C generator"), cheap=True)


def _slice_shape(inputs, attrs):
    (a,) = inputs
    d = norm_dim(attrs["dim"], len(a.shape))
    attrs["dim"] = d
    start, stop = attrs["start"], attrs["stop"]
    if stop <= start:
        raise ShapeProblem(f"slice [{start}:{stop}] of dim {d} has length {stop - start}; a slice needs a "
                           f"positive length")
    if not 0 <= start < stop <= a.shape[d]:
        raise ShapeProblem(f"slice [{start}:{stop}] is out of range for dim {d} of size {a.shape[d]}")
    shape = list(a.shape)
    shape[d] = stop - start
    return tuple(shape), a.batched, a.dtype


def _slice_vjp(n, g):
    (a,) = n.inputs
    d = n.attrs["dim"]
    return (make("pad", (g,), dim=d, before=n.attrs["start"], after=a.shape[d] - n.attrs["stop"]),)


register("slice", kind="layout", shape=_slice_shape,
         torch=lambda n, x: x.narrow(_tdim(n, n.attrs["dim"]), n.attrs["start"], n.attrs["stop"] - n.attrs["start"]),
         vjp=_slice_vjp,
         triton=lambda n, a: (NOT_FUSED, "slice is a load layout, handled by the kernel generator"),
         c=(NOT_FUSED, "slice is a layout, handled by the C generator"), cheap=True)


def _pad_shape(inputs, attrs):
    (a,) = inputs
    d = norm_dim(attrs["dim"], len(a.shape))
    attrs["dim"] = d
    shape = list(a.shape)
    shape[d] += attrs["before"] + attrs["after"]
    return tuple(shape), a.batched, a.dtype


def _pad_torch(n, x):
    d = _tdim(n, n.attrs["dim"])
    pads = [0, 0] * (x.dim() - 1 - d) + [n.attrs["before"], n.attrs["after"]]
    return F.pad(x, pads)


register("pad", kind="layout", shape=_pad_shape, torch=_pad_torch,
         vjp=lambda n, g: (make("slice", (g,), dim=n.attrs["dim"], start=n.attrs["before"],
                                stop=n.attrs["before"] + n.inputs[0].shape[n.attrs["dim"]]),),
         triton=lambda n, a: (NOT_FUSED, "pad is a store layout, handled by the kernel generator"),
         c=(NOT_FUSED, "pad is a layout, handled by the C generator"),
         doc="zeros around a value along one dim (the derivative of slice)", cheap=True)


def _reshape_shape(inputs, attrs):
    (a,) = inputs
    shape = list(attrs["shape"])
    if shape.count(-1) > 1:
        raise ShapeProblem("reshape takes at most one -1")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if rest == 0 or a.elements % rest:
            raise ShapeProblem(f"cannot reshape {a.shape} to {tuple(attrs['shape'])}")
        shape[shape.index(-1)] = a.elements // rest
    if math.prod(shape) != a.elements:
        raise ShapeProblem(f"cannot reshape {a.shape} ({a.elements} elements) to {tuple(shape)}")
    attrs["shape"] = tuple(shape)
    return tuple(shape), a.batched, a.dtype


register("reshape", kind="layout", shape=_reshape_shape,
         torch=lambda n, x: x.reshape(((x.shape[0],) if n.batched else ()) + n.shape),
         vjp=lambda n, g: (reshape(g, n.inputs[0].shape),),
         triton=lambda n, a: a if len(n.shape) <= 1 and (n.shape[-1:] == n.inputs[0].shape[-1:] or
                                                          n.elements == n.inputs[0].elements == 1)
         else (NOT_FUSED, "reshape changes the row layout"),  # (one value is one column, () or (1,))
         c=lambda n, a: a, cheap=True)  # the flattened row is unchanged (the C generator aliases it)


def _transpose_shape(inputs, attrs):
    (a,) = inputs
    shape = list(a.shape)
    d0, d1 = norm_dim(attrs["d0"], len(shape)), norm_dim(attrs["d1"], len(shape))
    attrs["d0"], attrs["d1"] = d0, d1
    shape[d0], shape[d1] = shape[d1], shape[d0]
    return tuple(shape), a.batched, a.dtype


register("transpose", kind="layout", shape=_transpose_shape,
         torch=lambda n, x: x.transpose(_tdim(n, n.attrs["d0"]), _tdim(n, n.attrs["d1"])),
         vjp=lambda n, g: (make("transpose", (g,), d0=n.attrs["d0"], d1=n.attrs["d1"]),),
         triton=lambda n, a: (NOT_FUSED, "transpose changes the row layout"),
         c=(NOT_FUSED, "transpose changes the row layout"))


# ---------------------------------------------------------------------------------------
# matrix products and lookups
# ---------------------------------------------------------------------------------------
def _linear_shape(inputs, attrs):
    x, w = inputs
    _floats(inputs)
    if w.batched or len(w.shape) != 2:
        raise ShapeProblem("the weight of linear must be an unbatched (out, in) matrix")
    if not x.shape or x.shape[-1] != w.shape[1]:
        got = x.shape[-1] if x.shape else "a scalar"
        raise ShapeProblem(f"expects {w.shape[1]} input features but its input {mention(x)} has {got}")
    return x.shape[:-1] + (w.shape[0],), x.batched, "float"


register("linear", kind="matmul", shape=_linear_shape,
         torch=lambda n, x, w: F.linear(x, w),
         vjp=lambda n, g: (make("linear", (g, transpose(n.inputs[1], 0, 1))),
                           make("linear_wgrad", (g, n.inputs[0]))),
         triton=lambda n, *a: (NOT_FUSED, "matrix products run through torch (cuBLAS/oneDNN)"),
         c=(NOT_FUSED, "matrix products run as GEMM stages (MKL, oneDNN or seqgraph's own GEMM)"),
         doc="x @ W.T for a weight W of shape (out, in)")


def _wgrad_shape(inputs, attrs):
    g, x = inputs
    if g.shape[:-1] != x.shape[:-1] or g.batched != x.batched:
        raise ShapeProblem(f"linear_wgrad needs matching leading dims, got {g.shape} and {x.shape}")
    return (g.shape[-1], x.shape[-1]), False, "float"


def _wgrad_torch(n, g, x):
    rows = math.prod(g.shape[:-1])  # not -1: a feature size of 0 leaves it ambiguous
    return g.reshape(rows, g.shape[-1]).t() @ x.reshape(rows, x.shape[-1])


register("linear_wgrad", kind="matmul", shape=_wgrad_shape, torch=_wgrad_torch,
         vjp=lambda n, g: (make("linear", (n.inputs[1], g)),
                           make("linear", (n.inputs[0], transpose(g, 0, 1)))),
         triton=lambda n, *a: (NOT_FUSED, "matrix products run through torch (cuBLAS/oneDNN)"),
         c=(NOT_FUSED, "matrix products run as GEMM stages (MKL, oneDNN or seqgraph's own GEMM)"),
         doc="sum over batch (and leading dims) of g^T x: the weight gradient of linear", sums_rows=True)


def _matmul_shape(inputs, attrs):
    a, b = inputs
    _floats(inputs)
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise ShapeProblem(f"matmul needs operands with at least 2 per-example dims, got {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ShapeProblem(f"matmul contracts {a.shape[-1]} against {b.shape[-2]} (shapes {a.shape} @ {b.shape})")
    lead = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return lead + (a.shape[-2], b.shape[-1]), a.batched or b.batched, "float"


register("matmul", kind="matmul", shape=_matmul_shape,
         torch=lambda n, x, y: torch.matmul(*_aligned(n, (x, y))),
         vjp=lambda n, g: _bin_grads(n, make("matmul", (g, transpose(n.inputs[1]))),
                                     make("matmul", (transpose(n.inputs[0]), g))),
         triton=lambda n, *a: (NOT_FUSED, "matrix products run through torch (cuBLAS/oneDNN)"),
         c=(NOT_FUSED, "matrix products run as GEMM stages (MKL, oneDNN or seqgraph's own GEMM)"),
         doc="batched matrix product over the last two per-example dims")


# Per-example matrix-vector products, row by row: an attention step's scores (memory @ query)
# and weighted sum (weights @ memory). The per-example matrix comes flattened into a row of
# M*N columns (row-major), so each op reads and writes rows and fuses into row kernels; the
# pass flatten_per_example_matrices writes them in for the matmul and sum(mul) forms users write.
def _product_shape(matrix_first: bool):
    """The shape rule of matvec (matrix, vector: the matrix's M rows) or vecmat (vector, matrix:
    its N columns): a flattened matrix whose size the vector's divides."""
    what = "a flattened (M, N) matrix and an (N,) vector" if matrix_first else \
        "an (M,) vector and a flattened (M, N) matrix"

    def shape(inputs, attrs):
        _floats(inputs)
        a, v = inputs if matrix_first else inputs[::-1]
        if len(a.shape) != 1 or len(v.shape) != 1 or not v.shape[0] or a.shape[0] % v.shape[0]:
            got = (a.shape, v.shape) if matrix_first else (v.shape, a.shape)
            raise ShapeProblem(f"{'matvec' if matrix_first else 'vecmat'} takes {what}, got {got[0]} and {got[1]}")
        return (a.shape[0] // v.shape[0],), a.batched or v.batched, "float"
    return shape


def _outer_shape(inputs, attrs):
    u, v = inputs
    _floats(inputs)
    if len(u.shape) != 1 or len(v.shape) != 1:
        raise ShapeProblem(f"outer takes two vectors, got {u.shape} and {v.shape}")
    return (u.shape[0] * v.shape[0],), u.batched or v.batched, "float"


def matvec(a: Node, q: Node) -> Node:
    """a (a flattened (M, N) matrix) @ q (N,): (M,)."""
    return make("matvec", (a, q))


def vecmat(v: Node, a: Node) -> Node:
    """v (M,) @ a (a flattened (M, N) matrix): (N,)."""
    return make("vecmat", (v, a))


def outer(u: Node, v: Node) -> Node:
    """u (M,) times v (N,) as a flattened (M, N) matrix."""
    return make("outer", (u, v))


def _at_column(x: str, index: str) -> str:
    """A row value's C expression (its pointer indexed by the column `j`, its one column, or a
    literal) at column `index` instead."""
    return x.replace("[j]", f"[{index}]")


def _matvec_c(n, dst, w, a, q):
    M, N = n.shape[0], n.inputs[1].shape[0]
    return (f"for (int64_t m = 0; m < {M}; ++m) {{ real acc = 0; "
            + _c_for(N, f"acc += {_at_column(a, f'm * {N} + j')} * {q};", "acc") + f" {dst}[m] = acc; }}")


def _vecmat_c(n, dst, w, v, a):
    M, N = n.inputs[0].shape[0], n.shape[0]
    return ("{ " + _c_for(N, f"{dst}[j] = 0;") + f" for (int64_t m = 0; m < {M}; ++m) {{ "
            f"real vm = {_at_column(v, 'm')}; " + _c_for(N, f"{dst}[j] += vm * {_at_column(a, f'm * {N} + j')};")
            + " } }")


def _outer_c(n, dst, w, u, v):
    M, N = n.inputs[0].shape[0], n.inputs[1].shape[0]
    return (f"for (int64_t m = 0; m < {M}; ++m) {{ real um = {_at_column(u, 'm')}; "
            + _c_for(N, f"{dst}[m * {N} + j] = um * {v};") + " }")


# Triton emitters of the row ops. A kernel holds a row of an (M, N) matrix as one tile of
# BM * BN register columns, BM and BN the powers of two at or above M and N: column
# m * BN + n holds the matrix's (m, n) (codegen.py lays out every value of that width so).
# When N is a power of two that is the row's own layout; either way `tl.reshape` turns the
# tile into a [BM, BN] matrix tile (kernels/triton_rows.py), and products, broadcasts and
# sums along either dim are plain tile arithmetic. Padding rows and columns hold anything:
# every sum over them masks them out, and nothing stores them.
def block_width(w: int) -> int:
    """The power-of-two number of register columns a Triton kernel's tile of w values spans."""
    return 1 << max(0, (w - 1).bit_length())


def _tri_matrix(x: str, M: int, N: int) -> str:
    return f"sg_matrix({x}, {block_width(M)}, {block_width(N)})"


def _tri_sum(x: str, M: int, N: int, axis: int) -> str:
    """A [R, BM, BN] tile summed along its axis 1 (the M rows) or 2 (the N columns), the padding
    along that axis masked out (nothing to mask where the size is a power of two)."""
    size = M if axis == 1 else N
    if size != block_width(size):
        inside = f"sg_rows_below({M}, {block_width(M)})" if axis == 1 else f"sg_cols_below({N}, {block_width(N)})"
        x = f"tl.where({inside}, {x}, 0.0)"
    return f"tl.sum({x}, axis={axis})"


def _matvec_triton(n, a, q):
    M, N = n.shape[0], n.inputs[1].shape[0]
    return _tri_sum(f"{_tri_matrix(a, M, N)} * ({q})[:, None, :]", M, N, axis=2)


def _vecmat_triton(n, v, a):
    M, N = n.inputs[0].shape[0], n.shape[0]
    return _tri_sum(f"{_tri_matrix(a, M, N)} * ({v})[:, :, None]", M, N, axis=1)


def _outer_triton(n, u, v):
    return f"sg_flat(({u})[:, :, None] * ({v})[:, None, :])"


def _tile_triton(n, x):
    M, N = n.attrs["times"], n.inputs[0].shape[0]
    return f"sg_flat(({x})[:, None, :] + tl.zeros((1, {block_width(M)}, {block_width(N)}), tl.float32))"


def _repeat_each_triton(n, x):
    N = n.attrs["times"]
    return f"sg_flat(({x})[:, :, None] + tl.zeros((1, 1, {block_width(N)}), tl.float32))"


def _sum_tiles_triton(n, x):
    M, N = n.attrs["times"], n.shape[0]
    return _tri_sum(_tri_matrix(x, M, N), M, N, axis=1)


def _sum_groups_triton(n, x):
    M, N = n.shape[0], n.attrs["times"]
    return _tri_sum(_tri_matrix(x, M, N), M, N, axis=2)


def _softmax_groups_triton(n, x):
    M, N = n.shape[0] // n.attrs["times"], n.attrs["times"]
    return f"sg_softmax_groups({x}, {block_width(M)}, {N}, {block_width(N)})"


# The row ops inside a C loop over their matrix (GridRule): `m` and `n_` index its rows and
# columns; an operand read there is a vector of M (at m) or N (at n_) values, or the matrix
# itself at j.
def _matvec_c_grid(n, a, q):
    return GridRule(n.shape[0], n.inputs[1].shape[0], "row_sum", f"{a} * {_at_column(q, 'n_')}", 0)


def _vecmat_c_grid(n, v, a):
    return GridRule(n.inputs[0].shape[0], n.shape[0], "column_sum", f"{_at_column(v, 'm')} * {a}", 1)


def _outer_c_grid(n, u, v):
    return GridRule(n.inputs[0].shape[0], n.inputs[1].shape[0], "value",
                    f"({_at_column(u, 'm')} * {_at_column(v, 'n_')})", None)


register("matvec", kind="reduction", shape=_product_shape(True),
         torch=lambda n, a, q: (a.unflatten(-1, (n.shape[0], -1)) @ q.unsqueeze(-1)).squeeze(-1),
         vjp=lambda n, g: _bin_grads(n, outer(g, n.inputs[1]), vecmat(g, n.inputs[0])),
         triton=_matvec_triton, c=_matvec_c, c_grid=_matvec_c_grid,
         doc="a flattened per-example (M, N) matrix times an (N,) vector")
register("vecmat", kind="reduction", shape=_product_shape(False),
         torch=lambda n, v, a: (v.unsqueeze(-2) @ a.unflatten(-1, (-1, n.shape[0]))).squeeze(-2),
         vjp=lambda n, g: _bin_grads(n, matvec(n.inputs[1], g), outer(n.inputs[0], g)),
         triton=_vecmat_triton, c=_vecmat_c, c_grid=_vecmat_c_grid,
         doc="an (M,) vector times a flattened per-example (M, N) matrix")
register("outer", kind="reduction", shape=_outer_shape,
         torch=lambda n, u, v: (u.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2),
         vjp=lambda n, g: _bin_grads(n, matvec(g, n.inputs[1]), vecmat(n.inputs[0], g)),
         triton=_outer_triton, c=_outer_c, c_grid=_outer_c_grid, cheap=True,  # (one product a value, as mul)
         doc="the outer product of two vectors, flattened row-major")


# A row broadcast along a per-example matrix's other dim, and the sums that undo it: `tile`
# repeats an (N,) row `times` times end to end (the same row for every row of an (M, N)
# matrix), `repeat_each` repeats each of an (M,) row's values `times` times (one value per row
# of the matrix); `sum_tiles` and `sum_groups` are their derivatives (the matrix's column and
# row sums). flatten_per_example_matrices writes them for broadcasting and sums over a dim.
def _times_shape(grow: bool | None):
    """grow: the row grows `times`-fold (True), shrinks by it (False) or keeps its size (None)."""
    def shape(inputs, attrs):
        (x,) = inputs
        _floats(inputs)
        k = attrs["times"]
        if len(x.shape) != 1 or k < 1 or (not grow and x.shape[0] % k):
            raise ShapeProblem(f"takes a vector{'' if grow else f' whose size is a multiple of {k}'} and a "
                               f"positive count, got shape {x.shape} and {k}")
        size = x.shape[0] if grow is None else x.shape[0] * k if grow else x.shape[0] // k
        return (size,), x.batched, "float"
    return shape


def _tile_c(n, dst, w, x):
    M, N = n.attrs["times"], n.inputs[0].shape[0]
    return f"for (int64_t m = 0; m < {M}; ++m) {{ " + _c_for(N, f"{dst}[m * {N} + j] = {x};") + " }"


def _repeat_each_c(n, dst, w, x):
    M, N = n.inputs[0].shape[0], n.attrs["times"]
    return (f"for (int64_t m = 0; m < {M}; ++m) {{ real xm = {_at_column(x, 'm')}; "
            + _c_for(N, f"{dst}[m * {N} + j] = xm;") + " }")


def _sum_tiles_c(n, dst, w, x):
    M, N = n.attrs["times"], n.shape[0]
    return ("{ " + _c_for(N, f"{dst}[j] = 0;") + f" for (int64_t m = 0; m < {M}; ++m) {{ "
            + _c_for(N, f"{dst}[j] += {_at_column(x, f'm * {N} + j')};") + " } }")


def _sum_groups_c(n, dst, w, x):
    M, N = n.shape[0], n.attrs["times"]
    return (f"for (int64_t m = 0; m < {M}; ++m) {{ real acc = 0; "
            + _c_for(N, f"acc += {_at_column(x, f'm * {N} + j')};", "acc") + f" {dst}[m] = acc; }}")


register("tile", kind="reduction", shape=_times_shape(True),
         torch=lambda n, x: x.unsqueeze(-2).expand(*x.shape[:-1], n.attrs["times"], x.shape[-1]).flatten(-2),
         vjp=lambda n, g: (make("sum_tiles", (g,), times=n.attrs["times"]),),
         triton=_tile_triton, c=_tile_c, cheap=True,
         c_grid=lambda n, x: GridRule(n.attrs["times"], n.inputs[0].shape[0], "value", _at_column(x, "n_"), None),
         doc="an (N,) row repeated `times` times end to end")
register("repeat_each", kind="reduction", shape=_times_shape(True),
         torch=lambda n, x: x.unsqueeze(-1).expand(*x.shape, n.attrs["times"]).flatten(-2),
         vjp=lambda n, g: (make("sum_groups", (g,), times=n.attrs["times"]),),
         triton=_repeat_each_triton, c=_repeat_each_c, cheap=True,
         c_grid=lambda n, x: GridRule(n.inputs[0].shape[0], n.attrs["times"], "value", _at_column(x, "m"), None),
         doc="each value of an (M,) row repeated `times` times")
register("sum_tiles", kind="reduction", shape=_times_shape(False),
         torch=lambda n, x: x.unflatten(-1, (n.attrs["times"], -1)).sum(-2),
         vjp=lambda n, g: (make("tile", (g,), times=n.attrs["times"]),),
         triton=_sum_tiles_triton, c=_sum_tiles_c,
         c_grid=lambda n, x: GridRule(n.attrs["times"], n.shape[0], "column_sum", x, 0),
         doc="the sum of a row's `times` equal parts (a matrix's column sums)")
register("sum_groups", kind="reduction", shape=_times_shape(False),
         torch=lambda n, x: x.unflatten(-1, (-1, n.attrs["times"])).sum(-1),
         vjp=lambda n, g: (make("repeat_each", (g,), times=n.attrs["times"]),),
         triton=_sum_groups_triton, c=_sum_groups_c,
         c_grid=lambda n, x: GridRule(n.shape[0], n.attrs["times"], "row_sum", x, 0),
         doc="the sums of each `times` consecutive values (a matrix's row sums)")


# Products of two per-example matrices (a multi-head attention step's (heads, 1, D) queries times
# its (heads, D, S) keys, and its weights times the values), row by row: each operand and the
# result is a flattened per-example array, and the op's attributes say how to read it as
# (G, M, K), (G, K, N) and write (G, M, N): `dims` (G, M, K, N) and a stride per dim within the
# flat row (`sa`, `sb`, `so`). A transposed or reshaped view of a row is then its strides, with
# no copy. Every layout must visit each element of its row once (a permuted row-major layout);
# so the derivatives write straight into their operands' layouts.
def _layout_fits(sizes: tuple, strides: tuple, total: int) -> bool:
    """Whether (sizes, strides) visit each of `total` flat elements exactly once."""
    dims = sorted((st, sz) for sz, st in zip(sizes, strides) if sz != 1)
    span = 1
    for st, sz in dims:
        if st != span:
            return False
        span *= sz
    return span == total


def _strided_matmul_shape(inputs, attrs):
    _floats(inputs)
    a, b = inputs
    G, M, K, N = attrs["dims"]
    sa, sb, so = attrs["sa"], attrs["sb"], attrs["so"]
    if len(a.shape) != 1 or len(b.shape) != 1 or a.shape[0] != G * M * K or b.shape[0] != G * K * N:
        raise ShapeProblem(f"strided_matmul with dims (G, M, K, N) = {(G, M, K, N)} takes flat rows of {G * M * K} "
                           f"and {G * K * N} values, got shapes {a.shape} and {b.shape}")
    for what, sizes, st in (("a", (G, M, K), sa), ("b", (G, K, N), sb), ("out", (G, M, N), so)):
        if len(st) != 3 or not _layout_fits(sizes, st, math.prod(sizes)):
            raise ShapeProblem(f"strided_matmul: the strides {st} of {what} do not lay out a {sizes} array "
                               f"over its flat row once")
    return (G * M * N,), a.batched or b.batched, "float"


def _outer_first(sizes: tuple, strides: tuple) -> list[int]:
    """The dims of a layout from its largest stride to its smallest (the row-major order it is)."""
    return sorted(range(len(sizes)), key=lambda d: (-strides[d] if sizes[d] != 1 else 0, d))


def _read_strided(x: torch.Tensor, sizes: tuple, strides: tuple) -> torch.Tensor:
    """x (..., W) as (..., *sizes) read through `strides` of its last dim."""
    order = _outer_first(sizes, strides)
    lead = x.dim() - 1
    y = x.unflatten(-1, [sizes[d] for d in order])
    return y.permute(*range(lead), *[lead + order.index(d) for d in range(len(sizes))])


def _write_strided(y: torch.Tensor, strides: tuple) -> torch.Tensor:
    """y (..., *sizes) laid out through `strides` as one flat last dim."""
    sizes = tuple(y.shape[y.dim() - len(strides):])
    order = _outer_first(sizes, strides)
    lead = y.dim() - len(sizes)
    return y.permute(*range(lead), *[lead + d for d in order]).reshape(*y.shape[:lead], math.prod(sizes))


def strided_matmul(a: Node, b: Node, dims: tuple, sa: tuple, sb: tuple, so: tuple) -> Node:
    """Per example, (G, M, K) read from row a through strides sa times (G, K, N) read from row b
    through sb, written through so: a flat (G*M*N,) row."""
    return make("strided_matmul", (a, b), dims=tuple(dims), sa=tuple(sa), sb=tuple(sb), so=tuple(so))


def _strided_matmul_torch(n, a, b):
    G, M, K, N = n.attrs["dims"]
    A, B = _read_strided(a, (G, M, K), n.attrs["sa"]), _read_strided(b, (G, K, N), n.attrs["sb"])
    return _write_strided(A @ B, n.attrs["so"])


def _strided_matmul_vjp(n, g):
    """dA = dC @ B^T, laid out as A; dB = A^T @ dC, laid out as B (transposes are strides)."""
    a, b = n.inputs
    G, M, K, N = n.attrs["dims"]
    (ag, am, ak), (bg, bk, bn), so = n.attrs["sa"], n.attrs["sb"], n.attrs["so"]
    ga = strided_matmul(g, b, (G, M, N, K), so, (bg, bn, bk), (ag, am, ak))
    gb = strided_matmul(a, g, (G, K, M, N), (ag, ak, am), so, (bg, bk, bn))
    return _bin_grads(n, ga, gb)


def _strided_matmul_c(n, dst, w, a, b):
    """A dot product over k per output where b runs along k (or nothing runs along n); else,
    where b and the output run along n, rows of b added in, scaled (both vectorise)."""
    G, M, K, N = n.attrs["dims"]
    (ag, am, ak), (bg, bk, bn), (og, om, on) = n.attrs["sa"], n.attrs["sb"], n.attrs["so"]
    loops = f"for (int64_t g_ = 0; g_ < {G}; ++g_) for (int64_t m_ = 0; m_ < {M}; ++m_) "
    at_a, at_b = f"g_ * {ag} + m_ * {am}", f"g_ * {bg}"
    if bk == 1 or bn != 1 or on != 1:
        return ("{ " + loops + f"for (int64_t n_ = 0; n_ < {N}; ++n_) {{ real acc = 0; "
                + _c_for(K, f"acc += {_at_column(a, f'{at_a} + j * {ak}')} * "
                            f"{_at_column(b, f'{at_b} + j * {bk} + n_ * {bn}')};", "acc")
                + f" {dst}[g_ * {og} + m_ * {om} + n_ * {on}] = acc; }} }}")
    row = f"{dst}[g_ * {og} + m_ * {om} + j]"
    return ("{ " + loops + "{ " + _c_for(N, f"{row} = 0;")
            + f" for (int64_t k_ = 0; k_ < {K}; ++k_) {{ real amk = {_at_column(a, f'{at_a} + k_ * {ak}')}; "
            + _c_for(N, f"{row} += amk * {_at_column(b, f'{at_b} + k_ * {bk} + j')};") + " } } }")


register("strided_matmul", kind="reduction", shape=_strided_matmul_shape, torch=_strided_matmul_torch,
         vjp=_strided_matmul_vjp, c=_strided_matmul_c,
         triton=(NOT_FUSED, "a Triton kernel would read its operands through their strides, which takes "
                            "tl.gather (unverified on a GPU); torch (cuBLAS's batched products) computes it"),
         doc="per example, a product of two matrices read from flat rows through strides")


# softmax along the last dim of a per-example matrix, flattened: over each `times` consecutive values
def _softmax_groups_c(n, dst, w, x):
    M, N = n.shape[0] // n.attrs["times"], n.attrs["times"]
    xm = _at_column(x, f"m * {N} + j")
    row = f"{dst}[m * {N} + j]"
    return (f"for (int64_t m = 0; m < {M}; ++m) {{ real mx = -(real)INFINITY; " + _c_for(N, f"mx = sg_max(mx, {xm});")
            + " real s = 0; " + _c_for(N, f"{{ real e = sg_exp({xm} - mx); {row} = e; s += e; }}", "s") + " "
            + _c_for(N, f"{row} = {row} / s;") + " }")


def _softmax_groups_vjp(n, g):
    k = n.attrs["times"]
    return (mul(n, sub(g, make("repeat_each", (make("sum_groups", (mul(g, n),), times=k),), times=k))),)


register("softmax_groups", kind="reduction", shape=_times_shape(None),
         torch=lambda n, x: torch.softmax(x.unflatten(-1, (-1, n.attrs["times"])), -1).flatten(-2),
         vjp=_softmax_groups_vjp, triton=_softmax_groups_triton, c=_softmax_groups_c,
         doc="softmax over each `times` consecutive values (a per-example matrix's rows)")


def _embedding_shape(inputs, attrs):
    idx, w = inputs
    if idx.dtype != "long":
        raise ShapeProblem(f"embedding indices must be integers, got dtype {idx.dtype}")
    if w.batched or len(w.shape) != 2:
        raise ShapeProblem("the embedding table must be an unbatched (num, dim) matrix")
    return idx.shape + (w.shape[1],), idx.batched, "float"


def _embedding_named(n) -> str:
    """`Embedding 'embed' (declared at f.py:3)`, or without a name for an unnamed one (never an
    internal label; str() of the site: the tracer formats no dataclass)."""
    return f"Embedding{f' {n.name!r}' if n.name else ''} (declared at {str(n.site)})"


def _index_error_text(n, num: int) -> str:
    """The message of an index out of range, checked on the device."""
    return f"{_embedding_named(n)} has {num} rows and got an index outside them"


def _embedding_torch(n, idx, w):
    pad = n.attrs.get("padding_idx")
    num = w.shape[0]
    if torch.compiler.is_compiling():  # a traced graph checks on the device, without reading the values
        torch._assert_async(((idx >= 0) & (idx < num)).all(), _index_error_text(n, num))
    elif idx.numel() and not idx.is_meta and (int(idx.min()) < 0 or int(idx.max()) >= num):  # (meta: no values)
        raise IndexError(f"{_embedding_named(n)} has {num} rows but got index "
                         f"{int(idx.min()) if int(idx.min()) < 0 else int(idx.max())}")
    out = F.embedding(idx, w, padding_idx=pad)  # (padding_idx: that row gets no gradient)
    if pad is not None and n.attrs.get("zero_padding"):
        out = out * (idx != pad).unsqueeze(-1).to(out.dtype)
    return out


register("embedding", kind="gather", shape=_embedding_shape, torch=_embedding_torch,
         vjp=lambda n, g: (None, make("embedding_wgrad", (g, n.inputs[0]), num=n.inputs[1].shape[0],
                                      padding_idx=n.attrs.get("padding_idx"))),
         triton=lambda n, *a: (NOT_FUSED, "lookups run through torch"),
         c=(NOT_FUSED, "lookups run through torch"),
         doc="rows of a table; the padding_idx row gets no gradient (as torch.nn.Embedding), and with "
             "zero_padding it reads as zeros (the derivative of embedding_wgrad)")


def _embedding_wgrad_torch(n, g, idx):
    num = n.attrs["num"]
    flat = idx.reshape(-1)
    gg = g.reshape(-1, g.shape[-1])
    pad = n.attrs.get("padding_idx")
    if pad is not None:
        gg = gg * (flat != pad).unsqueeze(-1).to(gg.dtype)
    return torch.zeros(num, g.shape[-1], dtype=g.dtype, device=g.device).index_add(0, flat, gg)


register("embedding_wgrad", kind="gather",
         shape=lambda i, a: ((a["num"], i[0].shape[-1]), False, "float"),
         torch=_embedding_wgrad_torch,
         vjp=lambda n, g: (make("embedding", (n.inputs[1], g), padding_idx=n.attrs.get("padding_idx"),
                                zero_padding=True), None),
         triton=lambda n, *a: (NOT_FUSED, "scatter-adds run through torch"),
         c=(NOT_FUSED, "scatter-adds run through torch"),
         doc="the table gradient of embedding (index_add over the batch)", sums_rows=True)


def triton_expr(node: Node, args: list[str]):
    """The Triton expression of `node` over operand expressions `args`, or `(NOT_FUSED, why)`."""
    tri = REGISTRY[node.op].triton
    if isinstance(tri, tuple):
        return tri
    return tri(node, *args)


def c_rule(node: Node):
    """The C emitter of `node`'s op, or `(NOT_FUSED, why)` (a reduction's rule may also refuse a node)."""
    return REGISTRY[node.op].c


def c_fusable(node: Node) -> tuple[bool, str]:
    """Whether a C kernel can compute `node` inline, and if not, why (ops.fusable's twin)."""
    rule = REGISTRY[node.op].c
    if isinstance(rule, tuple):
        return False, rule[1]
    if REGISTRY[node.op].kind == "reduction":
        width = node.inputs[0].shape[-1] if node.inputs[0].shape else 1
        probe = rule(node, "dst", width, *["x"] * len(node.inputs))
        if isinstance(probe, tuple):
            return False, probe[1]
    return True, ""


def fusable(node: Node) -> tuple[bool, str]:
    """Whether a Triton kernel can compute `node` inline, and if not, why."""
    out = triton_expr(node, ["x"] * len(node.inputs))
    if isinstance(out, tuple):
        return False, out[1]
    return True, ""


__all__ = ["REGISTRY", "OpDef", "GridRule", "register", "make", "NOT_FUSED", "LEAF_OPS", "triton_expr", "fusable", "c_rule",
           "c_fusable", "c_literal"]
