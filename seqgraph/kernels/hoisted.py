"""Fused regions of hoisted nodes as autograd ops: one kernel over all T*B rows forward, one backward.

The prologue computes the nodes that read no state for all steps at once. Its products are
single large GEMMs; what follows them (a QRNN's gates over its input projection, say) was
torch code, one pass over all T*B rows per op forward and more backward. For each stage
`Plan.hoisted_regions()` picks, the kernel backends build a `HoistedRegion`: the stage as one
region kernel (C on the `cpu` backend, Triton on the `triton` backend: `KernelMaker`) and its
derivative (derive_backward over the stage's nodes, with no states) as another, which
recomputes the forward values it needs from the inputs autograd saved rather than storing
them. The derivative's sums over rows (the gradients of a bias) run after it as torch code.
The prologue calls it only where `usable` says the kernels serve (the backend's devices and
dtypes, outside torch.compile's tracing); its torch lines run otherwise. Must not make
planning decisions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import buffers
from ..compiler.derive_backward import derive_backward
from ..compiler.interpret import evaluate
from ..compiler.ir import Node, topo_order
from ..compiler.ops import REGISTRY
from .codegen import region_from_outputs
from .region import Region


@dataclass(frozen=True)
class KernelMaker:
    """What a backend brings: whether it can fuse a region (ok, why), the region's kernel as a
    function (inputs without constants, out=buffers) -> outputs, and where it runs."""

    supported: Callable[[Region], "tuple[bool, str]"]
    build: Callable[[Region], Callable]
    dtypes: tuple
    on_device: Callable[[torch.device], bool]


class NotFused(Exception):
    """Why a stage's kernels cannot be built (the stage stays torch code, and plan() says why)."""


class HoistedRegion:
    """region(*inputs) -> outputs: the stage's values for all rows, differentiable.

    Inputs are the stage's external values without constants, in `inputs` order: (N, W) rows
    of per-step values, (W,) or 0-d unbatched ones (parameters, invariants)."""

    def __init__(self, stage, name: str, kernels: KernelMaker):
        self.name = name
        self.kernels = kernels
        self.inputs: list[Node] = [i for i in stage.inputs if i.op != "const"]
        self.outputs: list[Node] = list(stage.outputs)
        self.forward_region = region_from_outputs(self.outputs, self.inputs, name=f"{name}_forward")
        ok, why = kernels.supported(self.forward_region)
        if not ok:
            raise NotFused(why)
        self._plan_backward(stage.nodes)
        ok, why = (True, "") if self.backward_region is None else kernels.supported(self.backward_region)
        if not ok:
            raise NotFused(f"its derivative: {why}")
        self.forward_kernel = kernels.build(self.forward_region)
        self.backward_kernel = None if self.backward_region is None else kernels.build(self.backward_region)
        self._needed: dict[tuple, list[Node]] = {}

    def _plan_backward(self, nodes: list[Node]) -> None:
        """Cut the stage's derivative into what the backward kernel computes row by row, the
        unbatched values it reads (`before`: torch, first) and the sums over rows after it."""
        floats = [i for i in self.inputs if i.dtype == "float"]
        deriv = derive_backward(nodes, [], self.outputs, floats, masked=False)
        self.grad_leaves = deriv.grad_out
        self.grads = {i.id: deriv.grad_of[i.id] for i in floats if i.id in deriv.grad_of}
        stop = {i.id for i in self.inputs} | deriv.leaves
        order = topo_order(list(self.grads.values()), stop)
        where: dict[int, str] = {}
        for n in order:
            if n.id in stop or not n.inputs:
                where[n.id] = "rows" if n.batched else "leaf"
            elif n.batched:
                where[n.id] = "kernel"
            elif all(where[i.id] in ("leaf", "before") for i in n.inputs):
                where[n.id] = "before"
            elif REGISTRY[n.op].sums_rows or n.op == "add":
                where[n.id] = "after"
            else:
                raise NotFused(f"its derivative reduces over rows through {n.op!r}")
        self.before = [n for n in order if where[n.id] == "before"]
        self.after = [n for n in order if where[n.id] == "after"]
        inside = [n for n in order if where[n.id] == "kernel"]
        # what leaves the kernel: the gradients of per-step inputs, and what the sums read
        wanted = [g for g in self.grads.values() if where[g.id] == "kernel"]
        wanted += [i for n in self.after for i in n.inputs if where[i.id] == "kernel"]
        self.kernel_outputs = list({n.id: n for n in wanted}.values())
        reads: dict[int, Node] = {}
        for n in inside:
            for i in n.inputs:
                if where[i.id] != "kernel" and i.op != "const":
                    reads.setdefault(i.id, i)
        self.kernel_inputs = list(reads.values())
        self.backward_region = region_from_outputs(self.kernel_outputs, self.kernel_inputs,
                                                   name=f"{self.name}_backward") if self.kernel_outputs else None

    def usable(self, *tensors: torch.Tensor) -> bool:
        """Whether the kernels serve these inputs: of one dtype the kernels compute, on their
        device, outside torch.compile's tracing (else the prologue's torch lines run)."""
        if torch.compiler.is_compiling():
            return False
        first = tensors[0]
        return first.dtype in self.kernels.dtypes and self.kernels.on_device(first.device) and \
            all(t.dtype == first.dtype and t.device == first.device for t in tensors)

    def __call__(self, *tensors: torch.Tensor) -> tuple:
        return _Apply.apply(self, *tensors)

    def forward(self, tensors) -> list[torch.Tensor]:
        return self.forward_kernel(list(tensors), out=_buffers(self.outputs, _rows(self.inputs, tensors)))

    def backward(self, tensors, grads, needs) -> list[torch.Tensor | None]:
        """The gradients of the inputs `needs` asks for (None for the others)."""
        env = {n.id: t for n, t in zip(self.inputs, tensors)}
        env.update((leaf.id, g) for leaf, g in zip(self.grad_leaves, grads))
        dtype, device = tensors[0].dtype, tensors[0].device
        env = evaluate(self.before, env, dtype=dtype, device=device)
        if self.backward_kernel is not None:
            ins = [env[i.id] for i in self.kernel_inputs]
            outs = self.backward_kernel(ins, out=_buffers(self.kernel_outputs, _rows(self.kernel_inputs, ins)))
            env.update((n.id, t) for n, t in zip(self.kernel_outputs, outs))
        env = evaluate(self._after_for(needs), env, dtype=dtype, device=device)
        return [env[self.grads[n.id].id] if need and n.id in self.grads else None
                for n, need in zip(self.inputs, needs)]

    def _after_for(self, needs) -> list[Node]:
        """The sums after the kernel that the wanted gradients take (a frozen parameter's none)."""
        key = tuple(needs)
        if key not in self._needed:
            roots = [self.grads[n.id] for n, need in zip(self.inputs, needs) if need and n.id in self.grads]
            wanted = {n.id for n in topo_order(roots)}
            self._needed[key] = [n for n in self.after if n.id in wanted]
        return self._needed[key]


def _rows(nodes: list[Node], tensors) -> torch.Tensor:
    """The first tensor of a per-step value (its rows are the call's)."""
    return next(t for n, t in zip(nodes, tensors) if n.batched)


def _buffers(nodes: list[Node], rows: torch.Tensor) -> list[torch.Tensor]:
    """Output buffers for `nodes` over the rows of `rows`, reused across calls where they are
    large (buffers.py: fresh memory of that size costs a page fault per 4 KiB, which took longer
    than the backward kernel's own work)."""
    return [buffers.empty(rows, (rows.shape[0],) + tuple(n.shape)) for n in nodes]


class _Apply(torch.autograd.Function):
    """A HoistedRegion under autograd; it saves its inputs and recomputes the rest backward."""

    @staticmethod
    def forward(ctx, region: HoistedRegion, *tensors):
        ctx.region = region
        ctx.save_for_backward(*tensors)
        return tuple(region.forward(tensors))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return (None, *ctx.region.backward(ctx.saved_tensors, grads, ctx.needs_input_grad[1:]))
