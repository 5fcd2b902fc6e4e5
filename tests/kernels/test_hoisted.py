"""Hoisted elementwise regions (seqgraph/kernels/hoisted.py): one kernel over all T*B rows
forward and one backward, C on the cpu backend and Triton on the triton backend (run by the
interpreter here), against the reference and torch's gradcheck, and where they are left to
torch code.

Tolerances: float64 to 1e-10 (values and gradients), float32 to 1e-5 and 1e-4."""
import pytest
import torch

import seqgraph as sg
from seqgraph.kernels import c_launch

from backend_cases import check_against_reference
from zoo import make_inputs


def gated_input_cell(I=5, H=6):
    """A tanh RNN behind a gated input layer, tanh(z) * sigmoid(g) over one product of the
    input: the gates read only the input and a product reads them, so they run over all T*B
    rows before the loop (as a QRNN's would on the torch backend; its fused loops take those)."""
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    z, g = sg.chunk(sg.Linear(I, 2 * H, name="w")(x), 2)
    u = sg.tanh(z) * sg.sigmoid(g)
    h_next = sg.tanh(sg.Linear(H, H, name="ih")(u) + sg.Linear(H, H, name="hh")(h))
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next], name="gated_input")


def hoisted_ops(comp):
    return [v for k, v in comp._program.fns.items() if k.startswith("_hoisted")]


def test_a_gated_input_layer_runs_as_one_kernel_forward_and_one_backward():
    comp = sg.compile(sg.Recurrence(gated_input_cell()), backend="cpu")
    (region,) = hoisted_ops(comp)
    assert sorted(n.op for n in region.forward_region.nodes if n.op not in ("slice", "add")) == ["mul", "sigmoid", "tanh"]
    assert region.backward_kernel is not None
    assert "if _hoisted0.usable(" in comp.source()
    assert "sg_region_0" in comp.source()  # the kernels' C text is shown with the rest


@pytest.mark.parametrize("lengths", [None, [7, 5, 3, 1], [7, 1, 1, 1]],
                         ids=["unpadded", "padded-all-rows", "padded-real-rows-only"])
def test_hoisted_kernels_equal_the_reference_in_float64(lengths):
    rec = sg.Recurrence(gated_input_cell()).double()
    comp = sg.compile(rec, backend="cpu")
    xs, ctx = make_inputs(rec.cell, 7, 4, dtype=torch.float64)
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=None if lengths is None else torch.tensor(lengths))


def test_hoisted_kernels_equal_the_reference_in_float32():
    rec = sg.Recurrence(gated_input_cell(9, 33))
    comp = sg.compile(rec, backend="cpu")
    xs, ctx = make_inputs(rec.cell, 6, 5, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5, lengths=torch.tensor([6, 4, 4, 2, 1]))


@pytest.mark.parametrize("lengths", [None, [7, 5, 3, 1], [7, 1, 1, 1]],
                         ids=["unpadded", "padded-all-rows", "padded-real-rows-only"])
def test_the_triton_backend_runs_the_region_as_kernels_too(lengths):
    rec = sg.Recurrence(gated_input_cell())
    comp = sg.compile(rec, backend="triton")
    (region,) = hoisted_ops(comp)
    assert "one Triton kernel over all rows" in str(comp.plan())
    assert "_hoisted0.backward_kernel" in comp.source()  # the kernels' text is shown with the rest
    xs, ctx = make_inputs(rec.cell, 7, 4, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5, lengths=None if lengths is None else torch.tensor(lengths))
    rows = torch.randn(6, 18)
    assert region.usable(rows, torch.randn(18)) and not region.usable(rows.double(), torch.randn(18).double())


def test_the_hoisted_op_passes_gradcheck():
    comp = sg.compile(sg.Recurrence(gated_input_cell(3, 4)).double(), backend="cpu")
    (region,) = hoisted_ops(comp)
    torch.manual_seed(0)
    inputs = [torch.randn((6,) + tuple(n.shape) if n.batched else tuple(n.shape), dtype=torch.float64,
                          requires_grad=True) for n in region.inputs]
    assert any(not n.batched for n in region.inputs)  # the bias: its gradient is a sum over rows
    assert torch.autograd.gradcheck(lambda *t: region(*t), inputs)


def test_a_frozen_weight_gets_no_gradient_and_the_input_its_own():
    rec = sg.Recurrence(gated_input_cell()).double()
    comp = sg.compile(rec, backend="cpu")
    for p in rec.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(comp(x)[0].sum(), x)
    (want,) = torch.autograd.grad(rec(x)[0].sum(), x)
    torch.testing.assert_close(gx, want, rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in rec.parameters())


def test_the_hoisted_kernels_are_built_with_the_program():
    comp = sg.compile(sg.Recurrence(gated_input_cell(4, 7)), backend="cpu")
    lib = comp._program.fns["_clib"]
    kernels = [k for k in lib.kernels if k.gen.func_name in lib.prologue_kernels]
    assert [k.region.name.rsplit("_", 1)[1] for k in kernels] == ["forward", "backward"]
    for k in kernels:
        assert lib.part_of(k) == c_launch.LOOPS
        assert torch.float32 in k.fns  # bound by the build as the program compiled
    comp(torch.randn(3, 2, 4, requires_grad=True))[0].sum().backward()
    assert {part for _, part in lib.paths} == {c_launch.LOOPS}  # no other part was needed


def test_the_torch_code_runs_where_the_kernels_do_not():
    comp = sg.compile(sg.Recurrence(gated_input_cell()), backend="cpu")
    (region,) = hoisted_ops(comp)
    rows, bias = torch.randn(6, 18), torch.randn(18)
    assert region.usable(rows, bias)
    assert not region.usable(rows.half(), bias.half())
    assert not region.usable(rows, bias.double())


def test_inside_torch_compile_the_prologue_traces_as_torch_code():
    rec = sg.Recurrence(gated_input_cell())
    comp = sg.compile(rec, backend="cpu")
    x = torch.randn(4, 3, 5)
    out, _ = torch.compile(lambda v: comp(v), backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, rec(x)[0], rtol=1e-5, atol=1e-5)


def test_a_layer_norm_or_a_bias_alone_is_left_to_torch():
    for cell in (sg.cells.lstm(4, 5, layer_norm=True), sg.cells.gru(4, 5), sg.cells.mufuru(4, 5)):
        comp = sg.compile(sg.Recurrence(cell), backend="cpu")
        assert comp.plan().hoisted_regions() == []
        assert hoisted_ops(comp) == []


def test_the_plan_says_how_the_hoisted_region_runs():
    cpu = sg.compile(sg.Recurrence(gated_input_cell()), backend="cpu").plan()
    line = next(ln for ln in str(cpu).splitlines() if "hoisted elementwise region" in ln)
    assert "one C kernel over all rows forward, one backward" in line and "tanh" in line
    torch_plan = sg.compile(sg.Recurrence(gated_input_cell()), backend="torch").plan()
    assert "(6 ops: torch code)" in str(torch_plan)
    assert "kernel over all rows 1 of 1" in cpu.to_dot().source
    assert "kernel over all rows" not in torch_plan.to_dot().source


def test_large_hoisted_buffers_are_reused_across_calls(monkeypatch):
    rec = sg.Recurrence(gated_input_cell(8, 256))
    comp = sg.compile(rec, backend="cpu")
    (region,) = hoisted_ops(comp)
    pointers = []  # (not the tensors: holding them would keep their memory taken)
    forward = region.forward

    def remember(ts):
        outs = forward(ts)
        pointers.append([t.untyped_storage().data_ptr() for t in outs])
        return outs
    monkeypatch.setattr(region, "forward", remember)
    x = torch.randn(32, 32, 8, requires_grad=True)  # 1024 rows of 256 floats: 1 MiB per value
    grads = []
    for _ in range(4):
        comp(x)[0].sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    # the third call's memory, free again once its backward ran (the first calls may still
    # trade buffers of nearby sizes in the pool)
    assert pointers[3] == pointers[2]
    torch.testing.assert_close(grads[3], grads[0], rtol=0, atol=0)
    monkeypatch.setenv("SEQGRAPH_REUSE_BUFFERS", "0")
    comp(x)[0].sum().backward()
    assert not set(pointers[4]) & set(pointers[2])


def log_gate_cell(I=3, H=4):
    """A hoisted log whose operand is 0 on a padded row of zeros (no bias): the pole. A
    product reads the gate, so it stays before the loop on every backend."""
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    u, v = sg.chunk(sg.Linear(I, 2 * H, bias=False, name="w")(x), 2)
    gate = sg.sigmoid(sg.log(u * u) + v)
    h_next = sg.tanh(sg.Linear(H, H, name="ih")(gate) + sg.Linear(H, H, name="hh")(h))
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next], name="log_gate")


@pytest.mark.parametrize("lengths, kernel_calls", [(None, 1), ([6, 5, 4, 3], 0), ([6, 1, 1, 1], 1)],
                         ids=["unpadded", "padded-all-rows", "padded-real-rows-only"])
def test_a_region_with_a_pole_leaves_padded_rows_to_the_torch_lines(monkeypatch, lengths, kernel_calls):
    rec = sg.Recurrence(log_gate_cell()).double()
    comp = sg.compile(rec, backend="cpu")
    (region,) = hoisted_ops(comp)
    assert "if real is None and _hoisted0.usable(" in comp.source()
    calls = []
    forward = region.forward
    monkeypatch.setattr(region, "forward", lambda ts: calls.append(1) or forward(ts))
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    if lengths is not None:
        for b, n in enumerate(lengths):
            x[n:, b] = 0.0  # padding of zeros: log(0) there if a kernel computed it
    lengths = None if lengths is None else torch.tensor(lengths)
    grads = []
    for m in (comp, rec):
        out, _ = m(x, lengths=lengths)
        grads.append(torch.autograd.grad(out.sum(), list(rec.parameters())))
    assert len(calls) == kernel_calls
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_a_region_whose_derivative_the_kernels_refuse_stays_torch_code_and_says_why(monkeypatch):
    from seqgraph.kernels import c_codegen
    refuse = c_codegen.c_region_supported
    monkeypatch.setattr(c_codegen, "c_region_supported", lambda region: (False, "no C for this test") if
                        region.name.endswith("_backward") else refuse(region))
    sg.compiled.clear_cache()
    rec = sg.Recurrence(gated_input_cell(4, 5)).double()
    comp = sg.compile(rec, backend="cpu")
    assert hoisted_ops(comp) == []
    assert "(6 ops: torch code (not fused: its derivative: no C for this test))" in str(comp.plan())
    xs, ctx = make_inputs(rec.cell, 5, 3, dtype=torch.float64)
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=torch.tensor([5, 2, 1]))
    sg.compiled.clear_cache()  # (the next test compiles the cell with the kernels again)
