"""Reading a plan: the text of `model.plan()` (with FLOPs, bytes and a memory estimate) and its
pictures, forward and backward.

Must not change the plan; it only counts and prints.
"""
from __future__ import annotations

from .codegen_torch import REAL_ROWS_BELOW
from .ir import Node
from .ops import REGISTRY


def _shape(n: Node) -> str:
    b = "B," if n.batched else ""
    return f"({b}{','.join(map(str, n.shape))})"


def _label(n: Node) -> str:
    return f"%{n.id} {n.op}" + (f" '{n.name}'" if n.name else "") + _shape(n)


def gemm_flops(n: Node, rows: int) -> int:
    """Multiply-adds x2 of one matrix node over `rows` batch rows."""
    if n.op == "linear":
        x, w = n.inputs
        lead = 1
        for s in x.shape[:-1]:
            lead *= s
        return 2 * rows * lead * w.shape[0] * w.shape[1]
    if n.op == "linear_wgrad":
        g, x = n.inputs
        return 2 * rows * (g.elements // g.shape[-1]) * g.shape[-1] * x.shape[-1]
    if n.op == "matmul":
        a, b = n.inputs
        return 2 * rows * (n.elements // n.shape[-1]) * a.shape[-1] * n.shape[-1]
    return 0


def _bytes(nodes: list[Node], B: int, itemsize: int) -> int:
    return sum(n.elements * (B if n.batched else 1) * itemsize for n in nodes)


def _amount(value: float, units: tuple[tuple[float, str], ...], base: str) -> str:
    """`value` in the largest unit it reaches, three significant digits (all of them from 1000
    of the largest unit up: 34400 GFLOP, never 3.44e+04)."""
    for scale, unit in units:
        if value >= scale or f"{value / scale:.3g}" == "1":  # 999.7 MFLOP reads 1 GFLOP
            text = f"{value / scale:.3g}"
            return f"{value / scale:.0f} {unit}" if "e" in text else f"{text} {unit}"
    return f"{value:.0f} {base}"


def _flops_text(flops: float) -> str:
    """FLOPs in the unit that shows them: 671 MFLOP, 2.1 kFLOP, 384 FLOP."""
    return _amount(flops, ((1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")), "FLOP")


def _bytes_text(n: float) -> str:
    """Bytes in the binary unit that shows them: 5.86 MiB, 1.3 KiB, 96 B."""
    return _amount(n, ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")), "B")


def _gemm_text(n: Node) -> str:
    """A product with its operands: `%25 linear 'ih'(B,32) = (B,4) @ (32,4)^T`."""
    a, b = n.inputs[:2]
    return f"{_label(n)} = {_shape(a)} @ {_shape(b)}" + ("^T" if n.op == "linear" else "")


def describe_plan(plan, T: int | None, B: int | None, itemsize: int = 4) -> str:
    for name, v in (("T", T), ("B", B)):
        if v is not None and (isinstance(v, bool) or not hasattr(v, "__index__") or v < 0):
            raise ValueError(f"describe: {name} must be a number of {'steps' if name == 'T' else 'sequences'} "
                             f"(an int >= 0), got {v!r}")
    Bv = B or 1
    lines = [f"seqgraph plan (unroll={plan.unroll})" + (f" for T={T}, B={B}" if T and B else "")]
    lines.append("passes:")
    lines += [f"  - {note}" for note in plan.step.notes]
    lines.append(f"before the loop: {len(plan.invariant)} invariant node(s) once per call, "
                 f"{len(plan.hoisted)} hoisted node(s) over all T*B rows (on the CPU, the real ones only when at "
                 f"most {REAL_ROWS_BELOW:.0%} of a padded batch's steps are real)")
    for n in plan.hoisted_gemms():
        f = f", {_flops_text(gemm_flops(n, (T or 1) * Bv))}" if T and B else ""
        lines.append(f"  hoisted GEMM {_gemm_text(n)}{f}")
    for s in plan.hoisted_regions():
        how = plan.hoisted_kernels if plan.hoisted_kernels and not s.why else \
            "torch code" + (f" ({s.why})" if s.why else "")
        lines.append(f"  hoisted elementwise region ({len(s.nodes)} ops: {how}): " + ", ".join(n.op for n in s.nodes))
    if plan.state_free_in_loop:
        lines.append(f"  computed in the loop's regions (their only readers) rather than over all rows: "
                     f"{len(plan.state_free_in_loop)} state-free op(s): "
                     + ", ".join(n.op for n in plan.state_free_in_loop))
    lines.append(f"time loops: {plan.loops}")
    lines.append(f"per step: {len(plan.stages)} stage(s)")
    for s in plan.stages:
        lines.append(_stage_line(s, Bv, itemsize, bool(B)))
    for k, bwd in sorted(plan.backward.items()):
        lines.append(f"backward ({'masked' if k else 'unmasked'}): {len(bwd.pre)} node(s) before the loop, "
                     f"{len(bwd.stages)} stage(s) per step, {len(bwd.post)} node(s) after the loop")
        lines.append("  saves per step: " + (", ".join(_label(n) for n in bwd.saved) or "nothing"))
        if bwd.recomputed:
            lines.append("  recomputes per step from those, instead of saving: "
                         + ", ".join(_label(n) for n in bwd.recomputed))
        for s in bwd.stages:
            lines.append("  " + _stage_line(s, Bv, itemsize, bool(B)))
        wg = [n for n in bwd.post if n.op in ("linear_wgrad", "embedding_wgrad", "sum_to")]
        rows = "all T*B rows (or the real ones, as above)" if k else "all T*B rows"
        lines.append(f"  after the loop: {len(wg)} weight/bias gradient reduction(s), each one large "
                     f"GEMM or sum over {rows}: " + ", ".join(f"{n.op}{_shape(n)}" for n in wg))
        if T and B:
            saved = _bytes(bwd.saved, B, itemsize) * T
            stash = _stash_bytes(plan, bwd, T, B, itemsize)
            states = sum(p.elements for p, _ in plan.step.states) * B * itemsize * (T + 1)
            lines.append(f"  memory for backward at T={T}, B={B}: saved {_bytes_text(saved)} + state "
                         f"sequence {_bytes_text(states)} + gradient stash {_bytes_text(stash)}")
    if T and B:
        # a value hoisted over all steps is T of them; an invariant (a weight) is one
        hoist = sum(_bytes([r], B, itemsize) * (T if plan.cls[r.id] == "hoisted" else 1) for r in plan.reads)
        lines.append(f"memory: values read by the loop {_bytes_text(hoist)}; outputs "
                     f"{_bytes_text(_bytes(plan.step.outputs, B, itemsize) * T)}")
    return "\n".join(lines)


def _stash_bytes(plan, bwd, T: int, B: int, itemsize: int) -> int:
    """The buffers the backward allocates only for its reductions after the loop: not the
    stashed values it reads where they already are (the state sequence, a read's gradient),
    and (B, w) for those the C loops sum over the steps as they go."""
    from .codegen_torch_backward import backward_layout, summed_stash
    lay = backward_layout(plan, bwd)
    summed = summed_stash(bwd, lay) if plan.loops.startswith("C,") else set()
    return sum(_bytes([n], B, itemsize) * (1 if n.id in summed else T) for n in lay.new_stash)


def _stage_line(s, B: int, itemsize: int, sized: bool) -> str:
    ops = ", ".join(n.op + (f"'{n.name}'" if n.name and n.op in ("linear", "matmul") else "") for n in s.nodes)
    if s.kind == "gemm":
        f = sum(gemm_flops(n, B) for n in s.nodes)
        extra = f", {_flops_text(f)}/step" if sized else ""
        return f"  GEMM: {'; '.join(_gemm_text(n) for n in s.nodes)}{extra}"
    if s.kind == "fused":
        io = _bytes(s.inputs, B, itemsize) + _bytes(s.outputs, B, itemsize)
        extra = f", {_bytes_text(io)} moved/step" if sized else ""
        return f"  fused region ({len(s.nodes)} ops, {len(s.inputs)} in, {len(s.outputs)} out{extra}): {ops}"
    return f"  torch fallback ({s.why}): {ops}"


def plan_dot(plan, backward: bool = False):
    """The compiled plan as a picture: hoisted part, per-step part with each fused region a
    coloured cluster, GEMMs marked, saved values marked. backward=True draws the backward of
    an unpadded call instead: what runs once before its loop, each step's stages (its fused
    kernels recompute what `recomputed` names), and the weight-gradient reductions after it."""
    import graphviz

    dot = graphviz.Digraph("plan_backward" if backward else "plan",
                           graph_attr={"rankdir": "TB", "fontname": "Helvetica", "compound": "true"},
                           node_attr={"fontname": "Helvetica", "fontsize": "10", "shape": "box", "style": "rounded"},
                           edge_attr={"fontname": "Helvetica", "fontsize": "9"})
    saved, read_only = set(), set()  # read_only: values the backward reads and does not compute
    if backward:
        bwd = plan.backward_plan(False)
        saved = {n.id for n in bwd.saved}
        read_only = saved - {n.id for n in bwd.pre + bwd.loop + bwd.post}
    else:
        for b in plan.backward.values():
            saved |= {n.id for n in b.saved}
    drawn: set[int] = set()

    from ..viz import add_node  # the same look as the cell pictures
    keys = {n.id: k for k, n in plan.step.params.items()}

    def node(g, n: Node, **extra):
        if n.id in drawn:
            return
        drawn.add(n.id)
        attrs = {}
        if (REGISTRY[n.op].kind == "matmul" or n.op == "linear_wgrad") and n.id not in read_only:
            attrs.update(shape="box3d", style="filled", fillcolor="#ffd966",
                         label=f"GEMM {n.op}{' ' + repr(n.name) if n.name else ''}\\n{_shape(n)}")
        if n.id in saved:
            attrs.update(penwidth="2.5", color="#c00000", xlabel="saved")
        attrs.update(extra)
        add_node(g, n, key=keys.get(n.id), **attrs)

    if backward:
        _draw_backward(dot, bwd, node)
        return dot
    with dot.subgraph(name="cluster_before") as c:
        c.attr(label="before the loop (once per call, all T steps)", style="dashed")
        kernels = [s for s in plan.hoisted_regions() if not s.why] if plan.hoisted_kernels else []
        for k, s in enumerate(kernels):
            with c.subgraph(name=f"cluster_hoisted_{k}") as f:
                f.attr(label=f"kernel over all rows {k + 1} of {len(kernels)}", style="filled",
                       fillcolor=_CLUSTER_COLOURS[k % len(_CLUSTER_COLOURS)])
                for n in s.nodes:
                    node(f, n)
        for n in plan.invariant + plan.hoisted:
            node(c, n)
    with dot.subgraph(name="cluster_step") as c:
        c.attr(label="per step", style="solid")
        _draw_stages(c, plan.stages, node)
    for n in plan.step.order():
        if n.id not in drawn:
            node(dot, n)
    for n in plan.step.order():
        for i in n.inputs:
            dot.edge(f"n{i.id}", f"n{n.id}")
    for p, q in plan.step.states:
        dot.edge(f"n{q.id}", f"n{p.id}", style="dashed", color="#1f77b4", constraint="false", label=f"next {p.name}")
    return dot


# fused clusters: pale, none of them the torch fallbacks' pink nor the GEMMs' yellow
_CLUSTER_COLOURS = ["#fde2c4", "#d5e8d4", "#dae8fc", "#e1d5e7", "#d0f0f0", "#e6e6e6"]


def _draw_stages(c, stages, node, extra=lambda n: {}) -> None:
    """Each fused stage a coloured cluster "fused kernel k of n"; GEMMs and torch fallbacks plain."""
    fused = [s for s in stages if s.kind == "fused"]
    for k, s in enumerate(stages):
        if s.kind == "fused":
            number = next(j for j, t in enumerate(fused) if t is s) + 1
            with c.subgraph(name=f"cluster_fused_{k}") as f:
                f.attr(label=f"fused kernel {number} of {len(fused)}", style="filled",
                       fillcolor=_CLUSTER_COLOURS[k % len(_CLUSTER_COLOURS)])
                for n in s.nodes:
                    node(f, n, **extra(n))
        else:
            for n in s.nodes:
                node(c, n, **extra(n), **({"fillcolor": "#f4cccc", "style": "rounded,filled"} if s.kind == "torch" else {}))


def _draw_backward(dot, bwd, node) -> None:
    """The backward's three parts as clusters; the values it reads (saved forward values, the
    gradients arriving at each step, parameters) drawn outside them; each state's gradient
    passed back to the step before as a dashed edge."""
    recomputed = {n.id for n in bwd.recomputed}
    mark = lambda n: {"xlabel": "recomputed", "fontcolor": "#7f6000"} if n.id in recomputed else {}  # noqa: E731
    with dot.subgraph(name="cluster_before") as c:
        c.attr(label="before the backward loop (once per call)", style="dashed")
        for n in bwd.pre:
            node(c, n)
    with dot.subgraph(name="cluster_step") as c:
        c.attr(label="per step, from the last to the first", style="solid")
        _draw_stages(c, bwd.stages, node, mark)
        for n in bwd.loop:
            node(c, n, **mark(n))
    with dot.subgraph(name="cluster_after") as c:
        c.attr(label="after the loop (all T steps at once)", style="dashed")
        for n in bwd.post:
            node(c, n)
    computed = bwd.pre + bwd.loop + bwd.post
    for n in computed:
        for i in n.inputs:
            node(dot, i)
            dot.edge(f"n{i.id}", f"n{n.id}")
    deriv = bwd.deriv
    for leaf, g in zip(deriv.grad_next, deriv.grad_prev):
        if g is not None:
            node(dot, leaf)
            dot.edge(f"n{g.id}", f"n{leaf.id}", style="dashed", color="#1f77b4", constraint="false",
                     label="to the step before")
