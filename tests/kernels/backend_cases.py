"""Cells and the comparison shared by the backend tests (triton and cpu): every zoo and built-in
cell, run through a compiled module and the reference runtime on the same inputs and weights."""
import os
import sys

import torch

import seqgraph as sg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler"))
from zoo import ZOO  # noqa: E402

BUILTIN = {
    "lstm": lambda: sg.cells.lstm(3, 5),
    "lstm_peephole_proj": lambda: sg.cells.lstm(3, 6, peephole=True, proj_size=4),
    "lstm_layer_norm": lambda: sg.cells.lstm(3, 5, layer_norm=True),
    "gru": lambda: sg.cells.gru(3, 5),
    "gru_seed_form": lambda: sg.cells.gru(3, 5, reset_after=False),
    "rnn_relu": lambda: sg.cells.rnn(3, 5, nonlinearity="relu"),
    "mufuru": lambda: sg.cells.mufuru(3, 4),
    "indrnn": lambda: sg.cells.indrnn(3, 5),
    "qrnn": lambda: sg.cells.qrnn(3, 5),
    "qrnn_window_3": lambda: sg.cells.qrnn(3, 5, window=3),
    "mlstm": lambda: sg.cells.mlstm(3, 4),
}
CASES = {**{f"zoo_{k}": v for k, v in ZOO.items()}, **BUILTIN}


def run(module, xs, ctx, **kw):
    torch.manual_seed(1)  # the same dropout noise in both runs
    out, state = module(tuple(xs), context=ctx, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    return outs, state


def loss(outs, state):
    return sum((o.float() * torch.linspace(0.1, 1, o.shape[-1], device=o.device)).sum() for o in outs) + \
        sum((v.float() ** 2).sum() for v in state.values())


def check_against_reference(rec, comp, xs, ctx, tol, **kw):
    """Outputs and final states within `tol`, gradients of every input, context and parameter
    within 10 tol."""
    o1, s1 = run(rec, xs, ctx, **kw)
    o2, s2 = run(comp, xs, ctx, **kw)
    for a, b in zip(o1, o2, strict=True):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=tol, rtol=tol)
    ctx_leaves = [c for c in (ctx or {}).values() if c.requires_grad]
    wrt = [x for x in xs if x.requires_grad] + ctx_leaves + list(rec.parameters())
    g1 = torch.autograd.grad(loss(o1, s1), wrt, allow_unused=True)
    g2 = torch.autograd.grad(loss(o2, s2), wrt, allow_unused=True)
    for a, b in zip(g1, g2, strict=True):
        if a is not None:
            torch.testing.assert_close(b, a, atol=tol * 10, rtol=tol * 10)
