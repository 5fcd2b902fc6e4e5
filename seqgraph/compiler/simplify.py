"""Pass: simplify — common subexpressions, constant folding and algebraic identities.

Two nodes with the same op, inputs and attributes become one; ops whose operands are all
constants become a constant; `x * 1`, `x + (-0.0)`, `x - 0`, `x / 1`, a full-range slice, a
one-piece concat, a reshape or broadcast_to to the same shape, a pad of nothing, a transpose
of a dim with itself and a select on a constant mask disappear (`x + 0.0` stays: it turns
-0.0 into +0.0).
Noise leaves are never merged (two dropouts draw two masks). Dead nodes vanish because a
rewritten graph keeps only what its results need. Must not change any value.
"""
from __future__ import annotations

import math

import torch

from .ir import Node
from .ops import REGISTRY, const_key, make
from .stepgraph import StepGraph, clone, rewrite


def _const_value(n: Node):
    return n.attrs["value"] if n.op == "const" else None


def _same_type(a: Node, n: Node) -> bool:
    return a.shape == n.shape and a.batched == n.batched and a.dtype == n.dtype


def _is_zero(n: Node, negative: bool) -> bool:
    """Whether n is the constant -0.0 (negative) or +0.0."""
    v = _const_value(n)
    return v == 0.0 and (math.copysign(1.0, v) < 0) == negative


def _identity(n: Node, ins: tuple) -> Node | None:
    """The operand that `n` equals, when `n` is an identity."""
    if n.op in ("mul", "div") and _const_value(ins[1]) == 1.0 and _same_type(ins[0], n):
        return ins[0]
    if n.op == "mul" and _const_value(ins[0]) == 1.0 and _same_type(ins[1], n):
        return ins[1]
    # x + (-0.0) and x - 0.0 are x, bit for bit; x + 0.0 is not (-0.0 + 0.0 is +0.0)
    if n.op == "add" and _is_zero(ins[1], negative=True) and _same_type(ins[0], n):
        return ins[0]
    if n.op == "sub" and _is_zero(ins[1], negative=False) and _same_type(ins[0], n):
        return ins[0]
    if n.op == "add" and _is_zero(ins[0], negative=True) and _same_type(ins[1], n):
        return ins[1]
    if n.op == "slice" and n.attrs["start"] == 0 and n.attrs["stop"] == ins[0].shape[n.attrs["dim"]]:
        return ins[0]
    if n.op == "concat" and len(ins) == 1:
        return ins[0]
    if n.op in ("reshape", "broadcast_to") and _same_type(ins[0], n):
        return ins[0]
    if n.op == "pad" and n.attrs["before"] == 0 and n.attrs["after"] == 0:
        return ins[0]
    if n.op == "transpose" and n.attrs["d0"] == n.attrs["d1"]:
        return ins[0]
    if n.op == "select" and ins[0].op == "const":
        pick = ins[1] if ins[0].attrs["value"] > 0 else ins[2]
        if _same_type(pick, n):
            return pick
    return None


def _fold(n: Node, ins: tuple) -> Node | None:
    if REGISTRY[n.op].kind != "elementwise" or not all(i.op == "const" for i in ins):
        return None
    vals = [torch.tensor(i.attrs["value"], dtype=torch.float64) for i in ins]
    v = REGISTRY[n.op].torch(n, *vals)
    return make("const", (), value=float(v), site=n.site)


def simplify(step: StepGraph) -> StepGraph:
    seen: dict[tuple, Node] = {}
    consts: dict[str, Node] = {}
    counts = {"cse": 0, "fold": 0, "identity": 0}

    def key_of(n: Node, ins: tuple) -> tuple:
        attrs = tuple(sorted((k, v if not isinstance(v, (list, dict)) else repr(v)) for k, v in n.attrs.items()
                             if k not in ("group", "piece", "init")))
        return (n.op, tuple(i.id for i in ins), attrs)

    def canon_const(c: Node) -> Node:
        return consts.setdefault(const_key(c.attrs["value"]), c)

    def visit(n: Node, ins: tuple) -> Node:
        ins = tuple(canon_const(i) if i.op == "const" else i for i in ins)
        same = _identity(n, ins)
        if same is not None:
            counts["identity"] += 1
            return same
        folded = _fold(n, ins)
        if folded is not None:
            counts["fold"] += 1
            return canon_const(folded)
        k = key_of(n, ins)
        if k in seen:
            counts["cse"] += 1
            return seen[k]
        out = clone(n, ins)
        seen[k] = out
        return out

    out = rewrite(step, visit)
    out.notes.append(f"simplify: merged {counts['cse']} common subexpressions, folded {counts['fold']} "
                     f"constants, removed {counts['identity']} identities")
    return out
