"""seqgraph/compiler/derive_backward.py: one step's symbolic derivative, checked against autograd."""
import torch

import seqgraph as sg
from seqgraph.compiler.derive_backward import derive_backward
from seqgraph.compiler.interpret import evaluate
from seqgraph.compiler.ir import topo_order

DT = torch.float64


def _step():
    """h' = tanh(x + h * w) + h, written over a per-step read x and an invariant read w."""
    x, h, w = sg.Input(3, name="x"), sg.State(3, name="h"), sg.Parameter(3, name="w")
    nxt = sg.tanh(x + h * w) + h
    loop = [n for n in topo_order([nxt]) if n.inputs]
    return x, h, w, nxt, loop


def _vjp(deriv, leaves, roots):
    order = topo_order(roots)
    return evaluate(order, leaves, dtype=DT, device=torch.device("cpu"))


def test_the_derivative_of_a_step_equals_autograds_vector_jacobian_product():
    x, h, w, nxt, loop = _step()
    deriv = derive_backward(loop, [(h, nxt)], [], [x, w], masked=False)
    vx, vh, vw, g = (torch.randn(2, 3, dtype=DT, requires_grad=True), torch.randn(2, 3, dtype=DT, requires_grad=True),
                     torch.randn(3, dtype=DT, requires_grad=True), torch.randn(2, 3, dtype=DT))
    want = torch.autograd.grad(torch.tanh(vx + vh * vw) + vh, [vx, vh, vw], g)
    roots = [deriv.grad_of[x.id], deriv.grad_prev[0], deriv.grad_of[w.id]]
    env = _vjp(deriv, {x.id: vx, h.id: vh, w.id: vw, deriv.grad_next[0].id: g}, roots)
    got = [env[r.id] for r in roots]
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])  # summed over the batch by the rule itself (sum_to)


def test_on_a_padded_row_the_state_gradient_passes_through_and_nothing_else_flows():
    x, h, w, nxt, loop = _step()
    deriv = derive_backward(loop, [(h, nxt)], [], [x, w], masked=True)
    vx, vh, vw = torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT), torch.randn(3, dtype=DT)
    g = torch.randn(2, 3, dtype=DT)
    mask = torch.tensor([[1.0], [0.0]], dtype=DT)  # row 1 is padding
    roots = [deriv.grad_of[x.id], deriv.grad_prev[0]]
    env = _vjp(deriv, {x.id: vx, h.id: vh, w.id: vw, deriv.grad_next[0].id: g, deriv.mask.id: mask}, roots)
    gx, gh = env[roots[0].id], env[roots[1].id]
    assert torch.equal(gx[1], torch.zeros(3, dtype=DT))
    assert torch.equal(gh[1], g[1])


def test_the_gradients_of_disjoint_chunk_pieces_are_one_concat_not_a_sum_of_padded_pieces():
    x, h = sg.Input(4, name="x"), sg.State(2, name="h")
    a, b = sg.chunk(x, 2)
    nxt = sg.tanh(a) + sg.sigmoid(b) * h
    loop = [n for n in topo_order([nxt]) if n.inputs and n.op != "input"]
    deriv = derive_backward(loop, [(h, nxt)], [], [x], masked=False)
    g = deriv.grad_of[x.id]
    assert g.op == "concat" and not any(n.op == "add" and "pad" in {i.op for i in n.inputs} for n in topo_order([g]))


def test_under_a_mask_the_gradient_leaving_to_a_weight_and_to_a_read_is_one_value():
    # an LSTM's gate gradient goes to the hoisted input projection (a read) and to the
    # recurrent weight's sum over rows: one masked node, so the backward stores it once
    plan = sg.compile(sg.Recurrence(sg.cells.lstm(3, 4)), backend="torch").plan()
    bwd = plan.backward_plan(True)
    hoisted = next(r for r in plan.reads if r.batched)
    gate_grad = bwd.deriv.grad_of[hoisted.id]
    wgrad = next(n for n in bwd.post if n.op == "linear_wgrad")
    assert gate_grad.op == "select" and wgrad.inputs[0] is gate_grad
    assert [n for n in bwd.stash if n.op == "select"] == [gate_grad]


def test_each_derivative_node_names_the_user_line_of_the_value_it_differentiates():
    x, h, w = sg.Input(3, name="x"), sg.State(3, name="h"), sg.Parameter(3, name="w")
    pre = x + h * w
    nxt = sg.tanh(pre)  # built on a line of its own
    loop = [n for n in topo_order([nxt]) if n.inputs]
    deriv = derive_backward(loop, [(h, nxt)], [], [x, w], masked=False)
    made = [n for n in topo_order([deriv.grad_prev[0], deriv.grad_of[w.id]]) if n.op != "input" and n.inputs]
    tanh_grads = [n for n in made if n.op == "tanh_grad"]
    assert tanh_grads and all(n.site == nxt.site for n in tanh_grads)
    assert {n.site for n in made} <= {pre.site, nxt.site, pre.inputs[1].site}
