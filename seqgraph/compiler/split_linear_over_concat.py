"""Pass: split_linear_over_concat — let the input half of an nngraph-style gate GEMM leave the loop.

linear(concat([x, h]), W) becomes linear(x, W[:, :I]) + linear(h, W[:, I:]) when the parts of
the concat are of different classes (see hoist.py), so the part over x can be computed for all
steps at once. The weight slices are views of the user's parameter. Must not change values.
"""
from __future__ import annotations

from .hoist import classify
from .ir import Node
from .ops import make
from .stepgraph import StepGraph, clone, rewrite


def split_linear_over_concat(step: StepGraph) -> StepGraph:
    cls = classify(step.order())
    count = 0

    def visit(n: Node, ins: tuple) -> Node:
        nonlocal count
        if n.op != "linear":
            return clone(n, ins)
        x, w = ins
        if x.op != "concat" or x.attrs["dim"] != len(x.shape) - 1:
            return clone(n, ins)
        parts = x.inputs
        if len({cls.get(p.id, "step") for p in parts}) == 1:
            return clone(n, ins)
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
