"""Compile, cache and call the C kernels of the `cpu` backend.

A `CLibrary` gathers the regions and whole loops of one compiled program (forward and
backward variants; regions of the same structure share one function) and builds them with
the system C compiler into shared libraries per dtype and part (the unmasked loops, the
masked ones, the regions only the Python loops call; the prologue's kernels go with the first
part), each when first needed: an LSTM's unmasked loops cost one compiler run on each of two
halves of their source at once and a link (about 0.4-0.5 s at H=512 on our 2-core machine; 0.2 s for a single small region).
The library is written once to the kernel cache ($SEQGRAPH_CACHE_DIR/cpu, next to the Triton
kernels) as `<key>.so` with its source `<key>.c`, where the key hashes the regions'
structure, the dtype, the generator's version, the compiler's version, the flags and (for
-march=native) the CPU's feature flags; another process, or a program of the same structure,
loads the file without compiling. Each kernel is called through ctypes by a small Python
function written for its argument layout (one pointer and the strides per input), which costs
about 3 us a call. This module must not decide what is fused (c_codegen.py) nor cut graphs
into regions (the compiler).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import re
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import torch

from .c_codegen import C_CODEGEN_VERSION, PRELUDE, CKernelSource, generate_c
from ..settings import debug_level, env
from .cache import CacheNotWritable, cache_dir, library_is_whole, share_library, temp_file_in_cache
from .region import Region, bind_inputs

# AVX-512 machines vectorise with 512-bit registers only when asked (gcc and clang prefer 256)
DEFAULT_CFLAGS = "-O3 -march=native" + (" -mprefer-vector-width=512" if platform.machine() in ("x86_64", "AMD64") else "")
_BASE_FLAGS = ["-shared", "-fPIC", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
_DTYPES = {torch.float32: "float", torch.float64: "double"}
_loaded: dict[str, ctypes.CDLL] = {}  # cache key -> the loaded library
_compiler_ids: dict[str, str] = {}


class CompilerMissing(RuntimeError):
    """No C compiler was found: the cpu backend is unavailable (the torch backend still is)."""


def find_compiler() -> str | None:
    """The C compiler: $CC if set, else the first of cc, gcc, clang on PATH (None if none).
    Remembered per ($CC, $PATH): the file system is searched once, not at every call (nor while
    torch.compile traces a call, which cannot trace a file lookup)."""
    key = (env("CC"), env("PATH"))
    if key not in _found_compilers:
        _found_compilers[key] = _search_compiler(key[0])
    return _found_compilers[key]


_found_compilers: dict[tuple, str | None] = {}


def why_no_compiler() -> str:
    """Why find_compiler() found none, and what to do: for messages."""
    cc = env("CC")
    if cc:
        return f"$CC is {cc!r}, which was not found: point it at a C compiler, or unset it to use cc, gcc or clang"
    return "none of cc, gcc, clang is on PATH (install one, or set $CC)"


def _search_compiler(cc: str | None) -> str | None:
    if cc:
        return shutil.which(shlex.split(cc)[0]) and cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def cflags() -> list[str]:
    """Optimisation flags: $SEQGRAPH_CFLAGS, else DEFAULT_CFLAGS (-O3 -march=native)."""
    return shlex.split(os.environ.get("SEQGRAPH_CFLAGS", DEFAULT_CFLAGS))


def _compiler_id(cc: str) -> str:
    if cc not in _compiler_ids:
        try:
            out = subprocess.run(shlex.split(cc) + ["--version"], capture_output=True, text=True, timeout=30)
            _compiler_ids[cc] = out.stdout.splitlines()[0] if out.stdout else cc
        except (OSError, subprocess.SubprocessError):
            _compiler_ids[cc] = cc
    return _compiler_ids[cc]


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's feature flags, so a shared cache never hands
    one machine another's instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def generator_modules() -> tuple:
    """Every module whose text ends up in a C library: the region and loop generators, the
    loops' C runtime, seqgraph's GEMM and the op registry's emitters."""
    from ..compiler import ops
    from . import c_codegen, c_loop_prelude, c_loops, cpu_gemm
    return (c_codegen, c_loops, c_loop_prelude, cpu_gemm, ops)


def _generator_fingerprint() -> str:
    """A hash of the code that writes kernels, so a changed generator never loads a library an
    older one built."""
    h = hashlib.sha256()
    for mod in generator_modules():
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPES:
        raise TypeError(f"C kernels compute float32 or float64, got {dtype}; the torch backend runs other dtypes")
    return _DTYPES[dtype]


class CKernel:
    """One region's C function; call it like a Triton RegionKernel.

    kernel(inputs, mask=None, out=None) -> list of outputs. `inputs` holds one CPU tensor per
    region input (constants may be given as None or left out): batched values (B, W) with any
    strides, unbatched ones (W,) or 0-d, all float32 or all float64. `mask` is (B,) bool, True
    = a real step; padded rows of carried outputs keep that input, zero-masked ones are zero.
    `out` may give, per output, a contiguous (B, W) tensor to write into; None entries are
    allocated. Checked: wrong counts, shapes, dtypes or devices raise ValueError/TypeError."""

    def __init__(self, library: "CLibrary", region: Region, gen: CKernelSource):
        self.library = library
        self.region = region
        self.gen = gen
        self.source = gen.source
        self.fns: dict[torch.dtype, object] = {}  # dtype -> the ctypes function
        self._non_const = [k for k, a in enumerate(gen.inputs) if a.kind != "const"]
        self._out_widths = [max(1, _prod(s)) for s in gen.out_shapes]
        self.fast = _fast_caller(self)

    def __repr__(self) -> str:
        return f"<CKernel {self.region.name!r} {self.gen.func_name}>"

    def fn(self, dtype: torch.dtype):
        f = self.fns.get(dtype)
        if f is None:
            self.library.load(dtype, self.library.part_of(self))
            f = self.fns[dtype]
        return f

    def __call__(self, inputs: Sequence[torch.Tensor | None], mask: torch.Tensor | None = None,
                 out: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        tensors = bind_inputs(self.region, self._non_const, inputs)
        batch, dtype = None, None
        checked: list[torch.Tensor | None] = []
        for k, spec in enumerate(self.gen.inputs):
            t = tensors[k]
            if spec.kind == "const":
                checked.append(None)
                continue
            if not isinstance(t, torch.Tensor):
                self._fail(k, f"must be a tensor, got {type(t).__name__}", TypeError)
            if t.device.type != "cpu":
                self._fail(k, f"is on {t.device}; C kernels take CPU tensors")
            if dtype is None:
                dtype = t.dtype
                _dtype_name(dtype)
            elif t.dtype != dtype:
                self._fail(k, f"has dtype {t.dtype}, the others {dtype}", TypeError)
            if spec.kind == "rows":
                if t.dim() == 0 or (batch is not None and t.shape[0] != batch):
                    self._fail(k, f"has shape {tuple(t.shape)}; expected a batch of {batch} rows")
                batch = t.shape[0] if batch is None else batch
                t = t.reshape(t.shape[0], -1) if t.dim() != 2 else t
                if t.shape[1] != spec.width:
                    self._fail(k, f"has {t.shape[1]} columns per row, expected {spec.width}")
            elif t.numel() != spec.width:
                self._fail(k, f"has {t.numel()} elements, expected {spec.width}")
            else:
                t = t.reshape(-1) if spec.kind == "vector" else t.reshape(())
            checked.append(t)
        if batch is None:
            if mask is None:
                raise ValueError(f"region {self.region.name!r} has no batched input; pass a mask to give the batch size")
            batch = mask.shape[0]
        dtype = dtype or torch.float32
        if mask is not None and (mask.shape != (batch,) or mask.dtype != torch.bool or mask.device.type != "cpu"):
            raise ValueError(f"the mask of region {self.region.name!r} must be a ({batch},) bool CPU tensor, got "
                             f"{tuple(mask.shape)} {mask.dtype} on {mask.device}")
        given = list(out) if out is not None else [None] * len(self._out_widths)
        if len(given) != len(self._out_widths):
            raise ValueError(f"region {self.region.name!r} has {len(self._out_widths)} outputs, out= gave {len(given)}")
        spans = [_byte_span(t) for t in checked if t is not None]
        for k, (w, t) in enumerate(zip(self._out_widths, given)):
            if t is None:
                continue
            if t.numel() != batch * w or not t.is_contiguous() or t.dtype != dtype or t.device.type != "cpu":
                raise ValueError(f"out[{k}] of region {self.region.name!r} must be a contiguous {dtype} CPU tensor "
                                 f"of {batch}x{w} elements, got {tuple(t.shape)} {t.dtype} on {t.device}")
            lo, hi = _byte_span(t)
            if any(lo < b and a < hi for a, b in spans):  # the kernel reads inputs while it writes outputs
                raise ValueError(f"out[{k}] of region {self.region.name!r} overlaps one of its inputs; "
                                 "give it a buffer of its own")
            spans.append((lo, hi))
        outs = self.fast([t for t in checked if t is not None] if self._non_const else [], mask, given,
                         batch, dtype)
        return [o if len(s) == 1 else o.view((batch,) + s) for o, s in zip(outs, self.gen.out_shapes)]

    def _fail(self, k: int, problem: str, kind=ValueError):
        raise kind(f"input {k} ({self.gen.inputs[k].label}) of region {self.region.name!r} {problem}")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [lo, hi) a strided tensor can touch."""
    if t.numel() == 0:
        return (0, 0)
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        step = (size - 1) * stride * t.element_size()
        lo, hi = (lo + step, hi) if step < 0 else (lo, hi + step)
    return lo, hi + t.element_size()


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _fast_caller(kernel: CKernel):
    """An unchecked Python function for the generated loops: inputs (constants left out), mask,
    out, and optionally B and dtype; it allocates the missing outputs and calls the C function.
    Written out per kernel so a call does no loop over its arguments."""
    gen = kernel.gen
    specs = [gen.inputs[k] for k in kernel._non_const]
    names = [f"a{k}" for k in range(len(specs))]
    lines = ["def call(inputs, mask=None, out=None, B=None, dtype=None):"]
    if names:
        lines.append(f"    {', '.join(names)}, = inputs")
    rows = [nm for nm, s in zip(names, specs) if s.kind == "rows"]
    ref = rows[0] if rows else (names[0] if names else None)
    lines.append(f"    dt = {ref}.dtype if dtype is None else dtype" if ref else
                 "    dt = torch.float32 if dtype is None else dtype")
    lines.append(f"    B = {rows[0]}.shape[0] if B is None else B" if rows else "    B = mask.shape[0] if B is None else B")
    lines.append("    fn = fns.get(dt) or (kernel.fn(dt) if B else None)  # (no rows: nothing to build)")
    no = len(kernel._out_widths)
    lines.append(f"    o = out if out is not None else {[None] * no!r}")
    args = ["B"]
    for nm, s in zip(names, specs):
        if s.kind == "rows":
            args += [f"{nm}.data_ptr()", f"{nm}.stride(0)", f"{nm}.stride(-1)" if s.width > 1 else "1"]
        elif s.kind == "vector":
            args += [f"{nm}.data_ptr()", f"{nm}.stride(0)" if s.width > 1 else "1"]
        else:
            args += [f"{nm}.data_ptr()", "1"]
    for k, w in enumerate(kernel._out_widths):
        shape = "(B,)" if not gen.out_shapes[k] else f"(B, {w})"
        lines.append(f"    o{k} = o[{k}]")
        lines.append(f"    if o{k} is None: o{k} = empty({shape}, dtype=dt)")
        args.append(f"o{k}.data_ptr()")
    if gen.masked:
        args += ["(mask.data_ptr() if mask is not None else None)", "(mask.stride(0) if mask is not None else 0)"]
    else:
        args += ["None", "0"]
    lines.append(f"    if B and fn({', '.join(args)}): raise MemoryError({f'region {kernel.region.name!r} could not allocate its scratch'!r})")
    lines.append(f"    return [{', '.join(f'o{k}' for k in range(no))}]")
    namespace = {"fns": kernel.fns, "kernel": kernel, "empty": torch.empty, "torch": torch}
    exec(compile("\n".join(lines), f"<seqgraph C call {gen.func_name}>", "exec"), namespace)
    return namespace["call"]


def _argtypes(gen: CKernelSource) -> list:
    types = [ctypes.c_int64]
    for s in gen.inputs:
        if s.kind == "rows":
            types += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        elif s.kind in ("vector", "scalar"):
            types += [ctypes.c_void_p, ctypes.c_int64]
    types += [ctypes.c_void_p] * len(gen.out_shapes)
    types += [ctypes.c_void_p, ctypes.c_int64]
    return types


# A library is built in parts, each a shared library of its own, compiled when first needed: the
# whole loops over unmasked batches, with the kernels the prologue calls (hoisted.py), when the
# program compiles; the masked loops by the first call with lengths or a mask (a program that
# never meets padding never compiles them, and they are about 40% of an LSTM's C text); and the
# kernels no loop calls (the Python loops': when the program has no C loops, as it compiles; else
# when one is first called, which is never in a call of one or more rows).
LOOPS, MASKED_LOOPS, STEPS = "loops", "masked loops", "steps"
_PART_WHEN = {LOOPS: "compiled with the program", MASKED_LOOPS: "compiled by the first call with lengths or a mask",
              STEPS: "compiled when one of them is first called"}


class CLibrary:
    """The C kernels and whole loops of one program, built per dtype and part (above) on first use."""

    def __init__(self, name: str = "cell"):
        self.name = name
        self.kernels: list[CKernel] = []
        self._by_signature: dict[tuple, CKernel] = {}
        self.loops: dict[str, str] = {}  # whole time loops (c_loops.py): function name -> source
        self.loop_parts: dict[str, str] = {}  # function name -> LOOPS or MASKED_LOOPS
        self.loop_fns: dict[tuple[str, torch.dtype], object] = {}
        self.prologue_kernels: set[str] = set()  # function names of the kernels the prologue calls
        # per (dtype, part) built: the file, whether this process ran the compiler, the cache key
        self.paths: dict[tuple[torch.dtype, str], Path] = {}
        self.compiled: dict[tuple[torch.dtype, str], bool] = {}
        self.keys: dict[tuple[torch.dtype, str], str] = {}

    def add(self, region: Region, prologue: bool = False) -> CKernel:
        """The kernel for `region` (one already added with the same structure is reused).
        `prologue`: the prologue calls it (hoisted.py), so it is built with the program."""
        sig = region.signature()
        k = self._by_signature.get(sig)
        if k is None:
            gen = generate_c(region, f"sg_region_{len(self.kernels)}")
            k = CKernel(self, region, gen)
            self.kernels.append(k)
            self._by_signature[sig] = k
        if prologue:
            self.prologue_kernels.add(k.gen.func_name)
        return k

    def drop_kernels(self, keep: int) -> None:
        """Forget every kernel added after the first `keep` (their source was never built)."""
        for k in self.kernels[keep:]:
            del self._by_signature[k.region.signature()]
        del self.kernels[keep:]

    def add_loop(self, func_name: str, source: str, masked: bool = False) -> None:
        """A whole time loop (written by c_loops.py) calling this library's kernels; a masked
        one is built with the other masked loops, apart."""
        self.loops[func_name] = source
        self.loop_parts[func_name] = MASKED_LOOPS if masked else LOOPS

    def first_part(self) -> str:
        """The part built when the program compiles."""
        return LOOPS if LOOPS in self.loop_parts.values() else STEPS

    def part_of(self, kernel: CKernel) -> str:
        """The part whose library binds `kernel`: the first part for the prologue's kernels, else
        that of the loops calling it (the unmasked loops' where both kinds do), or STEPS where
        no loop does."""
        if kernel.gen.func_name in self.prologue_kernels:
            return self.first_part()
        callers = {self.loop_parts[f] for f, text in self.loops.items() if _calls(text, kernel)}
        return STEPS if not callers else LOOPS if LOOPS in callers else MASKED_LOOPS

    def part(self, part: str) -> tuple[list[CKernel], dict[str, str]]:
        """The kernels and loops built into `part`: its loops and every kernel they call (a
        kernel both kinds of loops call is built into each), or the kernels no loop calls; the
        prologue's kernels go with the first part."""
        loops = {f: text for f, text in self.loops.items() if self.loop_parts[f] == part}
        if part == STEPS:
            return [k for k in self.kernels if self.part_of(k) == STEPS], loops
        first = part == self.first_part()
        return [k for k in self.kernels if (first and k.gen.func_name in self.prologue_kernels)
                or any(_calls(text, k) for text in loops.values())], loops

    def bind_own_gemm(self, dtype: torch.dtype, part: str = LOOPS) -> None:
        """Give this library's float32 loops seqgraph's GEMM (cpu_gemm.py), built now if no
        load chose it: a call asked for it after $SEQGRAPH_CPU_GEMM changed."""
        key = self.keys[(dtype, part)]
        if key in _OWN_GEMM_BOUND:
            return
        with _LOADING:
            if key not in _loaded:  # forgotten (clear_memory_cache): loading it again binds the GEMM now
                self._load(dtype, part)
                return
            from .c_loops import blas_pointers
            from .cpu_gemm import mm_pointers
            _loaded[key].sg_set_blas(*blas_pointers(dtype), *mm_pointers())
            _OWN_GEMM_BOUND.add(key)

    def loop_fn(self, func_name: str, dtype: torch.dtype):
        f = self.loop_fns.get((func_name, dtype))
        if f is None:
            self.load(dtype, self.loop_parts[func_name])
            f = self.loop_fns[(func_name, dtype)]
        return f

    def source(self) -> str:
        """The library's C text as `model.source()` shows it: each part's file, under a line
        that says when it is compiled."""
        parts = [p for p in (LOOPS, MASKED_LOOPS, STEPS) if any(self.part(p))]
        if len(parts) == 1:
            return self.part_source(parts[0])
        from .c_loop_prelude import LOOP_PRELUDE
        first, shown = self.first_part(), []
        for k, p in enumerate(parts):
            text = self.part_source(p)
            if k:  # each file starts with the same runtime: shown once
                text = text.replace(PRELUDE, "/* (the prelude of the first part) */\n", 1)
                text = text.replace(LOOP_PRELUDE, "/* (the loops' runtime of the first part) */\n", 1)
            when = "compiled with the program" if p == first else _PART_WHEN[p]
            shown.append(f"/* ======== part {p!r}: {when} ======== */\n{text}")
        return "\n".join(shown)

    def part_source(self, part: str) -> str:
        """The C file of one part. One of more than one function is written in two halves that
        the build compiles at once, one per core (-DSG_HALF=0 and 1; without SG_HALF the file
        compiles whole): the loops with the runtime they share stay in one half."""
        kernels, loops = self.part(part)
        halves = self._halves(part)
        if halves is None:
            return PRELUDE + "\n" + "".join(k.source for k in kernels) + _loops_text(loops)
        text = [PRELUDE, "\n/* ---- every region's functions, for calls from the other half ---- */\n"]
        text += [k.gen.declaration for k in kernels]
        for half, in_half in enumerate(halves):
            text.append(f"\n#if !defined(SG_HALF) || SG_HALF == {half}\n")
            text.append("\n".join(k.source for k in in_half))
            if half == 1:
                text.append(_loops_text(loops))
            text.append(f"#endif  /* half {half} */\n")
        return "".join(text)

    def _halves(self, part: str) -> tuple[list[CKernel], list[CKernel]] | None:
        """The kernels of each half of `part`, balanced by the length of their text (a fair
        measure of the compiler's time) without comments, which name the user's lines: every
        program of one key splits alike. The loops and their runtime count in half 1. None for a
        single function."""
        kernels, loops = self.part(part)
        if len(kernels) + bool(loops) < 2:
            return None
        load = [0, _code_length(_loops_text(loops))]
        half_of = {}
        for k in sorted(kernels, key=lambda k: (-_code_length(k.source), k.gen.func_name)):
            half_of[k.gen.func_name] = h = 0 if load[0] <= load[1] else 1
            load[h] += _code_length(k.source)
        return ([k for k in kernels if half_of[k.gen.func_name] == 0],
                [k for k in kernels if half_of[k.gen.func_name] == 1])

    def key(self, dtype: torch.dtype, part: str | None = None) -> str:
        """The cache key of one part's library (by default the part built with the program)."""
        part = part or self.first_part()
        kernels, loops = self.part(part)
        cc = find_compiler() or "none"
        flags = cflags()
        # the loops' text without its comments, which name node ids and the user's lines: a
        # program of the same structure, built in any order or from any file, has one key
        loops = sorted((name, _without_comments(text)) for name, text in loops.items())
        text = repr(([(k.gen.func_name, k.region.signature()) for k in kernels], loops, _dtype_name(dtype),
                     C_CODEGEN_VERSION, _generator_fingerprint(),
                     _compiler_id(cc),
                     flags, _BASE_FLAGS, openmp_flags(), _cpu_features() if "-march=native" in flags else platform.machine(),
                     sys.platform))
        return "c" + hashlib.sha256(text.encode()).hexdigest()[:24]

    def load(self, dtype: torch.dtype, part: str | None = None) -> None:
        """Compile (or find in the cache) one part's library for `dtype` (by default the part
        built with the program) and bind its kernels and loops to it (one thread at a time: a
        second thread asking for the same library finds it built)."""
        with _LOADING:
            self._load(dtype, part or self.first_part())

    def _load(self, dtype: torch.dtype, part: str) -> None:
        name = _dtype_name(dtype)
        kernels, loops = self.part(part)
        if not kernels and not loops:
            return
        key = self.key(dtype, part)
        lib = _loaded.get(key)
        path = cache_dir() / "cpu" / f"{key}.so"
        wrote = False
        own = dtype == torch.float32 and _own_gemm_chosen()
        if lib is None:
            def build():
                # the loops' GEMM library (once per machine, where chosen) builds on the other core meanwhile
                gemm = _start(_gemm_library) if loops and own else None
                try:
                    _build(self.part_source(part), path, name, halves=2 if self._halves(part) else 1)
                finally:
                    if gemm is not None:
                        gemm.join()
            lib, wrote = cached_library(path, build)
            _loaded[key] = lib
        self.paths[(dtype, part)], self.compiled[(dtype, part)] = path, wrote
        for k in kernels:
            if self.part_of(k) != part:
                continue  # (another part's kernel, built here too for this part's loops)
            f = getattr(lib, k.gen.func_name)
            f.argtypes = _argtypes(k.gen)
            f.restype = ctypes.c_int
            k.fns[dtype] = f
        if loops:
            from .c_loops import blas_pointers
            blas = blas_pointers(dtype)
            if blas is None:
                raise RuntimeError(f"the C loops of {self.name!r} need a BLAS (sgemm_/dgemm_) in libtorch_cpu; "
                                   "none was found")
            from .cpu_gemm import mm_pointers
            own = own or key in _OWN_GEMM_BOUND  # (never unbind it for another program's loops)
            mm = mm_pointers() if own else (None, None, None)
            lib.sg_set_blas.argtypes = [ctypes.c_void_p] * 7
            lib.sg_set_blas(*blas, *mm)
            if own:
                _OWN_GEMM_BOUND.add(key)
            self.keys[(dtype, part)] = key
            for fname in loops:
                f = getattr(lib, fname)
                f.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_int64, ctypes.c_int64]
                f.restype = ctypes.c_int
                self.loop_fns[(fname, dtype)] = f
        if debug_level() >= 3:
            print(f"[seqgraph] C kernels of {self.name!r} ({part}) for {name} ({path}):\n{self.part_source(part)}",
                  file=sys.stderr)


def _calls(loop_text: str, kernel: CKernel) -> bool:
    """Whether a loop's text calls `kernel` (its threaded wrapper, `sg_region_<n>(`)."""
    return re.search(rf"\b{kernel.gen.func_name}\(", loop_text) is not None


def _loops_text(loops: dict[str, str]) -> str:
    if not loops:
        return ""
    from .c_loop_prelude import LOOP_PRELUDE
    return LOOP_PRELUDE + "\n" + "\n".join(loops.values())


def _without_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def _code_length(text: str) -> int:
    return len(_without_comments(text))


_LOADING = threading.RLock()


def _fresh_lock_after_fork() -> None:
    """A child forked while another thread held the lock would wait for it forever."""
    global _LOADING
    _LOADING = threading.RLock()


os.register_at_fork(after_in_child=_fresh_lock_after_fork)
_OWN_GEMM_BOUND: set[str] = set()  # keys of loaded libraries whose loops have seqgraph's GEMM


def _own_gemm_chosen() -> bool:
    from .cpu_gemm import per_step_gemm
    return per_step_gemm() == "seqgraph"


def _gemm_library() -> None:
    from .cpu_gemm import _library
    try:
        _library()
    except Exception:  # noqa: BLE001 - the load that needs it raises it again, in its own thread
        pass


def _start(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def openmp_flags() -> list[str]:
    """["-fopenmp"] when torch runs on GNU OpenMP (libgomp in this process): the kernels then
    split their rows over torch's own thread pool, sized by torch.set_num_threads. With any
    other runtime a second pool would compete with torch's, so the kernels stay single-threaded."""
    global _OPENMP
    if _OPENMP is None:
        try:
            with open("/proc/self/maps") as f:
                _OPENMP = ["-fopenmp"] if "libgomp" in f.read() else []
        except OSError:
            _OPENMP = []
    return _OPENMP


_OPENMP: list[str] | None = None


def cached_library(path: Path, build) -> tuple[ctypes.CDLL, bool]:
    """The library at `path`, built first by `build()` where it is missing, cut short or does not
    load (a damaged cache file is rebuilt, not reported on every run); and whether it was built.
    Processes that need one library at once (workers forked after compiling, ranks of one job)
    build it once: the others wait for that build, then load its file."""
    built = False
    if not library_is_whole(path):
        with _building(path):
            if not library_is_whole(path):
                build()
                built = True
    try:
        return ctypes.CDLL(str(path)), built
    except OSError:
        if built:
            raise
        with _building(path):
            build()
        return ctypes.CDLL(str(path)), True


@contextlib.contextmanager
def _building(path: Path):
    """Hold `<key>.lock` beside the library while building it (an advisory lock, which the
    system releases if the process dies). Without POSIX locks, or where the cache folder
    cannot be written, nothing is held: each process then builds on its own, as before."""
    try:
        import fcntl
        path.parent.mkdir(parents=True, exist_ok=True)
        # read-only: another user of a shared cache may lock it too (the umask gives it 0644)
        fd = os.open(path.with_suffix(".lock"), os.O_RDONLY | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # (a file system without locks)
            pass
        yield
    finally:
        os.close(fd)  # (which releases the lock)


def _build(source: str, path: Path, real: str, halves: int = 1) -> None:
    """Compile `source` into the library at `path` (its text kept beside it as `<key>.c`);
    `halves=2` when the text is written in two halves that may compile at once."""
    cc = find_compiler()
    if cc is None:
        raise CompilerMissing(f"the cpu backend compiles its kernels with a C compiler: {why_no_compiler()}; "
                              f"backend='torch' needs none")
    # compiled from a private copy (another process may write the shared `<key>.c` meanwhile,
    # and each half's compiler reads the file), which then becomes `<key>.c`, atomically
    c_path = path.with_suffix(".c")
    fd, tmp_c = temp_file_in_cache(path.parent, path.stem, ".c.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
    except OSError as e:  # a full disk, a folder deleted meanwhile: no half-written file is left
        _remove(tmp_c)
        raise CacheNotWritable(f"seqgraph could not write {c_path}: {e.strerror or e}. Free space there, or set "
                               f"SEQGRAPH_CACHE_DIR to another folder") from None
    temps = [tmp_c]
    try:
        tmp_so = _temp_name(path, ".so.tmp", temps)
        objects = [_temp_name(path, f".{h}.o.tmp", temps) for h in range(halves)] if halves > 1 and _cores() > 1 else []
        failed = _compile_library(cc, tmp_c, tmp_so, objects, path, real)
        try:  # the text beside the library, or beside the error that names it
            os.replace(tmp_c, c_path)
            shown = str(c_path)
        except OSError:  # (for reading only: a failed build keeps its private copy to name instead)
            shown = tmp_c
            if failed:
                temps.remove(tmp_c)
        if failed:
            cmd, stderr = failed
            flags = env("SEQGRAPH_CFLAGS")
            suspect = (f"$SEQGRAPH_CFLAGS is {flags!r}: check those flags first (unset, it is "
                       f"{DEFAULT_CFLAGS!r}); if the compiler builds other C programs with them, "
                       if flags is not None else "if it builds other C programs, ")
            raise RuntimeError(f"the C compiler failed on generated kernels ({shown}); {suspect}this is a seqgraph "
                               f"bug: please report it with that file (backend='torch' needs no compiler). "
                               f"The command and its errors:\n{' '.join(cmd).replace(tmp_c, shown)}\n"
                               f"{stderr[-4000:].replace(tmp_c, shown)}")
        share_library(tmp_so)
        try:
            os.replace(tmp_so, path)  # atomic: a concurrent process sees the whole library or none
        except OSError as e:  # the folder deleted meanwhile, a full disk
            raise CacheNotWritable(f"seqgraph could not move its new library into {path.parent}: {e.strerror or e} "
                                   f"(was the folder deleted while it compiled? the next compile builds it again)") from None
    finally:
        for name in temps:
            _remove(name)  # (renamed into place, removed by a failed build, or left by an interrupt)


def _temp_name(path: Path, suffix: str, temps: list[str]) -> str:
    """A fresh temporary file name beside `path`, listed in `temps` for removal."""
    fd, name = temp_file_in_cache(path.parent, path.stem, suffix)
    os.close(fd)
    temps.append(name)
    return name


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _compile_library(cc: str, c_path: str, tmp_so: str, objects: list[str], path: Path,
                     real: str) -> tuple[list[str], str] | None:
    """Run the C compiler on `c_path` into `tmp_so` (each half into its object in `objects` at
    once, then one link, where there are objects): None, or the failed command and its errors."""
    base = shlex.split(cc) + cflags() + _BASE_FLAGS + (["-DSG_DOUBLE"] if real == "double" else [])
    shown = str(path.with_suffix(".c"))  # (debug output names the file kept, not the private copy)
    started = time.perf_counter()
    cmd, res = _run_compiler(base + openmp_flags(), c_path, tmp_so, objects, shown)
    about_openmp = _OPENMP_ERROR.search(res.stderr.replace(str(path.parent), ""))  # (not the folder's name)
    if res.returncode != 0 and openmp_flags() and about_openmp:
        cmd, res = _run_compiler(base, c_path, tmp_so, objects, shown)  # a compiler without OpenMP: one thread per kernel
    if debug_level() >= 1:
        print(f"[seqgraph] C compiler took {time.perf_counter() - started:.2f} s for {path.name} "
              f"(cached in {path.parent} for later calls and processes)", file=sys.stderr)
    return (cmd, res.stderr) if res.returncode != 0 else None


_OPENMP_ERROR = re.compile(r"openmp|omp\.h|gomp|libomp", re.I)  # what a compiler without OpenMP says


def _run_compiler(base: list[str], c_path: str, tmp_so: str, objects: list[str],
                  shown: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """One compiler run over the whole file, or one per half at once and a link: the command
    that failed (or the last) and its result."""
    if not objects:
        return _run_at_once([base + ["-o", tmp_so, "-x", "c", c_path, "-x", "none", "-lm"]], c_path, shown)
    halves = [base + [f"-DSG_HALF={h}", "-x", "c", "-c", "-o", obj, c_path] for h, obj in enumerate(objects)]
    cmd, res = _run_at_once(halves, c_path, shown)
    if res.returncode != 0:
        return cmd, res
    return _run_at_once([base + ["-o", tmp_so] + objects + ["-lm"]], c_path, shown)


def _run_at_once(cmds: list[list[str]], c_path: str, shown: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run the commands at once, each in a session of its own: an interrupt here ends them and
    their children (gcc's cc1 and as), which then remove their own temporary files. The first
    failed command and its result, or the last one's."""
    if debug_level() >= 1:
        for cmd in cmds:
            print(f"[seqgraph] {' '.join(cmd).replace(c_path, shown)}", file=sys.stderr)
    procs = []
    try:
        for cmd in cmds:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
        results = []
        for cmd, p in zip(cmds, procs):
            out, err = p.communicate()
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # (not SIGKILL: then they cannot clean up)
                except (OSError, AttributeError):  # (gone meanwhile; no process groups here)
                    p.terminate()
                p.wait()
    return next(((r.args, r) for r in results if r.returncode != 0), (results[-1].args, results[-1]))


def clear_memory_cache() -> None:
    """Forget the libraries loaded by this process (the files on disk stay)."""
    _loaded.clear()
    _OWN_GEMM_BOUND.clear()


__all__ = ["CKernel", "CLibrary", "CompilerMissing", "find_compiler", "cflags", "clear_memory_cache"]
