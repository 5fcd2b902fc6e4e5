"""Whole time loops in C (seqgraph/kernels/c_loops.py): which plans get them, that they really
run (the CLoops call counter), and that they equal the reference and the Python loops they
replace, on masks, float64, strided tensors and empty sequences, with the batch's rows in one
loop or split over threads that each run the loop on their own rows.

Tolerances: float64 to 1e-10 (values) and 1e-9 (gradients); float32 to 1e-5 and 1e-4."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqgraph as sg
from seqgraph.kernels.c_loops import ROW_SPLIT_MAX_WEIGHT_BYTES, CLoops, loop_threads, loops_refusal

from backend_cases import BUILTIN, CASES, check_against_reference
from strategies import build_cell, cell_recipes
from zoo import make_inputs

def _compile(name, dtype=torch.float64):
    rec = sg.Recurrence(CASES[name]() if isinstance(name, str) else name).to(dtype)
    return rec, sg.compile(rec, backend="cpu")


def _softmax_down_the_columns():
    """A cell whose step takes a softmax along a per-example matrix's first dim: torch code."""
    x, h = sg.Input(2, name="x"), sg.State(6, name="h")
    memory, real = sg.Context((4, 6), name="memory"), sg.Context((4,), name="memmask")
    weights = sg.softmax(memory * sg.unsqueeze(h, 0) + sg.unsqueeze(real, -1), dim=0)
    read = sg.sum(weights * memory, dim=0)
    return sg.Cell([x], {h: sg.tanh(read + sg.Linear(2, 6)(x))}, [read])


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_cell_without_torch_stages_runs_forward_and_backward_loops_in_c(name):
    rec, comp = _compile(name)
    loops = comp._program.c_loops
    assert isinstance(loops, CLoops)
    before = loops.calls
    xs, ctx = make_inputs(rec.cell, 5, 3, dtype=torch.float64)
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=torch.tensor([5, 1, 3]))
    assert loops.calls - before == 2  # the masked forward (saving) and the masked backward


# rows 3 and 4 end first; at step 2 every row is padding; row 2 pauses at steps 1-2, while the
# rows after it are padding too (the loop skips it), and comes back at step 3
GAPPED_MASK = torch.tensor([[1, 1, 1, 1, 0],
                            [1, 1, 0, 0, 0],
                            [0, 0, 0, 0, 0],
                            [1, 0, 1, 0, 0],
                            [1, 0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("padding", ["lengths longest first", "mask with gaps"])
def test_every_cell_equals_the_reference_when_the_last_rows_are_padding(name, padding):
    rec, comp = _compile(name)
    xs, ctx = make_inputs(rec.cell, 5, 5, dtype=torch.float64)
    states = {p.name: torch.randn(5, *p.shape, dtype=torch.float64) for p, _ in rec.cell.states}
    pad = {"lengths": torch.tensor([5, 4, 2, 1, 0])} if padding.startswith("lengths") else {"mask": GAPPED_MASK}
    check_against_reference(rec, comp, xs, ctx, 1e-10, state=states, **pad)


@pytest.mark.parametrize("split", ["steps", "rows"])
@pytest.mark.parametrize("lengths", [[6, 6, 5, 3, 6, 2, 1, 0],  # each thread's rows end in short ones
                                     [6, 6, 6, 1, 1, 1, 1, 0]],  # longest first: threads split by real steps
                         ids=["unsorted", "longest first"])
def test_the_gradient_of_initial_states_passes_rows_the_loop_skips(split, lengths, monkeypatch, two_threads):
    monkeypatch.setenv("SEQGRAPH_LOOP_SPLIT", split)
    rec = sg.Recurrence(BUILTIN["lstm_layer_norm"]()).double()
    comp = sg.compile(rec, backend="cpu")
    x = torch.randn(6, 8, 3, dtype=torch.float64)
    lengths = torch.tensor(lengths)
    grads = []
    for module in (rec, comp):
        h0 = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
        c0 = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out, fin = module(x, {"h": h0, "c": c0}, lengths=lengths)
        loss = (out * torch.linspace(0, 1, 5)).sum() + (fin["c"] ** 2).sum() + fin["h"].sum()
        grads.append(torch.autograd.grad(loss, [h0, c0]))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)
    assert comp._program.c_loops.last_threads == (2 if split == "rows" else 1)


def test_the_loop_skips_padded_rows_only_when_no_later_row_is_real():
    # what the forward saves for backward shows which rows a step computed: the C loop writes
    # zeros for the rows it skipped, and computed values for padded rows before a real one
    rec = sg.Recurrence(BUILTIN["gru_seed_form"]())
    comp = sg.compile(rec, backend="cpu")
    T, B = 3, 2
    reads, states = _loop_inputs(comp, T, B)
    forward = comp._program.fns["forward"]
    ends_padded = torch.tensor([[True, True], [True, False], [True, False]])
    _, _, (saved, _) = forward(T, B, ends_padded, reads, states, True)
    assert all((sv[1:, 1] == 0).all() and (sv[:, 0] != 0).any() for sv in saved)
    starts_padded = ends_padded.flip(1)
    _, _, (saved, _) = forward(T, B, starts_padded, reads, states, True)
    assert all((sv[1:, 0] != 0).any() for sv in saved)


def test_a_plan_with_torch_stages_keeps_python_loops_and_says_why():
    rec, comp = _compile(_softmax_down_the_columns())
    why = comp._program.c_loops
    assert isinstance(why, str) and "per-example shape" in why
    assert why == loops_refusal(comp._program.plan)
    xs, ctx = make_inputs(rec.cell, 4, 2, dtype=torch.float64)
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=torch.tensor([4, 2]))


def test_unmasked_loops_in_float32_equal_the_reference():
    rec = sg.Recurrence(BUILTIN["mufuru"]())
    comp = sg.compile(rec, backend="cpu")
    before = comp._program.c_loops.calls
    xs, ctx = make_inputs(rec.cell, 6, 4, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5)
    assert comp._program.c_loops.calls - before == 2


@pytest.mark.parametrize("lengths", [None, torch.tensor([40, 7, 33, 0])])
def test_a_call_long_enough_to_pack_its_weights_equals_the_reference_in_float32(lengths):
    # 40 steps x 4 rows reach SG_PACK_MIN_ROWS (128): the products run on packed weights, while
    # the short calls of the other tests multiply by the weights as they are
    rec = sg.Recurrence(BUILTIN["lstm"]())
    comp = sg.compile(rec, backend="cpu")
    xs, ctx = make_inputs(rec.cell, 40, 4, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5, lengths=lengths)


def test_inference_runs_the_forward_loop_that_saves_nothing():
    rec = sg.Recurrence(BUILTIN["gru"]())
    comp = sg.compile(rec, backend="cpu")
    x = torch.randn(7, 3, 3)
    before = comp._program.c_loops.calls
    with torch.no_grad():
        o2, s2 = comp(x, lengths=torch.tensor([7, 0, 4]))
        o1, s1 = rec(x, lengths=torch.tensor([7, 0, 4]))
    torch.testing.assert_close(o2, o1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s2["h"], s1["h"], atol=1e-6, rtol=1e-6)
    assert comp._program.c_loops.calls - before == 1


def test_strided_inputs_and_initial_states_are_read_in_place():
    rec = sg.Recurrence(BUILTIN["lstm"]()).double()
    comp = sg.compile(rec, backend="cpu")
    x = torch.randn(3, 5, 6, dtype=torch.float64).transpose(0, 1)[:, :, ::2]  # (5, 3, 3), strided columns
    big = torch.randn(3, 10, dtype=torch.float64)
    state = {"h": big[:, ::2], "c": big.t().contiguous().t()[:, 1::2]}
    o2, s2 = comp(x, state)
    o1, s1 = rec(x, state)
    torch.testing.assert_close(o2, o1, atol=1e-12, rtol=1e-12)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=1e-12, rtol=1e-12)


def _loop_inputs(comp, T, B, dtype=torch.float32):
    """The reads and states the generated forward loops take, from the prologue on random data."""
    fns = comp._program.fns
    xs, ctx = make_inputs(comp.cell, T, B, dtype=dtype, requires_grad=False)
    params = [p.detach() for p in comp.param_tensors().values()]
    reads = fns["prologue"](T, B, list(xs), [], [], params)
    states = [torch.randn(B, p.shape[0], dtype=dtype) for p, _ in comp.plan().step.states]
    return reads, states


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_the_c_forward_loop_equals_the_python_loop_for_any_weight_layout(layout):
    rec = sg.Recurrence(BUILTIN["gru_seed_form"]())
    comp = sg.compile(rec, backend="cpu")
    T, B = 4, 3
    reads, states = _loop_inputs(comp, T, B)
    weights = [k for k, r in enumerate(reads) if r.dim() == 2 and not comp.plan().reads[k].batched]
    assert len(weights) == 2  # the two recurrent GEMMs of the seed-form GRU
    for k, r in enumerate(reads):  # every weight matrix the loop multiplies by
        if r.dim() == 2 and not comp.plan().reads[k].batched:
            if layout == "transposed":
                reads[k] = r.t().contiguous().t()  # column-major: stride (1, N)
            else:
                big = torch.zeros(r.shape[0] * 2, r.shape[1] * 3)
                big[::2, ::3] = r
                reads[k] = big[::2, ::3]  # neither stride is 1: the loop copies it once
    mask = torch.tensor([[True, True, False]] * T)
    fns = comp._program.fns
    c_out, c_fin, c_saved = fns["forward"](T, B, mask, reads, states, True)
    p_out, p_fin, p_saved = fns["forward_c"].__globals__["forward"](T, B, mask, reads, states, True)
    for a, b in zip(c_out + c_fin, p_out + p_fin):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # what backward reads: the saved values of real rows (the C loop skips the padded last row)
    for a, b in zip(c_saved[0] + c_saved[1], p_saved[0] + p_saved[1]):
        torch.testing.assert_close(a[:, :2], b[:, :2], atol=1e-6, rtol=1e-6)


def test_empty_sequences_and_batches_equal_the_reference():
    rec = sg.Recurrence(BUILTIN["lstm"]())
    comp = sg.compile(rec, backend="cpu")
    for T, B in [(0, 2), (3, 0)]:
        x = torch.randn(T, B, 3, requires_grad=True)
        o2, s2 = comp(x)
        o1, s1 = rec(x)
        assert o2.shape == o1.shape == (T, B, 5)
        for k in s1:
            torch.testing.assert_close(s2[k], s1[k])


def test_the_source_shows_the_c_loops_and_their_wrappers():
    comp = sg.compile(sg.Recurrence(BUILTIN["lstm"]()), backend="cpu")
    src = comp.source()
    for name in ("fwd", "fwd_masked", "fwd_save", "fwd_save_masked", "bwd_plain", "bwd_masked"):
        assert f"int sg_loop_{name}(" in src
    assert "def forward_c(" in src and "def backward_masked_c(" in src
    assert "per step 1 GEMM(s) and 1 fused region(s), nothing else" in src


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cell_recipes(max_steps=5))
def test_random_cells_run_in_c_loops_and_equal_the_reference(recipe):
    cell, sizes = build_cell(recipe)
    rec = sg.Recurrence(cell).double()
    comp = sg.compile(rec, backend="cpu")
    loops = comp._program.c_loops
    before = loops.calls if isinstance(loops, CLoops) else None
    xs = [torch.randn(4, 3, s, dtype=torch.float64, requires_grad=True) for s in sizes]
    check_against_reference(rec, comp, xs, None, 1e-10, lengths=torch.tensor([4, 2, 0]))
    if before is not None:
        assert loops.calls - before == 2
    else:
        assert loops == loops_refusal(comp._program.plan)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cell_recipes(max_steps=5), st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=4, max_size=4))
def test_random_cells_equal_the_reference_under_any_mask(recipe, mask):
    # any (T, B) mask: rows that end a step as padding are skipped there, padded rows before a
    # real one are computed and dropped, and a mostly padded batch runs its hoisted products on
    # the real rows only
    cell, sizes = build_cell(recipe)
    rec = sg.Recurrence(cell).double()
    comp = sg.compile(rec, backend="cpu")
    xs = [torch.randn(4, 3, s, dtype=torch.float64, requires_grad=True) for s in sizes]
    check_against_reference(rec, comp, xs, None, 1e-10, mask=torch.tensor(mask))


def test_wide_regions_split_their_rows_over_threads_and_equal_the_reference(monkeypatch):
    from seqgraph.kernels.c_codegen import PARALLEL_WORK
    monkeypatch.setenv("SEQGRAPH_LOOP_SPLIT", "steps")  # one loop over the batch: each region call splits
    rec = sg.Recurrence(sg.cells.lstm(8, 256, layer_norm=True)).double()
    comp = sg.compile(rec, backend="cpu")
    assert f"< {PARALLEL_WORK}) return sg_region_" in comp.source()
    regions = comp._program.fns["_clib"].kernels
    B = 48
    assert any(B * sum(n.elements for n in k.region.nodes) >= PARALLEL_WORK for k in regions)  # threads take part
    xs, ctx = make_inputs(rec.cell, 3, B, dtype=torch.float64)
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=torch.arange(B) % 4)


def test_the_plan_says_how_the_loops_run():
    assert "time loops: C, one function per loop variant" in str(
        sg.compile(sg.Recurrence(BUILTIN["lstm"]()), backend="cpu").plan())
    python_loops = str(sg.compile(sg.Recurrence(_softmax_down_the_columns()), backend="cpu").plan())
    assert "time loops: Python, calling the C kernels (no C loop: " in python_loops
    assert "time loops: Python" in str(sg.compile(sg.Recurrence(BUILTIN["lstm"]()), backend="torch").plan())


@pytest.mark.filterwarnings("ignore:State 'g' .* is its own next value")  # a constant state, on purpose
def test_a_state_with_a_per_example_matrix_shape_runs_in_the_c_loops_as_a_row():
    from seqgraph.kernels.c_launch import CLibrary
    from seqgraph.kernels.c_loops import forward_loop
    x, h, g = sg.Input(3, name="x"), sg.State(4, name="h"), sg.State((2, 3), name="g")
    h2 = sg.tanh(sg.Linear(3 + 4, 4)(sg.concat([x, h])))
    comp = sg.compile(sg.Recurrence(sg.Cell(inputs=[x], states={h: h2, g: g}, outputs=[h2])), backend="cpu")
    src, why = forward_loop(comp.plan(), CLibrary(), False, False, "sg_loop_probe")
    assert src is not None and not why and loops_refusal(comp.plan()) is None
    g0 = torch.arange(12.0).reshape(2, 2, 3)
    x = torch.randn(3, 2, 3)
    with torch.no_grad():
        final = comp(x, {"g": g0})[1]["g"]
    torch.testing.assert_close(final, g0)
    assert final.shape == (2, 2, 3)


def test_scalar_states_run_in_c_loops_and_equal_the_reference_with_masks():
    x, h = sg.Input((), name="x"), sg.State((), name="h")
    h_next = sg.tanh(x * h + 0.5)
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next])).double()
    comp = sg.compile(rec, backend="cpu")
    assert isinstance(comp._program.c_loops, CLoops)
    xs = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 0, 2])
    o1, s1 = rec(xs, {"h": h0}, lengths=lengths)
    o2, s2 = comp(xs, {"h": h0}, lengths=lengths)
    torch.testing.assert_close(o2, o1)
    g1 = torch.autograd.grad(o1.sum() + s1["h"].sum(), [xs, h0])
    g2 = torch.autograd.grad(o2.sum() + s2["h"].sum(), [xs, h0])
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)


def test_one_thread_gives_the_same_results():
    rec = sg.Recurrence(sg.cells.lstm(8, 256)).double()
    comp = sg.compile(rec, backend="cpu")
    xs, ctx = make_inputs(rec.cell, 3, 40, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=torch.arange(40) % 4)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rows_split(monkeypatch, two_threads):
    """Every loop call splits its rows over two threads, whatever the batch and weight sizes."""
    monkeypatch.setenv("SEQGRAPH_LOOP_SPLIT", "rows")


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_cell_equals_the_reference_with_its_rows_split_over_threads(name, rows_split):
    rec, comp = _compile(name)
    loops = comp._program.c_loops
    xs, ctx = make_inputs(rec.cell, 5, 5, dtype=torch.float64)  # rows 0-1 on one thread, 2-4 on the other
    check_against_reference(rec, comp, xs, ctx, 1e-10, lengths=torch.tensor([5, 1, 3, 0, 4]))
    assert loops.last_threads == 2


def test_unmasked_float32_loops_equal_the_reference_with_their_rows_split(rows_split):
    rec = sg.Recurrence(BUILTIN["lstm_peephole_proj"]())
    comp = sg.compile(rec, backend="cpu")
    xs, ctx = make_inputs(rec.cell, 6, 9, dtype=torch.float32)
    check_against_reference(rec, comp, xs, ctx, 1e-5)
    assert comp._program.c_loops.last_threads == 2


SUMMED = ["indrnn", "lstm_layer_norm", "lstm_peephole_proj", "zoo_peephole_ln"]


@pytest.mark.parametrize("lengths", [None, [6, 0, 3, 6, 1]], ids=["unmasked", "masked"])
@pytest.mark.parametrize("split", ["rows", "steps"])
@pytest.mark.parametrize("name", SUMMED)
def test_weight_gradients_summed_over_steps_inside_the_loop_equal_the_reference(name, split, lengths, monkeypatch,
                                                                                 two_threads):
    # the loop adds a per-step vector's real rows into a (B, w) sum for a weight's gradient
    monkeypatch.setenv("SEQGRAPH_LOOP_SPLIT", split)
    rec, comp = _compile(name)
    assert "summed stash" in comp.source()
    xs, ctx = make_inputs(rec.cell, 6, 5, dtype=torch.float64)
    kw = {} if lengths is None else {"lengths": torch.tensor(lengths)}
    check_against_reference(rec, comp, xs, ctx, 1e-10, **kw)
    assert comp._program.c_loops.last_threads == (2 if split == "rows" else 1)


def test_strided_inputs_and_states_are_split_by_their_own_row_strides(rows_split):
    rec = sg.Recurrence(BUILTIN["lstm"]()).double()
    comp = sg.compile(rec, backend="cpu")
    x = torch.randn(7, 5, 6, dtype=torch.float64).transpose(0, 1)[:, :, ::2]  # (5, 7, 3): batch stride 6
    big = torch.randn(7, 10, dtype=torch.float64)
    state = {"h": big[:, ::2], "c": big.t().contiguous().t()[:, 1::2]}  # row strides 10 and 1
    lengths = torch.tensor([5, 2, 0, 4, 5, 1, 3])
    o2, s2 = comp(x, state, lengths=lengths)
    o1, s1 = rec(x, state, lengths=lengths)
    assert comp._program.c_loops.last_threads == 2
    torch.testing.assert_close(o2, o1, atol=1e-12, rtol=1e-12)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=1e-12, rtol=1e-12)


def test_a_split_loop_gives_the_results_of_one_loop_over_the_whole_batch(monkeypatch, two_threads):
    rec = sg.Recurrence(BUILTIN["mufuru"]())
    comp = sg.compile(rec, backend="cpu")
    x = torch.randn(6, 11, 3, requires_grad=True)
    lengths = torch.arange(11) % 7
    results = []
    for mode in ("steps", "rows"):
        monkeypatch.setenv("SEQGRAPH_LOOP_SPLIT", mode)
        out, state = comp(x, lengths=lengths)
        results.append([out, state["s"], *torch.autograd.grad(out.sum(), [x, *rec.parameters()])])
        assert comp._program.c_loops.last_threads == (1 if mode == "steps" else 2)
    for a, b in zip(*results):  # the same products and the same regions on the same rows
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(recipe=cell_recipes(max_steps=5))
def test_random_cells_equal_the_reference_with_their_rows_split_over_threads(rows_split, recipe):
    cell, sizes = build_cell(recipe)
    rec = sg.Recurrence(cell).double()
    comp = sg.compile(rec, backend="cpu")
    xs = [torch.randn(4, 5, s, dtype=torch.float64, requires_grad=True) for s in sizes]
    check_against_reference(rec, comp, xs, None, 1e-10, lengths=torch.tensor([4, 2, 0, 3, 1]))
    loops = comp._program.c_loops
    assert not isinstance(loops, CLoops) or loops.last_threads == 2


def test_small_weights_and_enough_rows_split_the_rows_over_the_threads(two_threads, monkeypatch):
    monkeypatch.delenv("SEQGRAPH_LOOP_SPLIT", raising=False)
    assert loop_threads(16, 512 * 128 * 4) == 2  # the benchmark's LSTM at B=16 H=128
    assert loop_threads(7, 512 * 128 * 4) == 1  # under 4 rows a thread
    assert loop_threads(64, ROW_SPLIT_MAX_WEIGHT_BYTES + 4) == 1  # the weights would leave the cache
    torch.set_num_threads(1)
    assert loop_threads(64, 1024) == 1


def test_the_split_can_be_forced_either_way(two_threads, monkeypatch):
    monkeypatch.setenv("SEQGRAPH_LOOP_SPLIT", "rows")
    assert loop_threads(3, 1 << 30) == 2 and loop_threads(1, 1024) == 1
    monkeypatch.setenv("SEQGRAPH_LOOP_SPLIT", "steps")
    assert loop_threads(64, 1024) == 1
    monkeypatch.setenv("SEQGRAPH_LOOP_SPLIT", "diagonal")
    with pytest.raises(ValueError, match="SEQGRAPH_LOOP_SPLIT must be one of auto, rows, steps, got 'diagonal'"):
        loop_threads(64, 1024)


def test_the_benchmark_lstm_runs_its_loops_split_over_two_threads(two_threads, monkeypatch):
    monkeypatch.delenv("SEQGRAPH_LOOP_SPLIT", raising=False)
    comp = sg.compile(sg.Recurrence(sg.cells.lstm(16, 128)), backend="cpu")
    x = torch.randn(3, 16, 16, requires_grad=True)
    comp(x)[0].sum().backward()
    assert comp._program.c_loops.last_threads == 2


def test_the_library_key_depends_on_the_cells_structure_not_on_node_ids_or_lines():
    # a second process builds cells in another order (other node ids) or from another file: it
    # must find the library the first one wrote
    from seqgraph.compiled import clear_cache, get_program
    keys = []
    for others in (0, 3):
        clear_cache()
        for _ in range(others):
            sg.cells.gru(5, 7)  # moves the node ids on
        lib = get_program(sg.cells.lstm(5, 7, peephole=True), "cpu").fns["_clib"]
        keys.append(lib.key(torch.float32))
    clear_cache()
    assert keys[0] == keys[1]
