"""Where each node of a step runs: the hoisting decision that build_plan applies.

Every node gets a class: "invariant" (depends only on parameters, constants, contexts and
per-sequence noise: computed once per call), "hoisted" (also depends on per-step inputs or
per-step noise, but on no state: computed for all T steps at once, as (T*B) rows, before the
loop; an LSTM's input projection becomes one big GEMM) or "step" (depends on a state: computed
inside the time loop). The rewrites that widen what can be hoisted live in their own pass
files (split_linear_over_concat.py, hoist_loop_invariant_terms.py). Must not change the graph.
"""
from __future__ import annotations

from .ir import Node

RANK = {"invariant": 0, "hoisted": 1, "step": 2}


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
