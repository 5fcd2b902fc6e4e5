"""sg.nn.RNN / LSTM / GRU against torch.nn given the same weights: outputs, final states and
every gradient, for padded input with lengths and for PackedSequence input, across the
constructor flags (each flag, and pairs of them)."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqgraph as sg

T, B, I, H = 5, 3, 4, 5
LENGTHS = torch.tensor([5, 2, 4])  # unsorted on purpose: enforce_sorted=False paths
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

# (num_layers, bidirectional, batch_first, bias, extra kwargs)
LSTM_CONFIGS = [
    (1, False, False, True, {}),
    (2, False, False, True, {}),
    (3, True, False, True, {}),
    (1, True, True, True, {}),
    (1, False, True, False, {}),
    (2, False, False, True, {"proj_size": 3}),
    (2, True, True, False, {"proj_size": 3}),
    (3, True, False, True, {"proj_size": 2}),
    (1, False, True, True, {"proj_size": 2}),
    (3, False, True, True, {}),
]
GRU_CONFIGS = [
    (1, False, False, True, {}),
    (2, True, False, True, {}),
    (3, False, True, False, {}),
    (1, True, True, False, {}),
]
RNN_CONFIGS = [
    (1, False, False, True, {"nonlinearity": "tanh"}),
    (2, True, False, True, {"nonlinearity": "relu"}),
    (1, False, True, False, {"nonlinearity": "relu"}),
    (3, True, True, True, {"nonlinearity": "tanh"}),
]
CASES = ([("LSTM",) + c for c in LSTM_CONFIGS] + [("GRU",) + c for c in GRU_CONFIGS]
         + [("RNN",) + c for c in RNN_CONFIGS])


def case_id(case):
    mode, L, bi, bf, bias, kw = case
    parts = [mode, f"L{L}"] + (["bi"] if bi else []) + (["bf"] if bf else []) + ([] if bias else ["nobias"])
    return "-".join(parts + [f"{k}={v}" for k, v in kw.items()])


def make_pair(mode, L, bi, bf, bias, kw):
    args = dict(num_layers=L, bidirectional=bi, batch_first=bf, bias=bias, **kw)
    ref = getattr(torch.nn, mode)(I, H, **args)
    mine = getattr(sg.nn, mode)(I, H, **args)
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref, mine


def make_inputs(mode, L, bi, kw, batch=B):
    D = 2 if bi else 1
    out_size = kw.get("proj_size") or H
    x = torch.randn(T, batch, I)
    for b, n in enumerate(LENGTHS[:batch].tolist()):
        x[n:, b] = 50.0  # garbage in the padding: it must never be read
    h0 = torch.randn(L * D, batch, out_size, requires_grad=True)
    if mode == "LSTM":
        c0 = torch.randn(L * D, batch, H, requires_grad=True)
        return x, (h0, c0)
    return x, h0


def flat_state(mode, hn):
    return list(hn) if mode == "LSTM" else [hn]


def objective(out, states, seed=5):
    """A scalar that weights every output and state element differently."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for v in [out] + states:
        total = total + (v * torch.randn(v.shape, generator=g)).sum()
    return total


def grads(module, leaves):
    named = {n: p.grad.clone() for n, p in module.named_parameters()}
    return named, [v.grad.clone() for v in leaves]


def zero_grads(module, leaves):
    module.zero_grad()
    for v in leaves:
        v.grad = None


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_padded_input_with_lengths_matches_torch_packed(case):
    mode, L, bi, bf, bias, kw = case
    ref, mine = make_pair(*case)
    x, hx = make_inputs(mode, L, bi, kw)
    x_in = (x.transpose(0, 1) if bf else x).clone().requires_grad_()
    x_ref = x_in.detach().clone().requires_grad_()
    hx_list = flat_state(mode, hx)

    packed = pack_padded_sequence(x_ref, LENGTHS, batch_first=bf, enforce_sorted=False)
    out_p, hn_ref = ref(packed, hx)
    out_ref, _ = pad_packed_sequence(out_p, batch_first=bf, total_length=T)
    objective(out_ref, flat_state(mode, hn_ref)).backward()
    grads_ref = grads(ref, [x_ref] + hx_list)
    zero_grads(ref, hx_list)

    out, hn = mine(x_in, hx, lengths=LENGTHS)
    assert_close(out, out_ref)
    for a, b in zip(flat_state(mode, hn), flat_state(mode, hn_ref)):
        assert_close(a, b)
    objective(out, flat_state(mode, hn)).backward()
    g_mine, l_mine = grads(mine, [x_in] + hx_list)
    for name, g in grads_ref[0].items():
        torch.testing.assert_close(g_mine[name], g, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    for a, b in zip(l_mine, grads_ref[1]):
        assert_close(a, b)


def test_a_packed_sequence_runs_longest_first_so_steps_skip_ended_rows():
    lstm = sg.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    seen = []
    for row in lstm._recs:
        for rec in row:
            rec.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["lengths"].tolist()), with_kwargs=True)
    lstm(pack_padded_sequence(torch.randn(5, 3, 3), LENGTHS, enforce_sorted=False))
    assert seen == [[5, 4, 2]] * 4


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_packed_sequence_input_matches_torch(case):
    mode, L, bi, bf, bias, kw = case
    ref, mine = make_pair(*case)
    x, hx = make_inputs(mode, L, bi, kw)
    hx_list = flat_state(mode, hx)
    x_ref = x.clone().requires_grad_()
    x_mine = x.clone().requires_grad_()

    out_ref, hn_ref = ref(pack_padded_sequence(x_ref, LENGTHS, enforce_sorted=False), hx)
    objective(out_ref.data, flat_state(mode, hn_ref)).backward()
    grads_ref = grads(ref, [x_ref] + hx_list)
    zero_grads(ref, hx_list)

    out, hn = mine(pack_padded_sequence(x_mine, LENGTHS, enforce_sorted=False), hx)
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(out.batch_sizes, out_ref.batch_sizes)
    assert torch.equal(out.sorted_indices, out_ref.sorted_indices)
    assert torch.equal(out.unsorted_indices, out_ref.unsorted_indices)
    assert_close(out.data, out_ref.data)
    for a, b in zip(flat_state(mode, hn), flat_state(mode, hn_ref)):
        assert_close(a, b)
    objective(out.data, flat_state(mode, hn)).backward()
    g_mine, l_mine = grads(mine, [x_mine] + hx_list)
    for name, g in grads_ref[0].items():
        torch.testing.assert_close(g_mine[name], g, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    for a, b in zip(l_mine, grads_ref[1]):
        assert_close(a, b)


@pytest.mark.parametrize("mode,kw", [("LSTM", {"proj_size": 2}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("batch_first", [False, True])
def test_full_length_input_without_hx_matches_torch(mode, kw, batch_first):
    ref, mine = make_pair(mode, 2, True, batch_first, True, kw)
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    out_ref, hn_ref = ref(x)
    out, hn = mine(x)
    assert_close(out, out_ref)
    for a, b in zip(flat_state(mode, hn), flat_state(mode, hn_ref)):
        assert_close(a, b)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_unbatched_input_matches_torch(mode):
    ref, mine = make_pair(mode, 2, True, False, True, {})
    x = torch.randn(T, I)
    out_ref, hn_ref = ref(x)
    out, hn = mine(x)
    assert out.shape == out_ref.shape
    assert_close(out, out_ref)
    for a, b in zip(flat_state(mode, hn), flat_state(mode, hn_ref)):
        assert_close(a, b)


def test_inter_layer_dropout_matches_torch_in_evaluation_and_is_random_in_training():
    ref, mine = make_pair("LSTM", 3, False, False, True, {})
    ref.dropout = mine.dropout = 0.5
    x = torch.randn(T, B, I)
    ref.eval(), mine.eval()
    assert_close(mine(x)[0], ref(x)[0])
    mine.train()
    assert not torch.allclose(mine(x)[0], mine(x)[0])


@pytest.mark.parametrize("mode,kw", [("LSTM", {"proj_size": 3}), ("GRU", {}), ("RNN", {})])
def test_state_dict_loads_strictly_both_ways(mode, kw):
    ref = getattr(torch.nn, mode)(I, H, num_layers=2, bidirectional=True, **kw)
    mine = getattr(sg.nn, mode)(I, H, num_layers=2, bidirectional=True, **kw)
    assert list(mine.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in ref.named_parameters()]
    mine.load_state_dict(ref.state_dict(), strict=True)
    back = getattr(torch.nn, mode)(I, H, num_layers=2, bidirectional=True, **kw)
    back.load_state_dict(mine.state_dict(), strict=True)
    for name, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], v)


def test_initialisation_uses_torch_bounds():
    mine = sg.nn.LSTM(I, 16, num_layers=2)
    bound = 1 / 16 ** 0.5
    for p in mine.parameters():
        assert p.abs().max() <= bound


def test_double_precision_matches_torch():
    ref, mine = make_pair("GRU", 2, True, False, True, {})
    ref.double(), mine.double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.testing.assert_close(mine(x)[0], ref(x)[0])


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_a_sequence_of_no_steps_returns_the_initial_state(mode):
    m = getattr(sg.nn, mode)(4, 6, num_layers=2)
    h0 = torch.randn(2, 3, 6)
    hx = (h0, torch.randn(2, 3, 6)) if mode == "LSTM" else h0
    out, final = m(torch.randn(0, 3, 4), hx)
    assert out.shape == (0, 3, 6)
    for got, given in zip(final if mode == "LSTM" else [final], hx if mode == "LSTM" else [hx]):
        assert torch.equal(got, given)
    _, final = m(torch.randn(0, 3, 4))
    assert all(torch.equal(v, torch.zeros(2, 3, 6)) for v in (final if mode == "LSTM" else [final]))


def test_deepcopy_owns_independent_parameters():
    mine = sg.nn.LSTM(I, H)
    twin = copy.deepcopy(mine)
    x = torch.randn(T, B, I)
    before = mine(x)[0].detach()
    with torch.no_grad():
        twin.weight_hh_l0.add_(1.0)
    assert torch.equal(mine(x)[0], before)
    assert not torch.allclose(twin(x)[0], before)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        sg.nn.LSTM(I, H, backend="cudnn")


def test_compiled_backend_matches_torch_lstm():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True)
    m = sg.nn.LSTM(I, H, num_layers=2, bidirectional=True, backend="torch")
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, I)
    o1, (h1, c1) = ref(x)
    o2, (h2, c2) = m(x)
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2, c1, atol=1e-5, rtol=1e-5)
    o1.sum().backward()
    o2.sum().backward()
    for a, b in zip(ref.parameters(), m.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [0, 4.0, True])
def test_an_input_size_that_is_not_a_positive_int_is_refused_by_name(size):
    with pytest.raises(ValueError, match=f"input_size must be a positive integer, got {size!r}"):
        sg.nn.LSTM(size, H)


def test_weights_held_as_plain_tensors_run_and_get_gradients_as_in_torch():
    # functional / meta-learning code swaps each Parameter for a plain tensor attribute
    torch.manual_seed(0)
    ref, mine = torch.nn.GRU(I, H).double(), sg.nn.GRU(I, H).double()
    mine.load_state_dict(ref.state_dict())
    for m in (ref, mine):
        for name in list(m._parameters):
            t = m._parameters.pop(name).detach().clone().requires_grad_()
            setattr(m, name, t)
    x = torch.randn(5, 3, I, dtype=torch.float64)
    (o1, _), (o2, _) = ref(x), mine(x)
    torch.testing.assert_close(o2, o1)
    g1 = torch.autograd.grad(o1.sum(), [ref.weight_hh_l0])
    g2 = torch.autograd.grad(o2.sum(), [mine.weight_hh_l0])
    torch.testing.assert_close(g2, g1)


def test_projection_not_smaller_than_hidden_is_refused():
    with pytest.raises(ValueError, match="proj_size"):
        sg.nn.LSTM(I, H, proj_size=H)


def test_a_numpy_array_is_asked_to_be_a_tensor():
    import numpy as np  # in the test extras
    with pytest.raises(sg.InputError, match=r"sg.nn.LSTM: expected input to be a tensor \(or a PackedSequence\), got ndarray"):
        sg.nn.LSTM(3, 4)(np.zeros((5, 2, 3), np.float32))


def test_wrong_input_size_is_an_input_error():
    with pytest.raises(sg.InputError, match="input_size"):
        sg.nn.GRU(I, H)(torch.randn(T, B, I + 1))


def test_wrong_hx_shape_is_an_input_error():
    with pytest.raises(sg.InputError, match="h_0"):
        sg.nn.LSTM(I, H, num_layers=2)(torch.randn(T, B, I), (torch.zeros(1, B, H), torch.zeros(2, B, H)))


def test_lengths_with_a_packed_sequence_are_refused():
    packed = pack_padded_sequence(torch.randn(T, B, I), LENGTHS, enforce_sorted=False)
    with pytest.raises(sg.InputError, match="PackedSequence"):
        sg.nn.GRU(I, H)(packed, lengths=LENGTHS)


def test_loading_with_assign_rebinds_the_recurrences():
    ref, mine = make_pair("LSTM", 2, True, False, True, {})
    fresh = sg.nn.LSTM(I, H, num_layers=2, bidirectional=True)
    fresh.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True)
    x = torch.randn(T, B, I)
    assert_close(fresh(x)[0], ref(x)[0])


def test_parameter_swapping_conversion_keeps_recurrences_in_sync():
    ref, mine = make_pair("GRU", 1, False, False, True, {})
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        mine.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.testing.assert_close(mine(x)[0], ref.double()(x)[0])


def test_mask_gives_the_same_result_as_lengths_with_batch_first():
    mine = sg.nn.GRU(I, H, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(B, T, I)
    mask = torch.arange(T).unsqueeze(0) < LENGTHS.unsqueeze(1)  # (B, T) like the input
    by_lengths = mine(x, lengths=LENGTHS)
    by_mask = mine(x, mask=mask)
    assert_close(by_mask[0], by_lengths[0])
    assert_close(by_mask[1], by_lengths[1])


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_a_parametrized_weight_is_the_one_the_step_uses_and_trains(backend):
    mine, ref = sg.nn.LSTM(I, H, backend=backend), torch.nn.LSTM(I, H)
    ref.load_state_dict(mine.state_dict())
    for m in (mine, ref):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    x = torch.randn(T, B, I)
    out_mine, out_ref = mine(x)[0], ref(x)[0]
    torch.testing.assert_close(out_mine, out_ref)
    out_mine.sum().backward()
    out_ref.sum().backward()
    for name in ("original0", "original1"):
        torch.testing.assert_close(getattr(mine.parametrizations.weight_hh_l0, name).grad,
                                   getattr(ref.parametrizations.weight_hh_l0, name).grad)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_parametrized_module_converts_and_loads_its_state_dict_as_torch_nn_does(backend):
    mine, ref = sg.nn.GRU(I, H, backend=backend), torch.nn.GRU(I, H)
    ref.load_state_dict(mine.state_dict())
    for m in (mine, ref):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
        m.double()
    fresh = sg.nn.GRU(I, H, backend=backend, dtype=torch.float64)
    torch.nn.utils.parametrizations.weight_norm(fresh, "weight_hh_l0")
    fresh.load_state_dict(mine.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.testing.assert_close(mine(x)[0], ref(x)[0])
    torch.testing.assert_close(fresh(x)[0], ref(x)[0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_weight_dropped_module_moves_before_and_after_its_first_call(backend):
    # AWD-LSTM's WeightDrop: the Parameter is deleted, and a computed tensor set per call
    mine, ref = sg.nn.LSTM(I, H, backend=backend), torch.nn.LSTM(I, H)
    ref.load_state_dict(mine.state_dict())
    x = torch.randn(T, B, I)
    for m in (mine, ref):
        raw = torch.nn.Parameter(m.weight_hh_l0.detach().clone())
        del m._parameters["weight_hh_l0"]
        m.register_parameter("weight_hh_raw", raw)
        m.to("cpu")
        m.weight_hh_l0 = m.weight_hh_raw * 0.5
        m.double()
        m.weight_hh_l0 = m.weight_hh_raw * 0.5
    torch.testing.assert_close(mine(x.double())[0], ref(x.double())[0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_weight_reassigned_after_construction_is_the_one_the_step_uses(backend):
    mine, ref = sg.nn.GRU(I, H, backend=backend), torch.nn.GRU(I, H)
    ref.load_state_dict(mine.state_dict())
    for m in (mine, ref):
        m.weight_hh_l0 = torch.nn.Parameter(torch.full((3 * H, H), 0.1))
    x = torch.randn(T, B, I)
    torch.testing.assert_close(mine(x)[0], ref(x)[0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_module_saved_whole_with_torch_save_loads_and_gives_the_same_outputs(backend, tmp_path):
    mine = sg.nn.GRU(I, H, num_layers=2, bidirectional=True, backend=backend)
    torch.save(mine, tmp_path / "gru.pt")
    loaded = torch.load(tmp_path / "gru.pt", weights_only=False)
    x = torch.randn(T, B, I)
    torch.testing.assert_close(loaded(x)[0], mine(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(lengths=2), dict(lengths=torch.tensor(2)), dict(lengths=torch.tensor([2])),
                                dict(mask=torch.tensor([True, True, False, False, False])),
                                dict(mask=torch.tensor([[True], [True], [False], [False], [False]]))])
def test_one_unbatched_sequence_takes_a_length_or_mask_of_its_own_shape(kw):
    mine = sg.nn.LSTM(I, H)
    ref = torch.nn.LSTM(I, H)
    ref.load_state_dict(mine.state_dict())
    x = torch.randn(T, I)
    out, (h, c) = mine(x, **kw)
    want, (wh, wc) = ref(x[:2])
    torch.testing.assert_close(out[:2], want)
    assert (out[2:] == 0).all()
    torch.testing.assert_close((h, c), (wh, wc))


def test_an_error_from_a_layer_names_the_sg_nn_class_and_layer():
    mine = sg.nn.GRU(I, H, num_layers=2)
    with pytest.raises(sg.InputError, match=rf"^sg.nn.GRU \(layer 0\): lengths must lie in \[0, {T}\]"):
        mine(torch.randn(T, B, I), lengths=torch.tensor([T + 1, 1, 1]))


@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2, bidirectional=True), dict(bias=False), dict(proj_size=3)])
def test_all_weights_lists_the_weights_in_torch_order(kw):
    mine, ref = sg.nn.LSTM(I, H, **kw), torch.nn.LSTM(I, H, **kw)
    ref.load_state_dict(mine.state_dict())
    got, want = mine.all_weights, ref.all_weights
    assert [len(row) for row in got] == [len(row) for row in want]
    for a, b in zip(got, want):
        for p, q in zip(a, b):
            assert torch.equal(p, q)


def test_gru_hx_given_as_a_tuple_names_what_came():
    with pytest.raises(sg.InputError, match=r"expected hx of shape \(1, 3, 5\), got a tuple"):
        sg.nn.GRU(I, H)(torch.randn(T, B, I), (torch.zeros(1, B, H),))


def test_lstm_c0_missing_names_what_came():
    with pytest.raises(sg.InputError, match=r"expected c_0 of shape \(1, 3, 5\), got a NoneType"):
        sg.nn.LSTM(I, H)(torch.randn(T, B, I), (torch.zeros(1, B, H), None))


def test_a_batch_first_mask_of_the_wrong_shape_names_the_users_layout():
    mine = sg.nn.LSTM(I, H, batch_first=True)
    with pytest.raises(sg.InputError, match=rf"with batch_first=True, mask must be a bool tensor of shape \({B}, {T}\) "
                                            rf"\(B, T\), got \({T}, {B}\)"):
        mine(torch.randn(B, T, I), mask=torch.ones(T, B, dtype=torch.bool))


def test_recurrence_gives_the_module_that_runs_a_layer_and_direction():
    mine = sg.nn.GRU(I, H, num_layers=2, bidirectional=True, backend="cpu")
    rec = mine.recurrence(1, 1)
    assert isinstance(rec, sg.CompiledRecurrence) and rec.plan() is not None
    assert rec.param_tensors()["ih.weight"] is mine.weight_ih_l1_reverse
    with pytest.raises(IndexError, match="has 2 layer"):
        mine.recurrence(2)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bidirectional": True}], ids=["one_layer", "two_bidirectional"])
def test_the_same_seed_gives_torch_nn_weights_and_leaves_the_generator_where_torch_nn_does(mode, kw):
    torch.manual_seed(0)
    ref = getattr(torch.nn, mode)(I, H, **kw)
    after_ref = torch.rand(3)
    torch.manual_seed(0)
    mine = getattr(sg.nn, mode)(I, H, **kw)
    assert torch.equal(torch.rand(3), after_ref)
    for (name, p), (name_ref, q) in zip(mine.named_parameters(), ref.named_parameters(), strict=True):
        assert name == name_ref and torch.equal(p, q)


def test_functional_call_on_a_meta_copy_with_real_weights_runs():
    import copy
    from torch.func import functional_call
    mine = sg.nn.LSTM(I, H)
    weights = {k: v.detach().clone() for k, v in mine.named_parameters()}
    x = torch.randn(T, B, I)
    out = functional_call(copy.deepcopy(mine).to("meta"), weights, (x,))[0]
    torch.testing.assert_close(out, mine(x)[0])


# -- one-step cells: sg.nn.RNNCell / LSTMCell / GRUCell against torch.nn's -----------------------
CELL_CASES = [("LSTMCell", {}), ("LSTMCell", {"bias": False}), ("GRUCell", {}), ("GRUCell", {"bias": False}),
              ("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"}), ("RNNCell", {"bias": False})]


def _cell_pair(mode, kw, backend="auto"):
    ref = getattr(torch.nn, mode)(I, H, dtype=torch.float64, **kw)
    mine = getattr(sg.nn, mode)(I, H, dtype=torch.float64, backend=backend, **kw)
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref, mine


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("mode,kw", CELL_CASES, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                                                     for m, kw in CELL_CASES])
def test_cell_steps_and_gradients_equal_torch_nn_cells_with_copied_weights(mode, kw, backend):
    ref, mine = _cell_pair(mode, kw, backend)
    torch.manual_seed(0)
    x = torch.randn(B, I, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(B, H, dtype=torch.float64, requires_grad=True) for _ in range(2 if mode == "LSTMCell" else 1))
    given = hx if mode == "LSTMCell" else hx[0]
    want, got = _as_tuple(ref(x, given)), _as_tuple(mine(x, given))
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a)
    weights = torch.linspace(0.5, 1.5, H, dtype=torch.float64)
    wrt = [x, *hx]
    g_want = torch.autograd.grad(sum((v * weights).sum() for v in want), wrt + list(ref.parameters()))
    g_got = torch.autograd.grad(sum((v * weights).sum() for v in got), wrt + list(mine.parameters()))
    for a, b in zip(g_want, g_got, strict=True):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell", "RNNCell"])
def test_a_cell_without_hx_starts_from_zeros_and_takes_unbatched_input(mode):
    ref, mine = _cell_pair(mode, {})
    x = torch.randn(I, dtype=torch.float64)
    for a, b in zip(_as_tuple(ref(x)), _as_tuple(mine(x)), strict=True):
        assert b.shape == (H,)
        torch.testing.assert_close(b, a)
    hx = (torch.randn(H, dtype=torch.float64), torch.randn(H, dtype=torch.float64))
    given = hx if mode == "LSTMCell" else hx[0]
    for a, b in zip(_as_tuple(ref(x, given)), _as_tuple(mine(x, given)), strict=True):
        torch.testing.assert_close(b, a)


def test_cells_run_a_decoder_loop_feeding_their_state_back():
    ref, mine = _cell_pair("LSTMCell", {})
    x = torch.randn(7, B, I, dtype=torch.float64)
    s_ref = s_mine = None
    for t in range(7):
        s_ref, s_mine = ref(x[t], s_ref), mine(x[t], s_mine)
    torch.testing.assert_close(s_mine[0], s_ref[0])
    torch.testing.assert_close(s_mine[1], s_ref[1])


def test_a_cells_state_dict_loads_into_torch_nn_and_back_strictly():
    mine = sg.nn.GRUCell(I, H)
    ref = torch.nn.GRUCell(I, H)
    ref.load_state_dict(mine.state_dict(), strict=True)
    assert set(mine.state_dict()) == {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
    x = torch.randn(B, I)
    torch.testing.assert_close(mine(x), ref(x))


def test_a_converted_cell_runs_in_its_new_dtype():
    mine = sg.nn.LSTMCell(I, H).double()
    h, c = mine(torch.randn(B, I, dtype=torch.float64))
    assert h.dtype == c.dtype == torch.float64


def test_sg_compile_of_a_module_holding_a_cell_switches_its_backend():
    holder = torch.nn.Sequential(sg.nn.GRUCell(I, H, backend="reference"))
    assert sg.compile(holder, backend="torch") is holder
    assert holder[0].backend == "torch" and holder[0].recurrence().backend == "torch"


@pytest.mark.parametrize("call,message", [
    (lambda c: c(torch.randn(2, 3, I)), "Expected input to be 1D or 2D, got 3D"),
    (lambda c: c(torch.randn(B, I + 1)), f"got {I + 1} expected {I}"),
    (lambda c: c(torch.randn(B, I), torch.zeros(B, H)), "hx must be a tuple"),
    (lambda c: c(torch.randn(B, I), (torch.zeros(B, H + 1), torch.zeros(B, H))), rf"hx\[0\] of shape \({B}, {H}\)"),
    (lambda c: c(torch.randn(I), (torch.zeros(B, H), torch.zeros(B, H))), rf"hx\[0\] of shape \({H},\) \(as the unbatched"),
    (lambda c: c([1.0] * I), "expected input to be a tensor, got list"),
])
def test_a_cells_bad_input_is_refused_naming_what_was_expected(call, message):
    with pytest.raises(sg.InputError, match=message):
        call(sg.nn.LSTMCell(I, H))


def test_a_cells_repr_names_its_sizes_and_flags():
    assert repr(sg.nn.RNNCell(I, H, bias=False, nonlinearity="relu")) == f"RNNCell({I}, {H}, bias=False, nonlinearity='relu')"


def test_a_deep_copied_cell_steps_with_its_own_weights():
    cell = sg.nn.LSTMCell(I, H)
    twin = copy.deepcopy(cell)
    with torch.no_grad():
        twin.weight_ih.add_(1.0)
    x = torch.randn(B, I)
    assert twin.recurrence().params.ih.weight is twin.weight_ih
    assert not torch.allclose(twin(x)[0], cell(x)[0])


def test_a_cell_steps_with_a_weight_reassigned_after_it_was_made():
    ref, mine = _cell_pair("GRUCell", {})
    new = torch.nn.Parameter(torch.randn(3 * H, H, dtype=torch.float64))
    ref.weight_hh, mine.weight_hh = new, new
    x, h = torch.randn(B, I, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    torch.testing.assert_close(mine(x, h), ref(x, h))


def test_a_cell_steps_with_a_weight_norm_parametrized_weight():
    ref, mine = _cell_pair("LSTMCell", {})
    for m in (ref, mine):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh")
    x = torch.randn(B, I, dtype=torch.float64)
    hx = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))
    torch.testing.assert_close(mine(x, hx)[0], ref(x, hx)[0])
    mine(x, hx)[0].sum().backward()
    assert mine.parametrizations.weight_hh.original0.grad is not None


def test_recurrence_of_a_layer_names_the_directions_for_a_direction_that_is_no_int():
    with pytest.raises(TypeError, match=r"direction must be an int \(0 forward, 1 reverse\), got 'backward'"):
        sg.nn.LSTM(I, H, bidirectional=True).recurrence(0, "backward")


@pytest.mark.parametrize("mode,args", [("LSTM", (torch.randn(T, B, I),)), ("LSTMCell", (torch.randn(B, I),))])
def test_functional_call_runs_the_weights_it_is_given_as_torch_nn_does(mode, args):
    from torch.func import functional_call
    ref, mine = getattr(torch.nn, mode)(I, H), getattr(sg.nn, mode)(I, H)
    mine.load_state_dict(ref.state_dict())
    given = {k: torch.randn_like(v) for k, v in ref.named_parameters()}
    torch.testing.assert_close(functional_call(mine, given, args)[0], functional_call(ref, given, args)[0])
    torch.testing.assert_close(mine(*args)[0], ref(*args)[0])  # and its own weights again after


def test_a_layer_runs_a_weight_reassigned_after_it_was_made():
    ref, mine = make_pair("GRU", 2, False, False, True, {})
    new = torch.nn.Parameter(torch.randn(3 * H, H))
    ref.weight_hh_l1, mine.weight_hh_l1 = new, new
    x = torch.randn(T, B, I)
    torch.testing.assert_close(mine(x)[0], ref(x)[0])


def test_under_autocast_a_layer_takes_bfloat16_input_and_hx_as_torch_nn_does():
    mine = sg.nn.GRU(I, H)
    x, h0 = torch.randn(T, B, I, dtype=torch.bfloat16), torch.randn(1, B, H, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h_n = mine(x, h0)
    torch.testing.assert_close(out, mine(x.float(), h0.float())[0], atol=2e-2, rtol=2e-2)
    assert h_n.shape == (1, B, H)


@pytest.mark.parametrize("mode,hx,named", [("LSTMCell", lambda h: (h, h.double()), r"hx\[1\]"),
                                           ("GRUCell", lambda h: h.long(), "hx")])
def test_a_cell_given_hx_of_another_dtype_names_hx(mode, hx, named):
    with pytest.raises(sg.InputError, match=rf"sg.nn.{mode}: {named} has dtype torch.(float64|int64) but the "
                                            rf"input is torch.float32"):
        getattr(sg.nn, mode)(I, H)(torch.randn(B, I), hx(torch.zeros(B, H)))


def test_under_autocast_a_cell_takes_bfloat16_hx():
    mine = sg.nn.LSTMCell(I, H)
    x, h = torch.randn(B, I), torch.randn(B, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mine(x, (h.bfloat16(), h.bfloat16()))
    torch.testing.assert_close(got[0].float(), mine(x, (h.bfloat16().float(), h.bfloat16().float()))[0],
                               atol=3e-2, rtol=3e-2)


def test_a_cell_loaded_with_assign_steps_with_the_loaded_weights():
    ref, mine = torch.nn.LSTMCell(I, H), sg.nn.LSTMCell(I, H)
    mine.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(B, I)
    torch.testing.assert_close(mine(x)[0], ref(x)[0])
    assert mine.recurrence().params.ih.weight is mine.weight_ih


@pytest.mark.parametrize("module, tokens", [(lambda: sg.nn.LSTM(4, 5), (6, 3)), (lambda: sg.nn.GRU(4, 5), (6, 3, 4)),
                                            (lambda: sg.nn.LSTMCell(4, 5), (3,))])
def test_token_ids_given_for_features_are_named_as_such(module, tokens):
    ids = torch.randint(0, 10, tokens)  # an embedding forgotten in front
    with pytest.raises(sg.InputError, match=r"input has dtype torch.int64 .*floating-point features.*nn.Embedding"):
        module()(ids)


def test_a_packed_sequence_of_token_ids_is_named_as_such():
    ids = pack_padded_sequence(torch.randint(0, 10, (6, 3)), torch.tensor([6, 4, 2]))
    with pytest.raises(sg.InputError, match=r"input has dtype torch.int64 .*PackedSequence.*nn.Embedding"):
        sg.nn.LSTM(4, 5)(ids)
