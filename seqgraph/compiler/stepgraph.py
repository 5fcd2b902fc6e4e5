"""`StepGraph`: the graph of one step with its roles, the value every compiler pass maps.

A Cell is the user's object; a StepGraph is the compiler's copy of its wiring (inputs,
states with their next values, outputs, contexts, noises, parameters) that passes rewrite.
`rewrite(step, fn)` is the one traversal passes use: it visits nodes in topological order,
lets `fn` replace each (given its already-rewritten inputs) and rebuilds the roles. Leaves are
never copied, so parameters keep their identity. This module must not know any op's math.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .ir import Node, topo_order


@dataclass
class StepGraph:
    inputs: list[Node]
    states: list[tuple[Node, Node]]  # (previous-value leaf, next value)
    outputs: list[Node]
    contexts: list[Node]
    noises: list[Node]
    params: dict[str, Node]
    notes: list[str] = field(default_factory=list)  # what the passes did, for plan()

    @classmethod
    def from_cell(cls, cell) -> "StepGraph":
        return cls(list(cell.inputs), list(cell.states), list(cell.outputs), list(cell.contexts),
                   list(cell.noises), dict(cell.params))

    @property
    def results(self) -> list[Node]:
        return list(self.outputs) + [n for _, n in self.states]

    def order(self) -> list[Node]:
        return topo_order(self.results)


def clone(n: Node, inputs) -> Node:
    """The same node over new inputs (shape already known: no re-inference)."""
    if all(a is b for a, b in zip(inputs, n.inputs)):
        return n
    batched = any(i.batched for i in inputs) if inputs else n.batched
    return Node(n.op, inputs, n.attrs, n.shape, batched or n.batched, n.dtype, name=n.name, site=n.site,
                module=n.module)


def rewrite(step: StepGraph, fn: Callable[[Node, tuple], Node], note: str | None = None) -> StepGraph:
    """Apply `fn(node, new_inputs) -> node` bottom-up; return the rewritten StepGraph."""
    new: dict[int, Node] = {}
    for n in step.order():
        ins = tuple(new[i.id] for i in n.inputs)
        new[n.id] = n if not n.inputs else fn(n, ins)
    out = StepGraph(step.inputs, [(p, new[q.id]) for p, q in step.states], [new[o.id] for o in step.outputs],
                    step.contexts, step.noises, step.params, list(step.notes))
    if note:
        out.notes.append(note)
    return out
