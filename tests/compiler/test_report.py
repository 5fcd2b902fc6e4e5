"""seqgraph/compiler/report.py: plan.describe() and the FLOP counts it prints."""
import pytest

import seqgraph as sg
from seqgraph.compiler.pipeline import compile_plan
from seqgraph.compiler.report import gemm_flops


def test_gemm_flops_counts_two_per_multiply_add_over_the_rows():
    x = sg.Input(8, name="x")
    y = sg.Linear(8, 16, bias=False)(x)
    assert gemm_flops(y, rows=10) == 2 * 10 * 8 * 16


def test_describe_sizes_the_hoisted_gemm_and_the_memory_for_given_t_and_b():
    text = compile_plan(sg.cells.lstm(256, 256)).describe(T=20, B=64)
    assert "seqgraph plan (unroll=1) for T=20, B=64" in text
    assert f"{2 * 20 * 64 * 256 * 1024 / 1e6:.3g} MFLOP" in text  # the input projection, 671 MFLOP
    assert "memory for backward at T=20, B=64: saved" in text


def test_describe_without_sizes_still_lists_the_stages():
    text = compile_plan(sg.cells.gru(3, 5)).describe(T=None, B=None)
    assert "per step:" in text and "GFLOP" not in text


def test_describe_shows_small_amounts_in_units_that_show_them():
    text = compile_plan(sg.cells.lstm(4, 8)).describe(T=5, B=3)
    assert "0.000" not in text and "0.00 MiB" not in text
    assert f"{2 * 5 * 3 * 4 * 32 / 1e3:.3g} kFLOP" in text  # the hoisted input projection


def test_describe_shows_each_gemm_of_a_step_with_its_operands():
    text = compile_plan(sg.cells.lstm(4, 8)).describe(T=5, B=3)
    assert "GEMM: %" in text and "= (B,8) @ (32,8)^T" in text  # the recurrent product, forward


def test_large_and_rounded_amounts_are_written_without_exponents():
    from seqgraph.compiler.report import _bytes_text, _flops_text
    assert (_flops_text(3.44e13), _flops_text(999.6e6), _bytes_text(1023.7 * 1024), _flops_text(998e6)) == (
        "34400 GFLOP", "1 GFLOP", "1 MiB", "998 MFLOP")


def test_memory_counts_a_hoisted_value_once_per_step_and_a_weight_once():
    text = compile_plan(sg.cells.lstm(128, 128)).describe(T=50, B=16)
    hoisted, weight = 50 * 16 * 512 * 4, 512 * 128 * 4  # the input projection over all steps, weight_hh
    assert f"values read by the loop {(hoisted + weight) / 2**20:.3g} MiB" in text


@pytest.mark.parametrize("T,B", [(-1, 3), (5, 2.5)])
def test_describe_refuses_a_size_that_is_not_a_count(T, B):
    with pytest.raises(ValueError, match=r"describe: [TB] must be a number of"):
        compile_plan(sg.cells.lstm(4, 8)).describe(T=T, B=B)


def _backward_memory_lines(cell, backend):
    text = sg.compile(sg.Recurrence(cell), backend=backend).plan().describe(T=10, B=2)
    return [line for line in text.splitlines() if "memory for backward" in line]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_the_gradient_stash_counts_no_buffer_the_backward_reads_where_it_already_is(backend):
    # an LSTM's stash is the state sequence and the input projection's gradient: nothing new
    unmasked, _ = _backward_memory_lines(sg.cells.lstm(4, 8), backend)
    assert unmasked.endswith("gradient stash 0 B")


def test_the_gradient_stash_of_the_c_loops_is_one_row_sum_per_peephole_weight():
    unmasked, _ = _backward_memory_lines(sg.cells.lstm(4, 8, peephole=True), "cpu")
    assert unmasked.endswith(f"gradient stash {3 * 2 * 8 * 4} B")  # three (B, 8) sums, not (T, B, 8) each
