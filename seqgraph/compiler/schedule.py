"""Planning step (called by plan.build_plan, not a graph pass): schedule — cut the nodes of one step into an ordered list of stages.

A stage is a GEMM (a matrix product: torch's cuBLAS or MKL call, or the cpu backend's C loops
calling MKL or seqgraph's own GEMM), a fused region (a
maximal set of elementwise ops, last-dim reductions, slices and concats that one kernel
computes row by row) or a torch fallback (an op no kernel fuses yet, e.g. a reduction over a
non-last dim; the plan says why). Regions are found by depth: a node's depth is the number of
non-fused nodes on its longest path from the step's inputs, and the fusable nodes of one
depth form one region, which is always convex (no path leaves it and comes back). What a
kernel can compute inline is the backend's to say (`fusable`: the Triton rules by default,
ops.c_fusable for the C kernels). Must not change the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .ir import Node, consumers
from .ops import REGISTRY, fusable as triton_fusable

Fusable = Callable[[Node], "tuple[bool, str]"]


_ROW_LAYOUT = {"slice", "concat", "pad"}


@dataclass
class Stage:
    kind: str  # "gemm" | "fused" | "torch"
    nodes: list[Node]
    why: str = ""  # for torch fallbacks: the reason no kernel fuses them
    inputs: list[Node] = field(default_factory=list)  # values read from outside the stage
    outputs: list[Node] = field(default_factory=list)  # values used after the stage


def node_fusable(n: Node, fusable: Fusable = triton_fusable) -> tuple[bool, str]:
    if REGISTRY[n.op].kind == "matmul":
        return False, "gemm"
    if not n.batched:
        return False, "unbatched value inside the loop"
    wide = [v.shape for v in (n, *n.inputs) if len(v.shape) > 1]
    if wide:
        return False, f"works on per-example shape {wide[0]}, which has more than one dim"
    if n.op in _ROW_LAYOUT:  # column ranges of a row: the kernel generator loads/stores them at offsets
        return True, ""
    return fusable(n)


def schedule(nodes: list[Node], live_after: set[int], fusable: Fusable = triton_fusable) -> list[Stage]:
    """Stages for `nodes` (topological). `live_after`: ids of values needed after the step."""
    inside = {n.id for n in nodes}
    depth: dict[int, int] = {}
    kind: dict[int, tuple[str, str]] = {}
    for n in nodes:
        ok, why = node_fusable(n, fusable)
        kind[n.id] = ("fused", "") if ok else (("gemm", "") if why == "gemm" else ("torch", why))
        d = max((depth[i.id] for i in n.inputs if i.id in inside), default=0)
        depth[n.id] = d if ok else d + 1
    # a fused node that reads only values from outside the step (a slice of the hoisted input
    # projection, say) joins the region of its first consumer instead of opening one; so does
    # a chain of them (a QRNN's gate over that slice) where that leaves one region fewer
    users = consumers(nodes)
    singles = _join_consumers(nodes, depth, kind, users, _free_nodes(nodes, kind, inside, chains=False))
    chains = _join_consumers(nodes, depth, kind, users, _free_nodes(nodes, kind, inside, chains=True))
    depth = chains if _regions(chains, kind) < _regions(singles, kind) else singles
    stages: list[Stage] = []
    for d in range(max(depth.values(), default=-1) + 1):
        unfused = [n for n in nodes if depth[n.id] == d and kind[n.id][0] != "fused"]
        for k in ("gemm", "torch"):
            group = [n for n in unfused if kind[n.id][0] == k]
            if group:
                why = "; ".join(sorted({f"{n.op}: {kind[n.id][1]}" for n in group})) if k == "torch" else ""
                stages.append(Stage(k, group, why))
        fused = [n for n in nodes if depth[n.id] == d and kind[n.id][0] == "fused"]
        if fused:
            stages.append(Stage("fused", fused))
    _wire(stages, live_after)
    return stages


def _free_nodes(nodes: list[Node], kind: dict, inside: set[int], chains: bool) -> set[int]:
    """Ids of the fused nodes computed from values from outside the step alone: reading only
    those (chains=False), or also other such nodes (chains=True)."""
    free: set[int] = set()
    for n in nodes:
        if kind[n.id][0] == "fused" and all(i.id not in inside or (chains and i.id in free) for i in n.inputs):
            free.add(n.id)
    return free


def _join_consumers(nodes: list[Node], depth: dict[int, int], kind: dict, users: dict, free: set[int]) -> dict[int, int]:
    """`depth` with each node of `free` whose consumers are all fused moved to its first consumer's."""
    moved = dict(depth)
    for n in reversed(nodes):
        us = users.get(n.id, [])
        if n.id in free and us and all(kind[u.id][0] == "fused" for u in us):
            moved[n.id] = min(moved[u.id] for u in us)
    return moved


def _regions(depth: dict[int, int], kind: dict) -> int:
    return len({d for i, d in depth.items() if kind[i][0] == "fused"})


def _wire(stages: list[Stage], live_after: set[int]) -> None:
    """Fill each stage's external inputs and the outputs later stages (or the caller) need."""
    owner = {n.id: s for s in stages for n in s.nodes}
    needed: dict[int, set[int]] = {id(s): set() for s in stages}
    for s in stages:
        ids = {n.id for n in s.nodes}
        seen = set()
        for n in s.nodes:
            for i in n.inputs:
                if i.id not in ids and i.id not in seen:
                    seen.add(i.id)
                    s.inputs.append(i)
                    if i.id in owner:
                        needed[id(owner[i.id])].add(i.id)
    for s in stages:
        s.outputs = [n for n in s.nodes if n.id in needed[id(s)] or n.id in live_after]
