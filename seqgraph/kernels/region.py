"""A fused region: the unit of work one generated kernel computes for one time step.

The compiler's planner cuts the per-step graph (and its derivative) into regions of ops that
one kernel can compute row by row: elementwise ops, reductions over the last feature dim,
slices and concats along it. A region reads external values (`inputs`: tensors of shape
(B, W) for batched values, (W,) or () for parameters and constants) and writes `outputs`.
Masking is folded in: for a padded row, an output with a `carry` entry keeps the value of that
input (a state keeps its previous value), and an output listed in `zero_masked` writes zero.
This module only describes regions and must not generate code; that lives in codegen.py
and c_codegen.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..compiler.ir import Node
from ..compiler.ops import const_key


@dataclass
class Region:
    nodes: list[Node]  # computed inside the kernel, in topological order
    inputs: list[Node]  # external values the kernel loads, in argument order
    outputs: list[Node]  # values the kernel stores, in result order (each in `nodes` or `inputs`)
    carry: dict[int, int] = field(default_factory=dict)  # output index -> input index kept on padded rows
    zero_masked: set[int] = field(default_factory=set)  # output indices that are zero on padded rows
    name: str = "region"

    def signature(self) -> tuple:
        """Structure only (ops, attrs, shapes, wiring): equal regions share one compiled kernel."""
        index = {n.id: k for k, n in enumerate(self.inputs + self.nodes)}
        rows = []
        for n in self.inputs:
            rows.append(("in", n.shape, n.batched, n.dtype, ("const", const_key(n.attrs["value"])) if n.op == "const" else None))
        for n in self.nodes:
            attrs = tuple(sorted((k, const_key(v) if k == "value" else v) for k, v in n.attrs.items()
                                 if k not in ("group", "init", "piece") and not callable(v)))
            rows.append((n.op, tuple(index[i.id] for i in n.inputs), attrs, n.shape, n.batched))
        return (tuple(rows), tuple(index[o.id] for o in self.outputs), tuple(sorted(self.carry.items())),
                tuple(sorted(self.zero_masked)))


def bind_inputs(region: Region, non_const: list[int], inputs) -> list:
    """A kernel call's inputs, one per region input: `inputs` may list them all (constants as
    None) or leave the constants out (`non_const`: the indices of the others)."""
    n = len(region.inputs)
    inputs = list(inputs)
    if len(inputs) == n:
        return inputs
    if len(inputs) == len(non_const):
        full = [None] * n
        for k, t in zip(non_const, inputs):
            full[k] = t
        return full
    raise ValueError(f"region {region.name!r} takes {n} inputs ({len(non_const)} without its constants), "
                     f"got {len(inputs)}")

