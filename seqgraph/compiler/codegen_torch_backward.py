"""Code generation for the `torch` backend, the backward half: the reverse loop of a plan.

`emit_backward` writes `backward_plain` / `backward_masked`: the reverse time loop over the
symbolic derivative's stages (reading what the forward saved, recomputing what the plan says),
then the weight-gradient reductions once over all T*B rows. `emit_backward_head` and
`emit_backward_tail` are shared with the C loops (kernels/c_loops.py), which replace only the
loop in between. Built on the forward half's emitters (codegen_torch.py); must not make
planning decisions.
"""
from __future__ import annotations

from dataclasses import dataclass

from .codegen_torch import (Source, Store, _bind_reads, _unbind_steps, _v, all_saved, emit_nodes,
                            emit_stages, emit_time_loop, emit_weight_packing, shape_tuple)
from .ir import Node
from .plan import BackwardPlan, Plan


@dataclass
class BackwardLayout:
    """Where the backward loop keeps what it reads and writes (shared by every backend's loop)."""
    saved_all: list  # forward values saved by either backward variant, as sv<k>
    saved_index: dict  # node id -> k of sv<k>
    prev_index: dict  # previous-state node id -> j of ss<j>
    read_index: dict  # read node id -> k of r<k>
    hoisted_grads: list  # (k, gradient node) stored per step into dr<k>
    accum: list  # (k, gradient node) summed over steps into dr<k>
    stash_expr: dict  # node id -> the (T, B, ...) tensor the post-loop reductions read it from
    new_stash: list  # nodes kept per step only for those reductions, as st<k>


def backward_layout(plan: Plan, bwd: BackwardPlan) -> BackwardLayout:
    step, d = plan.step, bwd.deriv
    saved_all = all_saved(plan)
    saved_index = {n.id: k for k, n in enumerate(saved_all)}
    prev_index = {p.id: j for j, (p, _) in enumerate(step.states)}
    read_index = {r.id: k for k, r in enumerate(plan.reads)}
    hoisted_grads = [(read_index[r_id], g) for r_id, g in d.grad_of.items()
                     if plan.cls[r_id] == "hoisted" and g.batched]
    accum = [(read_index[r.id], d.grad_of[r.id]) for r in bwd.accumulate]
    stash_expr: dict[int, str] = {}
    new_stash = []
    hoisted_grad_var = {g.id: f"dr{k}" for k, g in hoisted_grads}
    for n in bwd.stash:
        if n.id in hoisted_grad_var:
            stash_expr[n.id] = hoisted_grad_var[n.id]
        elif n.id in saved_index:
            stash_expr[n.id] = f"sv{saved_index[n.id]}"
        elif n.id in prev_index:
            stash_expr[n.id] = f"ss{prev_index[n.id]}[:T]"
        elif n.id in read_index and plan.cls[n.id] == "hoisted":
            stash_expr[n.id] = f"r{read_index[n.id]}"
        else:
            stash_expr[n.id] = f"st{len(new_stash)}"
            new_stash.append(n)
    return BackwardLayout(saved_all, saved_index, prev_index, read_index, hoisted_grads, accum, stash_expr,
                          new_stash)


def emit_backward_head(src: Source, plan: Plan, bwd: BackwardPlan, masked: bool, suffix: str = "",
                       summed: set[int] = frozenset()) -> BackwardLayout:
    """`def backward_<variant><suffix>(...)`: unpack the arguments, run the derivative's
    invariant part, allocate the per-step gradient and stash buffers (a (B, ...) sum for the
    stashed nodes in `summed`, which a C loop adds up over the steps: see summed_stash)."""
    step = plan.step
    nr, ns, no = len(plan.reads), len(step.states), len(step.outputs)
    lay = backward_layout(plan, bwd)
    src.emit(f"def backward_{'masked' if masked else 'plain'}{suffix}(T, mask, reads, saved, seqs, grad_outs, grad_finals, "
             f"need=None):")
    src.indent += 1
    src.emit('"""The reverse loop over the symbolic derivative; weight gradients reduced once after it.')
    src.emit('need[k]: whether reads[k] needs its gradient (None: every one does)."""')
    if nr:
        src.emit(f"{', '.join(f'r{k}' for k in range(nr))}, = reads")
    if lay.saved_all:
        src.emit(f"{', '.join(f'sv{k}' for k in range(len(lay.saved_all)))}, = saved")
    if ns:
        src.emit(f"{', '.join(f'ss{j}' for j in range(ns))}, = seqs")
        src.emit(f"{', '.join(f'gn{j}' for j in range(ns))}, = grad_finals")
    if no:
        src.emit(f"{', '.join(f'go{k}' for k in range(no))}, = grad_outs")
    ref = "ss0" if ns else "go0"
    src.emit(f"B = {ref}.shape[1]")
    src.emit(f"rows = {'_step_rows(mask)' if masked else 'None'}  # the rows the reductions after the loop sum")
    _bind_reads(src, plan, None)
    emit_nodes(src, bwd.pre, {}, {i.id for n in bwd.loop + bwd.post for i in n.inputs})
    for k, _ in lay.hoisted_grads:
        src.emit(f"dr{k} = _empty(r{k}, r{k}.shape)")
    for k, _ in lay.accum:
        src.emit(f"dr{k} = _zeros(r{k}, r{k}.shape)")
    for k, n in enumerate(lay.new_stash):  # values the post-loop reductions read, kept per step
        if n.id in summed:
            src.emit(f"st{k} = {ref}.new_zeros({shape_tuple(n, 'B')})  # summed over the steps", n)
        else:
            src.emit(f"st{k} = _empty({ref}, {shape_tuple(n, 'T, B')})", n)
    return lay


def summed_stash(bwd: BackwardPlan, lay: BackwardLayout) -> set[int]:
    """Stashed vectors whose only readers after the loop sum them over every row (the gradient
    of a peephole or layer-norm weight, say): a C loop adds each step's real rows into a (B, w)
    sum instead of storing (T, B, w) for the sum after the loop (measured: 5-8% off a layer-norm
    LSTM's fwd+bwd at T=50 B=16 H=128)."""
    out = set()
    for n in lay.new_stash:
        users = [p for p in bwd.post if any(i.id == n.id for i in p.inputs)]
        if n.batched and len(n.shape) == 1 and users and all(
                u.op == "sum_to" and not u.attrs["batched"] and tuple(u.shape) == tuple(n.shape) for u in users):
            out.add(n.id)
    return out


def emit_backward_tail(src: Source, plan: Plan, bwd: BackwardPlan, lay: BackwardLayout,
                       summed: set[int] = frozenset()) -> None:
    """After the loop: reductions over all T*B rows at once, or over the real ones of a padded
    batch, whose padding adds zero (weight gradients as one GEMM each), then the gradients of
    the reads and of the initial states."""
    d = bwd.deriv
    env = {}
    for n in bwd.stash:
        env[n.id] = f"{_v(n)}_all"
        if n.id in summed:  # already summed over the steps (real rows only) by the C loop: (B, w)
            src.emit(f"{_v(n)}_all = {lay.stash_expr[n.id]}", n)
            continue
        # a padded row's value may be infinite where the reference never computes it (1 / s of a
        # state that is 0): summed against that row's zero gradient it would give 0 * inf = nan
        if d.mask is None or _zero_on_padding(n, d.mask):
            mask = ""
        elif n.id in lay.prev_index:  # a padded row carries a state a real step made or reads
            mask = f", _unless_finite(mask, ss{lay.prev_index[n.id]}[T])"
        else:
            mask = ", mask"
        src.emit(f"{_v(n)}_all = _real_rows({lay.stash_expr[n.id]}.reshape({shape_tuple(n, 'T * B')}), rows{mask})",
                 n)
    # a reduction after the loop whose every result is a read's gradient no one asks for (the
    # weight gradient of a frozen weight: one large GEMM) is skipped, and that gradient is None
    in_loop = [plan.cls[r.id] == "hoisted" or (r.batched and plan.cls[r.id] == "invariant") for r in plan.reads]
    after = {}
    for k, r in enumerate(plan.reads):
        g = d.grad_of.get(r.id)
        if g is not None and not in_loop[k]:
            after.setdefault(g.id, set()).add(k)
    src.guards = _guards(_only_for(bwd.post, after, set()))
    emit_nodes(src, bwd.post, env, set())
    skipped, src.guards = src.guards, {}
    grads = []
    for k, r in enumerate(plan.reads):
        g = d.grad_of.get(r.id)
        if g is None:
            grads.append("None")
        elif in_loop[k]:  # (summed into dr<k> by the loop)
            grads.append(f"dr{k}")
        elif g.id in skipped:
            grads.append(f"({env.get(g.id, _v(g))} if {skipped[g.id]} else None)")
        else:
            grads.append(env.get(g.id, _v(g)))
    # a state the step never reads gets no gradient (None, as autograd gives) once a step has run
    finals = [f"gn{j}" if d.grad_prev[j] is not None else f"(gn{j} if T == 0 else None)"
              for j in range(len(plan.step.states))]
    src.emit(f"return [{', '.join(grads)}], [{', '.join(finals)}]")
    src.indent -= 1


def _zero_on_padding(n: Node, mask: Node) -> bool:
    """Whether n is exactly 0 on padded rows: a gradient the derivative selects there, or a
    concat or sum of such."""
    if n.op in ("concat", "add"):
        return all(_zero_on_padding(i, mask) for i in n.inputs)
    if n.op != "select" or n.inputs[2].op != "const" or n.inputs[2].attrs["value"] != 0.0:
        return False
    m = n.inputs[0]
    return m is mask or (m.op == "reshape" and m.inputs[0] is mask)


def only_for_read_gradients(bwd: BackwardPlan, lay: BackwardLayout, fused_apart: bool) -> dict[int, set[int]]:
    """The nodes of the backward loop computed only for gradients the loop adds up over the steps
    for reads (an attention decoder's memory, a context vector), each with those reads: a call
    where none of them needs its gradient skips the node. A node of a fused stage (its own
    line only where `fused_apart` is False: the torch backend) counts as always computed."""
    accum_of: dict[int, set[int]] = {}
    for k, g in lay.accum:
        accum_of.setdefault(g.id, set()).add(k)
    d = bwd.deriv
    needed = {n.id for n in lay.new_stash} | {g.id for g in d.grad_prev if g is not None} \
        | {g.id for _, g in lay.hoisted_grads} | {i.id for n in bwd.post for i in n.inputs}
    if fused_apart:
        needed |= {n.id for s in bwd.stages if s.kind == "fused" for n in s.nodes}
    return _only_for(bwd.loop, accum_of, needed)


def _only_for(nodes: list[Node], results: dict[int, set[int]], needed: set[int]) -> dict[int, set[int]]:
    """Of `nodes` (in order), those whose every use leads only to `results` (node id -> the reads
    whose gradient it is), each with the reads it serves; never a node in `needed`."""
    users: dict[int, list[int]] = {}
    for n in nodes:
        for i in n.inputs:
            users.setdefault(i.id, []).append(n.id)
    only: dict[int, set[int] | None] = {}
    for n in reversed(nodes):
        reads = set(results.get(n.id, ()))
        for u in users.get(n.id, ()):
            if only.get(u) is None:
                reads = None
                break
            reads |= only[u]
        only[n.id] = reads if reads and n.id not in needed else None
    return {i: ks for i, ks in only.items() if ks is not None}


def _guards(only: dict[int, set[int]]) -> dict[int, str]:
    """The condition each node of `only` runs under: one of its reads needs its gradient."""
    return {i: "need is None or " + " or ".join(f"need[{k}]" for k in sorted(ks)) for i, ks in only.items()}


def emit_backward(src: Source, plan: Plan, bwd: BackwardPlan, masked: bool, region_call, pack: bool) -> None:
    step = plan.step
    d = bwd.deriv
    ns, no = len(step.states), len(step.outputs)
    lay = emit_backward_head(src, plan, bwd, masked)
    ref = "ss0" if ns else "go0"
    _unbind_steps(src, plan)
    for k in range(len(lay.saved_all)):
        src.emit(f"sv{k}_ = sv{k}.unbind(0)")
    for j in range(ns):
        src.emit(f"ss{j}_ = ss{j}.unbind(0)")
    for k in range(no):
        src.emit(f"go{k}_ = go{k}.unbind(0)")
    for k, _ in lay.hoisted_grads:
        src.emit(f"dr{k}_ = dr{k}.unbind(0)")
    for k in range(len(lay.new_stash)):
        src.emit(f"st{k}_ = st{k}.unbind(0)")
    packed = emit_weight_packing(src, bwd.stages) if pack else {}
    saved_all, saved_index = lay.saved_all, lay.saved_index
    hoisted_grads, accum, new_stash = lay.hoisted_grads, lay.accum, lay.new_stash
    guards = _guards(only_for_read_gradients(bwd, lay, region_call is not None))

    def body():
        if masked:
            src.emit("m = mask_[t].unsqueeze(1)")
            src.emit(f"{_v(d.mask)} = m.to({ref}.dtype)", d.mask)
        _bind_reads(src, plan, "t")
        used = {i.id for n in bwd.loop for i in n.inputs} | {n.id for n in new_stash}
        used |= {g.id for g in d.grad_prev if g is not None} | {g.id for g in d.grad_of.values()}
        for n in saved_all:
            if n.id in used:
                src.emit(f"{_v(n)} = sv{saved_index[n.id]}_[t]", n)
        for j, (p, _) in enumerate(step.states):
            if p.id in used:
                src.emit(f"{_v(p)} = ss{j}_[t]", p)
            src.emit(f"{_v(d.grad_next[j])} = gn{j}")
        for k in range(no):
            src.emit(f"{_v(d.grad_out[k])} = go{k}_[t]")
        # needed after this step's code: what is stashed, the gradients it hands on, what the
        # reductions after the loop read (in-step uses are counted by emit_nodes itself)
        live = {n.id for n in new_stash} | {g.id for g in d.grad_prev if g is not None} \
            | {g.id for g in d.grad_of.values()} | {i.id for n in bwd.post for i in n.inputs}
        stores = [Store(g, f"dr{k}_[t]") for k, g in hoisted_grads]
        stores += [Store(n, f"st{k}_[t]") for k, n in enumerate(new_stash)]
        src.guards = guards
        emit_stages(src, bwd.stages, {}, live, "m" if masked else None, region_call, stores, packed)
        src.guards = {}
        for k, g in accum:
            src.emit(f"if need is None or need[{k}]: dr{k} += {_v(g)}")
        for j, g in enumerate(d.grad_prev):
            src.emit(f"gn{j} = {_v(g) if g is not None else f'torch.zeros_like(gn{j})'}")
    emit_time_loop(src, plan.unroll, body, reverse=True)
    emit_backward_tail(src, plan, bwd, lay)
