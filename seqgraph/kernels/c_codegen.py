"""C source for one fused Region: the kernels of the `cpu` backend.

Each region becomes one C function that walks the batch row by row. Within a row every value
is an array of its columns (the per-example shape flattened): region inputs are read in place
through their row pointers, computed values live in a scratch array on the stack, a slice is a
pointer into its operand (no copy), a reshape or a broadcast from one column is the same
pointer, a pad writes its pieces at their offsets, and a concat of values computed in the row
has them computed straight into its array (into the output's row when it is stored as it is).
Elementwise ops are one loop over the columns each (`for j < w: v[j] = <expr>`), written from
the op registry's C emitters and vectorised by the C compiler; row reductions (sum, mean,
softmax, layer_norm) use the registry's statement emitters. A loop over a per-example (M, N)
matrix walks its rows and columns, computes spreads of vectors over it (outer, tile,
repeat_each) as values, and adds up the sums of what it computes (matvec, vecmat, ...) as it
goes (ops.GridRule), so the matrix needs no array of its own. Stores come last, row by row: `if
(keep)` the value, else the carried input or zero (masking folded in, as in the Triton
kernels), so a padded row costs one branch. The C type `real` is float or double: one source
serves both, compiled twice.

The transcendental functions are written out (`sg_exp`, `sg_sigmoid`, `sg_tanh` in PRELUDE) so
that the compiler can vectorise them without -ffast-math: within 3 ulp of the correctly
rounded result over the whole range (inf, nan and denormals included), in float and double.
This module only writes source text and says what it cannot fuse; compiling, caching and
calling are c_launch.py's job.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..compiler import ops
from ..compiler.ir import Node
from .codegen import ArgSpec, region_problem, width
from .region import Region

C_CODEGEN_VERSION = 1  # bump when generated kernels change meaning: it is part of the cache key

PARALLEL_WORK = 16384  # element operations per call (some 5 us on one core) before rows go to threads
_STACK_LIMIT = 64 * 1024  # scratch elements kept on the stack; wider regions allocate once per call

PRELUDE = r"""/* seqgraph generated C kernels; read them with model.source() */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef SG_DOUBLE
typedef double real;
#define SG_LOG log
#define SG_SQRT sqrt
#define SG_ABS fabs
/* exp(r) - 1 and 2^n for x = n ln2 + r, |r| <= ln2/2 (Cody-Waite, ln2's high part exact in
   n * hi): the degree-13 Taylor polynomial is within 1e-17 there. 2^n comes in two factors so
   that denormal results and overflow to inf come out right. Branch free: loops vectorise. */
static inline double sg_expm1_parts(double x, double* s1, double* s2, double* n_out) {
    double n = floor(x * 1.4426950408889634 + 0.5);
    double r = x - n * 6.93147180369123816490e-01;
    r = r - n * 1.90821492927058770002e-10;
    double p = 1.6059043836821613e-10;  /* 1/13! */
    p = p * r + 2.08767569878681e-09;  /* 1/12! */
    p = p * r + 2.505210838544172e-08;  /* 1/11! */
    p = p * r + 2.755731922398589e-07;  /* 1/10! */
    p = p * r + 2.7557319223985893e-06;  /* 1/9! */
    p = p * r + 2.48015873015873e-05;  /* 1/8! */
    p = p * r + 0.0001984126984126984;  /* 1/7! */
    p = p * r + 0.001388888888888889;  /* 1/6! */
    p = p * r + 0.008333333333333333;  /* 1/5! */
    p = p * r + 0.041666666666666664;  /* 1/4! */
    p = p * r + 0.16666666666666666;  /* 1/3! */
    p = p * r + 0.5;
    int64_t k = (int64_t)n;
    int64_t k1 = k >> 1, k2 = k - (k >> 1);
    int64_t b1 = (k1 + 1023) << 52, b2 = (k2 + 1023) << 52;
    memcpy(s1, &b1, 8);
    memcpy(s2, &b2, 8);
    *n_out = n;
    return p * r * r + r;
}
static inline double sg_exp(double x) {
    double xc = x < -746.0 ? -746.0 : (x > 710.0 ? 710.0 : x);
    double s1, s2, n;
    double q = sg_expm1_parts(xc, &s1, &s2, &n);
    double y = (1.0 + q) * s1 * s2;
    return x != x ? x : y;
}
/* tanh(|x|) = -u / (2 + u), u = expm1(-2|x|): accurate near 0 too (u is the polynomial's own
   value there, without 1 added and taken away); 1 from |x| = 20 on. */
static inline double sg_tanh(double x) {
    double a = fabs(x);
    double s1, s2, n;
    double q = sg_expm1_parts(-2.0 * (a > 20.0 ? 20.0 : a), &s1, &s2, &n);
    double u = n == 0.0 ? q : (1.0 + q) * s1 * s2 - 1.0;
    double t = copysign(-u / (2.0 + u), x);
    return x != x ? x : t;
}
#else
typedef float real;
#define SG_LOG logf
#define SG_SQRT sqrtf
#define SG_ABS fabsf
/* exp(x) = 2^n * p(r), r = x - n ln2 (Cody-Waite), a degree-6 polynomial on |r| <= ln2/2, and
   2^n applied in two halves so denormal results and overflow to inf come out right. Branch
   free, so loops calling it vectorise. */
static inline float sg_exp(float x) {
    float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t k = (int32_t)n;
    int32_t k1 = k >> 1, k2 = k - (k >> 1);
    int32_t b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, 4);
    memcpy(&s2, &b2, 4);
    y = y * s1 * s2;
    return x != x ? x : y;
}
/* tanh from exp(-2|x|), and its odd Taylor polynomial near 0, where 1 - exp(-2|x|) would
   cancel: both are within ~1e-7 relative of tanh. */
static inline float sg_tanh(float x) {
    float a = fabsf(x);
    float e = sg_exp(-2.0f * a);
    float big = (1.0f - e) / (1.0f + e);
    float a2 = a * a;
    float small = a + a * a2 * (-0.333333333f + a2 * (0.133333333f + a2 * -0.053968254f));
    float t = a < 0.2f ? small : big;
    t = copysignf(t, x);  /* (x < 0 ? -t : t gave +0 for -0) */
    return x != x ? x : t;
}
#endif

/* GCC's partial redundancy elimination turns long column loops (a chain of maxima over
   slices, say) into a form its vectoriser gives up on; the loops have no redundancy for it to
   remove, so it is off for these kernels */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-pre")
#endif

/* the rows of a region split over threads: OpenMP when compiled with it (sharing torch's
   libgomp, so torch.set_num_threads rules both), else one thread */
#define SG_PRAGMA(x) _Pragma(#x)
#ifdef _OPENMP
#include <omp.h>
#define SG_ROWS_PARALLEL SG_PRAGMA(omp parallel)
#define SG_ATOMIC SG_PRAGMA(omp atomic write)
static inline int64_t sg_num_threads(void) { return omp_get_num_threads(); }
static inline int64_t sg_thread_num(void) { return omp_get_thread_num(); }
#else
#define SG_ROWS_PARALLEL
#define SG_ATOMIC
static inline int64_t sg_num_threads(void) { return 1; }
static inline int64_t sg_thread_num(void) { return 0; }
#endif

/* a region's row loop is compiled once: inlined or cloned at each of its call sites (the
   threaded wrapper, each loop variant) it costs compile time and no measurable speed */
#if defined(__GNUC__) && !defined(__clang__)
#define SG_ONE_COPY __attribute__((noinline, noclone))
#elif defined(__clang__)
#define SG_ONE_COPY __attribute__((noinline))
#else
#define SG_ONE_COPY
#endif
/* a region's row function is shared by the library's two halves (compiled apart, on two cores)
   but not exported from it */
#if defined(__GNUC__)
#define SG_SHARED __attribute__((visibility("hidden")))
#else
#define SG_SHARED
#endif

/* a column loop: outputs never overlap inputs, and scratch arrays never overlap each other,
   so no iteration depends on another (the compiler need not check aliasing at run time) */
#if defined(__clang__)
#define SG_COLUMNS _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define SG_COLUMNS _Pragma("GCC ivdep")
#else
#define SG_COLUMNS
#endif

/* 1 / (1 + exp(-x)) for x >= 0, exp(x) / (1 + exp(x)) below: no overflow, and tiny results
   (down to denormals) keep their precision */
static inline real sg_sigmoid(real x) {
    real e = sg_exp(x < 0 ? x : -x);
    real r = (real)1 / ((real)1 + e);
    return x < 0 ? e * r : r;
}
/* nan-propagating, like torch.maximum / torch.minimum */
static inline real sg_max(real a, real b) { return (a > b || a != a) ? a : b; }
static inline real sg_min(real a, real b) { return (a < b || a != a) ? a : b; }
static inline real sg_relu(real x) { return x < 0 ? (real)0 : x; }
static inline real sg_sign(real x) { return (real)((x > 0) - (x < 0)); }  /* 0 at nan, as torch.sign */
/* a row with strided columns, gathered into scratch (the kernels then read it contiguously) */
static inline const real* sg_gather(real* dst, const real* src, int64_t stride, int64_t w) {
    for (int64_t j = 0; j < w; ++j) dst[j] = src[j * stride];
    return dst;
}
"""


# ---------------------------------------------------------------------------------------
# what can be fused
# ---------------------------------------------------------------------------------------
def _c_refusal(n: Node) -> str | None:
    """Why the C generator has no code for `n`'s op (a reduction's rule may refuse one node)."""
    ok, why = ops.c_fusable(n)
    return None if ok else why


def c_region_supported(region: Region) -> tuple[bool, str]:
    """Whether the C generator can fuse `region`, and if not, the reason (for the plan).

    Raises ValueError for a malformed region (a node reading a value the region does not have)."""
    why = region_problem(region, _c_refusal)
    return (why is None, why or "")


# ---------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CKernelSource:
    """The C function of one region and the layout of its arguments."""

    source: str  # the function (PRELUDE not included)
    func_name: str
    declaration: str  # the prototypes of its two functions, for the library's other half
    inputs: tuple[ArgSpec, ...]  # one per region input, in order
    out_shapes: tuple[tuple[int, ...], ...]  # per-example shape of each output
    masked: bool  # whether any output is carried or zero-masked (reads the step mask)


@dataclass
class _Val:
    """A value inside one row: a literal, or `ptr` (a pointer into the array of node `base`,
    at column `offset`) over `phys` columns (1 for a value broadcast from one column)."""

    literal: str | None = None
    base: int | None = None
    ptr: str = ""
    offset: int = 0
    phys: int = 1


@dataclass
class _Item:
    """One piece of a row's code: a loop over `width` columns computing elementwise `nodes`
    (intermediates stay in registers), or one statement node (a reduction, concat or pad).

    A loop over a per-example (M, N) matrix (`grid`) walks its rows m and columns n_; there it
    also computes spreads of vectors over the matrix (outer, tile, repeat_each) as values, and
    adds up `sums` (matvec, vecmat, sum_tiles, sum_groups, sums to one value) of what it
    computes, as it goes (ops.GridRule): none of these needs a matrix array of its own."""

    kind: str  # "loop" | "stmt"
    width: int
    nodes: list[Node]
    grid: tuple[int, int] | None = None
    sums: list[Node] = field(default_factory=list)


def _tag(n: Node) -> str:
    name = f" '{n.name}'" if n.name else ""
    site = f" @ {n.site}" if n.site.line else ""
    return f"%{n.id} {n.op}{name}{site}".replace("*/", "* /")


_ALIAS = ("reshape", "stop_gradient", "slice", "broadcast_to")


def _grid_rule(n: Node, *xs: str) -> ops.GridRule | None:
    """How a loop over a matrix computes `n` as it goes (ops.GridRule), or None."""
    rule = ops.REGISTRY[n.op].c_grid
    return None if rule is None else rule(n, *(xs or ["x"] * len(n.inputs)))


class _Writer:
    """Writes one kernel in three steps: place each node (elementwise ops join the earliest loop
    of their width that comes after everything they read through memory), find which values
    must live in a scratch array (read outside their own loop, or at an offset), then emit."""

    def __init__(self, region: Region, func_name: str):
        self.region = region
        self.func_name = func_name
        self.vals: dict[int, _Val] = {}
        self.item_of: dict[int, int] = {}  # computed node id -> index of its item
        self.items: list[_Item] = []
        self.arrays: set[int] = set()  # computed nodes whose columns are kept in scratch
        self.placed: dict[int, str] = {}  # computed node id -> its array, at an offset of another
        self.in_place: dict[int, Node] = {}  # concats whose parts were computed straight into them
        self.stored_as: dict[int, int] = {}  # concat id -> the output whose row is its array
        self.scratch = 0
        self.params: list[str] = ["int64_t B"]
        self.specs: list[ArgSpec] = []
        self.pre: list[str] = []
        self.row: list[str] = []
        self.row_stats: dict[tuple, tuple[str, str]] = {}  # (x's element, width, eps) -> its mean and rstd names
        self.accumulated: set[int] = set()  # sums added up inside the loop of their operand

    def alloc(self, w: int) -> int:
        off = self.scratch
        self.scratch += max(1, w)
        return off

    # -- step 1: values and placement ---------------------------------------------------
    def _inputs(self) -> None:
        for k, n in enumerate(self.region.inputs):
            w = width(n)
            if n.op == "const":
                self.specs.append(ArgSpec("const", 1, n.label()))
                self.vals[n.id] = _Val(literal=ops.c_literal(n.attrs["value"]))
                continue
            if n.batched:
                self.specs.append(ArgSpec("rows", w, n.label()))
                self.params += [f"const real* in{k}", f"int64_t rs{k}", f"int64_t cs{k}"]
                if w > 1:  # a row with strided columns is gathered into scratch first
                    self.row.append(f"const real* restrict a{k} = cs{k} == 1 ? in{k} + b * rs{k} : "
                                    f"sg_gather(ws + {self.alloc(w)}, in{k} + b * rs{k}, cs{k}, {w});  /* {_tag(n)} */")
                else:
                    self.row.append(f"const real* restrict a{k} = in{k} + b * rs{k};  /* {_tag(n)} */")
            else:
                self.specs.append(ArgSpec("vector" if n.shape else "scalar", w, n.label()))
                self.params += [f"const real* in{k}", f"int64_t cs{k}"]
                if w > 1:  # (gathered into the scratch, which is on the heap when it is wide)
                    self.pre.append(f"const real* restrict a{k} = cs{k} == 1 ? in{k} : "
                                    f"sg_gather(ws + {self.alloc(w)}, in{k}, cs{k}, {w});  /* {_tag(n)} */")
                else:
                    self.pre.append(f"const real* restrict a{k} = in{k};  /* {_tag(n)} */")
            self.vals[n.id] = _Val(base=n.id, ptr=f"a{k}", phys=1 if w == 1 else w)

    def _direct(self, v: _Val, w: int) -> bool:
        """Whether a loop of width `w` can read `v` as a register of its own loop."""
        return (v.literal is None and v.base in self.item_of and v.offset == 0 and v.phys == w
                and v.base not in self.accumulated)

    def _place(self, n: Node) -> None:
        op, w = n.op, width(n)
        ins = [self.vals[i.id] for i in n.inputs]
        if op == "const":
            self.vals[n.id] = _Val(literal=ops.c_literal(n.attrs["value"]))
            return
        if op in _ALIAS:
            a = ins[0]
            if op == "slice" and a.literal is None and a.phys > 1:
                off = a.offset + n.attrs["start"]
                root = self.vals[a.base].ptr if a.base in self.vals else a.ptr
                self.vals[n.id] = _Val(base=a.base, ptr=f"({root} + {off})" if off else root, offset=off,
                                       phys=w if w > 1 else 1)
            else:  # the same columns (a size-1 value stays one column)
                self.vals[n.id] = a
            return
        self.vals[n.id] = _Val(base=n.id, ptr=f"v{n.id}", phys=w if w > 1 else 1)
        rule = _grid_rule(n)
        if rule is not None and rule.role == "value":  # a spread: a value of a loop over its matrix
            self._join_loop(n, ins, w, (rule.M, rule.N))
        elif rule is not None and self._add_up_in_loop(n, ins, rule):
            pass
        elif ops.REGISTRY[op].kind == "elementwise":
            if all(v.literal is not None for v in ins):  # constants only: one folded expression
                self.vals[n.id] = _Val(literal=ops.c_rule(n)(n, *[v.literal for v in ins]))
                return
            self._join_loop(n, ins, w, None)
        else:
            self.items.append(_Item("stmt", w, [n]))
            self.item_of[n.id] = len(self.items) - 1

    def _join_loop(self, n: Node, ins: list[_Val], w: int, grid: tuple[int, int] | None) -> None:
        """Put `n` in the earliest loop of width `w` (over the same matrix, for a spread) after
        everything it reads through memory, or in a new loop at the end."""
        first = 0
        for v in ins:
            if v.literal is None and v.base in self.item_of:
                g = self.item_of[v.base]
                first = max(first, g if self._direct(v, w) else g + 1)
        for k in range(first, len(self.items)):
            it = self.items[k]
            if it.kind == "loop" and it.width == w and (grid is None or it.grid in (None, grid)):
                it.grid = it.grid or grid
                it.nodes.append(n)
                self.item_of[n.id] = k
                return
        self.items.append(_Item("loop", w, [n], grid))
        self.item_of[n.id] = len(self.items) - 1

    def _add_up_in_loop(self, n: Node, ins: list[_Val], rule: ops.GridRule) -> bool:
        """Add sum `n` to the loop that computes the value it sums, when that loop can walk the
        sum's matrix and the sum's other operands are in memory before it; else False. The loop
        must be as wide as the summed value: a value spread from one column (a broadcast_to,
        and a slice or reshape of one) is that column's alias, and its one-column loop would
        add it up once, or be turned into a matrix loop that overruns the row."""
        a = ins[rule.matrix]
        if a.literal is not None or a.base not in self.item_of:
            return False
        g = self.item_of[a.base]
        it = self.items[g]
        grid = None if rule.M is None else (rule.M, rule.N)
        if it.kind != "loop" or not self._direct(a, it.width) or (grid is not None and it.grid not in (None, grid)):
            return False
        if width(n.inputs[rule.matrix]) != it.width or (grid is not None and it.width != grid[0] * grid[1]):
            return False
        for k, v in enumerate(ins):
            if k != rule.matrix and v.literal is None and v.base in self.item_of and self.item_of[v.base] >= g:
                return False
        it.grid = it.grid or grid
        it.sums.append(n)
        self.item_of[n.id] = g
        self.accumulated.add(n.id)
        return True

    # -- step 2: which values need an array --------------------------------------------
    def _find_arrays(self) -> None:
        for n in self.region.nodes:
            if n.id not in self.item_of:
                continue  # aliases and constants
            it = self.items[self.item_of[n.id]]
            for i in n.inputs:
                v = self.vals[i.id]
                if v.literal is not None or v.base not in self.item_of:
                    continue
                if not (it.kind == "loop" and self.item_of[v.base] == self.item_of[n.id] and self._direct(v, it.width)):
                    self.arrays.add(v.base)
        for o in self.region.outputs:
            v = self.vals[o.id]
            if v.base in self.item_of and not (v.base == o.id and self.items[self.item_of[o.id]].kind == "loop"):
                self.arrays.add(v.base)
        for k in self.region.carry.values():
            v = self.vals[self.region.inputs[k].id]
            if v.base in self.item_of:
                self.arrays.add(v.base)
        for it in self.items:
            if it.kind == "stmt":
                self.arrays.add(it.nodes[0].id)
            self.arrays.update(s.id for s in it.sums)

    def _concats_in_place(self) -> None:
        """A concat of values computed in this row (each in an array of its own) gets them
        computed straight into its own array: each part's array is the concat's at the part's
        offset, so the concat copies nothing. A concat that is also an output stored as it is
        (no mask to fold in) is computed straight into the output's row: nothing is copied at
        the end either. An LSTM's backward, whose gate gradients are one such concat, then
        writes each gradient once instead of three times."""
        plain_out = self._plain_outputs()
        taken: set[int] = set()
        for it in self.items:
            c = it.nodes[0]
            if it.kind != "stmt" or c.op != "concat":
                continue
            parts = [i for i in c.inputs if self._own_array(i.id) and i.id not in taken]
            if len(parts) != len(c.inputs) or len({i.id for i in parts}) != len(parts):
                continue
            off = 0
            for i in parts:
                self.placed[i.id] = f"v{c.id} + {off}"
                taken.add(i.id)
                off += width(i)
            self.in_place[c.id] = c
            if plain_out.get(c.id) is not None:
                self.stored_as[c.id] = plain_out[c.id]

    def _plain_outputs(self) -> dict[int, int]:
        """node id -> the index of an output that stores it as it is (no mask to fold in)."""
        region = self.region
        return {o.id: k for k, o in enumerate(region.outputs) if k not in region.carry and k not in region.zero_masked}

    def _own_array(self, node_id: int) -> bool:
        """Whether `node_id` is computed by an elementwise loop of this row into an array of
        its own, all its columns (not an alias of another value)."""
        v = self.vals.get(node_id)
        return (node_id in self.arrays and v is not None and v.base == node_id and v.offset == 0
                and self.items[self.item_of[node_id]].kind == "loop")

    # -- step 3: emit --------------------------------------------------------------------
    def at(self, v: _Val, loop_item: int | None = None, w: int = 0) -> str:
        if v.literal is not None:
            return v.literal
        if loop_item is not None and self.item_of.get(v.base) == loop_item and self._direct(v, w):
            return f"t{v.base}"
        return f"{v.ptr}[0]" if v.phys == 1 else f"{v.ptr}[j]"

    def _store_value(self, k: int, value: str) -> str:
        region = self.region
        if k in region.carry:
            c = self.at(self.vals[region.inputs[region.carry[k]].id])
            return f"o{k}[j] = keep ? {value} : {c};"
        if k in region.zero_masked:
            return f"o{k}[j] = keep ? {value} : (real)0;"
        return f"o{k}[j] = {value};"

    def _emit_items(self) -> set[int]:
        """The row's code; returns the outputs stored inside their loops (or computed in place)."""
        stored: set[int] = set()
        outputs_of: dict[int, list[int]] = {}
        for k, o in enumerate(self.region.outputs):
            if self.vals[o.id].base == o.id and o.id in self.item_of and self.items[self.item_of[o.id]].kind == "loop" \
                    and o.id not in self.accumulated:
                outputs_of.setdefault(o.id, []).append(k)
        for c, n in self.in_place.items():  # before the loops computing their parts (no restrict: the parts alias them)
            k = self.stored_as.get(c)
            self.row.append(f"real* v{c} = " + (f"o{k};" if k is not None else f"ws + {self.alloc(width(n))};"))
            if k is not None:
                stored.add(k)
        plain_out = self._plain_outputs()
        for idx, it in enumerate(self.items):
            for n in it.nodes + it.sums:
                if n.id in self.placed:
                    self.row.append(f"real* v{n.id} = {self.placed[n.id]};")
                elif it.kind == "stmt" and n.op not in ("concat", "pad") and n.id in plain_out \
                        and self.vals[n.id].base == n.id:  # a row reduction stored as it is: into the output's row
                    self.row.append(f"real* v{n.id} = o{plain_out[n.id]};")
                    stored.add(plain_out[n.id])
                elif n.id in self.arrays and n.id not in self.in_place:
                    self.row.append(f"real* restrict v{n.id} = ws + {self.alloc(width(n))};")
            if it.kind == "stmt":
                self._emit_stmt(it.nodes[0])
                continue
            body = []
            for n in it.nodes:
                operands = [self.at(self.vals[i.id], idx, it.width) for i in n.inputs]
                rule = _grid_rule(n, *operands)
                expr = rule.expr if rule is not None else ops.c_rule(n)(n, *operands)
                body.append(f"real t{n.id} = {expr};  /* {_tag(n)} */")
                if n.id in self.arrays:
                    body.append(f"v{n.id}[j] = t{n.id};")
                for k in outputs_of.get(n.id, ()):
                    body.append(self._store_value(k, f"t{n.id}"))
                    stored.add(k)
            self._emit_loop(it, idx, body)
        return stored

    def _emit_loop(self, it: _Item, idx: int, body: list[str]) -> None:
        """A column loop: flat over its width, or over the rows m and columns n_ of its matrix,
        adding up its sums as it goes (scalar sums reordered for SIMD, as torch's own are)."""
        rules = {n.id: _grid_rule(n, *[self.at(self.vals[i.id], idx, it.width) for i in n.inputs]) for n in it.sums}
        per_row = [n for n in it.sums if rules[n.id].role == "row_sum"]
        per_column = [n for n in it.sums if rules[n.id].role == "column_sum"]
        totals = [n for n in it.sums if rules[n.id].role == "total"]
        for n in it.sums:
            r = rules[n.id]
            body.append(f"v{n.id}[n_] += {r.expr};  /* {_tag(n)} */" if r.role == "column_sum"
                        else f"s{n.id} += {r.expr};  /* {_tag(n)} */")
        scalars = ", ".join(f"s{n.id}" for n in per_row + totals)
        simd = f'_Pragma("omp simd reduction(+:{scalars})")' if scalars else "SG_COLUMNS"
        for n in totals:
            self.row.append(f"real s{n.id} = 0;")
        if it.grid is None:
            self.row.append(simd)
            self.row.append(f"for (int64_t j = 0; j < {it.width}; ++j) {{")
            self.row += ["    " + ln for ln in body]
            self.row.append("}")
        else:
            M, N = it.grid
            for n in per_column:
                self.row.append(f"for (int64_t j = 0; j < {N}; ++j) v{n.id}[j] = 0;")
            self.row.append(f"for (int64_t m = 0; m < {M}; ++m) {{  /* a ({M}, {N}) matrix, row m */")
            for n in per_row:
                self.row.append(f"    real s{n.id} = 0;")
            self.row.append(f"    {simd}")
            self.row.append(f"    for (int64_t n_ = 0; n_ < {N}; ++n_) {{")
            self.row.append(f"        const int64_t j = m * {N} + n_;")
            self.row += ["        " + ln for ln in body]
            self.row.append("    }")
            for n in per_row:
                self.row.append(f"    v{n.id}[m] = s{n.id};")
            self.row.append("}")
        for n in totals:
            self.row.append(f"v{n.id}[0] = s{n.id};")

    def _emit_stmt(self, n: Node) -> None:
        var, w = f"v{n.id}", width(n)
        ins = [self.vals[i.id] for i in n.inputs]
        self.row.append(f"/* {_tag(n)} */")
        if n.op == "concat" and n.id in self.in_place:
            self.row.append("/* (its parts were computed in place) */")
        elif n.op == "concat":
            off = 0
            for a, v in zip(n.inputs, ins):
                wa = width(a)
                self.row.append(f"for (int64_t j = 0; j < {wa}; ++j) {var}[{off} + j] = {self.at(v)};")
                off += wa
        elif n.op == "pad":
            before, wa = n.attrs["before"], width(n.inputs[0])
            after = w - before - wa
            if before:
                self.row.append(f"for (int64_t j = 0; j < {before}; ++j) {var}[j] = 0;")
            self.row.append(f"for (int64_t j = 0; j < {wa}; ++j) {var}[{before} + j] = {self.at(ins[0])};")
            if after:
                self.row.append(f"for (int64_t j = 0; j < {after}; ++j) {var}[{before + wa} + j] = 0;")
        elif n.op in ("layer_norm", "layer_norm_grad"):  # x's row statistics computed once for both
            xs = [self.at(v) for v in ins]
            key = (xs[-1], width(n.inputs[-1]), n.attrs["eps"])
            stats = self.row_stats.get(key)
            if stats is None:
                stats = self.row_stats[key] = (f"m{n.id}", f"r{n.id}")
                self.row.append(ops.layer_norm_stats_c(key[1], xs[-1], n.attrs["eps"], *stats))
            self.row.append(ops.c_rule(n)(n, var, width(n.inputs[0]), *xs, stats=stats))
        else:  # a row reduction
            self.row.append(ops.c_rule(n)(n, var, width(n.inputs[0]), *[self.at(v) for v in ins]))

    def write(self) -> CKernelSource:
        region = self.region
        self._inputs()
        for n in region.nodes:
            self._place(n)
        self._find_arrays()
        self._concats_in_place()
        masked = bool(region.carry or region.zero_masked)
        if masked:
            # a padded row whose outputs are all carried or zeroed skips the computation
            if all(k in region.carry or k in region.zero_masked for k in range(len(region.outputs))):
                self.row.append("if (mask != 0 && mask[b * ms] == 0) {")
                for k, o in enumerate(region.outputs):
                    w = width(o)
                    fill = self.at(self.vals[region.inputs[region.carry[k]].id]) if k in region.carry else "0"
                    self.row.append(f"    for (int64_t j = 0; j < {w}; ++j) out{k}[b * {w} + j] = {fill};")
                self.row += ["    continue;", "}"]
            self.row.append("const int keep = mask == 0 || mask[b * ms] != 0;")
        else:
            self.row.append("const int keep = 1;")
        for k, o in enumerate(region.outputs):
            self.row.append(f"real* restrict o{k} = out{k} + b * {width(o)};  /* output {k}: {_tag(o)} */")
        stored = self._emit_items()
        for k, o in enumerate(region.outputs):
            if k not in stored:
                self.row.append(f"SG_COLUMNS for (int64_t j = 0; j < {width(o)}; ++j) {self._store_value(k, self.at(self.vals[o.id]))}")
        for k in range(len(region.outputs)):
            self.params.append(f"real* out{k}")
        self.params += ["const unsigned char* mask", "int64_t ms"]
        ops_used = ", ".join(n.op for n in region.nodes)
        work = sum(width(n) for n in region.nodes) + sum(width(o) for o in region.outputs)
        args = ", ".join(p.rsplit(" ", 1)[1].lstrip("*") for p in self.params)
        lines = [f"/* region {region.name!r}: {ops_used}; rows b0 <= b < b1 of B (returns 1 when out of memory) */",
                 f"SG_SHARED SG_ONE_COPY int {self.func_name}_rows(int64_t b0, int64_t b1, {', '.join(self.params)}) {{",
                 "    (void)B;"]
        big = self.scratch > _STACK_LIMIT
        if big:
            lines.append(f"    real* ws = (real*)malloc(sizeof(real) * {self.scratch});")
            lines.append("    if (ws == 0) return 1;")
        else:
            lines.append(f"    real ws[{max(1, self.scratch)}];")
        lines += ["    " + ln for ln in self.pre]
        lines.append("    for (int64_t b = b0; b < b1; ++b) {")
        lines += ["        " + ln for ln in self.row]
        lines.append("    }")
        if big:
            lines.append("    free(ws);")
        lines += ["    return 0;", "}",
                  f"/* region {region.name!r} over all B rows: rows are independent, so they are split over the",
                  "   threads (torch's OpenMP pool) when a call has enough work to pay for waking them */",
                  f"int {self.func_name}({', '.join(self.params)}) {{",
                  f"    if (B * {work} < {PARALLEL_WORK}) return {self.func_name}_rows(0, B, {args});",
                  "    int failed = 0;",
                  "    SG_ROWS_PARALLEL",
                  "    {",
                  "        int64_t nt = sg_num_threads(), id = sg_thread_num();",
                  f"        if ({self.func_name}_rows(B * id / nt, B * (id + 1) / nt, {args})) {{ SG_ATOMIC failed = 1; }}",
                  "    }",
                  "    return failed;",
                  "}"]
        declaration = (f"SG_SHARED int {self.func_name}_rows(int64_t b0, int64_t b1, {', '.join(self.params)});\n"
                       f"int {self.func_name}({', '.join(self.params)});\n")
        return CKernelSource("\n".join(lines) + "\n", self.func_name, declaration, tuple(self.specs),
                             tuple(o.shape for o in region.outputs), masked)


def generate_c(region: Region, func_name: str = "sg_region") -> CKernelSource:
    """The C function computing `region` (raises NotImplementedError when it cannot be fused)."""
    ok, why = c_region_supported(region)
    if not ok:
        raise NotImplementedError(why)
    return _Writer(region, func_name).write()


__all__ = ["PRELUDE", "CKernelSource", "C_CODEGEN_VERSION", "c_region_supported", "generate_c"]
