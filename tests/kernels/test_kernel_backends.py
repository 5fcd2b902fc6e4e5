"""Both kernel backends against the reference interpreter: every zoo and built-in cell with mixed
lengths, a cell without a mask, and random cells. The triton backend runs on the CPU through
TRITON_INTERPRET=1 (on CUDA when present), the cpu backend as generated C.

Tolerances: the kernels compute in float32 and agree with the float32 reference to 1e-5
(values) and 1e-4 (gradients, summed over steps)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import seqgraph as sg

from backend_cases import BUILTIN, CASES, check_against_reference
from strategies import build_cell, cell_recipes
from zoo import make_inputs

BACKENDS = ["triton", "cpu"]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # (the interpreter computes padded lanes quietly)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_equals_reference_with_mixed_lengths(name, backend):
    rec = sg.Recurrence(CASES[name]())
    comp = sg.compile(rec, backend=backend)
    assert "fused kernel" in comp.source()
    xs, ctx = make_inputs(rec.cell, 4, 3, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5, lengths=torch.tensor([4, 2, 0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_reference_without_mask(backend):
    rec = sg.Recurrence(BUILTIN["lstm_layer_norm"]())
    comp = sg.compile(rec, backend=backend)
    xs, ctx = make_inputs(rec.cell, 3, 5, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_cells_run_with_kernels_and_equal_the_reference(backend):
    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(cell_recipes(max_steps=4))
    def check(recipe):
        cell, sizes = build_cell(recipe)
        rec = sg.Recurrence(cell)
        comp = sg.compile(rec, backend=backend)
        xs = [torch.randn(3, 2, s, requires_grad=True) for s in sizes]
        check_against_reference(rec, comp, xs, None, 1e-5, lengths=torch.tensor([3, 1]))
    check()


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_a_layer_norm_whose_variance_overflows_gives_what_the_reference_gives(backend):
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={h: sg.layer_norm(h + x)}))
    h0 = torch.tensor([[3e19, -1e19, 1.0, 2.0], [3.0, -1.0, 1.0, 2.0]])  # squares overflow float32 in row 0
    want, _ = rec(torch.zeros(2, 2, 4), {"h": h0})
    got, _ = sg.compile(rec, backend=backend)(torch.zeros(2, 2, 4), {"h": h0})
    torch.testing.assert_close(got, want, equal_nan=True)  # torch's float32 kernel: rstd 0, zeros


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_a_matrix_state_given_and_returned_in_its_shape_equals_the_reference(backend):
    rec = sg.Recurrence(CASES["zoo_delta_rule"]())
    comp = sg.compile(rec, backend=backend)
    xs, _ = make_inputs(rec.cell, 4, 3, dtype=torch.float32)
    C0 = (0.3 * torch.randn(3, 4, 4)).requires_grad_()
    lengths = torch.tensor([4, 1, 3])
    (h1, m1), s1 = rec(tuple(xs), {"C": C0}, lengths=lengths)
    (h2, m2), s2 = comp(tuple(xs), {"C": C0}, lengths=lengths)
    assert s2["C"].shape == (3, 4, 4) and m2.shape == (4, 3, 4, 4)
    for a, b in [(h1, h2), (m1, m2), (s1["C"], s2["C"])]:
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    wrt = [*xs, C0, *rec.parameters()]
    g1 = torch.autograd.grad((h1.sum() + (m1 * 0.5).sum() + (s1["C"] ** 2).sum()), wrt)
    g2 = torch.autograd.grad((h2.sum() + (m2 * 0.5).sum() + (s2["C"] ** 2).sum()), wrt)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["zoo_mlstm", "zoo_mlstm_D4", "zoo_delta_rule"])
def test_matrix_state_cells_run_one_fused_region_per_step(name):
    import zoo
    cell = zoo.mlstm(D=4) if name == "zoo_mlstm_D4" else CASES[name]()  # (the zoo's mlstm has D = 3)
    for backend in BACKENDS:
        plan = sg.compile(sg.Recurrence(cell), backend=backend).plan()
        assert [s.kind for s in plan.stages] == ["fused"], (backend, plan)
        assert all(s.kind == "fused" for s in plan.backward_plan(True).stages), (backend, plan)
    assert "time loops: C" in str(sg.compile(sg.Recurrence(cell), backend="cpu").plan())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scalar_gate_and_a_row_sum_to_one_value_fuse_into_the_steps_regions(backend):
    x, h = sg.Input(3, name="x"), sg.State(4, name="h")
    gate = sg.sigmoid(sg.squeeze(sg.Linear(4, 1, name="gate")(h), -1))  # (1,) -> (): one value per row
    total = sg.unsqueeze(sg.sum(h), 0)  # () -> (1,)
    h_next = sg.tanh(sg.Linear(3, 4, name="ih")(x) + gate * h + total)
    rec = sg.Recurrence(sg.Cell([x], {h: h_next}, [h_next], name="scalar_gate"))
    comp = sg.compile(rec, backend=backend)
    plan = comp.plan()
    assert "torch fallback" not in str(plan)
    assert sorted(s.kind for s in plan.stages) == ["fused", "gemm"]
    xs, ctx = make_inputs(rec.cell, 4, 3, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5, lengths=torch.tensor([4, 2, 0]))


@pytest.mark.parametrize("lengths", [None, [6, 5, 4, 3], [6, 1, 1, 1]],
                         ids=["unpadded", "padded-all-rows", "padded-real-rows-only"])
@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_a_log_of_the_input_in_the_loop_gives_finite_gradients_over_padding_of_zeros(backend, lengths):
    # the gate reads only the input, and only the loop's region reads it: the fused loops
    # compute it there, the torch backend before its loop. log(0) on padded rows must not
    # reach a gradient.
    x, h = sg.Input(3, name="x"), sg.State(4, name="h")
    u, v = sg.chunk(sg.Linear(3, 8, bias=False, name="w")(x), 2)
    gate = sg.sigmoid(sg.log(u * u) + v)
    dtype, tol = (torch.float32, 1e-5) if backend == "triton" else (torch.float64, 1e-10)  # (Triton: no float64)
    rec = sg.Recurrence(sg.Cell([x], {h: gate * h + (1 - gate) * sg.tanh(v)}, [gate * h], name="log_gate")).to(dtype)
    comp = sg.compile(rec, backend=backend)
    assert ("log" in [n.op for n in comp.plan().loop]) == (backend != "torch")
    torch.manual_seed(0)
    xs = torch.randn(6, 4, 3, dtype=dtype)
    if lengths is not None:
        for b, n in enumerate(lengths):
            xs[n:, b] = 0.0
        lengths = torch.tensor(lengths)
    grads = [torch.autograd.grad(m(xs, lengths=lengths)[0].sum(), list(rec.parameters())) for m in (comp, rec)]
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
