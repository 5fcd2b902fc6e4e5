"""Triton helpers written into a kernel's source: the row ops of flattened per-example
matrices, and the layer norm's derivative over a whole row.

A fused kernel holds each value as a register tile [rows, BLOCK_W] over its flattened columns
(codegen.py). A row of an (M, N) matrix is laid out in BM * BN columns, BM and BN the powers of
two at or above M and N, the matrix's (m, n) in column m * BN + n (when N is a power of two,
that is the row's own order), so `tl.reshape` turns it into a [rows, BM, BN] tile and back,
and the row ops that flatten_per_example_matrices writes (matvec, vecmat, outer, tile,
repeat_each, sum_tiles, sum_groups, softmax_groups) become products, broadcasts and sums
along one axis of that tile. Rows past M and columns past N are padding: sums over them mask
them out (`sg_rows_below`, `sg_cols_below`), and what they hold elsewhere is never stored.
No value moves between columns (that would take tl.gather). `sg_layer_norm_grad` writes each
of the derivative's four row sums once (inline, x's mean alone would be written nine times).
The registry's Triton emitters (compiler/ops.py) call these by name; codegen.py writes
`SOURCE` into every kernel that calls one. This module holds source text only: it must not compile or launch anything.
"""
from __future__ import annotations

SOURCE = '''
@triton.jit
def sg_matrix(x, BM: tl.constexpr, BN: tl.constexpr):
    """A row x [R, BM * BN] of an (M, N) matrix (M <= BM, N <= BN) as a tile [R, BM, BN]."""
    return tl.reshape(x, (x.shape[0], BM, BN))


@triton.jit
def sg_flat(y):
    """A matrix tile y [R, BM, BN] as its row [R, BM * BN]."""
    return tl.reshape(y, (y.shape[0], y.shape[1] * y.shape[2]))


@triton.jit
def sg_rows_below(M: tl.constexpr, BM: tl.constexpr):
    """[1, BM, 1]: which rows of a matrix tile hold the matrix (the others are padding)."""
    return (tl.arange(0, BM) < M)[None, :, None]


@triton.jit
def sg_cols_below(N: tl.constexpr, BN: tl.constexpr):
    """[1, 1, BN]: which columns of a matrix tile hold the matrix (the others are padding)."""
    return (tl.arange(0, BN) < N)[None, None, :]


@triton.jit
def sg_softmax_groups(x, BM: tl.constexpr, N: tl.constexpr, BN: tl.constexpr):
    """softmax along each matrix row of a row x [R, BM * BN] of an (M, N) matrix."""
    v = tl.where(sg_cols_below(N, BN), sg_matrix(x, BM, BN), float("-inf"))
    e = tl.exp(v - tl.max(v, axis=2)[:, :, None])
    return sg_flat(e / tl.sum(e, axis=2)[:, :, None])


@triton.jit
def sg_layer_norm_grad(g, x, inside, W: tl.constexpr, eps: tl.constexpr):
    """layer_norm's derivative for the output gradient g, over rows x of W values (`inside`:
    their columns): rstd * (g - mean(g) - y * mean(g * y)), y = (x - mean(x)) * rstd."""
    mean = tl.sum(tl.where(inside, x, 0.0), axis=1)[:, None] / W
    xc = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1)[:, None] / W + eps)
    y = xc * rstd
    mg = tl.sum(tl.where(inside, g, 0.0), axis=1)[:, None] / W
    mgy = tl.sum(tl.where(inside, g * y, 0.0), axis=1)[:, None] / W
    return rstd * (g - mg - y * mgy)
'''

__all__ = ["SOURCE"]
