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
