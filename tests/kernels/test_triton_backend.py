"""The triton backend against the reference interpreter: every zoo and built-in cell, random cells,
masking; on the CPU through TRITON_INTERPRET=1, on CUDA (float32, bfloat16, float16) when present.

Tolerances: kernels compute in float32 and agree with the float32 reference to 1e-5 (values)
and 1e-4 (gradients, summed over steps); bfloat16 and float16 are compared with the float32
reference run at relative error 3e-2 (bf16) and 1e-2 (fp16) of each tensor's norm. A float64
model under backend="triton" runs the torch backend's code (kernels would round it to float32).
"""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import seqgraph as sg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler"))
from zoo import ZOO, make_inputs  # noqa: E402
from strategies import build_cell, cell_recipes  # noqa: E402

BUILTIN = {
    "lstm": lambda: sg.cells.lstm(3, 5),
    "lstm_peephole_proj": lambda: sg.cells.lstm(3, 6, peephole=True, proj_size=4),
    "lstm_layer_norm": lambda: sg.cells.lstm(3, 5, layer_norm=True),
    "gru": lambda: sg.cells.gru(3, 5),
    "gru_seed_form": lambda: sg.cells.gru(3, 5, reset_after=False),
    "rnn_relu": lambda: sg.cells.rnn(3, 5, nonlinearity="relu"),
    "mufuru": lambda: sg.cells.mufuru(3, 4),
    "indrnn": lambda: sg.cells.indrnn(3, 5),
}


def _run(module, xs, ctx, **kw):
    torch.manual_seed(1)
    out, state = module(tuple(xs), context=ctx, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    return outs, state


def _loss(outs, state):
    return sum((o.float() * torch.linspace(0.1, 1, o.shape[-1], device=o.device)).sum() for o in outs) + \
        sum((v.float() ** 2).sum() for v in state.values())


def _check(rec, comp, xs, ctx, tol, **kw):
    o1, s1 = _run(rec, xs, ctx, **kw)
    o2, s2 = _run(comp, xs, ctx, **kw)
    for a, b in zip(o1, o2):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=tol, rtol=tol)
    wrt = [x for x in xs if x.requires_grad] + list(rec.parameters())
    g1 = torch.autograd.grad(_loss(o1, s1), wrt, allow_unused=True)
    g2 = torch.autograd.grad(_loss(o2, s2), wrt, allow_unused=True)
    for a, b in zip(g1, g2):
        if a is not None:
            torch.testing.assert_close(b, a, atol=tol * 10, rtol=tol * 10)


def test_float64_under_triton_runs_the_torch_code_exactly():
    rec = sg.Recurrence(BUILTIN["gru"]()).double()
    comp = sg.compile(rec, backend="triton")
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(comp(x)[0], rec(x)[0], atol=1e-12, rtol=1e-12)


CASES = {**{f"zoo_{k}": v for k, v in ZOO.items()}, **BUILTIN}


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_backend_equals_reference_with_mixed_lengths(name):
    rec = sg.Recurrence(CASES[name]())
    comp = sg.compile(rec, backend="triton")
    assert "fused kernel" in comp.source()
    xs, ctx = make_inputs(rec.cell, 4, 3, dtype=torch.float32)
    _check(rec, comp, xs, ctx, 1e-5, lengths=torch.tensor([4, 2, 0]))


def test_triton_backend_equals_reference_without_mask():
    rec = sg.Recurrence(BUILTIN["lstm_layer_norm"]())
    comp = sg.compile(rec, backend="triton")
    xs, ctx = make_inputs(rec.cell, 3, 5, dtype=torch.float32)
    _check(rec, comp, xs, ctx, 1e-5)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cell_recipes(max_steps=4))
def test_random_cells_run_with_triton_kernels_and_equal_the_reference(recipe):
    cell, sizes = build_cell(recipe)
    rec = sg.Recurrence(cell)
    comp = sg.compile(rec, backend="triton")
    xs = [torch.randn(3, 2, s, requires_grad=True) for s in sizes]
    _check(rec, comp, xs, None, 1e-5, lengths=torch.tensor([3, 1]))


# ---------------------------------------------------------------------------------------
# on a real GPU
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_backend_on_cuda_float32(name):
    rec = sg.Recurrence(CASES[name]()).cuda()
    comp = sg.compile(rec, backend="triton")
    xs, ctx = make_inputs(rec.cell, 6, 5, dtype=torch.float32)
    xs = [x.detach().cuda().requires_grad_(x.is_floating_point()) for x in xs]
    ctx = None if ctx is None else {k: v.detach().cuda() for k, v in ctx.items()}
    _check(rec, comp, xs, ctx, 1e-4, lengths=torch.tensor([6, 3, 0, 1, 6]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("name", ["lstm", "gru", "lstm_layer_norm", "mufuru"])
def test_triton_backend_on_cuda_half_precision_tracks_float32(name, dtype, tol):
    rec = sg.Recurrence(BUILTIN[name]()).cuda()
    comp = sg.compile(sg.Recurrence(rec.cell).cuda(), backend="triton")
    comp.load_state_dict(rec.state_dict())
    comp = comp.to(dtype)
    x = torch.randn(8, 7, 3, device="cuda")
    ref, _ = rec(x, lengths=torch.tensor([8, 5, 1, 0, 8, 2, 3]))
    out, _ = comp(x.to(dtype), lengths=torch.tensor([8, 5, 1, 0, 8, 2, 3]))
    err = (out.float() - ref).norm() / ref.norm()
    assert err < tol, err


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_replays_equal_reference_even_with_two_forwards_before_backward(backend):
    rec = sg.Recurrence(BUILTIN["lstm_layer_norm"]()).cuda()
    comp = sg.compile(rec, backend=backend)
    xs = [torch.randn(5, 4, 3, device="cuda", requires_grad=True) for _ in range(3)]
    lengths = torch.tensor([5, 2, 0, 4])
    ref = sum((rec(x, lengths=lengths)[0] ** 2).sum() for x in xs)
    out = sum((comp(x, lengths=lengths)[0] ** 2).sum() for x in xs)  # three forwards, then one backward
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    g1 = torch.autograd.grad(ref, xs + list(rec.parameters()))
    g2 = torch.autograd.grad(out, xs + list(rec.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert comp._program.graphed["forward"].replays >= 2
    assert comp._program.graphed["backward_masked"].replays >= 1
