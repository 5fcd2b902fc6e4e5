"""Padded batches: what skipping the padding saves, against torch.nn.LSTM padded and packed.

An LSTM fwd+bwd on a batch whose lengths are drawn uniformly from [lo * T, T], taken in turn
(`seqgraph.bench.interleaved_medians_ms`), with sg.nn.LSTM's default backend ("auto": the C
kernels on a CPU):

  sg sorted      lengths longest first: each step's products skip the rows that have ended
  sg shuffled    the same lengths in random order (the C loops run them longest first)
  sg as given    the shuffled batch run in its own order (seqgraph.compiled.SORT_BELOW off)
  sg packed      a PackedSequence of the shuffled batch (sg.nn runs it longest first, as packed)
  sg no skip     the sorted batch with both kinds of skipping switched off (every row, every step)
  nn.LSTM padded / packed   oneDNN on the padded batch, and on a PackedSequence of it

    python benchmarks/padded_batches.py [T B H [reps [lo]]]     (default 50 64 256 11 0)
"""
import sys

import torch

import seqgraph as sg
import seqgraph.compiled as compiled
import seqgraph.compiler.codegen_torch as codegen_torch
from seqgraph.bench import interleaved_medians_ms


def main(T: int = 50, B: int = 64, H: int = 256, reps: int = 11, lo: float = 0.0) -> None:
    torch.manual_seed(0)
    ref = torch.nn.LSTM(H, H)
    lstm = sg.nn.LSTM(H, H)
    lstm.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H)
    lengths = torch.randint(max(1, int(lo * T)), T + 1, (B,)).sort(descending=True).values
    perm = torch.randperm(B)
    shuffled = lengths[perm]
    real_rows_below = codegen_torch.REAL_ROWS_BELOW
    every_step = torch.ones(T, B, dtype=torch.bool)  # a mask: the loop's trailing-row skip never fires

    def seqgraph_run(lens, skip=True):
        def run():
            codegen_torch.REAL_ROWS_BELOW = real_rows_below if skip else -1.0
            if skip:
                out, _ = lstm(x, lengths=lens)
            else:  # the same work as a mask that skips nothing, then padded steps zeroed
                mask = torch.arange(T)[:, None] < lens[None, :]
                out, _ = lstm(x, mask=every_step)
                out = out * mask[..., None]
            out.sum().backward()
        return run

    def seqgraph_as_given():
        sort_below = compiled.SORT_BELOW
        compiled.SORT_BELOW = -1.0  # (never sorts)
        try:
            seqgraph_run(shuffled)()
        finally:
            compiled.SORT_BELOW = sort_below

    def seqgraph_packed():
        out, _ = lstm(torch.nn.utils.rnn.pack_padded_sequence(x[:, perm], shuffled, enforce_sorted=False))
        out.data.sum().backward()

    def torch_padded():
        out, _ = ref(x)
        (out * (torch.arange(T)[:, None] < lengths[None, :])[..., None]).sum().backward()

    def torch_packed():
        out, _ = ref(torch.nn.utils.rnn.pack_padded_sequence(x, lengths))
        out.data.sum().backward()

    peers = {"sg sorted": seqgraph_run(lengths), "sg shuffled": seqgraph_run(shuffled),
             "sg as given": seqgraph_as_given, "sg packed": seqgraph_packed,
             "sg no skip": seqgraph_run(lengths, skip=False), "nn.LSTM padded": torch_padded,
             "nn.LSTM packed": torch_packed}
    try:
        ms = interleaved_medians_ms(list(peers.values()), torch.device("cpu"), reps)
    finally:
        codegen_torch.REAL_ROWS_BELOW = real_rows_below
    real = lengths.sum().item() / (T * B)
    print(f"LSTM fwd+bwd, T={T} B={B} H={H}, {real:.0%} of the steps real, {torch.get_num_threads()} threads")
    base = ms[list(peers).index("nn.LSTM padded")]
    for name, m in zip(peers, ms):
        print(f"  {name:16s} {m:8.2f} ms  {m / base:5.2f}x")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*[int(a) for a in args[:4]], *[float(a) for a in args[4:5]])
