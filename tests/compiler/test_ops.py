"""Registry-driven op tests: every op in `ops.REGISTRY` has a row in `CASES` (or `LEAVES`).

For each case we build the node with `ops.make`, run it through the reference interpreter and
check (1) its value against a plain torch expression, (2) float64 gradcheck through the
interpreter, (3) the op's symbolic VJP rule: the gradient *graph* it builds, evaluated by the
interpreter, must equal torch.autograd's gradient of the op's torch rule, and have each
operand's shape. Inputs are kept away from non-differentiable points (kinks, ties, log/sqrt of
non-positive numbers). A new op without a case fails `test_every_registered_op_has_a_case`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import seqgraph as sg
from seqgraph.compiler import ops
from seqgraph.compiler.interpret import evaluate
from seqgraph.compiler.ir import Node, topo_order
from seqgraph.compiler.ops import REGISTRY

B = 3
DT = torch.float64
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------
# operand makers: each takes the full tensor shape and returns a float64 (or long) tensor
# ---------------------------------------------------------------------------------------
def normal(shape):
    return torch.randn(shape, dtype=DT)


def positive(shape):
    """Away from 0 for log, sqrt and division."""
    return 0.5 + torch.rand(shape, dtype=DT)


def away_from_zero(shape):
    """Values with |v| >= 0.2 of both signs, so relu/abs/sign have no kink within reach."""
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).to(DT)
    return sign * (0.2 + torch.rand(shape, dtype=DT))


def grid(shape):
    """Multiples of 0.2: paired with `grid_offset` operands they never tie."""
    return torch.randint(-8, 9, shape).to(DT) * 0.2


def grid_offset(shape):
    return torch.randint(-8, 9, shape).to(DT) * 0.2 + 0.1


def mask01(shape):
    """A 0/1 float mask (both values present in practice)."""
    return (torch.rand(shape) < 0.5).to(DT)


def indices(num):
    return lambda shape: torch.randint(0, num, shape)


@dataclass
class Operand:
    shape: tuple
    batched: bool = True
    dtype: str = "float"
    make: Callable = normal
    smooth: bool = True  # False: a 0/1 mask operand, not differentiated

    def leaf(self) -> Node:
        op = "input" if self.batched else "param"
        return ops.make(op, (), shape=self.shape, batched=self.batched, dtype=self.dtype)

    def value(self) -> torch.Tensor:
        return self.make(((B,) if self.batched else ()) + self.shape)


@dataclass
class Case:
    operands: list
    attrs: dict = field(default_factory=dict)
    ref: Callable | None = None  # plain torch expression over the operand values
    smooth: bool = True  # False: piecewise constant (comparisons, sign): no gradcheck
    id: str = ""
    # sum_to over the batch: its own derivative would be second order and raises (tested below)
    vjp_raises: bool = False


def P(*shape, make=normal):
    """An unbatched operand (a parameter)."""
    return Operand(tuple(shape), batched=False, make=make)


def X(*shape, make=normal, dtype="float"):
    """A batched operand (B, *shape)."""
    return Operand(tuple(shape), batched=True, make=make, dtype=dtype)


def M(*shape):
    """A batched 0/1 mask operand: float, but not differentiated (its derivative is zero a.e.)."""
    return Operand(tuple(shape), batched=True, make=mask01, smooth=False)


def _const(value):
    return Case(operands=[], attrs={"value": value})


def _binary(fn, a_make=normal, b_make=normal, smooth=True):
    """Cases for a binary elementwise op, covering every broadcasting rule."""
    return [
        Case([X(4, make=a_make), X(4, make=b_make)], ref=fn, smooth=smooth, id="same"),
        Case([X(4, make=a_make), P(4, make=b_make)], ref=fn, smooth=smooth, id="param_over_batch"),
        Case([P(4, make=a_make), X(4, make=b_make)], ref=fn, smooth=smooth, id="param_first"),
        Case([X(2, 4, make=a_make), X(4, make=b_make)], ref=lambda a, b: fn(a, b[:, None, :]),
             smooth=smooth, id="lower_rank_batched"),
        Case([X(4, make=a_make), X(2, 4, make=b_make)], ref=lambda a, b: fn(a[:, None, :], b),
             smooth=smooth, id="lower_rank_batched_second"),
        Case([X(2, 1, make=a_make), X(1, 3, make=b_make)], ref=fn, smooth=smooth, id="outer"),
        Case([P(3, 4, make=a_make), X(4, make=b_make)], ref=lambda a, b: fn(a, b[:, None, :]),
             smooth=smooth, id="param_matrix_batched_row"),
        Case([X(4, make=a_make), P(make=b_make)], ref=fn, smooth=smooth, id="scalar"),
        Case([P(make=a_make), X(2, 3, make=b_make)], ref=fn, smooth=smooth, id="scalar_first"),
    ]


def _unary(fn, make=normal):
    return [Case([X(5, make=make)], ref=fn, id="vector"), Case([X(2, 3, make=make)], ref=fn, id="matrix"),
            Case([P(4, make=make)], ref=fn, id="param")]


def _reduction(fn):
    cases = []
    for shape in ((4,), (3, 4)):
        for dim in range(-len(shape), len(shape)):
            for keepdim in (False, True):
                tdim = dim if dim < 0 else dim + 1
                cases.append(Case([X(*shape)], {"dim": dim, "keepdim": keepdim},
                                  ref=lambda a, d=tdim, k=keepdim: fn(a, d, k), id=f"{shape}-d{dim}-k{keepdim}"))
    return cases


def _embedding_ref(pad, zero_padding=False):
    def ref(idx, w):
        out = w[idx]
        if pad is not None and zero_padding:
            out = out * (idx != pad).unsqueeze(-1).to(out.dtype)
        return out
    return ref


def _embedding_wgrad_ref(num, pad):
    def ref(g, idx):
        out = torch.zeros(num, g.shape[-1], dtype=g.dtype)
        for pos, row in zip(idx.reshape(-1).tolist(), g.reshape(-1, g.shape[-1])):
            if pos != pad:
                out[pos] += row
        return out
    return ref


def _layer_norm_grad_ref(eps):
    def ref(g, x):  # the input gradient of layer_norm, by torch autograd
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
            return torch.autograd.grad(y, x, g, create_graph=True)[0]
    return ref


CASES: dict[str, list[Case]] = {
    "const": [_const(2.5), _const(-1.0)],
    "add": _binary(torch.add),
    "sub": _binary(torch.sub),
    "mul": _binary(torch.mul),
    "div": _binary(torch.div, b_make=positive),
    "maximum": _binary(torch.maximum, grid, grid_offset),
    "minimum": _binary(torch.minimum, grid, grid_offset),
    "ge": _binary(lambda a, b: (a >= b).to(DT), grid, grid_offset, smooth=False)
    + [Case([X(4, make=grid), X(4, make=grid)], ref=lambda a, b: (a >= b).to(DT), smooth=False, id="ties")],
    "le": _binary(lambda a, b: (a <= b).to(DT), grid, grid_offset, smooth=False)
    + [Case([X(4, make=grid), X(4, make=grid)], ref=lambda a, b: (a <= b).to(DT), smooth=False, id="ties")],
    "gt": _binary(lambda a, b: (a > b).to(DT), grid, grid_offset, smooth=False)
    + [Case([X(4, make=grid), X(4, make=grid)], ref=lambda a, b: (a > b).to(DT), smooth=False, id="ties")],
    "select": [Case([M(4), X(4), X(4)], ref=lambda m, a, b: torch.where(m > 0, a, b)),
               Case([M(), X(2, 4), X(2, 4)], id="per_sequence_mask",
                    ref=lambda m, a, b: torch.where(m[:, None, None] > 0, a, b)),
               Case([M(4), X(4), P(4)], ref=lambda m, a, b: torch.where(m > 0, a, b), id="param_else"),
               Case([M(1), P(4), X(4)], ref=lambda m, a, b: torch.where(m > 0, a, b), id="param_then_row_mask"),
               Case([M(4), X(4), Operand((), batched=False)], ref=lambda m, a, b: torch.where(m > 0, a, b),
                    id="scalar_else")],
    "neg": _unary(lambda a: -a),
    "sigmoid": _unary(lambda a: 1 / (1 + torch.exp(-a))),
    "tanh": _unary(lambda a: (torch.exp(2 * a) - 1) / (torch.exp(2 * a) + 1)),
    "relu": _unary(lambda a: a.clamp(min=0), away_from_zero),
    "exp": _unary(lambda a: torch.e ** a),
    "log": _unary(lambda a: torch.log(a), positive),
    "abs": _unary(lambda a: torch.where(a < 0, -a, a), away_from_zero),
    "sign": [Case([X(5, make=away_from_zero)], ref=lambda a: (a > 0).to(DT) - (a < 0).to(DT), smooth=False),
             Case([X(3, make=lambda s: torch.zeros(s, dtype=DT))], ref=torch.zeros_like, smooth=False,
                  id="zeros")],
    "sqrt": _unary(lambda a: a ** 0.5, positive),
    "sum": _reduction(lambda a, d, k: a.sum(d, keepdim=k)),
    "mean": _reduction(lambda a, d, k: a.sum(d, keepdim=k) / a.shape[d]),
    "softmax": [Case([X(5)], {"dim": -1}, ref=lambda a: torch.exp(a) / torch.exp(a).sum(-1, keepdim=True)),
                Case([X(3, 4)], {"dim": 0}, ref=lambda a: torch.exp(a) / torch.exp(a).sum(1, keepdim=True),
                     id="first_dim"),
                Case([X(3, 4)], {"dim": -1}, ref=lambda a: torch.exp(a) / torch.exp(a).sum(-1, keepdim=True),
                     id="last_of_two")],
    "layer_norm": [Case([X(6)], {"eps": 1e-5},
                        ref=lambda a: (a - a.mean(-1, keepdim=True))
                        / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + 1e-5)),
                   Case([X(2, 5)], {"eps": 0.1},
                        ref=lambda a: (a - a.mean(-1, keepdim=True))
                        / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + 0.1), id="matrix_big_eps")],
    "stop_gradient": [Case([X(4)], ref=lambda a: a.detach(), smooth=False)],
    "sigmoid_grad": _binary(lambda g, y: g * y * (1 - y)),
    "tanh_grad": _binary(lambda g, y: g * (1 - y * y)),
    "layer_norm_grad": [Case([X(6), X(6)], {"eps": 1e-5}, ref=_layer_norm_grad_ref(1e-5)),
                        Case([X(2, 5), X(2, 5)], {"eps": 0.1}, ref=_layer_norm_grad_ref(0.1), id="matrix_big_eps")],
    "sum_to": [Case([X(3, 4)], {"shape": (4,), "batched": True}, ref=lambda a: a.sum(1), id="lead"),
               Case([X(3, 4)], {"shape": (3, 1), "batched": True}, ref=lambda a: a.sum(2, keepdim=True),
                    id="keep"),
               Case([X(3, 4)], {"shape": (1, 4), "batched": True}, ref=lambda a: a.sum(1, keepdim=True),
                    id="keep_first"),
               Case([X(2, 3, 4)], {"shape": (1, 4), "batched": True}, ref=lambda a: a.sum((1, 2)).unsqueeze(1),
                    id="lead_and_keep"),
               Case([X(4)], {"shape": (4,), "batched": False}, ref=lambda a: a.sum(0), id="over_batch",
                    vjp_raises=True),
               Case([X(3, 4)], {"shape": (), "batched": False}, ref=lambda a: a.sum(), id="to_scalar",
                    vjp_raises=True),
               Case([P(3, 4)], {"shape": (4,), "batched": False}, ref=lambda a: a.sum(0), id="param")],
    "broadcast_to": [Case([X(4)], {"shape": (3, 4)}, ref=lambda a: a[:, None, :].expand(B, 3, 4), id="lead"),
                     Case([X(3, 1)], {"shape": (3, 4)}, ref=lambda a: a.expand(B, 3, 4), id="inner"),
                     Case([X()], {"shape": (5,)}, ref=lambda a: a[:, None].expand(B, 5), id="scalar"),
                     Case([P(4)], {"shape": (2, 4)}, ref=lambda a: a.expand(2, 4), id="param")],
    "concat": [Case([X(3), X(5)], {"dim": -1}, ref=lambda a, b: torch.cat([a, b], -1)),
               Case([X(2, 3), X(1, 3), X(4, 3)], {"dim": 0}, ref=lambda a, b, c: torch.cat([a, b, c], 1),
                    id="three_first_dim"),
               Case([P(2, 3), P(2, 2)], {"dim": 1}, ref=lambda a, b: torch.cat([a, b], 1), id="params")],
    "slice": [Case([X(6)], {"dim": -1, "start": 1, "stop": 4}, ref=lambda a: a[:, 1:4]),
              Case([X(3, 4)], {"dim": 0, "start": 0, "stop": 2}, ref=lambda a: a[:, 0:2], id="first_dim"),
              Case([P(5, 2)], {"dim": 0, "start": 2, "stop": 5}, ref=lambda a: a[2:5], id="param")],
    "pad": [Case([X(3)], {"dim": 0, "before": 1, "after": 2}, ref=lambda a: F.pad(a, (1, 2))),
            Case([X(2, 3)], {"dim": 0, "before": 0, "after": 1}, ref=lambda a: F.pad(a, (0, 0, 0, 1)),
                 id="first_dim"),
            Case([X(2, 3)], {"dim": 1, "before": 2, "after": 0}, ref=lambda a: F.pad(a, (2, 0)), id="last_dim")],
    "reshape": [Case([X(6)], {"shape": (2, 3)}, ref=lambda a: a.reshape(B, 2, 3)),
                Case([X(2, 3)], {"shape": (-1,)}, ref=lambda a: a.reshape(B, 6), id="flatten"),
                Case([X(4)], {"shape": (1, 4)}, ref=lambda a: a.unsqueeze(1), id="unsqueeze"),
                Case([P(2, 3)], {"shape": (3, 2)}, ref=lambda a: a.reshape(3, 2), id="param")],
    "transpose": [Case([X(2, 3)], {"d0": 0, "d1": 1}, ref=lambda a: a.transpose(1, 2)),
                  Case([X(2, 3, 4)], {"d0": -3, "d1": -1}, ref=lambda a: a.transpose(1, 3), id="rank3"),
                  Case([P(2, 3)], {"d0": 0, "d1": 1}, ref=lambda a: a.t(), id="param")],
    "linear": [Case([X(5), P(4, 5)], ref=lambda x, w: x @ w.t()),
               Case([X(2, 5), P(4, 5)], ref=lambda x, w: x @ w.t(), id="rank2_input"),
               Case([P(3, 5), P(4, 5)], ref=lambda x, w: x @ w.t(), id="unbatched")],
    "linear_wgrad": [Case([X(4), X(5)], ref=lambda g, x: torch.einsum("bo,bi->oi", g, x)),
                     Case([X(2, 4), X(2, 5)], ref=lambda g, x: torch.einsum("bso,bsi->oi", g, x), id="rank2")],
    "matmul": [Case([X(3, 4), X(4, 2)], ref=lambda a, b: torch.einsum("bij,bjk->bik", a, b)),
               Case([P(3, 4), X(4, 2)], ref=lambda a, b: torch.einsum("ij,bjk->bik", a, b), id="param_left"),
               Case([X(3, 4), P(4, 2)], ref=lambda a, b: torch.einsum("bij,jk->bik", a, b), id="param_right"),
               Case([X(2, 3, 4), X(4, 5)], ref=lambda a, b: torch.einsum("bsij,bjk->bsik", a, b),
                    id="lead_broadcast")],
    "matvec": [Case([X(12), X(4)], ref=lambda a, q: torch.einsum("bij,bj->bi", a.view(B, 3, 4), q)),
               Case([X(12), P(4)], ref=lambda a, q: torch.einsum("bij,j->bi", a.view(B, 3, 4), q),
                    id="param_vector"),
               Case([P(12), X(4)], ref=lambda a, q: torch.einsum("ij,bj->bi", a.view(3, 4), q),
                    id="param_matrix")],
    "vecmat": [Case([X(3), X(12)], ref=lambda v, a: torch.einsum("bi,bij->bj", v, a.view(B, 3, 4))),
               Case([P(3), X(12)], ref=lambda v, a: torch.einsum("i,bij->bj", v, a.view(B, 3, 4)),
                    id="param_vector")],
    "outer": [Case([X(3), X(4)], ref=lambda u, v: torch.einsum("bi,bj->bij", u, v).reshape(B, 12)),
              Case([X(3), P(4)], ref=lambda u, v: torch.einsum("bi,j->bij", u, v).reshape(B, 12),
                   id="param_second")],
    "tile": [Case([X(4)], {"times": 3}, ref=lambda x: x.repeat(1, 3)),
             Case([P(4)], {"times": 2}, ref=lambda x: x.repeat(2), id="param")],
    "repeat_each": [Case([X(3)], {"times": 4}, ref=lambda x: x.repeat_interleave(4, dim=1))],
    "sum_tiles": [Case([X(12)], {"times": 3}, ref=lambda x: x.view(B, 3, 4).sum(1))],
    "sum_groups": [Case([X(12)], {"times": 4}, ref=lambda x: x.view(B, 3, 4).sum(2))],
    "strided_matmul": [
        Case([X(6), X(8)], {"dims": (1, 3, 2, 4), "sa": (0, 2, 1), "sb": (0, 4, 1), "so": (0, 4, 1)},
             ref=lambda a, b: (a.view(B, 3, 2) @ b.view(B, 2, 4)).reshape(B, 12)),
        # two heads: queries (2, 1, 3) times the transposed keys of a (5, 2, 3) memory
        Case([X(6), X(30)], {"dims": (2, 1, 3, 5), "sa": (3, 3, 1), "sb": (3, 1, 6), "so": (5, 5, 1)},
             ref=lambda q, m: (q.view(B, 2, 1, 3) @ m.view(B, 5, 2, 3).permute(0, 2, 3, 1)).reshape(B, 10),
             id="heads_transposed_keys"),
        # the weights (2, 1, 5) times the keys (2, 5, 3), read down the memory's rows
        Case([X(10), X(30)], {"dims": (2, 1, 5, 3), "sa": (5, 5, 1), "sb": (3, 6, 1), "so": (3, 3, 1)},
             ref=lambda w, m: (w.view(B, 2, 1, 5) @ m.view(B, 5, 2, 3).transpose(1, 2)).reshape(B, 6),
             id="heads_weighted_sum"),
        Case([X(6), X(8)], {"dims": (1, 3, 2, 4), "sa": (0, 1, 3), "sb": (0, 4, 1), "so": (0, 1, 3)},
             ref=lambda a, b: (a.view(B, 2, 3).transpose(1, 2) @ b.view(B, 2, 4)).transpose(1, 2).reshape(B, 12),
             id="transposed_operand_and_result"),
        Case([P(6), X(8)], {"dims": (1, 3, 2, 4), "sa": (0, 2, 1), "sb": (0, 4, 1), "so": (0, 4, 1)},
             ref=lambda a, b: (a.view(3, 2) @ b.view(B, 2, 4)).reshape(B, 12), id="param_matrix")],
    "softmax_groups": [Case([X(12)], {"times": 4}, ref=lambda x: torch.softmax(x.view(B, 3, 4), -1).reshape(B, 12))],
    "embedding": [Case([X(dtype="long", make=indices(7)), P(7, 4)], {"padding_idx": None},
                       ref=_embedding_ref(None), id="tokens"),
                  Case([X(5, dtype="long", make=indices(7)), P(7, 4)], {"padding_idx": 2},
                       ref=_embedding_ref(2), id="padding_idx",
                       # the padding row's gradient is zero by definition (as torch's), not the derivative
                       smooth=False),
                  Case([X(5, dtype="long", make=indices(7)), P(7, 4)], {"padding_idx": 2, "zero_padding": True},
                       ref=_embedding_ref(2, zero_padding=True), id="zero_padding")],
    "embedding_wgrad": [Case([X(4), X(dtype="long", make=indices(6))], {"num": 6, "padding_idx": None},
                             ref=_embedding_wgrad_ref(6, None), id="tokens"),
                        Case([X(5, 4), X(5, dtype="long", make=indices(6))], {"num": 6, "padding_idx": 1},
                             ref=_embedding_wgrad_ref(6, 1), id="padding_idx")],
}

# leaves other than const: built with a declared shape, their value is bound by the runtime
LEAVES = {"input": True, "state": True, "context": True, "noise": True, "param": False}


def _cases():
    """(op, case) pairs for every non-leaf op in the registry; a missing case is a KeyError row."""
    rows = []
    for op in sorted(REGISTRY):
        if REGISTRY[op].kind == "leaf":
            continue
        for k, case in enumerate(CASES.get(op, [None])):
            rows.append(pytest.param(op, case, id=f"{op}-{case.id or k}" if case else f"{op}-missing"))
    return rows


ROWS = _cases()
SMOOTH_ROWS = [r for r in ROWS if r.values[1] is None or r.values[1].smooth]
VJP_ROWS = [r for r in ROWS if r.values[0] != "const" and (r.values[1] is None or not r.values[1].vjp_raises)]


def _build(op, case):
    assert case is not None, f"op {op!r} is registered but tests/compiler/test_ops.py has no case for it"
    leaves = [o.leaf() for o in case.operands]
    node = ops.make(op, leaves, **dict(case.attrs))
    return node, leaves


def _run(node, leaves, values, extra=()):
    order = topo_order([node, *extra])
    env = evaluate(order, {lf.id: v for lf, v in zip(leaves, values)}, dtype=DT, device=CPU)
    return env


def _float_positions(case):
    """Operands that are differentiated: floats that are not 0/1 masks."""
    return [k for k, o in enumerate(case.operands) if o.dtype == "float" and o.smooth]


def _expected_shape(node):
    return ((B,) if node.batched else ()) + node.shape


# ---------------------------------------------------------------------------------------
# coverage
# ---------------------------------------------------------------------------------------
def test_every_registered_op_has_a_case():
    missing = sorted(op for op, d in REGISTRY.items()
                     if op not in CASES and not (d.kind == "leaf" and op in LEAVES))
    assert not missing, f"ops without test cases: {missing}"


def test_no_case_names_an_unregistered_op():
    assert not sorted(set(CASES) - set(REGISTRY)), "a case names an op the registry does not have"


def test_every_non_leaf_op_has_a_vjp_rule():
    assert all(d.vjp is not None for d in REGISTRY.values() if d.kind != "leaf")


@pytest.mark.parametrize("op", sorted(o for o, d in REGISTRY.items() if d.kind == "leaf" and o != "const"))
def test_leaf_keeps_declared_shape_and_binds_its_value(op):
    batched = LEAVES[op]
    leaf = ops.make(op, (), shape=(2, 3), batched=batched)
    assert (leaf.shape, leaf.batched, leaf.dtype) == ((2, 3), batched, "float")
    value = torch.randn(((B,) if batched else ()) + (2, 3), dtype=DT)
    assert evaluate([leaf], {leaf.id: value}, dtype=DT, device=CPU)[leaf.id] is value


# ---------------------------------------------------------------------------------------
# values, shapes, gradcheck, VJP rules
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,case", ROWS)
def test_value_matches_plain_torch(op, case):
    node, leaves = _build(op, case)
    if op == "const":
        out = evaluate([node], {}, dtype=DT, device=CPU)[node.id]
        assert out.dtype == DT and out.item() == case.attrs["value"]
        return
    values = [o.value() for o in case.operands]
    out = _run(node, leaves, values)[node.id]
    assert tuple(out.shape) == _expected_shape(node), "the shape rule disagrees with the torch rule"
    torch.testing.assert_close(out, case.ref(*values).to(out.dtype))


@pytest.mark.parametrize("op,case", [r for r in SMOOTH_ROWS if r.values[0] != "const"])
def test_gradcheck_through_interpreter(op, case):
    node, leaves = _build(op, case)
    values = [o.value() for o in case.operands]
    pos = _float_positions(case)

    def f(*floats):
        vals = list(values)
        for k, v in zip(pos, floats):
            vals[k] = v
        return _run(node, leaves, vals)[node.id]

    inputs = tuple(values[k].clone().requires_grad_(True) for k in pos)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def _vjp_graph(op, case):
    node, leaves = _build(op, case)
    g = ops.make("input", (), shape=node.shape, batched=node.batched, dtype="float")
    grads = REGISTRY[op].vjp(node, g)
    return node, leaves, g, grads


@pytest.mark.parametrize("op,case", VJP_ROWS)
def test_vjp_gives_one_gradient_per_operand_with_its_shape(op, case):
    node, leaves, g, grads = _vjp_graph(op, case)
    assert len(grads) == len(leaves)
    for leaf, grad in zip(leaves, grads):
        if grad is None:
            continue
        assert isinstance(grad, Node)
        assert (grad.shape, grad.batched, grad.dtype) == (leaf.shape, leaf.batched, "float"), \
            f"gradient of operand {leaf.label()} has shape {grad.shape} batched={grad.batched}"


@pytest.mark.parametrize("op,case", VJP_ROWS)
def test_vjp_rule_matches_autograd_of_torch_rule(op, case):
    node, leaves, g, grads = _vjp_graph(op, case)
    values = [o.value() for o in case.operands]
    pos = _float_positions(case)
    tracked = [v.clone().requires_grad_(True) if k in pos else v for k, v in enumerate(values)]
    out = REGISTRY[op].torch(node, *tracked)
    g_value = torch.randn(out.shape, dtype=DT)
    wanted = [tracked[k] for k in pos]
    if out.requires_grad:
        expect = torch.autograd.grad(out, wanted, g_value, allow_unused=True)
    else:  # comparisons and sign: piecewise constant, derivative zero
        expect = [None] * len(wanted)
    expect = {k: (torch.zeros_like(values[k]) if e is None else e) for k, e in zip(pos, expect)}
    live = [gr for gr in grads if gr is not None]
    env = _run(node, leaves + [g], values + [g_value], extra=live) if live else {}
    for k, (leaf, grad) in enumerate(zip(leaves, grads)):
        if leaf.dtype == "long":
            assert grad is None, f"operand {k} is an integer index and must get no gradient"
            continue
        if k not in pos:  # a 0/1 mask: its derivative is zero wherever it exists
            assert grad is None, f"operand {k} is a mask and must get no gradient"
            continue
        got = torch.zeros_like(values[k]) if grad is None else env[grad.id]
        assert tuple(got.shape) == tuple(values[k].shape)
        torch.testing.assert_close(got, expect[k], msg=lambda m: f"VJP of {op} wrt operand {k}: {m}")


@pytest.mark.parametrize("case", [c for c in CASES["sum_to"] if c.vjp_raises], ids=lambda c: c.id)
def test_vjp_of_batch_reducing_sum_to_is_not_implemented(case):
    # sum_to over the batch only appears in weight gradients; its own derivative would be a
    # second-order gradient, which seqgraph refuses explicitly
    node, leaves = _build("sum_to", case)
    g = ops.make("param", (), shape=node.shape, batched=False)
    with pytest.raises(NotImplementedError, match="second-order"):
        REGISTRY["sum_to"].vjp(node, g)


# ---------------------------------------------------------------------------------------
# shape rules reject what they must, at the user's line
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,operands,attrs,text", [
    ("add", [X(4), X(5)], {}, "cannot broadcast shapes (4,) and (5,)"),
    ("linear", [X(4), P(3, 5)], {}, "expects 5 input features"),
    ("matmul", [X(3, 4), X(3, 4)], {}, "matmul contracts 4 against 3"),
    ("sum", [X()], {"dim": 0}, "cannot reduce a value with no per-example dims"),
    ("softmax", [X(4)], {"dim": 1}, "dim 1 is out of range"),
    ("slice", [X(4)], {"dim": 0, "start": 2, "stop": 6}, "slice [2:6] is out of range"),
    ("reshape", [X(6)], {"shape": (4,)}, "cannot reshape (6,)"),
    ("concat", [X(3), P(3)], {"dim": 0}, "cannot mix batched values with parameters"),
    ("embedding", [X(2), P(7, 4)], {}, "indices must be integers"),
    ("matvec", [X(12), X(5)], {}, "matvec takes a flattened (M, N) matrix and an (N,) vector"),
    ("vecmat", [X(3), X(10)], {}, "vecmat takes an (M,) vector and a flattened (M, N) matrix"),
    ("outer", [X(3), X(2, 2)], {}, "outer takes two vectors"),
    ("sum_tiles", [X(10)], {"times": 3}, "takes a vector whose size is a multiple of 3"),
    ("tile", [X(2, 2)], {"times": 3}, "takes a vector and a positive count, got shape (2, 2)"),
    ("strided_matmul", [X(6), X(7)], {"dims": (1, 3, 2, 4), "sa": (0, 2, 1), "sb": (0, 4, 1), "so": (0, 4, 1)},
     "takes flat rows of 6 and 8 values"),
    ("strided_matmul", [X(6), X(8)], {"dims": (1, 3, 2, 4), "sa": (0, 1, 1), "sb": (0, 4, 1), "so": (0, 4, 1)},
     "the strides (0, 1, 1) of a do not lay out a (1, 3, 2) array"),
    ("softmax_groups", [X(10)], {"times": 4}, "takes a vector whose size is a multiple of 4"),
    ("layer_norm_grad", [X(4), X(5)], {"eps": 1e-5}, "takes a gradient and an input of the same shape, got (4,) and (5,)"),
    ("tanh", [X(3, dtype="long")], {}, "expected float"),
])
def test_shape_rule_rejects_bad_operands_naming_the_site(op, operands, attrs, text):
    leaves = [o.leaf() for o in operands]
    with pytest.raises(ops.ShapeError) as err:
        ops.make(op, leaves, **attrs)
    assert text in str(err.value)
    assert "test_ops.py:" in str(err.value)


def test_registering_an_op_without_a_vjp_fails():
    with pytest.raises(ValueError, match="missing rules"):
        ops.register("not_an_op", kind="elementwise", shape=lambda i, a: ((), True, "float"),
                     torch=lambda n, x: x, vjp=None, triton=lambda n, a: a, c=lambda n, a: a)
    assert "not_an_op" not in REGISTRY


def test_registering_an_op_without_a_c_emitter_fails():
    with pytest.raises(ValueError, match=r"missing rules: \['c'\]"):
        ops.register("not_an_op", kind="elementwise", shape=lambda i, a: ((), True, "float"),
                     torch=lambda n, x: x, vjp=lambda n, g: (g,), triton=lambda n, a: a)
    assert "not_an_op" not in REGISTRY


def test_registering_an_op_without_a_c_emitter_or_a_vjp_names_both():
    with pytest.raises(ValueError, match=r"missing rules: \['c', 'vjp'\]"):
        ops.register("not_an_op", kind="elementwise", shape=lambda i, a: ((), True, "float"),
                     torch=lambda n, x: x, vjp=None, triton=lambda n, a: a)
    assert "not_an_op" not in REGISTRY


def test_relu_passes_the_gradient_of_a_nan_input_as_torch_does():
    x = ops.make("input", (), shape=(2,), batched=True, dtype="float")
    g = ops.make("input", (), shape=(2,), batched=True, dtype="float")
    dx = REGISTRY["relu"].vjp(ops.make("relu", (x,)), g)[0]
    xv, gv = torch.tensor([[float("nan"), 2.0]], dtype=DT), torch.ones(1, 2, dtype=DT)
    xt = xv.clone().requires_grad_()
    want, = torch.autograd.grad(torch.relu(xt), xt, gv)  # threshold_backward: g unless x <= 0
    assert torch.equal(_run(dx, [x, g], [xv, gv])[dx.id], want)


@pytest.mark.parametrize("op, fn", [("relu", torch.relu), ("maximum", lambda x: torch.maximum(x, torch.zeros_like(x)))])
def test_an_infinite_gradient_where_the_op_passes_none_gives_zero_as_torch_does(op, fn):
    # the derivative selects, never multiplies by a 0/1 factor: inf * 0 would be nan
    x = ops.make("input", (), shape=(3,), batched=True, dtype="float")
    g = ops.make("input", (), shape=(3,), batched=True, dtype="float")
    y = ops.make(op, (x,) if op == "relu" else (x, ops.const(0.0)))
    dx = REGISTRY[op].vjp(y, g)[0]
    xv, gv = torch.tensor([[-1.0, 2.0, 0.5]], dtype=DT), torch.tensor([[float("inf"), 1.0, 1.0]], dtype=DT)
    got = _run(dx, [x, g], [xv, gv])[dx.id]
    xt = xv.clone().requires_grad_()
    want, = torch.autograd.grad(fn(xt), xt, gv)
    assert torch.equal(got, want)


def test_strided_matmul_of_no_rows_gives_no_rows_of_its_width():
    a, b = sg.Input(6, name="a"), sg.Input(8, name="b")
    n = ops.make("strided_matmul", (a, b), dims=(1, 3, 2, 4), sa=(0, 2, 1), sb=(0, 4, 1), so=(0, 4, 1))
    out = ops.REGISTRY["strided_matmul"].torch(n, torch.zeros(0, 6), torch.zeros(0, 8))
    assert out.shape == (0, 12)
