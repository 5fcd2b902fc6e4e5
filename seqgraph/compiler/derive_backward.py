"""Planning step (called by plan.build_plan, not a graph pass): derive_backward — the symbolic derivative of one step, built from the VJP rules.

Given the nodes computed inside the time loop, it builds a second graph of registry ops that
maps the gradients arriving at a step (of its next states and its outputs) to the gradients
of everything the step read: the previous states, the hoisted per-step values and the
loop-invariant values. Because it is made of ordinary ops, every backend (torch, Triton, C)
compiles it exactly like a forward step. Masking is part of the graph: on a padded row the
incoming gradient is dropped and the state's gradient passes through unchanged. Gradients
of chunk pieces are reassembled with one concat, not a sum of zero-padded pieces. This module
must not decide where nodes run (schedule.py) nor generate code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .ir import Node, sites_from
from .ops import REGISTRY, make, reshape, select


@dataclass
class StepDerivative:
    grad_next: list[Node]  # leaf per state: the gradient arriving at its next value
    grad_out: list[Node]  # leaf per output: the gradient of the output at this step
    mask: Node | None  # leaf (B, 1): 1 on real rows, 0 on padded rows (None: no masking)
    grad_prev: list[Node | None]  # per state: gradient of its previous value (None: no dependence)
    grad_of: dict[int, Node] = field(default_factory=dict)  # id of a loop-read value -> its gradient
    leaves: set[int] = field(default_factory=set)  # ids of the new gradient and mask leaves


def _grad_leaf(like: Node, name: str) -> Node:
    return make("input", (), name=name, shape=like.shape, batched=True, dtype="float", site=like.site)


def _total(contribs: list[Node]) -> Node:
    """Sum gradient contributions; the zero-padded gradients of disjoint slices become one concat."""
    if len(contribs) == 1:
        return contribs[0]
    pads = [c for c in contribs if c.op == "pad"]
    if len(pads) == len(contribs) and len({p.attrs["dim"] for p in pads}) == 1:
        dim = pads[0].attrs["dim"]
        full = pads[0].shape[dim]
        spans = sorted((p.attrs["before"], full - p.attrs["after"], p) for p in pads)
        if all(a[1] <= b[0] for a, b in zip(spans, spans[1:])):
            pieces, pos = [], 0
            for start, stop, p in spans:
                g = p.inputs[0]
                if start > pos:
                    g = make("pad", (g,), dim=dim, before=start - pos, after=0)
                pieces.append(g)
                pos = stop
            if pos < full:
                pieces[-1] = make("pad", (pieces[-1],), dim=dim, before=0, after=full - pos)
            return pieces[0] if len(pieces) == 1 else make("concat", tuple(pieces), dim=dim)
    out = contribs[0]
    for c in contribs[1:]:
        out = make("add", (out, c))
    return out


def derive_backward(loop_nodes: list[Node], states: list[tuple[Node, Node]], outputs: list[Node],
                    reads: list[Node], masked: bool) -> StepDerivative:
    """loop_nodes: the forward nodes computed in the loop (topological); reads: the values the
    loop reads from outside (hoisted per-step values and invariants) whose gradients are wanted."""
    grad_next = [_grad_leaf(p, f"grad_next_{p.name}") for p, _ in states]
    grad_out = [_grad_leaf(o, f"grad_out_{k}") for k, o in enumerate(outputs)]
    # the mask leaf is the whole step's, tagged with where the first state was declared
    anchor = states[0][0] if states else outputs[0] if outputs else None
    mask = make("input", (), name="mask", shape=(1,), batched=True, dtype="float",
                site=anchor.site if anchor is not None else None) if masked else None
    deriv = StepDerivative(grad_next, grad_out, mask, [], leaves={n.id for n in grad_next + grad_out})
    if mask is not None:
        deriv.leaves.add(mask.id)

    scalar_mask: list[Node] = []  # the mask as a per-example scalar, for () values (made once)

    def by_mask(g: Node, a, b) -> Node:
        """select(mask, a, b) with the mask shaped to broadcast to g's shape, never beyond it."""
        m = mask
        if not g.shape:
            if not scalar_mask:
                scalar_mask.append(reshape(mask, ()))
            m = scalar_mask[0]
        return select(m, a, b)

    made: dict[int, Node] = {}  # id of g -> its select, made once

    def real_rows_only(g: Node | None) -> Node | None:
        """g on real rows, exactly 0 on padded ones (a select: it drops a nan there). One node
        per g: the gradient leaving to a weight and to a read is then one value, stored once."""
        if g is None or mask is None:
            return g
        if g.id not in made:
            made[g.id] = by_mask(g, g, 0.0)
        return made[g.id]

    grads: dict[int, list[Node]] = {}
    for (_, nxt), g in zip(states, grad_next):
        with sites_from(nxt):
            grads.setdefault(nxt.id, []).append(real_rows_only(g))
    for o, g in zip(outputs, grad_out):
        with sites_from(o):
            grads.setdefault(o.id, []).append(real_rows_only(g))

    wanted = {n.id for n in reads} | {p.id for p, _ in states}
    in_loop = {n.id for n in loop_nodes}

    # A padded row's gradients are zero times the step's derivatives there, which is nan where a
    # derivative is infinite (sqrt at 0). Where gradients leave a row (to the previous state, to a
    # read, into a sum over rows for a weight) a select, which drops a nan, makes them exactly 0.
    def exits(n: Node) -> bool:
        return mask is not None and any(not i.batched and i.dtype == "float" and i.id in wanted
                                        for i in n.inputs)

    for n in reversed(loop_nodes):
        if n.id not in grads or not n.inputs:
            continue
        with sites_from(n):  # the derivative's nodes name the user line of the value they differentiate
            g = _total(grads[n.id])
            if exits(n):
                g = real_rows_only(g)
            gs = REGISTRY[n.op].vjp(n, g)
        for inp, gi in zip(n.inputs, gs):
            if gi is None or inp.dtype != "float":
                continue
            if inp.id in in_loop or inp.id in wanted:
                grads.setdefault(inp.id, []).append(gi)
    for prev, _ in states:
        with sites_from(prev):
            g = real_rows_only(_total(grads[prev.id])) if prev.id in grads else None
            if mask is not None:
                k = [p for p, _ in states].index(prev)
                through = by_mask(grad_next[k], 0.0, grad_next[k])
                g = through if g is None else make("add", (g, through))
        deriv.grad_prev.append(g)
    for r in reads:
        if r.id in grads:
            with sites_from(r):
                deriv.grad_of[r.id] = real_rows_only(_total(grads[r.id])) if r.batched else _total(grads[r.id])
    return deriv
