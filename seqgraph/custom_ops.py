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

_REGISTERED: dict[str, tuple[object, object]] = {}  # op name -> (the program it runs, the op)


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


def loop_op(program, key: tuple):
    """The forward custom op of `program` (registered on first use)."""
    base = "loop_" + hashlib.sha1(repr(key).encode()).hexdigest()[:16]
    name, generation = base, 0
    while name in _REGISTERED:  # a program made again after clear_cache() gets an op of its own
        if _REGISTERED[name][0] is program:  # (torch.library cannot take an op back)
            return _REGISTERED[name][1]
        generation += 1
        name = f"{base}_{generation}"
    plan = program.plan
    step = plan.step
    n_out, n_state = len(step.outputs), len(step.states)
    n_saved = len(_saved_nodes(plan))
    # which reads get a gradient, per backward variant (keyed by "masked")
    has_grad = {m: [r.id in _grad_reads(plan, m) for r in plan.reads] for m in (False, True)}

    from .compiled import _stand_in, _without_gradient

    @torch.library.custom_op(f"seqgraph::{name}", mutates_args=())
    def forward(reads: list[torch.Tensor], states: list[torch.Tensor], mask: Optional[torch.Tensor],
                T: int, B: int, save: bool, autocast: Optional[torch.dtype]) -> list[torch.Tensor]:
        from .compiled import _loop
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
        return [ref.new_empty(s) for s in _shapes(plan, T, B, save)]

    @torch.library.custom_op(f"seqgraph::{name}_backward", mutates_args=())
    def backward_op(reads: list[torch.Tensor], saved: list[torch.Tensor], seqs: list[torch.Tensor],
                    mask: Optional[torch.Tensor], grad_outs: list[torch.Tensor], grad_finals: list[torch.Tensor],
                    T: int, autocast: Optional[torch.dtype]) -> list[torch.Tensor]:
        from .compiled import _loop
        fn_name = "backward_masked" if mask is not None else "backward_plain"
        device = (seqs or grad_outs)[0].device
        with _under(device, autocast):  # the forward's
            dreads, dstates = _loop(program, fn_name, device)(T, mask, list(reads), list(saved), list(seqs),
                                                               [g.contiguous() for g in grad_outs],
                                                               [g.contiguous() for g in grad_finals])
        kept = [g.contiguous() for g, keep in zip(dreads, has_grad[mask is not None]) if keep]
        # a state the step never reads gets None from the loop: zeros of its shape here, since a
        # custom op returns tensors only
        return kept + [g.clone() if g is not None else torch.zeros_like(gf) for g, gf in zip(dstates, grad_finals)]

    @backward_op.register_fake
    def _(reads, saved, seqs, mask, grad_outs, grad_finals, T, autocast):
        kept = [r.new_empty(r.shape) for r, keep in zip(reads, has_grad[mask is not None]) if keep]
        return kept + [g.new_empty(g.shape) for g in grad_finals]

    def setup_context(ctx, inputs, output):
        reads, states, mask, T, B, save, autocast = inputs
        if not save:
            raise RuntimeError("seqgraph: a loop run without saving cannot be differentiated")
        saved = output[n_out + n_state:n_out + n_state + n_saved]
        seqs = output[n_out + n_state + n_saved:]
        ctx.counts = (len(reads), len(saved))
        ctx.T, ctx.has_mask, ctx.autocast = T, mask is not None, autocast
        # as the eager autograd Function does: a read the backward never looks at is kept as a
        # one-element stand-in of its shape, so the forward's copy of it can be freed
        used = _reads_used(plan, mask is not None)
        kept = [r if used is None or n.id in used else _stand_in(r) for n, r in zip(plan.reads, reads)]
        ctx.save_for_backward(*kept, *saved, *seqs, *([mask] if mask is not None else []))
        ctx.like = [o for o in output[:n_out + n_state]]
        constant = _without_gradient(program, reads, states)  # as the eager autograd Function marks them
        if constant:
            ctx.mark_non_differentiable(*[output[k] for k in constant])

    def backward(ctx, grads):
        tensors = list(ctx.saved_tensors)
        nr, ns = ctx.counts
        reads, saved = tensors[:nr], tensors[nr:nr + ns]
        seqs = tensors[nr + ns:nr + ns + n_state]
        mask = tensors[-1] if ctx.has_mask else None
        firsts = [g if g is not None else torch.zeros_like(like) for g, like in zip(grads[:n_out + n_state], ctx.like)]
        res = backward_op(reads, saved, seqs, mask, firsts[:n_out], firsts[n_out:], ctx.T, ctx.autocast)
        keeps = has_grad[mask is not None]
        it = iter(res[:sum(keeps)])
        dreads = [next(it) if keep else None for keep in keeps]
        return dreads, list(res[sum(keeps):]), None, None, None, None, None

    forward.register_autograd(backward, setup_context=setup_context)
    _REGISTERED[name] = (program, forward)
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
