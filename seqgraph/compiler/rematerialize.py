"""Planning step (called by plan.build_plan, not a graph pass): rematerialize — forward values the backward loop recomputes instead of reading saved.

Every forward value the derivative reads would be written to a (T, B, ...) buffer by the
forward loop and read back by the backward loop: two passes over memory per value and step. A
value that a few cheap ops make from values the backward step has anyway (values still saved,
the previous states, the per-step and invariant reads, constants) is cheaper to make again
inside the backward step's fused region than to store and load. So, in forward order, each
saved value that cheap ops (OpDef.cheap: arithmetic, selects, layout ops, row normalisations and
outer products and other spreads of a vector: no transcendental function, no sum of products) make from values at hand, saved or recomputed, through at
most a few intermediate values nobody saved, is dropped from the saved list and recomputed with
those intermediates. Examples: a layer norm of a saved pre-activation, the new cell state of an
LSTM made from its saved gates. Any elementwise op over the per-step reads alone is recomputed
too, transcendental or not (a QRNN's gates, which the fused loop computes from the input
projection's rows): the backward step then reads those rows instead of the gates, as many
bytes, and the forward writes nothing (measured: the same time, 37.5 MiB less memory at
T=100 B=64 H=512). Values the after-loop reductions read directly, gradient roots
and ops the backend's kernels cannot compute inline stay saved, and so do values a comparison
of the derivative reads (the derivatives of maximum, minimum, relu and abs branch on exact
equality or sign): a C or Triton compiler may fuse a multiply and an add into one rounding in
one kernel and not in another, so a recomputed value can differ from the saved one in its last
bit, which is harmless everywhere but at such a branch. Must not change what the derivative
computes, only where its inputs come from.
"""
from __future__ import annotations

from .ir import Node
from .ops import REGISTRY
from .schedule import node_fusable


def compared_values(derivative: list[Node]) -> set[int]:
    """Ids of the values the derivative's comparisons (OpDef.piecewise_constant) read: they
    must stay bit-exact."""
    return {i.id for n in derivative if REGISTRY[n.op].piecewise_constant for i in n.inputs}


def _from_reads(n: Node, at_hand: set[int]) -> bool:
    """Whether `n` is an elementwise op over per-step reads and constants (through slices and
    reshapes): a gate a fused loop computes from the input projection's rows."""
    if REGISTRY[n.op].kind != "elementwise":
        return False

    def read(v: Node) -> bool:
        return v.op == "const" or v.id in at_hand or (v.op in ("slice", "reshape") and read(v.inputs[0]))
    return all(read(i) for i in n.inputs)


def rematerialize(loop: list[Node], saved: list[Node], at_hand: set[int], keep: set[int],
                  fusable, max_chain: int = 4) -> tuple[list[Node], list[Node]]:
    """(still saved, recomputed in the backward step, in forward order).

    loop: the forward loop's nodes in order; saved: the values the derivative reads from it;
    at_hand: ids the backward step has without saving (reads, previous states, constants);
    keep: ids that must stay saved; fusable(node) -> (ok, why): what the backend's kernels
    compute inline (a recomputed value must join the backward step's fused region). A
    saved value may be recomputed through at most `max_chain` cheap values nobody saved."""
    saved_ids = {n.id for n in saved}
    made: set[int] = set()  # recomputed so far
    recomputed: list[Node] = []

    def chain(n: Node, budget: list[int]) -> list[Node] | None:
        """The nodes (n last, inputs first) that recompute n from what is at hand, or None."""
        if n.op == "const" or n.id in at_hand or n.id in made:
            return []
        if not n.inputs or not node_fusable(n, fusable)[0]:
            return None
        if not REGISTRY[n.op].cheap and not _from_reads(n, at_hand):
            return None
        need: list[Node] = []
        for i in n.inputs:
            if i.id in saved_ids:
                continue
            if i.id not in made and i.id not in at_hand and i.op != "const":
                budget[0] -= 1
                if budget[0] < 0:
                    return None
            sub = chain(i, budget)
            if sub is None:
                return None
            need += [m for m in sub if m not in need]
        return need + [n]

    for n in loop:
        if n.id not in saved_ids or n.id in keep:
            continue
        saved_ids.discard(n.id)  # n's own inputs may not be n itself
        nodes = chain(n, [max_chain])
        if nodes is None:
            saved_ids.add(n.id)
            continue
        for m in nodes:
            made.add(m.id)
            recomputed.append(m)
    order = {n.id: k for k, n in enumerate(loop)}
    return [n for n in saved if n.id in saved_ids], sorted(recomputed, key=lambda m: order[m.id])


__all__ = ["rematerialize", "compared_values"]
