"""Triton source for one fused Region: each region becomes one readable `@triton.jit` kernel.

A program instance of the kernel handles BLOCK_ROWS rows of the batch. Every value lives in
registers as a float32 tile over a *range of its columns*: [BLOCK_ROWS, BLOCK_w] for a batched
value, [1, BLOCK_w] for an unbatched vector, a plain scalar for an unbatched 0-d value, where w
is the range's width and BLOCK_w the next power of two (columns past w are masked by
`cmask_w`). Registers cannot be sliced, so column layout is resolved at generation time: each
value has *breaks* (the column offsets where concat and pad join pieces), every range that is
computed lies between two breaks, and a slice, a concat piece or a pad piece asks its operand
for the matching range, down to the loads. Elementwise ops and reductions come from the op
registry's Triton emitters; layout ops, piecewise reductions and sliced softmax, layer_norm
and layer_norm_grad are written here. Per-example shapes are read flattened (a value of shape
(S, D) is a row of S*D columns), which is exact for elementwise ops; reductions and layout ops
need values whose leading per-example dims are 1. The row ops of flattened per-example
matrices (matvec, tile, ...) read their operands' whole rows as [rows, BM, BN] tiles
(triton_rows.py), so a width that holds an (M, N) matrix is laid out in rows padded to BN
columns (matrix_layouts); a region where that would take moving values between columns is
refused.
This module only writes source text and says what it cannot fuse; compiling, caching and
launching are launch.py's job. It must not run kernels nor change the registry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..compiler import ops
from ..compiler.ir import Node
from . import triton_rows
from .region import Region

Range = tuple[int, int]

CODEGEN_VERSION = 1  # bump when generated kernels change meaning: it is part of the cache key

_ROW_STATS = ("softmax", "layer_norm", "layer_norm_grad")  # per-row statistics, then an elementwise part
_SUMS = ("sum", "mean", "sum_to")
# the row ops of flattened per-example matrices: they read whole operand rows and write a whole
# row, as [rows, BM, BN] tiles (triton_rows.py)
_WHOLE_ROWS = ("matvec", "vecmat", "outer", "tile", "repeat_each", "sum_tiles", "sum_groups", "softmax_groups")
_HELPER_CALL = re.compile(r"(?<!\w)sg_\w+\(")  # a call of a triton_rows.py helper (a value's name never is one)


# ---------------------------------------------------------------------------------------
# shapes as the kernel sees them
# ---------------------------------------------------------------------------------------
def width(node: Node) -> int:
    """Columns of one example of `node`: its per-example shape flattened (1 for a 0-d value)."""
    return node.elements


def _row_shaped(node: Node) -> bool:
    """All per-example dims but the last are 1, so the last dim *is* the row."""
    return all(s == 1 for s in node.shape[:-1])


_block = ops.block_width


def _describe(n: Node) -> str:
    name = f" '{n.name}'" if n.name else ""
    return f"%{n.id} {n.op}{name} (declared at {n.site})"


def _ident(text: str, limit: int = 24) -> str:
    out = re.sub(r"\W", "_", text)[:limit].strip("_") or "v"
    return out if not out[0].isdigit() else "_" + out


# ---------------------------------------------------------------------------------------
# what can be fused
# ---------------------------------------------------------------------------------------
def _validate(region: Region) -> None:
    """Structural mistakes in a region are the caller's bug: raise ValueError."""
    known: set[int] = set()
    for n in region.inputs:
        if n.id in known:
            raise ValueError(f"region {region.name!r} lists input {_describe(n)} twice")
        known.add(n.id)
    for n in region.nodes:
        if n.id in known:
            raise ValueError(f"region {region.name!r} lists {_describe(n)} twice (or as an input and a node)")
        if n.op in ops.LEAF_OPS and n.op != "const":
            raise ValueError(f"region {region.name!r}: leaf {_describe(n)} must be an input, not a node")
        for i in n.inputs:
            if i.id not in known:
                raise ValueError(f"region {region.name!r}: {_describe(n)} reads {_describe(i)}, which is "
                                 "neither an input nor computed earlier in the region")
        known.add(n.id)
    for k, o in enumerate(region.outputs):
        if o.id not in known:
            raise ValueError(f"region {region.name!r}: output {k} {_describe(o)} is neither an input nor a node")
    for k, i in region.carry.items():
        if not (0 <= k < len(region.outputs) and 0 <= i < len(region.inputs)):
            raise ValueError(f"region {region.name!r}: carry {k} -> {i} is out of range")
        src, out = region.inputs[i], region.outputs[k]
        if not src.batched or width(src) != width(out):
            raise ValueError(f"region {region.name!r}: output {k} {_describe(out)} cannot carry input {i} "
                             f"{_describe(src)}: it needs a batched value of the same size")
        if k in region.zero_masked:
            raise ValueError(f"region {region.name!r}: output {k} is both carried and zero-masked")
    for k in region.zero_masked:
        if not 0 <= k < len(region.outputs):
            raise ValueError(f"region {region.name!r}: zero_masked output {k} is out of range")


def _triton_refusal(n: Node) -> str | None:
    ok, why = ops.fusable(n)
    return None if ok else why


def row_problem(n: Node, refusal=_triton_refusal) -> str | None:
    """Why `n` cannot be computed row by row inside a fused kernel, or None. `refusal(n)` is the
    generator's own reason to refuse n's op (None when it has an emitter for it); the layout
    rules here are the same for every generator."""
    if n.dtype != "float":
        return f"{_describe(n)} has dtype {n.dtype}; fused kernels compute floats only"
    if n.op == "const":
        return None
    if n.op in ("slice", "pad", "concat"):
        for a in n.inputs:
            if not _row_shaped(a) or n.attrs["dim"] != len(a.shape) - 1:
                return f"{_describe(n)} works along a dim other than the row (last) dim"
        return None
    if n.op == "reshape":
        return None  # the flattened row is unchanged
    if n.op == "broadcast_to":
        if width(n.inputs[0]) not in (1, width(n)):
            return f"{_describe(n)} repeats a value along a dim other than the row; only size-1 values broadcast"
        return None
    why = refusal(n)
    if why:
        return f"{_describe(n)}: {why}"
    kind = ops.REGISTRY[n.op].kind
    if kind == "reduction" and not _row_shaped(n.inputs[0]):
        return f"{_describe(n)} reduces the last dim of a value with leading per-example dims"
    if kind == "elementwise":
        for a in n.inputs:
            if width(a) == 1 or a.shape == n.shape or (width(a) == width(n) and _row_shaped(a) and _row_shaped(n)):
                continue
            return (f"{_describe(n)} broadcasts operand {_describe(a)} of shape {a.shape} to {n.shape} along "
                    "a dim other than the row")
    elif kind != "reduction":
        return f"{_describe(n)}: op kind {kind} is not fused"
    return None


def region_problem(region: Region, refusal=_triton_refusal) -> str | None:
    """Why a generator (whose op refusals are `refusal`) cannot fuse `region`, or None."""
    _validate(region)
    if not region.outputs:
        return f"region {region.name!r} has no outputs"
    for k, o in enumerate(region.outputs):
        if not o.batched:
            return (f"output {k} {_describe(o)} has no batch dim; values made only of parameters and "
                    "constants are computed once, outside the step")
        if o.dtype != "float":
            return f"output {k} {_describe(o)} has dtype {o.dtype}; fused kernels compute floats only"
    for n in region.nodes:
        why = row_problem(n, refusal)
        if why:
            return why
    if refusal is _triton_refusal and any(n.op in _WHOLE_ROWS for n in region.nodes):
        return _whole_rows_problem(region)
    return None


def _whole_rows_problem(region: Region) -> str | None:
    """A row op computes its whole row from its operands' whole rows, each one tile: an operand
    joined from pieces (a concat) or a part of a row op's result asked for (a slice) would have
    to move values between columns (tl.gather, unverified on a GPU); so would one width laid
    out two ways (matrix_layouts)."""
    layout = _Writer(region)
    layout._find_breaks()
    layout._plan_ranges()
    for n in region.nodes:
        if n.op not in _WHOLE_ROWS:
            continue
        for a in n.inputs:
            if layout.breaks[a.id]:
                return (f"{_describe(n)} reads {_describe(a)}, a row joined from pieces: the kernel would have "
                        "to move values between its columns (tl.gather, unverified on a GPU)")
        if layout.need[n.id] - {(0, width(n))}:
            return (f"{_describe(n)}: parts of its row are read on their own ({sorted(layout.need[n.id])}): the "
                    "kernel would have to move values between its columns (tl.gather, unverified on a GPU)")
    return layout.layout_problem


def _row_op_layouts(n: Node) -> list[tuple[int, int, int]]:
    """(width, M, N) for each row that row op `n` reads or writes: an (M, N) matrix, or a plain
    vector as (w, 1, w)."""
    if n.op in ("matvec", "vecmat", "outer"):  # an (M, N) matrix and its two vectors
        M, N = {"matvec": (width(n), width(n.inputs[-1])), "vecmat": (width(n.inputs[0]), width(n)),
                "outer": (width(n.inputs[0]), width(n.inputs[1]))}[n.op]
        return [(M * N, M, N), (M, 1, M), (N, 1, N)]
    k = n.attrs["times"]
    if n.op in ("tile", "sum_tiles"):  # `times` copies of a row of N
        N = width(n.inputs[0]) if n.op == "tile" else width(n)
        return [(k * N, k, N), (N, 1, N)]
    if n.op in ("repeat_each", "sum_groups"):  # M values, each `times` times
        M = width(n.inputs[0]) if n.op == "repeat_each" else width(n)
        return [(M * k, M, k), (M, 1, M)]
    return [(width(n), width(n) // k, k)]  # softmax_groups


def matrix_layouts(region: Region) -> tuple[dict[int, tuple[int, int]], str | None]:
    """The widths whose tiles hold an (M, N) matrix with N not a power of two, each as (M, N),
    and why the region cannot be laid out, or None.

    Every tile of one width is laid out alike, so elementwise ops, slices, concats, loads and
    stores never care how: column m * BN + n holds flat value m * N + n. That is the plain
    layout (column c holds value c) when N is a power of two or M is 1; otherwise the width's
    loads and stores go through the map. Only the row ops care, and two of them that want one
    width laid out two ways (a (2, 3) and a (3, 2) matrix, or a matrix and a vector of six)
    cannot share a kernel."""
    wanted: dict[int, dict[tuple[int, int] | None, tuple[Node, int, int]]] = {}
    for n in region.nodes:
        if n.op in _WHOLE_ROWS:
            for w, M, N in _row_op_layouts(n):
                grid = None if M == 1 or N == _block(N) else (M, N)
                wanted.setdefault(w, {}).setdefault(grid, (n, M, N))
    grids: dict[int, tuple[int, int]] = {}
    for w, ways in wanted.items():
        if len(ways) > 1:
            (n1, M1, N1), (n2, M2, N2) = list(ways.values())[:2]
            say = lambda M, N: f"a ({M}, {N}) matrix" if M != 1 else "a vector"  # noqa: E731
            return {}, (f"{_describe(n1)} reads rows of {w} columns as {say(M1, N1)} and {_describe(n2)} as "
                        f"{say(M2, N2)}: one kernel lays out all tiles of a width alike, and these two layouts "
                        "differ (moving values between columns takes tl.gather, unverified on a GPU)")
        (grid,) = ways
        if grid is not None:
            grids[w] = grid
    return grids, None


def region_supported(region: Region) -> tuple[bool, str]:
    """Whether `compile_region` can fuse `region`, and if not, the reason (for the plan).

    Raises ValueError for a malformed region (a node reading a value the region does not have)."""
    why = region_problem(region)
    return (why is None, why or "")


# ---------------------------------------------------------------------------------------
# building regions
# ---------------------------------------------------------------------------------------
def region_from_outputs(outputs: Sequence[Node], inputs: Sequence[Node], *, carry: dict[int, int] | None = None,
                        zero_masked: Iterable[int] = (), name: str = "region") -> Region:
    """The region computing `outputs` from `inputs`: every node between them, in topological
    order. Constants reached are computed inside; any other leaf must be listed in `inputs`.

        region = region_from_outputs([h_next], [gemm_out, bias])
    """
    stop = {n.id for n in inputs}
    order: list[Node] = []
    seen: set[int] = set(stop)
    for root in outputs:
        if root.id in seen:
            continue
        seen.add(root.id)
        stack = [(root, iter(root.inputs))]
        while stack:
            node, it = stack[-1]
            child = next(it, None)
            if child is None:
                stack.pop()
                if node.op in ops.LEAF_OPS and node.op != "const":
                    raise ValueError(f"{_describe(node)} is reached from the outputs but is not among the "
                                     "region's inputs")
                order.append(node)
            elif child.id not in seen:
                seen.add(child.id)
                stack.append((child, iter(child.inputs)))
    return Region(nodes=order, inputs=list(inputs), outputs=list(outputs), carry=dict(carry or {}),
                  zero_masked=set(zero_masked), name=name)


# ---------------------------------------------------------------------------------------
# what the generator hands to the launcher
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArgSpec:
    """How one region input reaches the kernel."""

    kind: str  # "rows": (B, W) with row and column strides | "vector": (W,) | "scalar": () | "const": a literal
    width: int
    label: str


@dataclass(frozen=True)
class KernelSource:
    """The generated source of one region's kernel and the layout of its arguments."""

    source: str
    func_name: str
    inputs: tuple[ArgSpec, ...]  # one per region input, in order
    out_shapes: tuple[tuple[int, ...], ...]  # per-example shape of each output
    max_block: int  # widest column tile, to choose BLOCK_ROWS
    masked: bool  # whether any output is carried or zero-masked (reads the step mask)


def _row_sum(x: str, w: int) -> str:
    return f"tl.sum(tl.where(cmask_{w}, {x}, 0.0), axis=1)[:, None]"


# ---------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------
class _Writer:
    """Writes one kernel: breaks, then the column ranges each value must provide (walking back
    from the outputs), then one line per (value, range) in topological order, then the stores."""

    def __init__(self, region: Region):
        self.region = region
        everything = list(region.inputs) + list(region.nodes)
        self.arg = {n.id: k for k, n in enumerate(region.inputs)}
        self.var = {n.id: f"v{k}_{_ident(n.name or n.op)}" for k, n in enumerate(everything)}
        self.breaks: dict[int, tuple[int, ...]] = {}
        self.need: dict[int, set[Range]] = {n.id: set() for n in everything}
        self.from_stats: set[int] = set()  # softmax/layer_norm(_grad) nodes computed from row statistics
        self.values: dict[tuple[int, int, int], str] = {}  # (node id, lo, hi) -> expression
        self.literals: dict[str, float] = {}  # literal expression -> its value
        self.stats_written: set[int] = set()
        self.widths: set[int] = set()
        # widths laid out as padded matrices, and why they cannot be (one width wanted two ways)
        self.grids, self.layout_problem = matrix_layouts(region)
        self.lines: list[str] = []

    def block(self, w: int) -> int:
        """Register columns of a tile of w values: BM * BN for a width holding an (M, N) matrix."""
        if w in self.grids:
            M, N = self.grids[w]
            return _block(M) * _block(N)
        return _block(w)

    def columns(self, w: int, lo: int) -> str:
        """The flat columns (from `lo`) that the register columns of a width-w tile hold."""
        cols = f"idx_{w}" if w in self.grids else f"cols_{w}"
        return f"{cols} + {lo}" if lo else cols

    # -- column layout -----------------------------------------------------------------
    def _find_breaks(self) -> None:
        for n in self.region.inputs:
            self.breaks[n.id] = ()
        for n in self.region.nodes:
            cuts: set[int] = set()
            if n.op == "slice":
                s, e = n.attrs["start"], n.attrs["stop"]
                cuts = {b - s for b in self.breaks[n.inputs[0].id] if s < b < e}
            elif n.op == "concat":
                off = 0
                for a in n.inputs:
                    cuts |= {off + b for b in self.breaks[a.id]} | {off}
                    off += width(a)
            elif n.op == "pad":
                a, before = n.inputs[0], n.attrs["before"]
                cuts = {before + b for b in self.breaks[a.id]} | {before, before + width(a)}
            elif n.op in _WHOLE_ROWS:
                cuts = set()
            else:  # elementwise ops and row reductions keep the layout of their full-width operands
                for a in n.inputs:
                    if width(a) == width(n):
                        cuts |= set(self.breaks[a.id])
            self.breaks[n.id] = tuple(sorted(b for b in cuts if 0 < b < width(n)))

    def segments(self, n: Node, lo: int = 0, hi: int | None = None) -> list[Range]:
        """[lo, hi) cut at the breaks of `n`: each piece is one tile."""
        hi = width(n) if hi is None else hi
        cuts = [lo] + [b for b in self.breaks[n.id] if lo < b < hi] + [hi]
        return list(zip(cuts[:-1], cuts[1:]))

    def operand_ranges(self, n: Node, rng: Range) -> list[tuple[Node, Range]]:
        """The operand ranges that range `rng` of `n` is computed from."""
        lo, hi = rng
        if n.op == "const":
            return []
        if n.op == "slice":
            s = n.attrs["start"]
            return [(n.inputs[0], (lo + s, hi + s))]
        if n.op == "concat":
            off = 0
            for a in n.inputs:
                if off <= lo < off + width(a):
                    return [(a, (lo - off, hi - off))]
                off += width(a)
        if n.op == "pad":
            a, before = n.inputs[0], n.attrs["before"]
            if hi <= before or lo >= before + width(a):
                return []  # a zero piece
            return [(a, (lo - before, hi - before))]
        if n.op in _WHOLE_ROWS:
            return [(a, (0, width(a))) for a in n.inputs]
        if n.op in _SUMS and (width(n) == 1 or n.op != "sum_to"):
            (a,) = n.inputs
            return [(a, seg) for seg in self.segments(a)]
        if n.op in _ROW_STATS and n.id in self.from_stats:  # (the breaks of n are its operands')
            return [(a, seg) for a in n.inputs for seg in self.segments(n)] + [(a, rng) for a in n.inputs]
        # elementwise ops, reshape, broadcast_to, an identity sum_to, a whole softmax/layer_norm(_grad)
        return [(a, rng if width(a) == width(n) else (0, 1)) for a in n.inputs]

    def _plan_ranges(self) -> None:
        for o in self.region.outputs:
            self.need[o.id].update(self.segments(o))
        for n in reversed(self.region.nodes):
            need = self.need[n.id]
            if not need:
                continue
            if n.op in _ROW_STATS and (need != {(0, width(n))} or len(self.segments(n)) > 1):
                self.from_stats.add(n.id)
            for rng in sorted(need):
                for a, r in self.operand_ranges(n, rng):
                    self.need[a.id].add(r)

    # -- lines -------------------------------------------------------------------------
    def _tag(self, n: Node, rng: Range | None = None) -> str:
        name = f" '{n.name}'" if n.name else ""
        part = f" [{rng[0]}:{rng[1]}]" if rng is not None and rng != (0, width(n)) else ""
        site = f" @ {n.site}" if n.site.line else ""
        return f"%{n.id} {n.op}{name}{part}{site}"

    def emit(self, code: str, tag: str, indent: int = 1) -> None:
        self.lines.append("    " * indent + f"{code}  # {tag}")

    def name_of(self, n: Node, rng: Range) -> str:
        return self.var[n.id] if rng == (0, width(n)) else f"{self.var[n.id]}_{rng[0]}_{rng[1]}"

    def value(self, n: Node, rng: Range) -> str:
        return self.values[(n.id, *rng)]

    def tile_zeros(self, n: Node, w: int) -> str:
        return f"tl.zeros(({'BLOCK_ROWS' if n.batched else 1}, {self.block(w)}), tl.float32)"

    def load(self, n: Node, rng: Range) -> str:
        """A load expression for range `rng` of region input `n` (float32 in registers)."""
        k, (lo, w) = self.arg[n.id], (rng[0], rng[1] - rng[0])
        self.widths.add(w)
        cols = f"({self.columns(w, lo)})" if lo else self.columns(w, lo)
        spec = self.arg_spec(n)
        if spec.kind == "rows":
            return (f"tl.load(in{k}_ptr + rows * in{k}_rs + {cols} * in{k}_cs, mask=rmask & cmask_{w}, "
                    "other=0.0).to(tl.float32)")
        if spec.kind == "vector":
            return f"tl.load(in{k}_ptr + {cols} * in{k}_cs, mask=cmask_{w}, other=0.0).to(tl.float32)"
        return f"tl.load(in{k}_ptr).to(tl.float32)"

    def arg_spec(self, n: Node) -> ArgSpec:
        label = n.label()
        if n.op == "const":
            return ArgSpec("const", 1, label)
        if n.batched:
            return ArgSpec("rows", width(n), label)
        return ArgSpec("vector" if n.shape else "scalar", width(n), label)

    def expression(self, n: Node, rng: Range) -> str:
        """The expression for range `rng` of computed node `n` (its operands are already named)."""
        lo, hi = rng
        w = hi - lo
        parts = self.operand_ranges(n, rng)
        if n.op in ("slice", "concat", "pad", "reshape"):
            return self.value(*parts[0]) if parts else self.tile_zeros(n, w)
        if n.op == "broadcast_to" or (n.op == "sum_to" and width(n) == width(n.inputs[0])):
            (a, r), = parts
            if width(a) == width(n):
                return self.value(a, r)
            return f"({self.value(a, r)} + {self.tile_zeros(n, w)})"
        if n.op in _SUMS:
            (a,) = n.inputs
            if len(parts) == 1:
                return ops.triton_expr(n, [self.value(*parts[0])])
            total = " + ".join(_row_sum(self.value(a, r), r[1] - r[0]) for _, r in parts)
            return f"(({total}) / {float(width(a))})" if n.op == "mean" else f"({total})"
        if n.op in _ROW_STATS and n.id in self.from_stats:
            return self.from_row_stats(n, rng)
        if n.op in _WHOLE_ROWS:  # (region_problem made sure rng is the whole row, and so are its operands')
            return ops.triton_expr(n, [self.as_tile(a, (0, width(a))) for a in n.inputs])
        args = [self.value(a, r) for a, r in parts]
        if args and all(x in self.literals for x in args):
            return self.fold(n, args)
        return ops.triton_expr(n, args)

    def fold(self, n: Node, args: list[str]) -> str:
        """An op on literals only is computed now, in float64."""
        vals = [torch.tensor(self.literals[x], dtype=torch.float64) for x in args]
        value = float(ops.REGISTRY[n.op].torch(n, *vals))
        lit = ops.py_literal(value)
        self.literals[lit] = value
        return lit

    def from_row_stats(self, n: Node, rng: Range) -> str:
        """softmax, layer_norm or layer_norm_grad over columns `rng`, from statistics of the whole
        row (written once)."""
        if n.op == "layer_norm_grad":
            return self.layer_norm_grad_from_row_stats(n, rng)
        (a,) = n.inputs
        base = self.var[n.id]
        segs = [(self.value(a, r), r[1] - r[0]) for r in self.segments(a)]
        if n.id not in self.stats_written:
            self.stats_written.add(n.id)
            tag = self._tag(n) + " row statistics"
            if n.op == "softmax":
                maxes = [f"tl.max(tl.where(cmask_{w}, {x}, float('-inf')), axis=1)[:, None]" for x, w in segs]
                mx = maxes[0]
                for m in maxes[1:]:
                    mx = f"tl.maximum({mx}, {m})"
                self.emit(f"{base}_max = {mx}", tag)
                sums = " + ".join(_row_sum(f"tl.exp({x} - {base}_max)", w) for x, w in segs)
                self.emit(f"{base}_sum = {sums}", tag)
            else:
                self.emit_mean_rstd(base, segs, n.attrs["eps"], tag)
        x = self.value(a, rng)
        if n.op == "softmax":
            return f"(tl.exp({x} - {base}_max) / {base}_sum)"
        return f"(({x} - {base}_mean) * {base}_rstd)"

    def emit_mean_rstd(self, base: str, segs: list[tuple[str, int]], eps: float, tag: str) -> None:
        """Lines for `{base}_mean` and `{base}_rstd` of a row given as (tile, width) pieces."""
        total = float(sum(w for _, w in segs))
        self.emit(f"{base}_mean = ({' + '.join(_row_sum(x, w) for x, w in segs)}) / {total}", tag)
        sq = " + ".join(_row_sum(f"({x} - {base}_mean) * ({x} - {base}_mean)", w) for x, w in segs)
        self.emit(f"{base}_rstd = 1.0 / tl.sqrt(({sq}) / {total} + {eps!r})", tag)

    def layer_norm_grad_from_row_stats(self, n: Node, rng: Range) -> str:
        """rstd * (g - mean(g) - y * mean(g * y)) over columns `rng`, y = (x - mean(x)) * rstd: x's
        mean and rstd computed as layer_norm's are, then g's two means, each a sum of piece sums."""
        g, x = n.inputs
        base = self.var[n.id]
        segs = [(self.value(g, r), self.value(x, r), r[1] - r[0]) for r in self.segments(n)]
        y = f"(({{}} - {base}_mean) * {base}_rstd)"
        if n.id not in self.stats_written:
            self.stats_written.add(n.id)
            tag = self._tag(n) + " row statistics"
            total = float(width(n))
            self.emit_mean_rstd(base, [(xs, w) for _, xs, w in segs], n.attrs["eps"], tag)
            self.emit(f"{base}_mg = ({' + '.join(_row_sum(gs, w) for gs, _, w in segs)}) / {total}", tag)
            mgy = " + ".join(_row_sum(f"{gs} * {y.format(xs)}", w) for gs, xs, w in segs)
            self.emit(f"{base}_mgy = ({mgy}) / {total}", tag)
        gs, xs = self.value(g, rng), self.value(x, rng)
        return f"({base}_rstd * ({gs} - {base}_mg - {y.format(xs)} * {base}_mgy))"

    def as_tile(self, n: Node, rng: Range) -> str:
        """Range `rng` of `n` as a tile: a value folded to a literal number, or a 0-d unbatched
        value (a plain scalar in the kernel, reshaped to (1,) or not), is spread over one."""
        x = self.value(n, rng)
        scalar = x in self.literals or (not n.batched and width(n) == 1)
        return f"({x} + {self.tile_zeros(n, rng[1] - rng[0])})" if scalar else x

    def _define(self, n: Node, rng: Range, expr: str) -> None:
        self.widths.add(rng[1] - rng[0])
        if expr in self.literals:
            self.values[(n.id, *rng)] = expr
            return
        name = self.name_of(n, rng)
        self.emit(f"{name} = {expr}", self._tag(n, rng))
        self.values[(n.id, *rng)] = name

    def _body(self) -> None:
        for n in self.region.inputs:
            for rng in sorted(self.need[n.id]):
                if n.op == "const":
                    self.values[(n.id, *rng)] = self.const_literal(n)
                else:
                    self._define(n, rng, self.load(n, rng))
        for n in self.region.nodes:
            for rng in sorted(self.need[n.id]):
                if n.op == "const":
                    self.values[(n.id, *rng)] = self.const_literal(n)
                else:
                    self._define(n, rng, self.expression(n, rng))

    def const_literal(self, n: Node) -> str:
        v = n.attrs["value"]
        lit = ops.py_literal(v)  # what the registry's emitter writes, inf and nan included
        self.literals[lit] = float(v)
        return lit

    def _stores(self) -> None:
        r = self.region
        for k, o in enumerate(r.outputs):
            self.lines.append(f"    # output {k}: {self._tag(o)}")
            for lo, hi in self.segments(o):
                w = hi - lo
                self.widths.add(w)
                val = f"o{k}_{lo}" if lo else f"o{k}"
                self.lines.append(f"    {val} = {self.value(o, (lo, hi))}")
                if k in r.carry:
                    src = r.inputs[r.carry[k]]
                    old = self.values.get((src.id, lo, hi)) or self.load(src, (lo, hi))
                    self.lines.append("    if HAS_MASK:")
                    self.emit(f"{val} = tl.where(keep, {val}, {old})",
                              f"padded rows keep input {r.carry[k]} ({src.label()})", indent=2)
                elif k in r.zero_masked:
                    self.lines.append("    if HAS_MASK:")
                    self.emit(f"{val} = tl.where(keep, {val}, 0.0)", "padded rows write zeros", indent=2)
                cols = self.columns(w, lo)
                self.lines.append(f"    tl.store(out{k}_ptr + rows * {width(o)} + {cols}, "
                                  f"{val}.to(out{k}_ptr.dtype.element_ty), mask=rmask & cmask_{w})")

    # -- the whole kernel ----------------------------------------------------------------
    def write(self) -> KernelSource:
        r = self.region
        self._find_breaks()
        self._plan_ranges()
        self._body()
        body = self.lines
        self.lines = []
        self._stores()
        stores = self.lines
        masked = bool(r.carry or r.zero_masked)
        # one name for every kernel: texts of regions of equal structure (one cache key) then
        # differ only in comments and value names, so a process that reads a file another
        # process has just rewritten for an equal region (as Triton reads the source again)
        # still finds its function, and the same computation
        func = "region_kernel"

        params = []
        specs = tuple(self.arg_spec(n) for n in r.inputs)
        for k, (n, spec) in enumerate(zip(r.inputs, specs)):
            b = "B, " if n.batched else ""
            what = f"input {k}: %{n.id} {n.op} '{n.label()}' ({b}{', '.join(map(str, n.shape))})"
            args = {"rows": f"in{k}_ptr, in{k}_rs, in{k}_cs,", "vector": f"in{k}_ptr, in{k}_cs,",
                    "scalar": f"in{k}_ptr,", "const": None}[spec.kind]
            if args is None:
                params.append(f"    # {what} = {self.const_literal(n)}, written inline")
            else:
                params.append(f"    {args:<32}# {what}")
        for k, o in enumerate(r.outputs):
            params.append(f"    {f'out{k}_ptr,':<32}# output {k}: %{o.id} {o.op} '{o.label()}' "
                          f"(B, {width(o)}) contiguous")
        params.append(f"    {'mask_ptr, mask_rs,':<32}# (B,) step mask, nonzero = a real step (read when HAS_MASK)")
        params.append(f"    {'n_rows,':<32}# B")
        params.append(f"    {'HAS_MASK: tl.constexpr,':<32}# apply carry / zero_masked to padded rows")
        params.append(f"    {'BLOCK_ROWS: tl.constexpr,':<32}# batch rows per program")

        prologue = [
            "    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]"
            "  # [BLOCK_ROWS, 1]",
            "    rmask = rows < n_rows",
        ]
        for w in sorted(self.widths):
            prologue.append(f"    cols_{w} = tl.arange(0, {self.block(w)})[None, :]")
            if w in self.grids:  # an (M, N) matrix: column m * BN + n holds value m * N + n
                M, N = self.grids[w]
                bn = _block(N)
                prologue.append(f"    cmask_{w} = (cols_{w} // {bn} < {M}) & (cols_{w} % {bn} < {N})"
                                f"  # a ({M}, {N}) matrix, rows {bn} wide")
                prologue.append(f"    idx_{w} = cols_{w} // {bn} * {N} + cols_{w} % {bn}")
            else:
                prologue.append(f"    cmask_{w} = cols_{w} < {w}")
        if masked:
            prologue.append("    if HAS_MASK:")
            prologue.append("        keep = tl.load(mask_ptr + rows * mask_rs, mask=rmask, other=0) != 0"
                            "  # [BLOCK_ROWS, 1]")

        header = [
            f'"""Generated by seqgraph (codegen v{CODEGEN_VERSION}) for region {r.name!r}: '
            f"{len(r.nodes)} nodes, {len(r.inputs)} inputs, {len(r.outputs)} outputs.",
            "",
            "Each value is a float32 tile [BLOCK_ROWS, BLOCK_w] over a range of its columns; `# %id op` names",
            'the graph node a line computes. Do not edit: the file is rewritten when the region changes."""',
            "import triton",
            "import triton.language as tl",
        ]
        if any(_HELPER_CALL.search(line) for line in body):
            header += ["", "# -- helpers (seqgraph/kernels/triton_rows.py) --"]
            header += triton_rows.SOURCE.strip("\n").split("\n")
        header += [
            "",
            "",
            "@triton.jit",
            f"def {func}(",
        ]
        lines = header + params + ["):"] + prologue + ["    # -- values --"] + body + ["    # -- stores --"]
        lines += stores + ["", "", f"KERNEL = {func}", ""]
        out_shapes = tuple(tuple(o.shape) for o in r.outputs)
        max_block = max(self.block(w) for w in self.widths)
        return KernelSource("\n".join(lines), func, specs, out_shapes, max_block, masked)


def generate(region: Region) -> KernelSource:
    """The Triton source of `region`'s kernel and its argument layout.

    Raises NotImplementedError (with the reason region_supported gives) for a region that
    cannot be fused, and ValueError for a malformed one."""
    why = region_problem(region)
    if why:
        raise NotImplementedError(f"region {region.name!r} cannot be fused: {why}")
    return _Writer(region).write()


__all__ = ["ArgSpec", "KernelSource", "CODEGEN_VERSION", "generate", "region_from_outputs",
           "region_supported", "width"]
