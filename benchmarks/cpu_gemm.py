"""seqgraph's float32 CPU GEMM (seqgraph/kernels/cpu_gemm.py) against torch's, product by product.

Usage: python benchmarks/cpu_gemm.py [--reps N]

For the products an LSTM runs outside its time loop at the benchmark sizes (T=50 B=16 H=128,
T=20 B=64 H=256 and T=100 B=64 H=512): the hoisted product over all T*B rows, and the weight
gradient reduced over all T*B rows (g^T x). Each pair is timed in turn
(bench.interleaved_medians_ms), on every thread torch uses, and printed as a Markdown table of
medians. torch's GEMM is MKL's where torch was built with it. The per-step products run inside
the C loops with their weight packed once per call; `python -m seqgraph bench` measures them
there. Times nothing in the test suite.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from seqgraph.bench import cpu_model, interleaved_medians_ms
from seqgraph.kernels import cpu_gemm

# (what, M, N, K): forward products y (M, N) = x (M, K) W^T; weight gradients (N, K) = g^T x over M rows
PRODUCTS = [
    ("hoisted, T*B=800 H=128", "fwd", 800, 512, 128),
    ("weight gradient, T*B=800 H=128", "wgrad", 800, 512, 128),
    ("hoisted, T*B=1280 H=256", "fwd", 1280, 1024, 256),
    ("weight gradient, T*B=1280 H=256", "wgrad", 1280, 1024, 256),
    ("hoisted, T*B=6400 H=512", "fwd", 6400, 2048, 512),
    ("weight gradient, T*B=6400 H=512", "wgrad", 6400, 2048, 512),
]


def pair(kind: str, M: int, N: int, K: int):
    """torch's product and seqgraph's, as two thunks computing the same thing."""
    if kind == "fwd":
        x, w = torch.randn(M, K), torch.randn(N, K)
        return (lambda: torch.nn.functional.linear(x, w)), (lambda: cpu_gemm.linear(x, w))
    g, x = torch.randn(M, N), torch.randn(M, K)
    return (lambda: g.t() @ x), (lambda: cpu_gemm.wgrad(g, x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=21)
    args = ap.parse_args()
    os.environ["SEQGRAPH_CPU_GEMM"] = "seqgraph"  # cpu_gemm's own, whatever the vendor
    torch.manual_seed(0)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, float32, medians of {args.reps}\n")
    print("| product | M x N x K | torch | seqgraph | ratio |")
    print("|---|---|---:|---:|---:|")
    for what, kind, M, N, K in PRODUCTS:
        ref, own = pair(kind, M, N, K)
        torch.testing.assert_close(own(), ref(), rtol=1e-4, atol=1e-3 * K ** 0.5)
        reps = max(3, args.reps // 4) if M * N * K > 10**9 else args.reps
        t_ref, t_own = interleaved_medians_ms([ref, own], torch.device("cpu"), reps)
        print(f"| {what} | {M} x {N} x {K} | {t_ref * 1e3:.0f} us | {t_own * 1e3:.0f} us | {t_own / t_ref:.2f}x |")
    # the rate of sg_mm's register tiles with every operand in cache: what the products could reach
    x, w = torch.randn(512, 256), torch.randn(512, 256)
    times = []
    for _ in range(10 * args.reps):
        t0 = time.perf_counter()
        cpu_gemm.linear(x, w)
        times.append(time.perf_counter() - t0)
    print(f"\nin cache, 512 x 512 x 256 (sg_mm), best of {len(times)}: "
          f"{2 * 512 * 512 * 256 / min(times) / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
