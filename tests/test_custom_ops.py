"""A compiled seqgraph module inside torch.compile: the loops are one custom op each way."""
import pytest
import torch

import seqgraph as sg


class _Model(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.rnn = sg.compile(sg.Recurrence(sg.cells.lstm(3, 5)), backend=backend)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x, lengths=None):
        out, state = self.rnn(x, lengths=lengths)
        return self.head(out).sum() + state["c"].sum()


def _grads(model, x, **kw):
    loss = model(x, **kw)
    return [loss] + list(torch.autograd.grad(loss, [x] + [p for p in model.parameters()]))


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_whole_graph_compiles_without_breaks_and_matches_eager(backend):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _Model(backend).to(device)
    x = torch.randn(6, 4, 3, device=device, requires_grad=True)
    expected = _grads(model, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for a, b in zip(_grads(compiled, x), expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiled_with_lengths_matches_eager_in_one_graph(backend):
    torch.manual_seed(0)
    model = _Model(backend)
    x = torch.randn(6, 4, 3, requires_grad=True)
    lengths = torch.tensor([6, 2, 0, 5])
    expected = _grads(model, x, lengths=lengths)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for a, b in zip(_grads(compiled, x, lengths=lengths), expected, strict=True):
        torch.testing.assert_close(a, b)


def test_lengths_out_of_range_inside_torch_compile_raise_on_the_device():
    compiled = torch.compile(_Model("cpu"), backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, T\]"):
        compiled(torch.randn(6, 4, 3), lengths=torch.tensor([7, 2, 0, 5]))


def test_remember_inside_torch_compile_carries_the_state_in_one_graph_per_call():
    torch.manual_seed(0)
    eager = sg.compile(sg.Recurrence(sg.cells.gru(3, 4), remember=True), backend="cpu")
    traced = sg.compile(sg.Recurrence(sg.cells.gru(3, 4), remember=True), backend="cpu")
    traced.load_state_dict(eager.state_dict())
    step = torch.compile(lambda m, x: m(x)[0], backend="aot_eager", fullgraph=True)
    for _ in range(3):
        x = torch.randn(5, 2, 3)
        torch.testing.assert_close(step(traced, x), eager(x)[0])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_loop_op_passes_torch_library_opcheck(backend):
    comp = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend=backend)
    T, B = 5, 2
    x = torch.randn(T, B, 3)
    params = list(comp.param_tensors().values())
    reads = comp._program.fns["prologue"](T, B, [x], [], [], params)
    reads = [r.detach().requires_grad_(r.is_floating_point()) for r in reads]
    states = [torch.randn(B, 4, requires_grad=True)]
    mask = torch.rand(T, B) > 0.3
    torch.library.opcheck(comp._program.loop_op, (reads, states, mask, T, B, True, None))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_loop_op_keeps_a_stand_in_for_a_read_its_backward_never_looks_at(backend):
    comp = sg.compile(sg.Recurrence(sg.cells.lstm(3, 5)), backend=backend)
    T, B = 4, 2
    params = list(comp.param_tensors().values())
    reads = comp._program.fns["prologue"](T, B, [torch.randn(T, B, 3)], [], [], params)
    reads = [r.detach().requires_grad_() for r in reads]
    states = [torch.zeros(B, 5, requires_grad=True) for _ in range(2)]
    out = comp._program.loop_op(reads, states, None, T, B, True, None)
    hoisted, weight = out[0].grad_fn.saved_tensors[:2]  # the (T, B, 4H) input projection; the recurrent weight
    assert hoisted.shape == (T, B, 20) and hoisted.untyped_storage().nbytes() == hoisted.element_size()
    assert weight.data_ptr() == reads[1].data_ptr()
    out[0].sum().backward()
    assert reads[0].grad.shape == (T, B, 20) and reads[0].grad.abs().sum() > 0


def test_an_sg_nn_lstm_compiles_whole_with_torch_compile_and_matches_torch():
    torch.manual_seed(0)
    mine, ref = sg.nn.LSTM(3, 5, num_layers=2), torch.nn.LSTM(3, 5, num_layers=2)
    ref.load_state_dict(mine.state_dict())
    x = torch.randn(6, 4, 3, requires_grad=True)
    out, _ = torch.compile(mine, backend="aot_eager", fullgraph=True)(x)
    want, _ = ref(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g, = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, torch.autograd.grad(want.sum(), x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["bfloat16", "autocast"])
def test_a_first_call_in_another_dtype_compiles_whole_inside_torch_compile(how):
    # the float32 C program is built with the layer; a first bfloat16 or autocast call runs the
    # torch program, which must already exist: compiling one cannot be traced
    sg.compiled.clear_cache()
    torch.manual_seed(0)
    mine, x = sg.nn.LSTM(3, 5), torch.randn(6, 4, 3)
    ref = sg.nn.LSTM(3, 5, backend="reference")
    ref.load_state_dict(mine.state_dict())
    if how == "bfloat16":
        mine, ref, x = mine.bfloat16(), ref.bfloat16(), x.bfloat16()
        out, _ = torch.compile(mine, backend="aot_eager", fullgraph=True)(x)
        want, _ = ref(x)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = torch.compile(mine, backend="aot_eager", fullgraph=True)(x)
            want, _ = ref(x)
    assert out.dtype == want.dtype
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("cell", ["lstm", "peephole"])
def test_backward_under_autocast_inside_torch_compile_runs_and_matches_eager(backend, cell):
    # the loop ops run opaque to the tracer, which records no autocast around them: without the
    # forward's autocast passed in, the backward met bfloat16 saved values with float32 weights
    torch.manual_seed(0)
    make = (lambda: sg.cells.lstm(3, 5)) if cell == "lstm" else (lambda: sg.cells.lstm(3, 5, peephole=True))
    comp = sg.compile(sg.Recurrence(make()), backend=backend)
    traced = torch.compile(lambda x: comp(x), backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 4, 3, requires_grad=True)
    results = []
    for run in (comp, traced):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, final = run(x)
        loss = out.float().sum() + final["c"].float().sum()
        results.append([out, loss] + list(torch.autograd.grad(loss, [x] + list(comp.parameters()))))
    for got, want in zip(*results, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def _counting_backend():
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend, graphs


def test_lengths_inside_a_dynamic_torch_compile_keep_one_graph_for_every_t():
    model = _Model("cpu")
    backend, graphs = _counting_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    for T in range(3, 13):
        x = torch.randn(T, 4, 3)
        lengths = torch.tensor([T, T - 1, 1, 0])
        torch.testing.assert_close(compiled(x, lengths=lengths), model(x, lengths=lengths))
    assert len(graphs) == 1


def test_a_cell_with_a_context_and_lengths_traces_as_one_graph():
    torch.manual_seed(0)
    x, h, c = sg.Input(3, name="x"), sg.State(4, name="h"), sg.Context(4, name="c")
    cell = sg.Cell([x], {h: sg.tanh(sg.Linear(3, 4)(x) + h * c)})
    rec = sg.compile(sg.Recurrence(cell), backend="cpu")
    step = torch.compile(lambda xs, ctx, n: rec(xs, lengths=n, context=ctx)[0], backend="aot_eager", fullgraph=True)
    xs, ctx, lengths = torch.randn(5, 3, 3), torch.randn(3, 4), torch.tensor([5, 0, 2])
    torch.testing.assert_close(step(xs, ctx, lengths), rec(xs, lengths=lengths, context=ctx)[0])


def test_a_state_nothing_reads_gets_zero_gradient_inside_torch_compile():
    x, h, k, c = sg.Input(3, name="x"), sg.State(3, name="h"), sg.State(3, name="k"), sg.Context(3, name="c")
    cell = sg.Cell(inputs=[x], states={h: sg.tanh(sg.Linear(3, 3)(x) + h), k: c * 2.0}, outputs=[h], contexts=[c])
    rec = sg.compile(sg.Recurrence(cell), backend="torch")
    xs, cv = torch.randn(4, 2, 3, requires_grad=True), torch.randn(2, 3)
    rec(xs, context=cv)[0].sum().backward()
    eager, xs.grad = xs.grad, None
    torch.compile(lambda v: rec(v, context=cv)[0], backend="aot_eager")(xs).sum().backward()
    torch.testing.assert_close(xs.grad, eager)


def _token_cell():
    tok, h = sg.Input(name="tok", dtype="long"), sg.State(5, name="h")
    h_next = sg.tanh(sg.Linear(4 + 5, 5)(sg.concat([sg.Embedding(11, 4, name="vocab")(tok), h])))
    return sg.Cell(inputs=[tok], states={h: h_next})


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_cell_reading_token_ids_traces_as_one_graph(backend):
    torch.manual_seed(0)
    rec = sg.compile(sg.Recurrence(_token_cell()), backend=backend)
    counting, graphs = _counting_backend()
    step = torch.compile(lambda t: rec(t)[0], backend=counting, fullgraph=True)
    tokens = torch.randint(0, 11, (6, 3))
    torch.testing.assert_close(step(tokens), rec(tokens)[0])
    assert len(graphs) == 1


def test_a_token_id_out_of_range_inside_torch_compile_raises_naming_the_embedding():
    rec = sg.compile(sg.Recurrence(_token_cell()), backend="cpu")
    step = torch.compile(lambda t: rec(t)[0], backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"Embedding 'vocab' \(declared at test_custom_ops.py:\d+\) has 11 rows"):
        step(torch.tensor([[3, 11], [0, 1]]))


def test_a_program_made_again_after_clear_cache_takes_over_its_keys_loop_op(monkeypatch):
    # the op keeps its name (a torch.export file names it) and runs the new program, whose plan
    # may differ (here the registry changed: no generated backward), and the old one is freed
    import dataclasses
    import gc
    import weakref
    from seqgraph.compiler.ops import REGISTRY
    first = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="torch")
    dropped = weakref.ref(first._program)
    sg.compiled.clear_cache()
    for op in ("sum_to", "linear_wgrad", "embedding_wgrad"):
        monkeypatch.setitem(REGISTRY, op, dataclasses.replace(REGISTRY[op], sums_rows=False))
    try:
        again = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend="torch")
        assert again._program.loop_op is first._program.loop_op
        del first
        gc.collect()
        assert dropped() is None
        T, B = 5, 2
        x = torch.randn(T, B, 3)
        params = list(again.param_tensors().values())
        reads = [r.detach() for r in again._program.fns["prologue"](T, B, [x], [], [], params)]
        args = (reads, [torch.zeros(B, 4)], None, T, B, False, None)  # (this plan has no generated backward)
        torch.library.opcheck(again._program.loop_op, args)
        with torch.no_grad():
            torch.testing.assert_close(again._program.loop_op(*args)[0], again(x)[0])
    finally:
        sg.compiled.clear_cache()


@pytest.mark.parametrize("make", [lambda: sg.nn.GRU(3, 5),
                                  lambda: sg.compile(sg.Recurrence(sg.cells.gru(3, 5)), backend="cpu")],
                         ids=["sg.nn.GRU", "compiled Recurrence"])
def test_models_of_one_architecture_share_one_torch_compile_graph(make):
    # an ensemble or a sweep: a graph per instance would hit torch.compile's recompile limit (8)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(lambda m, x: m(x)[0], backend=counting, fullgraph=True)
    x = torch.randn(4, 2, 3)
    for _ in range(10):
        model = make()
        torch.testing.assert_close(step(model, x), model(x)[0])
    assert len(graphs) == 1
