"""Pass: flatten_matvecs — per-example matrix-vector products become row ops.

An attention step multiplies a per-example matrix (the memory, (M, N) per example) by a vector
twice: the scores, `matmul(memory, unsqueeze(query, -1))` (or `sum(memory * unsqueeze(query,
0), dim=1)`), and the weighted sum, `sum(memory * unsqueeze(weights, -1), dim=0)` (or
`matmul(unsqueeze(weights, 0), memory)`, or with the memory transposed). Written so, they
work on 2-D per-example values, which no row kernel computes. This pass writes each as `matvec(flat, q)` or `vecmat(w, flat)`
over the matrix flattened to one row of M*N columns, so the step's regions fuse them and a
whole attention loop can run in C. Only a matrix that carries the batch is rewritten (a
parameter matrix is a GEMM's job). Also folds a reshape of a reshape into one. Must not
change values (the sums run in another order: rounding may differ).
"""
from __future__ import annotations

from .ir import Node
from .ops import make
from .stepgraph import StepGraph, clone, rewrite


def _flat(a: Node) -> Node:
    return make("reshape", (a,), shape=(a.shape[0] * a.shape[1],), site=a.site)


def _vector(v: Node) -> Node:
    """v (an (N, 1) column or a (1, N) row) as an (N,) vector, looking through reshapes (the
    unsqueeze that made the column)."""
    while v.op == "reshape" and len(v.shape) != 1:
        v = v.inputs[0]
    return v if len(v.shape) == 1 else make("reshape", (v,), shape=(v.elements,), site=v.site)


def _as(n: Node, op: str, operands: tuple) -> Node:
    """`op` over `operands`, in `n`'s shape and under `n`'s name and line."""
    attrs = {"rows": operands[0].shape[0] // operands[1].shape[0]} if op == "matvec" else {}
    out = make(op, operands, name=n.name, site=n.site, module=n.module, **attrs)
    return out if out.shape == n.shape else make("reshape", (out,), shape=n.shape, site=n.site)


def _matrix(a: Node) -> bool:
    return len(a.shape) == 2 and a.batched and a.dtype == "float"


def _transposed(a: Node) -> Node | None:
    """The matrix whose transpose `a` is, or None."""
    return a.inputs[0] if a.op == "transpose" and len(a.shape) == 2 and _matrix(a.inputs[0]) else None


def _product(n: Node, ins: tuple) -> Node | None:
    """matmul(A, b) with b an (N, 1) column, or matmul(a, B) with a a (1, M) row; either
    matrix may be a transpose (A^T b is b's vecmat)."""
    a, b = ins
    if len(a.shape) != 2 or len(b.shape) != 2:
        return None
    if b.shape == (a.shape[1], 1):  # (the matrix itself rather than its transpose: no copy)
        if _transposed(a) is not None:
            return _as(n, "vecmat", (_vector(b), _flat(_transposed(a))))
        if _matrix(a):
            return _as(n, "matvec", (_flat(a), _vector(b)))
    if a.shape == (1, b.shape[0]):
        if _transposed(b) is not None:
            return _as(n, "matvec", (_flat(_transposed(b)), _vector(a)))
        if _matrix(b):
            return _as(n, "vecmat", (_vector(a), _flat(b)))
    return None


def _weighted_sum(n: Node, ins: tuple) -> Node | None:
    """sum(A * w, dim) with A an (M, N) matrix and w broadcast along the dim not summed."""
    (prod,) = ins
    if prod.op != "mul" or len(prod.shape) != 2:
        return None
    dim = n.attrs["dim"]
    for A, w in (prod.inputs, prod.inputs[::-1]):
        if not _matrix(A) or A.shape != prod.shape:
            continue
        M, N = A.shape
        if dim == 0 and w.shape == (M, 1):
            return _as(n, "vecmat", (_vector(w), _flat(A)))
        if dim == 1 and w.shape in ((1, N), (N,)):
            return _as(n, "matvec", (_flat(A), _vector(w)))
    return None


def flatten_matvecs(step: StepGraph) -> StepGraph:
    count = 0

    def visit(n: Node, ins: tuple) -> Node:
        nonlocal count
        found = None
        if n.op == "matmul":
            found = _product(n, ins)
        elif n.op == "sum":
            found = _weighted_sum(n, ins)
        elif n.op == "reshape" and ins[0].op == "reshape":
            inner = ins[0].inputs[0]
            return inner if inner.shape == n.shape and inner.batched == n.batched else \
                clone(n, (inner,))
        if found is None:
            return clone(n, ins)
        count += 1
        return found

    new = rewrite(step, visit)
    new.notes.append(f"flatten_matvecs: {count} per-example matrix-vector product(s) became row ops")
    return new
