"""Where skipping the padding in the work over all steps pays: REAL_ROWS_BELOW's measurement.

An LSTM fwd+bwd (sg.nn.LSTM, cpu backend where there is a C compiler) on a batch with one
full-length sequence and the rest of equal length, at 62%, 70%, 80% and 90% real steps, run
with the hoisted products and weight gradients over all T*B rows and over the real rows only,
taken in turn (`seqgraph.bench.interleaved_medians_ms`).

    python benchmarks/real_rows_threshold.py [T B H [reps [shuffle]]]     (default 200 32 256 9)
"""
import sys

import torch

import seqgraph as sg
import seqgraph.compiler.codegen_torch as codegen_torch
from seqgraph.bench import interleaved_medians_ms

SHARES = (0.62, 0.7, 0.8, 0.9)


def main(T: int = 200, B: int = 32, H: int = 256, reps: int = 9, shuffle: bool = False) -> None:
    torch.manual_seed(0)
    lstm = sg.nn.LSTM(H, H)
    x = torch.randn(T, B, H, requires_grad=True)

    def lengths(share: float) -> torch.Tensor:
        n = torch.full((B,), T)
        n[1:] = max(0, min(T, int(round((share * T * B - T) / max(B - 1, 1)))))
        return n[torch.randperm(B)] if shuffle else n

    def run(n: torch.Tensor, real_rows_below: float):
        def once():
            codegen_torch.REAL_ROWS_BELOW = real_rows_below
            lstm(x, lengths=n)[0].sum().backward()
        return once

    kept = codegen_torch.REAL_ROWS_BELOW
    print(f"LSTM fwd+bwd T={T} B={B} H={H}, {'shuffled' if shuffle else 'sorted'} lengths, median ms")
    print("| real steps | all rows | real rows only | ratio |\n|---:|---:|---:|---:|")
    try:
        for share in SHARES:
            n = lengths(share)
            every, real = interleaved_medians_ms([run(n, -1.0), run(n, 1.0)], torch.device("cpu"), reps, burst=2)
            print(f"| {float(n.sum()) / (T * B):.0%} | {every:.2f} | {real:.2f} | {real / every:.2f} |")
    finally:
        codegen_torch.REAL_ROWS_BELOW = kept


if __name__ == "__main__":
    args = sys.argv[1:]
    shuffled = "shuffle" in args
    main(*map(int, [a for a in args if a != "shuffle"]), shuffle=shuffled)
