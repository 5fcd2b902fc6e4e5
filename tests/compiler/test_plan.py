"""Structure of compiled plans: what is hoisted, what runs per step, what backward saves."""
import pytest
import torch

import seqgraph as sg
from seqgraph.compiler.pipeline import compile_plan

from zoo import ZOO


def _nngraph_lstm(I=4, H=6):
    x, h, c = sg.Input(I, name="x"), sg.State(H, name="h"), sg.State(H, name="c")
    i, f, g, o = sg.chunk(sg.Linear(I + H, 4 * H, name="gates")(sg.Concat()([x, h])), 4)
    c2 = sg.sigmoid(f) * c + sg.sigmoid(i) * sg.tanh(g)
    h2 = sg.sigmoid(o) * sg.tanh(c2)
    return sg.Cell([x], {h: h2, c: c2}, [h2])


def _gate_by_gate_lstm(I=4, H=6):
    x, h, c = sg.Input(I, name="x"), sg.State(H, name="h"), sg.State(H, name="c")
    pre = [sg.Linear(I, H)(x) + sg.Linear(H, H, bias=False)(h) for _ in range(4)]
    i, f, o = sg.sigmoid(pre[0]), sg.sigmoid(pre[1]), sg.sigmoid(pre[3])
    c2 = f * c + i * sg.tanh(pre[2])
    return sg.Cell([x], {h: o * sg.tanh(c2), c: c2}, [o * sg.tanh(c2)])


def _kinds(stages):
    return [s.kind for s in stages]


def test_lstm_is_one_hoisted_gemm_one_recurrent_gemm_and_one_region_per_step():
    for make in (ZOO["lstm_ops"], _nngraph_lstm, _gate_by_gate_lstm):
        plan = compile_plan(make())
        assert len(plan.hoisted_gemms()) == 1
        assert _kinds(plan.stages) == ["gemm", "fused"], make
        assert len(plan.step_gemms()) == 1


def test_gate_by_gate_linears_on_h_become_one_gemm_on_a_concatenated_weight():
    plan = compile_plan(_gate_by_gate_lstm(4, 6))
    (gemm,) = plan.step_gemms()
    assert gemm.inputs[1].op == "concat" and gemm.inputs[1].shape == (24, 6)
    assert gemm.inputs[1] in plan.invariant


def test_gru_reset_after_needs_one_recurrent_gemm_and_reset_before_needs_two():
    assert _kinds(compile_plan(ZOO["gru_reset_after"]()).stages) == ["gemm", "fused"]
    assert _kinds(compile_plan(ZOO["gru_reset_before"]()).stages) == ["gemm", "fused", "gemm", "fused"]


def test_weight_gradients_of_recurrent_gemms_are_one_reduction_after_the_loop():
    plan = compile_plan(ZOO["lstm_ops"]())
    for masked in (False, True):
        bwd = plan.backward_plan(masked)
        assert [n.op for n in bwd.post] == ["linear_wgrad"]
        assert not any(n.op == "linear_wgrad" for n in bwd.loop)
        assert [s.kind for s in bwd.stages].count("gemm") == 1


def test_lstm_backward_saves_the_gate_activations_only():
    bwd = compile_plan(ZOO["lstm_ops"]()).backward_plan(False)
    assert sorted(n.op for n in bwd.saved) == ["sigmoid", "sigmoid", "sigmoid", "tanh", "tanh"]


def test_plan_text_names_gemms_regions_saves_and_memory():
    comp = sg.compile(sg.Recurrence(ZOO["lstm_ops"]()))
    text = comp.plan().describe(T=100, B=64)
    for words in ("hoisted GEMM", "GEMM: %", "linear 'hh'", "fused region (14 ops", "saves per step",
                  "after the loop: 1 weight/bias gradient reduction", "memory for backward at T=100, B=64"):
        assert words in text


def test_plan_says_why_an_op_falls_back_to_torch():
    x, h = sg.Input(2, name="x"), sg.State(6, name="h")
    memory = sg.Context((4, 6), name="memory")
    read = sg.sum(sg.softmax(memory * sg.unsqueeze(h, 0), dim=0) * memory, dim=0)  # (down the columns)
    text = compile_plan(sg.Cell([x], {h: sg.tanh(read + sg.Linear(2, 6)(x))}, [read])).describe()
    assert "torch fallback (softmax: works on per-example shape (4, 6), which has more than one dim)" in text


def test_source_tags_each_line_with_its_node_and_user_line():
    comp = sg.compile(sg.Recurrence(_nngraph_lstm()))
    src = comp.source()
    assert "addmm(" in src  # the hoisted x-projection and bias are one GEMM (torch.addmm or _gemm.addmm)
    assert "'gates' @ test_plan.py:" in src


def test_plan_picture_draws_each_fused_region_as_a_cluster():
    comp = sg.compile(sg.Recurrence(ZOO["gru_reset_before"]()))
    dot = sg.to_dot(comp).source
    assert dot.count("subgraph cluster_fused_") == 2
    assert "GEMM" in dot


def _backward_picture(cell, backend="cpu"):
    comp = sg.compile(sg.Recurrence(cell), backend=backend)
    return comp, sg.to_dot(comp, backward=True).source


def test_backward_picture_draws_each_fused_kernel_of_the_backward_step_as_a_cluster():
    comp, dot = _backward_picture(sg.cells.lstm(4, 6, layer_norm=True))
    bwd = comp.plan().backward_plan(False)
    assert dot.count("subgraph cluster_fused_") == sum(s.kind == "fused" for s in bwd.stages) >= 1
    assert "per step, from the last to the first" in dot and "after the loop (all T steps at once)" in dot


def test_backward_picture_marks_recomputed_and_saved_values_and_draws_no_saved_product_as_a_gemm():
    comp, dot = _backward_picture(sg.cells.lstm(4, 6, layer_norm=True))
    bwd = comp.plan().backward_plan(False)
    assert bwd.recomputed and dot.count('xlabel=recomputed') == len(bwd.recomputed)
    assert dot.count("xlabel=saved") == len(bwd.saved)
    saved_product = next(n for n in bwd.saved if n.op == "linear")  # the layer norm's pre-norm input
    line = next(ln for ln in dot.splitlines() if ln.strip().startswith(f"n{saved_product.id} "))
    assert "box3d" not in line


def test_backward_picture_draws_the_weight_gradient_gemm_after_the_loop_and_the_state_gradient_passed_back():
    _, dot = _backward_picture(sg.cells.gru(4, 6))
    after = dot[dot.index("subgraph cluster_after"):]
    assert "GEMM linear_wgrad" in after[:after.index("}")]
    assert "to the step before" in dot


def test_backward_picture_of_a_model_without_a_generated_backward_says_why(monkeypatch):
    import dataclasses
    from seqgraph.compiler.ops import REGISTRY
    sg.compiled.clear_cache()
    for op in ("sum_to", "linear_wgrad", "embedding_wgrad"):  # pretend no weight gradient can be reduced
        monkeypatch.setitem(REGISTRY, op, dataclasses.replace(REGISTRY[op], sums_rows=False))
    comp = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="torch")
    try:
        with pytest.raises(ValueError, match=r"no generated backward to draw: it trains through autograd over the "
                                             r"reference loop, because the derivative reduces over steps"):
            sg.to_dot(comp, backward=True)
    finally:
        sg.compiled.clear_cache()


def test_backward_picture_of_an_sg_nn_layer_names_the_recurrences_to_draw():
    with pytest.raises(ValueError, match=r"draw one of them: model.recurrence\(0\)"):
        sg.to_dot(sg.nn.LSTM(3, 4), backward=True)


def test_backward_picture_of_an_uncompiled_recurrence_says_to_compile_it_and_a_container_what_to_draw():
    rec = sg.Recurrence(sg.cells.gru(3, 4))
    with pytest.raises(ValueError, match=r"compile it first: sg.to_dot\(sg.compile\(model\), backward=True\)"):
        sg.to_dot(rec, backward=True)
    with pytest.raises(ValueError, match=r"draw one of them: sg.compile\(model\[0\]\), model\[1\]$"):
        sg.to_dot(torch.nn.Sequential(rec, sg.compile(sg.Recurrence(sg.cells.gru(4, 4)))), backward=True)


def test_backward_picture_is_only_of_a_compiled_model():
    with pytest.raises(ValueError, match=r"backward=True draws the backward plan of a compiled model .*got Recurrence"):
        sg.to_dot(sg.Recurrence(sg.cells.gru(4, 6)), backward=True)
    with pytest.raises(ValueError, match="without unroll or compact"):
        sg.to_dot(sg.compile(sg.Recurrence(sg.cells.gru(4, 6))), backward=True, unroll=2)


def test_an_nngraph_style_lstm_compiles_and_equals_the_reference():
    rec = sg.Recurrence(_nngraph_lstm(3, 7)).double()
    comp = sg.compile(rec)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(comp(x)[0], rec(x)[0])
