"""Launching region kernels: strides, dtypes, masking, batch sizes, the kernel cache, debug
output, argument errors, and a property test over random elementwise regions."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seqgraph as sg
from seqgraph.compiler import ops
from seqgraph.kernels import launch
from seqgraph.kernels.codegen import generate, region_from_outputs
from seqgraph.kernels.launch import cache_key, clear_memory_cache, compile_region

from regions import (RANDOM_STEPS, lstm_step as lstm, lstm_step_inputs as lstm_inputs, random_elementwise_region,
                     random_region_inputs, reference, strided_lstm_step_inputs)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CUDA when present, else the interpreter

# The interpreter computes padded lanes too (zeros loaded past the row or column end), where
# x / 0 would warn; launch.py runs it with numpy's warnings off, so any RuntimeWarning is an error.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def on_device(vals, dtype=None):
    return [None if v is None else v.to(DEVICE, dtype or v.dtype) for v in vals]


# ---------------------------------------------------------------------------------------
# layouts and dtypes
# ---------------------------------------------------------------------------------------
def test_non_contiguous_batched_inputs_are_read_through_their_strides():
    region = lstm()
    vals = strided_lstm_step_inputs(5)
    got = compile_region(region)(on_device(vals))
    for g, w in zip(got, reference(region, vals)):
        torch.testing.assert_close(g.cpu(), w, atol=1e-5, rtol=1e-5)


def test_a_strided_parameter_vector_is_read_through_its_stride():
    x, p = sg.Input(7, name="x"), sg.Parameter(7, name="p")
    region = region_from_outputs([x * p], [x, p])
    vals = [torch.randn(3, 7), torch.randn(14)[::2]]
    (got,) = compile_region(region)(on_device(vals))
    torch.testing.assert_close(got.cpu(), vals[0] * vals[1])


def test_outputs_are_fresh_contiguous_tensors_with_the_batch_first():
    x = sg.Input(5, name="x")
    region = region_from_outputs([sg.tanh(x), sg.sum(x)], [x])
    wide, scalar = compile_region(region)(on_device([torch.randn(4, 5)]))
    assert wide.shape == (4, 5) and wide.is_contiguous()
    assert scalar.shape == (4,)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["f16", "bf16"])
def test_half_precision_inputs_compute_in_float32_and_store_their_dtype(dtype, tol):
    region = lstm()
    vals = [v.to(dtype) for v in lstm_inputs(6)]
    vals[2] = vals[2].float()  # a float32 parameter beside half-precision activations
    got = compile_region(region)(on_device(vals))
    for g, w in zip(got, reference(region, vals)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float().cpu(), w, atol=tol, rtol=tol)


def test_a_float64_input_is_refused_since_the_kernel_would_round_it_to_float32():
    x = sg.Input(5, name="x")
    with pytest.raises(TypeError, match=r"has dtype torch.float64; fused kernels take float32, float16 or bfloat16"):
        compile_region(region_from_outputs([sg.tanh(x)], [x]))(on_device([torch.randn(3, 5, dtype=torch.float64)]))


def test_out_dtype_overrides_the_dtype_of_the_first_batched_input():
    region = lstm()
    vals = [v.to(torch.bfloat16) for v in lstm_inputs(3)]
    got = compile_region(region)(on_device(vals), out_dtype=torch.float32)
    assert all(g.dtype == torch.float32 for g in got)
    for g, w in zip(got, reference(region, vals)):
        torch.testing.assert_close(g.cpu(), w, atol=1e-5, rtol=1e-5)


def test_many_programs_cover_a_batch_that_is_not_a_power_of_two():
    x, p = sg.Input(100, name="x"), sg.Parameter(100, name="p")
    region = region_from_outputs([sg.layer_norm(x) * p], [x, p])
    kernel = compile_region(region)
    assert kernel.launch_config(37, DEVICE)["BLOCK_ROWS"] < 37  # several programs
    vals = [torch.randn(37, 100), torch.randn(100)]
    (got,) = kernel(on_device(vals))
    torch.testing.assert_close(got.cpu(), reference(region, vals)[0], atol=1e-5, rtol=1e-5)


def test_an_empty_batch_gives_empty_outputs():
    region = lstm()
    got = compile_region(region)(on_device(lstm_inputs(0)))
    assert [tuple(g.shape) for g in got] == [(0, 6)] * 3


def test_launch_config_keeps_tiles_near_2048_elements():
    x = sg.Input(300, name="x")
    kernel = compile_region(region_from_outputs([sg.tanh(x)], [x]))
    assert kernel.gen.max_block == 512
    assert kernel.launch_config(1000, "cpu")["BLOCK_ROWS"] * 512 == 2048
    assert kernel.launch_config(3, "cpu")["BLOCK_ROWS"] == 4  # never more rows than the batch needs


def test_launch_config_on_a_gpu_keeps_enough_programs_for_every_sm():
    x = sg.Input(300, name="x")
    kernel = compile_region(region_from_outputs([sg.tanh(x)], [x]))
    assert kernel.launch_config(64, "cuda") == {"BLOCK_ROWS": 1, "num_warps": 4}
    assert kernel.launch_config(100_000, "cuda") == {"BLOCK_ROWS": 4, "num_warps": 16}


# ---------------------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------------------
def test_padded_rows_keep_the_carried_input_or_write_zeros():
    region = lstm(carry={0: 4, 1: 3}, zero_masked={2})
    vals = lstm_inputs(5)
    mask = torch.tensor([True, False, True, False, True])
    h, c, out = compile_region(region)(on_device(vals), mask=mask.to(DEVICE))
    want_h, want_c, _ = reference(region, vals)
    m = mask[:, None]
    torch.testing.assert_close(h.cpu(), torch.where(m, want_h, vals[4]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.cpu(), torch.where(m, want_c, vals[3]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cpu(), torch.where(m, want_h, 0.0), atol=1e-5, rtol=1e-5)
    assert torch.equal(c.cpu()[~mask], vals[3][~mask])  # carried values are copied exactly


def test_without_a_mask_every_row_is_computed():
    region = lstm(carry={0: 4, 1: 3}, zero_masked={2})
    vals = lstm_inputs(4)
    got = compile_region(region)(on_device(vals))
    for g, w in zip(got, reference(region, vals)):
        torch.testing.assert_close(g.cpu(), w, atol=1e-5, rtol=1e-5)


def test_a_carried_output_can_be_an_input_passed_through():
    x, h = sg.Input(3, name="x"), sg.State(3, name="h")
    region = region_from_outputs([h, sg.tanh(x)], [x, h], carry={1: 1})
    vals = [torch.randn(4, 3), torch.randn(4, 3)]
    mask = torch.tensor([True, True, False, True])
    same, y = compile_region(region)(on_device(vals), mask=mask.to(DEVICE))
    assert torch.equal(same.cpu(), vals[1])
    torch.testing.assert_close(y.cpu(), torch.where(mask[:, None], torch.tanh(vals[0]), vals[1]))


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------
def test_constant_inputs_may_be_given_as_none_or_left_out():
    x, k = sg.Input(4, name="x"), ops.const(3.0)
    region = region_from_outputs([x * k], [x, k])
    kernel = compile_region(region)
    x_val = torch.randn(2, 4)
    (a,) = kernel(on_device([x_val, None]))
    (b,) = kernel(on_device([x_val]))
    torch.testing.assert_close(a.cpu(), x_val * 3.0)
    torch.testing.assert_close(b.cpu(), x_val * 3.0)


def test_a_wrong_number_of_inputs_is_a_value_error():
    with pytest.raises(ValueError, match="takes 5 inputs"):
        compile_region(lstm())(on_device(lstm_inputs(2)[:3]))


def test_an_input_of_the_wrong_width_is_a_value_error():
    vals = lstm_inputs(2)
    vals[3] = torch.randn(2, 7)
    with pytest.raises(ValueError, match=r"input 3 \(c\).*7 columns per row, expected 6"):
        compile_region(lstm())(on_device(vals))


def test_inputs_with_different_batch_sizes_are_a_value_error():
    vals = lstm_inputs(3)
    vals[4] = torch.randn(2, 6)
    with pytest.raises(ValueError, match="expected a batch of 3 rows"):
        compile_region(lstm())(on_device(vals))


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    kernel = compile_region(lstm())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        kernel(lstm_inputs(2))


# ---------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------
def test_the_kernel_file_is_written_once_and_reused_by_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    region = lstm()
    first = compile_region(region)
    assert first.wrote_file and first.path.parent == tmp_path
    stamp = first.path.stat().st_mtime_ns
    clear_memory_cache()  # what a new process starts with
    second = compile_region(lstm())  # same structure, new nodes
    assert not second.wrote_file and second.path == first.path
    assert second.path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name]
    vals = lstm_inputs(3)
    for g, w in zip(second(on_device(vals)), reference(second.region, vals)):
        torch.testing.assert_close(g.cpu(), w, atol=1e-5, rtol=1e-5)


def test_regions_of_different_structure_get_different_files():
    x = sg.Input(4, name="x")
    assert cache_key(region_from_outputs([sg.tanh(x)], [x])) != cache_key(region_from_outputs([sg.sigmoid(x)], [x]))
    assert cache_key(lstm(hidden=6)) != cache_key(lstm(hidden=7))
    assert cache_key(lstm(carry={0: 4})) != cache_key(lstm())


def test_the_cache_key_changes_with_the_triton_version(monkeypatch):
    region = lstm()
    before = cache_key(region)
    monkeypatch.setattr(launch.triton, "__version__", "0.0.0-other")
    assert cache_key(region) != before


def test_the_cache_key_changes_when_the_generator_or_an_op_emitter_is_edited(monkeypatch, tmp_path):
    region = lstm()
    before = cache_key(region)
    edited = tmp_path / "ops.py"
    edited.write_bytes(open(ops.__file__, "rb").read() + b"# an edited emitter\n")
    monkeypatch.setattr(ops, "__file__", str(edited))
    launch._generator_fingerprint.cache_clear()
    try:
        assert cache_key(region) != before
    finally:
        monkeypatch.undo()
        launch._generator_fingerprint.cache_clear()
    assert cache_key(region) == before


def test_source_shows_this_regions_own_node_names():
    a, b = lstm(), lstm()
    assert compile_region(a).source != compile_region(b).source  # same file, their own node ids
    assert compile_region(a).path == compile_region(b).path


# ---------------------------------------------------------------------------------------
# debug output
# ---------------------------------------------------------------------------------------
def test_debug_level_3_prints_the_generated_source(monkeypatch, capsys):
    monkeypatch.setenv("SEQGRAPH_DEBUG", "3")
    kernel = compile_region(lstm())
    kernel(on_device(lstm_inputs(2)))
    err = capsys.readouterr().err
    assert kernel.source in err and "[seqgraph] launch" not in err


def test_debug_level_4_prints_launch_configurations(monkeypatch, capsys):
    kernel = compile_region(lstm())
    monkeypatch.setenv("SEQGRAPH_DEBUG", "4")
    kernel(on_device(lstm_inputs(3)))
    err = capsys.readouterr().err
    rows = kernel.launch_config(3, DEVICE)["BLOCK_ROWS"]
    grid = (3 + rows - 1) // rows
    assert "launch region 'lstm'" in err and f"BLOCK_ROWS={rows} " in err and f"grid=({grid},)" in err


# ---------------------------------------------------------------------------------------
# property: random elementwise regions equal the reference
# ---------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(width=st.integers(1, 9), batch=st.integers(1, 6), n_out=st.integers(1, 3),
       steps=st.lists(st.tuples(st.sampled_from(RANDOM_STEPS), st.integers(0, 50), st.integers(0, 50)),
                      min_size=1, max_size=8))
def test_random_elementwise_regions_match_reference(width, batch, n_out, steps):
    region = random_elementwise_region(width, steps, n_out)
    vals = random_region_inputs(batch, width)
    got = compile_region(region)(on_device(vals))
    for g, w in zip(got, reference(region, vals)):
        torch.testing.assert_close(g.cpu(), w, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# compiled on a GPU
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_compiled_kernels_match_reference_on_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compile for the device, not the interpreter
    region = lstm(hidden=64, carry={0: 4, 1: 3}, zero_masked={2})
    vals = lstm_inputs(37, hidden=64)
    mask = torch.rand(37) > 0.3
    got = compile_region(region)([v.cuda().to(torch.bfloat16) for v in vals], mask=mask.cuda())
    ref_vals = [v.to(torch.bfloat16) for v in vals]
    want = reference(region, ref_vals)
    m = mask[:, None]
    carried = [torch.where(m, want[0], ref_vals[4].float()), torch.where(m, want[1], ref_vals[3].float()),
               torch.where(m, want[2], 0.0)]
    for g, w in zip(got, carried):
        torch.testing.assert_close(g.float().cpu(), w, atol=1.6e-2, rtol=1.6e-2)


def test_equal_regions_of_other_names_write_one_kernel_function_with_the_same_code():
    # a process may read a cached file that another has just rewritten for an equal region
    def region(name, input_name):
        x = sg.Input(4, name=input_name)
        return region_from_outputs([sg.tanh(x) * 2.0], [x], name=name)
    a, b = region("a", "x"), region("b", "hidden")
    assert cache_key(a) == cache_key(b)
    code = []
    for r in (a, b):
        text = generate(r).source
        assert "def region_kernel(" in text
        code.append([re.sub(r"\bv(\d+)_\w+", r"v\1", line.split("#")[0]) for line in text.split("\n")][2:])
    assert code[0] == code[1]  # but for comments and value names (the docstring's first lines name the region)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_the_interpreter_warns_of_nothing_the_masked_lanes_compute():
    # mLSTM's division by max(|n.q|, exp(-m)) runs on the block's padding columns too, where
    # the interpreter's numpy warned "invalid value encountered in divide"; nothing is stored there
    rec = sg.Recurrence(sg.cells.mlstm(3, 3))
    comp = sg.compile(rec, backend="triton")
    x = torch.randn(4, 3, 3, requires_grad=True)
    out, _ = comp(x, lengths=torch.tensor([4, 2, 1]))
    out.sum().backward()
    torch.testing.assert_close(out, rec(x, lengths=torch.tensor([4, 2, 1]))[0], rtol=1e-5, atol=1e-5)
