"""sg.cells: each cell against a plain-torch step written from its published equations, float64
gradchecks, the parameter layout the compiler and sg.nn rely on, and NormStabilizer."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import seqgraph as sg

T, B, I, H = 4, 3, 3, 5


def run_reference(step, x, states):
    """Run a torch step function (x_t, states) -> (out, states) over a (T, B, I) tensor."""
    outs = []
    for t in range(x.shape[0]):
        out, states = step(x[t], states)
        outs.append(out)
    return torch.stack(outs), states


def lin(P, name, v):
    y = v @ P[f"{name}.weight"].T
    return y + P[f"{name}.bias"] if f"{name}.bias" in P else y


def params_of(rec):
    return {k: v.detach() for k, v in rec.param_tensors().items()}


def assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------
# Elman RNN and Torch7's Recurrent
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("nonlinearity,bias", [("tanh", True), ("relu", True), ("tanh", False)])
def test_rnn_matches_elman_equations(nonlinearity, bias):
    rec = sg.Recurrence(sg.cells.rnn(I, H, nonlinearity=nonlinearity, bias=bias))
    P = params_of(rec)
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    x = torch.randn(T, B, I)
    out, final = rec(x)
    ref, (h,) = run_reference(lambda xt, s: (lambda h: (h, (h,)))(act(lin(P, "ih", xt) + lin(P, "hh", s[0]))),
                              x, (torch.zeros(B, H),))
    assert_close(out, ref)
    assert_close(final["h"], h)


def test_rnn_without_bias_has_no_bias_parameters():
    assert sorted(sg.cells.rnn(I, H, bias=False).params) == ["hh.weight", "ih.weight"]


def test_recurrent_first_step_uses_start_then_feedback_like_torch7():
    cell = sg.cells.recurrent(H, sg.Linear(I, H, name="inp"), sg.Linear(H, H, name="fb"), sg.Tanh())
    rec = sg.Recurrence(cell)
    P = params_of(rec)
    x = torch.randn(T, B, I)
    out, _ = rec(x)
    h = torch.tanh(lin(P, "inp", x[0]) + P["start"])
    expected = [h]
    for t in range(1, T):
        h = torch.tanh(lin(P, "inp", x[t]) + lin(P, "fb", h))
        expected.append(h)
    assert_close(out, torch.stack(expected))


def test_recurrent_defaults_to_sigmoid_transfer_and_sum_merge():
    cell = sg.cells.recurrent(H, sg.Linear(I, H, name="inp"), sg.Linear(H, H, name="fb"))
    rec = sg.Recurrence(cell)
    P = params_of(rec)
    x = torch.randn(2, B, I)
    out, _ = rec(x)
    h1 = torch.sigmoid(lin(P, "inp", x[0]) + P["start"])
    h2 = torch.sigmoid(lin(P, "inp", x[1]) + lin(P, "fb", h1))
    assert_close(out, torch.stack([h1, h2]))


def test_recurrent_needs_sizes_it_cannot_infer():
    with pytest.raises(ValueError, match="input_size"):
        sg.cells.recurrent(sg.Identity(), sg.Identity(), sg.Linear(H, H))


def test_recurrent_with_a_lookup_table_input_module_reads_token_ids_like_torch7():
    # the seed's nn.Recurrent(H, nn.LookupTable(nIndex, H), nn.Linear(H, H), nn.Sigmoid(), rho)
    rec = sg.Recurrence(sg.cells.recurrent(H, sg.Embedding(10, H, name="lut"), sg.Linear(H, H, name="fb")))
    P = params_of(rec)
    ids = torch.randint(0, 10, (T, B))
    out, _ = rec(ids)
    h = torch.sigmoid(P["lut.weight"][ids[0]] + P["start"])
    expected = [h]
    for t in range(1, T):
        h = torch.sigmoid(P["lut.weight"][ids[t]] + lin(P, "fb", h))
        expected.append(h)
    assert_close(out, torch.stack(expected))


@pytest.mark.parametrize("start", [(H,), [H], torch.Size([H]), torch.tensor(H), torch.tensor([H])],
                         ids=["tuple", "list", "torch.Size", "0-d LongTensor", "1-element LongTensor"])
def test_recurrent_takes_start_as_a_one_number_size_like_torch7(start):
    np = pytest.importorskip("numpy")
    for size in (start, np.int64(H)):
        cell = sg.cells.recurrent(size, sg.Linear(I, H), sg.Linear(H, H))
        assert cell.params["start"].shape == (H,)


@pytest.mark.parametrize("start,error,message", [
    ((H, 2), ValueError, "start as a size must be one number"), (0, ValueError, "must be a positive int, got 0"),
    (2.5, ValueError, "must be a positive int, got 2.5"), ("5", TypeError, "start must be the state size")])
def test_recurrent_refuses_a_start_that_is_neither_a_size_nor_a_module(start, error, message):
    with pytest.raises(error, match=message):
        sg.cells.recurrent(start, sg.Linear(I, H), sg.Linear(H, H))


# ---------------------------------------------------------------------------------------
# LSTM family
# ---------------------------------------------------------------------------------------
def lstm_reference(P, peephole=False, proj=False, layer_norm=False, masks=None, zoneout=0.0, p=0.0):
    """The LSTM step of the Torch7 rnn docs (FastLSTM; peephole LSTM; SeqLSTMP's eq. 7) and of
    Ba et al. (layer norm), with Gal masks on x and h and zoneout masks when given."""
    masks = masks or {}

    def step(xt, s):
        h, c = s
        if "drop_x" in masks:
            xt = xt * masks["drop_x"] / (1 - p)
            hin = h * masks["drop_h"] / (1 - p)
        else:
            hin = h
        gx, gh = lin(P, "ih", xt), lin(P, "hh", hin)
        if layer_norm:
            gx = F.layer_norm(gx, gx.shape[-1:], P["ln_ih.weight"], P["ln_ih.bias"])
            gh = F.layer_norm(gh, gh.shape[-1:], P["ln_hh.weight"], P["ln_hh.bias"])
        i, f, g, o = (gx + gh).chunk(4, dim=1)
        if peephole:
            i, f = i + P["w_ci"] * c, f + P["w_cf"] * c
        c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if peephole:
            o = o + P["w_co"] * c2
        cr = F.layer_norm(c2, c2.shape[-1:], P["ln_c.weight"], P["ln_c.bias"]) if layer_norm else c2
        h2 = torch.sigmoid(o) * torch.tanh(cr)
        if proj:
            h2 = h2 @ P["hr.weight"].T
        if "zoneout_h" in masks:
            mh, mc = masks["zoneout_h"][step.t], masks["zoneout_c"][step.t]
            h2, c2 = mh * h2 + (1 - mh) * h, mc * c2 + (1 - mc) * c
        elif zoneout:
            h2, c2 = (1 - zoneout) * h2 + zoneout * h, (1 - zoneout) * c2 + zoneout * c
        step.t += 1
        return h2, (h2, c2)

    step.t = 0
    return step


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"peephole": True}, {"proj_size": 2},
                                    {"layer_norm": True}, {"peephole": True, "proj_size": 2, "layer_norm": True}],
                         ids=["fastlstm", "nobias", "peephole", "lstmp", "layernorm", "all"])
def test_lstm_matches_published_equations(kwargs):
    rec = sg.Recurrence(sg.cells.lstm(I, H, **kwargs))
    with torch.no_grad():  # non-trivial layer-norm gains and shifts
        for k, v in rec.param_tensors().items():
            if k.startswith("ln_"):
                v.uniform_(0.5, 1.5)
    P = params_of(rec)
    out_size = kwargs.get("proj_size") or H
    x = torch.randn(T, B, I)
    h0, c0 = torch.randn(B, out_size), torch.randn(B, H)
    out, final = rec(x, {"h": h0, "c": c0})
    step = lstm_reference(P, peephole=kwargs.get("peephole", False), proj=bool(kwargs.get("proj_size")),
                          layer_norm=kwargs.get("layer_norm", False))
    ref, (h, c) = run_reference(step, x, (h0, c0))
    assert_close(out, ref)
    assert_close(final["h"], h)
    assert_close(final["c"], c)


def test_lstm_parameter_layout_matches_torch():
    cell = sg.cells.lstm(I, H, proj_size=2)
    shapes = {k: n.shape for k, n in cell.params.items()}
    assert shapes == {"ih.weight": (4 * H, I), "ih.bias": (4 * H,), "hh.weight": (4 * H, 2), "hh.bias": (4 * H,),
                      "hr.weight": (2, H)}
    assert cell.state_names == ["h", "c"]


def test_lstm_gal_dropout_uses_one_mask_per_sequence():
    p = 0.4
    rec = sg.Recurrence(sg.cells.lstm(I, H, dropout=p)).train()
    torch.manual_seed(7)
    noises = rec._sample_noise(T, B, torch.float32, torch.device("cpu"))
    masks = {n.name: v for n, v in zip(rec.cell.noises, noises)}
    assert masks["drop_x"].shape == (B, I) and masks["drop_h"].shape == (B, H)
    x, h0 = torch.randn(T, B, I), torch.randn(B, H)
    torch.manual_seed(7)
    out, final = rec(x, {"h": h0})
    ref, (h, c) = run_reference(lstm_reference(params_of(rec), masks=masks, p=p), x, (h0, torch.zeros(B, H)))
    assert_close(out, ref)
    assert_close(final["c"], c)


def test_lstm_dropout_is_the_identity_in_evaluation():
    rec = sg.Recurrence(sg.cells.lstm(I, H, dropout=0.5)).eval()
    x = torch.randn(T, B, I)
    ref, _ = run_reference(lstm_reference(params_of(rec)), x, (torch.zeros(B, H), torch.zeros(B, H)))
    assert_close(rec(x)[0], ref)


def test_lstm_zoneout_keeps_previous_units_where_the_mask_says():
    rec = sg.Recurrence(sg.cells.lstm(I, H, zoneout=0.5)).train()
    torch.manual_seed(3)
    noises = rec._sample_noise(T, B, torch.float32, torch.device("cpu"))
    masks = {n.name: v for n, v in zip(rec.cell.noises, noises)}
    assert masks["zoneout_h"].shape == (T, B, H)  # a fresh draw every step
    x = torch.randn(T, B, I)
    torch.manual_seed(3)
    out, final = rec(x)
    ref, (h, c) = run_reference(lstm_reference(params_of(rec), masks=masks), x, (torch.zeros(B, H), torch.zeros(B, H)))
    assert_close(out, ref)
    assert_close(final["c"], c)


def test_lstm_zoneout_evaluation_blends_previous_and_new_by_expectation():
    rec = sg.Recurrence(sg.cells.lstm(I, H, zoneout=0.25)).eval()
    x = torch.randn(T, B, I)
    ref, _ = run_reference(lstm_reference(params_of(rec), zoneout=0.25), x, (torch.zeros(B, H), torch.zeros(B, H)))
    assert_close(rec(x)[0], ref)


def test_lstm_rejects_projection_not_smaller_than_hidden():
    with pytest.raises(ValueError, match="proj_size"):
        sg.cells.lstm(I, H, proj_size=H)


def test_torch7_positional_arguments_are_refused_not_taken_as_flags():
    # Torch7's nn.GRU(I, H, rho, p): here flags are keyword-only, and a flag must be a bool
    with pytest.raises(TypeError, match="positional"):
        sg.cells.gru(I, H, 9999, 0.25)
    with pytest.raises(TypeError, match="reset_after must be True or False, got 0.25"):
        sg.cells.gru(I, H, reset_after=0.25)
    with pytest.raises(TypeError, match="merge must be a module or a function, got 5 .*takes rho fifth"):
        sg.cells.recurrent(H, sg.Linear(I, H), sg.Linear(H, H), sg.Tanh(), 5)
    assert sg.cells.lstm(I, H, bias=0).params.keys() == sg.cells.lstm(I, H, bias=False).params.keys()


def test_lstm_layer_norm_refuses_bias_false():
    with pytest.raises(ValueError, match="layer_norm"):
        sg.cells.lstm(I, H, layer_norm=True, bias=False)


# ---------------------------------------------------------------------------------------
# GRU family, MuFuRu, IndRNN
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_gru_reset_after_matches_torch_equations(bias):
    rec = sg.Recurrence(sg.cells.gru(I, H, bias=bias))
    P = params_of(rec)

    def step(xt, s):
        (h,) = s
        xr, xz, xn = lin(P, "ih", xt).chunk(3, 1)
        hr, hz, hn = lin(P, "hh", h).chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h2 = (1 - z) * n + z * h
        return h2, (h2,)

    x, h0 = torch.randn(T, B, I), torch.randn(B, H)
    out, final = rec(x, {"h": h0})
    ref, (h,) = run_reference(step, x, (h0,))
    assert_close(out, ref)
    assert_close(final["h"], h)


def test_gru_reset_before_matches_torch7_equations():
    rec = sg.Recurrence(sg.cells.gru(I, H, reset_after=False))
    P = params_of(rec)

    def step(xt, s):  # Torch7 rnn's GRU, eqs. 1-4 (s is the state)
        (st,) = s
        gx = lin(P, "ih", xt)
        gr, gz = lin(P, "hh", st).chunk(2, 1)
        r, z = torch.sigmoid(gx[:, :H] + gr), torch.sigmoid(gx[:, H:2 * H] + gz)
        hcand = torch.tanh(gx[:, 2 * H:] + (st * r) @ P["hh_n.weight"].T)
        s2 = (1 - z) * hcand + z * st
        return s2, (s2,)

    x, h0 = torch.randn(T, B, I), torch.randn(B, H)
    out, final = rec(x, {"h": h0})
    ref, (h,) = run_reference(step, x, (h0,))
    assert_close(out, ref)
    assert_close(final["h"], h)


def mufuru_reference(P, ops, feature=torch.tanh):
    fns = {"keep": lambda s, v: s, "replace": lambda s, v: v, "mul": lambda s, v: s * v,
           "diff": lambda s, v: s - v, "forget": lambda s, v: torch.zeros_like(s),
           "sqrt_diff": lambda s, v: 0.25 * torch.sqrt(torch.abs(s - v)), "max": torch.maximum, "min": torch.minimum}
    J = len(ops)

    gates = 0 if set(ops) <= {"keep", "forget"} else 2  # no op reads v: no r, no v

    def step(xt, st):
        (s,) = st
        gx = lin(P, "ih", xt).reshape(-1, gates + J, H)
        gs = lin(P, "hh", s).reshape(-1, gates // 2 + J, H)
        v = None
        if gates:
            r = torch.sigmoid(gx[:, 0] + gs[:, 0])  # eq. 1
            v = feature(gx[:, 1] + (s * r) @ P["hv.weight"].T)  # eq. 2
        p = torch.softmax(gx[:, gates:] + gs[:, gates // 2:], dim=1)  # eqs. 3-4, per unit over the ops
        s2 = sum(p[:, j] * fns[op](s, v) for j, op in enumerate(ops))  # eq. 5
        return s2, (s2,)

    return step


@pytest.mark.parametrize("ops", [sg.cells.MUFURU_OPS, ("keep", "replace"), ("mul", "forget", "max"),
                                 ("keep", "forget"), ("replace",)],
                         ids=["all", "gru-like", "subset", "learned decay, no candidate", "one op"])
def test_mufuru_matches_published_equations(ops):
    rec = sg.Recurrence(sg.cells.mufuru(I, H, ops=ops))
    x, s0 = torch.randn(T, B, I), torch.randn(B, H)
    out, final = rec(x, {"s": s0})
    ref, (s,) = run_reference(mufuru_reference(params_of(rec), ops), x, (s0,))
    assert_close(out, ref)
    assert_close(final["s"], s)


def test_mufuru_with_a_sigmoid_feature_vector_matches_torch7_mufuru_lua():
    rec = sg.Recurrence(sg.cells.mufuru(I, H, feature_activation="sigmoid"))
    x, s0 = torch.randn(T, B, I), torch.randn(B, H)
    out, _ = rec(x, {"s": s0})
    ref, _ = run_reference(mufuru_reference(params_of(rec), sg.cells.MUFURU_OPS, feature=torch.sigmoid), x, (s0,))
    assert_close(out, ref)


def test_mufuru_refuses_an_unknown_feature_activation():
    with pytest.raises(ValueError, match="feature_activation must be 'tanh' or 'sigmoid', got 'relu'"):
        sg.cells.mufuru(I, H, feature_activation="relu")


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_mufuru_gradients_stay_finite_where_the_state_equals_its_candidate(backend):
    rec = sg.Recurrence(sg.cells.mufuru(1, 1))
    with torch.no_grad():
        for p in rec.parameters():
            p.fill_(1.0)
    module = rec if backend == "reference" else sg.compile(rec, backend=backend)
    x = torch.full((3, 1, 1), 20.0)  # tanh saturates to exactly 1.0 = s: sqrt_diff at |s - v| = 0
    out, _ = module(x, {"s": torch.ones(1, 1)})
    out.sum().backward()
    assert torch.isfinite(out).all()
    for name, p in rec.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_sqrt_diff_keeps_sqrts_value_and_derivative_where_state_and_candidate_differ():
    s, v = sg.State(3, name="s"), sg.Input(3, name="v")
    nxt = sg.cells._mufuru_op("sqrt_diff", s, v)
    cell = sg.Cell(inputs=[v], states={s: nxt}, outputs=[nxt])
    sv = torch.tensor([[0.5, -2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    vv = torch.tensor([[[0.25, 1.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    out, _ = sg.Recurrence(cell).double()(vv, {"s": sv})
    want = 0.25 * torch.sqrt(torch.abs(sv - vv[0]))
    assert_close(out[0], want)
    g_out = torch.autograd.grad(out[0, 0, :2].sum(), sv, retain_graph=True)[0]
    g_want = torch.autograd.grad(want[0, :2].sum(), sv)[0]  # (torch's is nan at column 2 even so)
    assert_close(g_out[:, :2], g_want[:, :2])
    assert torch.autograd.grad(out[0, 0, 2], sv)[0][0, 2] == 0  # the subgradient where they meet


def test_mufuru_whose_ops_never_read_the_candidate_has_no_candidate_weights():
    assert sorted(sg.cells.mufuru(I, H, ops=("forget", "keep")).params) == [
        "hh.bias", "hh.weight", "ih.bias", "ih.weight"]


@pytest.mark.parametrize("ops", [("keep", "jump"), (), ("keep", "keep"), ("forget",), ("keep",)])
def test_mufuru_rejects_bad_ops(ops):
    with pytest.raises(ValueError, match="mufuru"):
        sg.cells.mufuru(I, H, ops=ops)


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_indrnn_matches_published_equations(nonlinearity):
    rec = sg.Recurrence(sg.cells.indrnn(I, H, nonlinearity=nonlinearity))
    P = params_of(rec)
    act = torch.relu if nonlinearity == "relu" else torch.tanh

    def step(xt, s):
        h2 = act(lin(P, "ih", xt) + P["u"] * s[0])
        return h2, (h2,)

    x, h0 = torch.randn(T, B, I), torch.randn(B, H)
    out, _ = rec(x, {"h": h0})
    assert_close(out, run_reference(step, x, (h0,))[0])


@pytest.mark.parametrize("bias", [True, False])
def test_qrnn_matches_published_equations(bias):
    rec = sg.Recurrence(sg.cells.qrnn(I, H, bias=bias))
    P = params_of(rec)
    assert ("w.bias" in P) == bias

    def step(xt, s):
        z, f, o = lin(P, "w", xt).chunk(3, 1)
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        c2 = f * s[0] + (1 - f) * z
        return o * c2, (c2,)

    x, c0 = torch.randn(T, B, I), torch.randn(B, H)
    out, final = rec(x, {"c": c0})
    want_out, want_final = run_reference(step, x, (c0,))
    assert_close(out, want_out)
    assert_close(final["c"], want_final[0])


def test_qrnn_with_a_window_of_two_matches_published_equations():
    rec = sg.Recurrence(sg.cells.qrnn(I, H, window=2))
    P = params_of(rec)
    assert "w_prev1.bias" not in P

    def step(xt, s):
        z, f, o = (lin(P, "w", xt) + s[1] @ P["w_prev1.weight"].T).chunk(3, 1)
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        c2 = f * s[0] + (1 - f) * z
        return o * c2, (c2, xt)

    x, c0, x0 = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, I)
    out, final = rec(x, {"c": c0, "x_prev1": x0})
    want_out, want_final = run_reference(step, x, (c0, x0))
    assert_close(out, want_out)
    assert_close(final["c"], want_final[0])
    assert_close(final["x_prev1"], x[-1])


def test_qrnn_with_a_window_of_two_hoists_both_products():
    for backend in ("cpu", "torch"):
        plan = sg.compile(sg.Recurrence(sg.cells.qrnn(I, H, window=2)), backend=backend).plan()
        assert plan.step_gemms() == [] and len(plan.hoisted_gemms()) == 2


def test_qrnn_with_a_window_of_three_reads_the_inputs_of_two_steps_before():
    rec = sg.Recurrence(sg.cells.qrnn(I, H, window=3))
    P = params_of(rec)

    def step(xt, s):
        pre = lin(P, "w", xt) + s[1] @ P["w_prev1.weight"].T + s[2] @ P["w_prev2.weight"].T
        z, f, o = pre.chunk(3, 1)
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        c2 = f * s[0] + (1 - f) * z
        return o * c2, (c2, xt, s[1])

    x, c0, x1, x2 = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, I), torch.randn(B, I)
    out, final = rec(x, {"c": c0, "x_prev1": x1, "x_prev2": x2})
    want_out, _ = run_reference(step, x, (c0, x1, x2))
    assert_close(out, want_out)
    assert_close(final["x_prev2"], x[-2])
    for backend in ("cpu", "torch"):
        comp = sg.compile(rec, backend=backend)
        assert len(comp.plan().hoisted_gemms()) == 3 and comp.plan().step_gemms() == []
        assert_close(comp(x, {"c": c0, "x_prev1": x1, "x_prev2": x2})[0], want_out)


@pytest.mark.parametrize("window", [0, -1, True, 2.0])
def test_qrnn_refuses_a_window_that_is_not_a_positive_int(window):
    with pytest.raises(ValueError, match=f"window must be an int >= 1 .*got {window!r}"):
        sg.cells.qrnn(I, H, window=window)


def test_qrnn_runs_one_product_before_the_loop_and_a_step_without_one():
    for backend in ("cpu", "torch"):
        plan = sg.compile(sg.Recurrence(sg.cells.qrnn(I, H)), backend=backend).plan()
        assert plan.step_gemms() == [] and len(plan.hoisted_gemms()) == 1
    assert len(plan.hoisted_regions()) == 1  # the torch backend's gates: over all rows before its loop


# ---------------------------------------------------------------------------------------
# mLSTM (xLSTM's matrix memory)
# ---------------------------------------------------------------------------------------
def _mlstm_step(P, D):
    """One mLSTM step from the paper's stabilised equations, in plain torch."""
    def step(xt, s):
        C, n, m = s
        q, v, o = lin(P, "q", xt), lin(P, "v", xt), lin(P, "o", xt)
        k = lin(P, "k", xt) / D ** 0.5
        i_pre, log_f = lin(P, "i", xt), F.logsigmoid(lin(P, "f", xt) + P["f_bias"])
        m2 = torch.maximum(log_f + m, i_pre)
        i, f = torch.exp(i_pre - m2), torch.exp(log_f + m - m2)
        C2 = f[:, :, None] * C + i[:, :, None] * torch.einsum("bi,bj->bij", v, k)
        n2 = f * n + i * k
        h = torch.sigmoid(o) * torch.einsum("bij,bj->bi", C2, q) / torch.maximum((n2 * q).sum(-1, keepdim=True).abs(),
                                                                                  torch.exp(-m2))
        return h, (C2, n2, m2)
    return step


def test_mlstm_matches_published_equations_from_a_given_state():
    rec = sg.Recurrence(sg.cells.mlstm(I, H)).double()
    P = params_of(rec)
    x = torch.randn(T, B, I, dtype=torch.float64)
    s0 = (torch.randn(B, H, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64),
          torch.randn(B, 1, dtype=torch.float64))
    out, final = rec(x, dict(zip("Cnm", s0)))
    want, (C, n, m) = run_reference(_mlstm_step(P, H), x, s0)
    assert_close(out, want, 1e-10)
    assert_close(final["C"], C, 1e-10)
    assert_close(final["n"], n, 1e-10)
    assert_close(final["m"], m, 1e-10)
    assert final["C"].shape == (B, H, H) and final["m"].shape == (B, 1)


def test_mlstm_parameters_and_forget_bias_start():
    rec = sg.Recurrence(sg.cells.mlstm(I, H))
    shapes = {k: tuple(v.shape) for k, v in rec.param_tensors().items()}
    assert shapes == {**{f"{g}.weight": (H, I) for g in "qkvo"}, **{f"{g}.bias": (H,) for g in "qkvo"},
                      "i.weight": (1, I), "i.bias": (1,), "f.weight": (1, I), "f_bias": (1,)}
    assert rec.param_tensors()["f_bias"].item() == 3.0


def test_mlstm_stays_finite_when_its_gates_saturate():
    rec = sg.Recurrence(sg.cells.mlstm(I, H))
    with torch.no_grad():
        rec.param_tensors()["i.bias"].fill_(80.0)  # exp(80) overflows float32 without the stabiliser
        rec.param_tensors()["f_bias"].fill_(-200.0)  # sigmoid(-200) is 0 in float32: log_f must not be -inf
    x = torch.randn(T, B, I, requires_grad=True)
    out, final = rec(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(final["m"]).all()


def test_unknown_nonlinearity_is_refused():
    with pytest.raises(ValueError, match="nonlinearity"):
        sg.cells.rnn(I, H, nonlinearity="gelu")


# ---------------------------------------------------------------------------------------
# float64 gradients of every cell (inputs, initial states and parameters)
# ---------------------------------------------------------------------------------------
GRADCHECK_CELLS = {
    "rnn_tanh": lambda: sg.cells.rnn(3, 4),
    "rnn_relu": lambda: sg.cells.rnn(3, 4, nonlinearity="relu"),
    "recurrent": lambda: sg.cells.recurrent(4, sg.Linear(3, 4), sg.Linear(4, 4), sg.Tanh()),
    "lstm": lambda: sg.cells.lstm(3, 4),
    "lstm_peephole_proj": lambda: sg.cells.lstm(3, 4, peephole=True, proj_size=2),
    "lstm_layer_norm": lambda: sg.cells.lstm(3, 4, layer_norm=True),
    "lstm_dropout_zoneout": lambda: sg.cells.lstm(3, 4, dropout=0.3, zoneout=0.3),
    "gru": lambda: sg.cells.gru(3, 4),
    "gru_reset_before": lambda: sg.cells.gru(3, 4, reset_after=False),
    "mufuru": lambda: sg.cells.mufuru(3, 4),
    "indrnn": lambda: sg.cells.indrnn(3, 4),
    "qrnn": lambda: sg.cells.qrnn(3, 4),
    "qrnn_window_3": lambda: sg.cells.qrnn(3, 4, window=3),
    "mlstm": lambda: sg.cells.mlstm(3, 3),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CELLS))
def test_cell_gradients_pass_float64_gradcheck(name):
    rec = sg.Recurrence(GRADCHECK_CELLS[name]()).double().train()
    keys = list(rec.param_tensors())
    params = [rec.param_tensors()[k].detach().clone().requires_grad_() for k in keys]
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    states = {p.name: torch.randn((2,) + p.shape, dtype=torch.float64, requires_grad=True)
              for p, _ in rec.cell.states if p.name != "started"}
    names = list(states)
    lengths = torch.tensor([3, 2])

    def f(x, *args):
        torch.manual_seed(11)  # the same dropout/zoneout masks at every evaluation
        ps, ss = args[:len(keys)], args[len(keys):]
        out, final = torch.func.functional_call(rec, {f"params.{k}": p for k, p in zip(keys, ps)},
                                                (x, dict(zip(names, ss))), {"lengths": lengths})
        return (out,) + tuple(final[n] for n in names)

    assert gradcheck(f, (x, *params, *states.values()), eps=1e-6, atol=1e-5, fast_mode=True)


# ---------------------------------------------------------------------------------------
# NormStabilizer
# ---------------------------------------------------------------------------------------
def test_norm_stabilizer_loss_is_mean_squared_change_of_norms():
    seq = torch.randn(T, B, H)
    norms = seq.norm(dim=-1)
    expected = 0.5 * ((norms[1:] - norms[:-1]) ** 2).mean(0).mean()
    assert_close(sg.cells.norm_stabilizer_loss(seq, beta=0.5), expected)


def test_norm_stabilizer_loss_skips_padded_steps():
    seq = torch.randn(T, B, H)
    lengths = torch.tensor([4, 2, 1])
    padded = seq.clone()
    for b, n in enumerate(lengths.tolist()):
        padded[n:, b] = 100.0
    per_seq = []
    for b, n in enumerate(lengths.tolist()):
        norms = seq[:n, b].norm(dim=-1)
        per_seq.append(((norms[1:] - norms[:-1]) ** 2).mean() if n > 1 else torch.tensor(0.0))
    assert_close(sg.cells.norm_stabilizer_loss(padded, lengths=lengths), torch.stack(per_seq).mean())


def test_norm_stabilizer_sum_is_the_sum_over_steps_and_sequences():
    seq = torch.randn(T, B, H, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(sg.cells.norm_stabilizer_loss(seq, beta=0.5, reduction="sum"), seq)[0]
    norms = seq.norm(dim=-1)
    want = torch.autograd.grad(0.5 * ((norms[1:] - norms[:-1]) ** 2).sum(), seq)[0]
    assert_close(got, want)
    ns = sg.NormStabilizer(sg.Recurrence(sg.cells.gru(I, H)), beta=0.5, reduction="sum")
    out, _ = ns(torch.randn(T, B, I))
    assert_close(ns.loss, sg.cells.norm_stabilizer_loss(out, beta=0.5, reduction="sum"))


def test_norm_stabilizer_sum_over_steps_trains_with_torch7s_gradient():
    # Element-Research rnn's NormStabilizer.lua: dL/dh_t = beta * 2 (n_t - n_t-1) / n_t * h_t / B
    # (plus the same with t+1), the batch mean's gradient summed over steps, not divided by T
    beta = 0.5
    seq = torch.randn(T, B, H, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(sg.cells.norm_stabilizer_loss(seq, beta, reduction="sum_over_steps"), seq)[0]
    h = seq.detach()
    n = h.norm(dim=-1, keepdim=True)
    want = torch.zeros_like(h)
    for t in range(T):
        if t > 0:
            want[t] += beta * 2 * (n[t] - n[t - 1]) / n[t] * h[t] / B
        if t < T - 1:
            want[t] += beta * 2 * (n[t] - n[t + 1]) / n[t] * h[t] / B
    assert_close(got, want)


def test_norm_stabilizer_sum_over_steps_averages_each_step_over_the_sequences_that_reach_it():
    seq, lengths = torch.randn(T, B, H, dtype=torch.float64), torch.tensor([T, 2, 1])
    norms = seq.norm(dim=-1)
    sq = (norms[1:] - norms[:-1]) ** 2  # the k-th difference of each sequence
    want = sq[0, :2].mean() + sq[1:T - 1, 0].sum()  # the first difference: two sequences; later ones: one
    assert_close(sg.cells.norm_stabilizer_loss(seq, lengths=lengths, reduction="sum_over_steps"), want)


@pytest.mark.parametrize("bad, match", [
    ({"lengths": torch.tensor([T + 1, 1, 1])}, r"lengths must lie in \[0, 4\]"),
    ({"mask": torch.ones(B, T, dtype=torch.bool)}, r"mask must be a bool tensor of shape \(4, 3\)"),
    ({"reduction": "total"}, r"reduction must be one of \('mean', 'sum', 'sum_over_steps'\)")])
def test_norm_stabilizer_loss_refuses_bad_lengths_masks_and_reductions(bad, match):
    with pytest.raises((sg.InputError, ValueError), match=match):
        sg.cells.norm_stabilizer_loss(torch.randn(T, B, H), **bad)


def test_norm_stabilizer_wraps_a_recurrence_and_exposes_its_loss():
    rec = sg.Recurrence(sg.cells.gru(I, H))
    ns = sg.NormStabilizer(rec, beta=2.0)
    x, lengths = torch.randn(T, B, I), torch.tensor([4, 3, 2])
    out, final = ns(x, lengths=lengths)
    ref_out, ref_final = rec(x, lengths=lengths)
    assert_close(out, ref_out)
    assert_close(ns.loss, sg.cells.norm_stabilizer_loss(out, beta=2.0, lengths=lengths))
    ns.loss.backward()
    assert rec.param_tensors()["hh.weight"].grad.abs().sum() > 0


def test_norm_stabilizer_loss_read_before_any_call_says_to_call_the_module_first():
    ns = sg.NormStabilizer(sg.Recurrence(sg.cells.gru(I, H)))
    with pytest.raises(RuntimeError, match=r"NormStabilizer: \.loss is the penalty of the last forward call.*call it"):
        ns.loss


@pytest.mark.parametrize("make,says", [
    (lambda: sg.cells.lstm(3, 0), r"sg.cells.lstm \(at test_cells.py:\d+\): hidden_size must be a positive int, got 0"),
    (lambda: sg.cells.gru(2.5, 4), r"sg.cells.gru \(at test_cells.py:\d+\): input_size must be a positive int"),
    (lambda: sg.cells.lstm(3, 4, dropout=1.0), r"sg.cells.lstm \(at test_cells.py:\d+\): dropout, a probability, must be a number in \[0, 1\)"),
    (lambda: sg.cells.lstm(3, 4, zoneout="0.1"), r"sg.cells.lstm \(at test_cells.py:\d+\): zoneout, a probability, must be a number"),
    (lambda: sg.stack(sg.cells.gru, 3, [4, 0]), r"sg.cells.gru \(at test_cells.py:\d+\): hidden_size must be a positive"),
], ids=["lstm_hidden_0", "gru_float_input", "dropout_1", "zoneout_str", "stack_size_0"])
def test_a_bad_size_or_probability_names_the_cell_the_argument_and_the_line(make, says):
    with pytest.raises(ValueError, match=says):
        make()
