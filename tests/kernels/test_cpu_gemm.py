"""seqgraph's own float32 GEMM (seqgraph/kernels/cpu_gemm.py) and the choice between it and MKL:
sg_mm against torch.mm on every kind of tail (rows past a multiple of the register tile,
columns past a multiple of the panel), strided and transposed operands, biases, chunked reads
of a weight read in place; autograd through `linear`; the vendor and $SEQGRAPH_CPU_GEMM rule;
and every built-in cell's C loops with either GEMM against the reference.

Tolerances (float32): 1e-5 relative to the size of the sum, as torch's own GEMMs differ."""
import pytest
import torch

import seqgraph as sg
from seqgraph.kernels import cpu_gemm

from backend_cases import BUILTIN, check_against_reference
from zoo import make_inputs


@pytest.fixture
def own_gemm(monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", "seqgraph")
    # the kernel at every size (the sizes it leaves to torch's GEMM have their own tests)
    for name in ("PACKED_MIN_ROWS", "TINY_FLOPS", "TN_MIN_ROWS"):
        monkeypatch.setattr(cpu_gemm, name, 0)


def _close(got, want, K):
    torch.testing.assert_close(got, want, atol=1e-5 * max(1, K) ** 0.5, rtol=1e-5)


class _CountingLibrary:
    """cpu_gemm's library, counting the calls of one of its functions."""

    def __init__(self, lib, name):
        self.lib, self.name, self.calls = lib, name, 0

    def __getattr__(self, attr):
        fn = getattr(self.lib, attr)
        if attr != self.name:
            return fn

        def counted(*args):
            self.calls += 1
            return fn(*args)
        return counted


def _spy(monkeypatch, name: str) -> "_CountingLibrary":
    """Count the calls of the library's `name` from now on (a test whose products fell back to
    torch would otherwise compare torch with itself)."""
    spy = _CountingLibrary(cpu_gemm._library(), name)
    monkeypatch.setattr(cpu_gemm, "_library", lambda: spy)
    return spy


@pytest.fixture
def mm_calls(own_gemm, monkeypatch):
    return _spy(monkeypatch, "sg_matmul")


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (16, 512, 128), (5, 33, 7), (13, 200, 77), (9, 64, 1),
                                   (64, 31, 300), (130, 96, 40), (7, 17, 2048)])
def test_sg_mm_equals_torch_mm_for_any_tail_of_rows_and_columns(mm_calls, M, N, K):
    x, w = torch.randn(M, K), torch.randn(N, K)
    _close(cpu_gemm.linear(x, w), x @ w.t(), K)
    assert mm_calls.calls == 1


def test_the_avx2_build_of_sg_mm_equals_torch_mm(own_gemm, monkeypatch):
    # without AVX-512 the kernel holds 6 rows x 16 columns in ymm registers: its own tails
    monkeypatch.setenv("SEQGRAPH_CFLAGS", "-O2 -march=native -mno-avx512f")
    calls = _spy(monkeypatch, "sg_matmul")  # (the library built with these flags)
    for M, N, K in [(6, 16, 3), (11, 40, 9), (5, 15, 64)]:
        x, w = torch.randn(M, K), torch.randn(N, K)
        _close(cpu_gemm.linear(x, w), x @ w.t(), K)
    assert calls.calls == 3


def test_sg_mm_reads_a_weight_stored_transposed_in_place(own_gemm):
    x, wt = torch.randn(12, 50), torch.randn(50, 70)  # W^T row-major: the panels are read where they lie
    _close(cpu_gemm._mm(x, wt), x @ wt, 50)


def test_sg_mm_reads_strided_rows_and_column_slices(mm_calls):
    big = torch.randn(20, 3, 90)
    x = big[:, 1, 10:60]  # rows 270 apart
    w = torch.randn(40, 100)[:, ::2]  # columns 2 apart: copied into panels
    _close(cpu_gemm.linear(x, w), x @ w.t(), 50)
    xt = torch.randn(50, 20).t()  # columns not adjacent: copied first
    _close(cpu_gemm.linear(xt, w), xt @ w.t(), 50)
    assert mm_calls.calls == 2


def test_a_weight_read_in_place_that_spans_more_than_the_tlb_is_taken_in_chunks_of_k(own_gemm):
    # W^T rows 1024 floats (a page) apart over K = 2100: 8.6 MB > SG_MM_DIRECT_BYTES, so two
    # chunks of K add into y; 40 columns are one full panel read in place and a tail panel copied
    wt = torch.randn(2100, 1024)[:, :40]
    x = torch.randn(9, 2100)
    _close(cpu_gemm._mm(x, wt), x @ wt, 2100)


def test_a_transposed_weight_with_rows_more_than_a_page_apart_is_packed(own_gemm):
    wt = torch.randn(300, 4096)[:, :70]  # rows 16 KB apart
    x = torch.randn(10, 300)
    _close(cpu_gemm._mm(x, wt), x @ wt, 300)


def test_the_bias_starts_the_accumulators_even_when_strided(mm_calls):
    x, w = torch.randn(11, 20), torch.randn(45, 20)
    b = torch.randn(90)[::2]
    _close(cpu_gemm.linear(x, w, b), torch.addmm(b, x, w.t()), 20)
    assert mm_calls.calls == 1


def test_addmm_takes_a_matrix_addend(mm_calls):
    x, w, acc = torch.randn(6, 8), torch.randn(10, 8), torch.randn(6, 10)
    _close(cpu_gemm.addmm(acc, x, w.t()), torch.addmm(acc, x, w.t()), 8)
    assert mm_calls.calls == 1


def test_empty_operands_give_empty_or_bias_only_products(own_gemm):
    assert cpu_gemm.linear(torch.randn(0, 4), torch.randn(3, 4)).shape == (0, 3)
    b = torch.randn(3)
    torch.testing.assert_close(cpu_gemm.linear(torch.randn(2, 0), torch.randn(3, 0), b), b.expand(2, 3))


def test_linear_gradients_equal_torch(mm_calls):
    x, w, b = (torch.randn(*s, requires_grad=True) for s in ((37, 19), (45, 19), (45,)))
    g = torch.randn(37, 45)
    got = torch.autograd.grad(cpu_gemm.linear(x, w, b), (x, w, b), g)
    assert mm_calls.calls >= 2  # the product and the input gradient (the weight's is sg_matmul_tn)
    want = torch.autograd.grad(torch.nn.functional.linear(x, w, b), (x, w, b), g)
    for a, e in zip(got, want):
        _close(a, e, 45)


@pytest.fixture
def tn_calls(own_gemm, monkeypatch):
    return _spy(monkeypatch, "sg_matmul_tn")


# rows past a block of SG_TN_KC = 384 (one, two and three blocks), tails of both panels
@pytest.mark.parametrize("R,N,K", [(1, 1, 1), (7, 5, 3), (385, 33, 17), (1000, 64, 40), (800, 512, 128),
                                   (769, 9, 70), (40, 200, 33)])
def test_wgrad_equals_torch_for_any_tail_and_any_number_of_row_blocks(tn_calls, R, N, K):
    g, x = torch.randn(R, N), torch.randn(R, K)
    _close(cpu_gemm.wgrad(g, x), g.t() @ x, R)
    assert tn_calls.calls == 1


def test_the_avx2_build_of_wgrad_equals_torch(own_gemm, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CFLAGS", "-O2 -march=native -mno-avx512f")
    for R, N, K in [(6, 16, 3), (400, 13, 17), (50, 7, 40)]:
        g, x = torch.randn(R, N), torch.randn(R, K)
        _close(cpu_gemm.wgrad(g, x), g.t() @ x, R)


def test_wgrad_reads_strided_operands_and_sums_over_every_leading_dim(tn_calls):
    g = torch.randn(5, 3, 40)[..., 2:31]  # column slice: rows 40 apart
    x = torch.randn(5, 3, 21)
    _close(cpu_gemm.wgrad(g, x), g.reshape(15, 29).t() @ x.reshape(15, 21), 15)
    xt = torch.randn(21, 15).t()  # columns not adjacent: copied first
    _close(cpu_gemm.wgrad(g.reshape(15, 29), xt), g.reshape(15, 29).t() @ xt, 15)
    assert tn_calls.calls == 2


def test_wgrad_of_no_rows_is_zero_and_mismatched_rows_are_named_by_torch(tn_calls):
    assert torch.equal(cpu_gemm.wgrad(torch.randn(0, 4), torch.randn(0, 3)), torch.zeros(4, 3))
    assert cpu_gemm.wgrad(torch.randn(5, 0), torch.randn(5, 3)).shape == (0, 3)
    with pytest.raises(RuntimeError, match="size mismatch|shapes cannot be multiplied"):
        cpu_gemm.wgrad(torch.randn(5, 4), torch.randn(6, 3))
    with pytest.raises(RuntimeError):  # as many rows in all, but not the same leading dims
        cpu_gemm.wgrad(torch.randn(5, 3, 4), torch.randn(3, 5, 2))


def test_wgrad_with_torch_gemm_keeps_an_empty_feature_dim(monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", "mkl")
    assert cpu_gemm.wgrad(torch.randn(5, 0), torch.randn(5, 3)).shape == (0, 3)
    assert cpu_gemm.wgrad(torch.randn(2, 5, 4), torch.randn(2, 5, 0)).shape == (4, 0)


def test_compiled_weight_gradients_after_the_loop_take_wgrad(tn_calls):
    rec = sg.Recurrence(sg.cells.lstm(6, 8))
    m = sg.compile(rec, backend="cpu")
    assert "_gemm.wgrad(" in m.source()
    x = torch.randn(9, 3, 6, requires_grad=True)
    wrt = [x] + list(rec.parameters())
    got = torch.autograd.grad(m(x)[0].sum(), wrt)
    want = torch.autograd.grad(rec(x)[0].sum(), wrt)
    for a, e in zip(got, want):
        _close(a, e, 27)
    assert tn_calls.calls == 2  # the recurrent weight's after the loop, the input weight's in addmm's backward


def test_float64_takes_torch_gemm_unchanged(own_gemm):
    x, w = torch.randn(5, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    assert not cpu_gemm.enabled(x, w)
    assert torch.equal(cpu_gemm.linear(x, w), torch.nn.functional.linear(x, w))


def test_the_gemm_is_chosen_by_cpu_vendor(monkeypatch):
    monkeypatch.delenv("SEQGRAPH_CPU_GEMM", raising=False)
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: "GenuineIntel")
    assert cpu_gemm.per_step_gemm() == "mkl"
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: "AuthenticAMD")
    assert cpu_gemm.per_step_gemm() == "seqgraph"
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: "")  # no /proc/cpuinfo, or an ARM CPU: not measured
    assert cpu_gemm.per_step_gemm() == "mkl"


def test_the_environment_overrides_the_choice_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", "MKL")
    assert cpu_gemm.per_step_gemm() == "mkl"
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", "openblas")
    with pytest.raises(ValueError, match="SEQGRAPH_CPU_GEMM must be one of seqgraph, mkl, got 'openblas'"):
        cpu_gemm.per_step_gemm()


@pytest.mark.parametrize("gemm", cpu_gemm.GEMMS)
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_c_loops_with_either_gemm_equal_the_reference_in_float32(monkeypatch, name, gemm):
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", gemm)
    rec = sg.Recurrence(BUILTIN[name]())
    comp = sg.compile(rec, backend="cpu")
    before = comp._program.c_loops.calls
    xs, ctx = make_inputs(rec.cell, 6, 11, dtype=torch.float32)  # 11 rows: a full tile and a tail
    check_against_reference(rec, comp, xs, ctx, 1e-5, lengths=torch.tensor([6, 1, 3, 6, 2, 5, 6, 4, 6, 6, 1]))
    assert comp._program.c_loops.calls - before == 2


@pytest.mark.parametrize("order", [cpu_gemm.GEMMS, cpu_gemm.GEMMS[::-1]], ids=["seqgraph first", "mkl first"])
def test_the_per_step_products_follow_the_gemm_choice_at_each_call(monkeypatch, order):
    # loaded for MKL, a library binds seqgraph's GEMM when a later call first asks for it
    torch.manual_seed(0)
    comp = sg.compile(sg.Recurrence(sg.cells.lstm(64, 96 if order[0] == "seqgraph" else 88)), backend="cpu")
    x = torch.randn(10, 30, 64)  # 300 rows (150 a thread): both GEMMs pack (PACKED_MIN_ROWS, SG_PACK_MIN_ROWS)
    outs = {}
    for gemm in order:
        monkeypatch.setenv("SEQGRAPH_CPU_GEMM", gemm)
        with torch.no_grad():
            outs[gemm] = comp(x)[0]
    torch.testing.assert_close(outs["seqgraph"], outs["mkl"], atol=1e-5, rtol=1e-5)
    assert not torch.equal(outs["seqgraph"], outs["mkl"])  # different kernels sum in different orders
    from seqgraph.kernels.c_launch import _OWN_GEMM_BOUND
    assert comp._program.c_loops.lib.keys[(torch.float32, "loops")] in _OWN_GEMM_BOUND


def test_mismatched_shapes_go_to_torch_which_names_them(own_gemm):
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        cpu_gemm.linear(torch.randn(4, 10), torch.randn(5, 8))


def test_a_bias_of_the_wrong_size_goes_to_torch_which_names_it(own_gemm):
    with pytest.raises(RuntimeError, match=r"expanded size of the tensor \(5\) must match the existing size \(7\)"):
        cpu_gemm.linear(torch.randn(4, 8), torch.randn(5, 8), torch.ones(7))


def test_a_bias_or_addend_that_broadcasts_is_broadcast_as_torch_does(own_gemm):
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    one = torch.full((1,), 100.0)
    _close(cpu_gemm.linear(x, w, one), torch.nn.functional.linear(x, w, one), 8)
    row = torch.randn(1, 5)
    _close(cpu_gemm.addmm(row, x, w.t()), torch.addmm(row, x, w.t()), 8)


def test_a_compiled_model_given_a_parameter_of_the_wrong_shape_raises(own_gemm):
    comp = sg.compile(sg.Recurrence(sg.cells.lstm(8, 12)), backend="cpu")
    p = next(v for v in comp.parameters() if tuple(v.shape) == (48, 8))  # the input weight
    p.data = torch.randn(48, 6)
    with pytest.raises(sg.InputError, match=r"parameter 'ih.weight' .* must have shape \(48, 8\), got \(48, 6\)"):
        comp(torch.randn(3, 2, 8))


def test_linear_of_operands_that_do_not_fit_is_torchs_error(own_gemm):
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        cpu_gemm.linear(torch.randn(3, 8), torch.randn(48, 6))


def test_differentiating_the_gradient_of_linear_twice_raises(own_gemm):
    x, w = torch.randn(6, 5, requires_grad=True), torch.randn(7, 5, requires_grad=True)
    (gx,) = torch.autograd.grad(cpu_gemm.linear(x, w).pow(2).sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        gx.sum().backward()


def test_under_cpu_autocast_products_run_in_autocast_dtype(own_gemm):
    x, w = torch.randn(6, 5), torch.randn(7, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_gemm.linear(x, w).dtype == torch.nn.functional.linear(x, w).dtype == torch.bfloat16


def test_a_library_forgotten_by_clear_memory_cache_binds_seqgraphs_gemm_when_a_call_asks(monkeypatch):
    from seqgraph.kernels import c_launch
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", "mkl")
    rec = sg.Recurrence(sg.cells.gru(5, 7))
    comp = sg.compile(rec, backend="cpu")
    x = torch.randn(4, 3, 5)
    comp(x)
    c_launch.clear_memory_cache()
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", "seqgraph")
    torch.testing.assert_close(comp(x)[0], rec(x)[0], atol=1e-5, rtol=1e-5)
    assert comp._program.c_loops.lib.keys[(torch.float32, "loops")] in c_launch._OWN_GEMM_BOUND


@pytest.mark.parametrize("gemm", ["seqgraph", "mkl"])
def test_addmm_in_place_adds_the_product_into_its_addend_and_gives_torchs_gradients(monkeypatch, gemm):
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", gemm)
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    base = torch.randn(6, 5, requires_grad=True)
    acc = base * 1.0  # (a non-leaf, as a product's output is)
    got = cpu_gemm.addmm_(acc, x, w.t())
    assert got is acc
    want = torch.addmm(base, x, w.t())
    _close(got, want, 8)
    grads = torch.autograd.grad(got.sum(), (x, w, base))
    for g, r in zip(grads, torch.autograd.grad(want.sum(), (x, w, base))):
        _close(g, r, 8)


def test_a_sum_of_hoisted_products_through_seqgraphs_gemm_gives_the_references_gradients(own_gemm):
    # the first product comes from cpu_gemm's own autograd op, and the others are added into it
    torch.manual_seed(0)
    rec = sg.Recurrence(sg.cells.qrnn(16, 24, window=3))
    comp = sg.compile(rec, backend="cpu")
    assert "_gemm.addmm_(" in comp.source()
    x = torch.randn(7, 5, 16, requires_grad=True)
    got = torch.autograd.grad(comp(x)[0].sum(), [x] + list(rec.parameters()))
    want = torch.autograd.grad(rec(x)[0].sum(), [x] + list(rec.parameters()))
    for g, w in zip(got, want):
        _close(g, w, 16)


@pytest.fixture
def sized_calls(monkeypatch):
    """seqgraph's GEMM chosen, with the sizes it leaves to torch's as shipped."""
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", "seqgraph")
    return _spy(monkeypatch, "sg_matmul")


def test_a_few_rows_times_a_weight_it_would_pack_take_torchs_gemm(sized_calls):
    x, w, b = torch.randn(4, 512), torch.randn(2048, 512), torch.randn(2048)  # a one-step call's product
    assert cpu_gemm.PACKED_MIN_ROWS > 4
    _close(cpu_gemm.linear(x, w, b), torch.addmm(b, x, w.t()), 512)
    assert sized_calls.calls == 0


def test_enough_rows_to_pay_for_packing_take_seqgraphs_gemm(sized_calls):
    x, w = torch.randn(cpu_gemm.PACKED_MIN_ROWS, 64), torch.randn(96, 64)
    _close(cpu_gemm.linear(x, w), x @ w.t(), 64)
    assert sized_calls.calls == 1


def test_a_weight_read_in_place_takes_seqgraphs_gemm_for_a_few_rows(sized_calls):
    g, w = torch.randn(4, 512), torch.randn(512, 128)  # an input gradient: g @ W, W's rows read where they lie
    _close(cpu_gemm._mm(g, w), g @ w, 512)
    assert sized_calls.calls == 1


def test_a_product_too_small_to_pay_for_the_call_takes_torchs_gemm(sized_calls):
    g, w = torch.randn(2, 16), torch.randn(16, 8)
    assert 2 * 2 * 16 * 8 < cpu_gemm.TINY_FLOPS
    _close(cpu_gemm._mm(g, w), g @ w, 16)
    assert sized_calls.calls == 0


def test_a_tiny_product_with_a_weight_it_would_pack_takes_torchs_gemm(sized_calls):
    x, w = torch.randn(cpu_gemm.PACKED_MIN_ROWS, 8), torch.randn(16, 8)  # enough rows, but 32K flops
    _close(cpu_gemm.linear(x, w), x @ w.t(), 8)
    assert sized_calls.calls == 0


def test_a_weight_gradient_over_a_few_rows_takes_torchs_gemm(monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CPU_GEMM", "seqgraph")
    calls = _spy(monkeypatch, "sg_matmul_tn")
    g, x = torch.randn(cpu_gemm.TN_MIN_ROWS - 1, 512), torch.randn(cpu_gemm.TN_MIN_ROWS - 1, 128)
    _close(cpu_gemm.wgrad(g, x), g.t() @ x, g.shape[0])
    assert calls.calls == 0


def test_linear_without_gradients_records_no_graph(sized_calls):
    x, w = torch.randn(200, 64), torch.randn(96, 64, requires_grad=True)
    with torch.no_grad():
        y = cpu_gemm.linear(x, w)
    assert y.grad_fn is None and not y.requires_grad
    assert cpu_gemm.linear(x, w).grad_fn is not None
    assert sized_calls.calls == 2
