"""Where nodes run (seqgraph/compiler/hoist.py): which hoisted elementwise ops a backend with
fused loops computes in the loop's region instead, and which stay before the loop."""
import pytest

import seqgraph as sg
from seqgraph.compiler.ops import fusable as triton_fusable
from seqgraph.compiler.pipeline import compile_plan


def hoisted_ops(plan):
    return sorted(n.op for n in plan.hoisted)


def region_ops(plan):
    (region,) = [s for s in plan.stages if s.kind == "fused"]
    return [n.op for n in region.nodes]


def test_a_qrnns_gates_run_in_the_loops_region_when_the_loop_is_fused():
    plan = compile_plan(sg.cells.qrnn(4, 6), fused_loop=True)
    assert hoisted_ops(plan) == ["add", "linear"]  # the product and its bias: one addmm
    assert [r.shape for r in plan.reads] == [(18,)]  # the loop reads the product's rows
    assert {"sigmoid", "tanh", "sub"} <= set(region_ops(plan))
    assert [s.kind for s in plan.stages] == ["fused"]


def test_a_loop_run_an_op_at_a_time_keeps_the_gates_before_it():
    plan = compile_plan(sg.cells.qrnn(4, 6), fused_loop=False)
    assert {"sigmoid", "tanh", "sub"} <= set(hoisted_ops(plan))
    assert len(plan.hoisted_regions()) == 1


def test_a_bias_stays_with_its_product():
    lstm = compile_plan(sg.cells.lstm(4, 6), fused_loop=True)
    assert hoisted_ops(lstm) == ["add", "linear"]


def test_a_layer_norm_of_the_input_projection_runs_in_the_loops_region_with_its_scale_and_shift():
    ln = compile_plan(sg.cells.lstm(4, 6, layer_norm=True), fused_loop=True, norms_in_loop=True)
    assert hoisted_ops(ln) == ["linear"]
    assert [r.shape for r in ln.reads if r.batched] == [(24,)]  # the product's rows
    assert region_ops(ln).count("layer_norm") == 3  # ln_ih, ln_hh, ln_c
    assert [s.kind for s in ln.stages] == ["gemm", "fused"]


@pytest.mark.parametrize("fused_loop", [False, True], ids=["op_at_a_time", "triton"])
def test_a_loop_without_in_loop_sums_keeps_a_layer_norm_with_its_scale_and_shift_before_it(fused_loop):
    # the torch backend runs an op at a time; the Triton loops keep a vector weight's gradient
    # per step, so there the norm's scale and shift would cost two (T, B, 4H) stashes
    ln = compile_plan(sg.cells.lstm(4, 6, layer_norm=True), fused_loop=fused_loop)
    assert {"layer_norm", "mul", "add"} <= set(hoisted_ops(ln))


def test_the_cpu_backend_computes_the_input_side_layer_norm_in_its_loop():
    compiled = sg.compile(sg.Recurrence(sg.cells.lstm(4, 6, layer_norm=True)), backend="cpu")
    assert hoisted_ops(compiled.plan()) == ["linear"]


def test_a_softmax_over_the_input_runs_in_the_loops_region():
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    h2 = sg.softmax(x) * h + x
    plan = compile_plan(sg.Cell([x], {h: h2}, [h2]), fused_loop=True, norms_in_loop=True)
    assert "softmax" not in hoisted_ops(plan) and "softmax" in region_ops(plan)


def test_gates_a_product_reads_stay_before_the_loop():
    x, h = sg.Input(4, name="x"), sg.State(6, name="h")
    z, g = sg.chunk(sg.Linear(4, 12)(x), 2)
    u = sg.tanh(z) * sg.sigmoid(g)
    h2 = sg.tanh(sg.Linear(6, 6)(u) + sg.Linear(6, 6)(h))
    plan = compile_plan(sg.Cell([x], {h: h2}, [h2]), fused_loop=True)
    assert {"tanh", "sigmoid", "mul"} <= set(hoisted_ops(plan))


def test_a_result_that_reads_no_state_stays_before_the_loop():
    x, c = sg.Input(4, name="x"), sg.State(4, name="c")
    gate = sg.sigmoid(x)
    plan = compile_plan(sg.Cell([x], {c: gate * c}, [gate]), fused_loop=True)
    assert "sigmoid" in hoisted_ops(plan)


def test_an_op_the_kernels_cannot_compute_stays_before_the_loop():
    def no_tanh(n):
        return (False, "no tanh in this test") if n.op == "tanh" else triton_fusable(n)
    plan = compile_plan(sg.cells.qrnn(4, 6), fusable=no_tanh, fused_loop=True)
    assert "tanh" in hoisted_ops(plan) and "sigmoid" not in hoisted_ops(plan)


def test_gates_in_the_loop_join_the_region_after_the_steps_product():
    x, h = sg.Input(4, name="x"), sg.State(6, name="h")
    z, g = sg.chunk(sg.Linear(4, 12)(x), 2)
    h2 = sg.sigmoid(g) * sg.tanh(sg.Linear(6, 6)(h)) + sg.tanh(z)
    plan = compile_plan(sg.Cell([x], {h: h2}, [h2]), fused_loop=True)
    assert [s.kind for s in plan.stages] == ["gemm", "fused"]
    assert {"slice", "sigmoid", "tanh"} <= set(region_ops(plan))


def test_the_plan_names_the_state_free_ops_the_loop_computes():
    line = "computed in the loop's regions (their only readers) rather than over all rows: 5 state-free op(s)"
    assert line in str(sg.compile(sg.Recurrence(sg.cells.qrnn(4, 6)), backend="cpu").plan())
    assert "state-free op" not in str(sg.compile(sg.Recurrence(sg.cells.qrnn(4, 6)), backend="torch").plan())
