"""`sg.compile`: a Recurrence (or any module holding some) made fast, with the same interface.

`compile` plans the cell once (seqgraph.compiler.pipeline), generates the backend's code
(torch: straight-line Python over torch ops; triton: the same with each fused region a
generated Triton kernel; cpu: the same with each fused region a generated C function), and
returns a `CompiledRecurrence` that shares the original's
parameters (same tensors: optimizer steps on either are seen by both) and inherits all of its
argument checks, masking and remember/forget semantics; only the step loop differs. The whole
sequence runs as one autograd Function: the forward loop saves what the plan says, and the
backward loop runs the generated derivative. Compiled programs are cached by the cell's
signature, the backend and the unroll factor, so one compile serves every T, B, dtype and
device. Must not change what a model computes.
"""
from __future__ import annotations

import builtins
import dataclasses
import numbers
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import cuda_graphs, custom_ops
from .cell import Cell
from .compiler.codegen_torch import generate, real_step_rows
from .compiler.pipeline import compile_plan
from .compiler.plan import Plan, result_dependencies
from .recurrence import (Recurrence, batched_by_vmap, forward_ad_active, functorch_active, own_storage,
                         token_output)
from .settings import debug_level, env, triton_interpreting

BACKENDS = ("auto", "torch", "triton", "cpu", "reference")
_C_DTYPES = (torch.float32, torch.float64)


_C_BROKEN: str | None = None  # why the C compiler could not build kernels here, once it failed


def _auto_program(cell: Cell, wanted: str, unroll: int, part: tuple | None = None) -> Program:
    """get_program for backend="auto": where the C compiler is present but cannot build the
    kernels (no libc headers, say), the torch code, with one warning, instead of an error.
    `part` = (dtype, part name): the part of the C code a call needs, built now (a part not
    built with the program, such as the masked loops, falls back alike)."""
    global _C_BROKEN
    try:
        program = get_program(cell, wanted, unroll)
        if part is not None:
            program.c_loops.lib.load(*part)
        return program
    except RuntimeError as e:
        if wanted != "cpu":
            raise
        _C_BROKEN = str(e).splitlines()[0].rstrip(":. ")
        warnings.warn(f"seqgraph: the C compiler could not build the cpu backend's kernels, so backend='auto' "
                      f"runs the torch code from now on ({_C_BROKEN}; backend='cpu' shows the whole error)",
                      RuntimeWarning, stacklevel=3)
        return get_program(cell, "torch", unroll)


def auto_backend(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """What backend="auto" runs for tensors on `device` of `dtype`: Triton kernels on CUDA, C
    kernels on the CPU (with a C compiler), the torch code otherwise and for dtypes the
    kernels do not compute (float64 on CUDA, half precision on the CPU)."""
    return _auto_choice(device, dtype)[0]


def why_auto_runs_torch(dtype: torch.dtype | None) -> str:
    """Why backend="auto" runs the torch code for CPU tensors of `dtype`."""
    return _auto_choice(torch.device("cpu"), dtype, autocast=True)[1]


def _auto_choice(device: torch.device, dtype: torch.dtype | None, autocast: bool = False) -> tuple[str, str]:
    """(backend, why) of backend="auto" for tensors on `device` of `dtype`; `autocast` says
    whether CPU autocast is the reason left when nothing else is (the caller checks it)."""
    if device.type == "cuda":
        return ("torch", "Triton computes float32 and half precision, not float64") if dtype == torch.float64 \
            else ("triton", "")
    if device.type != "cpu":
        return "torch", f"seqgraph's kernels run on CPUs and CUDA GPUs, not {device.type}"
    if dtype is not None and dtype not in _C_DTYPES:
        return "torch", f"the C kernels compute float32 and float64, not {str(dtype).replace('torch.', '')}"
    if _find_compiler() is None:
        return "torch", f"no C compiler was found: {_c_launch.why_no_compiler()}"
    if _C_BROKEN is not None:
        return "torch", f"the C compiler could not build the kernels: {_C_BROKEN}"
    return ("torch", "under CPU autocast, which picks each op's dtype") if autocast else ("cpu", "")


_c_launch = None  # seqgraph.kernels.c_launch, once a call on the CPU has asked for it


def _find_compiler() -> str | None:
    """kernels.c_launch.find_compiler(). The C machinery is imported on first use (a program
    that never runs on the CPU never loads it), once: backend="auto" asks at every CPU call,
    and an import statement there was a microsecond or two of a one-step call."""
    global _c_launch
    if _c_launch is None:
        from .kernels import c_launch
        _c_launch = c_launch
    return _c_launch.find_compiler()


@dataclass
class Program:
    plan: Plan
    source: str
    fns: dict
    backend: str
    compile_seconds: float
    graphed: dict = field(default_factory=dict)  # loop name -> cuda_graphs.GraphedLoop
    key: tuple = ()
    loop_op: object = None  # the loops as one torch.library op, for torch.compile (custom_ops.py)
    c_loops: object = None  # cpu backend: the CLoops running whole loops in C, or why the loops stay in Python
    # the forward loop returns each final state in a buffer of its own: the C loops' wrappers
    # allocate them (where B == 0 they run the Python loop, but empty tensors are never
    # copied), so own_storage has nothing to do; the Python loops' last state may be an
    # output's last step
    finals_owned: bool = False
    # per output, then per next state: (indices of the loop's reads, of the states) it reads
    depends: tuple = ()
    cell: Cell | None = None  # the cell it was generated from: its names and user lines are in `source`
    # each state's per-example shape: a call reads these rather than the plan's nodes, which are
    # the first compiled instance's own (torch.compile would guard on that identity)
    state_shapes: tuple = ()

    def __deepcopy__(self, memo):  # generated code holds no parameters: copies share it
        return self


_CACHE: dict[tuple, Program] = {}
STATS = {"compiles": 0, "cache_hits": 0}


_COMPILING = threading.RLock()  # one compile at a time: the C compiler and torch.library are not re-entrant


def _fresh_lock_after_fork() -> None:
    """A child forked while another thread compiled would wait for that compile forever."""
    global _COMPILING
    _COMPILING = threading.RLock()


os.register_at_fork(after_in_child=_fresh_lock_after_fork)


def clear_cache() -> None:
    """Forget every compiled program (the next compile of each cell starts afresh)."""
    _CACHE.clear()


def get_program(cell: Cell, backend: str, unroll: int = 1, purpose: str = "") -> Program:
    """The program of `cell` for `backend`: from the cache, or compiled once (threads asking
    for the same program at once wait for the one compile). `purpose` says in SEQGRAPH_DEBUG's
    output why a program the user did not name is compiled."""
    key = (cell.signature(), backend, unroll)
    prog = _CACHE.get(key)
    if prog is None:
        with _COMPILING:
            prog = _CACHE.get(key)
            if prog is None:
                if debug_level() >= 1:
                    print(f"[seqgraph] compiling {cell.name or 'cell'!r} for backend={backend!r}"
                          f"{f' (unroll={unroll})' if unroll > 1 else ''}{purpose}", file=sys.stderr)
                prog = _CACHE[key] = _compile_program(cell, backend, unroll, key)
                return prog
    STATS["cache_hits"] += 1  # (no lock: torch.compile traces this, and a count tests read, not a decision)
    return prog


def _generate_program(cell: Cell, backend: str, unroll: int):
    """(plan, generated module, its text with the kernels' text appended, the C loops or why
    not) of `cell` for `backend`: everything but building the kernels and running the text."""
    from .compiler.ops import c_fusable
    plan = compile_plan(cell, unroll, c_fusable if backend == "cpu" else None, fused_loop=backend != "torch",
                        norms_in_loop=backend == "cpu")
    region_call, pack, hoisted_call = None, None, None
    if backend == "triton":
        from .kernels.backend import triton_hoisted_call, triton_region_call
        region_call, hoisted_call = triton_region_call, triton_hoisted_call
        plan.hoisted_kernels = "one Triton kernel over all rows forward, one backward; torch code inside torch.compile"
    elif backend == "cpu":
        from .kernels.backend import cpu_hoisted_call, cpu_region_call
        region_call, pack, hoisted_call = cpu_region_call, True, cpu_hoisted_call
        plan.hoisted_kernels = "one C kernel over all rows forward, one backward; torch code inside torch.compile"
    src = generate(plan, cell.name or "cell", region_call=region_call, pack_weights=pack, cpu_gemm=backend == "cpu",
                   hoisted_call=hoisted_call)
    c_loops = None
    plan.loops = {"torch": "Python, torch code per step (the torch backend)",
                  "triton": "Python, one Triton kernel launch per fused region and step (on a GPU, the loops "
                            "are captured as CUDA graphs)"}.get(backend, plan.loops)
    if backend == "cpu":  # whole loops in C where every stage has C code (else the Python loops call the kernels)
        from .kernels.c_loops import emit_c_loops
        c_loops = emit_c_loops(src, plan)
        plan.loops = ("C, one function per loop variant (no Python per step; a masked step skips the rows "
                      "that end the batch as padding)" if not isinstance(c_loops, str)
                      else f"Python, calling the C kernels (no C loop: {c_loops})")
    text = src.text()
    kernels = [f"# ---- {name}: {k.path.name} ----\n{k.source}" for name, k in src.globals.items()
               if name.startswith("_kernel")]
    if backend == "triton":  # (the C text of the cpu backend's hoisted kernels is in its library's)
        kernels += [f"# ---- {name}.{part}: {k.path.name} ----\n{k.source}" for name, h in src.globals.items()
                    if name.startswith("_hoisted")
                    for part, k in (("forward_kernel", h.forward_kernel), ("backward_kernel", h.backward_kernel))
                    if k is not None]
    shown = text
    if kernels:
        shown += "\n\n# ======== generated Triton kernels ========\n" + "\n".join(kernels)
    clib = src.globals.get("_clib")
    if clib is not None:
        clib.name = cell.name or "cell"
        shown += "\n\n/* ======== generated C kernels (the _ck<n> calls above) ======== */\n" + clib.source()
    return plan, src, text, shown, c_loops


def _compile_program(cell: Cell, backend: str, unroll: int, key: tuple) -> Program:
    t0 = time.perf_counter()
    plan, src, text, shown, c_loops = _generate_program(cell, backend, unroll)
    clib = src.globals.get("_clib")
    if clib is not None:  # the C compiler runs now, once per cell structure (then from the disk cache)
        clib.load(torch.float32)
    namespace = dict(src.globals)
    exec(builtins.compile(text, f"<seqgraph {backend} {cell.name or 'cell'}>", "exec"), namespace)
    fns = namespace
    in_c = c_loops is not None and not isinstance(c_loops, str)
    if in_c:
        fns = dict(namespace)  # the wrappers fall back to the Python loops by their own names
        for name in ("forward", "backward_plain", "backward_masked"):
            if f"{name}_c" in namespace:
                fns[name] = namespace[f"{name}_c"]
    prog = Program(plan, shown, fns, backend, time.perf_counter() - t0, key=key, c_loops=c_loops, finals_owned=in_c,
                   depends=result_dependencies(plan), cell=cell,
                   state_shapes=tuple(p.shape for p, _ in plan.step.states))
    if debug_level() >= 1:
        print(f"[seqgraph] compiled {cell.name or 'cell'!r} for backend={backend!r} in {prog.compile_seconds:.2f} s",
              file=sys.stderr)
    if debug_level() >= 3:
        print(f"[seqgraph] generated source ({backend}):\n{shown}", file=sys.stderr)
    prog.loop_op = custom_ops.loop_op(prog, key)  # registered now: never while being traced
    STATS["compiles"] += 1
    return prog


def _as_named_by(cell: Cell, program: Program) -> tuple[Plan, str]:
    """(plan, source) of `program` as `cell` names its nodes and lines. Cells of one structure
    share one program, generated from the first of them; another's `plan()` and `source()`
    generate the same code again under its own names and user lines (nothing is built; node
    numbers, and the region names made from them, are the cell's own)."""
    plan, _, _, shown, _ = _generate_program(cell, program.backend, program.key[2] if program.key else 1)
    plan.loops = program.plan.loops  # (the program's: the same choice, made where it was built)
    return plan, shown


def _without_gradient(prog: Program, reads: list, states: list, T: int, mask) -> list[int]:
    """The positions among outputs + final states of the results that read nothing requiring
    grad, at any step: autograd must see them as constants, as the reference gives them. A
    final state is its last step's next value when every sequence has a real step; else it
    may be the initial value, so it requires grad where that does (also where a traced call
    cannot look at the mask)."""
    needs = [isinstance(r, torch.Tensor) and r.requires_grad for r in reads]
    carries = [s.requires_grad for s in states]  # the state requires grad at some step
    n_out = len(prog.depends) - len(states)

    def reads_grad(k: int) -> bool:
        rs, ss = prog.depends[k]
        return any(needs[i] for i in rs) or any(carries[j] for j in ss)
    changed = True
    while changed:  # a state carries a gradient once its next value reads one, at some step
        changed = False
        for j in range(len(states)):
            if not carries[j] and reads_grad(n_out + j):
                carries[j] = changed = True
    last_step = T > 0 and (mask is None or (type(mask) is torch.Tensor and mask.device.type == "cpu"  # (values to read)
                                            and not torch.compiler.is_compiling() and bool(mask.any(0).all())))
    final = [reads_grad(n_out + j) if last_step else carries[j] for j in range(len(states))]
    return [k for k in range(n_out) if not reads_grad(k)] + [n_out + j for j in range(len(states)) if not final[j]]


def reached_by_gradient(prog: Program, has_grad: tuple[bool, ...]) -> tuple[list[bool], list[bool]]:
    """(per read, per initial state) whether a gradient reaches it, given which of the outputs
    and final states (`has_grad`, in that order) received one: those the loss never reads
    get None from autograd, as the reference's parameters do when nothing they feed is
    differentiated (an optimizer then leaves them alone; a zero gradient would still decay
    them). A next state receives a gradient at some step when its final value does, or a
    result that does reads it, at any later step."""
    n_states = len(prog.state_shapes)
    n_out = len(has_grad) - n_states
    receives = [bool(has_grad[n_out + j]) for j in range(n_states)]  # next state j, at some step
    live = [k for k in range(n_out) if has_grad[k]]
    changed = True
    while changed:
        changed = False
        for j in range(n_states):
            if not receives[j] and (any(j in prog.depends[k][1] for k in live)
                                    or any(receives[i] and j in prog.depends[n_out + i][1] for i in range(n_states))):
                receives[j] = changed = True
    readers = live + [n_out + j for j in range(n_states) if receives[j]]
    reads = [any(i in prog.depends[k][0] for k in readers) for i in range(len(prog.plan.reads))]
    # an initial state: read by the first step, or passed through to a row's final state when
    # the row has no real step
    states = [receives[j] or any(j in prog.depends[k][1] for k in readers) for j in range(n_states)]
    return reads, states


# run a masked batch longest first when that leaves at most this share of the rows to compute:
# at T=50 B=64 H=256 (2 threads, taken in turn) sorting a shuffled batch of 48% real steps took
# 33.5 against 36.2 ms, one of 76% real 51.6 against 48.6 ms (the two gathers outweigh it)
SORT_BELOW = 0.7


def previous_inputs(x: torch.Tensor, first: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(T, B, ...): at step t, each row's input at its last real step before t, or `first` (the
    state's initial value) before any: the value a state whose next value is `x` holds at t.
    Without a mask, x shifted by one step. Padded steps get zeros, as padded inputs do: their
    results are dropped, and an infinite value there (a last real input, or the initial value
    of a row without a real step, which the reference never reads) would make NaN gradients of
    the products over all rows. Plain torch ops: autograd takes the gradients back to x and
    `first`."""
    first = first.to(x.dtype).unsqueeze(0)
    if x.shape[0] == 0:
        return x
    if valid is None:
        return torch.cat([first, x[:-1]], 0)
    T = x.shape[0]
    extra = (1,) * (x.dim() - 2)
    steps = torch.arange(T, device=x.device).view(T, 1).expand(valid.shape)
    last = torch.where(valid, steps, -1).cummax(0).values  # each row's last real step up to t
    before = torch.cat([torch.full_like(last[:1], -1), last[:-1]], 0)  # ... before t
    picked = x.gather(0, before.clamp(min=0).view(valid.shape + extra).expand(x.shape))
    held = torch.where((before >= 0).view(valid.shape + extra), picked, first)
    return torch.where(valid.view(valid.shape + extra), held, torch.zeros((), dtype=x.dtype, device=x.device))


def longest_first(valid: torch.Tensor | None) -> torch.Tensor | None:
    """The order, longest first, in which the C loops run a padded batch's rows, or None to run
    them as given. Each step of a masked C loop computes the rows up to its last real one (the
    padding after it is skipped, docs/masking.md), so a shuffled batch computes most of its
    padding and the same batch sorted longest first almost none. Sorting is chosen when it
    leaves at most SORT_BELOW of the rows the given order computes, on CPU tensors outside
    torch.compile (where the count would be a data-dependent decision)."""
    if valid is None or valid.shape[1] < 2 or valid.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    order = valid.sum(0).argsort(descending=True, stable=True)
    rank = torch.arange(1, valid.shape[1] + 1)
    given = int((valid * rank).amax(1).sum())
    sorted_ = int((valid.index_select(1, order) * rank).amax(1).sum())
    return order if sorted_ <= SORT_BELOW * given and sorted_ < given else None


def _loop(prog: Program, name: str, device: torch.device):
    """The generated loop `name`, captured as CUDA graphs on a GPU (see cuda_graphs.py)."""
    if not cuda_graphs.enabled(device):
        return prog.fns[name]
    graphed = prog.graphed.get(name)
    if graphed is None:  # (two threads may both build one; both use the one kept)
        graphed = prog.graphed.setdefault(name, cuda_graphs.GraphedLoop(prog.fns[name], name))
    return graphed


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape, dtype and device whose one element every index reads."""
    return t.new_zeros(()).expand(t.shape)


class _Sequence(torch.autograd.Function):
    """The whole sequence, forward and backward, as one autograd node."""

    @staticmethod
    def forward(ctx, prog, T, B, mask, nreads, *args):
        reads, states = list(args[:nreads]), list(args[nreads:])
        device = args[0].device
        constant = _without_gradient(prog, reads, states, T, mask)
        outs, finals, (saved, seqs) = _loop(prog, "forward", device)(T, B, mask, reads, states, True)
        finals = own_storage(finals, list(outs) + list(seqs))  # a user may change a final state in place
        if constant:
            results = list(outs) + list(finals)
            ctx.mark_non_differentiable(*[results[k] for k in constant])
        ctx.prog, ctx.T, ctx.mask, ctx.nouts = prog, T, mask, len(outs)
        ctx.autocast = autocast_state(device)
        # results the loss never reads come to backward as None, not zeros: the reads and
        # initial states that only they depend on then get None too (reached_by_gradient)
        ctx.set_materialize_grads(False)
        ctx.results = [(r.shape, r.dtype, r.device) for r in (*outs, *finals)]
        # a read the backward never looks at (the hoisted input projection of an LSTM, say) is
        # kept as a one-element stand-in of its shape: its memory is freed after the forward
        used = prog.plan.backward_plan(mask is not None).reads_used
        # everything backward reads goes through save_for_backward, so that saved-tensor hooks
        # (checkpoint(use_reentrant=False), save_on_cpu) see and may free or move all of it
        ctx.counts = (len(reads), len(saved))
        ctx.save_for_backward(*[r if n.id in used else _stand_in(r) for n, r in zip(prog.plan.reads, reads)],
                              *saved, *seqs)
        return (*outs, *finals)

    @staticmethod
    def backward(ctx, *grads):
        nr, ns = ctx.counts
        kept = list(ctx.saved_tensors)
        reads, saved, seqs = kept[:nr], kept[nr:nr + ns], kept[nr + ns:]
        reached, reached_states = reached_by_gradient(ctx.prog, tuple(g is not None for g in grads))
        grads = [g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                 for g, (shape, dtype, device) in zip(grads, ctx.results)]
        gouts, gfinals = list(grads[:ctx.nouts]), list(grads[ctx.nouts:])
        name = "backward_masked" if ctx.mask is not None else "backward_plain"
        fn = _loop(ctx.prog, name, gouts[0].device if gouts else reads[0].device)
        if torch.is_grad_enabled():  # backward(create_graph=True): generated code autograd cannot see into
            raise RuntimeError(_SECOND_ORDER.format(backend=ctx.prog.backend))
        if any(g is not None and batched_by_vmap(g) for g in grads):
            raise NotImplementedError(_BATCHED_GRADS.format(backend=ctx.prog.backend))
        # which reads need their gradient: the loop skips what only a read no one asks for needs
        # (a graphed loop takes positional arguments alone, and computes them all)
        wanted = tuple(n and r for n, r in zip(ctx.needs_input_grad[5:5 + nr], reached))
        need = {"need": wanted} if fn is ctx.prog.fns[name] else {}
        with autocast_as(ctx.autocast):
            dreads, dstates = fn(ctx.T, ctx.mask, reads, saved, seqs,
                                 [g.contiguous() for g in gouts], [g.contiguous() for g in gfinals], **need)
        dreads = [d if w else None for d, w in zip(dreads, wanted)]
        dstates = [d if r else None for d, r in zip(dstates, reached_states)]
        return (None, None, None, None, None, *dreads, *dstates)


def autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    """The autocast of a forward on `device`, for its backward to run under (as
    torch.amp.custom_bwd does): the saved values have the dtypes autocast chose, which the
    weights may not share."""
    try:
        return device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    except RuntimeError:  # a device autocast does not know (meta)
        return "cpu", False, torch.bfloat16


def autocast_as(state: tuple[str, bool, torch.dtype]):
    """A context running code under the autocast `autocast_state` recorded."""
    kind, enabled, dtype = state
    return torch.autocast(kind, dtype=dtype, enabled=enabled)


_BATCHED_GRADS = ("seqgraph: a compiled loop's backward ({backend} backend) runs generated code on one "
                  "gradient at a time, and got a batch of them (torch.autograd.grad(..., is_grads_batched=True), "
                  "torch.autograd.functional.jacobian(..., vectorize=True), gradcheck(check_batched_grad=True)). "
                  "Ask for one gradient per backward (is_grads_batched=False, vectorize=False), or use "
                  "torch.func.jacrev / vmap over the module, which run its reference loop")

_SECOND_ORDER = ("seqgraph: a compiled loop ({backend} backend) has a first-order backward only, and "
                 "backward(create_graph=True) asks for one that can be differentiated again (a "
                 "gradient penalty, Hessian-vector products). Run that module uncompiled "
                 "(sg.Recurrence, or sg.nn.* with backend='reference') for higher-order gradients.")


class CompiledRecurrence(Recurrence):
    """A Recurrence whose step loop is generated code. Build it with `sg.compile`."""

    def __init__(self, rec: Recurrence, backend: str = "torch", unroll: int = 1):
        nn.Module.__init__(self)
        self.cell = rec.cell
        self.batch_first = rec.batch_first
        self._memory = None
        object.__setattr__(self, "_source", rec)  # not a submodule: its parameters are ours already
        self.params = rec.params  # the same Parameter objects: nothing to keep in sync
        self.init = rec.init
        self.backend = backend
        self.unroll = unroll
        self.train(rec.training)
        if backend == "auto":  # planned for where the parameters are now; re-chosen per call
            if env("CC") and _find_compiler() is None:  # (unset, no compiler is no mistake of the user's)
                warnings.warn(f"seqgraph: backend='auto' runs the torch code on the CPU: {_c_launch.why_no_compiler()}",
                              RuntimeWarning, stacklevel=3)
            p = next(iter(rec.parameters()), None)
            where = p.device if p is not None else torch.device("cpu")
            self._program = _auto_program(rec.cell, auto_backend(where, p.dtype if p is not None else None), unroll)
        else:
            from .kernels.c_launch import find_compiler
            if backend == "cpu" and find_compiler() is None:  # (a compiler that fails says why when it runs)
                from .kernels.c_launch import CompilerMissing, why_no_compiler
                raise CompilerMissing(f"backend='cpu' builds its kernels with a C compiler: {why_no_compiler()}; "
                                      f"backend='torch' needs none")
            self._program = get_program(rec.cell, backend, unroll)
        self._build_torch_fallback()

    def _build_torch_fallback(self) -> None:
        """Build the torch program now (about 10 ms), which calls in another dtype (bfloat16,
        float16), under autocast, or on another device run: a first such call inside
        torch.compile must find it built, since compiling cannot be traced."""
        if self._program.backend != "torch" and self.backend != "reference":
            get_program(self.cell, "torch", self.unroll,
                        purpose=": the torch code that calls in other dtypes, devices or autocast run")

    # train()/eval() on either the original or its compiled twin switch both: they are one
    # model, with one set of parameters (as torch.compile's wrapper follows its module)
    @property
    def training(self) -> bool:
        source = self.__dict__.get("_source")
        return source.training if source is not None else self.__dict__.get("_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        source = self.__dict__.get("_source")
        if source is not None:
            source.training = mode
        else:  # during nn.Module.__init__, before the source is set
            self.__dict__["_training"] = mode

    # remember: one switch for the twins (set on either, as a stack sets it on its layers)
    @property
    def remember(self) -> bool:
        source = self.__dict__.get("_source")
        return source.remember if source is not None else False

    @remember.setter
    def remember(self, on: bool) -> None:
        source = self.__dict__.get("_source")
        if source is not None:
            source.remember = on

    # remember=True: the twins carry one remembered state (forget() on either drops it)
    @property
    def _memory(self):
        source = self.__dict__.get("_source")
        return source._memory if source is not None else None

    @_memory.setter
    def _memory(self, value) -> None:
        source = self.__dict__.get("_source")
        if source is not None:
            source._memory = value

    def __getstate__(self) -> dict:
        # the generated code is not pickled: loading compiles it again (or takes it from the
        # cache, which is keyed by the cell's structure)
        state = self.__dict__.copy()
        state["_program"] = self.backend if state.pop("_missing_compiler", None) else self._program.backend
        state.pop("_named_programs", None)  # (generated again when asked)
        return state

    def __setstate__(self, state: dict) -> None:
        memory = state.pop("_memory", None)  # (pickled before the twins shared one remembered state)
        remember = state.pop("remember", None)  # (pickled before the twins shared one switch)
        self.__dict__.update(state)
        if remember is not None:
            self._source.remember = remember
        if memory is not None and self._source._memory is None:
            self._source._memory = memory
        if self.backend == "auto":  # chosen again here: this machine may lack the saving one's C compiler
            p = next(iter(self.param_tensors().values()), None)
            where = auto_backend(p.device, p.dtype) if p is not None else auto_backend(torch.device("cpu"))
            self._program = _auto_program(self.cell, where, self.unroll)
        else:
            from .kernels.c_launch import CompilerMissing
            try:
                self._program = get_program(self.cell, state["_program"], self.unroll)
            except CompilerMissing as e:  # loaded all the same, so its parameters can be read;
                self._program = get_program(self.cell, "torch", self.unroll)  # a call says why it cannot run
                self.__dict__["_missing_compiler"] = str(e)
        self._build_torch_fallback()

    def _retry_backend(self) -> None:
        """A module saved with backend="cpu" and loaded where no C compiler was found: build its
        program now if one has appeared, else refuse the call by name."""
        from .kernels.c_launch import CompilerMissing, find_compiler, why_no_compiler
        if find_compiler() is None:
            raise CompilerMissing(f"this module was saved with backend={self.backend!r}, whose kernels need a C "
                                  f"compiler, and none was found here ({why_no_compiler()}); its parameters were "
                                  f"loaded: sg.compile(module, backend='torch') runs them without one")
        self._program = get_program(self.cell, self.backend, self.unroll)
        del self.__dict__["_missing_compiler"]

    def plan(self) -> Plan:
        """The compiled schedule that a call with the parameters' dtype and device runs;
        `print(model.plan().describe(T=100, B=64))` sizes it. Where backend="auto" runs the
        torch code on the CPU, the plan's time-loop line says why."""
        program, dtype, device = self._current_program()
        plan = self._named(program)[0]
        if self.backend == "auto" and program.backend == "torch" and device.type == "cpu":
            why = why_auto_runs_torch(dtype)
            plan = dataclasses.replace(plan, loops=f"{plan.loops}; backend='auto' runs the torch code because {why}")
        return plan

    def source(self) -> str:
        """The generated code that a call with the parameters' dtype and device runs (and, for
        the triton backend, its kernels), each line tagged with the node and user line it came
        from. Models of one structure share one program; each shows it under its own names."""
        return self._named(self._current_program()[0])[1]

    def _named(self, program: Program) -> tuple[Plan, str]:
        """`program`'s (plan, source) under this model's node names (generated once per program)."""
        if program.cell is None or program.cell is self.cell:
            return program.plan, program.source
        named = self.__dict__.setdefault("_named_programs", {})
        if program.key not in named:
            named[program.key] = _as_named_by(self.cell, program)
        return named[program.key]

    def backend_for(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> str:
        """The backend a call with tensors of this dtype and device runs ("cpu", "triton" or
        "torch"; by default those of the parameters): "auto" picks per call, and a backend that
        cannot run a dtype or device (float16 on the CPU, say) runs the torch code instead."""
        return self._current_program(dtype, device)[0].backend

    def _current_program(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        """(program, dtype, device) of a call with tensors of this dtype and device (by default
        those of the parameters)."""
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (torch.float32, say), got {dtype!r}")
        p = next(iter(self.param_tensors().values()), None)
        dtype = dtype or (p.dtype if p is not None else torch.get_default_dtype())
        device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
        return self._program_for(dtype, device), dtype, device

    def _repr_svg_(self):  # Jupyter shows the compiled plan inline
        from .viz import svg_or_none
        return svg_or_none(self.plan().to_dot())

    def _program_for(self, dtype: torch.dtype, device: torch.device) -> Program:
        # "auto" picks per call: triton on CUDA, C kernels on the CPU (so .to("cuda") after
        # compiling just works). Triton kernels compute in float32 and need CUDA (or Triton's CPU
        # interpreter): float64, or CPU tensors without the interpreter, run the torch code. C
        # kernels compute float32 and float64 CPU tensors; others (meta ones too) run the torch
        # code, and so does everything under autocast, which picks each op's dtype where the
        # kernels have one.
        if "_missing_compiler" in self.__dict__:
            self._retry_backend()
        wanted = self._program.backend
        if self.backend == "auto":
            wanted = auto_backend(device, dtype)
        elif self.backend == "cpu" and (device.type != "cpu" or dtype not in _C_DTYPES):
            wanted = "torch"
        elif self.backend == "triton" and (dtype == torch.float64 or device.type not in ("cuda", "cpu") or (
                device.type == "cpu" and not triton_interpreting())):
            wanted = "torch"
        if wanted in ("cpu", "triton") and autocast_state(device)[1]:
            wanted = "torch"
        if wanted == self._program.backend:
            return self._program
        if self.backend == "auto":
            return _auto_program(self.cell, wanted, self.unroll)
        return get_program(self.cell, wanted, self.unroll)

    def _with_part_built(self, program: Program, dtype: torch.dtype, masked: bool) -> Program:
        """backend="auto" on the CPU: `program` with the C loops this call runs built (the
        masked ones, or those of a dtype not called before, are built by their first call), or
        the torch program where the C compiler fails on them, as where it fails as the program
        compiles. (Inside torch.compile the loops' op builds them when it runs.)"""
        loops = program.c_loops
        if loops is None or isinstance(loops, str):
            return program  # (the Python loops: their kernels were built with the program)
        part = (dtype, _c_launch.MASKED_LOOPS if masked else _c_launch.LOOPS)  # (imported: auto asked for the compiler)
        if part in loops.lib.paths:
            return program
        return _auto_program(self.cell, "cpu", self.unroll, part)

    def _run_sequence(self, xs, states0, contexts, noises, valid, dtype, device):
        outs, finals = self._run_loops(xs, states0, contexts, noises, valid, dtype, device)
        for k, o in enumerate(self.cell.outputs):
            if o.dtype == "long" and outs[k].is_floating_point():  # the loops write every output as a float
                outs[k] = token_output(o, self.cell, xs, contexts, valid, dtype, device)
            elif tuple(outs[k].shape[2:]) != o.shape:  # (a per-example matrix, written as flat rows)
                outs[k] = outs[k].reshape(outs[k].shape[:2] + o.shape)
        return outs, finals

    def _run_loops(self, xs, states0, contexts, noises, valid, dtype, device):
        if torch.jit.is_tracing():  # the tracer records tensor ops; the loops run generated code it cannot see
            raise NotImplementedError(
                "seqgraph: torch.jit.trace cannot record a compiled loop (its steps run generated code). Use "
                "torch.export or torch.compile (the loops are custom ops there, and T stays free). Tracing the "
                "uncompiled module records the example's T steps only.")
        params = list(self.param_tensors().values())
        if functorch_active() or forward_ad_active():
            # torch.func (grad, vmap) and forward-mode AD transform plain torch ops, not generated loops
            return Recurrence._reference_loop(self, xs, states0, contexts, noises, valid, dtype, device)
        program = self._program_for(dtype, device)
        if self.backend == "auto" and program.backend == "cpu" and not torch.compiler.is_compiling():
            program = self._with_part_built(program, dtype, valid is not None)
        order = longest_first(valid) if program.finals_owned else None  # (the C loops)
        if order is not None:
            return self._run_in_order(order, program, params, xs, states0, contexts, noises, valid, dtype, device)
        return self._run_program(program, params, xs, states0, contexts, noises, valid, dtype, device)

    def _run_in_order(self, order, program, params, xs, states0, contexts, noises, valid, dtype, device):
        """The loops run on the batch's rows in `order`, and the results come back in the
        caller's (index_select both ways: autograd takes the gradients back alike)."""
        B = order.numel()
        back = torch.empty_like(order)
        back[order] = torch.arange(B, device=order.device)
        xs = [x.index_select(1, order) for x in xs]
        states0 = [s.index_select(0, order) for s in states0]
        contexts = [c.index_select(0, order) for c in contexts]
        noises = [n.index_select(d, order) if n.shape[d] == B else n  # (eval mode's noise is one row)
                  for node, n in zip(self.cell.noises, noises) for d in [0 if node.attrs["per_sequence"] else 1]]
        outs, finals = self._run_program(program, params, xs, states0, contexts, noises, valid.index_select(1, order),
                                         dtype, device)
        return [o.index_select(1, back) for o in outs], [f.index_select(0, back) for f in finals]

    def _run_program(self, program, params, xs, states0, contexts, noises, valid, dtype, device):
        fns = program.fns
        T, B = xs[0].shape[0], xs[0].shape[1]
        step = program.plan.step
        assert len(params) == len(step.params)
        xs = list(xs)
        for x in step.inputs[len(xs):]:  # states holding earlier steps' inputs (see hoist_previous_inputs)
            xs.append(previous_inputs(xs[x.attrs["previous_of"]], states0[x.attrs["state"]], valid))
        reads = fns["prologue"](T, B, xs, list(contexts), list(noises), params, real_step_rows(valid), valid)
        need_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in list(reads) + list(states0) if isinstance(t, torch.Tensor))
        if need_grad and not program.plan.backward_ok(valid is not None):
            # the plan could not derive this backward: run the reference loop under autograd
            return Recurrence._reference_loop(self, xs, states0, contexts, noises, valid, dtype, device)
        # a state of more than one per-example dim is carried as its flat row (see
        # flatten_per_example_matrices): the loops take rows, the caller gets its shape back
        shapes = [s.shape for s in states0]
        states0 = [s.reshape((B,) + shape) if s.dim() != 1 + len(shape) else s
                   for s, shape in zip(states0, program.state_shapes)]
        if torch.compiler.is_compiling():  # one opaque op for the whole loop (see custom_ops.py)
            _, cast, cast_dtype = autocast_state(device)  # the op runs it (the tracer records none around it)
            res = program.loop_op(list(reads), list(states0), valid, T, B, need_grad, cast_dtype if cast else None)
            n, ns = len(step.outputs), len(step.states)
            outs, finals = list(res[:n]), list(res[n:n + ns])
        elif not need_grad:
            outs, finals, _ = _loop(program, "forward", device)(T, B, valid, reads, list(states0), False)
            finals = finals if program.finals_owned else own_storage(finals, outs)
        else:
            res = _Sequence.apply(program, T, B, valid, len(reads), *reads, *states0)
            n = len(step.outputs)
            outs, finals = list(res[:n]), list(res[n:])
        return outs, [f.reshape(shape) if f.shape != shape else f for f, shape in zip(finals, shapes)]

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, unroll={self.unroll}, " + super().extra_repr()


def compile(module: Cell | nn.Module, backend: str = "auto", unroll: int = 1) -> nn.Module:  # noqa: A001 - the library's verb
    """Compile a Cell, a Recurrence, or every Recurrence inside a module.

    Returns a module with the reference runtime's interface and results. For a container
    (sg.Stack, sg.nn.LSTM, your own nn.Module) each Recurrence inside is swapped in place for
    its compiled twin (sharing parameters) and the container is returned.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if isinstance(unroll, bool) or not isinstance(unroll, numbers.Integral) or unroll < 1:
        raise ValueError(f"unroll must be a positive int, got {unroll!r}")
    unroll = int(unroll)
    if isinstance(module, Cell):
        module = Recurrence(module)
    if isinstance(module, Recurrence):
        return _compile_one(module, backend, unroll)
    if not isinstance(module, nn.Module):
        raise TypeError(f"sg.compile takes an sg.Cell or a torch.nn.Module, got {type(module).__name__}")
    from .nn import _Owner
    found = False
    for sub in module.modules():
        if isinstance(sub, _Owner):  # sg.nn's layers and cells
            sub.use_backend(backend, unroll)
            found = True
    twins: dict[int, Recurrence] = {}  # one twin per Recurrence, however many places hold it
    for name, child in list(module.named_modules(remove_duplicate=False)):
        for cname, sub in list(child._modules.items()):  # every name, even one module under two names
            if isinstance(sub, Recurrence) and not any(sub is t for t in twins.values()):
                source = sub._source if isinstance(sub, CompiledRecurrence) else sub  # r and compile(r): one twin
                if id(source) not in twins:
                    twins[id(source)] = _compile_one(sub, backend, unroll)
                setattr(child, cname, twins[id(source)])
                found = True
    if not found:
        raise ValueError(f"{type(module).__name__} holds no sg.Recurrence to compile")
    return module


def _compile_one(rec: Recurrence, backend: str, unroll: int) -> Recurrence:
    if isinstance(rec, CompiledRecurrence):  # recompiling starts from the original (backend="reference": it)
        rec = rec._source
    if backend == "reference":
        return rec
    return CompiledRecurrence(rec, backend, unroll)
