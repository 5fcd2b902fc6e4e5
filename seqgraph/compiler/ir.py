"""The graph IR: a `Node` is one value of one step, built from an op and its input nodes.

A node knows its op (a key of the op registry), its inputs, its attributes, its inferred
per-example shape (the batch dimension is implicit and never part of `shape`), whether it
carries a batch dimension at all (parameters and constants do not), its dtype kind
("float" or "long"), an optional user name and the user's creation site. Nodes are
immutable once built, except for `.named()`, which only sets the display name. This module
builds and orders nodes; it must not run them (see interpret.py) nor know any op's math.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

from ..errors import Site, user_site

_ids = itertools.count()


class Node:
    __slots__ = ("id", "op", "inputs", "attrs", "shape", "batched", "dtype", "name", "site", "module")

    def __init__(self, op: str, inputs: Sequence["Node"], attrs: dict, shape: tuple, batched: bool,
                 dtype: str = "float", name: str | None = None, site: Site | None = None, module=None):
        self.id = next(_ids)
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = dict(attrs)
        self.shape = tuple(int(s) for s in shape)
        self.batched = bool(batched)
        self.dtype = dtype
        self.name = name
        self.site = site if site is not None else user_site()
        self.module = module  # the sg.Module whose call made this node, if any

    # -- naming -------------------------------------------------------------------
    def named(self, name: str) -> "Node":
        """Give this node a name used in errors, pictures and generated code."""
        self.name = name
        return self

    def display_op(self) -> str:
        if self.module is not None:
            return type(self.module).__name__
        return {"input": "Input", "state": "State", "context": "Context", "param": "Parameter",
                "const": "Constant", "noise": "Noise"}.get(self.op, self.op)

    def label(self) -> str:
        return self.name or f"{self.op}_{self.id}"

    def __repr__(self) -> str:
        b = "B," if self.batched else ""
        return f"<{self.op} {self.label()!r} ({b}{','.join(map(str, self.shape))}) at {self.site}>"

    def __hash__(self) -> int:
        return self.id

    def __eq__(self, other) -> bool:  # identity; `==` on values is not an op in the DSL
        return self is other

    def __bool__(self) -> bool:
        raise TypeError(f"node {self.label()!r} (declared at {self.site}) is a symbolic value: Python's if, and, "
                        "or and not cannot see what it will hold at run time; use sg.where_mask, sg.maximum "
                        "or sg.minimum to choose between values, and `is None` to test for a missing node")

    def __iter__(self):
        raise TypeError(f"node {self.label()!r} (declared at {self.site}) is one symbolic value and cannot be iterated; "
                        "use sg.chunk(node, n) or sg.split(node, sizes) to take it apart")

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    # operator overloading is attached by seqgraph.dsl (which knows the ops)


LEAF_OPS = frozenset({"input", "state", "context", "param", "const", "noise"})


def topo_order(outputs: Iterable[Node], stop: set[int] = frozenset()) -> list[Node]:
    """All nodes that `outputs` depend on, each after its inputs (deterministic order). The walk
    does not go through the nodes whose ids are in `stop` (they are listed, as leaves)."""
    order: list[Node] = []
    seen: set[int] = set()
    for root in outputs:
        if root.id in seen:
            continue
        stack = [(root, iter(() if root.id in stop else root.inputs))]
        seen.add(root.id)
        while stack:
            node, it = stack[-1]
            child = next(it, None)
            if child is None:
                stack.pop()
                order.append(node)
            elif child.id not in seen:
                seen.add(child.id)
                stack.append((child, iter(() if child.id in stop else child.inputs)))
    return order


def consumers(order: Sequence[Node]) -> dict[int, list[Node]]:
    """Map node id -> the nodes (in `order`) that read it."""
    users: dict[int, list[Node]] = {n.id: [] for n in order}
    for n in order:
        for i in n.inputs:
            users.setdefault(i.id, []).append(n)
    return users


def format_graph(order: Sequence[Node]) -> str:
    """One line per node: `%12 = sigmoid(%10) : (B,64)  # gate_i @ cell.py:7` (for debug dumps)."""
    lines = []
    for n in order:
        args = ", ".join(f"%{i.id}" for i in n.inputs)
        attrs = {k: v for k, v in n.attrs.items() if k not in ("init", "module", "group", "shape", "batched", "dtype")}
        a = f" {attrs}" if attrs else ""
        b = "B," if n.batched else ""
        nm = f"{n.name} " if n.name else ""
        lines.append(f"%{n.id} = {n.op}({args}){a} : ({b}{','.join(map(str, n.shape))}) {n.dtype}  # {nm}@ {n.site}")
    return "\n".join(lines)
