"""seqgraph/compiled.py: compiled modules against the reference interpreter (values, gradients, masking, state), and their interface."""
import contextlib
import copy
import re
import os

import numpy as np
import pytest
import torch

import seqgraph as sg
from seqgraph.compiled import STATS, clear_cache

from threads import entered_in_another_thread
from zoo import ZOO, make_inputs


def _loss(out, state):
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o * torch.linspace(0.1, 1.0, o.shape[-1], dtype=o.dtype)).sum() for o in outs)
    return total + sum((v ** 2).sum() for v in state.values())


def _run(module, xs, ctx, **kw):
    torch.manual_seed(1)  # both runs draw the same dropout noise
    out, state = module(tuple(xs), context=ctx, **kw)
    return out, state


def _grads(loss, wrt):
    return torch.autograd.grad(loss, wrt, allow_unused=True)


def _compare(rec, comp, T=5, B=3, dtype=torch.float64, tol=1e-10, **kw):
    xs, ctx = make_inputs(rec.cell, T, B, dtype)
    wrt = [x for x in xs if x.requires_grad] + list(rec.parameters()) + ([ctx["memory"]] if ctx else [])
    o1, s1 = _run(rec, xs, ctx, **kw)
    o2, s2 = _run(comp, xs, ctx, **kw)
    for a, b in zip(o1 if isinstance(o1, tuple) else (o1,), o2 if isinstance(o2, tuple) else (o2,), strict=True):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=tol, rtol=tol)
    g1 = _grads(_loss(o1, s1), wrt)
    g2 = _grads(_loss(o2, s2), wrt)
    for a, b in zip(g1, g2, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_torch_backend_equals_reference_in_float64(name):
    rec = sg.Recurrence(ZOO[name]()).double()
    _compare(rec, sg.compile(rec, backend="torch"))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_torch_backend_equals_reference_with_mixed_lengths(name):
    rec = sg.Recurrence(ZOO[name]()).double()
    _compare(rec, sg.compile(rec, backend="torch"), lengths=torch.tensor([5, 2, 0]))


@pytest.mark.parametrize("name", ["lstm_ops", "peephole_ln", "attention"])
def test_torch_backend_equals_reference_in_float32_within_1e5(name):
    rec = sg.Recurrence(ZOO[name]())
    _compare(rec, sg.compile(rec, backend="torch"), T=6, B=4, dtype=torch.float32, tol=1e-5,
             mask=torch.rand(6, 4) > 0.3)


@pytest.mark.parametrize("unroll", [2, 3])
def test_unrolled_loop_equals_reference(unroll):
    rec = sg.Recurrence(ZOO["gru_reset_after"]()).double()
    _compare(rec, sg.compile(rec, unroll=unroll), T=7, lengths=torch.tensor([7, 4, 1]))


def test_training_mode_dropout_draws_the_same_noise_as_reference():
    rec = sg.Recurrence(ZOO["embed_drop"]()).double().train()
    _compare(rec, sg.compile(rec))


def test_compiled_module_shares_parameters_with_the_original():
    rec = sg.Recurrence(ZOO["lstm_ops"]())
    comp = sg.compile(rec)
    assert [id(p) for p in rec.parameters()] == [id(p) for p in comp.parameters()]
    assert list(rec.state_dict()) == list(comp.state_dict())
    opt = torch.optim.SGD(comp.parameters(), lr=0.1)
    x = torch.randn(4, 2, 3)
    comp(x)[0].sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(comp(x)[0], rec(x)[0])


def test_remember_carries_state_across_calls_like_reference():
    rec = sg.Recurrence(ZOO["lstm_ops"](), remember=True).double()
    comp = sg.compile(sg.Recurrence(rec.cell, remember=True).double())
    comp.load_state_dict(rec.state_dict())
    x1, x2 = torch.randn(3, 2, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    rec(x1), comp(x1)
    torch.testing.assert_close(comp(x2)[0], rec(x2)[0])
    rec.forget(), comp.forget()
    torch.testing.assert_close(comp(x2)[0], rec(x2)[0])


def test_one_compile_serves_every_length_and_batch_size():
    cell = ZOO["lstm_ops"]()
    clear_cache()
    before = STATS["compiles"]
    comp = sg.compile(sg.Recurrence(cell), backend="cpu")
    assert STATS["compiles"] - before == 2  # its C program, and the torch one other dtypes run
    for T, B in [(1, 1), (5, 3), (9, 2), (2, 7)]:
        out, _ = comp(torch.randn(T, B, 3))
        assert out.shape == (T, B, 5)
    sg.compile(sg.Recurrence(cell), backend="cpu")
    assert STATS["compiles"] - before == 2


def test_no_grad_forward_equals_reference():
    rec = sg.Recurrence(ZOO["mufuru_like"]()).double()
    comp = sg.compile(rec)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(comp(x, lengths=torch.tensor([6, 0, 3]))[0],
                                   rec(x, lengths=torch.tensor([6, 0, 3]))[0])


def _h0_grads(rec, x, h0):
    """The gradient of the summed outputs with respect to h0, from rec and from its compiled twin."""
    comp = sg.compile(rec)
    return [torch.autograd.grad(m(x, {"h": h0})[0].sum(), h0)[0] for m in (rec, comp)]


def test_gradient_of_initial_state_flows_through_compiled_loop():
    rec = sg.Recurrence(ZOO["gru_reset_before"]()).double()
    h0 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    g1, g2 = _h0_grads(rec, torch.randn(4, 2, 3, dtype=torch.float64), h0)
    torch.testing.assert_close(g2, g1)


def test_compiled_backward_passes_gradcheck():
    rec = sg.Recurrence(ZOO["peephole_ln"]()).double()
    comp = sg.compile(rec)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: comp(x, lengths=torch.tensor([3, 1]))[0][0], (x,))


def test_compile_rejects_unknown_backend_and_bad_unroll():
    rec = sg.Recurrence(ZOO["lstm_ops"]())
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        sg.compile(rec, backend="cuda")
    with pytest.raises(ValueError, match="unroll must be a positive int"):
        sg.compile(rec, unroll=0)


def test_unroll_takes_any_integer_type_but_not_a_bool():
    rec = sg.Recurrence(ZOO["lstm_ops"]())
    assert sg.compile(rec, backend="torch", unroll=np.int64(2)).unroll == 2
    with pytest.raises(ValueError, match="unroll must be a positive int, got True"):
        sg.compile(rec, unroll=True)


def test_compiled_module_keeps_argument_checks():
    comp = sg.compile(sg.Recurrence(ZOO["lstm_ops"]()))
    with pytest.raises(sg.InputError, match="lengths must lie in"):
        comp(torch.randn(4, 2, 3), lengths=torch.tensor([5, 1]))


def _compare_simple(cell, x, **kw):
    rec = sg.Recurrence(cell).double()
    comp = sg.compile(rec, backend="torch")
    x = x.double().requires_grad_()
    o1, s1 = rec(x, **kw)
    o2, s2 = comp(x, **kw)
    o1, o2 = (o1 if isinstance(o1, tuple) else (o1,)), (o2 if isinstance(o2, tuple) else (o2,))
    for a, b in zip(o1, o2, strict=True):
        torch.testing.assert_close(b, a)
    loss1 = sum((o * o).sum() for o in o1) + sum(v.sum() for v in s1.values())
    loss2 = sum((o * o).sum() for o in o2) + sum(v.sum() for v in s2.values())
    wrt = [x] + list(rec.parameters())
    for a, b in zip(torch.autograd.grad(loss1, wrt, allow_unused=True),
                    torch.autograd.grad(loss2, wrt, allow_unused=True), strict=True):
        torch.testing.assert_close(b, a)
    return s1, s2


def test_bias_is_not_folded_into_a_product_that_is_also_an_output():
    x, h = sg.Input(3, name="x"), sg.State(4, name="h")
    p = sg.Linear(3, 4, bias=False)(x)
    nh = sg.tanh(p + sg.Parameter(4, name="b") + h)
    _compare_simple(sg.Cell([x], {h: nh}, [p, nh]), torch.randn(5, 2, 3))


def test_state_whose_previous_value_is_never_read_is_named_and_compiles():
    x, h = sg.Input(3, name="x"), sg.State(2)
    s1, s2 = _compare_simple(sg.Cell([x], {h: sg.tanh(sg.Linear(3, 2)(x))}), torch.randn(4, 3, 3),
                             lengths=torch.tensor([4, 1, 0]))
    assert list(s1) == list(s2) == ["state_0"]


def test_zero_steps_give_empty_outputs_and_the_initial_state():
    rec = sg.Recurrence(ZOO["lstm_ops"]())
    comp = sg.compile(rec)
    x = torch.randn(0, 3, 3, requires_grad=True)
    out, state = comp(x)
    assert out.shape == (0, 3, 5) and state["h"].shape == (3, 5)
    with torch.no_grad():
        assert comp(x)[0].shape == (0, 3, 5)


def test_cell_without_states_whose_output_is_a_context_function():
    x, z = sg.Input(2, name="x"), sg.Context(5, name="z")
    cell = sg.Cell([x], {}, [sg.tanh(z), x * 2])
    rec = sg.Recurrence(cell)
    comp = sg.compile(rec)
    xs, ctx = torch.randn(4, 3, 2), torch.randn(3, 5)
    for a, b in zip(rec(xs, context=ctx)[0], comp(xs, context=ctx)[0]):
        torch.testing.assert_close(b, a)


def test_gradient_at_a_tie_of_maximum_splits_like_the_reference():
    x, h = sg.Input(2, name="x"), sg.State(2, name="h")
    cell = sg.Cell([x], {h: sg.maximum(h, sg.Linear(2, 2, bias=False)(x))})
    rec = sg.Recurrence(cell).double()
    with torch.no_grad():
        rec.params.linear.weight.zero_()
    h0 = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    g1, g2 = _h0_grads(rec, torch.randn(1, 1, 2, dtype=torch.float64), h0)
    torch.testing.assert_close(g2, g1)
    assert torch.equal(g1, torch.full((1, 2), 0.5, dtype=torch.float64))


def _layer_grads(module, x, lengths):
    out, _ = module(x, lengths=lengths)
    return [out] + list(torch.autograd.grad((out * out).sum(), [x] + list(module.parameters())))


@pytest.mark.parametrize("make", [
    lambda: sg.stack(sg.cells.lstm, 3, [4, 5]),
    lambda: sg.Bidirectional(sg.Recurrence(sg.cells.gru(3, 4))),
])
def test_compiling_a_container_swaps_its_recurrences_and_keeps_results(make):
    import copy
    torch.manual_seed(0)
    ref = make().double()
    comp = sg.compile(copy.deepcopy(ref), backend="torch")
    assert any(isinstance(m, sg.CompiledRecurrence) for m in comp.modules())
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 0])
    for a, b in zip(_layer_grads(ref, x, lengths), _layer_grads(comp, x, lengths)):
        torch.testing.assert_close(b, a)


def test_debug_levels_print_passes_ir_and_generated_source(monkeypatch, capsys):
    from seqgraph.compiled import clear_cache
    for level, words in [("1", "pass fuse_gate_matmuls:"), ("2", "IR after simplify"), ("3", "generated source (torch)")]:
        monkeypatch.setenv("SEQGRAPH_DEBUG", level)
        clear_cache()
        sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="torch")
        assert words in capsys.readouterr().err


def test_debug_output_says_which_backend_each_compile_is_for(monkeypatch, capsys, fresh_programs):
    monkeypatch.setenv("SEQGRAPH_DEBUG", "1")
    sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="triton")
    err = capsys.readouterr().err
    assert "compiling 'gru' for backend='triton'" in err
    assert "compiling 'gru' for backend='torch': the torch code that calls in other dtypes" in err


@pytest.fixture
def fresh_programs():
    """An empty program cache, emptied again after the test whatever happened (a test that
    patches the planner must not leave its programs for the next)."""
    from seqgraph.compiled import clear_cache
    clear_cache()
    yield
    clear_cache()


def test_a_backward_the_plan_cannot_derive_falls_back_to_autograd_over_the_reference(monkeypatch, fresh_programs):
    import dataclasses
    from seqgraph.compiler.ops import REGISTRY
    for op in ("sum_to", "linear_wgrad", "embedding_wgrad"):  # pretend no weight gradient can be reduced
        monkeypatch.setitem(REGISTRY, op, dataclasses.replace(REGISTRY[op], sums_rows=False))
    rec = sg.Recurrence(ZOO["gru_reset_after"]()).double()
    comp = sg.compile(rec)
    assert "falls back to autograd" in comp.plan().describe()
    _compare(rec, comp, lengths=torch.tensor([5, 2, 0]))


def test_a_deep_copy_of_a_compiled_module_has_its_own_parameters_and_shares_the_code():
    import copy
    comp = sg.compile(sg.Recurrence(ZOO["lstm_ops"]()))
    twin = copy.deepcopy(comp)
    assert twin._program is comp._program
    assert twin.params.hh.weight is not comp.params.hh.weight
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(twin(x)[0], comp(x)[0])
    with torch.no_grad():
        twin.params.hh.weight.add_(1.0)
    assert not torch.allclose(twin(x)[0], comp(x)[0])


def test_auto_backend_runs_the_c_kernels_on_the_cpu():
    rec = sg.Recurrence(ZOO["gru_reset_after"]())
    comp = sg.compile(rec)  # backend="auto"
    assert comp.backend == "auto" and comp._program.backend == "cpu"
    x = torch.randn(3, 2, 3)
    torch.testing.assert_close(comp(x)[0], rec(x)[0])


def test_auto_backend_runs_the_torch_code_where_there_is_no_c_compiler(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    rec = sg.Recurrence(ZOO["gru_reset_after"]())
    with pytest.warns(RuntimeWarning, match="backend='auto' runs the torch code on the CPU"):
        comp = sg.compile(rec)
    assert comp._program.backend == "torch"
    x = torch.randn(3, 2, 3)
    torch.testing.assert_close(comp(x)[0], rec(x)[0])


def test_cpu_backend_without_a_c_compiler_says_so(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(RuntimeError, match="C compiler"):
        sg.compile(sg.Recurrence(ZOO["gru_reset_after"]()), backend="cpu")


def test_scalar_state_gradients_keep_the_state_shape_on_padded_steps():
    x, h = sg.Input((), name="x"), sg.State((), name="h")
    h_next = sg.tanh(x * h + 0.5)
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next])).double()
    comp = sg.compile(rec, backend="torch")
    xs = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 0, 2])
    o1, s1 = rec(xs, {"h": h0}, lengths=lengths)
    o2, s2 = comp(xs, {"h": h0}, lengths=lengths)
    g1 = torch.autograd.grad(o1.sum() + s1["h"].sum(), [xs, h0])
    g2 = torch.autograd.grad(o2.sum() + s2["h"].sum(), [xs, h0])
    assert g2[1].shape == h0.shape
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)


def _sqrt_cell():
    x, h = sg.Input(3, name="x"), sg.State(4, name="h")
    return sg.Cell([x], {h: sg.sqrt(sg.abs(h)) * 0.5 + sg.Linear(3, 4)(x)})


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("real_rows_below", [0.6, -1.0], ids=["real rows only", "all rows"])
def test_an_infinite_derivative_on_a_padded_row_leaves_every_gradient_finite(backend, real_rows_below, monkeypatch):
    # row 1 never has a real step and starts at h = 0, where sqrt's derivative is infinite:
    # autograd through torch.where alone would give 0 * inf = nan there, spreading to the
    # weights; every backend drops the padded row's gradients where they leave the row, so
    # every sequence gets the gradients it has alone
    import seqgraph.compiler.codegen_torch as codegen_torch
    monkeypatch.setattr(codegen_torch, "REAL_ROWS_BELOW", real_rows_below)
    rec = sg.Recurrence(_sqrt_cell()).double()
    comp = sg.compile(rec, backend=backend)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    h0 = torch.stack([torch.rand(4, dtype=torch.float64) + 0.5, torch.zeros(4, dtype=torch.float64),
                      torch.rand(4, dtype=torch.float64) + 0.5]).requires_grad_()
    lengths = torch.tensor([4, 0, 2])
    out, fin = comp(x, {"h": h0}, lengths=lengths)
    got = torch.autograd.grad(out.sum() + fin["h"].sum(), [h0, *rec.parameters()])
    assert all(torch.isfinite(g).all() for g in got)
    want_h0, want_w = torch.zeros_like(h0), [torch.zeros_like(p) for p in rec.parameters()]
    for b in (0, 2):  # the real sequences, each alone through the reference
        h0_b = h0[b:b + 1].detach().requires_grad_()
        o, f = rec(x[:lengths[b], b:b + 1], {"h": h0_b})
        g = torch.autograd.grad(o.sum() + f["h"].sum(), [h0_b, *rec.parameters()])
        want_h0[b] = g[0][0]
        want_w = [a + c for a, c in zip(want_w, g[1:])]
    want_h0[1] = 1.0  # no step: the final state is the initial one
    torch.testing.assert_close(got[0], want_h0)
    for a, b in zip(got[1:], want_w):
        torch.testing.assert_close(a, b)


def _out_and_final_sum(result):
    out, fin = result
    return out.sum() + fin["h"].sum()


def _assert_finite_reference_gradients(rec, backend, loss_of, xs, wrt_input=False):
    """loss_of(module, xs) through the reference and the compiled backend: the reference's
    gradients (of the parameters, and of xs with wrt_input) are finite and the backend's equal them."""
    grads = []
    for module in (rec, sg.compile(rec, backend=backend)):
        x = xs.clone().requires_grad_(wrt_input)
        grads.append(torch.autograd.grad(loss_of(module, x), ([x] if wrt_input else []) + list(rec.parameters())))
    for want, got in zip(*grads, strict=True):
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("real_rows_below", [0.6, -1.0], ids=["real rows only", "all rows"])
def test_an_infinite_value_on_a_padded_row_stays_out_of_the_weight_gradients(backend, real_rows_below, monkeypatch):
    # 1/s is infinite on row 0 (no real step, s = 0) and p's gradient sums g * (1/s) over rows:
    # the sums after the loop read the real rows only, or all rows with the padding's set to 0
    import seqgraph.compiler.codegen_torch as codegen_torch
    monkeypatch.setattr(codegen_torch, "REAL_ROWS_BELOW", real_rows_below)
    x, s = sg.Input(3, name="x"), sg.State(2, name="s")
    p = sg.Parameter(2, name="p")
    s2 = sg.tanh(sg.Linear(3, 2)(x)) + p * (1.0 / s)
    rec = sg.Recurrence(sg.Cell([x], {s: s2}, [s2])).double()
    xs = torch.randn(3, 6, 3, dtype=torch.float64)
    s0 = torch.tensor([[0.0, 0.0]] + [[1.0, 2.0]] * 5, dtype=torch.float64)
    lengths = torch.tensor([0, 3, 1, 3, 2, 0])  # 9 of 18 steps real
    _assert_finite_reference_gradients(rec, backend, lambda m, x: m(x, {"s": s0}, lengths=lengths)[0].sum(), xs)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("real_rows_below", [0.6, -1.0], ids=["real rows only", "all rows"])
def test_an_infinite_state_carried_on_padded_rows_stays_out_of_the_weight_gradients(backend, real_rows_below,
                                                                                  monkeypatch):
    # row 1 has no real step and an infinite initial state: the reference never multiplies it by
    # the recurrent weight; a compiled weight gradient sums over its padded rows, zeroed first
    import seqgraph.compiler.codegen_torch as codegen_torch
    monkeypatch.setattr(codegen_torch, "REAL_ROWS_BELOW", real_rows_below)
    torch.manual_seed(0)
    rec = sg.Recurrence(sg.cells.lstm(3, 4)).double()
    xs = torch.randn(4, 3, 3, dtype=torch.float64)
    h0 = torch.randn(3, 4, dtype=torch.float64)
    h0[1] = float("inf")
    lengths = torch.tensor([4, 0, 2])
    _assert_finite_reference_gradients(rec, backend, lambda m, x: m(x, {"h": h0}, lengths=lengths)[0].sum(), xs)


def _pole_cell(op):
    x, h = sg.Input(3, name="x"), sg.State(4, name="h")
    lin = sg.Linear(3, 3)
    hoisted = {"log": lambda: sg.log(x),  # padded x is 0: log(0) = -inf
               "sqrt": lambda: sg.sqrt(sg.abs(lin(x))),  # 0 with a zero bias: an infinite derivative
               "div": lambda: x / lin(x),  # 0 / 0
               "layer_norm_eps0": lambda: sg.layer_norm(lin(x), eps=0.0)}[op]()  # a constant row: 0 / 0
    return sg.Cell([x], {h: sg.tanh(sg.Linear(3, 4)(hoisted) + h * 0.5)})


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("real_rows_below", [0.6, -1.0], ids=["real rows only", "all rows"])
@pytest.mark.parametrize("op", ["log", "sqrt", "div", "layer_norm_eps0"])
def test_a_pole_of_a_hoisted_op_on_a_padded_row_stays_out_of_the_gradients(op, backend, real_rows_below,
                                                                             monkeypatch):
    # the prologue computes a padded row's hoisted values too, where the inputs are 0: there
    # log, sqrt and a divisor are fed 1, and a layer norm without eps a row of 0, 1, 0, 1, so
    # no 0 * inf reaches the weights' gradients
    import seqgraph.compiler.codegen_torch as codegen_torch
    monkeypatch.setattr(codegen_torch, "REAL_ROWS_BELOW", real_rows_below)
    torch.manual_seed(0)
    rec = sg.Recurrence(_pole_cell(op)).double()
    with torch.no_grad():
        for name, p in rec.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    xs = torch.rand(4, 3, 3, dtype=torch.float64) + 0.5
    lengths = torch.tensor([4, 0, 2])
    _assert_finite_reference_gradients(rec, backend, lambda m, x: _out_and_final_sum(m(x, lengths=lengths)), xs,
                                       wrt_input=True)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("real_rows_below", [0.6, -1.0], ids=["real rows only", "all rows"])
def test_an_exp_that_overflows_only_on_a_padded_row_stays_out_of_the_gradients(backend, real_rows_below,
                                                                                 monkeypatch):
    # exp(1000 - 300 x) is tiny for the real x >= 5 and inf at the padding's x = 0
    import seqgraph.compiler.codegen_torch as codegen_torch
    monkeypatch.setattr(codegen_torch, "REAL_ROWS_BELOW", real_rows_below)
    x, h = sg.Input(1, name="x"), sg.State(2, name="h")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(2, 2)(h) + sg.exp(sg.Linear(1, 2, name="lin")(x)))})
    rec = sg.Recurrence(cell).double()
    with torch.no_grad():
        rec.params.lin.weight.fill_(-300.0)
        rec.params.lin.bias.fill_(1000.0)
    xs = 5.0 + torch.rand(5, 4, 1, dtype=torch.float64)
    _assert_finite_reference_gradients(
        rec, backend, lambda m, x: _out_and_final_sum(m(x, lengths=torch.tensor([5, 5, 5, 2]))), xs, wrt_input=True)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("form", ["log(c) * p", "sqrt(c * p)", "p / c", "Linear(log(c))", "Linear(exp(c))"])
def test_a_pole_of_a_context_only_value_on_a_sequence_without_steps_stays_out_of_the_gradients(form, backend):
    # a sequence with no real step has its contexts zeroed; the reference never runs its row,
    # the prologue computes context-only values for every row: a pole there is fed 1
    torch.manual_seed(0)
    x, h, c = sg.Input(3, name="x"), sg.State(3, name="h"), sg.Context(3, name="c")
    p = sg.Parameter(3, name="p", init="ones")
    term = {"log(c) * p": lambda: sg.log(c) * p, "sqrt(c * p)": lambda: sg.sqrt(c * p),
            "p / c": lambda: p / c, "Linear(log(c))": lambda: sg.Linear(3, 3, name="lc")(sg.log(c)),
            "Linear(exp(c))": lambda: sg.Linear(3, 3, name="lc")(sg.exp(1000.0 * (1.0 - c)))}[form]()
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(3, 3)(x) + 0.5 * h + 0.1 * term)}, contexts=[c])
    rec = sg.Recurrence(cell).double()
    xs, ctx = torch.randn(4, 3, 3, dtype=torch.float64), torch.rand(3, 3, dtype=torch.float64) + 0.5
    _assert_finite_reference_gradients(
        rec, backend, lambda m, x: _out_and_final_sum(m(x, context={"c": ctx}, lengths=torch.tensor([4, 0, 2]))), xs)


def _unread_state_grads(module, T, lengths=None):
    torch.manual_seed(0)
    xs = torch.randn(T, 2, 3)
    h0, b0 = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    out, st = module(xs, state={"h": h0, "b": b0}, lengths=lengths)
    loss = sum(o.sum() for o in out) + sum(v.sum() for v in st.values())
    return torch.autograd.grad(loss, (h0, b0), allow_unused=True)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("T,lengths", [(5, None), (5, [5, 2]), (0, None)])
def test_an_initial_state_the_step_never_reads_gets_the_gradient_the_reference_gives(backend, T, lengths):
    x, h, b = sg.Input(3, name="x"), sg.State(4, name="h"), sg.State(4, name="b")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(3, 4)(x) + sg.Linear(4, 4)(h)), b: sg.tanh(sg.Linear(3, 4)(x))})
    rec = sg.Recurrence(cell)
    lengths = torch.tensor(lengths) if lengths is not None else None
    want = _unread_state_grads(rec, T, lengths)
    got = _unread_state_grads(sg.compile(rec, backend=backend), T, lengths)
    # unmasked and T > 0: b0 is never read, so None from both; T = 0: b0 is b_T. Masked, where no
    # row is padded before b is first written, the compiled backward gives zeros (a padded row
    # would carry b0) and the reference, which runs padded steps on their real rows only, None
    if lengths is None:
        assert [g is None for g in got] == [g is None for g in want] == [False, T > 0]
    for a, e in zip(got, want):
        if a is not None or e is not None:
            zeros = torch.zeros(2, 4)
            torch.testing.assert_close(zeros if a is None else a, zeros if e is None else e)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("lengths", [None, torch.tensor([4, 2])])
def test_a_read_the_backward_never_looks_at_is_not_kept_for_it(backend, lengths):
    # the LSTM's hoisted input projection, (T, B, 4H): only its gradient is written in backward
    rec = sg.Recurrence(sg.cells.lstm(3, 5)).double()
    comp = sg.compile(rec, backend=backend)
    plan = comp.plan()
    (hoisted,) = [k for k, r in enumerate(plan.reads) if plan.cls[r.id] == "hoisted"]
    assert plan.reads[hoisted].id not in plan.backward_plan(lengths is not None).reads_used
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = comp(x, lengths=lengths)
    kept = out.grad_fn.saved_tensors[hoisted]
    assert kept.shape == (4, 2, 20) and kept.untyped_storage().nbytes() == kept.element_size()
    want = torch.autograd.grad(rec(x, lengths=lengths)[0].sum(), [x, *rec.parameters()])
    got = torch.autograd.grad(out.sum(), [x, *rec.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_infinite_constants_compile_to_valid_code(backend):
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    step = sg.tanh(sg.Linear(8, 4)(sg.concat([x, h])))
    rec = sg.Recurrence(sg.Cell([x], {h: sg.minimum(step, float("inf")) + sg.maximum(h, float("-inf")) * 0.5})).double()
    _compare(rec, sg.compile(rec, backend=backend))


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
def test_a_compiled_module_saved_whole_loads_with_its_backend_and_outputs(backend, tmp_path):
    comp = sg.compile(sg.Recurrence(sg.cells.mufuru(3, 5)), backend=backend)
    x = torch.randn(4, 2, 3)
    torch.save(comp, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.backend == backend and loaded._program is comp._program  # the cached program
    torch.testing.assert_close(loaded(x)[0], comp(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_create_graph_through_a_compiled_loop_is_refused_with_the_way_out(backend):
    rec = sg.Recurrence(sg.cells.lstm(3, 5)).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = sg.compile(rec, backend=backend)(x)
    with pytest.raises(RuntimeError, match=r"first-order backward only.*uncompiled"):
        torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("how", ["is_grads_batched", "vectorized_jacobian"])
def test_batched_gradients_through_a_compiled_loop_are_refused_with_the_way_out(backend, how):
    rec = sg.Recurrence(sg.cells.lstm(3, 5)).double()
    fast = sg.compile(rec, backend=backend)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match=r"one gradient at a time.*is_grads_batched=False, vectorize=False"):
        if how == "is_grads_batched":
            out = fast(x)[0]
            torch.autograd.grad(out, x, torch.randn((3,) + out.shape, dtype=torch.float64), is_grads_batched=True)
        else:
            torch.autograd.functional.jacobian(lambda v: fast(v)[0], x, vectorize=True)


def test_the_way_out_of_batched_gradients_gives_the_references_jacobian():
    rec = sg.Recurrence(sg.cells.gru(2, 3)).double()
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    want = torch.autograd.functional.jacobian(lambda v: rec(v)[0], x)
    fast = sg.compile(rec, backend="cpu")
    torch.testing.assert_close(torch.autograd.functional.jacobian(lambda v: fast(v)[0], x), want)
    torch.testing.assert_close(torch.func.jacrev(lambda v: fast(v)[0])(x), want)


def test_the_reference_recurrence_gives_second_order_gradients():
    rec = sg.Recurrence(sg.cells.gru(2, 3)).double()
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: rec(v)[0], (x,))


def _final_changed_in_place(module, x, lengths):
    out, fin = module(x, lengths=lengths)
    fin["h"][0] = 0  # resetting a finished sequence's state, as a training loop does
    return out, fin


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("lengths", [None, torch.tensor([4, 2])])
def test_a_final_state_changed_in_place_changes_neither_outputs_nor_gradients(backend, lengths):
    rec = sg.Recurrence(sg.cells.lstm(3, 5)).double()
    comp = sg.compile(rec, backend=backend)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        out, _ = _final_changed_in_place(comp, x, lengths)
        torch.testing.assert_close(out, rec(x, lengths=lengths)[0])
    got = _final_changed_in_place(comp, x, lengths)
    want = _final_changed_in_place(rec, x, lengths)
    gg = torch.autograd.grad(_loss(*got), [x, *rec.parameters()])
    gw = torch.autograd.grad(_loss(*want), [x, *rec.parameters()])
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)


def test_torch_jit_trace_of_a_compiled_loop_says_what_to_use_instead():
    comp = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="cpu")
    with pytest.raises(NotImplementedError, match="torch.jit.trace cannot record a compiled loop.*torch.compile"):
        torch.jit.trace(lambda x: comp(x)[0], (torch.randn(2, 1, 3),))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_torch_jit_trace_of_the_reference_warns_that_it_records_the_examples_steps():
    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rec = sg.Recurrence(sg.cells.gru(3, 4))

        def forward(self, x):
            return self.rec(x)[0]

    with pytest.warns(RuntimeWarning, match=r"records the example's 2 steps: the traced module runs that many steps"):
        torch.jit.trace(Outputs(), (torch.randn(2, 1, 3),), check_trace=False)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("cell", [lambda: sg.cells.gru(3, 4), lambda: sg.cells.lstm(3, 4)], ids=["gru", "lstm"])
def test_torch_jit_trace_of_the_reference_passes_its_own_check_and_runs_other_batches(cell):
    # the check runs the module again without gradients: it must record the same graph
    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rec = sg.Recurrence(cell())

        def forward(self, x):
            return self.rec(x)[0]
    module = Outputs()
    traced = torch.jit.trace(module, (torch.randn(2, 1, 3),))
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(traced(x), module(x))


class _FinalAndOutputs(torch.nn.Module):
    """A traceable wrapper: a Recurrence's outputs and final h for given lengths."""

    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def forward(self, x, lengths):
        out, final = self.rec(x, lengths=lengths)
        return out, final["h"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize("example", [[5, 5, 5], [5, 2, 3], [0, 0, 0]], ids=["unpadded", "padded", "empty"])
def test_torch_jit_trace_of_the_reference_keeps_lengths_free(example):
    # (a trace once fixed which steps the example padded: other lengths gave wrong outputs)
    module = _FinalAndOutputs(sg.Recurrence(sg.cells.gru(4, 6)))
    x = torch.randn(5, 3, 4)
    traced = torch.jit.trace(module, (x, torch.tensor(example)), check_trace=False)
    for lengths in ([5, 5, 5], [5, 2, 3], [3, 5, 1], [0, 4, 5], [0, 0, 0]):
        for got, want in zip(traced(x, torch.tensor(lengths)), module(x, torch.tensor(lengths))):
            torch.testing.assert_close(got, want)


def test_torch_export_of_the_reference_with_lengths_keeps_them_free():
    # (it failed inside torch: "Could not guard on data-dependent expression")
    module = _FinalAndOutputs(sg.Recurrence(sg.cells.gru(4, 6)))
    x = torch.randn(5, 3, 4, requires_grad=True)
    exported = torch.export.export(module, (x, torch.tensor([5, 2, 3]))).module()
    for lengths in ([5, 2, 3], [1, 5, 0], [0, 0, 0]):
        got, want = exported(x, torch.tensor(lengths)), module(x, torch.tensor(lengths))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        ga = torch.autograd.grad(got[0].sum() + got[1].sum(), x)[0]
        gb = torch.autograd.grad(want[0].sum() + want[1].sum(), x)[0]
        torch.testing.assert_close(ga, gb)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch.jit.script's own)
@pytest.mark.parametrize("make", [
    lambda: sg.Recurrence(sg.cells.gru(3, 4)), lambda: sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="cpu"),
    lambda: sg.nn.LSTM(3, 4), lambda: sg.nn.GRUCell(3, 4), lambda: sg.Stack([sg.Recurrence(sg.cells.gru(3, 4))]),
    lambda: sg.Bidirectional(sg.Recurrence(sg.cells.gru(3, 4))),
    lambda: torch.nn.Sequential(torch.nn.Linear(3, 3), sg.Repeater(sg.Recurrence(sg.cells.gru(3, 4)), 2))],
    ids=["Recurrence", "compiled", "sg.nn.LSTM", "sg.nn.GRUCell", "Stack", "Bidirectional", "inside a model"])
def test_torch_jit_script_is_refused_with_the_ways_out(make):
    with pytest.raises(NotImplementedError, match=r"torch.jit.script cannot compile \w+: .*torch.export"):
        torch.jit.script(make())


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch", "triton"])
def test_under_cpu_autocast_a_compiled_module_computes_what_the_reference_does(backend):
    rec = sg.Recurrence(sg.cells.gru(3, 4))
    comp = sg.compile(rec, backend=backend)
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = comp(x)[0], rec(x)[0]
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-2, rtol=2e-2)  # bfloat16 products, grouped differently


def _bias_free_products_cell():
    """A state that is a product without a bias, and an output that is a per-example matrix
    times a vector: under CPU autocast torch gives both in bfloat16."""
    x, h, C = sg.Input(3, name="x"), sg.State(4, name="h"), sg.State((3, 3), name="C")
    k, v, q = (sg.Linear(3, 3, name=n)(x) for n in "kvq")
    C2 = C * 0.9 + sg.matmul(sg.unsqueeze(v, -1), sg.unsqueeze(k, 0))
    h2 = sg.Linear(7, 4, bias=False, name="rec")(sg.concat([x, h]))
    out = sg.squeeze(sg.matmul(C2, sg.unsqueeze(q, -1)), -1)
    return sg.Cell(inputs=[x], states={h: h2, C: C2}, outputs=[out, h2])


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton", "auto"])
@pytest.mark.parametrize("masked", [False, True])
def test_under_cpu_autocast_outputs_and_final_states_are_in_the_recurrences_dtype(backend, masked):
    torch.manual_seed(0)
    rec = sg.Recurrence(_bias_free_products_cell())
    module = rec if backend == "reference" else sg.compile(rec, backend=backend)
    x = torch.randn(5, 2, 3)
    lengths = torch.tensor([5, 3]) if masked else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, h), final = module(x, lengths=lengths)
        (want, want_h), _ = rec(x, lengths=lengths)
    assert out.dtype == h.dtype == final["h"].dtype == final["C"].dtype == torch.float32
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)  # bfloat16 products
    torch.testing.assert_close(h, want_h, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("inside", [False, True], ids=["backward_after_autocast", "backward_inside_autocast"])
def test_under_cpu_autocast_a_compiled_module_has_the_reference_gradients(backend, masked, inside):
    torch.manual_seed(0)
    rec = sg.Recurrence(sg.cells.lstm(3, 4))
    comp = sg.compile(rec, backend=backend)
    x = torch.randn(5, 2, 3, requires_grad=True)
    lengths = torch.tensor([5, 3]) if masked else None
    grads = []
    for module in (comp, rec):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, fin = module(x, lengths=lengths)
            loss = out.float().sum() + fin["c"].float().sum()
            if inside:
                grads.append(torch.autograd.grad(loss, [x, *rec.parameters()]))
        if not inside:
            grads.append(torch.autograd.grad(loss, [x, *rec.parameters()]))
    for got, want in zip(*grads):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)  # bfloat16 products


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "auto"])
def test_a_compiled_module_on_the_meta_device_runs_forward_and_backward_for_shapes(backend):
    comp = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend=backend).to("meta")
    assert comp.backend_for() == "torch"
    x = torch.randn(5, 2, 3, device="meta", requires_grad=True)
    out, _ = comp(x)
    out.sum().backward()
    assert out.shape == (5, 2, 4) and x.grad.shape == x.shape and x.grad.device.type == "meta"


def _head_the_state_never_reads():
    x, h = sg.Input(4, name="x"), sg.State(6, name="h")
    h2 = sg.tanh(sg.Linear(10, 6, name="rec")(sg.concat([x, h])))
    return sg.Cell(inputs=[x], states={h: h2}, outputs=[sg.Linear(6, 2, name="head")(h2)])


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_a_parameter_the_loss_never_reaches_gets_no_gradient_as_in_the_reference(backend):
    # a zero would not do: AdamW's weight decay moves a parameter with a zero gradient
    torch.manual_seed(0)
    rec = sg.Recurrence(_head_the_state_never_reads())
    comp = sg.compile(rec, backend=backend)
    x = torch.randn(5, 3, 4)
    grads = []
    for module in (rec, comp):
        module.zero_grad(set_to_none=True)
        module(x)[1]["h"].sum().backward()
        grads.append({k: v.grad for k, v in rec.named_parameters()})
    want, got = grads
    assert want["params.head.weight"] is None and got["params.head.weight"] is None
    assert got["params.head.bias"] is None
    torch.testing.assert_close(got["params.rec.weight"], want["params.rec.weight"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_an_initial_state_the_loss_never_reaches_gets_no_gradient(backend):
    x, a, b = sg.Input(3, name="x"), sg.State(4, name="a"), sg.State(4, name="b")
    a2 = sg.tanh(sg.Linear(7, 4, name="fa")(sg.concat([x, a])))
    b2 = sg.tanh(sg.Linear(8, 4, name="fb")(sg.concat([a, b])))  # b reads a; a never reads b
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={a: a2, b: b2}))
    comp = sg.compile(rec, backend=backend)
    a0, b0 = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    _, fin = comp(torch.randn(5, 2, 3), {"a": a0, "b": b0})
    fin["a"].sum().backward()
    assert b0.grad is None and comp.params.fb.weight.grad is None
    assert a0.grad is not None and comp.params.fa.weight.grad.abs().sum() > 0


def test_backend_for_says_which_backend_a_call_runs():
    comp = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="auto")
    assert comp.backend_for() == "cpu" and comp.backend_for(torch.float64) == "cpu"
    assert comp.backend_for(torch.float16) == "torch" and comp.backend_for(device="meta") == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert comp.backend_for() == "torch"
        assert sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="triton").backend_for() == "torch"
    assert sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="torch").backend_for() == "torch"


def test_a_twin_pickled_with_a_memory_of_its_own_hands_it_to_its_source():
    # before the twins shared one remembered state, the twin pickled its own
    rec = sg.Recurrence(sg.cells.gru(3, 4), remember=True)
    fast = sg.compile(rec, backend="cpu")
    fast(torch.randn(2, 1, 3))
    state = fast.__getstate__()
    memory = state["_source"]._memory
    state["_source"]._memory, state["_memory"] = None, memory
    loaded = sg.CompiledRecurrence.__new__(sg.CompiledRecurrence)
    loaded.__setstate__(state)
    assert loaded._memory is memory and loaded._source._memory is memory


def test_an_auto_model_saved_whole_loads_where_no_c_compiler_is(tmp_path):
    import os
    import subprocess
    import sys
    torch.save(sg.nn.LSTM(3, 5), tmp_path / "lstm.pt")  # backend="auto": the C kernels here
    code = ("import sys, torch, seqgraph as sg\n"
            "m = torch.load(sys.argv[1], weights_only=False)\n"
            "m(torch.randn(2, 1, 3))\n"
            "print(m.recurrence(0).backend_for())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CC="/nonexistent/cc", SEQGRAPH_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lstm.pt")], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "torch"


def test_a_cpu_model_loads_where_no_c_compiler_is_and_its_call_says_why(tmp_path, monkeypatch):
    from seqgraph.kernels.c_launch import CompilerMissing
    comp = sg.compile(sg.Recurrence(sg.cells.lstm(3, 5)), backend="cpu")
    x = torch.randn(4, 2, 3)
    want = comp(x)[0]
    torch.save(comp, tmp_path / "m.pt")
    sg.compiled.clear_cache()  # (else the program built above is taken from memory)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)  # the weights stay readable
    assert torch.equal(loaded.params.ih.weight, comp.params.ih.weight) and loaded.backend == "cpu"
    with pytest.raises(CompilerMissing, match=r"saved with backend='cpu'.*sg.compile\(module, backend='torch'\)"):
        loaded(x)
    torch.save(loaded, tmp_path / "again.pt")  # saved again, still the cpu backend's
    torch.testing.assert_close(sg.compile(loaded, backend="torch")(x)[0], want)
    monkeypatch.delenv("CC")  # a compiler found later: the call builds the program then
    torch.testing.assert_close(loaded(x)[0], want, rtol=0, atol=0)
    assert torch.load(tmp_path / "again.pt", weights_only=False).backend_for() == "cpu"


def test_backend_for_a_dtype_named_by_a_string_asks_for_a_torch_dtype():
    comp = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="auto")
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype \(torch.float32, say\), got 'float32'"):
        comp.backend_for("float32")


def test_eval_on_the_original_switches_its_compiled_twin_and_back():
    rec = sg.Recurrence(sg.cells.lstm(3, 4, dropout=0.5))
    comp = sg.compile(rec, backend="cpu")
    rec.eval()
    assert not comp.training
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(comp(x)[0], comp(x)[0])  # no dropout noise in evaluation
    comp.train()
    assert rec.training


def test_compiling_a_container_with_backend_reference_takes_back_the_originals():
    model = sg.Stack([sg.Recurrence(sg.cells.gru(3, 4)), sg.Recurrence(sg.cells.gru(4, 4))])
    originals = list(model.layers)
    sg.compile(model, backend="cpu")
    assert all(isinstance(m, sg.CompiledRecurrence) for m in model.layers)
    sg.compile(model, backend="reference")
    assert list(model.layers) == originals


def test_a_recurrence_held_in_two_places_becomes_one_compiled_twin_remembering_one_state():
    shared = sg.Recurrence(sg.cells.gru(3, 4), remember=True)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared)})
    sg.compile(model, backend="cpu")
    assert isinstance(model["a"], sg.CompiledRecurrence) and model["b"][0] is model["a"]
    _, fin = model["a"](torch.randn(2, 1, 3))
    torch.testing.assert_close(model["b"][0]._memory["h"], fin["h"])


def test_a_recurrence_under_two_names_of_one_parent_becomes_one_twin_under_both():
    shared = sg.Recurrence(sg.cells.gru(3, 4))
    model = torch.nn.Module()
    model.enc, model.dec = shared, shared
    pair = torch.nn.ModuleList([shared, shared])
    sg.compile(model, backend="cpu")
    sg.compile(pair, backend="cpu")
    assert isinstance(model.enc, sg.CompiledRecurrence) and model.dec is model.enc
    assert isinstance(pair[0], sg.CompiledRecurrence) and pair[1] is pair[0]


def test_a_recurrence_and_its_compiled_twin_in_one_container_become_one_twin():
    rec = sg.Recurrence(sg.cells.gru(3, 4), remember=True)
    model = torch.nn.ModuleList([rec, sg.compile(rec, backend="torch")])
    sg.compile(model, backend="cpu")
    assert isinstance(model[0], sg.CompiledRecurrence) and model[1] is model[0]


def test_a_recurrence_and_its_compiled_twin_carry_one_remembered_state():
    rec = sg.Recurrence(sg.cells.gru(3, 4), remember=True)
    fast = sg.compile(rec, backend="cpu")
    x = torch.randn(2, 1, 3)
    first, _ = fast(x)
    second, _ = rec(x)  # continues where the twin stopped
    fresh = sg.Recurrence(sg.cells.gru(3, 4))
    fresh.load_state_dict(rec.state_dict())
    torch.testing.assert_close(second, fresh(x, fresh(x)[1])[0])
    rec.forget()  # and forgetting either forgets both
    torch.testing.assert_close(fast(x)[0], first)


def _grads_of_inputs(module, X, H):
    out, _ = module(X, {"h": H})
    return torch.autograd.grad(out.sum(), [X, H])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("op", [sg.maximum, sg.minimum])
def test_the_losing_operand_of_maximum_gets_zero_even_from_an_infinite_gradient(backend, op):
    x, h = sg.Input(2, name="x"), sg.State(2, name="h")
    rec = sg.Recurrence(sg.Cell([x], {h: h * 0.5 + sg.tanh(x)}, outputs=[op(x, h) * float("inf")])).double()
    X = torch.tensor([[[1.0, -2.0]], [[0.5, 3.0]]], dtype=torch.float64, requires_grad=True)
    H = torch.tensor([[0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    want = _grads_of_inputs(rec, X, H)
    got = _grads_of_inputs(sg.compile(rec, backend=backend), X, H)
    assert not any(torch.isnan(w).any() for w in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=False)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_nan_operand_of_maximum_passes_the_whole_gradient_to_both_as_torch_does(backend):
    x, h = sg.Input(2, name="x"), sg.State(2, name="h")
    rec = sg.Recurrence(sg.Cell([x], {h: sg.tanh(x) + h * 0.5}, outputs=[sg.maximum(sg.sqrt(x), h)])).double()
    X = torch.tensor([[[-1.0, 4.0]]], dtype=torch.float64, requires_grad=True)  # sqrt(-1) is nan
    H = torch.tensor([[0.3, 0.3]], dtype=torch.float64, requires_grad=True)
    want, got = _grads_of_inputs(rec, X, H), _grads_of_inputs(sg.compile(rec, backend=backend), X, H)
    torch.testing.assert_close(got[1], want[1])
    assert want[1][0, 0] == 1.0


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_recurrence_loaded_in_a_fresh_process_compiles_to_its_own_results(backend, monkeypatch):
    import itertools
    import pickle

    from seqgraph.compiler import ir
    monkeypatch.setattr(ir, "_ids", itertools.count(10**6))
    rec = sg.Recurrence(sg.cells.gru(3, 4))
    blob = pickle.dumps(rec)
    monkeypatch.setattr(ir, "_ids", itertools.count(10**6))  # a new process counts node ids from the start
    built = [sg.cells.lstm(3, 4), sg.cells.rnn(3, 4)]  # built there first: they take the ids the file's nodes had
    sg.compiled.clear_cache()
    loaded = pickle.loads(blob)
    ids = [n.id for n in loaded.cell.order]
    assert len(set(ids)) == len(ids) and min(ids) > max(n.id for c in built for n in c.order)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(sg.compile(loaded, backend=backend)(x)[0], loaded(x)[0])


def test_threads_compiling_one_cell_at_once_share_one_compile():
    import threading
    clear_cache()
    before = STATS["compiles"]
    errors, outs = [], []
    start = threading.Barrier(4)

    def first_use():
        try:
            start.wait(10)
            comp = sg.compile(sg.Recurrence(sg.cells.gru(5, 7)), backend="cpu")
            out, _ = comp(torch.ones(3, 2, 5))
            out.sum().backward()
            outs.append(out.shape)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outs) == 4
    assert STATS["compiles"] - before == 2  # one C program and one torch program, not one per thread


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_everything_backward_keeps_passes_through_saved_tensor_hooks(backend):
    # so that checkpoint(use_reentrant=False) and save_on_cpu can free or move it
    T, B, H = 20, 3, 8
    comp = sg.compile(sg.Recurrence(sg.cells.lstm(4, H)), backend=backend)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or len(packed) - 1,
                                                  lambda k: packed[k]):
        out, _ = comp(torch.randn(T, B, 4, requires_grad=True))
    per_step_values = 5 * T * B * H + 2 * (T + 1) * B * H  # i, f, g, o, tanh(c) and the h, c sequences
    assert sum(t.numel() for t in packed) >= per_step_values
    out.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_compiled_module_gives_the_gradients_of_the_plain_one(backend, reentrant):
    from torch.utils.checkpoint import checkpoint
    comp = sg.compile(sg.Recurrence(sg.cells.lstm(4, 8)), backend=backend)
    x = torch.randn(20, 3, 4, requires_grad=True)
    lengths = torch.tensor([20, 7, 1])
    out = checkpoint(lambda v: comp(v, lengths=lengths)[0], x, use_reentrant=reentrant)
    out.sum().backward()
    want = torch.autograd.grad(comp(x, lengths=lengths)[0].sum(), x)[0]
    torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_forward_mode_ad_through_a_compiled_module_gives_the_references_tangents(backend):
    import torch.autograd.forward_ad as fwad
    rec = sg.Recurrence(sg.cells.gru(4, 6)).double()
    comp = sg.compile(rec, backend=backend)
    x, t = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 0])
    tangents = []
    for module in (rec, comp):
        with fwad.dual_level():
            out, _ = module(fwad.make_dual(x, t), lengths=lengths)
            tangents.append(fwad.unpack_dual(out).tangent)
    torch.testing.assert_close(tangents[1], tangents[0])


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_torch_func_grad_over_functional_call_gives_the_autograd_gradients(backend):
    from torch.func import functional_call, grad
    rec = sg.Recurrence(sg.cells.lstm(4, 8)).double()
    module = sg.compile(rec, backend=backend)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in rec.named_parameters()}

    def loss(p):
        out, _ = functional_call(module, p, (x,), {"lengths": torch.tensor([7, 2, 5])})
        return (out ** 2).sum()

    got = grad(loss)(params)
    out, _ = rec(x, lengths=torch.tensor([7, 2, 5]))
    want = torch.autograd.grad((out ** 2).sum(), list(rec.parameters()))
    for (name, _), w in zip(rec.named_parameters(), want):
        torch.testing.assert_close(got[name], w)


def test_a_container_reached_twice_and_its_recurrence_held_directly_share_one_twin():
    rec = sg.Recurrence(sg.cells.rnn(3, 4), remember=True)
    block = torch.nn.ModuleList([rec])
    model = torch.nn.Module()
    model.direct, model.a, model.b = rec, block, block
    sg.compile(model, backend="torch")
    assert isinstance(model.direct, sg.CompiledRecurrence) and model.direct is model.a[0] is model.b[0]


def test_auto_runs_the_torch_code_with_a_warning_when_the_c_compiler_cannot_build(monkeypatch, tmp_path):
    import seqgraph.compiled as compiled
    monkeypatch.setenv("CC", "false")  # present, but builds nothing (as gcc without libc headers)
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiled, "_C_BROKEN", None)
    clear_cache()
    rec = sg.Recurrence(sg.cells.lstm(5, 7))
    with pytest.warns(RuntimeWarning, match="the C compiler could not build the cpu backend's kernels"):
        comp = sg.compile(rec, backend="auto")
    assert comp.backend_for() == "torch"
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(comp(x)[0], rec(x)[0])
    assert "backend='auto' runs the torch code because the C compiler could not build the kernels" in str(comp.plan())
    with pytest.raises(RuntimeError, match="the C compiler failed on generated kernels"):
        sg.compile(sg.Recurrence(sg.cells.lstm(5, 7)), backend="cpu")
    clear_cache()


def test_auto_runs_the_torch_code_with_a_warning_when_the_c_compiler_cannot_build_the_masked_loops(monkeypatch, tmp_path):
    import seqgraph.compiled as compiled
    from seqgraph.kernels.c_launch import clear_memory_cache, find_compiler
    wrapper = tmp_path / "cc-without-masks"  # builds every C file but the masked loops'
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ -f "$a" ] && grep -q sg_loop_fwd_masked "$a" && exit 1; done\n'
                       f'exec {find_compiler()} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compiled, "_C_BROKEN", None)
    clear_cache()
    clear_memory_cache()
    rec = sg.Recurrence(sg.cells.lstm(5, 7))
    comp = sg.compile(rec, backend="auto")
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(comp(x)[0], rec(x)[0])
    assert comp.backend_for() == "cpu"
    lengths = torch.tensor([4, 2])
    with pytest.warns(RuntimeWarning, match="the C compiler could not build the cpu backend's kernels"):
        out, _ = comp(x, lengths=lengths)
    torch.testing.assert_close(out, rec(x, lengths=lengths)[0])
    assert comp.backend_for() == "torch"
    clear_cache()


def _loops_line(comp) -> str:
    return next(ln for ln in str(comp.plan()).splitlines() if ln.startswith("time loops:"))


def test_the_plan_says_why_auto_runs_the_torch_code_without_a_c_compiler(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match=r"backend='auto' runs the torch code on the CPU: \$CC is '/nonexistent/cc', "
                                            r"which was not found"):
        comp = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="auto")
    assert comp.backend_for() == "torch"
    assert "Python, torch code per step" in _loops_line(comp) and "no C compiler was found: $CC is" in _loops_line(comp)


def test_without_cc_and_without_a_compiler_on_path_the_message_says_to_install_one(monkeypatch):
    from seqgraph.kernels.c_launch import why_no_compiler
    monkeypatch.delenv("CC", raising=False)
    assert why_no_compiler() == "none of cc, gcc, clang is on PATH (install one, or set $CC)"


def test_a_failed_build_under_seqgraph_cflags_names_those_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQGRAPH_CFLAGS", "-Ofast-bogus")
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    clear_cache()
    try:
        with pytest.raises(RuntimeError, match=r"\$SEQGRAPH_CFLAGS is '-Ofast-bogus': check those flags first"):
            sg.compile(sg.Recurrence(sg.cells.gru(3, 5)), backend="cpu")
    finally:
        clear_cache()


def test_the_plan_is_the_one_a_call_with_the_parameters_dtype_runs():
    comp = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="auto")
    assert _loops_line(comp).startswith("time loops: C, one function per loop variant")
    comp.half()
    assert "the C kernels compute float32 and float64, not float16" in _loops_line(comp)
    assert "sg_loop" not in comp.source()
    assert _loops_line(sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="torch")) == \
        "time loops: Python, torch code per step (the torch backend)"


def _named_cell(prefix: str) -> sg.Cell:
    x, h = sg.Input(4, name=f"{prefix}_x"), sg.State(6, name="h")
    h_next = sg.Tanh()(sg.Linear(10, 6, name=f"{prefix}_linear")(sg.Concat()([x, h])))
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next], name=prefix)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_second_model_of_one_structure_shows_its_own_names_in_source_and_plan(backend):
    first, second = sg.compile(_named_cell("first"), backend=backend), sg.compile(_named_cell("second"), backend=backend)
    assert second._program is first._program  # one program serves both
    shown = second.source() + second.plan().describe(T=3, B=2)
    assert "second_linear" in shown and "first_linear" not in shown
    assert "first_linear" in first.source() and "second_linear" not in first.source()
    assert _loops_line(second) == _loops_line(first)


def test_a_deep_copied_model_shows_the_same_source_up_to_its_nodes_numbers():
    comp = sg.compile(_named_cell("kept"), backend="torch")
    copied = copy.deepcopy(comp)

    def numbered_alike(text):
        return re.sub(r"\b(_rule|[vp])\d+|%\d+", "N", text)
    assert copied.cell is not comp.cell and numbered_alike(copied.source()) == numbered_alike(comp.source())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_mask_buffer_refilled_before_backward_leaves_the_gradients_of_each_call_alone(backend):
    torch.manual_seed(0)
    rec = sg.Recurrence(sg.cells.gru(3, 4)).double()
    xs = [torch.randn(5, 3, 3, dtype=torch.float64) for _ in range(2)]
    masks = [torch.rand(5, 3) < p for p in (0.4, 0.8)]

    def grads(module, reuse):
        buf, loss = torch.empty(5, 3, dtype=torch.bool), 0
        for x, m in zip(xs, masks):
            loss = loss + module(x, mask=buf.copy_(m) if reuse else m)[0].pow(2).sum()
        return torch.autograd.grad(loss, list(rec.parameters()))

    for got, want in zip(grads(sg.compile(rec, backend=backend), True), grads(rec, False), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_a_token_output_keeps_its_dtype_and_exact_ids_when_compiled(backend, dtype):
    tok, x, h = sg.Input(name="tok", dtype="long"), sg.Input(2, name="x"), sg.State(2, name="h")
    h2 = sg.tanh(x + h)
    rec = sg.Recurrence(sg.Cell([tok, x], {h: h2}, [h2, tok]))
    tokens = torch.tensor([[2**24 + 1, 5], [2**24 + 2, 7], [1, 3]], dtype=dtype)  # not all exact in float32
    for T in (3, 0):
        xs, lengths = (tokens[:T], torch.randn(T, 2, 2)), torch.tensor([T, min(T, 1)])
        (_, want), _ = rec(xs, lengths=lengths)
        (_, got), _ = sg.compile(rec, backend=backend)(xs, lengths=lengths)
        assert got.dtype == want.dtype == dtype and torch.equal(got, want)


def _gradient_paths_cell():
    # y reads only x; h reads a weight; g reads h one step late; c is a context passed along
    x, h, g, c = sg.Input(3, name="x"), sg.State(3, name="h"), sg.State(3, name="g"), sg.Context(3, name="c")
    k = sg.State(3, name="k")
    cell = sg.Cell(inputs=[x], states={h: sg.tanh(sg.Linear(3, 3)(x)), g: h, k: c},
                   outputs=[sg.tanh(x), g], contexts=[c])
    return sg.Recurrence(cell)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_results_that_read_nothing_requiring_grad_do_not_require_grad_as_in_the_reference(backend, x_grad, traced):
    rec = _gradient_paths_cell()
    xs = torch.randn(4, 2, 3, requires_grad=x_grad)
    context = {"c": torch.randn(2, 3)}
    (y_ref, g_ref), f_ref = rec(xs, context=context)
    comp = sg.compile(rec, backend=backend)
    run = torch.compile(lambda v: comp(v, context=context), backend="aot_eager", fullgraph=True) if traced \
        else (lambda v: comp(v, context=context))  # traced: the loop's custom op marks them
    (y, g), f = run(xs)
    assert (y.requires_grad, g.requires_grad) == (y_ref.requires_grad, g_ref.requires_grad) == (x_grad, True)
    assert {k: v.requires_grad for k, v in f.items()} == {k: v.requires_grad for k, v in f_ref.items()} \
        == {"h": True, "g": True, "k": False}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("lengths", [None, [4, 0], [4, 2]], ids=["no mask", "an empty sequence", "all have steps"])
@pytest.mark.parametrize("traced", [False, True])
def test_a_final_state_requires_grad_from_its_initial_value_only_where_it_can_be_that(backend, lengths, traced):
    # k's next value is a context: its final value is the initial one only for an empty sequence
    rec = _gradient_paths_cell()
    xs, context = torch.randn(4, 2, 3), {"c": torch.randn(2, 3)}
    state = {"k": torch.randn(2, 3, requires_grad=True)}
    kw = {} if lengths is None else {"lengths": torch.tensor(lengths)}
    _, f_ref = rec(xs, state, context=context, **kw)
    comp = sg.compile(rec, backend=backend)
    run = torch.compile(lambda v: comp(v, state, context=context, **kw), backend="aot_eager", fullgraph=True) \
        if traced else (lambda v: comp(v, state, context=context, **kw))
    _, f = run(xs)
    assert f_ref["k"].requires_grad == (lengths == [4, 0])
    if traced and lengths is not None:  # a traced call cannot look at the mask: the safe side
        assert f["k"].requires_grad
    else:
        assert f["k"].requires_grad == f_ref["k"].requires_grad
    if f["k"].requires_grad:  # the empty sequence's final k is its initial one; the other's is not
        f["k"].sum().backward()
        assert state["k"].grad[0].abs().sum() == 0
        assert torch.equal(state["k"].grad[1], torch.ones(3) if lengths == [4, 0] else torch.zeros(3))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_child_forked_while_another_thread_compiles_can_compile():
    from seqgraph import compiled
    from seqgraph.kernels import c_launch

    @contextlib.contextmanager
    def compiling():  # stands for a compile in progress: both locks held while the main thread forks
        with compiled._COMPILING, c_launch._LOADING:
            yield
    with entered_in_another_thread(compiling):
        pid = os.fork()
        if pid == 0:  # the child: no thread will ever release the parent's locks here
            ok = compiled._COMPILING.acquire(timeout=5) and c_launch._LOADING.acquire(timeout=5)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_remember_set_on_either_twin_is_the_others_too():
    rec = sg.Recurrence(sg.cells.gru(2, 3))
    twin = sg.compile(rec, backend="torch")
    twin.remember = True
    assert rec.remember and sg.compile(rec, backend="cpu").remember
    rec.remember = False
    assert not twin.remember


# ---------------------------------------------------------------------------------------
# a state holding the previous step's input (hoist_previous_inputs): compiled.previous_inputs
# ---------------------------------------------------------------------------------------
def test_previous_inputs_without_a_mask_is_the_input_shifted_by_one_step():
    from seqgraph.compiled import previous_inputs
    x, first = torch.randn(4, 2, 3), torch.randn(2, 3)
    got = previous_inputs(x, first, None)
    assert torch.equal(got[0], first) and torch.equal(got[1:], x[:-1])
    assert previous_inputs(x[:0], first, None).shape == (0, 2, 3)


def test_previous_inputs_with_a_mask_holds_each_rows_last_real_input():
    from seqgraph.compiled import previous_inputs
    x, first = torch.arange(10.0).view(5, 2, 1), torch.tensor([[-1.0], [-2.0]])
    valid = torch.tensor([[1, 0], [0, 0], [1, 1], [1, 0], [0, 1]], dtype=torch.bool)
    got = previous_inputs(x, first, valid)[:, :, 0]
    # row 0 is real at steps 0, 2, 3 (inputs 0, 4, 6); row 1 at steps 2, 4 (inputs 5, 9); padded steps get 0
    assert got.tolist() == [[-1, 0], [0, 0], [0, -2], [4, 0], [0, 5]]


def test_previous_inputs_passes_gradcheck():
    from seqgraph.compiled import previous_inputs
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    first = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a, b: previous_inputs(a, b, valid), (x, first))


def _window_two(backend, window=2):
    torch.manual_seed(0)
    rec = sg.Recurrence(sg.cells.qrnn(3, 4, window=window)).double()
    return rec, sg.compile(rec, backend=backend)


@pytest.mark.parametrize("window", [2, 3])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_window_of_two_or_three_equals_the_reference_with_an_irregular_mask(backend, window):
    rec, comp = _window_two(backend, window)
    xs = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    s0 = {p.name: torch.randn((4,) + p.shape, dtype=torch.float64, requires_grad=True) for p, _ in rec.cell.states}
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    results = []
    for m in (comp, rec):
        out, fin = m(xs, s0, mask=mask)
        loss = (out * torch.linspace(0.1, 1, 4, dtype=torch.float64)).sum() + sum((v ** 2).sum() for v in fin.values())
        results.append([out, *fin.values()] + list(torch.autograd.grad(loss, [xs, *s0.values(), *rec.parameters()])))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    out, fin = comp(xs, s0, mask=mask)
    for name in s0:  # a row without a real step keeps its initial values
        assert torch.equal(fin[name][3], s0[name][3])


@pytest.mark.parametrize("where", ["initial value of a row without a real step", "last real input"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_an_infinite_value_only_padded_steps_would_read_reaches_no_gradient(backend, where):
    rec, comp = _window_two(backend)
    x, x0 = torch.randn(6, 4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    if where == "last real input":
        lengths = torch.tensor([6, 6, 5, 6])
        x[4, 2, 0] = float("inf")  # row 2's last real input: no real step reads it as x_prev1
    else:
        lengths = torch.tensor([6, 6, 0, 6])
        x0[2, 1] = float("nan")  # row 2 runs no step
    names = [k for k, _ in rec.named_parameters()]
    got, want = [dict(zip(names, torch.autograd.grad(m(x, {"x_prev1": x0}, lengths=lengths)[0].sum(),
                                                     list(rec.parameters())))) for m in (comp, rec)]
    assert torch.isfinite(want["params.w_prev1.weight"]).all()
    for k in names:  # (an infinite real input makes the reference's w.weight gradient NaN too: alike)
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10, equal_nan=True)


def test_a_window_of_two_carries_the_last_input_into_the_next_call():
    rec, whole = _window_two("cpu")
    comp = sg.compile(sg.Recurrence(rec.cell, remember=True).double(), backend="cpu")
    comp.load_state_dict(rec.state_dict())
    xs = torch.randn(6, 2, 3, dtype=torch.float64)
    got = torch.cat([comp(xs[:2])[0], comp(xs[2:])[0]])
    torch.testing.assert_close(got, whole(xs)[0], rtol=1e-12, atol=1e-12)
    comp.forget()
    assert not torch.allclose(comp(xs[2:])[0], got[2:])  # (from zeros, x_prev1 included, it differs)


def test_a_window_of_two_runs_whole_inside_torch_compile():
    rec, comp = _window_two("cpu")
    xs = torch.randn(5, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    out = torch.compile(lambda v: comp(v, lengths=lengths)[0], backend="aot_eager", fullgraph=True)(xs)
    torch.testing.assert_close(out, rec(xs, lengths=lengths)[0], rtol=1e-10, atol=1e-10)
