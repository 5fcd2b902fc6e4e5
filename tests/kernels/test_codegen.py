"""Generated region kernels: structure of the source, what is fused, and numbers against the
reference interpreter for regions cut from real cells and from their derivative graphs."""
import re

import pytest
import torch

import seqgraph as sg
from seqgraph.compiler import ops
from seqgraph.compiler.ops import make
from seqgraph.kernels.codegen import generate, region_from_outputs, region_supported, row_problem
from seqgraph.kernels.launch import compile_region

from regions import CELL_REGIONS, MATRIX_ROW_OPS, any_matrix_size, attention_region, forward_nodes, lstm_region, matrix_region, \
    matrix_row_op, random_inputs, reference, vjp_region, backward_region

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CUDA when present, else the interpreter

# The interpreter computes padded lanes too (zeros loaded past the row or column end), where
# x / 0 would warn; launch.py runs it with numpy's warnings off, so any RuntimeWarning is an error.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def assert_matches_reference(region, batch=5, positive=False, atol=1e-5, rtol=1e-5):
    vals = random_inputs(region, batch, positive, device=DEVICE)
    got = compile_region(region)(vals)
    want = reference(region, vals)
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"output {k}"
        torch.testing.assert_close(g.cpu(), w, atol=atol, rtol=rtol, msg=lambda m: f"output {k}: {m}")


# ---------------------------------------------------------------------------------------
# building regions
# ---------------------------------------------------------------------------------------
def test_region_from_outputs_collects_the_nodes_between_inputs_and_outputs():
    x, p = sg.Input(4, name="x"), sg.Parameter(4, name="p")
    upstream = sg.tanh(x)
    mid = upstream * p
    out = sg.sigmoid(mid + 1.0)
    region = region_from_outputs([out], [upstream, p])
    assert [n.op for n in region.nodes] == ["mul", "const", "add", "sigmoid"]
    assert region.inputs == [upstream, p] and region.outputs == [out]


def test_region_from_outputs_rejects_a_leaf_that_is_not_an_input():
    x, p = sg.Input(4, name="x"), sg.Parameter(4, name="p")
    with pytest.raises(ValueError, match="'p'.*not among the region's inputs"):
        region_from_outputs([x * p], [x])


# ---------------------------------------------------------------------------------------
# the source
# ---------------------------------------------------------------------------------------
def test_every_computed_line_names_the_node_it_comes_from():
    region = lstm_region()
    source = generate(region).source
    body = source.split("# -- values --")[1].split("# -- stores --")[0].strip().splitlines()
    ids = {n.id for n in region.inputs + region.nodes}
    assert body
    for line in body:
        tag = re.search(r"# %(\d+) (\w+)", line)
        assert tag, line
        assert int(tag.group(1)) in ids


def test_chunks_of_an_input_are_loads_at_column_offsets():
    source = generate(lstm_region(hidden=6)).source
    assert "in0_ptr + rows * in0_rs + (cols_6 + 12) * in0_cs" in source
    assert "cols_24" not in source  # no tile of the whole (B, 4H) row is ever built


def test_a_concat_output_is_stored_piece_by_piece():
    a, b = sg.Input(3, name="a"), sg.Input(5, name="b")
    region = region_from_outputs([sg.concat([sg.tanh(a), sg.sigmoid(b)])], [a, b])
    source = generate(region).source
    assert "tl.store(out0_ptr + rows * 8 + cols_3," in source
    assert "tl.store(out0_ptr + rows * 8 + cols_5 + 3," in source


def test_a_pad_writes_zero_tiles_around_its_operand():
    g = sg.Input(4, name="g")
    padded = make("pad", (g,), dim=0, before=2, after=3)
    source = generate(region_from_outputs([padded], [g])).source
    assert "tl.zeros((BLOCK_ROWS, 2), tl.float32)" in source
    assert "tl.store(out0_ptr + rows * 9 + cols_4 + 2," in source


def test_a_constant_is_written_as_a_literal():
    x = sg.Input(3, name="x")
    region = region_from_outputs([x * 0.25 + float("inf")], [x])
    source = generate(region).source
    assert "0.25" in source and "float('inf')" in source and "in1_ptr" not in source


def test_constants_only_subexpressions_are_folded():
    x = sg.Input(3, name="x")
    two = ops.add(ops.const(1.5), ops.const(0.5))
    source = generate(region_from_outputs([x * two], [x])).source
    assert "(v0_x * 2.0)" in source


# ---------------------------------------------------------------------------------------
# what is fused and what is not
# ---------------------------------------------------------------------------------------
def test_layout_ops_are_fused_though_the_registry_marks_them_for_the_generator():
    x = sg.Input(6, name="x")
    a, b = sg.chunk(x, 2)
    for node in (a, sg.concat([b, a]), make("pad", (a,), dim=0, before=1, after=0), sg.reshape(x, (2, 3))):
        assert not ops.fusable(node)[0]
        assert row_problem(node) is None


def test_compile_region_raises_not_implemented_for_an_unsupported_region():
    x = sg.Input((3, 4), name="x")
    with pytest.raises(NotImplementedError, match="cannot be fused"):
        compile_region(region_from_outputs([sg.transpose(x)], [x]))


# ---------------------------------------------------------------------------------------
# numbers: regions of real cells and of derivative graphs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CELL_REGIONS))
def test_region_matches_reference(name):
    build, batch, positive = CELL_REGIONS[name]
    region = build()
    assert region_supported(region) == (True, "")
    assert_matches_reference(region, batch=batch, positive=positive, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("index", range(17), ids=lambda k: f"node{k}")
def test_vjp_region_of_each_op_matches_reference(index):
    node = forward_nodes()[index]
    region = vjp_region(node)
    assert region_supported(region) == (True, "")
    assert_matches_reference(region, positive=True, atol=1e-5, rtol=1e-4)


def test_the_layer_norm_derivative_of_a_whole_row_calls_its_helper():
    g, x = sg.Input(6, name="g"), sg.Input(6, name="x")
    region = region_from_outputs([make("layer_norm_grad", (g, x), eps=1e-3)], [g, x])
    source = generate(region).source
    assert "def sg_layer_norm_grad(" in source and "= sg_layer_norm_grad(" in source
    assert "row statistics" not in source
    assert_matches_reference(region, atol=1e-5, rtol=1e-4)


def test_the_layer_norm_derivative_of_rows_assembled_from_pieces_sums_its_statistics_over_them():
    # g is a concat of two computed pieces and x is cut at another column: three tiles a row
    a, b, x = sg.Input(2, name="a"), sg.Input(5, name="b"), sg.Input(7, name="x")
    x1, x2 = sg.narrow(x, -1, 0, 4), sg.narrow(x, -1, 4, 3)
    g = sg.concat([sg.tanh(a), b * 2.0])
    dx = make("layer_norm_grad", (g, sg.concat([x1, sg.exp(x2)])), eps=1e-5)
    region = region_from_outputs([dx, sg.narrow(dx, -1, 1, 3)], [a, b, x])
    source = generate(region).source
    assert source.count("row statistics") == 4  # mean, rstd and g's two means, once each
    assert_matches_reference(region, atol=1e-5, rtol=1e-4)


def test_the_lstm_gate_gradient_is_assembled_from_padded_pieces():
    forward = lstm_region(hidden=4)
    xproj, rec, bias, c = forward.inputs
    h_next, c_next = forward.outputs
    region = backward_region([h_next, c_next], [xproj, rec, bias, c], wrt=[xproj, c])
    assert any(n.op == "pad" for n in region.nodes)


@pytest.mark.parametrize("op", ["maximum", "minimum", "relu"])
def test_a_nan_operand_gives_nan_as_torch_does(op):
    # Triton's tl.maximum/minimum return the other operand of a nan unless asked to propagate it
    x = sg.Input(4, name="x")
    y = sg.relu(x) if op == "relu" else getattr(sg, op)(x, 0.5)
    kernel = compile_region(region_from_outputs([y], [x]))
    xv = torch.tensor([[float("nan"), 2.0, -1.0, 0.25]], device=DEVICE)
    want = torch.relu(xv) if op == "relu" else getattr(torch, op)(xv, torch.tensor(0.5, device=DEVICE))
    torch.testing.assert_close(kernel([xv])[0], want, equal_nan=True)


def test_tanh_keeps_its_relative_accuracy_near_zero():
    x = sg.Input(6, name="x")
    kernel = compile_region(region_from_outputs([sg.tanh(x)], [x]))
    xv = torch.tensor([[1e-8, -1e-6, 1e-4, 0.1, 0.124, -0.126]], device=DEVICE)
    torch.testing.assert_close(kernel([xv])[0], torch.tanh(xv), rtol=2e-7, atol=0)


# ---------------------------------------------------------------------------------------
# the row ops of flattened per-example matrices
# ---------------------------------------------------------------------------------------
def test_per_example_matrix_vector_products_match_reference():
    region = attention_region(S=5, D=8)
    assert region_supported(region) == (True, "")
    assert_matches_reference(region, batch=4)


def test_matrix_rows_whose_width_is_not_a_power_of_two_are_fused_and_match_reference():
    region = attention_region(S=5, D=7)
    assert region_supported(region) == (True, "")
    source = generate(region).source
    assert "idx_35 = cols_35 // 8 * 7 + cols_35 % 8" in source  # the (5, 7) matrix's rows padded to 8 columns
    assert_matches_reference(region, batch=4)


# (3, 4): rows of a power of two; (4, 3) and (3, 5): padded rows, the second of padded rows and columns
@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (3, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op", [op for op in MATRIX_ROW_OPS if not op.startswith("strided_matmul")])
def test_each_matrix_row_op_and_its_vjp_region_match_reference(op, shape):
    node = matrix_row_op(op, *shape)
    forward = region_from_outputs([node], list(node.inputs))
    assert region_supported(forward) == (True, "")
    assert_matches_reference(forward)
    region = vjp_region(node)
    assert region_supported(region) == (True, "")
    assert_matches_reference(region, rtol=1e-4)


@any_matrix_size
def test_row_ops_on_a_matrix_of_any_size_match_reference(M, N, batch):
    region = matrix_region(M, N)
    assert region_supported(region) == (True, "")
    assert_matches_reference(region, batch=batch)


def test_padded_matrix_rows_feed_slices_concats_and_row_sums():
    x, q, y = sg.Input(15, name="x"), sg.Input(5, name="q"), sg.Input(15, name="y")
    spread = sg.tanh(make("tile", (q,), times=3) + x)  # a (3, 5) matrix, padded to (4, 8) in registers
    both = sg.concat([spread, y * 2.0])  # a (3, 5) tile and a plain tile of y, laid out alike
    outs = [sg.narrow(both, -1, 15, 15) + spread, sg.layer_norm(spread), sg.sum(both, keepdim=True),
            make("sum_groups", (spread * y,), times=5)]
    region = region_from_outputs(outs, [x, q, y])
    assert region_supported(region) == (True, "")
    assert_matches_reference(region)


def test_a_width_read_as_two_different_matrices_is_left_to_torch():
    x, u, v = sg.Input(6, name="x"), sg.Input(2, name="u"), sg.Input(3, name="v")
    region = region_from_outputs([make("outer", (u, v)) + make("tile", (u,), times=3) * x], [x, u, v])
    ok, why = region_supported(region)
    assert not ok and "rows of 6 columns as a (2, 3) matrix" in why and "as a (3, 2) matrix" in why


def test_a_product_of_two_per_example_matrices_is_left_to_torch():
    node = matrix_row_op("strided_matmul heads")
    ok, why = region_supported(region_from_outputs([node], list(node.inputs)))
    assert not ok and "strided_matmul" in why and "cuBLAS" in why


def test_a_row_op_reading_a_row_joined_from_pieces_is_left_to_torch():
    a, b, q = sg.Input(4, name="a"), sg.Input(8, name="b"), sg.Input(4, name="q")
    scores = make("matvec", (sg.concat([sg.tanh(a), b * 2.0]), q))
    ok, why = region_supported(region_from_outputs([scores], [a, b, q]))
    assert not ok and "a row joined from pieces" in why


def test_a_row_op_whose_result_is_read_in_parts_is_left_to_torch():
    q = sg.Input(4, name="q")
    tiled = make("tile", (q,), times=3)
    ok, why = region_supported(region_from_outputs([sg.narrow(tiled, -1, 5, 4)], [q]))
    assert not ok and "parts of its row are read on their own" in why


def test_a_row_op_feeding_a_concat_and_elementwise_ops_is_fused():
    x, q = sg.Input(12, name="x"), sg.Input(4, name="q")
    scores = make("matvec", (x, q))
    region = region_from_outputs([sg.concat([scores, sg.sigmoid(q)]), sg.softmax(scores) * 2.0], [x, q])
    assert region_supported(region) == (True, "")
    assert_matches_reference(region)


def test_the_row_op_helpers_are_written_only_into_kernels_that_use_them():
    x = sg.Input(6, name="x")
    assert "def sg_matrix" not in generate(region_from_outputs([sg.tanh(x)], [x])).source
    assert "def sg_matrix" in generate(region_from_outputs([make("sum_groups", (x,), times=2)], [x])).source


def test_a_row_op_reads_a_value_folded_to_a_number_as_a_tile():
    x = sg.Input(4, name="x")
    half = sg.reshape(ops.const(0.5), (1,))  # the generator folds it to the literal 0.5
    region = region_from_outputs([make("tile", (half,), times=4) * x, make("matvec", (x, half)),
                                  make("outer", (half, x))], [x])
    assert region_supported(region) == (True, "")
    assert_matches_reference(region)


def test_the_layer_norm_derivative_of_an_unbatched_input_under_a_batched_gradient_is_batched():
    g, w = sg.Input(5, name="g"), sg.Parameter(5, name="w")
    dx = make("layer_norm_grad", (g, w), eps=1e-5)
    assert dx.batched
    assert_matches_reference(region_from_outputs([dx], [g, w]), atol=1e-5, rtol=1e-4)


def test_a_row_op_reads_an_unbatched_scalar_as_a_tile():
    x, p0 = sg.Input(4, name="x"), sg.Parameter((), name="p0")
    q = sg.reshape(p0, (1,))  # a (1,) vector that the kernel holds as the plain scalar it loaded
    region = region_from_outputs([make("matvec", (x, q)), make("tile", (sg.sigmoid(q),), times=4) * x,
                                  make("sum_groups", (q,), times=1) + x], [x, p0])
    assert region_supported(region) == (True, "")
    assert_matches_reference(region)
