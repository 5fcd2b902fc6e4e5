"""The generated torch code's rows over all steps: all T*B, or only the real steps of a padded
batch (the prologue's hoisted products and the backward's weight gradients skip the padding)."""
import os
import sys

import pytest
import torch

import seqgraph as sg
import seqgraph.compiler.codegen_torch as codegen_torch
from seqgraph.compiler.codegen_torch import real_step_rows

from zoo import make_inputs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "kernels"))
from backend_cases import CASES, check_against_reference  # noqa: E402

MOSTLY_PADDING = torch.tensor([5, 1, 0, 2])  # 8 real steps of 20


def test_real_step_rows_lists_the_real_steps_of_a_mostly_padded_batch():
    mask = torch.arange(5)[:, None] < MOSTLY_PADDING[None, :]  # (T, B)
    rows = real_step_rows(mask)
    assert rows.tolist() == [t * 4 + b for t in range(5) for b in range(4) if mask[t, b]]


def test_real_step_rows_keeps_every_row_when_most_steps_are_real_or_there_is_no_mask():
    mask = torch.arange(5)[:, None] < torch.tensor([5, 5, 4, 3])[None, :]  # 17 of 20 real
    assert real_step_rows(mask) is None
    assert real_step_rows(None) is None


def test_real_step_rows_keeps_every_row_off_the_cpu():
    # finding the rows would wait for the GPU and give a CUDA graph a data-dependent shape
    mask = (torch.arange(5)[:, None] < MOSTLY_PADDING[None, :]).to("meta")
    assert real_step_rows(mask) is None


def _context_cell():
    """A hoisted product that reads a per-sequence context (repeated for each real row) and
    per-step dropout noise (drawn for every step, kept on the real rows)."""
    x, ctx, h = sg.Input(3, name="x"), sg.Context(2, name="ctx"), sg.State(4, name="h")
    pre = sg.Linear(5, 4)(sg.dropout(sg.concat([x, ctx]), 0.3))
    return sg.Cell([x], {h: sg.tanh(pre + sg.Linear(4, 4)(h))})


def test_the_prologue_on_the_real_rows_gives_the_full_prologues_rows_and_zero_padding():
    rec = sg.Recurrence(sg.cells.lstm(3, 5)).double()
    prologue = sg.compile(rec, backend="torch")._program.fns["prologue"]
    T, B = 5, 4
    x = torch.randn(T, B, 3, dtype=torch.float64)
    params = list(rec.param_tensors().values())
    mask = torch.arange(T)[:, None] < MOSTLY_PADDING[None, :]
    full = prologue(T, B, [x], [], [], params)
    real = prologue(T, B, [x], [], [], params, real_step_rows(mask))
    hoisted = [k for k, r in enumerate(full) if r.dim() == 3]
    assert hoisted
    for k in hoisted:
        torch.testing.assert_close(real[k][mask], full[k][mask])
        assert (real[k][~mask] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("rows", ["real rows only", "all rows"])
@pytest.mark.parametrize("name", sorted(CASES) + ["context_and_dropout"])
def test_every_cell_equals_the_reference_with_mostly_padded_batches(name, rows, backend, monkeypatch):
    # all rows: the same call with the real-rows path switched off, so both paths are checked
    monkeypatch.setattr(codegen_torch, "REAL_ROWS_BELOW", 1.0 if rows == "real rows only" else -1.0)
    cell = _context_cell() if name == "context_and_dropout" else CASES[name]()
    rec = sg.Recurrence(cell).double()
    comp = sg.compile(rec, backend=backend)
    xs, ctx = make_inputs(rec.cell, 5, 4)
    if name == "context_and_dropout":
        ctx = {"ctx": torch.randn(4, 2, dtype=torch.float64, requires_grad=True)}
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=MOSTLY_PADDING)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_zero_padding_in_hoisted_reads_gives_the_references_gradients(backend):
    # the real-rows path leaves 0 where the reference has the bias: on row 1 (no real step,
    # from s = 0) MuFuRu then meets sqrt(|s - v|) at 0, whose derivative is infinite; the
    # padded row's gradient must stay out of the initial state's and the weights' gradients
    rec = sg.Recurrence(sg.cells.mufuru(3, 4)).double()
    comp = sg.compile(rec, backend=backend)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    grads = []
    for module in (rec, comp):
        s0 = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
        out, fin = module(x, {"s": s0}, lengths=torch.tensor([4, 0, 2]))
        grads.append(torch.autograd.grad(out.sum() + fin["s"].sum(), [s0, *rec.parameters()]))
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a)


def test_a_weight_is_packed_only_for_a_call_that_multiplies_enough_rows_by_it():
    from seqgraph.compiler.codegen_torch import PACK_MIN_ROWS, PACK_MIN_STEPS, _pack_weight
    w = torch.randn(8, 4)
    assert _pack_weight(w, 16, 1) is None  # a decoder's one step: reordering would cost more than it saves
    assert _pack_weight(w, 256, PACK_MIN_STEPS - 1) is None  # enough rows, too few steps
    packed = _pack_weight(w, 16, max(PACK_MIN_STEPS, PACK_MIN_ROWS // 16))
    if getattr(torch.ops.mkl, "_mkl_reorder_linear_weight", None) is not None:
        assert packed is not None and packed[0].shape == w.shape


def _one_column_cells():
    """Cells whose one-column value broadcasts to a wider sum: before the loop and in the step."""
    def hoisted_product():
        x, h = sg.Input(3, name="x"), sg.State(4, name="h")
        y = sg.Linear(3, 1, bias=False)(x) + sg.Parameter(4, name="p")  # (1,) + (4,)
        return sg.Cell([x], {h: sg.tanh(y + h)})

    def step_product():
        x, h = sg.Input(3, name="x"), sg.State(4, name="h")
        return sg.Cell([x], {h: sg.tanh(h + sg.Linear(4, 1, bias=False)(h) + sg.Linear(3, 4)(x))})

    def one_column_layer_norm():
        x, h = sg.Input(3, name="x"), sg.State(4, name="h")
        y = sg.layer_norm(sg.Linear(3, 1)(x)) * sg.Parameter(4, name="w") + sg.Parameter(4, name="b")
        return sg.Cell([x], {h: sg.tanh(y + h)})
    return {"hoisted_product": hoisted_product, "step_product": step_product,
            "one_column_layer_norm": one_column_layer_norm}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", sorted(_one_column_cells()))
def test_a_one_column_value_broadcast_to_a_wider_sum_is_not_folded_into_one_torch_call(name, backend):
    # addmm(b, x, W.T) and layer_norm(x, (w,), weight, bias) give the product's own width
    rec = sg.Recurrence(_one_column_cells()[name]()).double()
    xs, ctx = make_inputs(rec.cell, 5, 3)
    check_against_reference(rec, sg.compile(rec, backend=backend), xs, ctx, 1e-10)



@pytest.mark.parametrize("B, grad", [(2, True), (64, False)], ids=["unpacked", "packed"])
def test_a_packed_weight_shared_with_a_per_example_matrix_product_gives_the_references_values(B, grad):
    # one Linear on the state (a per-step GEMM, its weight packed) and on a (2, 4) matrix
    x, h = sg.Input(3, name="x"), sg.State(4, name="h")
    lin = sg.Linear(4, 4)
    m = sg.reshape(sg.concat([sg.tanh(h), sg.sigmoid(h)]), (2, 4))
    rec = sg.Recurrence(sg.Cell([x], {h: sg.tanh(lin(h) + sg.sum(lin(m), dim=0) + sg.Linear(3, 4)(x))}))
    comp = sg.compile(rec, backend="torch")
    xs = torch.randn(5, B, 3)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(comp(xs)[0], rec(xs)[0])


@pytest.mark.parametrize("backend, call", [("torch", "_addmm_into("), ("cpu", "_gemm.addmm_(")])
def test_a_sum_of_hoisted_products_adds_each_into_the_first_in_place(backend, call):
    comp = sg.compile(sg.Recurrence(sg.cells.qrnn(4, 6, window=3)), backend=backend)
    assert comp.source().count(call) == 2  # W x + b, then + W1 x_prev1 and + W2 x_prev2 into it
    if backend == "cpu":  # (its gates run in the loop; the sum is the products', not a hoisted region's)
        assert comp.plan().hoisted_regions() == []


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_partial_sum_read_elsewhere_is_not_added_into(backend):
    x, u, h = sg.Input(3, name="x"), sg.Input(3, name="u"), sg.State(4, name="h")
    first = sg.Linear(3, 4, name="a")(x)
    both = first + sg.Linear(3, 4, name="b", bias=False)(u)
    h2 = sg.tanh(both + sg.Linear(4, 4, name="c")(h))
    rec = sg.Recurrence(sg.Cell([x, u], {h: h2}, [h2, sg.sigmoid(first)])).double()
    comp = sg.compile(rec, backend=backend)
    assert "addmm_(" not in comp.source()
    xs, ctx = make_inputs(rec.cell, 4, 3, dtype=torch.float64)
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=torch.tensor([4, 2, 1]))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_sum_of_hoisted_products_under_autocast_is_added_out_of_place(backend):
    # (autocast's bfloat16 product cannot be added into a float32 output in place)
    torch.manual_seed(0)
    rec = sg.Recurrence(sg.cells.qrnn(4, 6, window=3))
    comp = sg.compile(rec, backend=backend)
    x = torch.randn(5, 3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = comp(x)[0], rec(x)[0]
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    (gx,) = torch.autograd.grad(out.float().sum(), x)
    (want,) = torch.autograd.grad(ref.float().sum(), x)
    torch.testing.assert_close(gx, want, rtol=5e-2, atol=5e-2)
