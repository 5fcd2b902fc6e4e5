"""Compile, cache and launch the kernel of a fused Region.

`compile_region(region)` asks codegen.py for the source, writes it once to the kernel cache
directory ($SEQGRAPH_CACHE_DIR, default ~/.cache/seqgraph/kernels) as `<key>.py`, where the key
hashes the region's signature, the Triton version and the generator's text (codegen.py and the
op registry's emitters, so an edited emitter never loads a stale kernel), imports it
(triton.jit reads real source files) and keeps the function in memory; another process, or a
region of the same structure, reuses the file. `RegionKernel.__call__` checks and lays out the
tensors, picks the block shape and launches one program per BLOCK_ROWS rows. This module must
not decide what is fused (codegen.py) nor cut graphs into regions (the compiler).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..settings import debug_level, triton_interpreting
from .cache import CacheNotWritable, cache_dir, temp_file_in_cache  # noqa: F401 - CacheNotWritable for callers
from .codegen import CODEGEN_VERSION, KernelSource, generate
from .region import Region, bind_inputs

try:
    import triton
except ImportError:  # pragma: no cover - triton ships with every supported Linux torch
    triton = None

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # (float64 would be computed in float32)
_loaded: dict[tuple[str, bool], object] = {}  # (cache key, interpreter on) -> the jitted kernel


def clear_memory_cache() -> None:
    """Forget the kernels imported by this process (the files on disk stay)."""
    _loaded.clear()


@functools.lru_cache(maxsize=1)
def _generator_fingerprint() -> str:
    """A hash of the code that writes Triton kernels: the generator and the op registry."""
    from ..compiler import ops
    from . import codegen
    h = hashlib.sha256()
    for mod in (codegen, ops):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def cache_key(region: Region) -> str:
    """The file name stem of `region`'s kernel: a hash of its structure, the tool versions and
    the generator's text."""
    version = triton.__version__ if triton is not None else "none"
    text = repr((region.signature(), version, CODEGEN_VERSION, _generator_fingerprint()))
    return "k" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _write_once(path: Path, source: str) -> bool:
    """Write `source` to `path` unless it is already there; True if this call wrote it."""
    if path.exists():
        return False
    _write(path, source)
    return True


def _write(path: Path, source: str) -> None:
    fd, tmp = temp_file_in_cache(path.parent, path.stem, ".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(source)
    os.replace(tmp, path)  # atomic: a concurrent process sees the whole file or none


def _import(path: Path, key: str, source: str):
    """The KERNEL of the cached file; a file that does not import (cut short, emptied) is
    written again from `source` rather than failing every later run."""
    name = f"seqgraph_kernels_{key}"
    for attempt in (1, 2):
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.KERNEL
        except (SyntaxError, AttributeError, NameError, ImportError):
            if attempt == 2:
                raise
            _write(path, source)


class RegionKernel:
    """The compiled kernel of one region; call it on the region's input tensors.

    kernel(inputs, mask=None, out_dtype=None) -> list of outputs, each a fresh contiguous
    (B, *shape) tensor ((B, W) for a row value). `inputs` has one tensor per region input
    (constants may be given as None, or left out altogether): batched values are (B, W) with any
    strides (or (B, *shape)), unbatched ones (W,) or 0-d. `mask` is (B,) bool, True = a real
    step; padded rows then follow region.carry and region.zero_masked."""

    def __init__(self, region: Region, gen: KernelSource, fn, path: Path, wrote_file: bool):
        self.region = region
        self.gen = gen
        self.fn = fn
        self.path = path
        self.wrote_file = wrote_file  # False when the cache file was already there
        self.source = gen.source  # this region's kernel (the cached file may name another region's nodes)
        self._non_const = [k for k, a in enumerate(gen.inputs) if a.kind != "const"]
        self._out_widths = [max(1, _prod(s)) for s in gen.out_shapes]
        self._configs: dict[tuple[int, str], dict] = {}

    def __repr__(self) -> str:
        return f"<RegionKernel {self.region.name!r} {self.path.name}>"

    def launch_config(self, batch: int, device_type: str = "cuda") -> dict:
        """BLOCK_ROWS and num_warps for a batch of `batch` rows.

        A program's tiles hold at most ~2048 elements (BLOCK_ROWS * widest BLOCK_W). On a GPU,
        rows per program also shrink until there are ~2 programs per SM (an H100 has 132), and
        warps give each thread ~4 elements of a tile (4 to 16 warps): measured on an H100, this
        keeps an LSTM step's region within 10% of the best configuration and at 2.5-3.4 TB/s for
        large batches. The interpreter runs programs one by one, so there rows only grow."""
        key = (batch, device_type)
        cfg = self._configs.get(key)
        if cfg is None:
            block_w = self.gen.max_block
            rows = max(1, min(64, 2048 // block_w, 1 << max(0, (batch - 1).bit_length())))
            if device_type == "cuda":
                while rows > 1 and batch // rows < 264:
                    rows //= 2
            warps = max(4, min(16, rows * block_w // 128))
            cfg = self._configs[key] = {"BLOCK_ROWS": rows, "num_warps": warps}
        return cfg

    def _fail(self, k: int, problem: str, kind=ValueError):
        raise kind(f"input {k} ({self.gen.inputs[k].label}) of region {self.region.name!r} {problem}")

    def __call__(self, inputs: Sequence[torch.Tensor | None], mask: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None,
                 out: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """`out` may give, per output, a contiguous tensor to write into (a slice of a
        preallocated (T, B, W) buffer, say) instead of a fresh one; None entries are allocated."""
        tensors = bind_inputs(self.region, self._non_const, inputs)
        batch, device, first_dtype = None, None, None
        args: list = []
        # one pass: check each tensor and lay it out as the kernel's arguments
        for k in self._non_const:
            spec, t = self.gen.inputs[k], tensors[k]
            if not isinstance(t, torch.Tensor):
                self._fail(k, f"must be a tensor, got {type(t).__name__}", TypeError)
            if t.dtype not in _FLOATS:
                self._fail(k, f"has dtype {t.dtype}; fused kernels take float32, float16 or bfloat16 tensors (they "
                              f"compute in float32; the torch backend runs float64)", TypeError)
            if device is None:
                device = t.device
            elif t.device != device:
                self._fail(k, f"is on {t.device}, the others on {device}")
            if spec.kind == "rows":
                if t.dim() == 0 or (batch is not None and t.shape[0] != batch):
                    self._fail(k, f"has shape {tuple(t.shape)}; expected a batch of {batch} rows")
                if batch is None:
                    batch, first_dtype = t.shape[0], t.dtype
                t2 = t if t.dim() == 2 else (t.unsqueeze(1) if t.dim() == 1 else t.reshape(t.shape[0], -1))
                if t2.shape[1] != spec.width:
                    self._fail(k, f"has {t2.shape[1]} columns per row, expected {spec.width}")
                args += (t2, t2.stride(0), t2.stride(1))
            elif spec.kind == "vector":
                t1 = t if t.dim() == 1 else t.reshape(-1)
                if t1.shape[0] != spec.width:
                    self._fail(k, f"has {t1.numel()} elements, expected {spec.width}")
                args += (t1, t1.stride(0))
            else:
                if t.numel() != 1:
                    self._fail(k, f"must be a scalar, got shape {tuple(t.shape)}")
                args.append(t)
        if batch is None:
            if mask is None:
                raise ValueError(f"region {self.region.name!r} has no batched input; pass a mask to give the "
                                 "batch size")
            batch = mask.shape[0]
        if device is None:
            device = mask.device if mask is not None else torch.device("cpu")
        if device.type == "cpu" and not triton_interpreting():
            raise RuntimeError("Triton kernels need CUDA tensors; set TRITON_INTERPRET=1 to run them on the CPU")
        dtype = out_dtype or first_dtype or torch.float32
        given = list(out) if out is not None else [None] * len(self._out_widths)
        if len(given) != len(self._out_widths):
            raise ValueError(f"region {self.region.name!r} has {len(self._out_widths)} outputs, out= gave {len(given)}")
        outs = []
        for k, (w, t) in enumerate(zip(self._out_widths, given)):
            if t is None:
                outs.append(torch.empty((batch, w), dtype=dtype, device=device))
                continue
            if t.numel() != batch * w or not t.is_contiguous() or t.dtype != dtype or t.device != device:
                raise ValueError(f"out[{k}] of region {self.region.name!r} must be a contiguous {dtype} tensor "
                                 f"of {batch}x{w} elements on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
            outs.append(t.view(batch, w))
        results = [o if len(s) == 1 else o.view((batch,) + s) for o, s in zip(outs, self.gen.out_shapes)]
        if batch == 0:
            return results
        args += outs
        has_mask = mask is not None and self.gen.masked
        if has_mask:
            if mask.shape != (batch,):
                raise ValueError(f"the mask of region {self.region.name!r} must have shape ({batch},), "
                                 f"got {tuple(mask.shape)}")
            m = mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
            m = m if m.device == device else m.to(device)  # (a copy is contiguous: its own stride)
            args += (m, m.stride(0))
        else:
            args += (outs[0], 0)  # never read: HAS_MASK is off
        args.append(batch)

        cfg = self.launch_config(batch, device.type)
        grid = ((batch + cfg["BLOCK_ROWS"] - 1) // cfg["BLOCK_ROWS"],)
        if debug_level() >= 4:
            print(f"[seqgraph] launch region {self.region.name!r} ({self.path.name}) grid={grid} B={batch} "
                  f"BLOCK_ROWS={cfg['BLOCK_ROWS']} max BLOCK_W={self.gen.max_block} num_warps={cfg['num_warps']} "
                  f"mask={has_mask} dtype={dtype}", file=sys.stderr)
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                self.fn[grid](*args, HAS_MASK=has_mask, **cfg)
        elif device.type == "cpu":  # the interpreter computes the lanes a mask leaves out too (a block's
            import numpy  # padding columns): a division or log of what they hold warns, and is never stored
            with numpy.errstate(all="ignore"):
                self.fn[grid](*args, HAS_MASK=has_mask, **cfg)
        else:
            self.fn[grid](*args, HAS_MASK=has_mask, **cfg)
        return results


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def compile_region(region: Region) -> RegionKernel:
    """The kernel of `region`, generated, written to the cache and imported on first use.

    Raises NotImplementedError (with the reason) when the region cannot be fused; check with
    codegen.region_supported first to fall back to torch.

        kernel = compile_region(region)
        h, c = kernel([xproj_t, gemm_out, bias, c_prev], mask=mask_t)
    """
    if triton is None:
        raise NotImplementedError("Triton is not installed; fused kernels are unavailable")
    gen = generate(region)
    key = cache_key(region)
    path = cache_dir() / f"{key}.py"
    wrote = _write_once(path, gen.source)
    mem = (key, triton_interpreting())
    if mem not in _loaded:
        _loaded[mem] = _import(path, key, gen.source)
    if debug_level() >= 3:
        print(f"[seqgraph] kernel for region {region.name!r} ({path}):\n{gen.source}", file=sys.stderr)
    return RegionKernel(region, gen, _loaded[mem], path, wrote)


__all__ = ["RegionKernel", "compile_region", "cache_dir", "cache_key", "clear_memory_cache", "debug_level",
           "CacheNotWritable", "temp_file_in_cache"]
