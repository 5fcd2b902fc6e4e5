"""Pass: fuse_gate_matmuls — linears that read the same operand become one GEMM.

An LSTM written gate by gate has four Linears on h (and four on x); this pass concatenates
their weights along the output dim, computes one linear, and gives each original its slice of
the result, so an LSTM step does exactly one recurrent GEMM. The concatenated weight is an
"invariant" node (a torch.cat of the user's parameters, redone on every call), so gradients
flow to the user's own parameters and nothing can go stale after an optimizer step. A bias
added right after a hoisted linear is folded into the same GEMM. Must not change values.
"""
from __future__ import annotations

from .hoist import classify
from .ir import Node, consumers
from .ops import make
from .stepgraph import StepGraph, clone, rewrite


def _bias_of(lin: Node, users: dict[int, list[Node]], results: set[int]) -> Node | None:
    """The add(linear, bias) node right after `lin`, when the bias is an unbatched vector and
    nothing else (no other node, no output or next state) reads the linear alone."""
    us = users.get(lin.id, [])
    if len(us) != 1 or lin.id in results:
        return None
    u = us[0]
    if u.op == "add" and u.inputs[0] is lin and not u.inputs[1].batched and u.inputs[1].shape == lin.shape[-1:]:
        return u
    return None


def fuse_gate_matmuls(step: StepGraph) -> StepGraph:
    order = step.order()
    cls = classify(order)
    users = consumers(order)
    groups: dict[int, list[Node]] = {}
    for n in order:
        # a linear whose weight is loop-invariant (linear's shape rule makes it unbatched); its
        # operand varies per step
        if n.op == "linear" and cls[n.inputs[1].id] == "invariant" and cls[n.inputs[0].id] != "invariant":
            groups.setdefault(n.inputs[0].id, []).append(n)
    plan: dict[int, tuple] = {}  # node id -> replacement recipe
    fused = 0
    for members in groups.values():
        hoisted = cls[members[0].inputs[0].id] == "hoisted"
        biases = [_bias_of(m, users, {r.id for r in step.results}) for m in members]
        fold_bias = hoisted and all(b is not None for b in biases)
        if len(members) == 1 and not fold_bias:
            continue
        fused += len(members) > 1
        plan[members[0].inputs[0].id] = (members, biases if fold_bias else None)

    built: dict[int, Node] = {}  # operand id -> fused node
    replaced: dict[int, tuple[Node, int, int]] = {}  # original node id -> (fused node id, start, stop)
    for x_id, (members, biases) in plan.items():
        start = 0
        for m, b in zip(members, biases or [None] * len(members)):
            stop = start + m.shape[-1]
            replaced[m.id] = (x_id, start, stop)
            if b is not None:
                replaced[b.id] = (x_id, start, stop)
            start = stop

    def visit(n: Node, ins: tuple) -> Node:
        if n.id not in replaced:
            return clone(n, ins)
        x_id, start, stop = replaced[n.id]
        if x_id not in built:
            members, biases = plan[x_id]
            assert n.op == "linear", "a fused bias-add is visited after its linear (topological order)"
            x = ins[0]
            w = members[0].inputs[1] if len(members) == 1 else make(
                "concat", tuple(m.inputs[1] for m in members), dim=0, site=members[0].site, name="fused_weight")
            y = make("linear", (x, w), site=members[0].site, name=_group_name(members))
            if biases is not None:
                bias = biases[0].inputs[1] if len(biases) == 1 else make(
                    "concat", tuple(b.inputs[1] for b in biases), dim=0, site=members[0].site, name="fused_bias")
                y = make("add", (y, bias), site=members[0].site, name=_group_name(members))
            built[x_id] = y
        y = built[x_id]
        if start == 0 and stop == y.shape[-1]:
            return y
        return make("slice", (y,), dim=len(y.shape) - 1, start=start, stop=stop, site=n.site, name=n.name)

    new = rewrite(step, visit)
    new.notes.append(f"fuse_gate_matmuls: {fused} group(s) of linears sharing an operand became one GEMM each"
                     + (f"; biases folded into {sum(1 for v in plan.values() if v[1])} hoisted GEMM(s)"
                        if any(v[1] for v in plan.values()) else ""))
    return new


def _group_name(members: list[Node]) -> str:
    names = [m.name for m in members if m.name]
    return "+".join(dict.fromkeys(names)) if names else "fused_gemm"
