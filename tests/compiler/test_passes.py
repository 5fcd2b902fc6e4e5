"""Each compiler pass: structure first, then numbers against the reference."""
import pytest
import torch

import seqgraph as sg
from seqgraph.compiler.fuse_gate_matmuls import fuse_gate_matmuls
from seqgraph.compiler.hoist import classify
from seqgraph.compiler.hoist_loop_invariant_terms import hoist_loop_invariant_terms
from seqgraph.compiler.split_linear_over_concat import split_linear_over_concat
from seqgraph.compiler.interpret import evaluate
from seqgraph.compiler.simplify import simplify
from seqgraph.compiler.stepgraph import StepGraph


def _values(step, cell, B=3):
    torch.manual_seed(0)
    leaves = {}
    for n in cell.order:
        if n.op in ("input", "state", "context"):
            leaves[n.id] = torch.randn((B,) + n.shape, dtype=torch.float64)
        elif n.op == "param":
            leaves[n.id] = torch.randn(n.shape, dtype=torch.float64)
    env = evaluate(step.order(), leaves, dtype=torch.float64, device=torch.device("cpu"))
    return [env[r.id] for r in step.results]


def _same_values(before, after, cell):
    for a, b in zip(_values(before, cell), _values(after, cell)):
        torch.testing.assert_close(b, a)


def _cell_with_redundancy():
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    a = sg.tanh(x * 1.0 + h) + (2.0 * 3.0) * sg.tanh(x + h - 0.0)
    return sg.Cell([x], {h: a})


def test_simplify_merges_common_subexpressions_and_drops_identities():
    cell = _cell_with_redundancy()
    before = StepGraph.from_cell(cell)
    after = simplify(before)
    assert sum(n.op == "tanh" for n in after.order()) == 1
    assert not any(n.op == "sub" for n in after.order())
    consts = [n.attrs["value"] for n in after.order() if n.op == "const"]
    assert consts == [6.0]
    _same_values(before, after, cell)


def test_split_linear_over_concat_separates_input_and_state_parts():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(8, 5)(sg.concat([x, h])))})
    before = StepGraph.from_cell(cell)
    after = split_linear_over_concat(before)
    lins = [n for n in after.order() if n.op == "linear"]
    assert sorted(n.inputs[0].name for n in lins) == ["h", "x"]
    cls = classify(after.order())
    assert {cls[n.id] for n in lins} == {"hoisted", "step"}
    _same_values(before, after, cell)


def test_fuse_gate_matmuls_concatenates_weights_of_linears_sharing_an_operand():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    gates = [sg.Linear(5, 5, name=f"g{k}")(h) for k in range(3)]
    cell = sg.Cell([x], {h: sg.tanh(gates[0] + sg.Linear(3, 5)(x)) * gates[1] + gates[2]})
    before = StepGraph.from_cell(cell)
    after = fuse_gate_matmuls(before)
    lins = [n for n in after.order() if n.op == "linear" and n.inputs[0].op == "state"]
    assert len(lins) == 1 and lins[0].shape == (15,)
    _same_values(before, after, cell)


def test_hoist_loop_invariant_terms_moves_bias_next_to_the_input_projection():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    b = sg.Parameter(5, name="b")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(3, 5, bias=False)(x) + sg.Linear(5, 5, bias=False)(h) + b)})
    before = StepGraph.from_cell(cell)
    after = hoist_loop_invariant_terms(before)
    cls = classify(after.order())
    step_adds = [n for n in after.order() if n.op == "add" and cls[n.id] == "step"]
    assert len(step_adds) == 1  # only hoisted + h W_h is left in the loop
    _same_values(before, after, cell)


def test_hoist_loop_invariant_terms_sums_the_biases_once_before_adding_them_to_the_projection():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(3, 5)(x) + sg.Linear(5, 5)(h))})  # a bias on each side
    before = StepGraph.from_cell(cell)
    after = hoist_loop_invariant_terms(before)
    cls = classify(after.order())
    hoisted_adds = [n for n in after.order() if n.op == "add" and cls[n.id] == "hoisted"]
    assert len(hoisted_adds) == 1 and hoisted_adds[0].inputs[0].op == "linear"  # x W + (b_x + b_h)
    biases = hoisted_adds[0].inputs[1]
    assert biases.op == "add" and [i.op for i in biases.inputs] == ["param", "param"]
    _same_values(before, after, cell)


# -- rematerialize: forward values the backward step recomputes instead of saving --------
def _chain_cell(length):
    """y = (((h + 1) * 1.5) + 1) * 1.5 ... (`length` cheap ops from the state), and z = y * y, whose
    derivative reads y."""
    x, h = sg.Input(3, name="x"), sg.State(3, name="h")
    y = h
    for k in range(length):
        y = y + 1.0 if k % 2 == 0 else y * 1.5
    z = y * y
    return sg.Cell([x], {h: sg.tanh(x + z)})


def test_rematerialize_recomputes_the_layer_norms_of_a_layer_norm_lstm_from_saved_values():
    from seqgraph.compiler.pipeline import compile_plan
    plan = compile_plan(sg.cells.lstm(4, 6, layer_norm=True))
    for masked in (False, True):
        bwd = plan.backward_plan(masked)
        assert not any(n.op == "layer_norm" for n in bwd.saved)
        assert [n.op for n in bwd.recomputed].count("layer_norm") == 2
        have = {n.id for n in bwd.saved} | {r.id for r in plan.reads} | {p.id for p, _ in plan.step.states} \
            | {n.id for n in bwd.recomputed}
        for n in bwd.recomputed:  # made from values the backward step has
            assert all(i.op == "const" or i.id in have for i in n.inputs), n
        assert bwd.loop[:len(bwd.recomputed)] == bwd.recomputed  # computed first in the backward step


def test_rematerialize_keeps_values_made_by_transcendental_functions_saved():
    from seqgraph.compiler.pipeline import compile_plan
    bwd = compile_plan(sg.cells.lstm(4, 6, peephole=True)).backward_plan(False)
    assert sorted(n.op for n in bwd.saved) == ["sigmoid", "sigmoid", "sigmoid", "tanh", "tanh"]
    assert bwd.recomputed and {n.op for n in bwd.recomputed} <= {"add", "mul"}  # the new cell state


def test_rematerialize_recomputes_a_chain_within_its_budget_and_saves_a_longer_one():
    from seqgraph.compiler.pipeline import compile_plan
    short = compile_plan(_chain_cell(3)).backward_plan(False)
    assert [n.op for n in short.recomputed] == ["add", "mul", "add"]
    assert not any(n.op in ("add", "mul") for n in short.saved)
    long = compile_plan(_chain_cell(7)).backward_plan(False)
    assert not long.recomputed and [n.op for n in long.saved].count("add") == 1  # y itself, saved


def test_rematerialize_keeps_what_it_is_told_to_keep():
    from seqgraph.compiler.ops import fusable
    from seqgraph.compiler.rematerialize import rematerialize
    x, h = sg.Input(3, name="x"), sg.State(3, name="h")
    a = h * 2.0
    cell = sg.Cell([x], {h: sg.tanh(a * a + x)})
    loop = StepGraph.from_cell(cell).order()
    (mul,) = [n for n in loop if n.id == a.id]
    state = next(n for n in loop if n.op == "state")
    assert rematerialize(loop, [mul], {state.id}, set(), fusable) == ([], [mul])
    assert rematerialize(loop, [mul], {state.id}, {mul.id}, fusable) == ([mul], [])
    assert rematerialize(loop, [mul], set(), set(), fusable) == ([mul], [])  # h is not at hand


def test_recomputed_values_give_the_reference_gradients():
    rec = sg.Recurrence(sg.cells.lstm(3, 5, layer_norm=True, peephole=True)).double()
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 2, 0, 5])
    for backend in ("torch", "cpu"):
        comp = sg.compile(rec, backend=backend)
        assert comp.plan().backward_plan(True).recomputed
        o1, s1 = rec(x, lengths=lengths)
        o2, s2 = comp(x, lengths=lengths)
        torch.testing.assert_close(o2, o1)
        w = [x, *rec.parameters()]
        g1 = torch.autograd.grad((o1 * o1).sum() + s1["c"].sum(), w)
        g2 = torch.autograd.grad((o2 * o2).sum() + s2["c"].sum(), w)
        for a, b in zip(g2, g1):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_values_a_comparison_of_the_derivative_reads_stay_saved_and_ties_split_as_in_the_reference():
    # a = h*w + x: recomputed, a compiler may fuse the multiply-add in one rounding where the
    # forward kernel rounded twice; maximum(a, relu(a)) ties exactly wherever a > 0, and its
    # derivative splits the gradient there only if it sees the very value the forward saw
    from seqgraph.compiler.pipeline import compile_plan
    H = 16
    x, h = sg.Input(H, name="x"), sg.State(H, name="h")
    w = sg.Parameter(H, name="w")
    m = h * w
    a = m + x
    y = sg.maximum(a, sg.stop_gradient(sg.relu(a)))
    cell = sg.Cell([x], {h: sg.tanh(0.5 * y + sg.tanh(m))}, [h])
    bwd = compile_plan(cell).backward_plan(False)
    assert a.id in {n.id for n in bwd.saved} and a.id not in {n.id for n in bwd.recomputed}
    torch.manual_seed(0)
    rec = sg.Recurrence(cell).double()
    X = torch.randn(3, 4, H, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, H, dtype=torch.float64)
    for backend in ("torch", "cpu"):
        comp = sg.compile(rec, backend=backend)
        g1 = torch.autograd.grad(rec(X, {"h": h0})[0].sum(), [X, *rec.parameters()])
        g2 = torch.autograd.grad(comp(X, {"h": h0})[0].sum(), [X, *rec.parameters()])
        for p, q in zip(g2, g1):
            torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_zero_and_negative_zero_constants_stay_apart(backend):
    # 1 / (0 * x) and 1 / (-0 * x) are +inf and -inf for positive x: merging the two zeros,
    # or sharing compiled code between the two cells, would flip one sign
    def run(zero):
        x = sg.Input(3, name="x")
        y = sg.Input(3, name="y")
        cell = sg.Cell([x, y], outputs=[1.0 / (x * 0.0) + 1.0 / (y * zero)])
        rec = sg.Recurrence(cell) if backend == "reference" else sg.compile(sg.Recurrence(cell), backend=backend)
        return rec((torch.ones(1, 1, 3), torch.ones(1, 1, 3)))[0]
    assert (run(0.0) == float("inf")).all()  # +inf + +inf
    assert torch.isnan(run(-0.0)).all()  # +inf + -inf
