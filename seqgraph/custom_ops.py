"""The compiled loops as `torch.library` custom ops, so torch.compile can trace around them.

When a model holding a compiled seqgraph module is itself run under `torch.compile`, the
generated Python loops would be unrolled (or broken) by the tracer. Instead, each compiled
program registers two opaque ops, `seqgraph::loop_<key>` (the forward loop) and
`seqgraph::loop_<key>_backward`, with fake implementations that give output shapes from the
plan, and an autograd rule that calls the backward op. The tracer then sees one node for the
whole time loop, and nothing breaks the graph. Eager execution keeps the autograd Function in
compiled.py; this module only registers and calls the ops, and must not generate code.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

_REGISTERED: dict[str, object] = {}  # op name -> the op
_CURRENT: dict[str, object] = {}  # op name -> the program it runs now (the last one made for its key)


def _shapes(plan, T, B, save: bool):
    step = plan.step
    outs = [(T, B) + o.shape for o in step.outputs]
    finals = [(B,) + p.shape for p, _ in step.states]
    if not save:
        return outs + finals
    saved = [(T, B) + n.shape for n in _saved_nodes(plan)]
    seqs = [(T + 1, B) + p.shape for p, _ in step.states]
    return outs + finals + saved + seqs


def _saved_nodes(plan):
    from .compiler.codegen_torch import all_saved
    return all_saved(plan)


class _OpInfo:
    """What the ops read of a program's plan, worked out once per program."""

    def __init__(self, program):
        plan = program.plan
        self.n_out, self.n_state = len(plan.step.outputs), len(plan.step.states)
        self.n_saved = len(_saved_nodes(plan))
        # which reads get a gradient, per backward variant (keyed by "masked")
        self.has_grad = {m: [r.id in _grad_reads(plan, m) for r in plan.reads] for m in (False, True)}


def _current(name: str):
    """(the program op `name` runs, its _OpInfo)."""
    program = _CURRENT[name]
    info = program.__dict__.get("_op_info")
    if info is None:
        info = program.__dict__["_op_info"] = _OpInfo(program)
    return program, info


def loop_op(program, key: tuple):
    """The forward custom op of `program`: one per key, registered on first use. A program made
    again for the same key (after clear_cache()) takes the op over, so the op's name stays the
    one a file saved by torch.export names, and the dropped program is freed."""
    name = "loop_" + hashlib.sha1(repr(key).encode()).hexdigest()[:16]
    _CURRENT[name] = program
    if name in _REGISTERED:
        return _REGISTERED[name]

    from .compiled import _stand_in, _without_gradient

    @torch.library.custom_op(f"seqgraph::{name}", mutates_args=())
    def forward(reads: list[torch.Tensor], states: list[torch.Tensor], mask: Optional[torch.Tensor],
                T: int, B: int, save: bool, autocast: Optional[torch.dtype]) -> list[torch.Tensor]:
        from .compiled import _loop
        program, _ = _current(name)
        device = (states or reads)[0].device
        with _under(device, autocast):
            outs, finals, rest = _loop(program, "forward", device)(T, B, mask, list(reads), list(states), save)
        result = list(outs) + [f.clone() for f in finals]  # finals may view the state sequence
        if save:
            saved, seqs = rest
            result += list(saved) + list(seqs)
        return result

    @forward.register_fake
    def _(reads, states, mask, T, B, save, autocast):
        ref = states[0] if states else next(r for r in reads if r.is_floating_point())
        return [ref.new_empty(s) for s in _shapes(_current(name)[0].plan, T, B, save)]

    @torch.library.custom_op(f"seqgraph::{name}_backward", mutates_args=())
    def backward_op(reads: list[torch.Tensor], saved: list[torch.Tensor], seqs: list[torch.Tensor],
                    mask: Optional[torch.Tensor], grad_outs: list[torch.Tensor], grad_finals: list[torch.Tensor],
                    T: int, autocast: Optional[torch.dtype]) -> list[torch.Tensor]:
        from .compiled import _loop
        program, info = _current(name)
        fn_name = "backward_masked" if mask is not None else "backward_plain"
        device = (seqs or grad_outs)[0].device
        with _under(device, autocast):  # the forward's
            dreads, dstates = _loop(program, fn_name, device)(T, mask, list(reads), list(saved), list(seqs),
                                                               [g.contiguous() for g in grad_outs],
                                                               [g.contiguous() for g in grad_finals])
        kept = [g.contiguous() for g, keep in zip(dreads, info.has_grad[mask is not None]) if keep]
        # a state the step never reads gets None from the loop: zeros of its shape here, since a
        # custom op returns tensors only
        return kept + [g.clone() if g is not None else torch.zeros_like(gf) for g, gf in zip(dstates, grad_finals)]

    @backward_op.register_fake
    def _(reads, saved, seqs, mask, grad_outs, grad_finals, T, autocast):
        keeps = _current(name)[1].has_grad[mask is not None]
        kept = [r.new_empty(r.shape) for r, keep in zip(reads, keeps) if keep]
        return kept + [g.new_empty(g.shape) for g in grad_finals]

    def setup_context(ctx, inputs, output):
        reads, states, mask, T, B, save, autocast = inputs
        if not save:
            raise RuntimeError("seqgraph: a loop run without saving cannot be differentiated")
        program, info = _current(name)
        first_saved = info.n_out + info.n_state
        saved = output[first_saved:first_saved + info.n_saved]
        seqs = output[first_saved + info.n_saved:]
        ctx.counts = (len(reads), len(saved), info.n_state)
        ctx.T, ctx.has_mask, ctx.autocast, ctx.has_grad = T, mask is not None, autocast, info.has_grad
        # as the eager autograd Function does: a read the backward never looks at is kept as a
        # one-element stand-in of its shape, so the forward's copy of it can be freed
        used = _reads_used(program.plan, mask is not None)
        kept = [r if used is None or n.id in used else _stand_in(r) for n, r in zip(program.plan.reads, reads)]
        ctx.save_for_backward(*kept, *saved, *seqs, *([mask] if mask is not None else []))
        ctx.like = [o for o in output[:first_saved]]
        constant = _without_gradient(program, reads, states, T, mask)  # as the eager autograd Function marks them
        if constant:
            ctx.mark_non_differentiable(*[output[k] for k in constant])

    def backward(ctx, grads):
        tensors = list(ctx.saved_tensors)
        nr, ns, n_state = ctx.counts
        reads, saved = tensors[:nr], tensors[nr:nr + ns]
        seqs = tensors[nr + ns:nr + ns + n_state]
        mask = tensors[-1] if ctx.has_mask else None
        firsts = [g if g is not None else torch.zeros_like(like) for g, like in zip(grads[:len(ctx.like)], ctx.like)]
        n_out = len(ctx.like) - n_state
        res = backward_op(reads, saved, seqs, mask, firsts[:n_out], firsts[n_out:], ctx.T, ctx.autocast)
        keeps = ctx.has_grad[mask is not None]
        it = iter(res[:sum(keeps)])
        dreads = [next(it) if keep else None for keep in keeps]
        return dreads, list(res[sum(keeps):]), None, None, None, None, None

    forward.register_autograd(backward, setup_context=setup_context)
    _REGISTERED[name] = forward
    return forward


def _under(device: torch.device, autocast: Optional[torch.dtype]):
    """Autocast to `autocast` on `device` (None: off). The ops run opaque to the tracer, which
    records no autocast around them: the caller's autocast dtype comes as an argument."""
    from .compiled import autocast_as
    return autocast_as((device.type, autocast is not None, autocast or torch.bfloat16))


def _reads_used(plan, masked: bool) -> set[int] | None:
    """Ids of the reads the backward variant looks at; None (keep them all) where the variant
    has no generated backward."""
    return plan.backward_plan(masked).reads_used if plan.backward_ok(masked) else None


def _grad_reads(plan, masked: bool) -> set[int]:
    """Ids of the reads whose gradient the backward variant computes (none if it has none: the
    compiled module then runs the reference loop instead and never calls this op's backward)."""
    if not plan.backward_ok(masked):
        return set()
    return set(plan.backward_plan(masked).deriv.grad_of)
