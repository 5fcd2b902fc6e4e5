"""Pass: flatten_per_example_matrices — a step's work on (M, N) per-example values becomes row ops.

Row kernels compute vectors: each value of a row is one array of columns. An attention step
works on a per-example matrix, the memory (M, N): the scores `matmul(memory, unsqueeze(query,
-1))` (or `sum(memory * unsqueeze(query, 0), dim=1)`), the weighted sum `sum(memory *
unsqueeze(weights, -1), dim=0)` (or `matmul(unsqueeze(weights, 0), memory)`, or either with the
memory transposed), and in additive attention `tanh(keys + unsqueeze(query, 0))` scored by a
one-column Linear or a sum. This pass writes those over the matrix flattened to one row of M*N
columns, row-major: products with a vector become `matvec(flat, q)` / `vecmat(w, flat)`,
elementwise ops act on the flat row, an operand broadcast along a dim is spread to the full row
(`tile`, `repeat_each`), and a sum over a dim sums the row's parts (`sum_tiles`, `sum_groups`).
Multi-head attention multiplies two per-example matrices, or stacks of them, (heads, 1, D)
queries by the transposed (heads, S, D) keys: inside the loop such a product becomes one
`strided_matmul` of the two flat rows, reading each operand's transposes and reshapes as
strides (no copy), and a softmax along the last dim becomes `softmax_groups`. These ops work
on per-example values of any rank. The step's regions then fuse it all, and a whole attention
loop can run in C. Only values that carry the batch are rewritten, and elementwise ops, sums
and products of two matrices only inside the loop, where their neighbours are flat too (before
the loop, torch's own broadcasting and batched GEMMs do better); a parameter matrix is a GEMM's
job. Other ops on matrices (softmax along another dim, a Linear of more than one column, a
reshape a transposed row cannot be read through) stay as written, which keeps the values they
read in matrix form. A state of more than one per-example dim (a fast-weights or linear-attention
memory, an mLSTM's matrix) is carried as its flat row, so the same rewrites reach the ops on it
and the loops carry a row; the compiled module reshapes the caller's states to rows and the final
ones back. Also folds a reshape of a reshape into one. Must not change values (the sums run in
another order: rounding may differ).
"""
from __future__ import annotations

import math

from .hoist import classify, is_outer_product, keep_expansions_in_loop
from .ir import Node, consumers
from .ops import REGISTRY, make
from .stepgraph import StepGraph, clone, rewrite


def _unreshaped(a: Node) -> Node:
    """The value whose reshape (or reshape of a reshape...) `a` is; `a` itself if none."""
    while a.op == "reshape":
        a = a.inputs[0]
    return a


def _reshaped(a: Node, shape: tuple) -> Node:
    """`a` in `shape` (same elements, row-major), looking through the reshapes that made it."""
    a = _unreshaped(a)
    return a if a.shape == shape else make("reshape", (a,), shape=shape, site=a.site)


def _flat(a: Node) -> Node:
    return _reshaped(a, (a.elements,))


def _as(n: Node, op: str, operands: tuple, **attrs) -> Node:
    """`op` over `operands`, in `n`'s shape and under `n`'s name and line."""
    out = make(op, operands, name=n.name, site=n.site, module=n.module, **attrs)
    return out if out.shape == n.shape else make("reshape", (out,), shape=n.shape, site=n.site)


def _matrix(a: Node) -> bool:
    return len(a.shape) == 2 and a.batched and a.dtype == "float"


def _transposed(a: Node) -> Node | None:
    """The matrix whose transpose `a` is, or None (also for a transpose of a dim with itself)."""
    swaps = a.op == "transpose" and a.attrs["d0"] != a.attrs["d1"]
    return a.inputs[0] if swaps and len(a.shape) == 2 and _matrix(a.inputs[0]) else None


def _product_parts(a: Node, b: Node) -> tuple[str, Node, Node] | None:
    """("matvec" | "vecmat", matrix, vector) when matmul(a, b) is matmul(A, b) with b an (N, 1)
    column or matmul(a, B) with a a (1, M) row; either matrix may be a transpose (A^T b is b's
    vecmat). Else None."""
    if len(a.shape) != 2 or len(b.shape) != 2:
        return None
    if b.shape == (a.shape[1], 1):  # (the matrix itself rather than its transpose: no copy)
        if _transposed(a) is not None:
            return "vecmat", _transposed(a), b
        if _matrix(a):
            return "matvec", a, b
    if a.shape == (1, b.shape[0]):
        if _transposed(b) is not None:
            return "matvec", _transposed(b), a
        if _matrix(b):
            return "vecmat", b, a
    return None


def _product(n: Node, ins: tuple) -> Node | None:
    parts = _product_parts(*ins)
    if parts is None:
        return None
    op, matrix, vector = parts
    return _as(n, op, (_flat(matrix), _flat(vector)) if op == "matvec" else (_flat(vector), _flat(matrix)))


def _row_major(shape: tuple) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _row_major_order(shape: tuple, strides: tuple) -> bool:
    """Whether strides read the elements in row-major order (a dim of size 1 has any stride)."""
    kept = [(sz, st) for sz, st in zip(shape, strides) if sz != 1]
    return [st for _, st in kept] == list(_row_major(tuple(sz for sz, _ in kept)))


def _strided_view(a: Node) -> tuple[Node, tuple, tuple] | None:
    """(base, shape, strides) when `a` is a chain of reshapes and transposes of `base` that reads
    its row-major elements through those strides (no copy); None where a reshape would need
    one (of a transposed value, other than adding or dropping dims of size 1)."""
    chain = []
    while a.op in ("reshape", "transpose"):
        chain.append(a)
        a = a.inputs[0]
    shape, strides = a.shape, _row_major(a.shape)
    for v in reversed(chain):
        if v.op == "transpose":
            d0, d1 = v.attrs["d0"], v.attrs["d1"]
            shape, strides = list(shape), list(strides)
            shape[d0], shape[d1] = shape[d1], shape[d0]
            strides[d0], strides[d1] = strides[d1], strides[d0]
            shape, strides = tuple(shape), tuple(strides)
        elif _row_major_order(shape, strides):
            shape, strides = v.shape, _row_major(v.shape)
        elif [sz for sz in shape if sz != 1] == [sz for sz in v.shape if sz != 1]:
            kept = iter(st for sz, st in zip(shape, strides) if sz != 1)
            shape, strides = v.shape, tuple(0 if sz == 1 else next(kept) for sz in v.shape)
        else:
            return None
    return a, shape, strides


def _matrices_parts(n: Node, ins: tuple):
    """(a's base, b's base, dims, sa, sb) when matmul node `n` (inside the loop) multiplies two
    per-example matrices, or two stacks of G matrices, that are views of flat rows; else None."""
    if len(n.shape) not in (2, 3) or not n.batched:
        return None
    views = [_strided_view(x) for x in ins]
    if any(v is None or not v[0].batched or v[0].dtype != "float" for v in views):
        return None  # (a parameter matrix is a GEMM's job)
    (abase, ashape, sa), (bbase, bshape, sb) = views
    if len(ashape) != len(n.shape) or len(bshape) != len(n.shape):
        return None  # (a broadcast stack of matrices)
    if len(n.shape) == 2:
        ashape, sa, bshape, sb = (1,) + ashape, (0,) + sa, (1,) + bshape, (0,) + sb
    (G, M, K), N = ashape, bshape[2]
    if bshape[:2] != (G, K):
        return None
    return abase, bbase, (G, M, K, N), sa, sb


def _matrices_product(n: Node, ins: tuple) -> Node | None:
    """matmul of two per-example matrices (or stacks of them): one strided_matmul of their rows."""
    parts = _matrices_parts(n, ins)
    if parts is None:
        return None
    abase, bbase, (G, M, K, N), sa, sb = parts
    return _as(n, "strided_matmul", (_flat(abase), _flat(bbase)), dims=(G, M, K, N), sa=sa, sb=sb,
               so=(M * N, N, 1))


def _weighting(n: Node, prod: Node) -> tuple[str, Node, Node] | None:
    """("vecmat" | "matvec", A, w) when sum node `n` over `prod` is sum(A * w, dim) with A an
    (M, N) matrix and w broadcast along the dim not summed, else None."""
    if n.op != "sum" or prod.op != "mul" or len(prod.shape) != 2:
        return None
    dim = n.attrs["dim"]
    for A, w in (prod.inputs, prod.inputs[::-1]):
        if not _matrix(A) or A.shape != prod.shape:
            continue
        M, N = A.shape
        if dim == 0 and w.shape == (M, 1):
            return "vecmat", A, w
        if dim == 1 and w.shape in ((1, N), (N,)):
            return "matvec", A, w
    return None


def _summed(n: Node, ins: tuple) -> Node | None:
    """sum(A * w, dim) as one product (see _weighting); another sum of a matrix over a dim as
    the sum of its flat row's parts (sum_tiles over the rows, sum_groups over the columns)."""
    found = _weighting(n, ins[0])
    if found is not None:
        op, A, w = found
        return _as(n, op, (_flat(w), _flat(A)) if op == "vecmat" else (_flat(A), _flat(w)))
    X = ins[0]
    if not _matrix(X):
        return None
    M, N = X.shape
    if n.attrs["dim"] == 0:
        return _as(n, "sum_tiles", (_flat(X),), times=M)
    return _as(n, "sum_groups", (_flat(X),), times=N)


def _spreading(x: Node, shape: tuple) -> tuple[str, int] | None:
    """How operand `x` of an elementwise op of `shape` (an (M, N) matrix, or more dims) covers
    it, with the count that spreads it: ("one", 1) value, the ("full", 1) array, its last dims
    ("tile", times) repeated over the first ones, its first dims ("repeat_each", times) with
    each value repeated over the last ones; None for a broadcast this pass does not write."""
    if x.elements == 1:
        return "one", 1
    own = (1,) * (len(shape) - len(x.shape)) + tuple(x.shape)
    if own == tuple(shape):
        return "full", 1
    if len(own) != len(shape):
        return None
    for cut in range(1, len(shape)):
        if own[:cut] == (1,) * cut and own[cut:] == tuple(shape[cut:]):
            return "tile", math.prod(shape[:cut])
        if own[:cut] == tuple(shape[:cut]) and own[cut:] == (1,) * (len(shape) - cut):
            return "repeat_each", math.prod(shape[cut:])
    return None


def _spread(x: Node, shape: tuple) -> Node:
    """Operand `x` of an elementwise op of `shape` as a flat row of all its values (a value of
    one element stays one)."""
    how, times = _spreading(x, shape)
    if how == "one":
        return x if len(x.shape) <= 1 else _reshaped(x, (1,))
    if how == "full":
        return _flat(x)
    return make(how, (_flat(x),), times=times)


def _elementwise(n: Node, ins: tuple) -> Node:
    """An elementwise op whose value is a batched (M, N) matrix (or more dims), computed over the
    flat row; a softmax along its last dim, over each of the row's groups of that many values."""
    if n.op == "softmax":
        out = make("softmax_groups", (_flat(ins[0]),), times=n.shape[-1], name=n.name, site=n.site, module=n.module)
    else:
        out = make(n.op, tuple(_spread(x, n.shape) for x in ins), name=n.name, site=n.site, module=n.module,
                   **dict(n.attrs))
    return make("reshape", (out,), shape=n.shape, site=n.site)


def _row_softmax(n: Node) -> bool:
    """A softmax along the last dim of a per-example matrix (or more dims)."""
    return n.op == "softmax" and len(n.shape) >= 2 and n.attrs["dim"] == len(n.shape) - 1


def _worth_flattening(order: list[Node], cls: dict, users: dict, weightings: set) -> tuple[set[int], set[int]]:
    """(elementwise ops and softmaxes along the last dim, sums) on batched (M, N) matrices (or
    more dims) inside the loop worth computing on flat rows. An elementwise op is when its
    matrix operands are flat already (a context, a value before the loop, another of them, or
    a product or sum the pass rewrites) and its users read them flat (another of them, a sum, a
    product the pass rewrites, a one-column Linear, a reshape to a vector, or a reshape or
    transpose whose own users read it flat); a sum over a dim when its operand is flat
    already. Any other would need its matrix reshaped to or from a flat row in a step stage of
    its own, and gain nothing."""
    chosen = {n.id for n in order
              if (REGISTRY[n.op].kind == "elementwise" or _row_softmax(n)) and cls[n.id] == "step"
              and n.id not in weightings and len(n.shape) >= 2 and n.batched and n.dtype == "float"
              and all(_spreading(x, n.shape) is not None for x in n.inputs)}

    def summed_flat(u: Node) -> bool:  # a sum over a dim of a matrix that is flat already
        return u.op == "sum" and cls[u.id] == "step" and _matrix(u.inputs[0]) and flat_already(u.inputs[0])

    def rewritten(u: Node) -> bool:  # a product or sum this pass writes as a row op
        return ((u.op == "sum" and _matrix(u.inputs[0]) and (_weighting(u, u.inputs[0]) is not None or summed_flat(u)))
                or (u.op == "matmul" and (_product_parts(*u.inputs) is not None
                                          or (cls[u.id] == "step" and _matrices_parts(u, u.inputs) is not None)))
                or (u.op == "linear" and _matrix(u.inputs[0]) and u.inputs[1].shape == (1, u.inputs[0].shape[1])))

    def flat_already(x: Node) -> bool:
        b = _unreshaped(x)
        return cls[b.id] != "step" or len(b.shape) <= 1 or b.id in chosen or rewritten(b)

    def reads_flat(u: Node) -> bool:  # (a reshape or transpose: as its own users read it)
        if u.id in chosen or u.id in weightings or rewritten(u):
            return True
        if u.op == "reshape":
            return len(u.shape) == 1 or bool(users.get(u.id)) and all(reads_flat(v) for v in users[u.id])
        return (u.op == "transpose" and bool(users.get(u.id))
                and all(v.op == "matmul" and rewritten(v) for v in users[u.id]))
    changed = True
    while changed:
        changed = False
        for n in order:
            if n.id in chosen and not (all(flat_already(x) for x in n.inputs)
                                       and users.get(n.id) and all(reads_flat(u) for u in users[n.id])):
                chosen.discard(n.id)
                changed = True
    return chosen, {n.id for n in order if summed_flat(n)}


def _one_column_linear(n: Node, ins: tuple) -> Node | None:
    """linear(X, W) of an (M, N) matrix X and a one-row weight W: matvec(flat X, W)."""
    x, w = ins
    if not _matrix(x) or w.shape != (1, x.shape[1]):
        return None
    return _as(n, "matvec", (_flat(x), _flat(w)))


def _matrix_state(prev: Node) -> bool:
    return len(prev.shape) >= 2 and prev.dtype == "float"


def carry_matrix_states_as_rows(step: StepGraph) -> StepGraph:
    """The step with each state of more than one per-example dim carried as its flat row: a
    state leaf of shape (M*N,) that its readers see reshaped to (M, N), and its next value
    flattened. Values are unchanged; the ops on the state then reach the rewrites below."""
    swap = {}
    for prev, _ in step.states:
        if _matrix_state(prev):
            row = make("state", (), name=prev.name, site=prev.site, module=prev.module,
                       **dict(prev.attrs, shape=(prev.elements,)))
            swap[prev.id] = (row, make("reshape", (row,), shape=prev.shape, site=prev.site))
    if not swap:
        return step

    def read(x: Node) -> Node:
        return swap[x.id][1] if x.id in swap else x

    new = rewrite(step, lambda n, ins: clone(n, tuple(read(x) for x in ins)))
    states = [(swap[p.id][0], _flat(read(q))) if p.id in swap else (p, q)
              for (p, _), (_, q) in zip(step.states, new.states)]
    return StepGraph(new.inputs, states, [read(o) for o in new.outputs], new.contexts, new.noises, new.params,
                     list(new.notes))


def flatten_per_example_matrices(step: StepGraph) -> StepGraph:
    step = carry_matrix_states_as_rows(step)
    order = step.order()
    cls = classify(order)
    keep_expansions_in_loop(order, cls, {r.id for r in step.results})
    users = consumers(order)
    # a product A * w that every user sums into one matvec / vecmat is left for them to read
    weightings = {n.id for n in order if users.get(n.id) and all(_weighting(u, n) for u in users[n.id])}
    elementwise, sums = _worth_flattening(order, cls, users, weightings)
    counts = {"products": 0, "elementwise": 0}

    def visit(n: Node, ins: tuple) -> Node:
        found = None
        if n.op == "matmul":
            found = _product(n, ins)
            if found is None and cls[n.id] == "step" and is_outer_product(n):
                found = _as(n, "outer", (_flat(ins[0]), _flat(ins[1])))
            elif found is None and cls[n.id] == "step":
                found = _matrices_product(n, ins)
        elif n.op == "sum":
            if _weighting(n, ins[0]) is not None or n.id in sums:
                found = _summed(n, ins)
        elif n.op == "linear" and cls[n.id] == "step":
            found = _one_column_linear(n, ins)
        elif n.op == "reshape" and ins[0].op == "reshape":
            return _reshaped(ins[0], n.shape)
        elif n.id in elementwise:
            counts["elementwise"] += 1
            return _elementwise(n, ins)
        if found is None:
            return clone(n, ins)
        counts["products"] += 1
        return found

    new = rewrite(step, visit)
    new.notes.append(f"flatten_per_example_matrices: {counts['products']} product(s) and sum(s) of per-example "
                     f"matrices became matvec, vecmat or strided_matmul, {counts['elementwise']} elementwise op(s) and "
                     f"softmaxes on them work on flat rows")
    return new


def write_matrix_outputs_as_rows(step: StepGraph) -> StepGraph:
    """The step with each float output of more than one per-example dim (multi-head attention's
    (heads, S) weights) given as its flat row: the loops write rows (a C loop refuses a matrix
    output), and the compiled module reshapes what they wrote back to the cell's shape. Run
    after the passes: the outputs' values are the same, their shapes are not the cell's."""
    outputs = [_flat(o) if len(o.shape) > 1 and o.dtype == "float" else o for o in step.outputs]
    return StepGraph(step.inputs, step.states, outputs, step.contexts, step.noises, step.params, list(step.notes))
