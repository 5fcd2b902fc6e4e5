"""Planning step rematerialize: forward values the backward step recomputes instead of saving."""
import torch

import seqgraph as sg
from seqgraph.compiler.stepgraph import StepGraph


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


def test_rematerialize_recomputes_gates_made_from_the_loops_reads_alone():
    from seqgraph.compiler.pipeline import compile_plan
    plan = compile_plan(sg.cells.qrnn(4, 6), fused_loop=True)  # the gates in the loop, over the product's rows
    for masked in (False, True):
        bwd = plan.backward_plan(masked)
        assert bwd.saved == []
        assert {"sigmoid", "tanh"} <= {n.op for n in bwd.recomputed}
        assert {r.id for r in plan.reads} <= bwd.reads_used  # the product's rows, read back instead


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
