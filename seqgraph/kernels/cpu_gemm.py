"""seqgraph's own float32 GEMM for the `cpu` backend, and the choice between it and MKL's.

torch's CPU matrix products and the C loops' per-step products go through MKL, which picks
its code path by CPU vendor: on CPUs it does not recognise as Intel's (an AMD EPYC here) it
runs a generic path at about half of one core's peak, and keeps a product the size of an
RNN step (16 x 128 x 512) on one core. `SG_MM_SOURCE` is the textbook register-blocked
kernel instead: the right-hand matrix packed into panels of SG_NR columns, each panel times
SG_MR rows of the left one held in vector accumulators (GCC/Clang vector extensions: zmm
registers with AVX-512, else ymm), panels and row blocks split over torch's OpenMP threads.
It is built once per machine and flags into its own library (`_library`). The C loops call
it through function pointers (`SG_MM_API`, `mm_pointers`); `linear` and `addmm` call it
from Python for the hoisted products (forward, and their input gradients in backward);
`wgrad` runs `sg_matmul_tn` for the weight gradients, which reduce over all T*B rows of both
operands and so pack both, a block of rows at a time. `enabled` says whether a tensor takes
this path: float32 on the CPU, and `per_step_gemm()` is "seqgraph" (on AMD CPUs, or by
$SEQGRAPH_CPU_GEMM). Must not change what a product computes, only the order of its float
additions.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import sys

import torch

from ..settings import env

SG_MM_API = r"""
/* ---- seqgraph's own float GEMM: y (M, N) = x (M, K) W^T (+ bias) ----
   W^T as panels of SG_NR columns: panel p's row k (W[p * SG_NR + c][k] for c < SG_NR) lies at
   base + p * pstep + k * kstep; panels from `full` on are in `tail`. */
typedef struct { const float* base; int64_t pstep, kstep, np, full; float* own; float* tail; } sg_mm_b;
typedef int (*sg_mm_prepare_fn)(sg_mm_b*, int64_t, int64_t, const float*, int64_t, int64_t);
typedef void (*sg_mm_release_fn)(sg_mm_b*);
typedef void (*sg_mm_fn)(int64_t, int64_t, int64_t, const float*, int64_t, const sg_mm_b*, const float*, float*,
                         int64_t);
"""

SG_MM_SOURCE = r"""
#if defined(__AVX512F__)
#define SG_VW 16
#define SG_MR 8
#else
#define SG_VW 8
#define SG_MR 6
#endif
#define SG_NR (2 * SG_VW)
#define SG_MM_ROWS 64                /* rows per work item of the thread split */
#define SG_MM_PARALLEL_FLOPS 262144  /* some 2.5 us on one core: below it, one thread */
#define SG_MM_DIRECT_BYTES 8388608
#ifdef _OPENMP
#include <omp.h>
/* a caller already on one of several threads (a C loop on its own rows) keeps the product */
static inline int sg_in_parallel(void) { return omp_in_parallel(); }
#else
static inline int sg_in_parallel(void) { return 0; }
#endif
typedef float sg_vf __attribute__((vector_size(4 * SG_VW), aligned(4)));

/* W prepared for sg_mm. When W^T is row-major (s0 == 1) with rows at most a page apart, the
   panels are read where W lies (base = W, pstep = SG_NR, kstep = s1) and only a last partial
   panel is copied, padded with zeros, into `tail`; else every panel is copied into `own`
   (kstep = SG_NR). Returns 1 when memory runs out. */
int sg_mm_prepare(sg_mm_b* b, int64_t N, int64_t K, const float* W, int64_t s0, int64_t s1) {
    int64_t np = (N + SG_NR - 1) / SG_NR;
    b->np = np; b->own = 0; b->tail = 0;
    /* in place only while a step of k stays within a page: one TLB miss per k would cost
       about half the FMAs' time */
    int direct = s0 == 1 && s1 * (int64_t)sizeof(float) <= 4096;
    b->full = direct ? N / SG_NR : np;  /* panels read from base; the rest is the tail */
    b->base = direct ? W : 0; b->pstep = direct ? SG_NR : K * SG_NR; b->kstep = direct ? s1 : SG_NR;
    int64_t copied = direct ? np - b->full : np;
    if (copied == 0) return 0;
    float* P = 0;
    if (posix_memalign((void**)&P, 64, sizeof(float) * (size_t)(copied * K * SG_NR + 1)) != 0) return 1;
    if (direct) b->tail = P; else { b->own = P; b->base = P; }
    int64_t p0 = np - copied;
    int par = copied > 1 && N * K >= 65536;
    (void)par;
    /* k by k: each k reads SG_NR adjacent values (s0 == 1), else one value from each of SG_NR rows */
    SG_PRAGMA(omp parallel for schedule(static) if(par))
    for (int64_t p = p0; p < np; ++p) {
        int nc = (int)(N - p * SG_NR < SG_NR ? N - p * SG_NR : SG_NR);
        const float* w = W + p * SG_NR * s0;
        float* dst = P + (p - p0) * K * SG_NR;
        for (int64_t k = 0; k < K; ++k, dst += SG_NR) {
            const float* wk = w + k * s1;
            if (s0 == 1)
                for (int c = 0; c < nc; ++c) dst[c] = wk[c];
            else
                for (int c = 0; c < nc; ++c) dst[c] = wk[c * s0];
            for (int c = nc; c < SG_NR; ++c) dst[c] = 0.0f;
        }
    }
    return 0;
}

void sg_mm_release(sg_mm_b* b) {
    free(b->own);
    free(b->tail);
    b->own = b->tail = 0;
}

/* rows 0..MR-1 of x (element (r, k) at x[r * lx + k * xk]) times one panel (rows ks apart)
   into y (rows ly apart, `nc` columns); the accumulators start at y (acc), else at the
   panel's bias (SG_NR values) or at zero */
static inline __attribute__((always_inline)) void sg_mm_tile(int MR, int64_t K, const float* x, int64_t lx,
                                                             int64_t xk, const float* P, int64_t ks,
                                                             const float* bias, float* y, int64_t ly, int nc,
                                                             int acc) {
    sg_vf a0[SG_MR], a1[SG_MR];
    sg_vf b0 = {0}, b1 = {0};
    if (bias != 0) { b0 = *(const sg_vf*)bias; b1 = *(const sg_vf*)(bias + SG_VW); }
    for (int r = 0; r < MR; ++r) {
        if (!acc) { a0[r] = b0; a1[r] = b1; }
        else if (nc == SG_NR) { a0[r] = *(const sg_vf*)(y + r * ly); a1[r] = *(const sg_vf*)(y + r * ly + SG_VW); }
        else {
            float tmp[SG_NR] = {0};
            memcpy(tmp, y + r * ly, sizeof(float) * (size_t)nc);
            a0[r] = *(const sg_vf*)tmp; a1[r] = *(const sg_vf*)(tmp + SG_VW);
        }
    }
    for (int64_t k = 0; k < K; ++k) {
        sg_vf w0 = *(const sg_vf*)(P + k * ks), w1 = *(const sg_vf*)(P + k * ks + SG_VW);
        for (int r = 0; r < MR; ++r) {
            float xv = x[r * lx + k * xk];
            a0[r] += xv * w0;
            a1[r] += xv * w1;
        }
    }
    if (nc == SG_NR) {
        for (int r = 0; r < MR; ++r) {
            *(sg_vf*)(y + r * ly) = a0[r];
            *(sg_vf*)(y + r * ly + SG_VW) = a1[r];
        }
    } else {
        float tmp[SG_NR];
        for (int r = 0; r < MR; ++r) {
            *(sg_vf*)tmp = a0[r];
            *(sg_vf*)(tmp + SG_VW) = a1[r];
            memcpy(y + r * ly, tmp, sizeof(float) * (size_t)nc);
        }
    }
}

#define SG_MM_TAIL(m) case m: sg_mm_tile(m, K, x + b * lx, lx, 1, P, ks, bias, y + b * ly, ly, nc, acc); break;
static void sg_mm_panel(int64_t M, int64_t K, const float* x, int64_t lx, const float* P, int64_t ks,
                        const float* bias, float* y, int64_t ly, int nc, int acc) {
    int64_t b = 0;
    for (; b + SG_MR <= M; b += SG_MR)
        sg_mm_tile(SG_MR, K, x + b * lx, lx, 1, P, ks, bias, y + b * ly, ly, nc, acc);
    switch (M - b) {
#if SG_MR > 7
        SG_MM_TAIL(7)
#endif
#if SG_MR > 6
        SG_MM_TAIL(6)
#endif
        SG_MM_TAIL(5) SG_MM_TAIL(4) SG_MM_TAIL(3) SG_MM_TAIL(2) SG_MM_TAIL(1)
        default: break;
    }
}

/* y (M, N), rows ly apart = x (M, K), rows lx apart, times W^T (prepared in `w`), plus the
   padded bias (np * SG_NR values) when given. A W read in place is taken in chunks of K
   whose rows span at most SG_MM_DIRECT_BYTES (the TLB's reach), the later chunks adding
   into y. */
void sg_mm(int64_t M, int64_t N, int64_t K, const float* x, int64_t lx, const sg_mm_b* w,
                  const float* bias, float* y, int64_t ly) {
    int64_t np = w->np, nrb = (M + SG_MM_ROWS - 1) / SG_MM_ROWS, items = np * nrb;
    int par = items > 1 && 2.0 * (double)M * (double)N * (double)K >= SG_MM_PARALLEL_FLOPS && !sg_in_parallel();
    (void)par;
    int64_t chunk = K;
    if (w->own == 0 && w->kstep * (int64_t)sizeof(float) * K > SG_MM_DIRECT_BYTES) {
        chunk = SG_MM_DIRECT_BYTES / (w->kstep * (int64_t)sizeof(float));
        if (chunk < 64) chunk = 64;
    }
    for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += chunk) {
        int64_t kc = K - k0 < chunk ? K - k0 : chunk;
        int acc = k0 > 0;
        SG_PRAGMA(omp parallel for schedule(static) if(par))
        for (int64_t it = 0; it < items; ++it) {
            int64_t p = it % np, r0 = (it / np) * SG_MM_ROWS;
            int64_t rows = M - r0 < SG_MM_ROWS ? M - r0 : SG_MM_ROWS;
            int nc = (int)(N - p * SG_NR < SG_NR ? N - p * SG_NR : SG_NR);
            int inplace = p < w->full;
            int64_t ks = inplace ? w->kstep : SG_NR;
            const float* P = (inplace ? w->base + p * w->pstep : w->tail) + k0 * ks;
            sg_mm_panel(rows, kc, x + r0 * lx + k0, lx, P, ks, acc || bias == 0 ? 0 : bias + p * SG_NR,
                        y + r0 * ly + p * SG_NR, ly, nc, acc);
        }
        if (K == 0) break;
    }
}
"""

MATMUL_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define SG_PRAGMA(x) _Pragma(#x)
""" + SG_MM_API + SG_MM_SOURCE + r"""
/* y (M, N), rows ly apart = x (M, K), rows lx apart, columns adjacent, times W^T, W (N, K)
   with element (n, k) at n * s0 + k * s1, plus bias[n * bs] when bias is not null.
   Returns 1 when memory runs out. */
int sg_matmul(int64_t M, int64_t N, int64_t K, const float* x, int64_t lx, const float* W, int64_t s0,
              int64_t s1, const float* bias, int64_t bs, float* y, int64_t ly) {
    sg_mm_b w;
    if (sg_mm_prepare(&w, N, K, W, s0, s1)) return 1;
    float* bp = 0;
    if (bias != 0) {
        if (posix_memalign((void**)&bp, 64, sizeof(float) * (size_t)(w.np * SG_NR)) != 0) {
            sg_mm_release(&w);
            return 1;
        }
        for (int64_t n = 0; n < w.np * SG_NR; ++n) bp[n] = n < N ? bias[n * bs] : 0.0f;
    }
    sg_mm(M, N, K, x, lx, &w, bp, y, ly);
    free(bp);
    sg_mm_release(&w);
    return 0;
}

/* ---- y (M, N) = a^T b: a (K, M), b (K, N), both row-major (rows la, lb apart) ----
   A weight gradient: the reduction runs over the rows of both operands. Neither can be read in
   place (a's columns are SG_MR adjacent values each a row apart, and rows are pages apart),
   so each block of SG_TN_KC rows is packed first: a into panels of SG_MR columns, b into
   panels of SG_NR, both k by k, zero-padded. The tiles then read both packs contiguously and
   add into y from the second block on. Returns 1 when memory runs out. */
#define SG_TN_KC 384
#define SG_TN_TAIL(m) case m: sg_mm_tile(m, kk, A, 1, SG_MR, P, SG_NR, 0, y, ly, nc, acc); break;
static void sg_tn_tile(int mr, int64_t kk, const float* A, const float* P, float* y, int64_t ly, int nc, int acc) {
    switch (mr) {
        SG_TN_TAIL(SG_MR)
#if SG_MR > 7
        SG_TN_TAIL(7)
#endif
#if SG_MR > 6
        SG_TN_TAIL(6)
#endif
        SG_TN_TAIL(5) SG_TN_TAIL(4) SG_TN_TAIL(3) SG_TN_TAIL(2) SG_TN_TAIL(1)
        default: break;
    }
}

static void sg_tn_pack(int64_t kk, const float* src, int64_t ls, int w, int width, float* dst) {
    for (int64_t k = 0; k < kk; ++k, src += ls, dst += width) {
        for (int c = 0; c < w; ++c) dst[c] = src[c];
        for (int c = w; c < width; ++c) dst[c] = 0.0f;
    }
}

int sg_matmul_tn(int64_t M, int64_t N, int64_t K, const float* a, int64_t la, const float* b, int64_t lb,
                 float* y, int64_t ly) {
    if (M == 0 || N == 0) return 0;
    if (K == 0) {
        for (int64_t m = 0; m < M; ++m) memset(y + m * ly, 0, sizeof(float) * (size_t)N);
        return 0;
    }
    int64_t nq = (M + SG_MR - 1) / SG_MR, np = (N + SG_NR - 1) / SG_NR;
    int64_t kc = K < SG_TN_KC ? K : SG_TN_KC;
    float* A = 0;
    float* P = 0;
    if (posix_memalign((void**)&A, 64, sizeof(float) * (size_t)(nq * SG_MR * kc)) != 0) return 1;
    if (posix_memalign((void**)&P, 64, sizeof(float) * (size_t)(np * SG_NR * kc)) != 0) { free(A); return 1; }
    int64_t qpi = SG_MM_ROWS / SG_MR;  /* a's panels per work item */
    int64_t nrb = (nq + qpi - 1) / qpi, items = np * nrb;
    int par = items > 1 && 2.0 * (double)M * (double)N * (double)K >= SG_MM_PARALLEL_FLOPS;
    (void)par;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        int64_t kk = K - k0 < kc ? K - k0 : kc;
        int acc = k0 > 0;
        SG_PRAGMA(omp parallel if(par))
        {
            SG_PRAGMA(omp for schedule(static) nowait)
            for (int64_t q = 0; q < nq; ++q)
                sg_tn_pack(kk, a + k0 * la + q * SG_MR, la, (int)(M - q * SG_MR < SG_MR ? M - q * SG_MR : SG_MR),
                           SG_MR, A + q * SG_MR * kk);
            SG_PRAGMA(omp for schedule(static))
            for (int64_t p = 0; p < np; ++p)
                sg_tn_pack(kk, b + k0 * lb + p * SG_NR, lb, (int)(N - p * SG_NR < SG_NR ? N - p * SG_NR : SG_NR),
                           SG_NR, P + p * SG_NR * kk);
            SG_PRAGMA(omp for schedule(static))
            for (int64_t it = 0; it < items; ++it) {
                int64_t p = it % np, q0 = (it / np) * qpi;
                int nc = (int)(N - p * SG_NR < SG_NR ? N - p * SG_NR : SG_NR);
                for (int64_t q = q0; q < q0 + qpi && q < nq; ++q)
                    sg_tn_tile((int)(M - q * SG_MR < SG_MR ? M - q * SG_MR : SG_MR), kk, A + q * SG_MR * kk,
                               P + p * SG_NR * kk, y + q * SG_MR * ly + p * SG_NR, ly, nc, acc);
            }
        }
    }
    free(A);
    free(P);
    return 0;
}
"""

GEMMS = ("seqgraph", "mkl")
_vendor: str | None = None
_libs: dict[tuple, ctypes.CDLL] = {}  # by the environment that names compiler, flags and cache


def cpu_vendor() -> str:
    """The CPU's vendor string from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...; "" if unknown)."""
    global _vendor
    if _vendor is None:
        _vendor = ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("vendor_id"):
                        _vendor = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return _vendor


def per_step_gemm() -> str:
    """Which float32 GEMM the cpu backend runs: "seqgraph" (SG_MM_SOURCE) on AMD CPUs, where
    MKL takes a generic code path and this kernel measured 1.2-2x faster than it (an EPYC);
    "mkl" elsewhere: MKL's own on Intel CPUs, where it measured fastest, and torch's own GEMM
    on CPUs where neither was measured (ARM, other x86 vendors). $SEQGRAPH_CPU_GEMM overrides
    the choice by vendor."""
    forced = env("SEQGRAPH_CPU_GEMM", "").strip().lower()
    if forced:
        if forced not in GEMMS:
            raise ValueError(f"SEQGRAPH_CPU_GEMM must be one of {', '.join(GEMMS)}, got {forced!r}")
        return forced
    return "seqgraph" if cpu_vendor() == "AuthenticAMD" else "mkl"


def _library():
    """The compiled sg_matmul (built once per machine and flags into the kernel cache, then loaded)."""
    env = (os.environ.get("CC"), os.environ.get("SEQGRAPH_CFLAGS"), os.environ.get("SEQGRAPH_CACHE_DIR"))
    lib = _libs.get(env)
    if lib is None:
        from . import c_launch
        from .cache import cache_dir
        cc = c_launch.find_compiler()
        if cc is None:
            raise c_launch.CompilerMissing("seqgraph's CPU GEMM needs a C compiler (set $CC, or install gcc)")
        key = hashlib.sha256(repr((MATMUL_SOURCE, c_launch._compiler_id(cc), c_launch.cflags(), c_launch._BASE_FLAGS,
                                   c_launch.openmp_flags(), c_launch._cpu_features(), sys.platform))
                             .encode()).hexdigest()[:24]
        path = cache_dir() / "cpu" / f"gemm{key}.so"
        lib, _ = c_launch.cached_library(path, lambda: c_launch._build(MATMUL_SOURCE, path, "float"))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.sg_matmul.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, i64, ptr, i64, ptr, i64]
        lib.sg_matmul.restype = ctypes.c_int
        lib.sg_matmul_tn.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, i64]
        lib.sg_matmul_tn.restype = ctypes.c_int
        _libs[env] = lib
    return lib


def mm_pointers() -> tuple[int, int, int]:
    """The addresses of sg_mm_prepare, sg_mm_release and sg_mm (building the library if needed)."""
    lib = _library()
    return tuple(ctypes.cast(getattr(lib, f), ctypes.c_void_p).value for f in ("sg_mm_prepare", "sg_mm_release", "sg_mm"))


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors take seqgraph's GEMM (float32 CPU tensors, when chosen;
    never inside torch.compile, which traces torch's own products and calls its own GEMM, nor
    under CPU autocast, which runs products in its own dtype)."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    for t in tensors:  # (a loop and is_cpu: every hoisted product of a one-step call asks)
        if not t.is_cpu or t.dtype != torch.float32:
            return False
    return per_step_gemm() == "seqgraph"


def _call(x: torch.Tensor, w_n_k: tuple, N: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) with unit column stride times W^T, W given as (pointer tensor, s0, s1)."""
    w, s0, s1 = w_n_k
    M, K = x.shape
    y = torch.empty((M, N), dtype=torch.float32)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(M, N))
    rc = _library().sg_matmul(M, N, K, x.data_ptr(), x.stride(0), w.data_ptr(), s0, s1,
                              bias.data_ptr() if bias is not None else None,
                              bias.stride(0) if bias is not None else 0, y.data_ptr(), N)
    if rc:
        raise MemoryError(f"seqgraph's CPU GEMM could not allocate its packed copy of a {N}x{K} matrix")
    return y


# Where torch's GEMM is faster than ours (both measured on a 2-core EPYC, one thread,
# docs/kernels.md). sg_mm copies a weight it cannot read in place (an nn.Linear weight (N, K),
# which every hoisted product multiplies) into panels at every call, N*K copies: below
# PACKED_MIN_ROWS rows of x that costs more than it saves (4 x 512 by 2048 x 512: 5x torch's
# time; 128 rows: 1.0-1.2x). The same rule as the C loops' SG_PACK_MIN_ROWS. Under TINY_FLOPS
# (some 2.5 us of one core's work) the call through ctypes costs more than the product.
# sg_matmul_tn packs both operands: below TN_MIN_ROWS rows torch's is faster (R=16: 1.5x).
PACKED_MIN_ROWS, TINY_FLOPS, TN_MIN_ROWS = 128, 262144, 64


def _torch_is_faster(M: int, N: int, K: int, packs: bool) -> bool:
    """Whether a product x (M, K) times a weight (N, K) runs faster in torch's GEMM; `packs`:
    sg_mm would copy the weight into panels first."""
    return 2 * M * N * K < TINY_FLOPS or packs and M < PACKED_MIN_ROWS


def _read_in_place(s0: int, s1: int) -> bool:
    """Whether sg_mm_prepare reads a weight with these strides where it lies (its `direct`)."""
    return s0 == 1 and s1 * 4 <= 4096


def _mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (K, N) (+ bias (N,)), b with any strides, without autograd; torch's GEMM
    where `_torch_is_faster`."""
    M, K = a.shape
    N = b.shape[1]
    if _torch_is_faster(M, N, K, packs=not _read_in_place(b.stride(1), b.stride(0))):
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    if a.stride(1) != 1 and K > 1:
        a = a.contiguous()
    return _call(a, (b, b.stride(1), b.stride(0)), N, bias)


class _Linear(torch.autograd.Function):
    """x @ w.T + b through seqgraph's GEMM, forward and backward."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _mm(x, w.t(), b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dx = _mm(g, w) if ctx.needs_input_grad[0] else None
        dw = wgrad(g, x) if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b) for rows x (M, K); seqgraph's GEMM where `enabled` and the shapes
    match exactly, else torch's (which broadcasts a bias or names the mismatch)."""
    ts = (x, w) if b is None else (x, w, b)
    exact = x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1] and \
        (b is None or tuple(b.shape) == (w.shape[0],))
    if not exact or not enabled(*ts) or _torch_is_faster(x.shape[0], w.shape[0], x.shape[1],
                                                         packs=not _read_in_place(w.stride(0), w.stride(1))):
        return torch.nn.functional.linear(x, w, b)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)):
        return _mm(x, w.t(), b)  # (no graph to record: a Function's apply costs some 6 us)
    return _Linear.apply(x, w, b)


def wgrad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g^T @ x summed over every leading index: g (..., N), x (..., K) -> (N, K), a weight
    gradient; seqgraph's GEMM (sg_matmul_tn) where `enabled` and the leading dims match, else
    torch's (which names a mismatch)."""
    if g.dim() == 0 or x.dim() == 0 or g.shape[:-1] != x.shape[:-1]:
        return g.t() @ x  # torch names the mismatch
    g, x = g.reshape(math.prod(g.shape[:-1]), g.shape[-1]), x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if not enabled(g, x) or g.shape[0] < TN_MIN_ROWS:
        return g.t() @ x
    R, N = g.shape
    K = x.shape[1]
    if g.stride(1) != 1 or g.stride(0) < max(N, 1):
        g = g.contiguous()
    if x.stride(1) != 1 or x.stride(0) < max(K, 1):
        x = x.contiguous()
    y = torch.empty((N, K), dtype=torch.float32)
    if _library().sg_matmul_tn(N, K, R, g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), y.data_ptr(), K):
        raise MemoryError(f"seqgraph's CPU GEMM could not allocate its packed blocks for a {N}x{K} weight gradient")
    return y


def addmm(addend: torch.Tensor, x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """torch.addmm(addend, x, wt) with wt = w.t(): rows x (M, K), a bias (N,) or rows (M, N)."""
    if addend.dim() == 1:
        return _bias_addmm(addend, x, wt)
    w = wt.t()
    exact = x.dim() == 2 and wt.dim() == 2 and tuple(addend.shape) == (x.shape[0], wt.shape[1])
    if not exact or not enabled(addend, x, wt):
        return torch.addmm(addend, x, wt)
    return linear(x, w) + addend


def addmm_(addend: torch.Tensor, x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """addend += x @ wt in place, for rows x (M, K) and addend (M, N): seqgraph's GEMM where
    `enabled` and the shapes match exactly, its product then added into addend; else
    add_product_into (torch's)."""
    exact = x.dim() == 2 and wt.dim() == 2 and tuple(addend.shape) == (x.shape[0], wt.shape[1])
    if exact and enabled(addend, x, wt):
        return addend.add_(linear(x, wt.t()))
    return add_product_into(addend, x, wt)


def add_product_into(addend: torch.Tensor, x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """addend + x @ wt by torch's GEMM, added into addend (a product's output that nothing else
    reads); under autocast, whose product may come in another dtype than addend's, torch.addmm's
    new tensor."""
    if torch.is_autocast_enabled(addend.device.type):
        return torch.addmm(addend, x, wt)
    return addend.addmm_(x, wt)


def _bias_addmm(bias: torch.Tensor, x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """linear(x, wt.t(), bias). Where torch's GEMM runs it, torch.addmm(bias, x, wt) itself:
    what F.linear runs for rows x and a bias (aten's linear is addmm(bias, x, weight.t())),
    without the two transposed views on the way (a hoisted product of every one-step call)."""
    exact = x.dim() == 2 and wt.dim() == 2 and x.shape[1] == wt.shape[0] and tuple(bias.shape) == (wt.shape[1],)
    if exact and not enabled(x, wt, bias):
        return torch.addmm(bias, x, wt)
    return linear(x, wt.t(), bias)


__all__ = ["SG_MM_API", "SG_MM_SOURCE", "mm_pointers", "per_step_gemm", "cpu_vendor", "enabled", "linear", "addmm", "addmm_",
           "add_product_into", "wgrad"]
