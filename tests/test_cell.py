"""seqgraph/cell.py: what building a Cell refuses, and a Cell called on nodes inlining one step of it into a bigger cell."""
import pytest
import torch

import seqgraph as sg

I, H, T, B = 4, 6, 5, 3


def _two_layer_cell(scopes=("layer1", "layer2")):
    """Two built-in LSTM cells, one feeding the other, as one cell of four states."""
    x = sg.Input(I, name="x")
    h1, c1, h2, c2 = (sg.State(H, name=n) for n in ("h1", "c1", "h2", "c2"))
    o1, s1 = sg.cells.lstm(I, H)(x, {"h": h1, "c": c1}, scope=scopes[0])
    o2, s2 = sg.cells.lstm(H, H)(o1, {"h": h2, "c": c2}, scope=scopes[1])
    return sg.Cell(inputs=[x], states={h1: s1["h"], c1: s1["c"], h2: s2["h"], c2: s2["c"]}, outputs=[o2])


def _copy_stack_weights(rec, stack):
    with torch.no_grad():
        for k, layer in enumerate(stack.layers):
            for key, t in layer.param_tensors().items():
                rec.param_tensors()[f"layer{k + 1}.{key}"].copy_(t)


def test_scoped_cells_inside_a_cell_key_their_parameters_by_scope():
    assert sorted(_two_layer_cell().params) == sorted(
        f"layer{k}.{m}.{p}" for k in (1, 2) for m in ("ih", "hh") for p in ("weight", "bias"))


def test_the_nodes_of_a_scoped_copy_are_named_in_its_scope():
    named = {n.name for n in _two_layer_cell().order if n.name and n.op not in ("input", "state")}
    assert {"layer1.ih", "layer2.ih", "layer1.hh", "layer2.hh"} <= named
    assert all(name.startswith(("layer1.", "layer2.")) for name in named)
    params = {n.name for n in _two_layer_cell().order if n.op == "param"}
    assert params == set(_two_layer_cell().params)  # a scoped copy's parameter is named by its key


def test_the_picture_of_a_cell_with_scoped_copies_tells_their_nodes_apart():
    source = sg.to_dot(_two_layer_cell()).source
    assert "layer1.ih" in source and "layer2.ih" in source


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_two_lstm_cells_inlined_into_one_cell_equal_a_stack_of_two_layers(backend):
    torch.manual_seed(0)
    rec = sg.Recurrence(_two_layer_cell())
    stack = sg.stack(sg.cells.lstm, I, [H, H])
    _copy_stack_weights(rec, stack)
    module = rec if backend == "reference" else sg.compile(rec, backend=backend)
    xs, lengths = torch.randn(T, B, I), torch.tensor([5, 2, 4])
    got, final = module(xs, lengths=lengths)
    want, finals = stack(xs, lengths=lengths)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(final["h2"], finals[1]["h"])


def test_a_cell_called_twice_without_scope_is_one_set_of_weights():
    inner = sg.cells.rnn(H, H)
    x, h1, h2 = sg.Input(H, name="x"), sg.State(H, name="h1"), sg.State(H, name="h2")
    a, na = inner(x, {"h": h1})
    b, nb = inner(a, {"h": h2})
    outer = sg.Cell(inputs=[x], states={h1: na["h"], h2: nb["h"]}, outputs=[b])
    assert sorted(outer.params) == sorted(inner.params)


def test_the_same_scope_twice_shares_its_weights_and_another_scope_has_its_own():
    inner = sg.cells.rnn(H, H)
    x, h1, h2, h3 = sg.Input(H, name="x"), *(sg.State(H, name=f"h{k}") for k in (1, 2, 3))
    a, na = inner(x, {"h": h1}, scope="tied")
    b, nb = inner(a, {"h": h2}, scope="tied")
    c, nc = inner(b, {"h": h3}, scope="own")
    outer = sg.Cell(inputs=[x], states={h1: na["h"], h2: nb["h"], h3: nc["h"]}, outputs=[c])
    assert sorted(outer.params) == sorted(f"{s}.{k}" for s in ("tied", "own") for k in inner.params)


def test_two_distinct_cells_without_scopes_say_to_give_each_a_scope():
    x, h1, h2 = sg.Input(I, name="x"), sg.State(H, name="h1"), sg.State(H, name="h2")
    a, na = sg.cells.rnn(I, H)(x, {"h": h1})
    b, nb = sg.cells.rnn(H, H)(a, {"h": h2})
    with pytest.raises(sg.WiringError, match=r"two modules are named 'ih'.*give each call its own scope"):
        sg.Cell(inputs=[x], states={h1: na["h"], h2: nb["h"]})


def test_a_cell_called_on_nodes_needs_every_state_by_name():
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    with pytest.raises(sg.WiringError, match=r"needs a dict with a node for each of its states \['h', 'c'\], by "
                                             r"name; got \{'h': Node\}"):
        sg.cells.lstm(I, H)(x, {"h": h})


@pytest.mark.parametrize("state,got", [(lambda h: h, "got Node"), (lambda h: [h], "got list")])
def test_a_cell_called_with_a_state_that_is_not_a_dict_says_so(state, got):
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    with pytest.raises(sg.WiringError, match=rf"needs a dict with a node for each of its states \['h'\], by name; {got}"):
        sg.cells.rnn(I, H)(x, state(h))


def test_a_scope_that_is_not_a_name_or_is_taken_by_torch_modules_is_refused():
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    with pytest.raises(TypeError, match="scope must be a name"):
        sg.cells.rnn(I, H)(x, {"h": h}, scope=1)
    with pytest.raises(sg.WiringError, match=r"scope name 'training' is taken by torch.nn.Module"):
        sg.cells.rnn(I, H)(x, {"h": h}, scope="training")


def test_a_cell_called_on_a_node_of_the_wrong_size_names_the_leaf():
    x, h = sg.Input(I + 1, name="x"), sg.State(H, name="h")
    with pytest.raises(sg.ShapeError, match=r"Cell 'rnn_tanh' .* expects input 'x' of shape \(4,\) float, but got Input 'x' .* of shape \(5,\)"):
        sg.cells.rnn(I, H)(x, {"h": h})


def test_a_scope_with_a_dot_is_refused():
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    with pytest.raises(sg.WiringError, match=r"scope name 'a.b' contains a '.'"):
        sg.cells.rnn(I, H)(x, {"h": h}, scope="a.b")


def _inner(ih="ih", hh="hh"):
    x, h = sg.Input(H, name="x"), sg.State(H, name="h")
    return sg.Cell([x], {h: sg.tanh(sg.Linear(H, H, name=hh)(h) + sg.Linear(H, H, name=ih)(x))}, name="inner")


def _two_inner(call_a, call_b):
    x, h1, h2 = sg.Input(H, name="x"), sg.State(H, name="h1"), sg.State(H, name="h2")
    a, na = call_a(x, h1)
    b, nb = call_b(a, h2)
    return sg.Cell([x], {h2: nb["h"], h1: na["h"]}, [b])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_scoped_cell_and_a_hand_named_twin_share_a_compiled_program_with_the_right_weights(backend):
    from seqgraph.compiled import clear_cache
    inner = _inner()
    scoped = _two_inner(lambda x, h: inner(x, {"h": h}, scope="a"), lambda x, h: inner(x, {"h": h}, scope="b"))
    by_hand = _two_inner(lambda x, h: _inner("a_ih", "a_hh")(x, {"h": h}),
                         lambda x, h: _inner("b_ih", "b_hh")(x, {"h": h}))
    clear_cache()
    sg.compile(sg.Recurrence(by_hand), backend=backend)(torch.randn(T, B, H))  # its program is cached first
    torch.manual_seed(0)
    rec = sg.Recurrence(scoped)
    for p in rec.parameters():
        torch.nn.init.normal_(p)
    xs = torch.randn(T, B, H)
    torch.testing.assert_close(sg.compile(rec, backend=backend)(xs)[0], rec(xs)[0])


def test_a_scoped_key_names_the_parameter_the_cells_own_key_names():
    x, h1, h2 = sg.Input(H, name="x"), sg.State(H, name="h1"), sg.State(H, name="h2")
    inner = sg.Cell([x], {h1: sg.tanh(sg.Linear(H, H)(x) + h1), h2: sg.sigmoid(sg.Linear(H, H)(x) + h2)})
    X, a, b = sg.Input(H, name="X"), sg.State(H, name="a"), sg.State(H, name="b")
    _, nxt = inner(X, {"h1": a, "h2": b}, scope="s")
    outer = sg.Cell([X], {b: nxt["h2"], a: nxt["h1"]})  # the outer graph meets h2's Linear first
    for key, node in inner.params.items():
        mine = outer.params[f"s.{key}"]
        assert (mine.module, mine.attrs["pname"]) == (node.module, node.attrs["pname"])


@pytest.mark.parametrize("copy_cell", [lambda c: __import__("copy").deepcopy(c),
                                       lambda c: __import__("pickle").loads(__import__("pickle").dumps(c))],
                         ids=["deepcopy", "pickle"])
def test_a_copied_cell_still_gives_a_used_scope_weights_of_its_own(copy_cell):
    inner = sg.cells.rnn(I, H)
    inner(sg.Input(I, name="x"), {"h": sg.State(H, name="h")}, scope="a")
    twin = copy_cell(inner)
    x, h1, h2 = sg.Input(I, name="x"), sg.State(H, name="h1"), sg.State(H, name="h2")
    _, s1 = twin(x, {"h": h1}, scope="a")
    _, s2 = twin(x, {"h": h2})
    assert sorted(sg.Cell([x], {h1: s1["h"], h2: s2["h"]}).params) == sorted(
        [f"a.{k}" for k in twin.params] + list(twin.params))


def test_a_graph_called_with_a_scope_has_weights_of_its_own():
    u = sg.Input(H, name="u")
    squash = sg.Graph([u], sg.tanh(sg.Linear(H, H, name="squash")(u)))
    p, q = sg.Input(H, name="p"), sg.State(H, name="q")
    cell = sg.Cell([p], {q: squash(p, scope="left") + squash(q, scope="right")})
    assert sorted(cell.params) == ["left.squash.bias", "left.squash.weight", "right.squash.bias", "right.squash.weight"]


def test_two_different_cells_in_one_scope_are_refused_when_built():
    x, h1, h2 = sg.Input(I, name="x"), sg.State(H, name="h1"), sg.State(H, name="h2")
    a, na = sg.cells.rnn(I, H)(x, {"h": h1}, scope="s")
    b, nb = sg.cells.rnn(H, H)(a, {"h": h2}, scope="s")
    with pytest.raises(sg.WiringError, match=r"parameter key 's.ih.weight' of the Linear declared at .* clashes with "
                                             r"'s.ih.weight' .*give each inlined cell a scope of its own"):
        sg.Cell([x], {h1: na["h"], h2: nb["h"]})


def test_two_composites_of_one_factory_inlined_without_scopes_are_refused_when_built():
    def composite():
        x, h = sg.Input(H, name="x"), sg.State(H, name="h")
        _, nxt = sg.cells.rnn(H, H)(x, {"h": h}, scope="inner")
        return sg.Cell([x], {h: nxt["h"]})

    x, a, b = sg.Input(H, name="x"), sg.State(H, name="a"), sg.State(H, name="b")
    _, na = composite()(x, {"h": a})
    _, nb = composite()(na["h"], {"h": b})
    with pytest.raises(sg.WiringError, match=r"'inner.ih.weight' .* clashes"):
        sg.Cell([x], {a: na["h"], b: nb["h"]})


def test_a_cell_pickled_before_scopes_existed_can_still_be_inlined_with_one():
    inner = sg.cells.rnn(I, H)
    del inner.__dict__["_scopes"]  # what an older seqgraph pickled
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    _, nxt = inner(x, {"h": h}, scope="a")
    assert sorted(sg.Cell([x], {h: nxt["h"]}).params) == sorted(f"a.{k}" for k in inner.params)


@pytest.mark.parametrize("contexts,says", [
    (lambda x, m: [x], r"contexts= must hold sg.Context nodes .*; got Input 'x'"),
    (lambda x, m: [torch.zeros(2)], r"contexts= must hold sg.Context nodes .*; got a Tensor"),
    (lambda x, m: [m, m], r"Context 'memory' .* appears twice in contexts="),
], ids=["an_input", "a_tensor", "twice"])
def test_contexts_must_be_distinct_context_nodes(contexts, says):
    x, h, memory = sg.Input(4, name="x"), sg.State(4, name="h"), sg.Context(4, name="memory")
    with pytest.raises(sg.WiringError, match=says):
        sg.Cell(inputs=[x], states={h: sg.tanh(x + h + memory)}, contexts=contexts(x, memory))


def test_one_context_node_may_be_given_without_a_list():
    x, h, memory = sg.Input(4, name="x"), sg.State(4, name="h"), sg.Context(4, name="memory")
    cell = sg.Cell(inputs=[x], states={h: sg.tanh(x + h + memory)}, contexts=memory)
    assert cell.contexts == [memory]


def test_a_recurrence_of_a_cell_without_inputs_is_refused_where_it_is_built():
    h = sg.State(4, name="h")
    cell = sg.Cell(inputs=[], states={h: sg.tanh(h)})
    with pytest.raises(sg.WiringError, match=r"sg.Recurrence: the cell declared at test_cell.py:\d+ has no inputs"):
        sg.Recurrence(cell)


def test_a_cell_without_inputs_inlines_into_a_cell_with_inputs():
    s = sg.State(4, name="s")
    inner = sg.Cell(inputs=[], states={s: sg.tanh(sg.Linear(4, 4, name="mix")(s))})
    x, h = sg.Input(4, name="x"), sg.State(4, name="h")
    _, nxt = inner([], {"s": h})
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={h: nxt["s"] + x}))
    out, _ = rec(torch.zeros(3, 2, 4))
    assert out.shape == (3, 2, 4)


def test_a_cell_prints_the_sizes_of_its_inputs_and_states():
    assert repr(sg.cells.lstm(4, 8)) == "<sg.Cell lstm inputs={x: (4,)} states={h: (8,), c: (8,)} outputs=1 nodes=25>"
