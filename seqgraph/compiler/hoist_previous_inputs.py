"""Pass: hoist_previous_inputs — a state that holds the previous step's input becomes an input.

A state whose next value is a per-step input `x` (a QRNN's window of two, `states={x_prev1: x}`)
holds, at step t, the input of the last real step before t (x[t-1] without padding), or its
initial value before any. That depends on no other state, so its readers may be hoisted like
any input's: they read a new per-step input leaf (attrs `previous_of`, the index of `x` among
the step's inputs, and `state`, the state's index) that the compiled module makes before the
loop from `x`, the state's initial value and the mask (compiled.previous_inputs). A state whose
next value is such a state holds the input of two steps before, read likewise from the first's
delayed input (a QRNN's window of three). The states themselves stay, so their final values,
their carrying across calls and their gradients are unchanged.
Must not change values.
"""
from __future__ import annotations

from .ir import Node
from .stepgraph import StepGraph, clone, rewrite


def hoist_previous_inputs(step: StepGraph) -> StepGraph:
    inputs = list(step.inputs)
    input_at = {x.id: k for k, x in enumerate(inputs)}
    previous: dict[int, Node] = {}  # state leaf id -> the new input leaf its readers read
    read = _read_states(step)
    found = True
    while found:  # (a state whose next value is such a state holds the input of two steps before, and so on)
        found = False
        for j, (p, nxt) in enumerate(step.states):
            source = previous.get(nxt.id, nxt)
            if p.id in read and p.id not in previous and source.id in input_at and source.dtype == "float" \
                    and p.shape == source.shape:
                previous[p.id] = Node("input", (), {"previous_of": input_at[source.id], "state": j}, p.shape, True,
                                      name=p.name, site=p.site)
                input_at[previous[p.id].id] = len(inputs)
                inputs.append(previous[p.id])
                found = True

    def visit(n: Node, ins: tuple) -> Node:
        return clone(n, tuple(previous.get(i.id, i) for i in ins))

    new = rewrite(step, visit)
    new.inputs = inputs
    new.notes.append(f"hoist_previous_inputs: {len(previous)} state(s) holding the previous step's input read "
                     f"as inputs made before the loop")
    return new


def _read_states(step: StepGraph) -> set[int]:
    """Ids of the state leaves some node reads, or whose value a read state takes next (the
    first of a chain of delays): the others need no delayed input (a state that only carries
    the last input to the next call)."""
    read = {i.id for n in step.order() for i in n.inputs if i.op == "state"}
    grew = True
    while grew:
        grew = False
        for p, nxt in step.states:
            if p.id in read and nxt.op == "state" and nxt.id not in read:
                read.add(nxt.id)
                grew = True
    return read
