"""The DSL: operators and nngraph modules build the same graphs, names, parameter sharing,
sg.Graph inlining, and the broadcasting rules (dims never include the batch)."""
from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import torch

import seqgraph as sg

DT = torch.float64


def run_once(cell: sg.Cell, *xs: torch.Tensor, rec: sg.Recurrence | None = None):
    """One step of `cell` on (B, ...) inputs through the reference Recurrence; returns its outputs."""
    rec = rec or sg.Recurrence(cell).double()
    out, _ = rec(tuple(x.unsqueeze(0) for x in xs))
    return tuple(o[0] for o in out) if isinstance(out, tuple) else out[0]


def gru_with_modules(I=3, H=4):
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    xh = sg.Concat()([x, h])
    z = sg.Sigmoid()(sg.Linear(I + H, H, name="update")(xh))
    r = sg.Sigmoid()(sg.Linear(I + H, H, name="reset")(xh))
    cand = sg.Tanh()(sg.Linear(I + H, H, name="candidate")(sg.Concat()([x, sg.CMul()([r, h])])))
    h_next = sg.CAdd()([sg.CMul()([1 - z, h]), sg.CMul()([z, cand])])
    return sg.Cell(inputs=[x], states={h: h_next})


def gru_with_operators(I=3, H=4):
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    xh = sg.concat([x, h])
    z = sg.sigmoid(sg.Linear(I + H, H, name="update")(xh))
    r = sg.sigmoid(sg.Linear(I + H, H, name="reset")(xh))
    cand = sg.tanh(sg.Linear(I + H, H, name="candidate")(sg.concat([x, r * h])))
    h_next = (1 - z) * h + z * cand
    return sg.Cell(inputs=[x], states={h: h_next})


# ---------------------------------------------------------------------------------------
# operators and modules
# ---------------------------------------------------------------------------------------
def test_operators_build_the_same_graph_as_module_calls():
    assert gru_with_modules().signature() == gru_with_operators().signature()


def test_operator_and_module_cells_compute_the_same():
    a = sg.Recurrence(gru_with_modules()).double()
    b = sg.Recurrence(gru_with_operators()).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 2, 3, dtype=DT)
    torch.testing.assert_close(a(x)[0], b(x)[0])


def test_python_numbers_on_either_side_of_an_operator():
    x = sg.Input(3, name="x")
    outs = [2 - x, x - 2, 1 / (x * x + 1), x / 4, -x, 3 * x, x + 0.5]
    cell = sg.Cell(inputs=[x], outputs=outs)
    v = torch.randn(2, 3, dtype=DT)
    got = run_once(cell, v)
    want = [2 - v, v - 2, 1 / (v * v + 1), v / 4, -v, 3 * v, v + 0.5]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_matmul_operator_is_sg_matmul():
    a, b = sg.Input((2, 3), name="a"), sg.Input((3, 4), name="b")
    assert sg.Cell(inputs=[a, b], outputs=[a @ b]).signature() == \
        sg.Cell(inputs=[a, b], outputs=[sg.matmul(a, b)]).signature()


def test_bool_and_strings_are_not_numbers():
    x = sg.Input(3, name="x")
    with pytest.raises(TypeError):
        x + True
    with pytest.raises(TypeError):
        x * "2"


def test_dropout_with_p_zero_is_the_identity_node():
    x = sg.Input(3, name="x")
    assert sg.dropout(x, 0.0) is x


# ---------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------
def test_named_sets_the_name_and_returns_the_node():
    x = sg.Input(3)
    y = sg.tanh(x)
    assert y.named("squashed") is y and y.name == "squashed"


def test_names_appear_in_the_dump():
    x = sg.Input(3, name="tokens")
    cell = sg.Cell(inputs=[x], outputs=[sg.tanh(x).named("squashed")])
    assert "squashed @ test_dsl.py:" in cell.dump() and "tokens @" in cell.dump()


def test_functions_take_a_name():
    x = sg.Input(3)
    assert sg.softmax(x, name="attn").name == "attn"
    assert sg.sum(x, name="total").name == "total"


def test_unnamed_leaves_get_numbered_names():
    x1, x2, h = sg.Input(3), sg.Input(3), sg.State(3)
    cell = sg.Cell(inputs=[x1, x2], states={h: x1 + x2 + h})
    assert [x.name for x in cell.inputs] == ["input_0", "input_1"]
    assert cell.state_names == ["state_0"]


def test_numbered_names_skip_names_the_user_took():
    x1, x2 = sg.Input(3, name="input_0"), sg.Input(3)
    cell = sg.Cell(inputs=[x1, x2], outputs=[x1 + x2])
    assert [x.name for x in cell.inputs] == ["input_0", "input_1"]


def test_parameter_keys_come_from_module_names():
    x = sg.Input(3, name="x")
    peep = sg.Parameter(4, name="peep")
    y = sg.Linear(3, 4, name="gate")(x) * peep + sg.Linear(3, 4)(x) + sg.Linear(3, 4)(x)
    cell = sg.Cell(inputs=[x], outputs=[y])
    assert sorted(cell.params) == ["gate.bias", "gate.weight", "linear.bias", "linear.weight",
                                   "linear_1.bias", "linear_1.weight", "peep"]
    rec = sg.Recurrence(cell)
    assert "params.gate.weight" in rec.state_dict() and rec.params.gate.weight.shape == (4, 3)



def test_generated_module_names_skip_a_name_the_user_gave_later_in_the_graph():
    x = sg.Input(4, name="x")
    y = sg.Linear(4, 4)(x) + sg.Linear(4, 4)(x) + sg.Linear(4, 4, name="linear_1")(x)
    cell = sg.Cell(inputs=[x], outputs=[y])
    assert list(cell.params) == ["linear.weight", "linear.bias", "linear_2.weight", "linear_2.bias",
                                 "linear_1.weight", "linear_1.bias"]


def test_two_modules_the_user_named_alike_are_a_wiring_error():
    x = sg.Input(4, name="x")
    y = sg.Linear(4, 4, name="gate")(x) + sg.Linear(4, 4, name="gate")(x)
    with pytest.raises(sg.WiringError, match=r"two modules are named 'gate': one declared at test_dsl.py:\d+"):
        sg.Cell(inputs=[x], outputs=[y])


def test_a_parameter_named_like_a_module_is_a_wiring_error():
    x = sg.Input(4, name="x")
    y = sg.Linear(4, 4, name="gate")(x) * sg.Parameter(4, name="gate")
    with pytest.raises(sg.WiringError, match=r"parameter 'gate' has the name of the Linear declared at "
                                             r"test_dsl.py:\d+, whose parameters are 'gate.\*'"):
        sg.Cell(inputs=[x], outputs=[y])


@pytest.mark.parametrize("name", ["keys", "items", "update"])
def test_a_learned_state_named_like_a_parameter_dict_method_is_a_wiring_error(name):
    x, s = sg.Input(4, name="x"), sg.State(4, name=name, init="learned")
    with pytest.raises(sg.WiringError, match=rf"learned State name '{name}' is taken by torch.nn.ParameterDict"):
        sg.Cell(inputs=[x], states={s: sg.tanh(x + s)})


def test_a_state_name_a_parameter_dict_owns_is_fine_without_a_learned_init():
    x, s = sg.Input(4, name="x"), sg.State(4, name="keys")
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={s: sg.tanh(x + s)}))
    assert set(rec(torch.randn(2, 1, 4))[1]) == {"keys"}


@pytest.mark.parametrize("states", ["list_of_states", "one_state"])
def test_states_given_as_states_not_pairs_say_what_states_takes(states):
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    with pytest.raises(sg.WiringError, match=r"states= must be a dict from each sg.State to its next value "
                                             r"\(\{h: h_next\}\) or a list of \(state, next value\) pairs, "
                                             r"got State 'h'"):
        sg.Cell(inputs=[x], states=[h] if states == "list_of_states" else h)


def test_states_given_as_a_list_of_pairs_build_the_same_cell_as_a_dict():
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    h_next = sg.tanh(x + h)
    assert sg.Cell(inputs=[x], states=[(h, h_next)]).signature() == sg.Cell(inputs=[x], states={h: h_next}).signature()



@pytest.mark.parametrize("padding_idx", [4, -1])
def test_embedding_padding_row_starts_at_zeros_and_a_negative_index_counts_from_the_end(padding_idx):
    tok, h = sg.Input((), dtype="long", name="tok"), sg.State(3, name="h")
    emb = sg.Embedding(5, 3, padding_idx=padding_idx, name="emb")
    rec = sg.Recurrence(sg.Cell(inputs=[tok], states={h: h + emb(tok)}))
    assert emb.padding_idx == 4
    assert torch.equal(rec.params.emb.weight[4], torch.zeros(3)) and rec.params.emb.weight[:4].abs().sum() > 0
    out, _ = rec(torch.tensor([[4], [1]]))
    assert torch.equal(out[0], torch.zeros(1, 3)) and torch.equal(out[1, 0], rec.params.emb.weight[1])


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_embedding_reads_a_padding_row_it_was_given_and_gives_it_no_gradient_as_torch_does(backend):
    tok, h = sg.Input((), dtype="long", name="tok"), sg.State(3, name="h")
    rec = sg.Recurrence(sg.Cell(inputs=[tok], states={h: sg.tanh(h + sg.Embedding(5, 3, padding_idx=0, name="emb")(tok))}))
    theirs = torch.nn.Embedding(5, 3, padding_idx=0)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(5, 3))  # a padding vector of the user's own (torch reads it)
        rec.params.emb.weight.copy_(theirs.weight)
    ids = torch.tensor([[0, 2], [3, 0], [0, 0]])
    with pytest.warns(UserWarning, match="padding id 0 at the last step"):  # (here meant as real steps)
        out, _ = sg.compile(rec, backend=backend)(ids)
    h_, want = torch.zeros(2, 3), []
    for t in range(3):
        h_ = torch.tanh(h_ + theirs(ids[t]))
        want.append(h_)
    torch.testing.assert_close(out, torch.stack(want))
    g, = torch.autograd.grad(out.sum(), rec.params.emb.weight)
    gt, = torch.autograd.grad(torch.stack(want).sum(), theirs.weight)
    torch.testing.assert_close(g, gt)
    assert torch.equal(g[0], torch.zeros(3))


@pytest.mark.parametrize("padding_idx", [5, -6, 1.0])
def test_embedding_padding_idx_outside_the_table_is_refused(padding_idx):
    with pytest.raises(ValueError, match=r"padding_idx must be an integer in \[-5, 5\) \(num = 5\)"):
        sg.Embedding(5, 3, padding_idx=padding_idx)


# ---------------------------------------------------------------------------------------
# sharing
# ---------------------------------------------------------------------------------------
def shared_linear_cell():
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    shared = sg.Linear(4, 4, name="shared")
    h_next = sg.tanh(shared(x) + shared(h))
    return sg.Cell(inputs=[x], states={h: h_next})


def _shared_reference(x, w_x, b_x, w_h, b_h):
    h = torch.zeros(x.shape[1], 4, dtype=DT)
    outs = []
    for t in range(x.shape[0]):
        h = torch.tanh(x[t] @ w_x.t() + b_x + h @ w_h.t() + b_h)
        outs.append(h)
    return torch.stack(outs)


def test_module_called_twice_has_one_weight():
    cell = shared_linear_cell()
    assert sorted(cell.params) == ["shared.bias", "shared.weight"]
    assert len(list(sg.Recurrence(cell).parameters())) == 2


def test_shared_weight_receives_the_sum_of_both_gradients():
    rec = sg.Recurrence(shared_linear_cell()).double()
    x = torch.randn(4, 2, 4, dtype=DT)
    out, _ = rec(x)
    out.pow(2).sum().backward()
    w, b = rec.params.shared.weight, rec.params.shared.bias
    # each use alone: the other use sees a detached copy
    w1, b1 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    _shared_reference(x, w1, b1, w.detach(), b.detach()).pow(2).sum().backward()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    _shared_reference(x, w.detach(), b.detach(), w2, b2).pow(2).sum().backward()
    torch.testing.assert_close(w.grad, w1.grad + w2.grad)
    torch.testing.assert_close(b.grad, b1.grad + b2.grad)
    assert not torch.allclose(w1.grad, w2.grad)  # the two uses really differ


# ---------------------------------------------------------------------------------------
# sg.Graph
# ---------------------------------------------------------------------------------------
def squash_graph():
    a = sg.Input(4, name="a")
    lin = sg.Linear(4, 4, name="squash")
    return sg.Graph([a], sg.tanh(lin(a)), name="squash")


def test_graph_called_in_a_cell_is_inlined():
    g = squash_graph()
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    cell = sg.Cell(inputs=[x], states={h: g(x) + g(h)})
    ops = [n.op for n in cell.order]
    assert ops.count("linear") == 2 and ops.count("tanh") == 2
    assert sorted(cell.params) == ["squash.bias", "squash.weight"]


def test_graph_inside_a_cell_computes_its_body():
    g = squash_graph()
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={h: g(x) + g(h)})).double()
    xs = torch.randn(3, 2, 4, dtype=DT)
    out, _ = rec(xs)
    w, b = rec.params.squash.weight, rec.params.squash.bias
    hh = torch.zeros(2, 4, dtype=DT)
    for t in range(3):
        hh = torch.tanh(xs[t] @ w.t() + b) + torch.tanh(hh @ w.t() + b)
        torch.testing.assert_close(out[t], hh)


def test_graph_with_several_inputs_and_outputs():
    a, b = sg.Input(3, name="a"), sg.Input(3, name="b")
    g = sg.Graph([a, b], [a * b, a - b])
    x, y = sg.Input(3, name="x"), sg.Input(3, name="y")
    prod, diff = g([x, y])
    cell = sg.Cell(inputs=[x, y], outputs=[prod, diff])
    vx, vy = torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT)
    got = run_once(cell, vx, vy)
    torch.testing.assert_close(got[0], vx * vy)
    torch.testing.assert_close(got[1], vx - vy)


def test_graph_called_on_a_parameter_stays_unbatched():
    a = sg.Input(4, name="a")
    g = sg.Graph([a], a * 2)
    node = g(sg.Parameter(4, name="w"))
    assert node.batched is False and node.shape == (4,)


def test_graph_with_dropout_draws_a_mask_per_example_where_it_is_inlined():
    a = sg.Input(64, name="a")
    g = sg.Graph([a], sg.dropout(a, 0.5))
    x = sg.Input(64, name="x")
    cell = sg.Cell(inputs=[x], outputs=[g(x)])
    assert [n.batched for n in cell.order if n.op == "noise"] == [True]
    out = run_once(cell, torch.ones(2, 64, dtype=DT))
    assert not torch.equal(out[0], out[1])  # one mask for both rows: 2^-64


def test_graph_with_chunk_pieces_can_be_called_twice_in_one_cell():
    a = sg.Input(8, name="a")
    p, q = sg.chunk(a, 2)
    glu = sg.Graph([a], sg.tanh(p) * sg.sigmoid(q), name="glu")
    x, y = sg.Input(8, name="x"), sg.Input(8, name="y")
    cell = sg.Cell(inputs=[x, y], outputs=[glu(x) + glu(y)])
    vx, vy = torch.randn(2, 8, dtype=DT), torch.randn(2, 8, dtype=DT)
    want = sum(torch.tanh(v[:, :4]) * torch.sigmoid(v[:, 4:]) for v in (vx, vy))
    torch.testing.assert_close(run_once(cell, vx, vy), want)


def test_graph_body_is_not_changed_by_calls():
    g = squash_graph()
    before = [n.id for n in g.order]
    g(sg.Input(4, name="x"))
    assert [n.id for n in g.order] == before


# ---------------------------------------------------------------------------------------
# broadcasting: dims exclude the batch
# ---------------------------------------------------------------------------------------
def test_per_feature_parameter_broadcasts_over_the_batch():
    x = sg.Input(4, name="x")
    gain = sg.Parameter(4, name="gain", init=lambda t: t.copy_(torch.arange(1.0, 5.0)))
    y = x * gain
    assert (y.shape, y.batched) == ((4,), True)
    v = torch.randn(3, 4, dtype=DT)
    torch.testing.assert_close(run_once(sg.Cell(inputs=[x], outputs=[y]), v),
                               v * torch.arange(1.0, 5.0, dtype=DT))


def test_scalar_constant_broadcasts_over_features_and_batch():
    x = sg.Input((2, 3), name="x")
    y = 1 - x
    assert (y.shape, y.batched) == ((2, 3), True)
    v = torch.randn(4, 2, 3, dtype=DT)
    torch.testing.assert_close(run_once(sg.Cell(inputs=[x], outputs=[y]), v), 1 - v)


def test_per_example_scalar_broadcasts_over_features():
    gate, x = sg.Input((), name="gate"), sg.Input(3, name="x")
    y = gate * x
    assert y.shape == (3,)
    g, v = torch.randn(2, dtype=DT), torch.randn(2, 3, dtype=DT)
    torch.testing.assert_close(run_once(sg.Cell(inputs=[gate, x], outputs=[y]), g, v), g[:, None] * v)


def test_lower_rank_input_aligns_with_trailing_per_example_dims():
    row, grid = sg.Input(4, name="row"), sg.Input((3, 4), name="grid")
    y = row + grid
    assert y.shape == (3, 4)
    r, g = torch.randn(2, 4, dtype=DT), torch.randn(2, 3, 4, dtype=DT)
    torch.testing.assert_close(run_once(sg.Cell(inputs=[row, grid], outputs=[y]), r, g), r[:, None, :] + g)


def test_parameter_matrix_times_input_row():
    x = sg.Input(4, name="x")
    w = sg.Parameter((3, 4), name="w")
    y = w * x
    assert (y.shape, y.batched) == ((3, 4), True)
    rec = sg.Recurrence(sg.Cell(inputs=[x], outputs=[y])).double()
    v = torch.randn(2, 4, dtype=DT)
    torch.testing.assert_close(run_once(rec.cell, v, rec=rec), rec.params.w[None] * v[:, None, :])


def test_shapes_that_do_not_broadcast_raise():
    with pytest.raises(sg.ShapeError, match=r"cannot broadcast shapes \(4,\) and \(3,\)"):
        sg.Input(4) * sg.Parameter(3)


def test_reduction_dims_count_per_example_dims():
    x = sg.Input((3, 4), name="x")
    s0, s1 = sg.sum(x, dim=0), sg.mean(x, dim=-1, keepdim=True)
    assert (s0.shape, s1.shape) == ((4,), (3, 1))
    v = torch.randn(2, 3, 4, dtype=DT)
    got = run_once(sg.Cell(inputs=[x], outputs=[s0, s1]), v)
    torch.testing.assert_close(got[0], v.sum(1))
    torch.testing.assert_close(got[1], v.mean(2, keepdim=True))


def test_layout_functions_work_on_per_example_dims():
    x = sg.Input((2, 3), name="x")
    outs = [sg.transpose(x), sg.reshape(x, (6,)), sg.unsqueeze(x, 0), sg.squeeze(sg.unsqueeze(x, -1), -1),
            sg.softmax(x, dim=0), sg.concat([x, x], dim=0)]
    assert [o.shape for o in outs] == [(3, 2), (6,), (1, 2, 3), (2, 3), (2, 3), (4, 3)]
    v = torch.randn(5, 2, 3, dtype=DT)
    got = run_once(sg.Cell(inputs=[x], outputs=outs), v)
    want = [v.transpose(1, 2), v.reshape(5, 6), v[:, None], v, torch.softmax(v, 1), torch.cat([v, v], 1)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("make", [lambda x: sg.unsqueeze(x, 3), lambda x: sg.unsqueeze(x, -4),
                                  lambda x: sg.transpose(x, 0, 2), lambda x: sg.squeeze(x, 5),
                                  lambda x: sg.chunk(x, 2, dim=2)])
def test_a_dim_out_of_range_names_the_function_and_the_line(make):
    x = sg.Input((2, 4), name="x")
    with pytest.raises(sg.ShapeError, match=r"^\w+ \(declared at .*test_dsl.py:\d+.*\): dim -?\d+ is out of range"):
        make(x)


def test_an_unsqueeze_out_of_range_counts_the_operands_dims_and_names_the_range():
    with pytest.raises(sg.ShapeError, match=r"dim 3 is out of range for a value with 1 per-example dim "
                                            r"\(the new dim goes at -2 to 1\)"):
        sg.unsqueeze(sg.Input(4, name="x"), 3)


def test_a_dim_out_of_range_names_the_dims_a_value_has():
    with pytest.raises(sg.ShapeError, match=r"dim 2 is out of range for a value with 2 per-example dims \(dims -2 to 1\)"):
        sg.softmax(sg.Input((2, 4), name="x"), dim=2)


@pytest.mark.parametrize("length", [0, -2])
def test_a_narrow_of_no_positive_length_names_its_length(length):
    with pytest.raises(sg.ShapeError, match=rf"slice \[2:{2 + length}\] of dim 0 has length {length}; a slice "
                                            r"needs a positive length"):
        sg.narrow(sg.Input(5, name="x"), -1, 2, length)


def test_a_split_with_a_piece_of_size_zero_says_so():
    with pytest.raises(sg.ShapeError, match=r"include a piece of size 0; every piece needs a positive size"):
        sg.split(sg.Input(5, name="x"), [0, 5])


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_chunk_into_no_pieces_is_a_shape_error(n):
    with pytest.raises(sg.ShapeError, match=f"positive int, got {n!r}"):
        sg.chunk(sg.Input(4, name="x"), n)


def test_scalar_parameter_with_the_default_init_is_drawn_in_minus_one_to_one():
    p = sg.Parameter((), name="p")
    t = torch.empty(())
    p.attrs["init"](t)
    assert p.shape == () and -1.0 <= t.item() <= 1.0


def test_where_mask_blends_two_values():
    m, a, b = sg.Input(3, name="m"), sg.Input(3, name="a"), sg.Input(3, name="b")
    vm = torch.rand(2, 3, dtype=DT)
    va, vb = torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT)
    got = run_once(sg.Cell(inputs=[m, a, b], outputs=[sg.where_mask(m, a, b)]), vm, va, vb)
    torch.testing.assert_close(got, vm * va + (1 - vm) * vb)


def test_a_python_if_on_a_node_is_a_type_error_that_says_what_to_use():
    x = sg.Input(4, name="x")
    with pytest.raises(TypeError, match=r"node 'x' .* is a symbolic value.*sg.where_mask"):
        bool(x)


@pytest.mark.parametrize("misuse", [lambda v: torch.tanh(v), lambda v: v.view(2, 2), bool, lambda v: v[0],
                                    lambda v: v ** 2],
                         ids=["torch function", "tensor method", "if", "indexing", "power"])
def test_a_misused_unnamed_node_is_named_by_its_op_and_site_not_an_internal_label(misuse):
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    with pytest.raises((TypeError, AttributeError)) as info:
        misuse(x + h)
    assert re.search(r"the unnamed add node \(declared at .*test_dsl.py:\d+\)", str(info.value))
    assert not re.search(r"add_\d+", str(info.value))


@pytest.mark.parametrize("args", [(4, 0), (0, 4), (4.5, 6), (True, 3), (4, -2)])
def test_linear_sizes_must_be_positive_ints(args):
    with pytest.raises(ValueError, match=r"Linear \(declared at .*test_dsl.py:\d+\): \w+_features must be a positive int"):
        sg.Linear(*args)


def test_sizes_and_piece_counts_may_be_numpy_integers():
    import numpy as np  # in the test extras
    lin = sg.Linear(np.int64(4), np.int32(3))
    assert (lin.in_features, lin.out_features) == (4, 3) and type(lin.in_features) is int
    assert len(sg.chunk(sg.Input(4, name="x"), np.int64(2))) == 2
    assert sg.Input(np.int64(3)).shape == (3,) and sg.Context(np.int32(2)).shape == (2,)


@pytest.mark.parametrize("make,says", [
    (lambda x: sg.split(x, [2.0, 2.0]), r"sg.split: a piece size \(at test_dsl.py:\d+\) must be an int, got 2.0"),
    (lambda x: sg.Concat(dim=1.5)([x, x]), r"Concat: dim \(at test_dsl.py:\d+\) must be an int, got 1.5"),
    (lambda x: sg.unsqueeze(x, 0.0), r"sg.unsqueeze: dim \(at test_dsl.py:\d+\) must be an int"),
    (lambda x: sg.squeeze(sg.unsqueeze(x, 0), 0.0), r"sg.squeeze: dim \(at test_dsl.py:\d+\) must be an int"),
    (lambda x: sg.reshape(x, 4), r"sg.reshape \(at test_dsl.py:\d+\) takes the new per-example shape as a tuple"),
    (lambda x: sg.reshape(x, (2, 2.0)), r"sg.reshape: a size \(at test_dsl.py:\d+\) must be an int"),
], ids=["split", "concat", "unsqueeze", "squeeze", "reshape_int", "reshape_float"])
def test_a_float_or_bare_int_where_a_dim_or_shape_belongs_is_refused_at_the_line(make, says):
    x, _ = _xh()
    with pytest.raises(TypeError, match=says):
        make(x)


@pytest.mark.parametrize("size", [1, 5])
def test_layer_norm_of_another_size_than_its_input_is_a_shape_error(size):
    x, _ = _xh()
    with pytest.raises(sg.ShapeError, match=rf"LayerNorm \(declared at test_dsl.py:\d+\) normalises {size} features "
                                            rf"but 'x' has 4"):
        sg.LayerNorm(size)(x)


@pytest.mark.parametrize("p", ["0.5", 1.0, -0.1, True])
def test_a_noise_probability_that_is_not_a_number_in_zero_one_is_refused_at_the_line(p):
    with pytest.raises(ValueError, match=r"Noise \(at test_dsl.py:\d+\): the probability p must be a number in \[0, 1\)"):
        sg.Noise(3, p)


@pytest.mark.parametrize("init,expected", [(torch.ones_like, 1.0), (lambda t: torch.full_like(t, 3.0), 3.0),
                                           (torch.full((4,), 2.0), 2.0)], ids=["ones_like", "lambda", "tensor"])
def test_a_parameter_init_may_return_its_values_or_be_a_tensor(init, expected):
    assert torch.equal(_gain_after_init(init), torch.full((4,), expected))


def _gain_after_init(init) -> torch.Tensor:
    """The value a parameter 'gain' of 4 features starts from, given `init`."""
    x, h = _xh()
    gain = sg.Parameter(4, name="gain", init=init)
    return sg.Recurrence(sg.Cell(inputs=[x], states={h: sg.tanh(x * gain + h)})).params.gain


def test_an_init_filling_a_view_and_returning_it_is_taken_as_it_filled():
    assert torch.equal(_gain_after_init(lambda t: t.view(2, 2).fill_(2.0)), torch.full((4,), 2.0))


@pytest.mark.parametrize("init,expected", [(np.ones(4), 1.0), (np.float32(0.5), 0.5), (torch.tensor(0.25), 0.25)],
                         ids=["array", "numpy_scalar", "tensor_scalar"])
def test_a_parameter_init_may_be_a_numpy_array_or_a_scalar_of_numpy_or_torch(init, expected):
    assert torch.equal(_gain_after_init(init), torch.full((4,), expected))


def test_sizes_and_probabilities_may_be_numpy_or_torch_values():
    assert sg.Parameter(np.array([2, 3])).shape == (2, 3) and sg.Input(torch.tensor([2, 3])).shape == (2, 3)
    assert sg.reshape(sg.Input(8), np.array([2, 4])).shape == (2, 4)
    assert {n.attrs["p"] for n in sg.cells.lstm(3, 4, dropout=np.float32(0.25)).order if n.op == "noise"} == {0.25}
    assert sg.Noise(3, torch.tensor(0.5)).attrs["p"] == 0.5


def test_an_init_returning_another_shape_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"parameter 'gain' \(declared at test_dsl.py:\d+\): the init function .* returned "
                                         r"a tensor of shape \(3,\) for a parameter of shape \(4,\)"):
        _gain_after_init(lambda t: torch.ones(3))


@pytest.mark.parametrize("init", ["normal", torch.ones(3)], ids=["unknown_name", "tensor_of_another_shape"])
def test_an_unknown_init_names_the_line_and_what_is_accepted(init):
    with pytest.raises(ValueError, match=r"\(at test_dsl.py:\d+\)"):
        sg.Parameter(4, init=init)


# ---------------------------------------------------------------------------------------
# Python, numpy and torch misused on nodes: a TypeError where the mistake is, saying what to write
# ---------------------------------------------------------------------------------------
def _xh():
    return sg.Input(4, name="x"), sg.State(4, name="h")


@pytest.mark.parametrize("mistake,hint", [
    (lambda x, h: torch.tanh(h), r"torch's tanh cannot run on node 'h' .* here sg.tanh"),
    (lambda x, h: torch.cat([x, h]), r"torch's cat cannot run on .* here sg.concat"),
    (lambda x, h: torch.nn.Linear(4, 4)(h), r"torch.nn.Linear cannot run on node 'h' .* here sg.Linear"),
    (lambda x, h: torch.nn.LayerNorm(4)(h), r"torch.nn.LayerNorm cannot run on node 'h' .* here sg.LayerNorm$"),
    (lambda x, h: torch.zeros(4) + h, r"got Tensor: a tensor is not part of a step.s graph"),
    (lambda x, h: h + torch.zeros(4), r"got Tensor: a tensor is not part of a step.s graph"),
    (lambda x, h: sg.tanh(torch.zeros(4)), r"got Tensor: a tensor is not part of a step's graph; use sg.Parameter"),
    (lambda x, h: sg.Linear(8, 4)([x, h]), r"got list: combine a list of nodes first \(sg.concat"),
    (lambda x, h: sg.Concat()(x, h), r"takes one node, or one list of nodes .* got 2 arguments .* pass a list"),
    (lambda x, h: sg.Identity()(), r"nngraph's Identity\(\)\(\) input idiom is sg.Input"),
    (lambda x, h: h == 0, r"node 'h' .* is a symbolic value: == cannot see"),
    (lambda x, h: h != 0, r"!= cannot see"),
    (lambda x, h: h > 0, r"> cannot see .* use sg.where_mask, sg.maximum"),
    (lambda x, h: max(x, h), r"is a symbolic value: [<>] cannot see"),
    (lambda x, h: len(h), r"not a sequence .* node.shape"),
    (lambda x, h: h[0], r"cannot be indexed .* sg.narrow"),
    (lambda x, h: h ** 2, r"\*\* is not an op of the DSL .* h \* h"),
    (lambda x, h: sg.concat({x, h}), r"got set \(a set has no order"),
    (lambda x, h: sg.narrow(h, 0, 0, 4 / 2), r"sg.narrow: length .* must be an int, got 2.0"),
    (lambda x, h: sg.softmax(h, dim=0.5), r"sg.softmax: dim .* must be an int, got 0.5"),
    (lambda x, h: sg.chunk(h, 2, dim=0.0), r"sg.chunk: dim .* must be an int, got 0.0"),
], ids=["torch_tanh", "torch_cat", "torch_module", "torch_layer_norm_module", "tensor_plus_node", "node_plus_tensor", "tensor_operand",
        "module_on_list", "two_arguments", "nngraph_input_idiom", "eq", "ne", "gt", "python_max", "len", "index",
        "pow", "concat_of_a_set", "float_length", "float_dim", "float_chunk_dim"])
def test_a_python_mistake_on_a_node_is_a_type_error_saying_what_to_write(mistake, hint):
    x, h = _xh()
    with pytest.raises(TypeError, match=hint) as err:
        mistake(x, h)
    assert re.search(r"\((len )?at test_dsl.py:\d+\)", str(err.value))  # the user's line, not torch's


def test_a_torch_recurrent_module_called_on_a_node_names_the_cell_to_build_instead():
    x, h = _xh()
    with pytest.raises(AttributeError, match=r"torch.nn.GRUCell cannot run on node 'x' .* a symbolic value "
                                             r"\(at .*test_dsl.py:\d+\): .* here sg.cells.gru\(...\) builds it") as err:
        torch.nn.GRUCell(4, 4)(x, h)
    assert "test_dsl.py:" in str(err.value).split("declared at", 1)[1]


@pytest.mark.parametrize("method, hint", [("chunk", "sg.chunk"), ("sigmoid", "sg.sigmoid"), ("view", "sg.reshape")])
def test_a_tensor_method_on_a_node_names_the_sg_function(method, hint):
    _, h = _xh()
    with pytest.raises(AttributeError, match=rf"has no method '{method}' .*test_dsl.py.* here {hint}"):
        getattr(h, method)


@pytest.mark.parametrize("method, hint", [("size", r"node.shape: its shape per example, without the batch dimension"),
                                          ("dim", r"len\(node.shape\)"), ("numel", "node.elements")])
def test_asking_a_node_its_size_as_of_a_tensor_names_the_per_example_shape(method, hint):
    _, h = _xh()
    with pytest.raises(AttributeError, match=rf"has no method '{method}' .*test_dsl.py.* here {hint}"):
        getattr(h, method)(-1)


def test_a_node_counts_its_elements_per_example():
    assert sg.Input((3, 4), name="x").elements == 12


def test_a_node_lacks_other_attributes_plainly():
    x, _ = _xh()
    assert not hasattr(x, "no_such_thing") and not hasattr(x, "__no_such_dunder__")


@pytest.mark.parametrize("fn, says", [("sum", "numpy's sum .*here sg.sum"), ("dot", "numpy cannot compute"),
                                      ("tanh", "numpy's tanh .*here sg.tanh"), ("mean", "numpy cannot compute"),
                                      ("maximum", "numpy's maximum .*here sg.maximum")])
def test_numpy_functions_on_a_node_refuse_saying_what_to_write(fn, says):
    np = pytest.importorskip("numpy")
    x, h = _xh()
    with pytest.raises(TypeError, match=says) as err:
        getattr(np, fn)(x, h) if fn in ("dot", "maximum") else getattr(np, fn)(h)
    assert "test_dsl.py:" in str(err.value)


def test_numpy_array_times_a_node_refuses():
    np = pytest.importorskip("numpy")
    _, h = _xh()
    with pytest.raises(TypeError, match="expected a seqgraph node or a Python number, got ndarray"):
        np.ones(4) * h


def test_nodes_still_compare_by_identity_and_key_dicts():
    x, h = _xh()
    assert x == x and x != h and {h: 1}[h] == 1 and h in [x, h]


def test_abs_of_a_node_is_sg_abs():
    _, h = _xh()
    assert abs(h).op == "abs"


@pytest.mark.parametrize("module", [sg.CAdd, sg.CMul])
def test_a_table_module_on_an_empty_list_is_a_shape_error(module):
    with pytest.raises(sg.ShapeError, match=r"needs at least one operand, got an empty list"):
        module()([])


@pytest.mark.parametrize("make,text", [
    (lambda: sg.Embedding(10.9, 4), r"Embedding \(declared at test_dsl.py:\d+\): num must be a positive int, got 10.9"),
    (lambda: sg.Embedding(0, 4), r"num must be a positive int, got 0"),
    (lambda: sg.LayerNorm(0), r"LayerNorm \(declared at test_dsl.py:\d+\): size must be a positive int, got 0"),
], ids=["float_rows", "no_rows", "empty_layer_norm"])
def test_module_sizes_are_checked_when_declared(make, text):
    with pytest.raises(ValueError, match=text):
        make()


@pytest.mark.parametrize("make", [lambda h: sg.layer_norm(h, (8,)), lambda h: sg.LayerNorm(8, eps=(8,)),
                                  lambda h: sg.LayerNorm(8, eps=-1.0)], ids=["shape_as_eps", "module", "negative"])
def test_a_layer_norm_eps_that_is_not_a_number_is_refused_where_written(make):
    _, h = sg.Input(4), sg.State(8, name="h")
    with pytest.raises(ValueError, match=r"(LayerNorm|sg.layer_norm) \(at test_dsl.py:\d+\): eps must be a number >= 0, "
                                         r"got .* the last dim of the node"):
        make(h)


def test_a_named_dropout_module_names_its_node():
    _, h = _xh()
    assert sg.Dropout(0.5, name="drop")(h).name == "drop"


def test_an_unnamed_operand_is_named_by_what_made_it_not_an_internal_label():
    x = sg.Input(24, name="x")
    with pytest.raises(sg.ShapeError, match=r"Linear \(declared at test_dsl.py:\d+\) has size 50 along dim -1"):
        sg.chunk(sg.Linear(24, 50)(x), 3)


def test_a_linear_reused_on_another_size_names_its_declaration_and_the_call():
    x, y = sg.Input(8, name="x"), sg.Input(16, name="y")
    shared = sg.Linear(16, 16, name="shared")
    shared(y)
    with pytest.raises(sg.ShapeError, match=r"Linear 'shared' \(declared at test_dsl.py:(\d+)\), called at "
                                            r"test_dsl.py:(\d+), expects 16 input features but its input 'x' has 8"):
        shared(x)


def test_where_mask_names_itself_and_its_three_operands_when_they_do_not_broadcast():
    x, h = sg.Input(4, name="x"), sg.State(8, name="h")
    with pytest.raises(sg.ShapeError, match=r"where_mask \(declared at test_dsl.py:\d+\): .* got mask 'x' \(4,\), "
                                            r"a 'h' \(8,\), b 'h' \(8,\)"):
        sg.where_mask(x, h, h)


def test_a_context_without_a_size_holds_one_value_per_sequence():
    label = sg.Context(name="label", dtype="long")
    assert label.shape == () and label.batched and label.dtype == "long"


def test_a_linear_on_integer_ids_points_to_embedding():
    tokens = sg.Input(name="tok", dtype="long")
    with pytest.raises(sg.ShapeError, match=r"input 'tok' has no feature dim; it holds integer ids: .*sg.Embedding"):
        sg.Linear(1, 4)(tokens)


@pytest.mark.parametrize("mistake,error,text", [
    (lambda: sg.Recurrence(sg.cells.lstm), TypeError, r"got function; call it to build the cell, e.g. sg.cells.lstm\("),
    (lambda: sg.cells.gru(3, 4)(torch.zeros(2, 3)), TypeError, r"is the graph of one step .* sg.Recurrence\(cell\)\(x\)"),
    (lambda: sg.Input(4.0), TypeError, r"Input \(at test_dsl.py:\d+\): size must be an int or a tuple of ints, got 4.0"),
    (lambda: sg.split(sg.Input(4), 2), TypeError, r"takes a list of piece sizes, .* for n equal pieces use sg.chunk"),
    (lambda: sg.dropout(sg.Input(4), 1.0), ValueError, r"sg.dropout \(at test_dsl.py:\d+\): p, the probability"),
], ids=["cell_function_not_called", "cell_called_on_a_tensor", "float_size", "split_by_an_int", "dropout_of_one"])
def test_api_misuse_names_the_call_and_the_fix(mistake, error, text):
    with pytest.raises(error, match=text):
        mistake()


def test_numpy_scalars_are_constants_like_python_numbers():
    np = pytest.importorskip("numpy")
    _, h = _xh()
    for scalar in (np.float32(0.5), np.int64(2)):
        node = h * scalar
        assert node.op == "mul" and node.inputs[1].op == "const"
        assert node.inputs[1].attrs["value"] == float(scalar)


@pytest.mark.parametrize("op, expr", [("mul", lambda s, h: s * h), ("add", lambda s, h: s + h),
                                      ("sub", lambda s, h: s - h), ("div", lambda s, h: s / h)])
def test_a_numpy_scalar_on_the_left_of_a_node_is_a_constant_too(op, expr):
    np = pytest.importorskip("numpy")
    _, h = _xh()
    node = expr(np.sqrt(2.0), h)  # numpy asks the node's __array_ufunc__ first
    assert node.op == op and node.inputs[0].op == "const" and node.inputs[1] is h
    assert node.inputs[0].attrs["value"] == float(np.sqrt(2.0))


def test_concat_takes_any_ordered_iterable_and_cell_states_any_iterable_of_pairs():
    x, h = _xh()
    assert sg.concat(n for n in (x, h)).shape == (8,)
    assert sg.concat({"a": x, "b": h}.values()).shape == (8,)
    cell = sg.Cell(inputs=[x], states=zip([h], [sg.tanh(x + h)]))
    assert cell.state_names == ["h"]


@pytest.mark.parametrize("make", [lambda x: sg.State(4, init=x), lambda x: sg.Parameter(4, init=x)],
                         ids=["state", "parameter"])
def test_a_node_given_as_an_init_is_a_value_error_about_the_init(make):
    x, _ = _xh()
    with pytest.raises(ValueError, match=r"init"):
        make(x)


def test_a_torch_function_without_an_sg_twin_points_at_the_docs():
    _, h = _xh()
    with pytest.raises(TypeError, match=r"torch's zeros_like cannot run on node 'h' .* see docs/dsl.md"):
        torch.zeros_like(h)


def test_a_node_pickled_by_an_older_seqgraph_loads_with_a_fresh_id():
    x, _ = _xh()
    old_state = (None, {k: getattr(x, k) for k in type(x).__slots__})  # how slots pickled before
    loaded = type(x).__new__(type(x))
    loaded.__setstate__(old_state)
    assert loaded.name == "x" and loaded.shape == (4,) and loaded.id != x.id


def test_a_checkpoint_of_version_1_keeps_its_outputs_its_padding_row_read_as_zeros_again():
    # version 1 read an Embedding's padding row as zeros whatever it held (its init was random)
    tok, h = sg.Input((), dtype="long", name="tok"), sg.State(3, name="h")
    rec = sg.Recurrence(sg.Cell(inputs=[tok], states={h: h + sg.Embedding(5, 3, padding_idx=0, name="emb")(tok)}))
    state = rec.state_dict()
    state["params.emb.weight"] = state["params.emb.weight"].clone()  # (not a view of the parameter)
    state["params.emb.weight"][0] = torch.tensor([1.5, -0.3, -2.2])
    old = collections.OrderedDict(state)
    old._metadata = collections.OrderedDict((k, {"version": 1}) for k in state._metadata)
    rec.load_state_dict(old)
    assert torch.equal(rec.params.emb.weight[0], torch.zeros(3))
    assert torch.equal(old["params.emb.weight"][0], torch.tensor([1.5, -0.3, -2.2]))  # the caller's dict untouched
    rec.load_state_dict(state)  # a checkpoint of this version loads as stored
    assert torch.equal(rec.params.emb.weight[0], torch.tensor([1.5, -0.3, -2.2]))


@pytest.mark.parametrize("module,text", [
    (lambda: sg.Linear(3, 4, name="gate"), "sg.Linear(3, 4, name='gate')"),
    (lambda: sg.Linear(3, 4, bias=False), "sg.Linear(3, 4, bias=False)"),
    (lambda: sg.Embedding(10, 4, padding_idx=0), "sg.Embedding(10, 4, padding_idx=0)"),
    (lambda: sg.LayerNorm(5, eps=1e-3, affine=False), "sg.LayerNorm(5, eps=0.001, affine=False)"),
    (lambda: sg.Concat(0), "sg.Concat(dim=0)"),
    (lambda: sg.Dropout(0.25, per_sequence=True), "sg.Dropout(p=0.25, per_sequence=True)"),
    (lambda: sg.Tanh(), "sg.Tanh()"),
], ids=["linear", "linear_no_bias", "embedding", "layer_norm", "concat", "dropout", "tanh"])
def test_a_module_prints_its_sizes_and_flags(module, text):
    assert repr(module()) == text


def test_a_torch_function_in_a_helper_module_of_the_users_names_the_helpers_line(tmp_path, monkeypatch):
    (tmp_path / "torchhelpers.py").write_text("import torch\n\ndef squash(node):\n    return torch.tanh(node)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import torchhelpers
    with pytest.raises(TypeError, match=r"torch's tanh cannot run .* \(at torchhelpers.py:4\)"):
        torchhelpers.squash(sg.Input(4, name="x"))


def test_a_torch_function_inside_a_users_module_is_not_blamed_on_the_torch_container_around_it():
    class Step(torch.nn.Module):
        def forward(self, _):
            return torch.tanh(sg.Input(4, name="x"))
    with pytest.raises(TypeError, match=r"torch's tanh cannot run .* here sg.tanh"):
        torch.nn.Sequential(Step())(None)


def test_sign_is_minus_one_zero_or_one_with_a_zero_derivative():
    x = sg.Input(4, name="x")
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={}, outputs=[sg.sign(x)])).double()
    xs = torch.tensor([[[-2.0, 0.0, 3.0, -0.0]]], dtype=torch.float64, requires_grad=True)
    out, _ = rec(xs)
    assert out.tolist() == [[[-1.0, 0.0, 1.0, 0.0]]]
    (g,) = torch.autograd.grad(out.sum(), xs)
    assert torch.equal(g, torch.zeros_like(xs))


def test_concat_of_a_python_number_says_numbers_have_no_features():
    x = sg.Input(4, name="x")
    with pytest.raises(TypeError, match=r"sg.concat \(at test_dsl.py:\d+\): operand 1 is the number 1.0, which "
                                        r"has no features"):
        sg.concat([x, 1.0])
