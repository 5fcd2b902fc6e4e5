"""The C kernels of the cpu backend: structure of the source, what is fused, numbers against the
reference interpreter (float32 to 1e-5, float64 to 1e-12), the transcendental functions over
their whole range, layouts, masking, argument errors, the library cache and debug output."""
import ctypes
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqgraph as sg
from seqgraph.compiler import ops
from seqgraph.compiler.ops import make
from seqgraph.kernels import c_launch
from seqgraph.kernels.c_codegen import c_region_supported, generate_c
from seqgraph.kernels.c_launch import CLibrary, CompilerMissing, clear_memory_cache
from seqgraph.kernels.codegen import region_from_outputs
from seqgraph.kernels.launch import CacheNotWritable

from regions import (CELL_REGIONS, MATRIX_ROW_OPS, RANDOM_STEPS, any_matrix_size, attention_region, forward_nodes,
                     lstm_region, matrix_region,
                     lstm_step, lstm_step_inputs, matrix_row_op, random_elementwise_region, random_inputs,
                     random_region_inputs, reference, strided_lstm_step_inputs, vjp_region)

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def kernel_for(region):
    lib = CLibrary("test")
    return lib.add(region)


def assert_matches_reference(region, batch=5, positive=False, dtype=torch.float32, rtol=None):
    vals = random_inputs(region, batch, positive, dtype=dtype)
    got = kernel_for(region)(vals)
    want = reference(region, vals, dtype=dtype)
    assert len(got) == len(want)
    tol = TOL[dtype]
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == dtype, f"output {k}"
        torch.testing.assert_close(g, w, atol=tol, rtol=rtol or tol * 10, msg=lambda m: f"output {k}: {m}")


# ---------------------------------------------------------------------------------------
# the source
# ---------------------------------------------------------------------------------------
def test_every_computed_value_names_the_node_it_comes_from():
    region = lstm_region()
    source = generate_c(region).source
    for n in region.nodes:
        if n.op in ("add", "mul", "sigmoid", "tanh"):
            assert f"/* %{n.id} {n.op}" in source, n


def test_elementwise_ops_of_one_width_share_one_loop_and_keep_intermediates_in_registers():
    source = generate_c(lstm_region(hidden=6)).source
    assert source.count("for (int64_t j = 0; j < 24; ++j) {") == 1  # the gate pre-activations
    assert source.count("for (int64_t j = 0; j < 6; ++j) {") == 1  # every gate and both states
    assert "real t" in source and "v%d[j] = t" not in source


def test_a_chunk_of_a_computed_value_is_read_in_place():
    source = generate_c(lstm_region(hidden=6)).source
    assert re.search(r"\(v\d+ \+ 12\)\[j\]", source)  # the third gate: 12 columns in, no copy
    assert source.count("ws + ") == 1 + 4  # one array for the pre-activations, plus the four input gathers


def test_a_constant_is_written_as_a_literal_of_the_kernel_type():
    x = sg.Input(3, name="x")
    source = generate_c(region_from_outputs([x * 0.25 + float("inf")], [x])).source
    assert "((real)0.25)" in source and "((real)INFINITY)" in source


def test_constants_only_subexpressions_are_folded_into_one_expression():
    x = sg.Input(3, name="x")
    two = ops.add(ops.const(1.5), ops.const(0.5))
    source = generate_c(region_from_outputs([x * two], [x])).source
    assert "(((real)1.5) + ((real)0.5))" in source and source.count("for (int64_t j") == 1


def test_padded_rows_of_a_region_whose_outputs_are_all_carried_skip_the_computation():
    source = generate_c(lstm_step(carry={0: 4, 1: 3}, zero_masked={2})).source
    assert "if (mask != 0 && mask[b * ms] == 0) {" in source and "continue;" in source



def _concat_region(carry=None):
    """A row computing two values, a concat of them read by a later loop, and the concat as an
    output: the shape of an LSTM's backward (its gate gradients)."""
    x, s = sg.Input(4, name="x"), sg.State(8, name="s")
    cat = sg.concat([sg.sigmoid(x) * 2.0, sg.tanh(x) - x])
    return region_from_outputs([cat, cat * 3.0], [x, s], carry=carry or {}, name="cat")


def test_a_concat_of_values_computed_in_the_row_is_computed_in_place():
    source = generate_c(_concat_region()).source
    assert "(its parts were computed in place)" in source
    assert re.search(r"real\* v(\d+) = o0;", source)  # the output's row is the concat's array
    assert not re.search(r"v\d+\[\d+ \+ j\] =", source)  # no copy into the concat
    assert not re.search(r"o0\[j\] = v\d+\[j\]", source)  # nor out of it


def test_a_concat_output_with_a_carried_row_is_built_in_scratch_and_stored():
    source = generate_c(_concat_region(carry={0: 1})).source
    assert "(its parts were computed in place)" in source and "o0[j] = keep ?" in source


def test_a_concat_computed_in_place_matches_reference():
    assert_matches_reference(_concat_region(), batch=6)


def test_a_concat_computed_in_place_keeps_the_carried_row_of_a_padded_row():
    region = _concat_region(carry={0: 1})
    x, s = torch.randn(5, 4), torch.randn(5, 8)
    mask = torch.tensor([True, False, True, False, True])
    cat, cat3 = kernel_for(region)([x, s], mask=mask)
    want, want3 = reference(region, [x, s])
    torch.testing.assert_close(cat, torch.where(mask[:, None], want, s))
    torch.testing.assert_close(cat3[mask], want3[mask])


# ---------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(CELL_REGIONS))
def test_region_matches_reference(name, dtype):
    build, batch, positive = CELL_REGIONS[name]
    region = build()
    assert c_region_supported(region) == (True, "")
    assert_matches_reference(region, batch=batch, positive=positive, dtype=dtype)


@pytest.mark.parametrize("index", range(17), ids=lambda k: f"node{k}")
def test_vjp_region_of_each_op_matches_reference(index):
    node = forward_nodes()[index]
    region = vjp_region(node)
    ok, why = c_region_supported(region)
    assert ok, why
    assert_matches_reference(region, positive=True, rtol=1e-4)
    assert_matches_reference(region, positive=True, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_per_example_matrix_vector_products_match_reference(dtype):
    region = attention_region()
    assert c_region_supported(region) == (True, "")
    assert_matches_reference(region, batch=4, dtype=dtype)


@pytest.mark.parametrize("op", MATRIX_ROW_OPS)
def test_each_matrix_row_op_and_its_vjp_region_match_reference(op):
    node = matrix_row_op(op)
    forward = region_from_outputs([node], list(node.inputs))
    assert c_region_supported(forward) == (True, "")
    assert_matches_reference(forward, dtype=torch.float64)
    region = vjp_region(node)
    assert c_region_supported(region) == (True, "")
    assert_matches_reference(region, rtol=1e-4)
    assert_matches_reference(region, dtype=torch.float64)


@any_matrix_size
def test_row_ops_on_a_matrix_of_any_size_match_reference(M, N, batch):
    region = matrix_region(M, N)
    assert c_region_supported(region) == (True, "")
    assert_matches_reference(region, batch=batch)
    assert_matches_reference(region, batch=batch, dtype=torch.float64)


def test_spreads_and_sums_of_a_matrix_are_computed_in_its_loop_without_matrix_arrays():
    x, u, v, q = sg.Input(35, name="x"), sg.Input(5, name="u"), sg.Input(7, name="v"), sg.Input(7, name="q")
    mat = sg.tanh(x + make("outer", (u, v))) * make("tile", (q,), times=5)  # a (5, 7) matrix, never stored
    region = region_from_outputs([make("matvec", (mat, q)), make("vecmat", (u, mat)), sg.sum(mat, keepdim=True),
                                  make("sum_groups", (mat * make("repeat_each", (u,), times=7),), times=7)],
                                 [x, u, v, q])
    source = generate_c(region).source
    assert "for (int64_t m = 0; m < 5; ++m) {  /* a (5, 7) matrix, row m */" in source
    arrays = re.findall(r"real\* restrict (v\d+) = ws", source)
    assert len(arrays) == 4  # the four sums' results only: no array of the matrix or of its spreads
    assert_matches_reference(region)
    assert_matches_reference(region, dtype=torch.float64)


def test_a_sum_whose_vector_is_computed_after_its_matrix_loop_is_a_statement_of_its_own():
    x, u = sg.Input(16, name="x"), sg.Input(4, name="u")
    mat = sg.tanh(x) + make("outer", (u, u))
    q = sg.sigmoid(make("sum_groups", (mat,), times=4))  # known only once mat's loop has ended
    region = region_from_outputs([make("matvec", (mat, q))], [x, u])
    source = generate_c(region).source
    assert re.search(r"\n\s*/\* %\d+ matvec", source)  # a statement after the loops
    assert not re.search(r"\+= .*/\* %\d+ matvec", source)  # not added up inside mat's loop
    assert re.search(r"s\d+ \+= t\d+;  /\* %\d+ sum_groups", source)  # (while sum_groups is)
    assert_matches_reference(region, dtype=torch.float64)


@pytest.mark.parametrize("op", ["sum_to", "sum"])
def test_a_sum_of_one_value_spread_over_a_row_counts_every_column(op):
    x = sg.Input(1, name="x")
    spread = make("broadcast_to", (sg.tanh(x),), shape=(3,))  # one value, read at column 0 by all three
    total = make("sum_to", (spread,), shape=(1,), batched=True) if op == "sum_to" else sg.sum(spread, keepdim=True)
    region = region_from_outputs([total * x], [x])
    assert_matches_reference(region, dtype=torch.float64)  # 3 tanh(x) x, not tanh(x) x


def test_a_sum_of_a_slice_of_one_value_spread_over_a_row_counts_every_column():
    x = sg.Input(1, name="x")
    spread = make("broadcast_to", (sg.tanh(x),), shape=(4,))
    piece = sg.narrow(spread, -1, 1, 3)  # still one value, read three times
    region = region_from_outputs([sg.sum(piece, keepdim=True) * x], [x])
    assert_matches_reference(region, dtype=torch.float64)


def test_a_matrix_sum_of_one_value_spread_over_the_matrix_keeps_to_the_row():
    x, v = sg.Input(1, name="x"), sg.Input(3, name="v")
    spread = make("broadcast_to", (sg.tanh(x),), shape=(6,))  # a (2, 3) matrix of one value
    out = sg.tanh(x) * 2.0  # computed in the one-column loop the matrix sum must not widen
    region = region_from_outputs([make("matvec", (spread, v)), out], [x, v])
    assert_matches_reference(region, dtype=torch.float64)


@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 4), N=st.integers(1, 5), start=st.integers(0, 3), reduce=st.sampled_from(
    ["sum", "sum_to", "mean", "softmax", "layer_norm", "matvec", "vecmat"]), with_row=st.booleans())
def test_reductions_of_one_value_spread_over_a_row_match_reference(M, N, start, reduce, with_row):
    """A one-column value spread over a row is read as that column (an alias), a slice of it
    too: every reduction of it must still count each column it spans (the bug class of 8e8fe90)."""
    W = M * N
    x, y, q = sg.Input(1, name="x"), sg.Input(W + start, name="y"), sg.Input(N, name="q")
    one = sg.tanh(x) * 0.5
    spread = make("broadcast_to", (one,), shape=(W + start,))
    if with_row:
        spread = spread + y  # (no longer an alias: the plain case, for contrast)
    piece = sg.narrow(spread, -1, start, W) if start else spread
    if reduce in ("sum", "mean"):
        red = getattr(sg, reduce)(piece, keepdim=True)
    elif reduce == "sum_to":
        red = make("sum_to", (piece,), shape=(1,), batched=True)
    elif reduce == "softmax":
        red = sg.softmax(piece)
    elif reduce == "layer_norm":
        red = make("layer_norm", (piece,), eps=1e-5)
    elif reduce == "matvec":
        red = make("matvec", (piece, q))
    else:
        red = make("vecmat", (sg.narrow(sg.concat([q, q, q, q]), -1, 0, M), piece))
    region = region_from_outputs([red, one * 3.0], [x, y, q])  # (one's own loop has an output too)
    assert c_region_supported(region) == (True, "")
    assert_matches_reference(region, dtype=torch.float64)


def _special_values():
    wide = torch.linspace(-120.0, 100.0, 20001)
    near_zero = torch.linspace(-0.3, 0.3, 6001)
    edges = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1e-30, 88.7, 88.73, -87.4,
                          -103.9, -104.5, 0.2, -0.2, 0.19999, 20.0, -20.0])
    return torch.cat([wide, near_zero, edges])


def _c_unary(op: str, xs: torch.Tensor) -> torch.Tensor:
    """The C kernel of the one-op region sg.<op>(x), run on the values xs (one per row)."""
    x = sg.Input(1, name="x")
    (got,) = kernel_for(region_from_outputs([getattr(sg, op)(x)], [x]))([xs[:, None]])
    return got[:, 0]


def _assert_same_specials(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))


@pytest.mark.parametrize("op", ["exp", "sigmoid", "tanh"])
def test_float32_transcendentals_are_within_3_ulp_over_their_whole_range(op):
    xs = _special_values()
    got = _c_unary(op, xs)
    exact = getattr(torch, op)(xs.double())
    want = exact.float()  # the correctly rounded answer, with float32's overflow and underflow
    _assert_same_specials(got, want)
    fin = torch.isfinite(want)
    ulp = torch.finfo(torch.float32).eps * exact[fin].abs().clamp_min(torch.finfo(torch.float32).tiny)
    err = (got[fin].double() - exact[fin]).abs() / ulp
    assert err.max() <= 3, f"{op}: {err.max():.2f} ulp at x = {xs[fin][err.argmax()]}"


def _special_values_double():
    wide = torch.linspace(-760.0, 720.0, 40001, dtype=torch.float64)
    near_zero = torch.linspace(-0.5, 0.5, 20001, dtype=torch.float64)
    tiny = torch.logspace(-300, 0, 601, dtype=torch.float64)
    edges = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 709.78, 709.79, -708.4, -744.4,
                          -745.2, -746.0, 20.0, -20.0, 19.06, 0.3465, -0.3466, 1e-300], dtype=torch.float64)
    return torch.cat([wide, near_zero, tiny, -tiny, edges])


@pytest.mark.parametrize("op", ["exp", "sigmoid", "tanh"])
def test_float64_transcendentals_are_within_3_ulp_of_torchs_over_their_whole_range(op):
    xs = _special_values_double()
    got = _c_unary(op, xs)
    want = getattr(torch, op)(xs)  # libm's, within about an ulp of exact
    if op == "sigmoid":  # (torch's rounds to 0 where the result is denormal: below -709)
        e = torch.exp(-xs.abs())
        want = torch.where(xs < 0, e / (1 + e), 1 / (1 + e))
    _assert_same_specials(got, want)
    fin = torch.isfinite(want) & (want.abs() >= torch.finfo(torch.float64).tiny)  # (denormals: absolute below)
    ulp = torch.finfo(torch.float64).eps * want[fin].abs()
    err = (got[fin] - want[fin]).abs() / ulp
    assert err.max() <= 3, f"{op}: {err.max():.2f} ulp at x = {xs[fin][err.argmax()]}"
    low = torch.isfinite(want) & ~fin
    assert ((got[low] - want[low]).abs() <= 4 * 2.0 ** -1074).all()


@pytest.mark.parametrize("op", ["tanh", "sigmoid", "exp"])
def test_the_sign_of_a_zero_result_is_torchs(op):
    x = sg.Input(1, name="x")
    xs = torch.tensor([[0.0], [-0.0], [-1e-30]])
    (got,) = kernel_for(region_from_outputs([getattr(sg, op)(x)], [x]))([xs])
    assert torch.equal(torch.signbit(got), torch.signbit(getattr(torch, op)(xs)))  # tanh(-0.0) is -0.0


def test_nan_goes_through_max_min_relu_and_sign_as_in_torch():
    x, y = sg.Input(4, name="x"), sg.Input(4, name="y")
    region = region_from_outputs([sg.maximum(x, y), sg.minimum(x, y), sg.relu(x), make("sign", (x,))], [x, y])
    nan = float("nan")
    xs = torch.tensor([[nan, 1.0, -2.0, nan]])
    ys = torch.tensor([[0.0, nan, 3.0, nan]])
    got = kernel_for(region)([xs, ys])
    want = [torch.maximum(xs, ys), torch.minimum(xs, ys), torch.relu(xs), torch.sign(xs)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True)


@settings(max_examples=15, deadline=None)
@given(width=st.integers(1, 9), batch=st.integers(1, 6), n_out=st.integers(1, 3),
       steps=st.lists(st.tuples(st.sampled_from(RANDOM_STEPS), st.integers(0, 50), st.integers(0, 50)),
                      min_size=1, max_size=8))
def test_random_elementwise_regions_match_reference(width, batch, n_out, steps):
    region = random_elementwise_region(width, steps, n_out)
    vals = random_region_inputs(batch, width)
    got = kernel_for(region)(vals)
    for g, w in zip(got, reference(region, vals)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------
def test_non_contiguous_batched_inputs_are_read_through_their_strides():
    region = lstm_step()
    vals = strided_lstm_step_inputs(5)
    got = kernel_for(region)(vals)
    for g, w in zip(got, reference(region, vals)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_a_strided_parameter_vector_is_read_through_its_stride():
    x, p = sg.Input(7, name="x"), sg.Parameter(7, name="p")
    vals = [torch.randn(3, 7), torch.randn(14)[::2]]
    (got,) = kernel_for(region_from_outputs([x * p], [x, p]))(vals)
    torch.testing.assert_close(got, vals[0] * vals[1])


def test_outputs_are_fresh_contiguous_tensors_with_the_batch_first():
    x = sg.Input(5, name="x")
    wide, scalar = kernel_for(region_from_outputs([sg.tanh(x), sg.sum(x)], [x]))([torch.randn(4, 5)])
    assert wide.shape == (4, 5) and wide.is_contiguous()
    assert scalar.shape == (4,)


def test_outputs_are_written_into_the_given_buffers():
    x = sg.Input(5, name="x")
    kernel = kernel_for(region_from_outputs([sg.tanh(x), x * 2.0], [x]))
    buf = torch.zeros(3, 4, 5)
    xs = torch.randn(4, 5)
    a, b = kernel([xs], out=[buf[1], None])
    assert a.data_ptr() == buf[1].data_ptr()
    torch.testing.assert_close(buf[1], torch.tanh(xs))
    assert (buf[0] == 0).all() and (buf[2] == 0).all()
    torch.testing.assert_close(b, xs * 2.0)


def test_an_empty_batch_gives_empty_outputs():
    got = kernel_for(lstm_step())(lstm_step_inputs(0))
    assert [tuple(g.shape) for g in got] == [(0, 6)] * 3


def test_a_row_wider_than_the_stack_scratch_is_computed_in_heap_scratch():
    x = sg.Input(70_000, name="x")
    region = region_from_outputs([sg.softmax(sg.tanh(x) * 2.0)], [x])
    assert "malloc" in generate_c(region).source
    vals = [torch.randn(2, 70_000)]
    (got,) = kernel_for(region)(vals)
    torch.testing.assert_close(got, torch.softmax(torch.tanh(vals[0]) * 2.0, 1), atol=1e-8, rtol=1e-5)


def test_a_parameter_wider_than_the_stack_is_gathered_in_heap_scratch():
    # (8.8 MB of float32: a stack array of it crashed the process; found by a review)
    w = 2_200_000
    x, p = sg.Input(w, name="x"), sg.Parameter(w, name="p")
    region = region_from_outputs([x * p], [x, p])
    assert "malloc" in generate_c(region).source
    vals = [torch.randn(2, w), torch.randn(2 * w)[::2]]  # a strided parameter is gathered
    (got,) = kernel_for(region)(vals)
    torch.testing.assert_close(got, vals[0] * vals[1])


# ---------------------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_padded_rows_keep_the_carried_input_or_write_zeros(dtype):
    region = lstm_step(carry={0: 4, 1: 3}, zero_masked={2})
    vals = [v.to(dtype) for v in lstm_step_inputs(5)]
    mask = torch.tensor([True, False, True, False, True])
    h, c, out = kernel_for(region)(vals, mask=mask)
    want_h, want_c, _ = reference(region, vals, dtype=dtype)
    m = mask[:, None]
    tol = TOL[dtype]
    torch.testing.assert_close(h, torch.where(m, want_h, vals[4]), atol=tol, rtol=tol)
    torch.testing.assert_close(c, torch.where(m, want_c, vals[3]), atol=tol, rtol=tol)
    torch.testing.assert_close(out, torch.where(m, want_h, 0.0), atol=tol, rtol=tol)
    assert torch.equal(c[~mask], vals[3][~mask])  # carried values are copied exactly


def test_without_a_mask_every_row_is_computed():
    region = lstm_step(carry={0: 4, 1: 3}, zero_masked={2})
    vals = lstm_step_inputs(4)
    for g, w in zip(kernel_for(region)(vals), reference(region, vals)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_a_carried_output_can_be_an_input_passed_through():
    x, h = sg.Input(3, name="x"), sg.State(3, name="h")
    region = region_from_outputs([h, sg.tanh(x)], [x, h], carry={1: 1})
    vals = [torch.randn(4, 3), torch.randn(4, 3)]
    mask = torch.tensor([True, True, False, True])
    same, y = kernel_for(region)(vals, mask=mask)
    assert torch.equal(same, vals[1])
    torch.testing.assert_close(y, torch.where(mask[:, None], torch.tanh(vals[0]), vals[1]))


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------
def test_constant_inputs_may_be_given_as_none_or_left_out():
    x, k = sg.Input(4, name="x"), ops.const(3.0)
    kernel = kernel_for(region_from_outputs([x * k], [x, k]))
    xs = torch.randn(2, 4)
    torch.testing.assert_close(kernel([xs, None])[0], xs * 3.0)
    torch.testing.assert_close(kernel([xs])[0], xs * 3.0)


def test_a_wrong_number_of_inputs_is_a_value_error():
    with pytest.raises(ValueError, match="takes 5 inputs"):
        kernel_for(lstm_step())(lstm_step_inputs(2)[:3])


def test_an_input_of_the_wrong_width_is_a_value_error():
    vals = lstm_step_inputs(2)
    vals[3] = torch.randn(2, 7)
    with pytest.raises(ValueError, match=r"input 3 \(c\).*7 columns per row, expected 6"):
        kernel_for(lstm_step())(vals)


def test_inputs_with_different_batch_sizes_are_a_value_error():
    vals = lstm_step_inputs(3)
    vals[4] = torch.randn(2, 6)
    with pytest.raises(ValueError, match="expected a batch of 3 rows"):
        kernel_for(lstm_step())(vals)


def test_mixed_dtypes_are_a_type_error():
    vals = lstm_step_inputs(2)
    vals[1] = vals[1].double()
    with pytest.raises(TypeError, match="has dtype torch.float64, the others torch.float32"):
        kernel_for(lstm_step())(vals)


def test_half_precision_is_a_type_error_naming_the_torch_backend():
    with pytest.raises(TypeError, match="float32 or float64.*torch backend"):
        kernel_for(lstm_step())([v.to(torch.bfloat16) for v in lstm_step_inputs(2)])


def test_an_output_buffer_overlapping_an_input_is_a_value_error():
    x = sg.Input(5, name="x")
    kernel = kernel_for(region_from_outputs([sg.tanh(x)], [x]))
    xs = torch.randn(4, 5)
    with pytest.raises(ValueError, match="overlaps one of its inputs"):
        kernel([xs], out=[xs])


def test_an_output_buffer_of_the_wrong_size_is_a_value_error():
    x = sg.Input(5, name="x")
    with pytest.raises(ValueError, match=r"out\[0\].*contiguous torch.float32 CPU tensor of 4x5"):
        kernel_for(region_from_outputs([sg.tanh(x)], [x]))([torch.randn(4, 5)], out=[torch.empty(4, 6)])


def test_a_mask_of_the_wrong_shape_is_a_value_error():
    with pytest.raises(ValueError, match=r"mask .* must be a \(2,\) bool CPU tensor"):
        kernel_for(lstm_step(carry={0: 4}))(lstm_step_inputs(2), mask=torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------
# building and the cache
# ---------------------------------------------------------------------------------------
def test_regions_of_the_same_structure_share_one_function():
    lib = CLibrary("test")
    a, b = lib.add(lstm_step()), lib.add(lstm_step())
    c = lib.add(lstm_step(hidden=7))
    assert a is b and c is not a and len(lib.kernels) == 2


def test_a_library_is_compiled_once_and_loaded_by_a_fresh_process(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        from regions import lstm_step, lstm_step_inputs
        from seqgraph.kernels.c_launch import CLibrary
        lib = CLibrary("t")
        k = lib.add(lstm_step())
        lib.load(torch.float32)
        print(lib.compiled[(torch.float32, "steps")], lib.paths[(torch.float32, "steps")])
        k(lstm_step_inputs(3))
    """)
    here = str(__import__("pathlib").Path(__file__).parent)
    env = {**__import__("os").environ, "SEQGRAPH_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", script, here], capture_output=True, text=True, env=env)
    second = subprocess.run([sys.executable, "-c", script, here], capture_output=True, text=True, env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    wrote1, path1 = first.stdout.split()
    wrote2, path2 = second.stdout.split()
    assert (wrote1, wrote2) == ("True", "False") and path1 == path2
    assert sorted(p.suffix for p in (tmp_path / "cpu").iterdir()) == [".c", ".lock", ".so"]  # (the build's lock stays)


def test_the_library_key_changes_with_structure_dtype_and_flags(monkeypatch):
    def key(region, dtype=torch.float32):
        lib = CLibrary("t")
        lib.add(region)
        return lib.key(dtype)
    base = key(lstm_step())
    assert key(lstm_step()) == base  # new nodes, same structure
    assert key(lstm_step(hidden=7)) != base
    assert key(lstm_step(carry={0: 4})) != base
    assert key(lstm_step(), torch.float64) != base
    monkeypatch.setenv("SEQGRAPH_CFLAGS", "-O1")
    assert key(lstm_step()) != base


def test_the_library_key_covers_every_module_whose_text_the_library_holds(monkeypatch):
    # a module missing here would let an edited generator load a library an older one built
    import re
    from pathlib import Path
    covered = {Path(m.__file__).name for m in c_launch.generator_modules()}
    kernels = Path(c_launch.__file__).parent
    writers = {p.name for p in kernels.glob("*.py") if re.search(r'r"""\s*\n?\s*(/\*|#|static|typedef)', p.read_text())}
    assert "c_loop_prelude.py" in covered and writers <= covered
    before = c_launch._generator_fingerprint()
    prelude = Path(c_launch.generator_modules()[2].__file__)
    monkeypatch.setattr(Path, "read_bytes", lambda self, _orig=Path.read_bytes: _orig(self) + (b"x" if self == prelude else b""))
    assert c_launch._generator_fingerprint() != before


def test_a_missing_compiler_raises_compiler_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    lib = CLibrary("t")
    lib.add(lstm_step())
    with pytest.raises(CompilerMissing, match="C compiler"):
        lib.load(torch.float32)


def test_a_failing_compile_reports_the_compiler_output_and_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SEQGRAPH_CFLAGS", "-O2 --definitely-not-a-flag")
    lib = CLibrary("t")
    lib.add(lstm_step())
    with pytest.raises(RuntimeError, match=r"(?s)C compiler failed.*\.c.*definitely-not-a-flag"):
        lib.load(torch.float32)
    assert not list((tmp_path / "cpu").glob("*.so"))  # nothing half-written is left for a later load


def test_a_cache_folder_that_cannot_be_written_says_which_and_how_to_choose_another(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path / "a_file" / "kernels"))
    clear_memory_cache()  # a library this process built already is not built again
    lib = CLibrary("t")
    lib.add(lstm_step())
    with pytest.raises(CacheNotWritable, match=r"writes its generated kernels to .*a_file/kernels/cpu and cannot: "
                                               r".*Set SEQGRAPH_CACHE_DIR"):
        lib.load(torch.float32)


def test_float64_is_compiled_on_first_use():
    x = sg.Input(3, name="x")
    kernel = kernel_for(region_from_outputs([sg.tanh(x)], [x]))
    kernel.library.load(torch.float32)
    assert torch.float64 not in kernel.fns
    (y,) = kernel([torch.randn(2, 3, dtype=torch.float64)])
    assert y.dtype == torch.float64 and torch.float64 in kernel.fns


def test_debug_level_3_prints_the_generated_c(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SEQGRAPH_DEBUG", "3")
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    kernel = kernel_for(lstm_step())
    kernel.library.load(torch.float32)
    err = capsys.readouterr().err
    assert kernel.source in err and "-O3" in err  # the source, and the compiler command


def test_cflags_default_to_o3_march_native(monkeypatch):
    monkeypatch.delenv("SEQGRAPH_CFLAGS", raising=False)
    assert c_launch.cflags()[:2] == ["-O3", "-march=native"]


def test_a_build_that_fails_at_link_time_says_the_compilers_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SEQGRAPH_CFLAGS", "-O1 -lno_such_library_seqgraph")  # compiles, then cannot link
    clear_memory_cache()
    lib = CLibrary("test")
    lib.add(lstm_step())
    with pytest.raises(RuntimeError, match=r"(?s)the C compiler failed on generated kernels .*cannot find -lno_such_library_seqgraph"):
        lib.load(torch.float32)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_library_that_cannot_be_moved_into_the_cache_is_cache_not_writable(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    lib = CLibrary("test")
    lib.add(lstm_step())

    def no_space(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(c_launch.os, "replace", no_space)
    with pytest.raises(CacheNotWritable, match=r"could not move its new library into .*No space left on device"):
        lib.load(torch.float32)
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------
# a library of several functions compiles in two halves, one per core
# ---------------------------------------------------------------------------------------
def two_kernel_library():
    lib = CLibrary("test")
    return lib, lib.add(lstm_step()), lib.add(lstm_step(hidden=7))


def compiler_runs(monkeypatch):
    """The command lines of every compiler run started from now on (subprocess.run starts
    its process through Popen too)."""
    runs = []
    real_popen = c_launch.subprocess.Popen

    def popen(cmd, *args, **kwargs):
        if "-o" in cmd:  # (not the compiler's --version)
            runs.append(cmd)
        return real_popen(cmd, *args, **kwargs)
    monkeypatch.setattr(c_launch.subprocess, "Popen", popen)
    return runs


def build_two_kernels_on(cores, tmp_path, monkeypatch):
    """A two-kernel library built afresh by a machine of `cores` cores, and the compiler runs."""
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c_launch, "_cores", lambda: cores)
    clear_memory_cache()
    runs = compiler_runs(monkeypatch)
    lib, small, large = two_kernel_library()
    lib.load(torch.float32)
    return runs, small, large


def test_a_library_of_several_functions_compiles_its_halves_at_once_then_links_them(tmp_path, monkeypatch):
    runs, small, large = build_two_kernels_on(2, tmp_path, monkeypatch)
    halves = [next(a for a in cmd if a.startswith("-DSG_HALF=")) for cmd in runs if "-c" in cmd]
    assert sorted(halves) == ["-DSG_HALF=0", "-DSG_HALF=1"] and len(runs) == 3  # two halves and a link
    for kernel, hidden in ((small, 6), (large, 7)):
        vals = lstm_step_inputs(4, hidden)
        for got, want in zip(kernel(vals), reference(kernel.region, vals)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not list(tmp_path.rglob("*.tmp"))


def test_each_half_holds_some_of_the_functions_and_the_loops_stay_together():
    lib, small, large = two_kernel_library()
    first, second = lib._halves(c_launch.STEPS)
    assert {k.gen.func_name for k in first} | {k.gen.func_name for k in second} == {"sg_region_0", "sg_region_1"}
    assert len(first) == len(second) == 1
    calls = "    sg_region_0(0); sg_region_1(0);\n"
    lib.add_loop("sg_loop_test", "int sg_loop_test(void) {\n" + calls + "    x = x + 1;\n" * 1000 + "    return 0;\n}\n")
    first, second = lib._halves(c_launch.LOOPS)
    assert [k.gen.func_name for k in first] == ["sg_region_0", "sg_region_1"] and second == []  # the loops outweigh both
    text = lib.part_source(c_launch.LOOPS)
    assert text.index("#if !defined(SG_HALF) || SG_HALF == 1") < text.index("sg_loop_test")


def test_the_masked_loops_and_the_kernels_only_they_call_are_a_part_of_their_own():
    lib, small, large = two_kernel_library()
    lib.add_loop("sg_loop_fwd", "int sg_loop_fwd(void) { return sg_region_0(0); }\n")
    lib.add_loop("sg_loop_fwd_masked", "int sg_loop_fwd_masked(void) { return sg_region_0(0) + sg_region_1(0); }\n",
                 masked=True)
    assert lib.first_part() == c_launch.LOOPS
    assert [lib.part_of(k) for k in (small, large)] == [c_launch.LOOPS, c_launch.MASKED_LOOPS]
    kernels, loops = lib.part(c_launch.MASKED_LOOPS)
    assert kernels == [small, large] and list(loops) == ["sg_loop_fwd_masked"]  # the shared one is built in both
    assert lib.part(c_launch.STEPS) == ([], {})
    assert "part 'masked loops': compiled by the first call with lengths or a mask" in lib.source()


def test_the_cached_source_compiles_whole_without_sg_half(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    lib, _, _ = two_kernel_library()
    lib.load(torch.float32)
    c_path = lib.paths[(torch.float32, c_launch.STEPS)].with_suffix(".c")
    whole = tmp_path / "whole.so"
    cmd = c_launch.shlex.split(c_launch.find_compiler()) + c_launch._BASE_FLAGS + ["-o", str(whole), str(c_path), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    built = ctypes.CDLL(str(whole))
    assert built.sg_region_0 and built.sg_region_1


def test_a_single_core_compiles_the_library_in_one_run(tmp_path, monkeypatch):
    runs, small, _ = build_two_kernels_on(1, tmp_path, monkeypatch)
    assert len(runs) == 1 and "-c" not in runs[0] and not any(a.startswith("-DSG_HALF") for a in runs[0])
    vals = lstm_step_inputs(3)
    torch.testing.assert_close(small(vals)[0], reference(small.region, vals)[0], atol=1e-5, rtol=1e-4)


def test_a_half_that_fails_to_compile_reports_the_compilers_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c_launch, "_cores", lambda: 2)
    clear_memory_cache()
    lib, _, _ = two_kernel_library()
    lib.kernels[1].source += "this is not C;\n"
    with pytest.raises(RuntimeError, match=r"(?s)the C compiler failed on generated kernels .*-DSG_HALF=\d.*this is not C"):
        lib.load(torch.float32)
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.so"))


def test_halves_that_fail_to_link_say_the_linkers_error_and_leave_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SEQGRAPH_CFLAGS", "-O1 -lno_such_library_seqgraph")  # compiles, then cannot link
    monkeypatch.setattr(c_launch, "_cores", lambda: 2)
    clear_memory_cache()
    lib, _, _ = two_kernel_library()
    with pytest.raises(RuntimeError, match=r"(?s)the C compiler failed on generated kernels .*cannot find -lno_such_library_seqgraph"):
        lib.load(torch.float32)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_library_of_loops_alone_keeps_its_loops_in_its_source():
    lib = CLibrary("test")
    lib.add_loop("sg_loop_test", "int sg_loop_test(void) { return 0; }\n")
    assert lib._halves(c_launch.LOOPS) is None and "int sg_loop_test(void)" in lib.source()


def test_the_halves_do_not_depend_on_the_comments_that_name_the_users_lines():
    lib, small, large = two_kernel_library()
    before = [[k.gen.func_name for k in half] for half in lib._halves(c_launch.STEPS)]
    small.source += "/* " + "a long file name and line " * 200 + " */\n"  # as if built from another file
    assert [[k.gen.func_name for k in half] for half in lib._halves(c_launch.STEPS)] == before


def test_a_failure_that_is_not_about_openmp_is_not_retried_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c_launch, "openmp_flags", lambda: ["-fopenmp"])
    clear_memory_cache()
    runs = []

    def failing(base, *rest):
        runs.append(base)
        return base, subprocess.CompletedProcess(base, 1, "", "error: multiple definition of sg_region_0_rows")
    monkeypatch.setattr(c_launch, "_run_compiler", failing)
    lib, _, _ = two_kernel_library()
    with pytest.raises(RuntimeError, match="multiple definition"):
        lib.load(torch.float32)
    assert len(runs) == 1  # a library without OpenMP is never cached under the OpenMP key for it


def test_a_compiler_without_openmp_builds_the_library_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(c_launch, "openmp_flags", lambda: ["-fopenmp"])
    clear_memory_cache()
    real, runs = c_launch._run_compiler, []

    def no_openmp(base, *rest):
        runs.append("-fopenmp" in base)
        if "-fopenmp" in base:
            return base, subprocess.CompletedProcess(base, 1, "", "clang: error: unsupported option '-fopenmp'")
        return real(base, *rest)
    monkeypatch.setattr(c_launch, "_run_compiler", no_openmp)
    lib, small, _ = two_kernel_library()
    lib.load(torch.float32)
    assert runs == [True, False]
    vals = lstm_step_inputs(3)
    torch.testing.assert_close(small(vals)[0], reference(small.region, vals)[0], atol=1e-5, rtol=1e-4)


def test_the_build_reads_a_private_copy_of_the_source_and_keeps_it_beside_the_library(tmp_path, monkeypatch):
    runs, _, _ = build_two_kernels_on(2, tmp_path, monkeypatch)
    compiled_from = {a for cmd in runs if "-c" in cmd for a in cmd if a.endswith(".c.tmp")}
    assert len(compiled_from) == 1  # both halves read one private file, never the shared <key>.c
    assert [p.suffix for p in sorted((tmp_path / "cpu").iterdir())] == [".c", ".lock", ".so"]


def test_a_failed_build_whose_source_cannot_be_kept_as_key_c_names_the_copy_it_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    clear_memory_cache()
    lib, _, _ = two_kernel_library()
    lib.kernels[1].source += "this is not C;\n"
    c_file = (tmp_path / "cpu" / lib.key(torch.float32)).with_suffix(".c")
    c_file.mkdir(parents=True)  # <key>.c cannot be replaced by the text
    with pytest.raises(RuntimeError, match=r"failed on generated kernels \((.*\.c\.tmp)\)") as err:
        lib.load(torch.float32)
    kept = re.search(r"\((.*\.c\.tmp)\)", str(err.value)).group(1)
    assert "this is not C" in open(kept).read()


def test_a_cache_folder_named_for_openmp_does_not_make_every_failure_retried_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path / "openmp_gomp"))
    monkeypatch.setattr(c_launch, "openmp_flags", lambda: ["-fopenmp"])
    clear_memory_cache()
    runs = compiler_runs(monkeypatch)
    lib, _, _ = two_kernel_library()
    lib.kernels[1].source += "this is not C;\n"
    with pytest.raises(RuntimeError, match="this is not C"):
        lib.load(torch.float32)
    assert all("-fopenmp" in cmd for cmd in runs)


def test_debug_output_names_the_source_file_kept_not_the_private_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEQGRAPH_DEBUG", "1")
    build_two_kernels_on(2, tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert ".c.tmp" not in err and re.search(r"-DSG_HALF=0 .*\.c\b", err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_a_layer_norm_and_its_derivative_of_one_row_compute_its_statistics_once(dtype):
    g, x, y = sg.Input(6, name="g"), sg.Input(6, name="x"), sg.Input(6, name="y")
    outs = [make("layer_norm_grad", (g, x), eps=1e-3), sg.layer_norm(x, eps=1e-3) * 2.0,
            sg.layer_norm(y, eps=1e-3), make("layer_norm_grad", (g, x), eps=0.5)]  # (another eps: its own)
    region = region_from_outputs(outs, [g, x, y])
    source = generate_c(region).source
    assert len(re.findall(r"double m\d+_sum = 0;", source)) == 3  # x's with eps 1e-3, y's, and x's with eps 0.5
    assert_matches_reference(region, dtype=dtype, rtol=1e-4 if dtype == torch.float32 else None)


@pytest.mark.parametrize("base, noise", [(1000.0, 1e-3), (1e4, 1e-2), (1.0, 1e-6)])
def test_a_layer_norm_of_nearly_equal_values_is_centred_to_float_precision(base, noise):
    x, g = sg.Input(64, name="x"), sg.Input(64, name="g")
    kernel = kernel_for(region_from_outputs([sg.layer_norm(x, eps=1e-5), make("layer_norm_grad", (g, x), eps=1e-5)],
                                            [x, g]))
    xs, gs = base + noise * torch.randn(8, 64), torch.randn(8, 64)
    y, dx = kernel([xs, gs])
    x64 = xs.double().requires_grad_()
    want = torch.nn.functional.layer_norm(x64, (64,), eps=1e-5)  # of the same float32 values, in double
    (want_dx,) = torch.autograd.grad(want, x64, gs.double())
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=0)  # (torch's own float32: 8e-3 off at 1000)
    torch.testing.assert_close(dx.double(), want_dx, atol=1e-5 * want_dx.abs().max().item(), rtol=0)


def test_a_row_reduction_stored_as_it_is_is_computed_in_its_output_row():
    x, h = sg.Input(6, name="x"), sg.Input(6, name="h")
    sm, ln = sg.softmax(x), sg.layer_norm(x, eps=1e-3)
    region = region_from_outputs([sm, ln * 2.0, ln], [x, h], carry={1: 1})  # output 1 keeps h on padded rows
    source = generate_c(region).source
    assert f"real* v{sm.id} = o0;" in source and f"real* v{ln.id} = o2;" in source
    assert "o0[j] = v" not in source and "o2[j] = v" not in source
    assert_matches_reference(region)
