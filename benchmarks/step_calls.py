"""One step per call: what a step-by-step decoder pays per call, against torch.nn.LSTMCell.

Each timed run is `calls` calls of one step (T=1, no gradients), the state passed back in, for
an LSTM of hidden size H on B rows: sg.Recurrence uncompiled, compiled with backend="auto",
sg.nn.LSTMCell (torch's interface, backend="auto"), and torch.nn.LSTMCell. Runs are taken in turn (`seqgraph.bench.interleaved_medians_ms`); the
table gives the median time per call.

    python benchmarks/step_calls.py [B H [threads [reps]]]     (default 4 32 1 15)
"""
import sys

import torch

import seqgraph as sg
from seqgraph.bench import interleaved_medians_ms


def main(B: int = 4, H: int = 32, threads: int = 1, reps: int = 15, calls: int = 200) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rec = sg.Recurrence(sg.cells.lstm(H, H))
    fast = sg.compile(rec)
    cell = torch.nn.LSTMCell(H, H)
    sg_cell = sg.nn.LSTMCell(H, H)
    sg_cell.load_state_dict(cell.state_dict())
    x = torch.randn(1, B, H)

    def steps(module):
        def run():
            state = {"h": torch.zeros(B, H), "c": torch.zeros(B, H)}
            with torch.no_grad():
                for _ in range(calls):
                    _, state = module(x, state)
        return run

    def cell_steps(module):
        def run():
            state = (torch.zeros(B, H), torch.zeros(B, H))
            with torch.no_grad():
                for _ in range(calls):
                    state = module(x[0], state)
        return run

    names = ["sg.Recurrence (reference)", f"sg.compile ({fast.backend_for()})",
             f"sg.nn.LSTMCell ({sg_cell.recurrence().backend_for()})", "torch.nn.LSTMCell"]
    medians = interleaved_medians_ms([steps(rec), steps(fast), cell_steps(sg_cell), cell_steps(cell)],
                                     torch.device("cpu"), reps)
    print(f"one LSTM step per call, B={B} H={H}, {threads} thread(s), no gradients: median us per call")
    print("| module | us per call | vs LSTMCell |\n|---|---:|---:|")
    for name, ms in zip(names, medians, strict=True):
        print(f"| {name} | {1e3 * ms / calls:.1f} | {ms / medians[-1]:.2f}x |")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
