"""What only the triton backend does: float64 runs the torch code, and on CUDA (when present)
float32, bfloat16 and float16 against the reference, and CUDA graph replays. The comparisons it
shares with the cpu backend are in test_kernel_backends.py.

Tolerances: kernels compute in float32 and agree with the float32 reference to 1e-5 (values)
and 1e-4 (gradients, summed over steps); bfloat16 and float16 are compared with the float32
reference run at relative error 3e-2 (bf16) and 1e-2 (fp16) of each tensor's norm. A float64
model under backend="triton" runs the torch backend's code (kernels would round it to float32).
"""
import pytest
import torch

import seqgraph as sg

from backend_cases import BUILTIN, CASES, check_against_reference as _check
from zoo import additive_attention, attention, make_inputs, multihead_attention


def test_float64_under_triton_runs_the_torch_code_exactly():
    rec = sg.Recurrence(BUILTIN["gru"]()).double()
    comp = sg.compile(rec, backend="triton")
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(comp(x)[0], rec(x)[0], atol=1e-12, rtol=1e-12)


# attention over D = 8 features (rows of a power-of-two width) and D = 6 (rows padded to 8
# columns in registers): its row ops fuse either way
ATTENTION = {"dot": lambda: attention(D=8), "additive": lambda: additive_attention(D=8, S=5),
             "two_heads": lambda: multihead_attention(D=8), "dot_D6": lambda: attention(D=6),
             "additive_D6_S3": lambda: additive_attention(D=6, S=3)}


def _attention_against_reference(name, device):
    rec = sg.Recurrence(ATTENTION[name]()).to(device)
    comp = sg.compile(rec, backend="triton")
    fallbacks = [line.rsplit("): ", 1)[1].split(", ") for line in str(comp.plan()).split("\n")
                 if "torch fallback" in line]
    assert all(op == "strided_matmul" for ops in fallbacks for op in ops), fallbacks  # multi-head's products only
    xs, ctx = make_inputs(rec.cell, 5, 4, dtype=torch.float32)
    xs = [x.detach().to(device).requires_grad_(x.is_floating_point()) for x in xs]
    ctx = None if ctx is None else {k: v.detach().to(device).requires_grad_() for k, v in ctx.items()}
    _check(rec, comp, xs, ctx, 1e-4, lengths=torch.tensor([5, 2, 0, 4]))


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_fuses_its_row_ops_and_equals_the_reference(name):
    if torch.cuda.is_available():
        pytest.skip("the GPU test below runs it on CUDA")
    _attention_against_reference(name, "cpu")


# ---------------------------------------------------------------------------------------
# on a real GPU
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_with_fused_row_ops_on_cuda_float32(name):
    _attention_against_reference(name, "cuda")


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
