"""Pass: hoist_input_projections — decide where each node of a step is computed.

Every node gets a class: "invariant" (depends only on parameters, constants, contexts and
per-sequence noise: computed once per call), "hoisted" (also depends on per-step inputs or
per-step noise, but on no state: computed for all T steps at once, as (T*B) rows, before the
loop; an LSTM's input projection becomes one big GEMM) or "step" (depends on a state: computed
inside the time loop). `split_linear_over_concat` first rewrites linear(concat([x, h]), W)
into linear(x, W[:, :I]) + linear(h, W[:, I:]) so that the part over x can be hoisted.
Must not change values; it only rewrites and labels.
"""
from __future__ import annotations

from .ir import Node
from .ops import make
from .stepgraph import StepGraph, rewrite

RANK = {"invariant": 0, "hoisted": 1, "step": 2}


def leaf_class(n: Node) -> str:
    if n.op == "state":
        return "step"
    if n.op == "input":
        return "hoisted"
    if n.op == "noise":
        return "invariant" if n.attrs["per_sequence"] else "hoisted"
    return "invariant"  # param, const, context


def classify(order: list[Node]) -> dict[int, str]:
    cls: dict[int, str] = {}
    for n in order:
        if not n.inputs:
            cls[n.id] = leaf_class(n)
        else:
            cls[n.id] = max((cls[i.id] for i in n.inputs), key=RANK.__getitem__)
    return cls


def split_linear_over_concat(step: StepGraph) -> StepGraph:
    cls = classify(step.order())
    count = 0

    def visit(n: Node, ins: tuple) -> Node:
        nonlocal count
        if n.op != "linear":
            return _same(n, ins)
        x, w = ins
        if x.op != "concat" or x.attrs["dim"] != len(x.shape) - 1:
            return _same(n, ins)
        parts = x.inputs
        if len({cls.get(p.id, "step") for p in parts}) == 1:
            return _same(n, ins)
        count += 1
        out, start = None, 0
        for p in parts:
            stop = start + p.shape[-1]
            wp = make("slice", (w,), dim=1, start=start, stop=stop, site=n.site)
            y = make("linear", (p, wp), site=n.site, name=n.name, module=n.module)
            out = y if out is None else make("add", (out, y), site=n.site, name=n.name, module=n.module)
            start = stop
        return out

    new = rewrite(step, visit)
    new.notes.append(f"split_linear_over_concat: split {count} linear(s) whose concatenated input mixes "
                     f"per-step inputs and states")
    return new


def _same(n, ins):
    from .stepgraph import clone
    return clone(n, ins)


def hoist_loop_invariant_terms(step: StepGraph) -> StepGraph:
    """Reassociate sums so that terms computable before the loop are added before it:
    (x W_x + h W_h) + b  becomes  (x W_x + b) + h W_h, whose first half is hoisted and whose
    second half is one addmm per step. Only single-use inner sums are regrouped."""
    from .ir import consumers
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
        out = _same(n, ins)
        new_of[n.id] = out
        if n.op != "add" or cls[n.id] != "step":
            return out
        ts = terms(n.inputs[0], new_of) + terms(n.inputs[1], new_of)
        early = [t for t in ts if cls.get(t.id, _class_of(t, cls)) != "step"]
        late = [t for t in ts if t not in early]
        if len(early) < 2 or not late:
            return out
        acc = early[0]
        for t in early[1:]:
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


def _class_of(n: Node, cls: dict[int, str]) -> str:
    if n.id in cls:
        return cls[n.id]
    if not n.inputs:
        return leaf_class(n)
    return max((_class_of(i, cls) for i in n.inputs), key=RANK.__getitem__)
