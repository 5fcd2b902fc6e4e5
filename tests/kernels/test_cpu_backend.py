"""What only the cpu backend (generated C kernels) does: float64 against the reference for every
cell, unrolled loops, one library for every size, its plan, and how it falls back. The
comparisons it shares with the triton backend are in test_kernel_backends.py.

Tolerances: float32 to 1e-5 (values) and 1e-4 (gradients, summed over steps); float64 to 1e-10
and 1e-9. Half-precision CPU tensors run the torch backend's code (the kernels compute float32
and float64 only)."""
import multiprocessing
import sys

import pytest
import torch

import seqgraph as sg

from backend_cases import BUILTIN, CASES, check_against_reference
from zoo import make_inputs


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_backend_equals_reference_in_float64(name):
    rec = sg.Recurrence(CASES[name]()).double()
    comp = sg.compile(rec, backend="cpu")
    xs, ctx = make_inputs(rec.cell, 5, 3, dtype=torch.float64)
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=torch.tensor([5, 1, 3]))


def test_cpu_backend_unrolled_equals_reference():
    rec = sg.Recurrence(BUILTIN["gru"]())
    comp = sg.compile(rec, backend="cpu", unroll=3)
    xs, ctx = make_inputs(rec.cell, 7, 4, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5, lengths=torch.tensor([7, 5, 2, 1]))


def test_a_batch_of_one_and_a_single_step_equal_the_reference():
    rec = sg.Recurrence(BUILTIN["mufuru"]())
    comp = sg.compile(rec, backend="cpu")
    xs, ctx = make_inputs(rec.cell, 1, 1, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5)


def test_one_library_serves_every_sequence_length_and_batch_size():
    rec = sg.Recurrence(BUILTIN["lstm"]())
    comp = sg.compile(rec, backend="cpu")
    lib = comp._program.fns["_clib"]
    before = dict(lib.paths)
    for T, B in [(2, 1), (9, 5), (4, 17)]:
        x = torch.randn(T, B, 3)
        torch.testing.assert_close(comp(x)[0], rec(x)[0], atol=1e-5, rtol=1e-5)
    assert lib.paths == before  # nothing rebuilt


def fresh_lstm(tmp_path, monkeypatch):
    """An LSTM compiled in an empty kernel cache, no program or library in memory."""
    from seqgraph.kernels.c_launch import clear_memory_cache
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    sg.compiled.clear_cache()
    clear_memory_cache()
    rec = sg.Recurrence(sg.cells.lstm(3, 5))
    comp = sg.compile(rec, backend="cpu")
    return rec, comp, comp._program.c_loops.lib


def test_a_program_compiles_its_unmasked_loops_alone_and_its_masked_ones_at_the_first_masked_call(tmp_path, monkeypatch):
    rec, comp, lib = fresh_lstm(tmp_path, monkeypatch)
    assert set(lib.paths) == {(torch.float32, "loops")}
    xs, ctx = make_inputs(rec.cell, 4, 3, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5)
    assert set(lib.paths) == {(torch.float32, "loops")}  # no padding: nothing more was built
    check_against_reference(rec, comp, xs, ctx, 1e-5, lengths=torch.tensor([4, 1, 2]))
    assert set(lib.paths) == {(torch.float32, "loops"), (torch.float32, "masked loops")}
    assert {p.name for p in tmp_path.rglob("c*.so")} == {p.name for p in lib.paths.values()}


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_a_call_of_no_rows_builds_no_kernel(tmp_path, monkeypatch, grad, masked):
    rec, comp, lib = fresh_lstm(tmp_path, monkeypatch)
    x = torch.randn(4, 0, 3, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out, state = comp(x, lengths=torch.zeros(0, dtype=torch.long) if masked else None)
    if grad:
        (out.sum() + state["c"].sum()).backward()
        assert x.grad.shape == x.shape
    assert out.shape == (4, 0, 5) and state["h"].shape == (0, 5)
    assert set(lib.paths) == {(torch.float32, "loops")}


SHUFFLED = torch.tensor([2, 6, 1, 0, 6, 3])  # lengths in no order: the C loops run them longest first


def test_longest_first_sorts_a_shuffled_batch_and_leaves_a_sorted_one_as_it_is(monkeypatch):
    from seqgraph import compiled
    from seqgraph.compiled import longest_first
    mask = torch.arange(6)[:, None] < SHUFFLED[None, :]
    assert SHUFFLED[longest_first(mask)].tolist() == [6, 6, 3, 2, 1, 0]
    ordered = SHUFFLED.sort(descending=True).values
    assert longest_first(torch.arange(6)[:, None] < ordered[None, :]) is None
    assert longest_first(torch.ones(6, 6, dtype=torch.bool)) is None  # no padding: nothing to skip
    ninety = torch.arange(5)[:, None] < torch.tensor([4, 5])[None, :]  # 10 rows computed as given, 9 sorted
    assert longest_first(ninety) is None  # (the gathers would cost more than the loops save)
    monkeypatch.setattr(compiled, "SORT_BELOW", 0.9)
    assert longest_first(ninety).tolist() == [1, 0]  # (at the threshold itself: sorted)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_shuffled_padded_batch_run_longest_first_equals_the_reference(name, monkeypatch):
    rec = sg.Recurrence(CASES[name]())  # (training mode: dropout noise follows its rows too)
    comp = sg.compile(rec, backend="cpu")
    orders = []
    run_in_order = sg.CompiledRecurrence._run_in_order
    monkeypatch.setattr(sg.CompiledRecurrence, "_run_in_order",
                        lambda self, order, *a: orders.append(order) or run_in_order(self, order, *a))
    xs, ctx = make_inputs(rec.cell, 6, 6, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5, lengths=SHUFFLED)
    in_c = comp._program.finals_owned  # (the Python loops, such as an attention cell's, run the rows as given)
    assert len(orders) == (1 if in_c else 0)


def _first_masked_call_builds(comp):
    # one thread, as torch's DataLoader sets in its workers: GNU OpenMP's threads do not survive
    # a fork, so a forked process whose parent already ran them hangs in its first parallel
    # region (torch's own ops too), and earlier tests may have run them in this one
    torch.set_num_threads(1)
    x = torch.randn(4, 3, 3)
    comp(x, lengths=torch.tensor([4, 1, 2]))
    return comp._program.c_loops.lib.compiled[(torch.float32, "masked loops")]


@pytest.mark.skipif(sys.platform != "linux", reason="forks worker processes")
def test_workers_forked_after_compiling_build_the_masked_loops_once(tmp_path, monkeypatch):
    rec, comp, lib = fresh_lstm(tmp_path, monkeypatch)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        built = pool.map(_first_masked_call_builds, [comp] * 3)
    assert sorted(built) == [False, False, True]  # one built it; the others waited and loaded its file


def test_the_source_calls_one_c_kernel_per_fused_stage_and_the_packed_gemm():
    comp = sg.compile(sg.Recurrence(BUILTIN["lstm"]()), backend="cpu")
    src = comp.source()
    assert src.count("_ck0.fast(") == 1 and "int sg_region_0(" in src
    assert "_packed_linear(" in src  # the recurrent GEMM through MKL's packed weight


def test_half_precision_cpu_tensors_run_the_torch_code():
    rec = sg.Recurrence(BUILTIN["gru"]())
    comp = sg.compile(rec, backend="cpu").to(torch.bfloat16)
    x = torch.randn(4, 2, 3, dtype=torch.bfloat16)
    assert comp._program_for(torch.bfloat16, x.device).backend == "torch"
    out, _ = comp(x)
    assert out.dtype == torch.bfloat16


@pytest.mark.gpu
def test_cuda_tensors_under_the_cpu_backend_run_the_torch_code():
    rec = sg.Recurrence(BUILTIN["gru"]()).cuda()
    comp = sg.compile(rec, backend="cpu")
    x = torch.randn(4, 2, 3, device="cuda")
    assert comp._program_for(torch.float32, x.device).backend == "torch"
    torch.testing.assert_close(comp(x)[0], rec(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reads", ["h", "x"], ids=["in-the-loop", "hoisted"])
def test_a_one_column_value_spread_over_a_row_and_summed_has_the_references_gradients(reads):
    x, h = sg.Input(3, name="x"), sg.State(3, name="h")
    col = sg.Linear(3, 1, bias=False, name="col")(h if reads == "h" else x)  # (B, 1)
    v = sg.sum(col + x, keepdim=True) * sg.tanh(col)  # col spread over x's 3 columns, summed back
    cell = sg.Cell(inputs=[x], states={h: sg.tanh(sg.Linear(3, 3, name="u")(h) + v)}, name="spread")
    rec = sg.Recurrence(cell).double()
    xs, ctx = make_inputs(rec.cell, 4, 2, dtype=torch.float64)
    check_against_reference(rec, sg.compile(rec, backend="cpu"), xs, ctx, 1e-10)


def test_the_gradient_of_a_one_column_value_summed_with_a_wider_slice_counts_every_column():
    x, h = sg.Input(3, name="x"), sg.State(1, name="h")
    a = sg.tanh(h)
    s = sg.sum(sg.concat([a + x, x]), dim=-1, keepdim=True)  # d s / d a = 3
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={h: s}, outputs=[s], name="spread_slice")).double()
    xs, ctx = make_inputs(rec.cell, 3, 2, dtype=torch.float64)
    check_against_reference(rec, sg.compile(rec, backend="cpu"), xs, ctx, 1e-10)


def test_the_gradient_of_a_summed_outer_product_keeps_its_one_column_loop_inside_the_row():
    x, x1, h = sg.Input(3, name="x"), sg.Input(1, name="x1"), sg.State(1, name="h")
    u = sg.tanh(sg.narrow(x, -1, 0, 2))
    v = sg.tanh(x + h)
    outer = sg.matmul(sg.unsqueeze(u, -1), sg.unsqueeze(v, 0))  # (2, 3) = u v^T
    s = sg.sum(sg.reshape(outer, (6,)), dim=-1, keepdim=True) * sg.tanh(x1 * h)
    rec = sg.Recurrence(sg.Cell(inputs=[x, x1], states={h: sg.tanh(s + h)}, outputs=[s], name="outer_sum")).double()
    xs, ctx = make_inputs(rec.cell, 4, 3, dtype=torch.float64)  # (a one-column output per row: no overrun)
    check_against_reference(rec, sg.compile(rec, backend="cpu"), xs, ctx, 1e-10, lengths=torch.tensor([4, 2, 1]))
