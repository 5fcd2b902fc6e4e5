"""The generated backward: what a call skips when some reads need no gradient, and that it
still gives the reference's gradients."""
import os
import sys

import pytest
import torch

import seqgraph as sg

from zoo import ZOO, make_inputs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "kernels"))
from backend_cases import check_against_reference  # noqa: E402


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("memory_grad", [False, True], ids=["memory fixed", "memory trained"])
def test_an_attention_decoder_gives_the_references_gradients_whether_its_memory_needs_one_or_not(
        backend, memory_grad):
    rec = sg.Recurrence(ZOO["attention"]()).double()
    xs, ctx = make_inputs(rec.cell, 5, 3)
    ctx["memory"] = ctx["memory"].detach().requires_grad_(memory_grad)
    check_against_reference(rec, sg.compile(rec, backend=backend), xs, ctx, 1e-10, lengths=torch.tensor([5, 2, 0]))


def test_the_backward_loop_skips_what_only_a_read_gradient_no_one_needs_uses():
    # the memory's gradient, added up over the steps, is the only use of its per-step parts
    # (the torch backend's Python loop; the C loops still compute it: docs/kernels.md)
    source = sg.compile(sg.Recurrence(ZOO["multihead_attention"]()), backend="torch").source()
    loop = source[source.index("def backward_plain("):]
    loop = loop[:loop.index("return")]
    guarded = [line for line in loop.splitlines() if line.strip().startswith("if need is None or need[")]
    assert any(" strided_matmul " in line for line in guarded)  # the product that gives the memory's gradient
    assert any("+= " in line for line in guarded)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_frozen_recurrent_weight_gets_no_weight_gradient_product(backend, monkeypatch):
    import seqgraph.kernels.cpu_gemm as cpu_gemm
    rec = sg.Recurrence(sg.cells.lstm(4, 5))
    comp = sg.compile(rec, backend=backend)
    x = torch.randn(6, 3, 4, requires_grad=True)
    want = torch.autograd.grad(rec(x)[0].sum(), [x, rec.params.ih.weight])
    calls = []
    real_wgrad = cpu_gemm.wgrad
    monkeypatch.setattr(cpu_gemm, "wgrad", lambda *a: calls.append(a) or real_wgrad(*a))
    rec.params.hh.weight.requires_grad_(False)
    got = torch.autograd.grad(comp(x)[0].sum(), [x, rec.params.ih.weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    if backend == "cpu":
        assert calls == []  # the recurrent weight's gradient (one GEMM over every step) is not computed
    rec.params.hh.weight.requires_grad_(True)
    torch.autograd.grad(comp(x)[0].sum(), [rec.params.hh.weight])
    assert len(calls) == (1 if backend == "cpu" else 0)
