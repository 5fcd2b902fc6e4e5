"""Pass: hoist_loop_invariant_terms — add state-free terms of a sum before the loop.

(x W_x + h W_h) + b becomes (x W_x + b) + h W_h: the first half is hoisted (computed for all
steps at once), the second is one addmm per step. Several invariant terms (the two biases of
an LSTM) are summed first, once per call, so the hoisted sum is one addmm. Only single-use inner sums are regrouped, and
only when the regrouped sum has the same shape. Must not change values (beyond the rounding
of a reassociated float sum).
"""
from __future__ import annotations

from .hoist import classify, node_class
from .ir import Node, consumers
from .ops import make
from .stepgraph import StepGraph, clone, rewrite


def hoist_loop_invariant_terms(step: StepGraph) -> StepGraph:
    """The step with its sums regrouped, state-free terms first (see the module docstring)."""
    order = step.order()
    cls = classify(order)
    users = consumers(order)
    count = 0

    def terms(n: Node, new_of) -> list[Node]:
        if n.op == "add" and len(users.get(n.id, [])) == 1 and n.inputs[0].shape == n.shape \
                and n.inputs[1].shape == n.shape and n.inputs[0].batched == n.batched:
            return terms(n.inputs[0], new_of) + terms(n.inputs[1], new_of)
        return [new_of[n.id]] if n.id in new_of else [n]

    new_of: dict[int, Node] = {}

    def visit(n: Node, ins: tuple) -> Node:
        nonlocal count
        out = clone(n, ins)
        new_of[n.id] = out
        if n.op != "add" or cls[n.id] != "step":
            return out
        ts = terms(n.inputs[0], new_of) + terms(n.inputs[1], new_of)
        early = [t for t in ts if node_class(t, cls) != "step"]
        late = [t for t in ts if t not in early]
        if len(early) < 2 or not late:
            return out
        # the invariant terms (biases) summed once per call, then added to the hoisted ones in
        # one pass over all T*B rows: (x W + b_x) + b_h becomes x W + (b_x + b_h), which the
        # torch code emits as one addmm
        hoisted = [t for t in early if node_class(t, cls) == "hoisted"]
        invariant = [t for t in early if t not in hoisted]
        ordered = hoisted + invariant
        if hoisted and len(invariant) > 1:
            inv = invariant[0]
            for t in invariant[1:]:
                inv = make("add", (inv, t), site=n.site)
            ordered = hoisted + [inv]
        acc = ordered[0]
        for t in ordered[1:]:
            acc = make("add", (acc, t), site=n.site)
        for t in late:
            acc = make("add", (acc, t), site=n.site, name=n.name)
        if acc.shape != n.shape or acc.batched != n.batched:
            return out
        count += 1
        new_of[n.id] = acc
        return acc

    new = rewrite(step, visit)
    new.notes.append(f"hoist_loop_invariant_terms: regrouped {count} sum(s) so their state-free terms "
                     f"are added before the loop")
    return new
