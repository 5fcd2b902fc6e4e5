"""Whole time loops in C for the `cpu` backend: one C function per loop variant, no Python per step.

The generated Python loops (codegen_torch) pay the interpreter and the torch dispatcher a few
microseconds per op and step; at small sizes that is most of the time. Here each loop of a
plan (forward: masked or not, saving or not; backward: plain or masked) becomes one C function
`int sg_loop_<variant>(T, B, mask, P, D, own, threads)` in the program's CLibrary (the masked
variants in a part of it built by the first call that needs one): per step it runs a
GEMM for each `gemm` stage and the fused region's own C function for each `fused` stage. The
GEMM is MKL's (through function pointers found in libtorch_cpu, the weight packed once per
call for float32, as oneDNN's LSTM does) or, when `own` (float32, `cpu_gemm.per_step_gemm()`
chose it for this CPU), seqgraph's own sg_mm on a weight packed once per call. With several
threads, each may run the whole loop on rows of the batch of its own (`sg_split_rows`;
`loop_threads` decides per call). Each loop writes outputs, states and what backward saves
straight into their (T, B, ...) buffers. `P` holds one pointer per tensor slot and `D` three
strides per slot, so strided inputs work without copies. States and gradients carried to the
next step live in double buffers. A masked loop skips, at each step, the rows at the end of the
batch (or of its thread's rows) that are padding there, and `sg_tail` fills their rows. A
thin generated Python wrapper per loop (`forward_c`, `backward_*_c`) allocates the buffers
exactly as the Python loops do and runs the same pre- and post-loop code, so the weight
gradients stay single large GEMMs after the loop.

Plans with a stage no C code covers (a torch fallback, a matmul of per-example matrices), or
without MKL's GEMM symbols, keep the Python loops; `loops_refusal` says why. Must not make
planning decisions and must not change what a loop computes.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from ..compiler.codegen_torch import Source, Store, all_saved, shape_tuple
from ..compiler.codegen_torch_backward import backward_layout, emit_backward_head, emit_backward_tail, summed_stash
from ..compiler.ir import Node
from ..compiler.plan import Plan
from ..settings import env
from .backend import _stage_region
from .c_codegen import c_region_supported
from .codegen import width
from .cpu_gemm import per_step_gemm

STEP_ROWS, ROWS = 1, 0  # the dim that steps one batch row in a (T, B, ...) and a (B, ...) tensor slot


@dataclass
class _Loc:
    """Where one value of the step lives: a pointer expression, its row and column strides."""
    ptr: str
    rs: str
    cs: str


class _LoopWriter:
    """One loop variant as C: tensor slots (P, D), per-node workspace buffers, the step body."""

    def __init__(self, lib, func_name: str, title: str):
        self.lib, self.func_name, self.title = lib, func_name, title
        self.slots: list[str] = []  # labels, index = slot number
        self.rows_dims: list[int] = []  # per slot: the dim that steps one batch row, -1 for none
        self.ws = 0  # workspace columns per batch row
        self.decl: list[str] = []  # before the loop
        self.body: list[str] = []  # per step, on the step's first Bt rows (see write)
        self.tail: list[str] = []  # per step, for the rows from Bt on: carry or zero what the step stores
        self.advance: list[str] = []  # per step, last: the carried values move to the step's results
        self.after: list[str] = []  # after the loop
        self.loc: dict[int, _Loc] = {}
        self.weights: dict[int, str] = {}  # weight node id -> sg_weight variable
        self.ncalls = {"gemm": 0, "region": 0}

    def slot(self, label: str, rows: int | None) -> int:
        """A tensor slot; `rows` is the dim whose stride steps one batch row (STEP_ROWS for a
        (T, B, ...) tensor, ROWS for (B, ...), None for a tensor without a batch dim)."""
        self.slots.append(label)
        self.rows_dims.append(-1 if rows is None else rows)
        i = len(self.slots) - 1
        self.decl.append(f"real* p{i} = (real*)P[{i}]; const int64_t* d{i} = D + {3 * i};  /* {label} */")
        return i

    def buffer(self, w: int, label: str) -> str:
        off = self.ws
        self.ws += max(1, w)
        return f"(ws + B * {off})"

    @staticmethod
    def step_loc(i: int, n: Node, t: str = "t") -> _Loc:  # a (T, B, ...) slot at step t
        return _Loc(f"p{i} + ({t}) * d{i}[0]", f"d{i}[1]", f"d{i}[2]" if width(n) > 1 else "1")

    @staticmethod
    def outer_loc(i: int, n: Node) -> _Loc:  # a slot without a time dim
        if n.batched:
            return _Loc(f"p{i}", f"d{i}[0]", f"d{i}[1]" if width(n) > 1 else "1")
        if len(n.shape) == 2:
            return _Loc(f"p{i}", f"d{i}[0]", f"d{i}[1]")
        return _Loc(f"p{i}", "0", f"d{i}[0]" if width(n) > 1 else "1")

    # -- the stages of one step ---------------------------------------------------------
    def gemm(self, n: Node, stores: list[Store]) -> str | None:
        x, w = n.inputs
        if n.op != "linear" or not (x.batched and len(x.shape) == 1 and not w.batched and len(w.shape) == 2):
            return f"{n.op} %{n.id} is not a product of rows and a weight matrix"
        if x.id not in self.loc or w.id not in self.loc:
            return f"%{n.id} reads a value the C loop does not have"
        if w.id not in self.weights:
            g = self.weights[w.id] = f"W{len(self.weights)}"  # not the node id: the text must not depend on it
            lw = self.loc[w.id]
            N, K = w.shape
            self.decl.append(f"if (sg_weight_init(&{g}, B, {N}, {K}, {lw.ptr}, {lw.rs}, {lw.cs}, own, T)) "
                             f"{{ rc = 1; goto done; }}  /* the weight %{w.id} */")
        lx = self.loc[x.id]
        plain = next((st for st in stores if st.node.id == n.id and st.mode == "plain" and not st.done), None)
        if plain is not None:  # the product goes straight into the buffer it is stored in
            plain.done = True
        out = plain.target if plain is not None else self.buffer(width(n), f"%{n.id}")
        scratch = self.buffer(width(x), f"scratch of %{n.id}")
        self.body.append(f"sg_linear(Bt, &{self.weights[w.id]}, {lx.ptr}, {lx.rs}, {lx.cs}, {out}, {scratch});"
                         f"  /* %{n.id} linear{' ' + repr(n.name) if n.name else ''} */")
        self.loc[n.id] = _Loc(out, str(width(n)), "1")
        self.ncalls["gemm"] += 1
        return None

    def region(self, stage, live: set[int], stores: list[Store]) -> str | None:
        wiring = _stage_region(stage, live, stores)
        if wiring is None:
            return None
        region, _, primary, targets, mine, _, _ = wiring
        ok, why = c_region_supported(region)
        if not ok:
            return why
        kernel = self.lib.add(region)
        args = []
        for node, spec in zip(region.inputs, kernel.gen.inputs):
            if spec.kind == "const":
                continue
            if node.id not in self.loc:
                return f"the region reads %{node.id} {node.op}, which the C loop does not have"
            lc = self.loc[node.id]
            args += [lc.ptr, lc.rs, lc.cs] if spec.kind == "rows" else [lc.ptr, lc.cs] if spec.kind == "vector" \
                else [lc.ptr, "1"]
        for k, o in enumerate(region.outputs):
            buf = targets[k] or self.buffer(width(o), f"%{o.id}")
            args.append(buf)
            if k < len(primary):
                self.loc[o.id] = _Loc(buf, str(width(o)), "1")
        args += ["mt", "1"] if kernel.gen.masked else ["0", "0"]
        ops_used = ", ".join(n.op for n in stage.nodes)
        # on this thread's rows when the loop split the batch over threads, else over the
        # threads itself
        f, a = kernel.gen.func_name, ", ".join(args)
        self.body.append(f"if (split ? {f}_rows(0, Bt, Bt, {a}) : {f}(Bt, {a})) {{ rc = 1; goto done; }}  /* {ops_used} */")
        for st in mine:
            st.done = True
        self.ncalls["region"] += 1
        return None

    def store(self, st: Store) -> str | None:
        if st.node.op == "const" or st.node.id not in self.loc or (st.prev is not None and st.prev.id not in self.loc):
            return f"a store of %{st.node.id} {st.node.op} reads a value the C loop does not have"
        s = self.loc[st.node.id]
        mode = {"plain": 0, "zero": 1, "carry": 2}[st.mode]
        p = self.loc[st.prev.id] if st.prev is not None else _Loc("0", "0", "0")
        self.body.append(f"sg_store(Bt, {width(st.node)}, {s.ptr}, {s.rs}, {s.cs}, {st.target}, {mode}, "
                         f"{p.ptr}, {p.rs}, {p.cs}, {'mt' if mode else '0'});  /* %{st.node.id} {st.mode} */")
        return None

    def fill_tail(self, target: str, node: Node, prev: Node | None = None) -> None:
        """Rows from Bt on skip the step; what the step stores for them is what a padded row
        stores: `prev`'s row (a carried state, or the state gradient passing through) or zero
        (outputs, saved values and gradients, so the sums over rows after the loop stay finite)."""
        if prev is None:
            self.tail.append(f"sg_tail(Bt, B, {width(node)}, {target}, 0, 0, 0);  /* %{node.id}: zero */")
        else:
            p = self.loc[prev.id]
            self.tail.append(f"sg_tail(Bt, B, {width(node)}, {target}, {p.ptr}, {p.rs}, {p.cs});"
                             f"  /* %{node.id}: %{prev.id}'s rows */")

    def stages(self, stages, live: set[int], stores: list[Store]) -> str | None:
        for s in stages:
            if s.kind == "gemm":
                for n in s.nodes:
                    why = self.gemm(n, stores)
                    if why:
                        return why
            elif s.kind == "fused":
                why = self.region(s, live, stores)
                if why:
                    return f"a fused stage cannot be compiled to C: {why}"
            else:
                return f"a stage runs as torch code ({s.why})"
        for st in stores:
            if not st.done:
                why = self.store(st)
                if why:
                    return why
        return None

    def write(self, reverse: bool) -> str:
        loop = "for (int64_t t = T - 1; t >= 0; --t) {" if reverse else "for (int64_t t = 0; t < T; ++t) {"
        rows_fn = f"{self.func_name}_rows"
        lines = [f"/* {self.title}, over B rows of the batch: per step {self.ncalls['gemm']} GEMM(s) and "
                 f"{self.ncalls['region']} fused region(s), nothing else; the mask of step t is at mask + t * mts */",
                 f"static int {rows_fn}(int64_t T, int64_t B, const unsigned char* mask, int64_t mts, void** P, "
                 "const int64_t* D, int64_t own, int split) {",
                 "    int rc = 0;"]
        # zeroed before anything can fail, so `done` frees each of them whatever happened
        lines += [f"    sg_weight {g} = {{0}};" for g in self.weights.values()]
        lines += [f"    real* ws = (real*)malloc(sizeof(real) * (size_t)(B * {max(1, self.ws)}));",
                  "    if (ws == 0) { rc = 1; goto done; }"]
        lines += ["    " + ln for ln in self.decl]
        lines.append("    " + loop)
        lines.append("        const unsigned char* mt = mask != 0 ? mask + t * mts : 0; (void)mt;")
        # rows from Bt on are padding at this step (a batch sorted by length ends in such rows):
        # the step's products and regions skip them, and sg_tail gives them a padded row's values
        lines.append("        int64_t Bt = B;")
        lines.append("        if (mt != 0) while (Bt > 0 && mt[Bt - 1] == 0) --Bt;")
        lines.append("        if (Bt > 0) {")
        lines += ["            " + ln for ln in self.body]
        lines.append("        }")
        if self.tail:
            lines.append("        if (Bt < B) {")
            lines += ["            " + ln for ln in self.tail]
            lines.append("        }")
        lines += ["        " + ln for ln in self.advance]
        lines.append("    }")
        lines += ["    " + ln for ln in self.after]
        lines.append("done:")
        lines += [f"    sg_weight_free(&{g});" for g in self.weights.values()]
        lines += ["    free(ws);", "    return rc;", "}"]
        n = len(self.slots)
        lines += [f"/* {self.title}: the whole batch, or its rows split over `threads` threads that each run every "
                  "step on their own rows */",
                  f"int {self.func_name}(int64_t T, int64_t B, const unsigned char* mask, void** P, const int64_t* D, "
                  "int64_t own, int64_t threads) {",
                  f"    static const signed char rows_dim[{max(1, n)}] = {{{', '.join(map(str, self.rows_dims)) or '-1'}}};",
                  f"    return sg_split_rows({rows_fn}, T, B, mask, P, D, own, threads, rows_dim, {n});",
                  "}"]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# the loops of one plan
# ---------------------------------------------------------------------------------------
def _bind_reads(wr: _LoopWriter, plan: Plan) -> str | None:
    for k, r in enumerate(plan.reads):
        if r.dtype != "float":
            return f"the loop reads %{r.id} {r.op}, which is not a float"
        if len(r.shape) > 1 and not (not r.batched and len(r.shape) == 2):
            return f"the loop reads %{r.id} {r.op} of per-example shape {r.shape}"
        hoisted = plan.cls[r.id] == "hoisted"
        i = wr.slot(f"read r{k}: %{r.id} {r.op}", STEP_ROWS if hoisted else ROWS if r.batched else None)
        wr.loc[r.id] = wr.step_loc(i, r) if hoisted else wr.outer_loc(i, r)
    return None


def _carried(wr: _LoopWriter, var: str, i: int, n: Node) -> None:
    """A value carried from step to step in `var` (pointer and strides), starting at slot i."""
    wr.decl.append(f"real* {var} = p{i}; int64_t {var}_rs = d{i}[0], {var}_cs = "
                   f"{f'd{i}[1]' if width(n) > 1 else '1'};")
    wr.loc[n.id] = _Loc(var, f"{var}_rs", f"{var}_cs")


def _double_buffer(wr: _LoopWriter, n: Node, label: str) -> str:
    w = width(n)
    base = wr.buffer(2 * w, label)
    return f"({base} + (t & 1) * B * {w})"


def _multi_dim(plan: Plan) -> str | None:
    """The C loops see every per-step value as rows of columns: a state, output or saved value
    with a per-example matrix shape would need the strides of each of its dims."""
    for n in [p for p, _ in plan.step.states] + list(plan.step.outputs) + all_saved(plan):
        if len(n.shape) > 1:
            return f"%{n.id} {n.op}{' ' + repr(n.name) if n.name else ''} has per-example shape {n.shape}"
    return None


def forward_loop(plan: Plan, lib, masked: bool, save: bool, func_name: str) -> tuple[str | None, str]:
    """(C source of one forward variant, "") or (None, why it cannot be written)."""
    step = plan.step
    why = _multi_dim(plan)
    if why:
        return None, why
    title = f"forward loop{', masked' if masked else ''}{', saving for backward' if save else ''}"
    wr = _LoopWriter(lib, func_name, title)
    why = _bind_reads(wr, plan)
    if why:
        return None, why
    for j, (p, _) in enumerate(step.states):
        _carried(wr, f"sp{j}", wr.slot(f"initial state {j}: %{p.id}", ROWS), p)
    outs = [wr.slot(f"output {k}: %{o.id}", STEP_ROWS) for k, o in enumerate(step.outputs)]
    fins = [wr.slot(f"final state {j}", ROWS) for j in range(len(step.states))]
    saved = all_saved(plan) if save else []
    svs = [wr.slot(f"saved sv{k}: %{n.id}", STEP_ROWS) for k, n in enumerate(saved)]
    sss = [wr.slot(f"state sequence ss{j}", STEP_ROWS) for j in range(len(step.states))] if save else []
    stores = [Store(o, f"(p{outs[k]} + t * d{outs[k]}[0])", "zero" if masked else "plain")
              for k, o in enumerate(step.outputs)]
    nexts = []
    for j, (p, q) in enumerate(step.states):
        target = f"(p{sss[j]} + (t + 1) * d{sss[j]}[0])" if save else _double_buffer(wr, q, f"state {j}")
        nexts.append(target)
        stores.append(Store(q, target, "carry" if masked else "plain", prev=p))
    stores += [Store(n, f"(p{svs[k]} + t * d{svs[k]}[0])") for k, n in enumerate(saved)]
    live = {n.id for n in step.results} | {n.id for n in saved}
    why = wr.stages(plan.stages, live, stores)
    if why:
        return None, why
    if masked:
        for st in stores:
            wr.fill_tail(st.target, st.node, st.prev)
    for j, (p, _) in enumerate(step.states):
        wr.advance.append(f"sp{j} = {nexts[j]}; sp{j}_rs = {width(p)}; sp{j}_cs = 1;")
        wr.after.append(f"sg_store(B, {width(p)}, sp{j}, sp{j}_rs, sp{j}_cs, p{fins[j]}, 0, 0, 0, 0, 0);")
    return wr.write(reverse=False), ""


def backward_loop(plan: Plan, bwd, lib, masked: bool, func_name: str) -> tuple[str | None, str]:
    """(C source of one backward variant, "") or (None, why it cannot be written)."""
    step, d = plan.step, bwd.deriv
    lay = backward_layout(plan, bwd)
    wr = _LoopWriter(lib, func_name, f"backward loop{', masked' if masked else ''}")
    why = _multi_dim(plan) or _bind_reads(wr, plan)
    if why:
        return None, why
    for n in backward_outer(bwd):
        wr.loc[n.id] = wr.outer_loc(wr.slot(f"before the loop: %{n.id} {n.op}", ROWS if n.batched else None), n)
    for k, n in enumerate(lay.saved_all):
        wr.loc[n.id] = wr.step_loc(wr.slot(f"saved sv{k}: %{n.id}", STEP_ROWS), n)
    for j, (p, _) in enumerate(step.states):
        wr.loc[p.id] = wr.step_loc(wr.slot(f"state sequence ss{j}", STEP_ROWS), p)
    for k, g in enumerate(d.grad_out):
        wr.loc[g.id] = wr.step_loc(wr.slot(f"output gradient go{k}", STEP_ROWS), g)
    for j, g in enumerate(d.grad_next):
        _carried(wr, f"gp{j}", wr.slot(f"final-state gradient gn{j}", ROWS), g)
    drs = {k: wr.slot(f"read gradient dr{k}", STEP_ROWS) for k, _ in lay.hoisted_grads}
    drs.update({k: wr.slot(f"summed read gradient dr{k}", ROWS) for k, _ in lay.accum})
    summed = summed_stash(bwd, lay)
    sts = [wr.slot(f"summed stash st{k}: %{n.id}" if n.id in summed else f"stash st{k}: %{n.id}",
                   ROWS if n.id in summed else STEP_ROWS) for k, n in enumerate(lay.new_stash)]
    sums = {}  # stash k -> the step's scratch row block it is written to, then added into st{k}
    for k, n in enumerate(lay.new_stash):
        if n.id in summed:
            sums[k] = wr.buffer(width(n), f"stash {k} of this step")
    gfs = [wr.slot(f"initial-state gradient {j}", ROWS) for j in range(len(step.states))]
    if masked:
        i = wr.slot("the mask as floats", STEP_ROWS)
        wr.loc[d.mask.id] = _Loc(f"p{i} + t * d{i}[0]", f"d{i}[1]", "1")
    stores = [Store(g, f"(p{drs[k]} + t * d{drs[k]}[0])") for k, g in lay.hoisted_grads]
    stores += [Store(n, sums[k] if k in sums else f"(p{sts[k]} + t * d{sts[k]}[0])")
               for k, n in enumerate(lay.new_stash)]
    nexts, passes = [], {}
    for j, g in enumerate(d.grad_prev):
        w = width(step.states[j][0])
        if g is None:  # no gradient reaches the previous state: it is zero
            z = wr.buffer(w, f"zero gradient {j}")
            wr.decl.append(f"memset({z}, 0, sizeof(real) * (size_t)(B * {w}));")
            nexts.append(z)
            continue
        target = _double_buffer(wr, g, f"state gradient {j}")
        nexts.append(target)
        stores.append(Store(g, target))
        passes[len(stores) - 1] = d.grad_next[j]  # on a padded row the gradient passes through
    live = {n.id for n in lay.new_stash} | {g.id for g in d.grad_prev if g is not None} \
        | {g.id for g in d.grad_of.values()} | {i.id for n in bwd.post for i in n.inputs}
    why = wr.stages(bwd.stages, live, stores)
    if why:
        return None, why
    for k, g in lay.accum:
        if not g.batched or g.id not in wr.loc:
            return None, f"the summed gradient %{g.id} is not a batched value of the loop"
        s, a = wr.loc[g.id], drs[k]
        wr.body.append(f"sg_accum(Bt, {width(g)}, p{a}, d{a}[0], {f'd{a}[1]' if width(g) > 1 else '1'}, "
                       f"{s.ptr}, {s.rs}, {s.cs});  /* dr{k} += %{g.id} */")
    for k, buf in sums.items():  # a padded row adds nothing (the reference never computes it)
        w, n = width(lay.new_stash[k]), lay.new_stash[k]
        wr.body.append(f"sg_accum_real(Bt, {w}, p{sts[k]}, d{sts[k]}[0], {buf}, {w}, mt);  /* st{k} += %{n.id} */"
                       if masked else f"sg_accum(Bt, {w}, p{sts[k]}, d{sts[k]}[0], 1, {buf}, {w}, 1);  /* st{k} += %{n.id} */")
    if masked:
        for k, st in enumerate(stores):
            wr.fill_tail(st.target, st.node, passes.get(k))
    for j, (p, _) in enumerate(step.states):
        wr.advance.append(f"gp{j} = {nexts[j]}; gp{j}_rs = {width(p)}; gp{j}_cs = 1;")
        wr.after.append(f"sg_store(B, {width(p)}, gp{j}, gp{j}_rs, gp{j}_cs, p{gfs[j]}, 0, 0, 0, 0, 0);")
    return wr.write(reverse=True), ""


def backward_outer(bwd) -> list[Node]:
    """The values computed before the backward loop (bwd.pre) that the loop reads."""
    pre = {n.id for n in bwd.pre}
    outer: dict[int, Node] = {}
    for n in bwd.loop:
        for i in n.inputs:
            if i.id in pre:
                outer.setdefault(i.id, i)
    return list(outer.values())


# ---------------------------------------------------------------------------------------
# the Python side: wrappers in the generated module, and the runtime that calls C
# ---------------------------------------------------------------------------------------
FORWARD_VARIANTS = {(False, False): "fwd", (True, False): "fwd_masked", (False, True): "fwd_save",
                    (True, True): "fwd_save_masked"}


class CLoops:
    """The loop functions of one program: `run(variant, T, B, mask, tensors)` calls one."""

    def __init__(self, lib):
        self.lib = lib
        self.func_names: dict[str, str] = {}  # variant -> C function
        self.calls = 0  # loops run in C (tests count them)
        self.last_threads = 0  # the threads the last call asked for (1: one loop over the whole batch)
        self.step_weight_elems = 0  # elements of the weights one step's products read
        self._strides: dict[tuple, ctypes.Array] = {}  # the tensors' strides -> the `D` array of a call

    def run(self, variant: str, T: int, B: int, mask: torch.Tensor | None, tensors: list[torch.Tensor]) -> None:
        name = self.func_names[variant]
        fn = self.lib.loop_fn(name, tensors[0].dtype)
        n = len(tensors)
        ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors])
        strides = self._strides_array(tuple([t.stride() for t in tensors]))
        m = mask.contiguous() if mask is not None else None
        own = int(tensors[0].dtype == torch.float32 and per_step_gemm() == "seqgraph")
        if own:
            self.lib.bind_own_gemm(tensors[0].dtype, self.lib.loop_parts[name])
        threads = loop_threads(B, self.step_weight_elems * tensors[0].element_size())
        if fn(T, B, m.data_ptr() if m is not None else None, ptrs, strides, own, threads):
            raise MemoryError(f"the C loop {variant} of {self.lib.name!r} could not allocate its workspace")
        self.calls += 1
        self.last_threads = threads

    STRIDE_ARRAYS_KEPT = 64  # layouts remembered (T and B set the strides of fresh buffers: one per shape)

    def _strides_array(self, strides: tuple[tuple[int, ...], ...]) -> ctypes.Array:
        """`D` for tensors of these strides: three per tensor (zeros past its rank), built once
        per layout. A call one step at a time sees the same layout every call, and building
        the ctypes array took longer than the step's C loop. The C side only reads it, so
        threads may share one."""
        arr = self._strides.get(strides)
        if arr is None:
            if len(self._strides) >= self.STRIDE_ARRAYS_KEPT:
                self._strides.clear()
            flat = [s for st in strides for s in (st + (0, 0, 0))[:3]]
            arr = self._strides[strides] = (ctypes.c_int64 * len(flat))(*flat)
        return arr


def loops_refusal(plan: Plan) -> str | None:
    """Why the plan's loops cannot run as C functions, or None when they can."""
    from .c_launch import CLibrary
    lib = CLibrary()
    return _generate(plan, lib, CLoops(lib))


def _generate(plan: Plan, lib, loops: CLoops) -> str | None:
    """Write every loop variant into `lib` and name them in `loops`; or say why not, leaving
    `lib` as it was."""
    if blas_pointers(torch.float32) is None or blas_pointers(torch.float64) is None:
        return "no BLAS with sgemm_ and dgemm_ was found in libtorch_cpu"
    kept = len(lib.kernels)
    sources = []
    for variant, (src, why) in _variants(plan, lib):
        if src is None:
            lib.drop_kernels(kept)  # the regions written for loops that will not exist
            return f"{variant}: {why}"
        sources.append((variant, src))
    for variant, src in sources:
        lib.add_loop(f"sg_loop_{variant}", src, masked="masked" in variant)
        loops.func_names[variant] = f"sg_loop_{variant}"
    loops.step_weight_elems = sum(n.inputs[1].shape[0] * n.inputs[1].shape[1]
                                  for s in plan.stages if s.kind == "gemm" for n in s.nodes)
    return None


LOOP_SPLITS = ("auto", "rows", "steps")
ROW_SPLIT_MIN_ROWS = 4  # rows per thread, at least
ROW_SPLIT_MAX_WEIGHT_BYTES = 1 << 20  # the weights one step reads, at most (measured: below)


def loop_threads(B: int, weight_bytes: int) -> int:
    """How many threads run a loop each on rows of its own (sg_split_rows), or 1 for one loop
    over the whole batch whose products and regions split each call over the threads.

    Rows of their own save two thread wake-ups per step and run the work between them in
    parallel too, but every thread then reads every weight every step: worth it while the
    weights of a step stay in a core's cache. On the 2-core Xeon an LSTM's fwd+bwd at T=50
    took, own rows against split calls: H=128 B=8..32 0.89-0.91x, H=256 B=8..16 0.90-0.93x,
    B=64 1.00x; H=512 (4 MB of weights) B=8..64 1.02-1.37x. $SEQGRAPH_LOOP_SPLIT ("rows" or
    "steps") overrides the choice."""
    mode = env("SEQGRAPH_LOOP_SPLIT", "auto").strip().lower() or "auto"
    if mode not in LOOP_SPLITS:
        raise ValueError(f"SEQGRAPH_LOOP_SPLIT must be one of {', '.join(LOOP_SPLITS)}, got {mode!r}")
    n = torch.get_num_threads()
    if mode == "steps" or n <= 1:
        return 1
    if mode == "rows":
        return max(1, min(n, B))
    if weight_bytes > ROW_SPLIT_MAX_WEIGHT_BYTES:
        return 1
    return max(1, min(n, B // ROW_SPLIT_MIN_ROWS))


def _variants(plan: Plan, lib):
    """(variant, (source or None, why)) for each loop, written one at a time."""
    for (masked, save), variant in FORWARD_VARIANTS.items():
        yield variant, forward_loop(plan, lib, masked, save, f"sg_loop_{variant}")
    for masked in (False, True):
        if plan.backward_ok(masked):
            variant = "bwd_masked" if masked else "bwd_plain"
            yield variant, backward_loop(plan, plan.backward_plan(masked), lib, masked, f"sg_loop_{variant}")


def emit_c_loops(src: Source, plan: Plan) -> CLoops | str:
    """Add the C loops to the program's CLibrary and their Python wrappers (`forward_c`,
    `backward_plain_c`, `backward_masked_c`) to `src`; returns the CLoops, or why not."""
    from .c_launch import CLibrary
    lib = src.globals.get("_clib") or CLibrary()
    loops = CLoops(lib)
    why = _generate(plan, lib, loops)
    if why:
        return why
    src.globals["_clib"] = lib
    src.globals["_cloops"] = loops
    _emit_forward_wrapper(src, plan)
    for masked in (False, True):
        if plan.backward_ok(masked):
            _emit_backward_wrapper(src, plan, plan.backward_plan(masked), masked)
    return loops


def _emit_forward_wrapper(src: Source, plan: Plan) -> None:
    step = plan.step
    nr, ns, no = len(plan.reads), len(step.states), len(step.outputs)
    saved = all_saved(plan)
    src.emit("")
    src.emit("def forward_c(T, B, mask, reads, states, save):")
    src.indent += 1
    src.emit('"""`forward` as one C function per variant (sg_loop_fwd* in the C source)."""')
    src.emit("if B == 0:")
    src.emit("    return forward(T, B, mask, reads, states, save)")
    if nr:
        src.emit(f"{', '.join(f'r{k}' for k in range(nr))}, = reads")
    src.emit(f"{', '.join(f's{j}' for j in range(ns))}, = states" if ns else "pass")
    floats = [k for k, r in enumerate(plan.reads) if r.dtype == "float"]
    ref = "s0" if ns else f"r{floats[0]}"
    for k, o in enumerate(step.outputs):
        src.emit(f"out{k} = {ref}.new_empty({shape_tuple(o, 'T, B')})")
    for j, (p, _) in enumerate(step.states):
        src.emit(f"fin{j} = {ref}.new_empty({shape_tuple(p, 'B')})")
    base = [f"r{k}" for k in range(nr)] + [f"s{j}" for j in range(ns)] + [f"out{k}" for k in range(no)] \
        + [f"fin{j}" for j in range(ns)]
    outs, fins = ", ".join(f"out{k}" for k in range(no)), ", ".join(f"fin{j}" for j in range(ns))
    src.emit("if save:")
    src.indent += 1
    for k, n in enumerate(saved):
        src.emit(f"sv{k} = _empty({ref}, {shape_tuple(n, 'T, B')})", n)
    for j, (p, _) in enumerate(step.states):
        src.emit(f"ss{j} = _empty({ref}, {shape_tuple(p, 'T + 1, B')}); ss{j}[0] = s{j}")
    tensors = base + [f"sv{k}" for k in range(len(saved))] + [f"ss{j}" for j in range(ns)]
    src.emit(f"_cloops.run('fwd_save_masked' if mask is not None else 'fwd_save', T, B, mask, [{', '.join(tensors)}])")
    src.emit(f"return [{outs}], [{fins}], ([{', '.join(f'sv{k}' for k in range(len(saved)))}], "
             f"[{', '.join(f'ss{j}' for j in range(ns))}])")
    src.indent -= 1
    src.emit(f"_cloops.run('fwd_masked' if mask is not None else 'fwd', T, B, mask, [{', '.join(base)}])")
    src.emit(f"return [{outs}], [{fins}], None")
    src.indent -= 1


def _emit_backward_wrapper(src: Source, plan: Plan, bwd, masked: bool) -> None:
    step = plan.step
    nr, ns, no = len(plan.reads), len(step.states), len(step.outputs)
    name = "backward_masked" if masked else "backward_plain"
    src.emit("")
    summed = summed_stash(bwd, backward_layout(plan, bwd))
    lay = emit_backward_head(src, plan, bwd, masked, suffix="_c", summed=summed)
    src.emit("if B == 0:")
    src.emit(f"    return {name}(T, mask, reads, saved, seqs, grad_outs, grad_finals)")
    ref = "ss0" if ns else "go0"
    drs = [k for k, _ in lay.hoisted_grads + lay.accum]
    for k in drs:
        src.emit(f"dr{k} = dr{k}.contiguous()")
    for j, (p, _) in enumerate(step.states):
        src.emit(f"gf{j} = {ref}.new_empty({shape_tuple(p, 'B')})")
    tensors = [f"r{k}" for k in range(nr)] + [f"v{n.id}" for n in backward_outer(bwd)] \
        + [f"sv{k}" for k in range(len(lay.saved_all))] + [f"ss{j}" for j in range(ns)] \
        + [f"go{k}" for k in range(no)] + [f"gn{j}" for j in range(ns)] + [f"dr{k}" for k in drs] \
        + [f"st{k}" for k in range(len(lay.new_stash))] + [f"gf{j}" for j in range(ns)]
    if masked:
        src.emit(f"fm = mask.to({ref}.dtype)")
        tensors.append("fm")
    src.emit(f"_cloops.run({'bwd_masked' if masked else 'bwd_plain'!r}, T, B, mask, [{', '.join(tensors)}])")
    for j in range(ns):
        src.emit(f"gn{j} = gf{j}")
    emit_backward_tail(src, plan, bwd, lay, summed)


_BLAS: dict = {}

def blas_pointers(dtype: torch.dtype) -> tuple | None:
    """(gemm, pack_size, pack, compute) addresses in the BLAS torch links (MKL), or None."""
    if dtype in _BLAS:
        return _BLAS[dtype]
    found = None
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(lib_dir, name)
        if not os.path.exists(path):
            continue
        lib = ctypes.CDLL(path)

        def addr(sym):
            f = getattr(lib, sym, None)
            return ctypes.cast(f, ctypes.c_void_p).value if f is not None else None
        gemm = addr("sgemm_" if dtype == torch.float32 else "dgemm_")
        if gemm is not None:
            packed = [addr(s) for s in ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute")]
            if dtype != torch.float32 or None in packed:
                packed = [None, None, None]
            found = (gemm, *packed)
        break
    _BLAS[dtype] = found
    return found


__all__ = ["CLoops", "emit_c_loops", "loops_refusal", "loop_threads", "blas_pointers", "forward_loop",
           "backward_loop"]
