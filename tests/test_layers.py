"""sg layers: length-aware reversal, stacks and bidirectional layers on mixed lengths (equal to
running each sequence alone), BiSequencerLM semantics, Repeater, SequenceLoss, encoder->decoder
gradients, and inner modules used only through their forward interface."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqgraph as sg

T, B, I, H = 5, 3, 4, 6
LENGTHS = torch.tensor([5, 2, 4])
CE = nn.CrossEntropyLoss(reduction="none")


def assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def padded_input(garbage=50.0):
    x = torch.randn(T, B, I)
    for b, n in enumerate(LENGTHS.tolist()):
        x[n:, b] = garbage
    return x


# ---------------------------------------------------------------------------------------
# reverse_sequences
# ---------------------------------------------------------------------------------------
def test_reverse_sequences_reverses_each_sequence_within_its_length():
    x = torch.arange(1, T * B + 1).reshape(B, T).T.clone()  # column b holds b*T+1 .. b*T+T
    out = sg.reverse_sequences(x, LENGTHS)
    for b, n in enumerate(LENGTHS.tolist()):
        assert out[:n, b].tolist() == x[:n, b].flip(0).tolist()
        assert out[n:, b].tolist() == x[n:, b].tolist()  # padding stays where it was


def test_reverse_sequences_batch_first_matches_time_major():
    x = torch.randn(T, B, I)
    assert torch.equal(sg.reverse_sequences(x.transpose(0, 1), LENGTHS, batch_first=True),
                       sg.reverse_sequences(x, LENGTHS).transpose(0, 1))


def test_reverse_sequences_with_a_mask_reverses_real_steps_among_themselves():
    x = torch.arange(T).unsqueeze(1).repeat(1, 2)
    mask = torch.tensor([[0, 1], [1, 1], [1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    out = sg.reverse_sequences(x, mask=mask)
    assert out[:, 0].tolist() == [0, 4, 2, 3, 1]
    assert out[:, 1].tolist() == [3, 1, 2, 0, 4]


def test_reverse_sequences_without_lengths_flips_time():
    x = torch.randn(T, B, I)
    assert torch.equal(sg.reverse_sequences(x), x.flip(0))


def test_reverse_sequences_reversed_twice_is_the_identity():
    x = torch.randn(T, B, I, 2)
    assert torch.equal(sg.reverse_sequences(sg.reverse_sequences(x, LENGTHS), LENGTHS), x)


# ---------------------------------------------------------------------------------------
# Stack
# ---------------------------------------------------------------------------------------
def test_stack_with_mixed_lengths_equals_each_sequence_alone():
    model = sg.stack(sg.cells.lstm, I, [H, 4, 3])
    x = padded_input()
    out, finals = model(x, lengths=LENGTHS)
    for b, n in enumerate(LENGTHS.tolist()):
        alone_out, alone_finals = model(x[:n, b:b + 1])
        assert_close(out[:n, b:b + 1], alone_out)
        assert torch.all(out[n:, b] == 0)
        for layer, alone in zip(finals, alone_finals):
            for name in ("h", "c"):
                assert_close(layer[name][b:b + 1], alone[name])


def test_stack_feeds_each_layer_the_previous_output_size():
    model = sg.stack(sg.cells.lstm, I, [H, 4], proj_size=3)
    out, finals = model(torch.randn(T, B, I))
    assert out.shape == (T, B, 3)
    assert [f["c"].shape[-1] for f in finals] == [H, 4]


def test_stack_starts_each_layer_from_its_given_state():
    model = sg.stack(sg.cells.gru, I, [H, H])
    x = torch.randn(T, B, I)
    states = [{"h": torch.randn(B, H)}, {"h": torch.randn(B, H)}]
    out, _ = model(x, states)
    mid, _ = model.layers[0](x, states[0])
    expected, _ = model.layers[1](mid, states[1])
    assert_close(out, expected)


def test_stack_dropout_acts_between_layers_in_training_only():
    model = sg.stack(sg.cells.rnn, I, [H, H], dropout=0.5)
    x = torch.randn(T, B, I)
    model.eval()
    mid, _ = model.layers[0](x)
    assert_close(model(x)[0], model.layers[1](mid)[0])
    model.train()
    assert not torch.allclose(model(x)[0], model(x)[0])


def test_stack_rejects_a_state_list_of_the_wrong_length():
    model = sg.stack(sg.cells.gru, I, [H, H])
    with pytest.raises(sg.InputError, match="one entry"):
        model(torch.randn(T, B, I), [None])


# ---------------------------------------------------------------------------------------
# Bidirectional
# ---------------------------------------------------------------------------------------
def test_bidirectional_with_mixed_lengths_equals_each_sequence_alone():
    bi = sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H)))
    x = padded_input()
    out, (fin_f, fin_b) = bi(x, lengths=LENGTHS)
    assert out.shape == (T, B, 2 * H)
    for b, n in enumerate(LENGTHS.tolist()):
        alone_out, (alone_f, alone_b) = bi(x[:n, b:b + 1])
        assert_close(out[:n, b:b + 1], alone_out)
        assert torch.all(out[n:, b] == 0)
        assert_close(fin_f["h"][b:b + 1], alone_f["h"])
        assert_close(fin_b["h"][b:b + 1], alone_b["h"])


def test_bidirectional_never_reads_the_padding():
    bi = sg.Bidirectional(sg.Recurrence(sg.cells.lstm(I, H)))
    x = padded_input(garbage=0.0)
    a, _ = bi(x, lengths=LENGTHS)
    for b, n in enumerate(LENGTHS.tolist()):
        x[n:, b] = 1e3
    b, _ = bi(x, lengths=LENGTHS)
    assert_close(a, b)


def test_bidirectional_backward_direction_matches_torch_bidirectional_lstm():
    """Inner modules are used only through forward(x, state, lengths=, mask=): here they are
    torch.nn.LSTMs, and the pair must equal torch's own bidirectional LSTM."""

    class TorchLayer(nn.Module):
        def __init__(self, lstm):
            super().__init__()
            self.lstm = lstm

        def forward(self, x, state=None, *, lengths=None, mask=None):
            out, final = self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False), state)
            return pad_packed_sequence(out, total_length=x.shape[0])[0], final

    fwd, bwd = nn.LSTM(I, H), nn.LSTM(I, H)
    both = nn.LSTM(I, H, bidirectional=True)
    with torch.no_grad():
        for name, p in fwd.named_parameters():
            getattr(both, name).copy_(p)
            getattr(both, name + "_reverse").copy_(getattr(bwd, name))
    x = padded_input()
    out, _ = sg.Bidirectional(TorchLayer(fwd), TorchLayer(bwd))(x, lengths=LENGTHS)
    ref, _ = both(pack_padded_sequence(x, LENGTHS, enforce_sorted=False))
    assert_close(out, pad_packed_sequence(ref, total_length=T)[0])


@pytest.mark.parametrize("merge", ["sum", torch.maximum], ids=["sum", "callable"])
def test_bidirectional_merges_the_two_directions(merge):
    fwd, bwd = sg.Recurrence(sg.cells.rnn(I, H)), sg.Recurrence(sg.cells.rnn(I, H))
    x = padded_input()
    out, _ = sg.Bidirectional(fwd, bwd, merge=merge)(x, lengths=LENGTHS)
    f, _ = fwd(x, lengths=LENGTHS)
    b, _ = bwd(sg.reverse_sequences(x, LENGTHS), lengths=LENGTHS)
    b = sg.reverse_sequences(b, LENGTHS)
    assert_close(out, f + b if merge == "sum" else torch.maximum(f, b))


def test_bidirectional_default_backward_is_an_independent_copy():
    bi = sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H)))
    wf, wb = bi.fwd.param_tensors()["hh.weight"], bi.bwd.param_tensors()["hh.weight"]
    assert wf is not wb and not torch.equal(wf, wb)


def test_bidirectional_passes_initial_states_to_each_direction():
    fwd, bwd = sg.Recurrence(sg.cells.gru(I, H)), sg.Recurrence(sg.cells.gru(I, H))
    x = torch.randn(T, B, I)
    s_f, s_b = {"h": torch.randn(B, H)}, {"h": torch.randn(B, H)}
    _, (fin_f, fin_b) = sg.Bidirectional(fwd, bwd)(x, (s_f, s_b))
    assert_close(fin_f["h"], fwd(x, s_f)[1]["h"])
    assert_close(fin_b["h"], bwd(x.flip(0), s_b)[1]["h"])


@pytest.mark.parametrize("make", [lambda: sg.stack(sg.cells.lstm, I, [H, H]),
                                  lambda: sg.NormStabilizer(sg.Recurrence(sg.cells.lstm(I, H))),
                                  lambda: sg.Stack([sg.nn.GRU(I, H)])],
                         ids=["stack", "norm_stabilizer", "stack_of_sg_nn"])
def test_bidirectional_over_a_wrapper_gets_a_backward_direction_with_fresh_weights(make):
    torch.manual_seed(0)
    bi = sg.Bidirectional(make())
    pairs = list(zip(bi.fwd.parameters(), bi.bwd.parameters(), strict=True))
    assert pairs and not any(torch.equal(p, q) for p, q in pairs)


def test_bidirectional_warns_that_a_module_without_reset_parameters_keeps_fwds_weights():
    class Scaled(torch.nn.Module):  # owns a parameter, with no reset_parameters()
        def __init__(self):
            super().__init__()
            self.rec = sg.Recurrence(sg.cells.gru(I, H))
            self.scale = torch.nn.Parameter(torch.randn(H))

        def forward(self, x, state=None, **kw):
            out, final = self.rec(x, state, **kw)
            return out * self.scale, final

    with pytest.warns(UserWarning, match=r"fwd \(Scaled\) has no reset_parameters\(\), so its parameters \['scale'\] "
                                         r"keep fwd's values"):
        bi = sg.Bidirectional(Scaled())
    assert torch.equal(bi.bwd.scale, bi.fwd.scale)
    assert not torch.equal(bi.bwd.rec.param_tensors()["hh.weight"], bi.fwd.rec.param_tensors()["hh.weight"])


def test_bidirectional_batch_first_matches_time_major():
    rec = sg.Recurrence(sg.cells.gru(I, H))
    bi = sg.Bidirectional(rec)
    x = padded_input()
    time_major, _ = bi(x, lengths=LENGTHS)
    rec.batch_first = bi.bwd.batch_first = bi.batch_first = True
    batch_major, _ = bi(x.transpose(0, 1), lengths=LENGTHS)
    assert_close(batch_major.transpose(0, 1), time_major)


def test_bidirectional_lm_outputs_never_see_their_own_step():
    bi = sg.Bidirectional(sg.Recurrence(sg.cells.lstm(I, H)), lm=True).double()
    x = torch.randn(T, 1, I, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: bi(v)[0], x)  # (T, 1, 2H, T, 1, I)
    reach = jac.abs().sum(dim=(1, 4, 5))  # (T out, 2H, T in)
    for t in range(T):
        fwd_sees = {s for s in range(T) if reach[t, :H, s].sum() > 0}
        bwd_sees = {s for s in range(T) if reach[t, H:, s].sum() > 0}
        assert fwd_sees == set(range(t))  # steps < t
        assert bwd_sees == set(range(t + 1, T))  # steps > t


def test_bidirectional_lm_zero_fills_within_each_length():
    bi = sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H)), lm=True)
    x = padded_input()
    out, _ = bi(x, lengths=LENGTHS)
    full, _ = sg.Bidirectional(bi.fwd, bi.bwd)(x, lengths=LENGTHS)
    for b, n in enumerate(LENGTHS.tolist()):
        assert torch.all(out[0, b, :H] == 0) and torch.all(out[n - 1, b, H:] == 0)
        assert_close(out[1:n, b, :H], full[:n - 1, b, :H])
        assert_close(out[:n - 1, b, H:], full[1:n, b, H:])
        assert torch.all(out[n:, b] == 0)


def test_bidirectional_rejects_unknown_merge():
    with pytest.raises(ValueError, match="merge"):
        sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H)), merge="mean")


def test_bidirectional_with_sum_refuses_directions_of_two_output_sizes_when_built():
    with pytest.raises(ValueError, match=r"merge='sum' adds the two outputs, but fwd outputs 6 features per step and bwd 3"):
        sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H)), sg.Recurrence(sg.cells.gru(I, 3)), merge="sum")


def test_bidirectional_refuses_directions_that_read_two_input_sizes():
    with pytest.raises(ValueError, match=r"fwd takes 4 features per step and bwd 5"):
        sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H)), sg.Recurrence(sg.cells.gru(5, H)))


class _Sized(torch.nn.Module):
    """A layer seqgraph knows nothing about: a Linear over each step, returning (out, None)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.lin = torch.nn.Linear(n_in, n_out)

    def forward(self, x, state=None, **kwargs):
        return self.lin(x), None


def test_bidirectional_sum_of_outputs_that_do_not_match_says_what_each_direction_gave():
    bi = sg.Bidirectional(_Sized(I, H), _Sized(I, 3), merge="sum")
    with pytest.raises(sg.InputError, match=r"fwd gave \(5, 2, 6\) and bwd \(5, 2, 3\)"):
        bi(torch.randn(5, 2, I))


class _OneOfTwo(torch.nn.Module):
    """A layer of its own that keeps a two-output cell as `.cell` and returns one sequence."""

    def __init__(self):
        super().__init__()
        x, h = sg.Input(I, name="x"), sg.State(H, name="h")
        nh = sg.tanh(sg.Linear(I + H, H)(sg.concat([x, h])))
        self.rec = sg.Recurrence(sg.Cell([x], {h: nh}, [nh, sg.sigmoid(nh)]))
        self.cell = self.rec.cell

    def forward(self, x, state=None, **kwargs):
        (a, b), final = self.rec(x, state, **kwargs)
        return a * b, final


def test_layers_check_only_recurrences_and_take_a_layer_of_its_own_with_a_cell_attribute():
    out, _ = sg.Stack([_OneOfTwo(), sg.Recurrence(sg.cells.gru(H, H))])(torch.randn(T, B, I))
    assert out.shape == (T, B, H)
    assert sg.Bidirectional(_OneOfTwo())(torch.randn(T, B, I))[0].shape == (T, B, 2 * H)


def test_bidirectional_refuses_a_cell_with_two_outputs_when_built():
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    nh = sg.tanh(sg.Linear(I + H, H)(sg.concat([x, h])))
    two = sg.Cell(inputs=[x], states={h: nh}, outputs=[nh, sg.sigmoid(nh)])
    with pytest.raises(ValueError, match="sg.Bidirectional fwd: its cell has 2 outputs"):
        sg.Bidirectional(sg.Recurrence(two))


# ---------------------------------------------------------------------------------------
# Repeater
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("x,says", [
    (lambda: torch.randn(T, B, I).tolist(), r"x must be a tensor \(T, B, \.\.\.\) .*got list, list"),
    (lambda: None, r"x must be a tensor \(T, B, \.\.\.\) .*got NoneType"),
    (lambda: torch.randn(I), r"x must be a tensor \(T, B, \.\.\.\) .*got a tensor of shape \(4,\)"),
], ids=["list", "none", "1d"])
def test_bidirectional_says_what_x_it_expected(x, says):
    with pytest.raises(sg.InputError, match=says):
        sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H)))(x())


@pytest.mark.parametrize("pack", [tuple, list])
def test_bidirectional_runs_a_cell_of_two_inputs_given_a_tuple_or_list(pack):
    a, b, h = sg.Input(I, name="a"), sg.Input(2, name="b"), sg.State(H, name="h")
    rec = sg.Recurrence(sg.Cell(inputs=[a, b], states={h: sg.tanh(sg.Linear(I + 2 + H, H)(sg.concat([a, b, h])))}))
    bi = sg.Bidirectional(rec)
    xa, xb = torch.randn(T, B, I), torch.randn(T, B, 2)
    out, _ = bi(pack([xa, xb]), lengths=LENGTHS)
    rev = [sg.reverse_sequences(v, LENGTHS) for v in (xa, xb)]
    assert_close(out[..., H:], sg.reverse_sequences(bi.bwd(tuple(rev), lengths=LENGTHS)[0], LENGTHS))


@pytest.mark.parametrize("fwd", [lambda: sg.cells.gru(I, H), lambda: None], ids=["cell", "none"])
def test_bidirectional_of_something_else_than_a_module_is_refused_when_built(fwd):
    with pytest.raises(TypeError, match=r"sg.Bidirectional: fwd must be a torch.nn.Module"):
        sg.Bidirectional(fwd())


def test_bidirectional_refuses_a_backward_direction_that_remembers():
    with pytest.raises(ValueError, match=r"backward direction .* cannot carry its state into the next call "
                                         r"\(remember=True, copied from fwd\)"):
        sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H), remember=True))


def test_bidirectional_forget_drops_the_forward_directions_memory():
    bi = sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H), remember=True), sg.Recurrence(sg.cells.gru(I, H)))
    x = torch.randn(T, B, I)
    first, _ = bi(x)
    bi(x)
    bi.forget()
    assert_close(bi(x)[0], first)


def test_stack_forget_drops_every_layers_memory():
    layers = [sg.Recurrence(sg.cells.gru(I, H), remember=True), sg.Recurrence(sg.cells.gru(H, H), remember=True)]
    stack = sg.Stack(layers)
    x = torch.randn(T, B, I)
    first, _ = stack(x)
    stack(x)
    stack.forget()
    assert all(layer._memory is None for layer in layers)
    assert_close(stack(x)[0], first)


def test_an_error_inside_a_stack_or_bidirectional_names_the_layer_or_direction():
    stack = sg.stack(sg.cells.lstm, I, [H, H])
    bad = {"h": torch.zeros(B, H), "c": torch.zeros(B, H + 1)}
    with pytest.raises(sg.InputError, match=r"^sg.Stack layer 1: Recurrence\(lstm\): state 'c'"):
        stack(torch.randn(T, B, I), [None, bad])
    bi = sg.Bidirectional(sg.Recurrence(sg.cells.lstm(I, H)))
    with pytest.raises(sg.InputError, match=r"^sg.Bidirectional \(backward direction\): Recurrence\(lstm\): state 'c'"):
        bi(torch.randn(T, B, I), (None, bad))


@pytest.mark.parametrize("steps", [2.7, "3", -1, True])
def test_repeater_steps_must_be_an_int(steps):
    with pytest.raises(ValueError, match=r"sg.Repeater: steps must be an int >= 0"):
        sg.Repeater(sg.Recurrence(sg.cells.gru(I, H)), steps=steps)


@pytest.mark.parametrize("dropout", ["0.1", 1.0, -0.5])
def test_stack_dropout_must_be_a_number_in_zero_one(dropout):
    with pytest.raises(ValueError, match=r"sg.Stack \(at test_layers.py:\d+\): dropout must be a number in \[0, 1\)"):
        sg.Stack([sg.Recurrence(sg.cells.gru(I, H))], dropout=dropout)


def test_norm_stabilizer_takes_beta_as_a_one_element_tensor():
    assert sg.NormStabilizer(sg.Recurrence(sg.cells.lstm(I, H)), beta=torch.tensor(0.5)).beta == 0.5


@pytest.mark.parametrize("beta", [None, "1", -1.0, True, float("nan")])
def test_norm_stabilizer_beta_must_be_a_number_at_least_zero(beta):
    with pytest.raises(ValueError, match=r"sg.NormStabilizer: beta, the penalty's weight, must be a number >= 0"):
        sg.NormStabilizer(sg.Recurrence(sg.cells.lstm(I, H)), beta=beta)


def test_norm_stabilizer_of_torchs_own_rnn_says_to_use_sg_nn():
    with pytest.raises(TypeError, match=r"sg.NormStabilizer: module .* use sg.nn.GRU"):
        sg.NormStabilizer(nn.GRU(I, H))


def test_norm_stabilizer_refuses_an_output_the_module_does_not_have():
    with pytest.raises(ValueError, match=r"output picks one of the module's outputs \(it has 1\), got 1"):
        sg.NormStabilizer(sg.Recurrence(sg.cells.lstm(I, H)), output=1)


@pytest.mark.parametrize("T_, B_", [(T, 0), (0, B)], ids=["no_sequences", "no_steps"])
def test_norm_stabilizer_of_an_empty_batch_is_zero(T_, B_):
    ns = sg.NormStabilizer(sg.Recurrence(sg.cells.lstm(I, H)))
    ns(torch.randn(T_, B_, I))
    assert ns.loss.item() == 0.0


def test_repeater_presents_the_same_input_at_every_step():
    rec = sg.Recurrence(sg.cells.gru(I, H))
    x = torch.randn(B, I)
    out, final = sg.Repeater(rec, 4)(x)
    ref, ref_final = rec(x.unsqueeze(0).repeat(4, 1, 1))
    assert out.shape == (4, B, H)
    assert_close(out, ref)
    assert_close(final["h"], ref_final["h"])


def test_repeater_gradient_sums_over_steps():
    rec = sg.Recurrence(sg.cells.rnn(I, H)).double()
    x = torch.randn(B, I, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: sg.Repeater(rec, 3)(v)[0], (x,))


def test_a_repeater_given_a_sequence_says_it_wants_one_step_of_input():
    with pytest.raises(sg.InputError, match=r"input 0 must be \(B, 4\), one input with no time dim"):
        sg.Repeater(sg.Recurrence(sg.cells.gru(I, H)), 3)(torch.randn(T, B, I))


def test_a_repeater_given_the_wrong_feature_size_names_its_own_input_not_the_repeated_one():
    with pytest.raises(sg.InputError, match=r"sg.Repeater: input 0 must be \(B, 4\), .*got shape \(3, 5\)"):
        sg.Repeater(sg.Recurrence(sg.cells.gru(I, H)), 3)(torch.randn(B, I + 1))


def test_a_repeater_of_a_module_that_takes_no_state_is_refused_when_built():
    with pytest.raises(TypeError, match=r"sg.Repeater: module \(torch.nn.modules.linear.Linear\) has a forward "
                                        r"that takes no state"):
        sg.Repeater(nn.Linear(I, H), 3)


def test_a_repeater_runs_torchs_own_rnn_which_takes_no_lengths():
    gru = nn.GRU(I, H)
    out, h = sg.Repeater(gru, 3)(torch.randn(B, I))
    assert out.shape == (3, B, H) and h.shape == (1, B, H)


def test_a_stack_of_a_cell_says_to_wrap_it_in_a_recurrence():
    with pytest.raises(TypeError, match=r"layer 0 must be a torch.nn.Module .*wrap a cell in sg.Recurrence"):
        sg.Stack([sg.cells.gru(I, H)])


def test_a_stack_whose_layer_sizes_do_not_chain_says_which_layers_when_built():
    with pytest.raises(ValueError, match=r"layer 0 outputs 6 features per step but layer 1 takes 5"):
        sg.Stack([sg.Recurrence(sg.cells.gru(I, H)), sg.Recurrence(sg.cells.gru(5, 3))])


def test_stack_takes_its_sizes_as_a_numpy_array():
    model = sg.stack(sg.cells.gru, I, np.array([H, H + 1]))
    assert [layer.cell.states[0][0].shape for layer in model.layers] == [(H,), (H + 1,)]


def test_stack_of_one_size_asks_for_a_list():
    with pytest.raises(TypeError, match=r"hidden_sizes must be a list with one size per layer, got 6 \(for one layer: \[6\]\)"):
        sg.stack(sg.cells.lstm, I, 6)


# ---------------------------------------------------------------------------------------
# SequenceLoss
# ---------------------------------------------------------------------------------------
def test_sequence_loss_ignores_padded_steps():
    C = 7
    logits = torch.randn(T, B, C, requires_grad=True)
    target = torch.randint(C, (T, B))
    loss = sg.SequenceLoss(nn.CrossEntropyLoss(reduction="none"))(logits, target, lengths=LENGTHS)
    real = [(t, b) for b, n in enumerate(LENGTHS.tolist()) for t in range(n)]
    expected = torch.stack([nn.functional.cross_entropy(logits[t, b], target[t, b]) for t, b in real]).mean()
    assert_close(loss, expected)
    loss.backward()
    for b, n in enumerate(LENGTHS.tolist()):
        assert torch.all(logits.grad[n:, b] == 0)


def test_sequence_loss_sum_adds_every_real_element():
    x, y = torch.randn(T, B, 2), torch.randn(T, B, 2)
    loss = sg.SequenceLoss(nn.MSELoss(reduction="none"), reduction="sum")(x, y, lengths=LENGTHS)
    mask = (torch.arange(T).unsqueeze(1) < LENGTHS).unsqueeze(-1)
    assert_close(loss, (((x - y) ** 2) * mask).sum())


def test_sequence_loss_mean_matches_torch_mean_over_real_elements():
    x, y = torch.randn(T, B, 2), torch.randn(T, B, 2)
    mask = torch.arange(T).unsqueeze(1) < LENGTHS
    loss = sg.SequenceLoss(nn.MSELoss(reduction="none"))(x, y, mask=mask)
    assert_close(loss, nn.functional.mse_loss(x[mask], y[mask]))


def test_sequence_loss_batch_first_matches_time_major():
    logits, target = torch.randn(T, B, 5), torch.randint(5, (T, B))
    crit = nn.CrossEntropyLoss(reduction="none")
    a = sg.SequenceLoss(crit)(logits, target, lengths=LENGTHS)
    b = sg.SequenceLoss(crit, batch_first=True)(logits.transpose(0, 1), target.T, lengths=LENGTHS)
    assert_close(a, b)


def test_repeated_target_loss_applies_one_target_at_every_step():
    logits, target = torch.randn(T, B, 5), torch.randint(5, (B,))
    crit = nn.CrossEntropyLoss(reduction="none")
    loss = sg.SequenceLoss(crit, reduction="sum", repeat_target=True)(logits, target)
    assert_close(loss, sum(crit(logits[t], target).sum() for t in range(T)))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "class_weights"])
def test_sum_over_steps_is_torch7s_sequencer_criterion_of_a_batch_mean(weighted):
    # Torch7: SequencerCriterion sums criterion(output_t, target_t); the criterion averages over
    # the batch (MaskZeroCriterion: over the step's real rows); a step with none adds nothing
    C = 5
    logits, target = torch.randn(T, B, C, dtype=torch.float64), torch.randint(C, (T, B))
    kw = {"weight": torch.rand(C, dtype=torch.float64)} if weighted else {}
    lengths = torch.tensor([T, 2, 0, 1])[:B]
    got = sg.SequenceLoss(nn.CrossEntropyLoss(reduction="none", **kw), reduction="sum_over_steps")(
        logits, target, lengths=lengths)
    real = torch.arange(T).unsqueeze(1) < lengths
    want = sum(nn.CrossEntropyLoss(**kw)(logits[t][real[t]], target[t][real[t]]) for t in range(T) if real[t].any())
    assert_close(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum_over_steps"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "class_weights"])
def test_class_index_targets_with_extra_dims_reduce_as_torch_does(reduction, weighted):
    C, D = 5, 2
    logits = torch.randn(T, B, C, D, dtype=torch.float64)
    target = torch.randint(C, (T, B, D))
    kw = {"weight": torch.rand(C, dtype=torch.float64)} if weighted else {}
    lengths = torch.tensor([T, 2, 3])[:B]
    got = sg.SequenceLoss(nn.CrossEntropyLoss(reduction="none", **kw), reduction=reduction)(
        logits, target, lengths=lengths)
    real = torch.arange(T).unsqueeze(1) < lengths
    crit = nn.CrossEntropyLoss(**kw)
    want = crit(logits[real], target[real]) if reduction == "mean" else \
        sum(crit(logits[t][real[t]], target[t][real[t]]) for t in range(T))
    assert_close(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum_over_steps"])
def test_a_weighted_criterion_that_averages_over_rows_is_not_divided_by_its_weights(reduction):
    # MultiMarginLoss's weight scales each loss; its mean divides by the number of rows
    C = 4
    logits, target = torch.randn(T, B, C, dtype=torch.float64), torch.randint(C, (T, B))
    w = torch.rand(C, dtype=torch.float64)
    got = sg.SequenceLoss(nn.MultiMarginLoss(weight=w, reduction="none"), reduction=reduction)(logits, target)
    crit = nn.MultiMarginLoss(weight=w)
    want = crit(logits.flatten(0, 1), target.flatten()) if reduction == "mean" else \
        sum(crit(logits[t], target[t]) for t in range(T))
    assert_close(got, want)


def test_sum_over_steps_of_elementwise_losses_averages_each_steps_elements():
    x, y = torch.randn(T, B, 3), torch.randn(T, B, 3)
    got = sg.SequenceLoss(nn.MSELoss(reduction="none"), reduction="sum_over_steps")(x, y)
    assert_close(got, sum(nn.functional.mse_loss(x[t], y[t]) for t in range(T)))


def test_sum_over_steps_without_a_real_step_is_zero():
    loss = sg.SequenceLoss(nn.MSELoss(reduction="none"), reduction="sum_over_steps")
    x = torch.randn(T, B, 3, requires_grad=True)
    got = loss(x, torch.randn(T, B, 3), lengths=torch.zeros(B, dtype=torch.long))
    got.backward()
    assert got.item() == 0.0 and (x.grad == 0).all()


@pytest.mark.parametrize("call,says", [
    (lambda: sg.SequenceLoss(CE, repeat_target=True)(torch.randn(T, B, 4), torch.randint(4, (T, B))),
     rf"with repeat_target=True the target is one per sequence, \(B, \.\.\.\) with B = {B}, got \({T}, {B}\)"),
    (lambda: sg.SequenceLoss(CE)(torch.randn(T), torch.randint(4, (T,))), r"input must be a tensor \(T, B, \.\.\.\), got shape"),
    (lambda: sg.SequenceLoss(CE)(torch.randn(T, B, 4), [1, 2]), r"target must be a tensor, got list"),
], ids=["repeat_per_step_target", "1d_input", "list_target"])
def test_sequence_loss_says_what_it_expected(call, says):
    with pytest.raises(sg.InputError, match=says):
        call()


def test_sequence_loss_keeps_the_criterions_own_error_and_notes_the_rows():
    def criterion(rows_in, rows_tgt):
        raise torch.OutOfMemoryError("out of memory")
    with pytest.raises(torch.OutOfMemoryError) as caught:
        sg.SequenceLoss(criterion)(torch.randn(T, B, 4), torch.randint(4, (T, B)))
    notes = getattr(caught.value, "__notes__", None)
    assert notes is None or "input (15, 4) and target (15,)" in notes[0]


def test_sequence_loss_given_a_criterion_class_asks_for_an_object():
    with pytest.raises(TypeError, match=r"takes a criterion object, e.g. CrossEntropyLoss\(reduction='none'\)"):
        sg.SequenceLoss(nn.CrossEntropyLoss)


@pytest.mark.parametrize("criterion", ["cross_entropy", None])
def test_sequence_loss_given_something_not_callable_says_what_it_takes(criterion):
    with pytest.raises(TypeError, match=r"takes a criterion object, e.g. torch.nn.CrossEntropyLoss"):
        sg.SequenceLoss(criterion)


def test_sequence_loss_refuses_a_criterion_that_reduces():
    with pytest.raises(ValueError, match="reduction='none'"):
        sg.SequenceLoss(nn.CrossEntropyLoss())


# ---------------------------------------------------------------------------------------
# encoder -> decoder
# ---------------------------------------------------------------------------------------
def test_encoder_final_state_starts_the_decoder_with_gradients_flowing():
    enc = sg.Recurrence(sg.cells.lstm(I, H)).double()
    dec = sg.Recurrence(sg.cells.lstm(3, H)).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, B, 3, dtype=torch.float64)

    def seq2seq(x):
        _, state = enc(x, lengths=LENGTHS)
        out, _ = dec(y, state)
        return out

    seq2seq(x).sum().backward()
    assert enc.param_tensors()["ih.weight"].grad.abs().sum() > 0
    assert torch.autograd.gradcheck(seq2seq, (x,))


def test_stacked_and_bidirectional_encoders_hand_their_states_to_a_decoder():
    enc = sg.stack(sg.cells.gru, I, [H, H])
    dec = sg.stack(sg.cells.gru, I, [H, H])
    bi = sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H)))
    x = padded_input()
    _, finals = enc(x, lengths=LENGTHS)
    _, (fin_f, fin_b) = bi(x, lengths=LENGTHS)
    out, _ = dec(torch.randn(2, B, I), [finals[1], {"h": fin_f["h"] + fin_b["h"]}])
    out.sum().backward()
    for module in (enc, bi.fwd, bi.bwd):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_layers_wrap_sg_nn_modules_through_their_forward_interface():
    class Adapter(nn.Module):  # sg.nn speaks torch's (input, hx); layers speak (x, state, lengths=, mask=)
        def __init__(self, size):
            super().__init__()
            self.gru = sg.nn.GRU(size, H)

        def forward(self, x, state=None, *, lengths=None, mask=None):
            return self.gru(x, state, lengths=lengths, mask=mask)

    model = sg.Stack([sg.Bidirectional(Adapter(I)), sg.Bidirectional(Adapter(2 * H))])
    x = padded_input()
    out, finals = model(x, lengths=LENGTHS)
    ref = torch.nn.GRU(I, H, num_layers=2, bidirectional=True)
    with torch.no_grad():
        for k, layer in enumerate(model.layers):
            for sfx, direction in (("", layer.fwd), ("_reverse", layer.bwd)):
                for name, p in direction.gru.named_parameters():
                    getattr(ref, name.replace("_l0", f"_l{k}") + sfx).copy_(p)
    expected, _ = ref(pack_padded_sequence(x, LENGTHS, enforce_sorted=False))
    assert_close(out, pad_packed_sequence(expected, total_length=T)[0])


@pytest.mark.parametrize("kind", ["stack", "bidirectional", "bidirectional_lm"])
def test_layers_accept_compiled_recurrences(kind):
    make = {"stack": lambda: sg.stack(sg.cells.lstm, I, [H, H]),
            "bidirectional": lambda: sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H))),
            "bidirectional_lm": lambda: sg.Bidirectional(sg.Recurrence(sg.cells.lstm(I, H)), lm=True)}[kind]
    model = make()
    x = padded_input().requires_grad_()
    out, _ = model(x, lengths=LENGTHS)
    (g_ref,) = torch.autograd.grad(out.pow(2).sum(), x)
    compiled = sg.compile(model, backend="torch")
    assert any(isinstance(m, sg.CompiledRecurrence) for m in compiled.modules())
    out_c, _ = compiled(x, lengths=LENGTHS)
    (g_c,) = torch.autograd.grad(out_c.pow(2).sum(), x)
    assert_close(out_c, out)
    assert_close(g_c, g_ref)


@pytest.mark.parametrize("kw", [dict(ignore_index=0), dict(weight=torch.tensor([0.5, 2.0, 1.0, 0.1])),
                                dict(weight=torch.tensor([0.5, 2.0, 1.0, 0.1]), ignore_index=1)])
@pytest.mark.parametrize("crit", [torch.nn.CrossEntropyLoss, torch.nn.NLLLoss])
def test_sequence_loss_mean_is_torchs_weighted_mean_over_the_real_steps(crit, kw):
    torch.manual_seed(0)
    lengths = torch.tensor([5, 3, 2])
    valid = torch.arange(5)[:, None] < lengths
    scores, target = torch.randn(5, 3, 4).log_softmax(-1), torch.randint(4, (5, 3))
    got = sg.SequenceLoss(crit(reduction="none", **kw))(scores, target, lengths=lengths)
    torch.testing.assert_close(got, crit(**kw)(scores[valid], target[valid]))


# ---------------------------------------------------------------------------------------
# layouts, packed sequences and argument checks of the wrappers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H)), batch_first=True),
    lambda: sg.Repeater(sg.Recurrence(sg.cells.gru(I, H)), 3, batch_first=True),
    lambda: sg.NormStabilizer(sg.Recurrence(sg.cells.gru(I, H)), batch_first=True),
])
def test_a_wrapper_cannot_change_the_layout_its_inner_module_reads(make):
    with pytest.raises(ValueError, match=r"batch_first=True\) wraps modules with batch_first=False.*set batch_first on them"):
        make()


def test_a_stack_of_layers_with_different_layouts_is_refused():
    with pytest.raises(ValueError, match="sg.Stack: the wrapped modules disagree on batch_first"):
        sg.Stack([sg.Recurrence(sg.cells.gru(I, H), batch_first=True), sg.Recurrence(sg.cells.gru(H, H))])


def test_a_stack_of_sg_nn_layers_passes_a_packed_sequence_through():
    torch.manual_seed(0)
    first, second = sg.nn.GRU(I, H), sg.nn.GRU(H, H)
    x = torch.randn(T, B, I)
    packed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    out, _ = sg.Stack([first, second])(packed)
    want, _ = second(first(x, lengths=LENGTHS)[0], lengths=LENGTHS)
    torch.testing.assert_close(pad_packed_sequence(out)[0], want[:int(LENGTHS.max())])


@pytest.mark.parametrize("call", [lambda p: sg.Bidirectional(sg.Recurrence(sg.cells.gru(I, H)))(p),
                                  lambda p: sg.Recurrence(sg.cells.gru(I, H))(p)])
def test_a_packed_sequence_where_padded_steps_are_needed_says_how_to_unpack_it(call):
    packed = pack_padded_sequence(torch.randn(T, B, I), LENGTHS, enforce_sorted=False)
    with pytest.raises(sg.InputError, match="not a PackedSequence: unpack it with torch.nn.utils.rnn.pad_packed_sequence"):
        call(packed)


def test_a_repeater_feeds_every_input_of_a_multi_input_cell():
    x, y, h = sg.Input(I, name="x"), sg.Input(2, name="y"), sg.State(H, name="h")
    rec = sg.Recurrence(sg.Cell([x, y], {h: sg.tanh(sg.Linear(I + 2 + H, H)(sg.concat([x, y, h])))}))
    a, b = torch.randn(B, I), torch.randn(B, 2)
    out, _ = sg.Repeater(rec, 3)((a, b))
    want, _ = rec((a.expand(3, B, I), b.expand(3, B, 2)))
    torch.testing.assert_close(out, want)


def test_reverse_sequences_refuses_float_lengths_and_a_tensor_without_a_batch_dim():
    with pytest.raises(sg.InputError, match="lengths must be integers, got dtype torch.float32"):
        sg.reverse_sequences(torch.randn(T, B), torch.tensor([2.5, 1.0, 3.0]))
    with pytest.raises(sg.InputError, match=r"x must be a tensor of shape \(T, B, ...\), got \(5,\)"):
        sg.reverse_sequences(torch.randn(T))


def test_sequence_loss_with_no_real_step_is_zero_for_a_weighted_criterion_too():
    none = torch.zeros(B, dtype=torch.long)
    loss = sg.SequenceLoss(nn.CrossEntropyLoss(reduction="none"))(torch.randn(T, B, 4), torch.randint(4, (T, B)),
                                                                  lengths=none)
    assert loss.item() == 0.0


def test_a_bidirectional_copy_starts_its_learned_initial_state_from_zero():
    x, h = sg.Input(I, name="x"), sg.State(H, name="h", init="learned")
    rec = sg.Recurrence(sg.Cell([x], {h: sg.tanh(sg.Linear(I + H, H)(sg.concat([x, h])))}))
    with torch.no_grad():
        rec.init["h"].fill_(3.0)
    bi = sg.Bidirectional(rec)
    assert (bi.bwd.init["h"] == 0).all() and (bi.fwd.init["h"] == 3.0).all()


def test_a_repeater_given_a_packed_sequence_says_how_to_unpack_it():
    packed = pack_padded_sequence(torch.randn(T, B, I), LENGTHS, enforce_sorted=False)
    with pytest.raises(sg.InputError, match="sg.Repeater takes a padded tensor with lengths=, not a PackedSequence"):
        sg.Repeater(sg.Recurrence(sg.cells.gru(I, H)), 3)(packed)


@pytest.mark.parametrize("build", [lambda m: sg.Stack([m]), lambda m: sg.Bidirectional(m)], ids=["stack", "bidirectional"])
def test_a_torch_rnn_that_takes_no_lengths_is_refused_when_built(build):
    with pytest.raises(TypeError, match=r"\(torch.nn.modules.rnn.GRU\) has a forward without lengths= and mask=.* "
                                        r"use sg.nn.GRU"):
        build(torch.nn.GRU(I, H))


def test_a_module_that_takes_keywords_is_accepted_as_a_layer():
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rec = sg.Recurrence(sg.cells.gru(I, H))

        def forward(self, x, state=None, **kwargs):
            return self.rec(x, state, **kwargs)
    out, _ = sg.Stack([Wrapped()])(torch.randn(T, B, I), lengths=torch.tensor([T] * B))
    assert out.shape == (T, B, H)


def test_stack_checks_the_sizes_of_sg_nn_layers_when_built():
    with pytest.raises(ValueError, match=r"layer 0 outputs 14 features per step but layer 1 takes 7"):
        sg.Stack([sg.nn.LSTM(I, H + 1, bidirectional=True), sg.nn.LSTM(H + 1, H)])


def test_stack_function_makes_every_layer_remember_when_asked():
    model = sg.stack(sg.cells.gru, I, [H, H], remember=True)
    assert all(layer.remember for layer in model.layers)
    model(torch.randn(T, B, I))
    first = model.layers[1]._memory["h"].clone()
    out, _ = model(torch.randn(T, B, I))
    assert not torch.equal(model.layers[1]._memory["h"], first)


def test_stack_function_names_itself_for_a_keyword_the_cell_function_does_not_take():
    with pytest.raises(TypeError, match=r"sg.stack: .*unexpected keyword argument 'remeber'; sg.stack takes dropout, "
                                        r"batch_first and remember"):
        sg.stack(sg.cells.lstm, I, [H], remeber=True)


def test_wrappers_of_a_batch_first_stack_read_its_layout():
    torch.manual_seed(0)
    fwd, bwd = (sg.Recurrence(sg.cells.gru(I, H), batch_first=True) for _ in range(2))
    x, lengths = torch.randn(B, T, I), torch.tensor([T, 2, 4])
    want, _ = sg.Bidirectional(fwd, bwd)(x, lengths=lengths)
    got, _ = sg.Bidirectional(sg.Stack([fwd]), sg.Stack([bwd]))(x, lengths=lengths)
    torch.testing.assert_close(got, want)
    once = torch.randn(B, I)
    torch.testing.assert_close(sg.Repeater(sg.Stack([fwd]), 3)(once)[0], sg.Repeater(fwd, 3)(once)[0])


def test_a_module_that_defines_call_instead_of_forward_is_accepted_as_a_layer():
    class Called(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rec = sg.Recurrence(sg.cells.gru(I, H))

        def __call__(self, x, state=None, lengths=None, mask=None):
            return self.rec(x, state, lengths=lengths, mask=mask)
    out, _ = sg.Stack([Called()])(torch.randn(T, B, I), lengths=torch.tensor([T, 2, 1]))
    assert out.shape == (T, B, H)


def test_bidirectional_refuses_a_backward_stack_whose_layers_remember():
    with pytest.raises(ValueError, match=r"cannot carry its state into the next call \(remember=True, copied from fwd\)"):
        sg.Bidirectional(sg.stack(sg.cells.gru, I, [H], remember=True))


def _attending_cell(input_size: int, hidden: int, S: int = 3, D: int = 2) -> sg.Cell:
    x, h = sg.Input(input_size, name="x"), sg.State(hidden, name="h")
    memory = sg.Context((S, D), name="memory")
    scores = sg.sum(sg.tanh(sg.Linear(D, hidden, name="keys")(memory) + sg.Linear(hidden, hidden, name="q")(h)), dim=-1)
    read = sg.sum(sg.unsqueeze(sg.softmax(scores), -1) * memory, dim=0)
    h_next = sg.tanh(sg.Linear(input_size + hidden + D, hidden, name="cell")(sg.concat([x, h, read])))
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next], contexts=[memory])


def test_a_stack_passes_context_to_every_layer():
    torch.manual_seed(0)
    first, second = sg.Recurrence(_attending_cell(3, 4)), sg.Recurrence(_attending_cell(4, 4))
    x, memory = torch.randn(5, 2, 3), torch.randn(2, 3, 2)
    out, finals = sg.Stack([first, second])(x, context=memory)
    want, _ = second(first(x, context=memory)[0], context=memory)
    torch.testing.assert_close(out, want)
    assert len(finals) == 2


def test_remember_set_on_a_stack_carries_every_layers_state_to_the_next_call():
    st = sg.stack(sg.cells.gru, 3, [5, 5])
    assert st.remember is False
    st.remember = True
    assert st.remember and all(layer.remember for layer in st.layers)
    x = torch.randn(4, 2, 3)
    first, _ = st(x)
    second, _ = st(x)
    assert not torch.allclose(first, second)
    st.forget()
    torch.testing.assert_close(st(x)[0], first)


def test_stack_names_a_cell_function_that_returns_no_cell():
    with pytest.raises(TypeError, match=r"must return an sg.Cell .* 'LSTM' returned an instance of torch.nn"):
        sg.stack(torch.nn.LSTM, 4, [8])


def test_a_stacks_remember_survives_switching_its_layers_backend():
    st = sg.stack(sg.cells.lstm, 3, [4, 4])
    sg.compile(st, backend="cpu")
    st.remember = True
    sg.compile(st, backend="torch")
    assert st.remember and all(layer.remember for layer in st.layers)


def test_a_stack_with_a_layer_that_cannot_remember_says_which():
    st = sg.Stack([sg.Recurrence(sg.cells.lstm(3, 4)), sg.nn.LSTM(4, 4)])
    assert st.remember is False
    with pytest.raises(AttributeError, match=r"layer 1 \(LSTM\) cannot remember its state between calls"):
        st.remember = True


def test_switching_remember_off_on_a_stack_asks_nothing_of_layers_that_cannot_remember():
    first = sg.Recurrence(sg.cells.lstm(3, 4), remember=True)
    st = sg.Stack([first, sg.nn.LSTM(4, 4)])
    st.remember = False
    assert first.remember is False


def test_remember_set_on_a_bidirectional_layer_carries_the_forward_directions_state():
    bi = sg.Bidirectional(sg.Recurrence(sg.cells.gru(3, 4)))
    assert bi.remember is False
    bi.remember = True  # (it was a plain attribute that did nothing)
    assert bi.remember and bi.fwd.remember and not bi.bwd.remember
    x = torch.randn(4, 2, 3)
    first, _ = bi(x)
    second, _ = bi(x)
    assert not torch.allclose(first[..., :4], second[..., :4])
    torch.testing.assert_close(first[..., 4:], second[..., 4:])  # the backward direction starts afresh
    bi.forget()
    torch.testing.assert_close(bi(x)[0], first)


def test_a_bidirectional_layer_whose_forward_direction_cannot_remember_says_so():
    bi = sg.Bidirectional(sg.nn.LSTM(3, 4))
    with pytest.raises(AttributeError, match=r"sg.Bidirectional: fwd \(LSTM\) cannot remember its state"):
        bi.remember = True
    bi.remember = False


def test_a_backward_direction_switched_to_remember_after_it_was_built_is_refused_at_the_call():
    bi = sg.Bidirectional(sg.Recurrence(sg.cells.gru(3, 4)))
    bi.bwd.remember = True
    with pytest.raises(sg.InputError, match=r"backward direction .* cannot carry its state into the next call"):
        bi(torch.randn(5, 2, 3))
