"""`python -m seqgraph demo`: train a custom gated cell on the adding problem, on padded batches.

The adding problem: each step carries a random value and a 0/1 marker; exactly two steps of a
sequence are marked, and the target is the sum of their two values. Sequences have different
lengths (padded to T), so the cell must carry the first marked value across many steps and the
answer is read from each sequence's state at its own last step. Predicting the mean of the
target scores the target's variance (about 1/6); the demo reports whether training beat that.
This module is a user of the public API only; it must not reach into seqgraph's internals.
"""
from __future__ import annotations

import argparse
import time

import torch

import seqgraph as sg

T, HIDDEN = 30, 24


def make_cell(hidden: int = HIDDEN) -> sg.Cell:
    """A minimal gated cell: one gate decides how much of a new candidate enters the state."""
    x, h = sg.Input(2, name="x"), sg.State(hidden, name="h")
    xh = sg.concat([x, h])
    keep = sg.sigmoid(sg.Linear(2 + hidden, hidden, name="gate")(xh))
    cand = sg.tanh(sg.Linear(2 + hidden, hidden, name="candidate")(xh))
    h_next = keep * h + (1 - keep) * cand
    return sg.Cell(inputs=[x], states={h: h_next}, name="gated")


def adding_batch(batch: int, steps: int = T, generator: torch.Generator | None = None):
    """(x, lengths, target): x is (T, B, 2) = (value, marker), zero after each sequence's end."""
    lengths = torch.randint(steps // 2, steps + 1, (batch,), generator=generator)
    values = torch.rand(steps, batch, generator=generator)
    markers = torch.zeros(steps, batch)
    for b, n in enumerate(lengths.tolist()):
        first = int(torch.randint(0, n // 2, (), generator=generator))
        second = int(torch.randint(n // 2, n, (), generator=generator))
        markers[first, b] = markers[second, b] = 1.0
    pad = torch.arange(steps)[:, None] >= lengths[None, :]
    values[pad] = 0.0
    x = torch.stack([values, markers], dim=-1)
    target = (values * markers).sum(0)
    return x, lengths, target


def build_model(cell: sg.Cell, backend: str = "auto") -> torch.nn.Module:
    """The cell compiled for `backend` ("auto": C kernels on a CPU with a C compiler, Triton on
    a GPU, else the torch code), or the uncompiled reference Recurrence ("reference")."""
    return sg.compile(cell, backend=backend) if backend != "reference" else sg.Recurrence(cell)


def main(argv: list[str] | None = None) -> int:
    """Train and report; returns 0 when the trained model beat the trivial baseline."""
    parser = argparse.ArgumentParser(prog="python -m seqgraph demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--batch", type=int, default=64, help="sequences per batch (default 64)")
    parser.add_argument("--every", type=int, default=50, help="print the loss every N steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default 0)")
    parser.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch", "triton", "reference"],
                        help="how the cell runs (default auto)")
    args = parser.parse_args(argv)
    for flag in ("steps", "batch", "every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must lie in [0, 2**63), got {args.seed}")

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    cell = make_cell()
    from .kernels.c_launch import CompilerMissing
    try:
        rnn = build_model(cell, args.backend)
    except CompilerMissing as e:
        parser.error(f"--backend {args.backend}: {e}")
    readout = torch.nn.Linear(HIDDEN, 1)
    opt = torch.optim.Adam([*rnn.parameters(), *readout.parameters()], lr=1e-2)

    def predict(x, lengths):
        _, final = rnn(x, lengths=lengths)  # final["h"]: each sequence's state at its own last step
        return readout(final["h"]).squeeze(-1)

    runs = rnn.backend_for() if hasattr(rnn, "backend_for") else "reference"
    print(f"adding problem, T={T}, lengths {T // 2}..{T}, batch {args.batch}; cell {cell!r}; "
          f"backend {args.backend}" + (f" (runs {runs})" if runs != args.backend else ""))
    start, running = time.time(), None
    for step in range(1, args.steps + 1):
        x, lengths, target = adding_batch(args.batch, generator=data)
        loss = torch.nn.functional.mse_loss(predict(x, lengths), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {running:.4f}  ({time.time() - start:.1f} s)")

    x, lengths, target = adding_batch(1000, generator=data)
    with torch.no_grad():
        test = torch.nn.functional.mse_loss(predict(x, lengths), target).item()
    baseline = target.var(unbiased=False).item()
    beat = test < baseline
    print(f"test MSE {test:.4f} vs baseline {baseline:.4f} (variance of the target): "
          f"{'beat the trivial baseline' if beat else 'did NOT beat the trivial baseline'}")
    return 0 if beat else 1


if __name__ == "__main__":
    raise SystemExit(main())
