"""Triton helpers for the row ops of flattened per-example matrices, written into a kernel's source.

A fused kernel holds each value as a register tile [rows, BLOCK_W] over its flattened columns
(codegen.py). The row ops that flatten_per_example_matrices writes (matvec, vecmat, outer,
tile, repeat_each, sum_tiles, sum_groups, softmax_groups, strided_matmul) move values between
columns, which registers cannot index; these `@triton.jit` functions do it with `tl.gather`
along the columns and `tl.reshape` into [rows, BM, BN] tiles (BM, BN: powers of two covering
M and N). Lanes past a row's end hold repeats of valid values, never out-of-range reads, and
every sum masks them out. The registry's Triton emitters (compiler/ops.py) call these by
name; codegen.py writes `SOURCE` into every kernel that uses one. This module holds source
text only: it must not compile or launch anything.
"""
from __future__ import annotations

SOURCE = '''
@triton.jit
def sg_take(x, index):
    """x [R, W] at the columns `index` [1, V] (each below W): [R, V]."""
    return tl.gather(x, tl.broadcast_to(index, (x.shape[0], index.shape[1])), axis=1)


@triton.jit
def sg_matrix(x, M: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """A row x [R, W] of an (M, N) matrix, row-major, as a tile [R, BM, BN]."""
    i = tl.arange(0, BM * BN)[None, :]
    return tl.reshape(sg_take(x, tl.minimum((i // BN) * N + i % BN, M * N - 1)), (x.shape[0], BM, BN))


@triton.jit
def sg_inside(M: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """[1, BM, BN]: the lanes of an sg_matrix tile that hold the matrix."""
    return ((tl.arange(0, BM)[:, None] < M) & (tl.arange(0, BN)[None, :] < N))[None, :, :]


@triton.jit
def sg_flat(y, M: tl.constexpr, N: tl.constexpr, BW: tl.constexpr):
    """A tile y [R, BM, BN] of an (M, N) matrix as its row-major row [R, BW]."""
    j = tl.arange(0, BW)[None, :]
    rows = tl.reshape(y, (y.shape[0], y.shape[1] * y.shape[2]))
    return sg_take(rows, tl.minimum((j // N) * y.shape[2] + j % N, (M - 1) * y.shape[2] + N - 1))


@triton.jit
def sg_softmax_groups(x, M: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
    """softmax over each N consecutive values of a row x of M * N."""
    inside = sg_inside(M, N, BM, BN)
    v = tl.where(inside, sg_matrix(x, M, N, BM, BN), float("-inf"))
    e = tl.where(inside, tl.exp(v - tl.max(v, axis=2)[:, :, None]), 0.0)
    return sg_flat(e / tl.sum(e, axis=2)[:, :, None], M, N, BW)


@triton.jit
def sg_strided_matmul(a, b, G: tl.constexpr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                      AG: tl.constexpr, AM: tl.constexpr, AK: tl.constexpr,
                      BG: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                      OG: tl.constexpr, OM: tl.constexpr, ON: tl.constexpr,
                      BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row, (G, M, K) read from a through strides (AG, AM, AK) times (G, K, N) read from b
    through (BG, BK, BN), written through (OG, OM, ON): [R, BLOCK_O]. Output column o holds
    g = o // OG % G, m = o // OM % M, n = o // ON % N (a size-1 dim has stride 1 here)."""
    o = tl.arange(0, BLOCK_O)[:, None]
    k = tl.arange(0, BLOCK_K)[None, :]
    g, m, n = o // OG % G, o // OM % M, o // ON % N
    inside = (o < G * M * N) & (k < K)
    ia = tl.reshape(tl.where(inside, g * AG + m * AM + k * AK, 0), (1, BLOCK_O * BLOCK_K))
    ib = tl.reshape(tl.where(inside, g * BG + k * BK + n * BN, 0), (1, BLOCK_O * BLOCK_K))
    pa = tl.reshape(sg_take(a, ia), (a.shape[0], BLOCK_O, BLOCK_K))
    pb = tl.reshape(sg_take(b, ib), (b.shape[0], BLOCK_O, BLOCK_K))
    return tl.sum(tl.where(inside[None, :, :], pa * pb, 0.0), axis=2)
'''

HELPERS = ("sg_take", "sg_matrix", "sg_inside", "sg_flat", "sg_softmax_groups", "sg_strided_matmul")

__all__ = ["SOURCE", "HELPERS"]
