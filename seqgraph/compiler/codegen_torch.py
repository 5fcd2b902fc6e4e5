"""Code generation for the `torch` backend: the plan as straight-line Python over torch ops.

It writes one Python module per plan with these functions: `prologue` (invariants once,
hoisted nodes over all T*B rows, or over the real steps of a padded batch only; runs under
ordinary autograd), `forward` (the time loop; fills the outputs, the final states, and what the
plan says to save) and `backward_plain` / `backward_masked` (the reverse loop over the symbolic
derivative, then the weight-gradient reductions as single large GEMMs over all steps;
codegen_torch_backward.py writes them with the emitters here). The cpu backend adds `*_c`
wrappers that run whole loops in C (kernels/c_loops.py). Every value is a local `v<id>`;
every line ends with a comment naming the node it came from and the user's file:line. Hot ops get a direct torch
expression; any other op calls its registry torch rule, so the generated code can never
disagree with the interpreter. A fused region can be emitted by another backend
(`region_call`), which is how the Triton backend reuses this generator. Must not make
planning decisions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import buffers
from ..kernels.cpu_gemm import add_product_into
from .ir import Node
from .ops import REGISTRY, py_literal
from .plan import Plan

_ARITH = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_UNARY = {"sigmoid": "torch.sigmoid", "tanh": "torch.tanh", "relu": "torch.relu", "exp": "torch.exp",
          "log": "torch.log", "abs": "torch.abs", "sqrt": "torch.sqrt", "sign": "torch.sign"}


class Source:
    """Lines of generated code plus the objects they refer to (registry rules, kernels)."""

    def __init__(self):
        self.lines: list[str] = []
        self.globals: dict[str, object] = {}
        self.indent = 0
        # the hoisted products: torch's GEMM, or for the cpu backend (cpu_gemm) `_gemm`
        # (kernels/cpu_gemm.py), which picks seqgraph's own GEMM or torch's per call
        self.cpu_gemm = False
        self.outside_loops = False  # set while the prologue is emitted
        self.guards: dict[int, str] = {}  # node id -> the condition its line runs under (see emit)
        self.hoisted_call: HoistedCall | None = None  # see generate

    def gemm_call(self) -> bool:
        return self.cpu_gemm and self.outside_loops

    def emit(self, line: str, node: Node | None = None) -> None:
        """One line, tagged with the node it computes; a node in `guards` assigned by the line
        computes only under its condition (`if need is None or need[2]: v7 = ...`)."""
        tag = f"  # %{node.id} {node.op}" + (f" '{node.name}'" if node.name else "") + f" @ {node.site}" if node is not None else ""
        if node is not None and node.id in self.guards and line.startswith(f"v{node.id} = "):
            line = f"if {self.guards[node.id]}: {line}"
        self.lines.append("    " * self.indent + line + tag)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _v(n: Node) -> str:
    return f"v{n.id}"


def _arg(n: Node, env: dict[int, str]) -> str:
    if n.op == "const":
        return py_literal(n.attrs["value"])
    return env.get(n.id, _v(n))


_ARITH_FN = {"add": "torch.add", "sub": "torch.sub", "mul": "torch.mul", "div": "torch.div"}


def torch_expr(n: Node, env: dict[int, str], src: Source, mask_var: str | None = None,
               out: str | None = None) -> tuple[str, bool]:
    """A torch expression computing node `n` from its inputs' variables, and whether it writes
    into `out` (a buffer slice) itself; hot ops take `out=` so no copy follows them."""
    ins = n.inputs
    a = [_arg(i, env) for i in ins]
    o = f", out={out}" if out else ""
    plain = all(not i.batched or len(i.shape) == len(n.shape) for i in ins)
    if n.op in _ARITH and plain:
        if out and ins[0].op != "const":
            return f"{_ARITH_FN[n.op]}({a[0]}, {a[1]}{o})", True
        return f"({a[0]} {_ARITH[n.op]} {a[1]})", False
    if n.op == "neg":
        return f"torch.neg({a[0]}{o})", bool(out)
    if n.op in ("sigmoid_grad", "tanh_grad") and plain and ins[0].shape == ins[1].shape \
            and ins[0].batched == ins[1].batched:
        return f"torch.ops.aten.{n.op[:-5]}_backward({a[0]}, {a[1]})", False
    if n.op == "relu" and out:  # torch.relu takes no out=
        return f"torch.clamp_min({a[0]}, 0.0{o})", True
    if n.op in _UNARY:
        return f"{_UNARY[n.op]}({a[0]}{o})", bool(out)
    if n.op == "select" and mask_var is not None and ins[0].name == "mask" and ins[0].op == "input" and plain:
        if out and ins[1].op != "const" and ins[2].op != "const":
            return f"torch.where({mask_var}, {a[1]}, {a[2]}{o})", True
        return f"torch.where({mask_var}, {a[1]}, {a[2]})", False
    if n.op == "concat":
        d = n.attrs["dim"] + (1 if n.batched else 0)
        return f"torch.cat(({', '.join(a)},), {d}{o})", bool(out)
    if n.op == "linear" and out and len(ins[0].shape) == 1 and ins[0].batched:
        return f"torch.mm({a[0]}, {a[1]}.t(){o})", True
    return _torch_expr(n, ins, a, env, src), False


def _torch_expr(n, ins, a, env, src) -> str:
    if n.op == "slice":
        d = n.attrs["dim"] + (1 if n.batched else 0)
        return f"{a[0]}.narrow({d}, {n.attrs['start']}, {n.attrs['stop'] - n.attrs['start']})"
    if n.op == "linear":
        return f"{'_gemm.linear' if src.gemm_call() else 'F.linear'}({a[0]}, {a[1]})"
    if n.op == "linear_wgrad" and src.cpu_gemm:
        return f"_gemm.wgrad({a[0]}, {a[1]})"
    if n.op == "transpose" and not n.batched and len(n.shape) == 2:
        return f"{a[0]}.t()"
    if n.op == "layer_norm" and len(n.shape) == 1:
        return f"F.layer_norm({a[0]}, ({n.shape[0]},), eps={n.attrs['eps']!r})"
    if n.op == "softmax":
        return f"torch.softmax({a[0]}, {n.attrs['dim'] + (1 if n.batched else 0)})"
    # everything else: the registry's own torch rule (constants become tensors there)
    fn = f"_rule{n.id}"
    rule = REGISTRY[n.op].torch
    src.globals[fn] = (lambda r, node: (lambda *xs: r(node, *xs)))(rule, n)
    args = [env.get(i.id, _v(i)) if i.op != "const" else f"_c({py_literal(i.attrs['value'])}, {_anchor(env, ins)})"
            for i in ins]
    return f"{fn}({', '.join(args)})"


def _anchor(env, ins) -> str:
    for i in ins:
        if i.op != "const":
            return env.get(i.id, _v(i))
    return "None"


# a call packs a weight when it multiplies at least PACK_MIN_ROWS rows by it in all (steps x
# batch), over at least PACK_MIN_STEPS steps: one reorder costs one to fourteen products' saving
# (1-core Xeon: W 128x64 at B=16 14 steps, at B=256 3; W 1024x256 at B=64 1.2)
PACK_MIN_ROWS, PACK_MIN_STEPS = 128, 4


def _pack_weight(w, rows: int, steps: int = 1):
    """On the CPU, a float32 weight reordered once per call for MKL's packed GEMM (the per-step
    product then runs about 20% faster, as oneDNN's own LSTM does); None where that is unavailable,
    under autocast, which MKL's packed product does not follow, and where the call multiplies
    too few rows by it, or over too few steps, to pay for the reorder (a decoder run one step at
    a time; the C loops' SG_PACK_MIN_ROWS is the same rule for their own packing)."""
    mkl = getattr(torch.ops, "mkl", None)
    if w.device.type != "cpu" or w.dtype != torch.float32 or rows <= 0 or w.requires_grad and torch.is_grad_enabled() \
            or torch.is_autocast_enabled("cpu") or rows * steps < PACK_MIN_ROWS or steps < PACK_MIN_STEPS:
        return None
    try:
        w = w.contiguous()
        return w, mkl._mkl_reorder_linear_weight(w, rows)
    except (AttributeError, RuntimeError):
        return None


def _packed_linear(x, w, packed, addend=None, out=None):
    """x @ w.T (+ addend), through the packed weight when there is one."""
    if packed is None:
        if out is not None and torch.is_autocast_enabled(x.device.type):  # (out= is not autocast's: it would
            # meet a bfloat16 operand with the float32 weight); the product in autocast's dtype, then stored
            return out.copy_(torch.mm(x, w.t()) if addend is None else torch.addmm(addend, x, w.t()))
        if addend is None:
            return torch.mm(x, w.t(), out=out) if out is not None else torch.mm(x, w.t())
        return torch.addmm(addend, x, w.t(), out=out) if out is not None else torch.addmm(addend, x, w.t())
    y = torch.ops.mkl._mkl_linear(x, packed[1], packed[0], None, x.shape[0])
    if addend is not None:
        y.add_(addend)
    if out is not None:
        out.copy_(y)
        return out
    return y


def _const_tensor(value: float, like):
    if like is None:
        return torch.tensor(value)
    # torch.full, not torch.tensor: no host-to-device copy, so it can sit inside a CUDA graph
    return torch.full((), value, dtype=like.dtype if like.dtype.is_floating_point else torch.float32,
                      device=like.device)


def emit_nodes(src: Source, nodes: list[Node], env: dict[int, str], live: set[int],
               mask_var: str | None = None, stores: list | None = None, packed: dict | None = None) -> None:
    """Emit `nodes` in order; fold add(linear(x, W), b) into one F.linear when the product is not needed alone."""
    uses: dict[int, int] = {}
    for n in nodes:
        for i in n.inputs:
            uses[i.id] = uses.get(i.id, 0) + 1
    ids = {n.id for n in nodes}

    def lone_product(x: Node) -> bool:  # a matrix product used only by this add
        return x.op == "linear" and x.id in ids and uses.get(x.id) == 1 and x.id not in live \
            and not x.inputs[1].batched
    folded: dict[int, tuple] = {}  # add node id -> (x, W, addend) of x @ W.T + addend
    skip: set[int] = set()
    for n in nodes:
        if n.op != "add":
            continue
        a, b = n.inputs
        for prod, other in ((a, b), (b, a)):
            if not lone_product(prod) or other.op == "const" or prod.shape != n.shape:
                continue  # (a product of one column broadcast to the sum's width is no addmm)
            bias = not other.batched and other.shape == n.shape[-1:] and prod is a
            acc = other.batched and other.shape == n.shape and len(n.shape) == 1
            if bias or acc:
                folded[n.id] = (*prod.inputs, other)
                skip.add(prod.id)
                break
    # layer_norm(x) * w + b, with w and b vectors, is one F.layer_norm(x, ..., w, b)
    affine: dict[int, tuple] = {}
    for n in nodes:
        if n.op != "add" or n.id in folded or len(n.shape) != 1:
            continue
        m, b = n.inputs
        if m.op != "mul" or m.id not in ids or uses.get(m.id) != 1 or m.id in live:
            continue
        y, w = m.inputs
        if y.op == "layer_norm" and y.id in ids and uses.get(y.id) == 1 and y.id not in live and \
                y.shape == n.shape and all(not v.batched and v.shape == n.shape for v in (w, b)):
            affine[n.id] = (y.inputs[0], w, b, y.attrs["eps"])
            skip.update((m.id, y.id))
    targets = {}
    for st in stores or ():
        if st.mode == "plain" and st.target and not st.done and st.node.id not in targets:
            targets[st.node.id] = st
    for n in nodes:
        if n.id in skip:
            continue
        var = env.get(n.id, _v(n))
        st = targets.get(n.id)
        out = st.target if st is not None else None
        rows = n.op in ("add", "linear") and len(n.shape) == 1 and n.batched
        if n.id in affine:
            x, w, b, eps = affine[n.id]
            expr, wrote = (f"F.layer_norm({_arg(x, env)}, ({n.shape[0]},), {_arg(w, env)}, {_arg(b, env)}, "
                           f"eps={eps!r})"), False
        elif n.id in folded and packed and folded[n.id][1].id in packed and len(folded[n.id][0].shape) == 1 \
                and folded[n.id][0].batched:  # (rows of vectors: the weight may also multiply a matrix)
            x, w, addend = folded[n.id]
            o = f", out={out}" if out else ""
            expr, wrote = (f"_packed_linear({_arg(x, env)}, {_arg(w, env)}, {packed[w.id]}, "
                           f"{_arg(addend, env)}{o})", bool(out))
        elif n.op == "linear" and rows and packed and n.inputs[1].id in packed:
            x, w = n.inputs
            o = f", out={out}" if out else ""
            expr, wrote = f"_packed_linear({_arg(x, env)}, {_arg(w, env)}, {packed[w.id]}{o})", bool(out)
        elif n.id in folded:
            x, w, addend = folded[n.id]
            if len(x.shape) == 1 and x.batched and not out and addend.batched and addend.id in folded \
                    and uses.get(addend.id) == 1 and addend.id not in live:
                # a sum of products (W x + b + W' x', a QRNN's window): the second added into the
                # first's output, which nothing else reads, instead of into a copy of it
                call = "_gemm.addmm_" if src.gemm_call() else "_addmm_into"
                expr, wrote = f"{call}({_arg(addend, env)}, {_arg(x, env)}, {_arg(w, env)}.t())", False
            elif len(x.shape) == 1 and x.batched and src.gemm_call() and not out:
                expr, wrote = f"_gemm.addmm({_arg(addend, env)}, {_arg(x, env)}, {_arg(w, env)}.t())", False
            elif len(x.shape) == 1 and x.batched:  # rows: one addmm, written in place when stored
                o = f", out={out}" if out else ""
                expr, wrote = f"torch.addmm({_arg(addend, env)}, {_arg(x, env)}, {_arg(w, env)}.t(){o})", bool(out)
            else:
                expr, wrote = f"F.linear({_arg(x, env)}, {_arg(w, env)}, {_arg(addend, env)})", False
        else:
            expr, wrote = torch_expr(n, env, src, mask_var, out)
        src.emit(f"{var} = {expr}", n)
        if wrote:
            st.done = True
            if st.result is not None:
                src.emit(f"{st.result} = {var}")


HoistedCall = Callable[[Source, "object"], "str | None"]
RegionCall = Callable[[Source, object, dict, "str | None", set, list], bool]


@dataclass
class Store:
    """A value of the step written into a buffer: `target` (an expression such as `sv0[t]`, or
    None for a fresh tensor), plain, zero on padded rows ("zero"), or keeping `prev`'s value on
    padded rows ("carry"). `result` names a variable that must hold the written tensor. A fused
    kernel writes stores of its own nodes directly; the rest become torch lines."""
    node: Node
    target: str | None
    mode: str = "plain"  # plain | zero | carry
    prev: Node | None = None
    result: str | None = None
    done: bool = False


def emit_stages(src: Source, stages, env, live, mask_var, region_call: RegionCall | None,
                stores: list[Store] = (), packed: dict | None = None) -> None:
    if region_call is None:  # one straight line: products may fold into the adds of later stages
        emit_nodes(src, [n for s in stages for n in s.nodes], env, live, mask_var, stores, packed)
    else:
        for s in stages:
            if s.kind == "fused" and region_call(src, s, env, mask_var, live, stores):
                continue
            emit_nodes(src, s.nodes, env, live | {o.id for o in s.outputs}, mask_var, stores, packed)
    for st in stores:
        if not st.done:
            emit_store(src, st, env)


def emit_store(src: Source, st: Store, env) -> None:
    v = env.get(st.node.id, _v(st.node))
    m = _mask_for(st.node)
    if st.mode == "plain":
        src.emit(f"{st.target}.copy_({v})")
    elif st.mode == "zero":
        src.emit(f"{st.target}.copy_(torch.where({m}, {v}, 0.0))")
    else:
        prev = env.get(st.prev.id, _v(st.prev))
        if st.target is None:
            src.emit(f"{st.result} = torch.where({m}, {v}, {prev})")
            return
        src.emit(f"torch.where({m}, {v}, {prev}, out={st.target})")
    if st.result is not None:
        src.emit(f"{st.result} = {st.target}")


def emit_weight_packing(src: Source, stages) -> dict[int, str]:
    """Before a loop: pack each per-step GEMM's weight once (see _pack_weight)."""
    packed: dict[int, str] = {}
    for s in stages:
        for n in s.nodes:
            if s.kind == "gemm" and n.op == "linear" and n.batched and len(n.inputs[0].shape) == 1 \
                    and n.inputs[1].id not in packed:
                w = n.inputs[1]
                packed[w.id] = f"p{w.id}"
                src.emit(f"p{w.id} = _pack(v{w.id}, B, T)  # packed weight of %{n.id}")
    return packed


def shape_tuple(n: Node, lead: str) -> str:
    return "(" + ", ".join([lead] + [str(s) for s in n.shape]) + ("," if not n.shape else "") + ")"


def generate(plan: Plan, name: str = "cell", region_call: RegionCall | None = None,
             pack_weights: bool | None = None, cpu_gemm: bool = False,
             hoisted_call: HoistedCall | None = None) -> Source:
    """The whole module for `plan`. `region_call(src, stage, env, mask_var, live, stores)` may
    emit a fused stage itself (the kernel backends do) and return True; else torch lines are
    emitted. `hoisted_call(src, stage)` may turn a stage of `plan.hoisted_regions()` into a
    differentiable kernel op (the kernel backends: kernels/hoisted.py) and return its global
    name, which the prologue then calls where its `usable` says so. `pack_weights` (default:
    without a region_call) packs each per-step GEMM's weight for MKL once per call, which only
    pays on the CPU. `cpu_gemm` sends the products outside the loops through
    kernels/cpu_gemm.py (the cpu backend)."""
    from .codegen_torch_backward import emit_backward  # the backward half builds on this module
    pack = region_call is None if pack_weights is None else pack_weights
    src = Source()
    src.cpu_gemm = cpu_gemm
    src.hoisted_call = hoisted_call
    if cpu_gemm:
        from ..kernels import cpu_gemm as gemm_module
        src.globals["_gemm"] = gemm_module
    src.emit(f"# seqgraph generated code for cell {name!r}; read it with model.source()")
    src.emit("import torch")
    src.emit("import torch.nn.functional as F")
    src.emit("")
    _emit_prologue(src, plan)
    src.emit("")
    _emit_forward(src, plan, region_call, pack)
    for masked in (False, True):
        try:
            bwd = plan.backward_plan(masked)
        except NotImplementedError as e:
            src.emit("")
            src.emit(f"def backward_{'masked' if masked else 'plain'}(*args):")
            src.emit(f"    raise NotImplementedError({str(e)!r})")
            continue
        src.emit("")
        emit_backward(src, plan, bwd, masked, region_call, pack)
    src.globals["_c"] = _const_tensor
    src.globals["_pack"] = _pack_weight
    src.globals["_real_rows"] = _real_rows
    src.globals["_batch_rows"] = _batch_rows
    src.globals["_all_rows"] = _all_rows
    src.globals["_unless_finite"] = _unless_finite
    src.globals["_step_rows"] = real_step_rows
    src.globals["_packed_linear"] = _packed_linear
    src.globals["_addmm_into"] = add_product_into  # (torch's GEMM: the cpu backend calls _gemm.addmm_)
    src.globals["_empty"] = buffers.empty  # large CPU buffers, reused across calls (seqgraph/buffers.py)
    src.globals["_zeros"] = buffers.zeros
    return src


# -- rows over all steps: all T*B, or only the real steps of a padded batch ----------------
REAL_ROWS_BELOW = 0.65  # the share of real steps at or under which the work over all rows skips padding


def real_step_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The rows t * B + b of a padded batch's real steps, for the prologue's hoisted nodes
    (the input products) and the masked backward's reductions after the loop (the weight
    gradients) to run on those rows only. None (all T*B rows) when more than 65% of the steps
    are real, when the batch is not on the CPU (finding the rows would wait for the GPU and
    change a CUDA graph's shapes), or under torch.compile (their count would be a
    data-dependent shape). Gathering the real rows and scattering results back cost about
    what the products save on 30-35% of their rows (an LSTM's fwd+bwd, 2 cores: 6-9% faster on
    the real rows at 62% real, 1.0x at 70%, slower above; docs/masking.md)."""
    if mask is None or mask.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    flat = mask.reshape(-1)
    real = flat.nonzero().squeeze(1)
    return real if real.numel() <= REAL_ROWS_BELOW * flat.numel() else None


def _real_rows(v: torch.Tensor, rows: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A per-step value as (T*B, ...) rows, or only its real `rows`; given the (T, B) `mask`
    (and all rows), the padding's rows are 0 (a where: an infinite or nan value there is dropped)."""
    if rows is not None:
        return v.index_select(0, rows)
    if mask is None:
        return v
    return torch.where(mask.reshape((-1,) + (1,) * (v.dim() - 1)) != 0, v, 0.0)


def _batch_rows(v: torch.Tensor, T: int, rows: torch.Tensor | None) -> torch.Tensor:
    """A (B, ...) value repeated for each step's rows, or for the real `rows` only (row t*B + b is b)."""
    if rows is None:
        return v.repeat(T, *([1] * (v.dim() - 1)))
    return v.index_select(0, rows % v.shape[0])


def _unless_finite(mask: torch.Tensor | None, final: torch.Tensor) -> torch.Tensor | None:
    """The mask, or None where a state's padded rows are known finite. A padded step carries the
    state: before a later real step, the state that step reads; after the last, the final state
    (which alone can be infinite while the reference's gradients are not). On the CPU that is
    checked; elsewhere the check would wait for the device, so the rows are always zeroed."""
    if mask is None or (final.device.type == "cpu" and not torch.compiler.is_compiling()
                        and bool(torch.isfinite(final).all())):
        return None
    return mask


def _all_rows(v: torch.Tensor, rows: torch.Tensor | None, total: int) -> torch.Tensor:
    """Hoisted real rows back as all T*B rows, the padding's rows zero."""
    if rows is None:
        return v
    out = v.new_zeros((total,) + v.shape[1:])
    out[rows] = v
    return out


def _emit_prologue(src: Source, plan: Plan) -> None:
    step = plan.step
    src.emit("def prologue(T, B, xs, contexts, noises, params, rows=None, mask=None):")
    src.indent += 1
    src.emit('"""Invariants once per call, hoisted nodes over all T*B rows or the real `rows` (ordinary autograd)."""')
    poles = [n for n in plan.hoisted if _pole_operand(n) is not None]
    if poles:  # padded rows (all rows computed) feed 1 to an op's pole: see OpDef.pole
        src.emit("real = mask.reshape(-1) != 0 if rows is None and mask is not None else None")
    invariant_poles = {n.id for n in plan.invariant if _pole_operand(n) is not None}
    if invariant_poles:  # so do the zeroed contexts of a sequence without a real step
        src.emit("live = mask.any(0) if mask is not None else None  # the sequences with a real step")
    names = lambda nodes: ", ".join(_v(n) for n in nodes) + ("," if len(nodes) == 1 else "")  # noqa: E731
    if step.inputs:
        src.emit(f"{names(step.inputs)} = xs")
    if step.contexts:
        src.emit(f"{names(step.contexts)} = contexts")
    if step.noises:
        src.emit(f"{names(step.noises)} = noises")
    if step.params:
        src.emit(f"{names(list(step.params.values()))} = params")
    # per-step leaves as T*B rows; batch-carrying invariants repeated over T where hoisted nodes read them
    rows: dict[int, str] = {}
    for x in step.inputs:
        rows[x.id] = f"{_v(x)}_rows"
        src.emit(f"{_v(x)}_rows = _real_rows({_v(x)}.reshape({shape_tuple(x, 'T * B')}), rows)", x)
    for nz in step.noises:
        if not nz.attrs["per_sequence"]:
            rows[nz.id] = f"{_v(nz)}_rows"
            src.emit(f"{_v(nz)}_rows = _real_rows({_v(nz)}.expand({shape_tuple(nz, 'T, B')[1:-1]}).reshape("
                     f"{shape_tuple(nz, 'T * B')}), rows)", nz)
        else:
            src.emit(f"{_v(nz)} = {_v(nz)}.expand({shape_tuple(nz, 'B')})", nz)
    env: dict[int, str] = {}
    for n in plan.invariant:
        if n.id in invariant_poles:
            _emit_off_padding(src, n, env, "live", lambda: src.emit(f"{_v(n)} = {torch_expr(n, env, src)[0]}", n))
        else:
            src.emit(f"{_v(n)} = {torch_expr(n, env, src)[0]}", n)
    for n in plan.hoisted:
        for i in n.inputs:
            if i.batched and plan.cls[i.id] == "invariant" and i.id not in rows:
                rows[i.id] = f"{_v(i)}_rows"
                src.emit(f"{_v(i)}_rows = _batch_rows({_v(i)}, T, rows)", i)
    env = dict(rows)
    for n in plan.hoisted:
        env[n.id] = f"{_v(n)}_rows"
    src.outside_loops = True
    regions = plan.hoisted_regions() if src.hoisted_call is not None else []
    if regions:
        _emit_hoisted_stages(src, plan, regions, env, {n.id for n in poles})
    else:
        _emit_guarded(src, plan.hoisted, env, {r.id for r in plan.reads}, {n.id for n in poles})
    src.outside_loops = False
    outs = []
    for r in plan.reads:
        if plan.cls[r.id] == "hoisted":
            outs.append(f"_all_rows({env[r.id]}, rows, T * B).reshape({shape_tuple(r, 'T, B')})")
        else:
            outs.append(_v(r))
    src.emit(f"return [{', '.join(outs)}]")
    src.indent -= 1


def _emit_hoisted_stages(src: Source, plan: Plan, regions: list, env: dict[int, str], poles: set[int]) -> None:
    """The hoisted nodes stage by stage: each of `regions` that src.hoisted_call turns into a
    kernel op as one call to it (its torch lines in the other branch), the other nodes as
    torch lines, emitted together so that products still fold into their adds. A region with
    an op in `poles` calls its kernel only where no padded row is computed (`real` is None):
    the torch lines put 1 at the pole on padded rows (_emit_guarded)."""
    reads = {r.id for r in plan.reads}
    pending: list[Node] = []
    stages = plan.hoisted_stages

    def later(k: int) -> set[int]:
        return {i.id for s in stages[k:] for n in s.nodes for i in n.inputs}

    for k, stage in enumerate(stages):
        name = src.hoisted_call(src, stage) if any(stage is r for r in regions) else None
        if name is None:
            pending += stage.nodes
            continue
        live = reads | later(k + 1)
        _emit_guarded(src, pending, env, live | later(k), poles)
        pending = []
        args = [env.get(i.id, _v(i)) for i in stage.inputs if i.op != "const"]
        outs = ", ".join(env[n.id] for n in stage.outputs)
        padding = "real is None and " if any(n.id in poles for n in stage.nodes) else ""
        src.emit(f"if {padding}{name}.usable({', '.join(args)}):")
        src.indent += 1
        src.emit(f"{outs}, = {name}({', '.join(args)})  # one kernel over all rows, forward and backward: "
                 + ", ".join(n.op for n in stage.nodes))
        src.indent -= 1
        src.emit("else:")
        src.indent += 1
        _emit_guarded(src, stage.nodes, env, live, poles)
        src.indent -= 1
    _emit_guarded(src, pending, env, reads, poles)


def _emit_guarded(src: Source, nodes: list[Node], env: dict[int, str], live: set[int], poles: set[int]) -> None:
    """emit_nodes, with the operand of each op in `poles` replaced by 1 on the padding's rows
    (`real` false) before it: in runs between those ops, so products still fold into adds."""
    start = 0
    for k, n in enumerate(nodes + [None]):
        if n is not None and n.id not in poles:
            continue
        later = {i.id for m in nodes[k:] for i in m.inputs}
        emit_nodes(src, nodes[start:k], env, live | later)
        if n is not None:
            _emit_off_padding(src, n, env, "real", lambda: emit_nodes(src, [n], env, live | later))
        start = k + 1


def _pole_operand(n: Node) -> Node | None:
    """The batched operand at n's pole (OpDef.pole), if n has one."""
    k = REGISTRY[n.op].pole
    k = k(n) if callable(k) else k
    return n.inputs[k] if k is not None and n.inputs[k].batched else None


def _emit_off_padding(src: Source, n: Node, env: dict[int, str], rows: str, emit_node) -> None:
    """Emit n (by `emit_node`) with the operand at its pole (OpDef.pole) replaced by its
    pole_fill (1) on the rows where `rows` (a variable: a bool per row, or None for all rows
    real) is false."""
    a = _pole_operand(n)
    name = env.get(a.id, _v(a))
    fill = REGISTRY[n.op].pole_fill.format(x=name)
    src.emit(f"{name}_off{n.id} = {name} if {rows} is None else torch.where({rows}.reshape("
             f"{(-1,) + (1,) * len(a.shape)}), {name}, {fill})", n)
    env[a.id] = f"{name}_off{n.id}"
    emit_node()
    if name == _v(a):
        del env[a.id]
    else:
        env[a.id] = name


def _bind_reads(src: Source, plan: Plan, t: str | None) -> None:
    for k, r in enumerate(plan.reads):
        hoisted = plan.cls[r.id] == "hoisted"
        if (t is None) != hoisted:
            src.emit(f"{_v(r)} = r{k}_[{t}]" if hoisted else f"{_v(r)} = r{k}", r)


def _unbind_steps(src: Source, plan: Plan) -> None:
    """Per-step views made once (one unbind instead of an index op per step and tensor)."""
    for k, r in enumerate(plan.reads):
        if plan.cls[r.id] == "hoisted":
            src.emit(f"r{k}_ = r{k}.unbind(0)")
    src.emit("mask_ = mask.unbind(0) if mask is not None else None")


def _emit_forward(src: Source, plan: Plan, region_call, pack: bool) -> None:
    step = plan.step
    nr, ns, no = len(plan.reads), len(step.states), len(step.outputs)
    src.emit("def forward(T, B, mask, reads, states, save):")
    src.indent += 1
    src.emit('"""The time loop. Returns outputs (T, B, ...), final states and, with save, what backward reads."""')
    if nr:
        src.emit(f"{', '.join(f'r{k}' for k in range(nr))}, = reads")
    src.emit(f"{', '.join(f's{j}' for j in range(ns))}, = states" if ns else "pass")
    floats = [k for k, r in enumerate(plan.reads) if r.dtype == "float"]
    ref = "s0" if ns else f"r{floats[0]}"  # a float tensor on the right device
    for k, o in enumerate(step.outputs):
        src.emit(f"out{k} = {ref}.new_empty({shape_tuple(o, 'T, B')}); out{k}_ = out{k}.unbind(0)")
    bwd_saved = all_saved(plan)
    src.emit("if save:")
    src.indent += 1
    for k, n in enumerate(bwd_saved):
        src.emit(f"sv{k} = _empty({ref}, {shape_tuple(n, 'T, B')}); sv{k}_ = sv{k}.unbind(0)", n)
    for j, (p, _) in enumerate(step.states):
        src.emit(f"ss{j} = _empty({ref}, {shape_tuple(p, 'T + 1, B')}); ss{j}[0] = s{j}; "
                 f"ss{j}_ = ss{j}.unbind(0)")
    src.emit("pass")
    src.indent -= 1
    _bind_reads(src, plan, None)
    _unbind_steps(src, plan)
    packed = emit_weight_packing(src, plan.stages) if pack else {}
    results = {r.id for r in step.results}
    for masked in (False, True):
        for save in (True, False):
            src.emit(("if" if masked is False and save else "elif") +
                     f" mask is {'not ' if masked else ''}None and {'' if save else 'not '}save:")
            src.indent += 1

            def body(masked=masked, save=save):
                if masked:
                    src.emit("mt = mask_[t]")
                    src.emit("m = mt.unsqueeze(1)")
                    for r in sorted({len(n.shape) for n in step.results} - {1}):
                        src.emit(f"m{r} = mt.reshape({', '.join(['B'] + ['1'] * r)})")
                _bind_reads(src, plan, "t")
                for j, (p, _) in enumerate(step.states):
                    src.emit(f"{_v(p)} = s{j}", p)
                stores = [Store(o, f"out{k}_[t]", "zero" if masked else "plain") for k, o in enumerate(step.outputs)]
                for j, (p, q) in enumerate(step.states):
                    if save or masked:
                        stores.append(Store(q, f"ss{j}_[t + 1]" if save else None, "carry" if masked else "plain",
                                            prev=p, result=f"s{j}"))
                if save:
                    stores += [Store(n, f"sv{k}_[t]") for k, n in enumerate(bwd_saved)]
                live = results | ({n.id for n in bwd_saved} if save else set())
                emit_stages(src, plan.stages, {}, live, "m" if masked else None, region_call, stores, packed)
                if not (save or masked):
                    for j, (p, q) in enumerate(step.states):
                        src.emit(f"s{j} = {_v(q)}")
            emit_time_loop(src, plan.unroll, body, reverse=False)
            src.indent -= 1
    outs = ", ".join(f"out{k}" for k in range(no))
    fin = ", ".join(f"s{j}" for j in range(ns))
    saved = ", ".join(f"sv{k}" for k in range(len(bwd_saved)))
    seqs = ", ".join(f"ss{j}" for j in range(ns))
    src.emit("if not save:")
    src.emit(f"    return [{outs}], [{fin}], None")
    src.emit(f"return [{outs}], [{fin}], ([{saved}], [{seqs}])")
    src.indent -= 1


def emit_time_loop(src: Source, unroll: int, body, reverse: bool) -> None:
    """The loop over t, its body written `unroll` times per iteration (then a remainder loop)."""
    step = "-" if reverse else "+"
    if unroll == 1:
        src.emit("for t in range(T - 1, -1, -1):" if reverse else "for t in range(T):")
        src.indent += 1
        body()
        src.indent -= 1
        return
    src.emit("t = T - 1" if reverse else "t = 0")
    src.emit(f"while t - {unroll - 1} >= 0:" if reverse else f"while t + {unroll} <= T:")
    src.indent += 1
    for _ in range(unroll):
        body()
        src.emit(f"t {step}= 1")
    src.indent -= 1
    src.emit("while t >= 0:" if reverse else "while t < T:")
    src.indent += 1
    body()
    src.emit(f"t {step}= 1")
    src.indent -= 1


def _mask_for(n: Node) -> str:
    return "m" if len(n.shape) == 1 else f"m{len(n.shape)}"


def all_saved(plan: Plan) -> list[Node]:
    """Forward values either backward variant reads (both variants share one forward)."""
    seen: dict[int, Node] = {}
    for masked in (False, True):
        try:
            for n in plan.backward_plan(masked).saved:
                seen.setdefault(n.id, n)
        except NotImplementedError:
            pass
    return [n for n in plan.loop if n.id in seen]
