"""The reference interpreter: runs a graph op by op with each op's torch rule.

It is the oracle every compiled backend is tested against, so it stays plain: walk the nodes
in topological order, look each op up in the registry, call its torch rule. It must not
optimise, fuse or cache anything.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .ir import Node
from .ops import REGISTRY


def evaluate(order: Sequence[Node], leaves: Mapping[int, torch.Tensor], *, dtype: torch.dtype,
             device: torch.device, wanted: Sequence[Node] | None = None) -> dict[int, torch.Tensor]:
    """Values of every node in `order`; `leaves` maps leaf node ids to their tensors.
    `leaves` may also bind non-leaf nodes that are computed elsewhere (a fused region's
    inputs). With `wanted`, values that no later node needs are dropped as soon as possible."""
    env: dict[int, torch.Tensor] = dict(leaves)
    last_use: dict[int, int] = {}
    if wanted is not None:
        for k, n in enumerate(order):
            for i in n.inputs:
                last_use[i.id] = k
        keep = {n.id for n in wanted}
    for k, n in enumerate(order):
        if n.id in env:
            pass
        elif n.op == "const":
            env[n.id] = torch.tensor(n.attrs["value"], dtype=dtype, device=device)
        elif not n.inputs:
            raise KeyError(f"no value bound for leaf {n!r}")
        else:
            try:
                env[n.id] = REGISTRY[n.op].torch(n, *(env[i.id] for i in n.inputs))
            except (RuntimeError, IndexError) as e:
                if not hasattr(e, "add_note"):  # Python 3.10: a new exception of the same type says it
                    raise type(e)(f"while executing {n!r}: {e}") from e
                e.add_note(f"while executing {n!r}")  # the error itself, kept whole, with the node
                raise
        if wanted is not None:
            for i in n.inputs:
                if last_use.get(i.id) == k and i.id not in keep:
                    env.pop(i.id, None)
    return env


def run_step(cell, xs: Sequence[torch.Tensor], states: Sequence[torch.Tensor], contexts: Sequence[torch.Tensor],
             noises: Sequence[torch.Tensor], params: Mapping[str, torch.Tensor], *, dtype, device):
    """One step of `cell`: returns (outputs, next_states) as lists of tensors."""
    leaves: dict[int, torch.Tensor] = {}
    for node, v in zip(cell.inputs, xs):
        leaves[node.id] = v
    for (prev, _), v in zip(cell.states, states):
        leaves[prev.id] = v
    for node, v in zip(cell.contexts, contexts):
        leaves[node.id] = v
    for node, v in zip(cell.noises, noises):
        leaves[node.id] = v
    for key, node in cell.params.items():
        leaves[node.id] = params[key]
    wanted = list(cell.outputs) + [n for _, n in cell.states]
    env = evaluate(cell.order, leaves, dtype=dtype, device=device, wanted=wanted)
    return [env[o.id] for o in cell.outputs], [env[n.id] for _, n in cell.states]
