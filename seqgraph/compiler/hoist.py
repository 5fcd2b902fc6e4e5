"""Where each node of a step runs: the hoisting decision that build_plan applies.

Every node gets a class: "invariant" (depends only on parameters, constants, contexts and
per-sequence noise: computed once per call), "hoisted" (also depends on per-step inputs or
per-step noise, but on no state: computed for all T steps at once, as (T*B) rows, before the
loop; an LSTM's input projection becomes one big GEMM) or "step" (depends on a state: computed
inside the time loop). Two exceptions: `keep_expansions_in_loop`, a value spread from smaller
per-step ones (an outer product) that only the loop reads is computed in the loop; and, for
backends whose loops run a step's regions as single kernels, `keep_elementwise_in_loop`,
elementwise ops that only those regions read (a QRNN's gates) are computed there, and on the
cpu backend row norms too (a layer-norm LSTM's LN(W_ih x)). The rewrites that widen what can
be hoisted live in their own pass files (split_linear_over_concat.py,
hoist_loop_invariant_terms.py, hoist_previous_inputs.py). Must not change the graph.
"""
from __future__ import annotations

from .ir import Node, consumers
from .ops import REGISTRY
from .schedule import node_fusable

RANK = {"invariant": 0, "hoisted": 1, "step": 2}
# row reductions that keep_elementwise_in_loop(norms=True) moves with the elementwise ops: a
# region computes them from the row it reads, and the backward region recomputes them from it
ROW_NORMS = ("layer_norm", "softmax")


def leaf_class(n: Node) -> str:
    if n.op == "state":
        return "step"
    if n.op == "input":
        return "hoisted"
    if n.op == "noise":
        return "invariant" if n.attrs["per_sequence"] else "hoisted"
    return "invariant"  # param, const, context


def node_class(n: Node, cls: dict[int, str]) -> str:
    """The class of `n`, memoised in `cls` (which may already hold its inputs' classes)."""
    if n.id not in cls:
        cls[n.id] = leaf_class(n) if not n.inputs else \
            max((node_class(i, cls) for i in n.inputs), key=RANK.__getitem__)
    return cls[n.id]


def classify(order: list[Node]) -> dict[int, str]:
    cls: dict[int, str] = {}
    for n in order:
        node_class(n, cls)
    return cls


def is_outer_product(n: Node) -> bool:
    """matmul of two batched vectors into a matrix: (M, 1) @ (1, N), or the `outer` op."""
    if n.op == "outer":
        return True
    if n.op != "matmul" or len(n.shape) != 2:
        return False
    a, b = n.inputs
    return a.batched and b.batched and a.shape == (n.shape[0], 1) and b.shape == (1, n.shape[1])


def keep_expansions_in_loop(order: list[Node], cls: dict[int, str], results: set[int]) -> None:
    """Reclassify as "step", in `cls`, each hoisted value spread from smaller per-step values
    (an outer product such as a linear-attention or mLSTM update `v k^T`, a tile, a repeat,
    and the elementwise ops and reshapes over them) that only the loop reads. Before the loop it
    would be written for all T*B rows, M*N values each from M+N, and read back once; in the
    loop's fused region it costs a multiply per element and no memory. A result of the step
    stays where it is."""
    spread: set[int] = set()
    for n in order:
        if cls[n.id] != "hoisted" or not n.batched or n.dtype != "float":
            continue
        # (of the layout ops, reshapes only: flatten_per_example_matrices reads through them, while
        # a transpose or slice of the product would stay a per-example matrix, a torch stage in
        # the loop where it was one before it)
        over_spread = (REGISTRY[n.op].kind == "elementwise" or n.op == "reshape") and \
            any(i.id in spread for i in n.inputs)
        if is_outer_product(n) or n.op in ("tile", "repeat_each") or over_spread:
            spread.add(n.id)
    users = consumers(order)
    for n in reversed(order):
        if n.id in spread and n.id not in results and users.get(n.id) and \
                all(cls[u.id] == "step" for u in users[n.id]):
            cls[n.id] = "step"


def keep_elementwise_in_loop(order: list[Node], cls: dict[int, str], results: set[int], fusable,
                             norms: bool = False) -> list[Node]:
    """Reclassify as "step", in `cls`, each hoisted elementwise op and reshape that only the
    loop's fused regions read, for backends that run a step's region as one kernel (C, Triton).
    Before the loop it would be written for all T*B rows and read back once, and its gradient
    likewise; in the loop's region it costs the same arithmetic and no memory: the loop reads
    its operand (a slice of the input projection) instead of it, as many bytes a step, and the
    backward loop gives that operand's gradient directly. A QRNN's gates are the example. Ops
    a hoisted GEMM reads, results, and ops the backend's kernels cannot compute stay hoisted;
    so does a bias, which torch adds within its product.

    With `norms`, row norms (ROW_NORMS) move too, with a LayerNorm's scale and shift (a
    layer-norm LSTM's LN(W_ih x)): for loops that sum the scale's and shift's gradients over
    the steps as they go (C). Loops that keep them per step for after the loop would trade
    torch's one F.layer_norm for two (T, B, w) gradient stashes, so there they stay one call.
    Returns the reclassified nodes, in order."""
    moved: list[Node] = []
    folded = folded_into_products_and_norms(order, cls, norms=not norms)
    users = consumers(order)
    for n in reversed(order):
        if cls[n.id] != "hoisted" or not n.batched or n.dtype != "float" or n.id in results or n.id in folded:
            continue
        if REGISTRY[n.op].kind != "elementwise" and n.op != "reshape" and not (norms and n.op in ROW_NORMS):
            continue
        us = users.get(n.id, [])
        if us and node_fusable(n, fusable)[0] and all(cls[u.id] == "step" and node_fusable(u, fusable)[0] for u in us):
            cls[n.id] = "step"
            moved.append(n)
    return moved[::-1]


def folded_into_products_and_norms(order: list[Node], cls: dict[int, str], norms: bool = True) -> set[int]:
    """The ids of hoisted adds, subs and muls that the torch code folds into the product or
    LayerNorm before them: a bias or accumulated term of a linear (one addmm), a LayerNorm's
    scale and shift (one F.layer_norm; left out with norms=False), and such ops over those.
    They cost no pass of their own."""
    folded: set[int] = set()
    for n in order:
        if cls[n.id] != "hoisted" or n.op not in ("add", "sub", "mul"):
            continue
        for a, b in (n.inputs, n.inputs[::-1]):
            base = a.op in (("linear", "layer_norm") if norms else ("linear",)) or a.id in folded
            if base and (not b.batched or (n.op == "add" and a.op == "linear")):
                folded.add(n.id)
    return folded
