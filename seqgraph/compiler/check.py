"""The checker: validates the wiring of a cell or graph when it is built.

Shapes are already inferred node by node as the user builds them (ops.make raises there,
at the user's line). What only the whole graph can tell is checked here: every declared
input is used, every state read has a next value of its shape, nothing undeclared leaks in,
every chunk/split piece is used, and the names of inputs, states and contexts are unique. Each
failure is a GraphError naming the node and its file:line. This module must not run tensors or change the graph.
"""
from __future__ import annotations

import warnings
from typing import NoReturn

from ..errors import GraphError, ShapeError, WiringError, describe
from .ir import Node, topo_order


def _fail(cls, msg, node=None, edge=None) -> NoReturn:
    raise cls(msg, node=node, edge=edge)


def _twin(n: Node, listed: dict) -> str:
    """When the cell lists another leaf of the same kind and name, the likely mistake: a value
    of another cell (built by an earlier call of the same function) used in this one."""
    other = listed.get((n.op, n.name))
    if other is None or other is n:
        return ""
    return (f"; the one listed (declared at {other.site}) is a different node of the same name, so this one "
            f"comes in with a value of another graph, such as a node kept from an earlier call of the "
            f"function that builds the cell")


def check_cell(inputs: list[Node], states: list[tuple[Node, Node]], outputs: list[Node],
               contexts: list[Node] | None) -> list[Node]:
    """Check one step of a recurrence; returns its nodes in topological order. A failure
    carries a picture of the failing node (see seqgraph.viz.attach_error_picture)."""
    try:
        return _check_cell(inputs, states, outputs, contexts)
    except GraphError as err:
        _attach_picture(err, [o for o in outputs if isinstance(o, Node)]
                        + [n for _, n in states if isinstance(n, Node)])
        raise


def _attach_picture(err, around) -> None:
    from ..viz import attach_error_picture
    attach_error_picture(err, around=around)


def _check_cell(inputs, states, outputs, contexts) -> list[Node]:
    seen_inputs = set()
    for x in inputs:
        if not isinstance(x, Node) or x.op != "input":
            _fail(WiringError, f"inputs= must hold sg.Input nodes; got {_what(x)}", _node_or_none(x))
        if x.id in seen_inputs:
            _fail(WiringError, f"{describe(x)} appears twice in inputs= (each input is one tensor of the call)", x)
        seen_inputs.add(x.id)
    seen_ctx = set()
    for c in contexts or []:
        if not isinstance(c, Node) or c.op != "context":
            _fail(WiringError, f"contexts= must hold sg.Context nodes (inputs that are the same at every step); "
                               f"got {_what(c)}", _node_or_none(c))
        if c.id in seen_ctx:
            _fail(WiringError, f"{describe(c)} appears twice in contexts=", c)
        seen_ctx.add(c.id)
    seen_prev = set()
    for prev, nxt in states:
        if not isinstance(prev, Node) or prev.op != "state":
            _fail(WiringError, f"the keys of states= must be sg.State nodes; got {_what(prev)}", _node_or_none(prev))
        if prev.id in seen_prev:
            _fail(WiringError, f"{describe(prev)} appears twice in states=", prev)
        seen_prev.add(prev.id)
        if not isinstance(nxt, Node):
            _fail(WiringError, f"the next value of {describe(prev)} must be a node; got {_what(nxt)}", prev)
        if nxt is prev:
            warnings.warn(f"{describe(prev)} is its own next value, so it never changes: a constant state "
                          f"(if that is not meant, give states= its new value)", stacklevel=4)
        if not nxt.batched:
            _fail(ShapeError, f"the next value of {describe(prev)}, {describe(nxt)}, does not depend on the batch "
                              f"(it is a parameter or constant); a state's next value must be a per-example "
                              f"value of shape (B,{','.join(map(str, prev.shape))})", nxt, edge=(nxt, prev))
        if nxt.shape != prev.shape or nxt.dtype != prev.dtype:
            b = "(B," if nxt.batched else "("
            _fail(ShapeError, f"{describe(prev)} has shape (B,{','.join(map(str, prev.shape))}) but its next value "
                              f"{describe(nxt)} has shape {b}{','.join(map(str, nxt.shape))}) {nxt.dtype}",
                  nxt, edge=(nxt, prev))
    for o in outputs:
        if not isinstance(o, Node):
            _fail(WiringError, f"outputs= must hold nodes; got {_what(o)}")
        if not o.batched:
            _fail(ShapeError, f"output {describe(o)} does not depend on the batch (it is a parameter or "
                              f"constant); an output must be a per-step value", o)
    # a state whose previous value is never read is still part of the cell (named, checked, signed)
    order = topo_order([p for p, _ in states] + list(outputs) + [n for _, n in states])
    reached = {n.id for n in order}
    for x in inputs:
        if x.id not in reached:
            _fail(WiringError, f"{describe(x)} is not used by any output or next state", x)
    declared_inputs = {x.id for x in inputs}
    declared_ctx = None if contexts is None else {c.id for c in contexts}
    listed = {(x.op, x.name): x for x in list(inputs) + [p for p, _ in states] + list(contexts or [])}
    for n in order:
        if n.op == "input" and n.id not in declared_inputs:
            _fail(WiringError, f"{describe(n)} is used but not listed in inputs=[...]{_twin(n, listed)}", n)
        if n.op == "state" and n.id not in seen_prev:
            _fail(WiringError, f"{describe(n)} is read but has no next value; add it to states={{prev: next}}"
                               f"{_twin(n, listed)}", n)
        if n.op == "context" and declared_ctx is not None and n.id not in declared_ctx:
            _fail(WiringError, f"{describe(n)} is used but not listed in contexts=[...]{_twin(n, listed)}", n)
    if contexts is not None:
        for c in contexts:
            if c.id not in reached:
                _fail(WiringError, f"{describe(c)} is not used by any output or next state", c)
    _check_chunk_pieces(order, reached)
    _check_unique_names([n for n in order if n.op in ("input", "state", "context")
                         or n.op == "param" and n.module is None])  # (a module's are named by its scope)
    return order


def check_graph(inputs: list[Node], outputs: list[Node]) -> list[Node]:
    """Check a plain (non-recurrent) graph; returns its nodes in topological order."""
    try:
        return _check_graph(inputs, outputs)
    except GraphError as err:
        _attach_picture(err, [o for o in outputs if isinstance(o, Node)])
        raise


def _check_graph(inputs, outputs) -> list[Node]:
    for x in inputs:
        if not isinstance(x, Node) or x.op not in ("input", "context"):
            _fail(WiringError, f"Graph inputs must be sg.Input or sg.Context nodes; got {_what(x)}", _node_or_none(x))
    for o in outputs:
        if not isinstance(o, Node):
            _fail(WiringError, f"Graph outputs must be nodes; got {_what(o)}")
    order = topo_order(outputs)
    reached = {n.id for n in order}
    declared = {x.id for x in inputs}
    for x in inputs:
        if x.id not in reached:
            _fail(WiringError, f"{describe(x)} is not used by any output", x)
    for n in order:
        if n.op in ("input", "context") and n.id not in declared:
            _fail(WiringError, f"{describe(n)} is used but not listed in the Graph's inputs", n)
        if n.op == "state":
            _fail(WiringError, f"{describe(n)} is a State, but a Graph has no time steps; use sg.Cell", n)
    _check_chunk_pieces(order, reached)
    return order


def _check_chunk_pieces(order, reached):
    for n in order:
        group = n.attrs.get("group")
        if group is None:
            continue
        for piece in group.pieces:
            if piece.id not in reached:
                _fail(WiringError, f"piece {piece.attrs['piece']} of the chunk/split declared at {group.site} "
                                   f"is never used (pieces used: {sum(p.id in reached for p in group.pieces)} of "
                                   f"{len(group.pieces)}); use sg.narrow to take only part of a value", piece)


def _check_unique_names(leaves):
    by_name: dict[str, Node] = {}
    for n in leaves:
        if n.name is None:
            continue
        other = by_name.get(n.name)
        if other is not None and other is not n:
            _fail(WiringError, f"two leaves are named {n.name!r}: {describe(other)} and {describe(n)}", n)
        by_name[n.name] = n


def _what(x) -> str:
    if isinstance(x, Node):
        return describe(x)
    return f"a {type(x).__name__}"


def _node_or_none(x):
    return x if isinstance(x, Node) else None


__all__ = ["check_cell", "check_graph", "GraphError"]
