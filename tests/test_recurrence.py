"""sg.Recurrence against hand-written torch: Elman, LSTM (module and operator syntax) and an
attention decoder over a masked memory; then the run-time semantics every backend must keep:
masking, remember/forget, initial states, argument errors, no_grad memory and dropout noise.
All numbers in float64 with random weights and inputs."""
from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import seqgraph as sg

from threads import entered_in_another_thread

DT = torch.float64
I, H, T, B = 3, 5, 6, 4


def randomize(rec: sg.Recurrence) -> sg.Recurrence:
    """float64 and weights of a larger spread than the default init, so errors show."""
    rec.double()
    with torch.no_grad():
        for p in rec.parameters():
            p.normal_(0.0, 0.6)
    return rec


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=False)


def assert_same_grads(ours, theirs, tensors, names):
    g1, g2 = grads(ours, tensors), grads(theirs, tensors)
    for name, a, b in zip(names, g1, g2):
        torch.testing.assert_close(a, b, msg=lambda m: f"gradient of {name}: {m}")


# ---------------------------------------------------------------------------------------
# cells and their hand-written torch twins
# ---------------------------------------------------------------------------------------
def elman_cell(init="zeros"):
    x, h = sg.Input(I, name="x"), sg.State(H, name="h", init=init)
    h_next = sg.tanh(sg.Linear(I, H, name="ih")(x) + sg.Linear(H, H, name="hh")(h))
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next])


def elman_torch(p, x, h):
    outs = []
    for t in range(x.shape[0]):
        h = torch.tanh(x[t] @ p["ih.weight"].t() + p["ih.bias"] + h @ p["hh.weight"].t() + p["hh.bias"])
        outs.append(h)
    return torch.stack(outs), h


def lstm_modules_cell():
    """nngraph style: construct a module, then call it on a node."""
    x, h, c = sg.Input(I, name="x"), sg.State(H, name="h"), sg.State(H, name="c")
    gates = sg.CAdd()([sg.Linear(I, 4 * H, name="i2h")(x), sg.Linear(H, 4 * H, name="h2h")(h)])
    i, f, g, o = sg.chunk(gates, 4)
    i, f, g, o = sg.Sigmoid()(i), sg.Sigmoid()(f), sg.Tanh()(g), sg.Sigmoid()(o)
    c_next = sg.CAdd()([sg.CMul()([f, c]), sg.CMul()([i, g])])
    h_next = sg.CMul()([o, sg.Tanh()(c_next)])
    return sg.Cell(inputs=[x], states={h: h_next, c: c_next}, outputs=[h_next])


def lstm_modules_torch(p, x, h, c):
    outs = []
    for t in range(x.shape[0]):
        z = x[t] @ p["i2h.weight"].t() + p["i2h.bias"] + h @ p["h2h.weight"].t() + p["h2h.bias"]
        i, f, g, o = z.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def lstm_operators_cell():
    """Plain functions and operators."""
    x, h, c = sg.Input(I, name="x"), sg.State(H, name="h"), sg.State(H, name="c")
    i, f, g, o = sg.chunk(sg.Linear(I + H, 4 * H, name="gates")(sg.concat([x, h])), 4)
    c_next = sg.sigmoid(f) * c + sg.sigmoid(i) * sg.tanh(g)
    h_next = sg.sigmoid(o) * sg.tanh(c_next)
    return sg.Cell(inputs=[x], states={h: h_next, c: c_next}, outputs=[h_next])


def lstm_operators_torch(p, x, h, c):
    outs = []
    for t in range(x.shape[0]):
        i, f, g, o = (torch.cat([x[t], h], -1) @ p["gates.weight"].t() + p["gates.bias"]).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


S, D, E, A = 7, 4, 3, 6  # memory length, memory features, decoder input, attention size


def attention_cell():
    """A Bahdanau-scored, Luong-read attention decoder over a (B, S, D) memory whose padded
    positions are masked by a (B, S) 0/1 context."""
    y, h = sg.Input(E, name="y"), sg.State(H, name="h")
    mem, valid = sg.Context((S, D), name="memory"), sg.Context(S, name="memory_mask")
    keys = sg.Linear(D, A, name="keys")(mem)                                   # (S, A)
    query = sg.Linear(H, A, bias=False, name="query")(h)                        # (A,) over every row
    v = sg.Parameter(A, name="v")
    scores = sg.sum(sg.tanh(keys + query) * v, dim=-1)                          # (S,)
    attn = sg.softmax(scores + (valid - 1.0) * 1e4, name="attn")                # padded rows -> 0
    read = sg.matmul(sg.transpose(mem), sg.unsqueeze(attn, -1))                 # (D, 1)
    ctx = sg.reshape(read, (D,), name="context_vector")
    h_next = sg.tanh(sg.Linear(E + D + H, H, name="out")(sg.concat([y, ctx, h])))
    return sg.Cell(inputs=[y], states={h: h_next}, outputs=[h_next, attn])


def attention_torch(p, y, h, mem, valid):
    outs, attns = [], []
    keys = mem @ p["keys.weight"].t() + p["keys.bias"]
    for t in range(y.shape[0]):
        query = h @ p["query.weight"].t()
        scores = (torch.tanh(keys + query[:, None, :]) * p["v"]).sum(-1)
        attn = torch.softmax(scores.masked_fill(valid == 0, float("-inf")), -1)
        ctx = torch.einsum("bs,bsd->bd", attn, mem)
        h = torch.tanh(torch.cat([y[t], ctx, h], -1) @ p["out.weight"].t() + p["out.bias"])
        outs.append(h)
        attns.append(attn)
    return torch.stack(outs), torch.stack(attns), h


def params(rec):
    return rec.param_tensors()


# ---------------------------------------------------------------------------------------
# standard cells equal hand-written torch: outputs, final states, every gradient
# ---------------------------------------------------------------------------------------
def test_elman_matches_torch():
    rec = randomize(sg.Recurrence(elman_cell()))
    x = torch.randn(T, B, I, dtype=DT, requires_grad=True)
    h0 = torch.randn(B, H, dtype=DT, requires_grad=True)
    out, fin = rec(x, {"h": h0})
    ref_out, ref_h = elman_torch(params(rec), x, h0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(fin["h"], ref_h)
    r1, r2 = torch.randn_like(out), torch.randn_like(ref_h)
    wrt = [x, h0, *rec.parameters()]
    assert_same_grads((out * r1).sum() + (fin["h"] * r2).sum(), (ref_out * r1).sum() + (ref_h * r2).sum(),
                      wrt, ["x", "h0", *dict(rec.named_parameters())])


@pytest.mark.parametrize("make_cell,reference", [(lstm_modules_cell, lstm_modules_torch),
                                                 (lstm_operators_cell, lstm_operators_torch)],
                         ids=["modules", "operators"])
def test_lstm_matches_torch(make_cell, reference):
    rec = randomize(sg.Recurrence(make_cell()))
    x = torch.randn(T, B, I, dtype=DT, requires_grad=True)
    h0 = torch.randn(B, H, dtype=DT, requires_grad=True)
    c0 = torch.randn(B, H, dtype=DT, requires_grad=True)
    out, fin = rec(x, {"h": h0, "c": c0})
    ref_out, ref_h, ref_c = reference(params(rec), x, h0, c0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(fin["h"], ref_h)
    torch.testing.assert_close(fin["c"], ref_c)
    r = [torch.randn_like(v) for v in (out, ref_h, ref_c)]
    ours = (out * r[0]).sum() + (fin["h"] * r[1]).sum() + (fin["c"] * r[2]).sum()
    theirs = (ref_out * r[0]).sum() + (ref_h * r[1]).sum() + (ref_c * r[2]).sum()
    assert_same_grads(ours, theirs, [x, h0, c0, *rec.parameters()], ["x", "h0", "c0", *dict(rec.named_parameters())])


def test_operator_lstm_matches_torch_nn_lstm():
    rec = randomize(sg.Recurrence(lstm_operators_cell()))
    ref = torch.nn.LSTM(I, H).double()
    w = rec.params.gates.weight
    with torch.no_grad():
        ref.weight_ih_l0.copy_(w[:, :I])
        ref.weight_hh_l0.copy_(w[:, I:])
        ref.bias_ih_l0.copy_(rec.params.gates.bias)
        ref.bias_hh_l0.zero_()
    x = torch.randn(T, B, I, dtype=DT)
    out, fin = rec(x)
    ref_out, (ref_h, ref_c) = ref(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(fin["c"], ref_c[0])


def _memory(lengths_s):
    mem = torch.randn(B, S, D, dtype=DT, requires_grad=True)
    valid = (torch.arange(S)[None, :] < torch.tensor(lengths_s)[:, None]).to(DT)
    return mem, valid


def test_attention_decoder_matches_torch():
    rec = randomize(sg.Recurrence(attention_cell()))
    y = torch.randn(T, B, E, dtype=DT, requires_grad=True)
    mem, valid = _memory([S, 3, 1, 5])
    (out, attn), fin = rec(y, context={"memory": mem, "memory_mask": valid})
    ref_out, ref_attn, ref_h = attention_torch(params(rec), y, torch.zeros(B, H, dtype=DT), mem, valid)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(attn, ref_attn)
    torch.testing.assert_close(fin["h"], ref_h)
    r1, r2 = torch.randn_like(out), torch.randn_like(attn)
    assert_same_grads((out * r1).sum() + (attn * r2).sum(), (ref_out * r1).sum() + (ref_attn * r2).sum(),
                      [y, mem, *rec.parameters()], ["y", "memory", *dict(rec.named_parameters())])


def test_attention_ignores_padded_memory():
    rec = randomize(sg.Recurrence(attention_cell()))
    y = torch.randn(T, B, E, dtype=DT)
    mem, valid = _memory([S, 3, 1, 5])
    (_, attn), _ = rec(y, context={"memory": mem, "memory_mask": valid})
    assert torch.all(attn[:, valid == 0] == 0)
    noisy = mem.detach().clone()
    noisy[valid == 0] = 1e3 * torch.randn_like(noisy[valid == 0])
    (out, _), _ = rec(y, context={"memory": noisy, "memory_mask": valid})
    (clean, _), _ = rec(y, context={"memory": mem.detach(), "memory_mask": valid})
    torch.testing.assert_close(out, clean)


def test_attention_decoder_with_padded_steps_matches_each_sequence_alone():
    rec = randomize(sg.Recurrence(attention_cell()))
    y = torch.randn(T, B, E, dtype=DT)
    mem, valid = _memory([S, 3, 1, 5])
    mem = mem.detach()
    lengths = torch.tensor([T, 0, 2, 5])
    (out, attn), fin = rec(y, lengths=lengths, context={"memory": mem, "memory_mask": valid})
    for b in range(B):
        n = int(lengths[b])
        ctx = {"memory": mem[b:b + 1], "memory_mask": valid[b:b + 1]}
        (alone, alone_attn), alone_fin = rec(y[:n, b:b + 1], context=ctx)
        torch.testing.assert_close(out[:n, b], alone[:, 0])
        torch.testing.assert_close(attn[:n, b], alone_attn[:, 0])
        assert torch.all(out[n:, b] == 0) and torch.all(attn[n:, b] == 0)
        torch.testing.assert_close(fin["h"][b], alone_fin["h"][0])


# ---------------------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------------------
LENGTHS = torch.tensor([T, 0, 3, 1])  # full, empty and partial sequences in one batch


def test_mixed_lengths_equal_each_sequence_run_alone():
    rec = randomize(sg.Recurrence(lstm_operators_cell()))
    x = torch.randn(T, B, I, dtype=DT)
    h0 = torch.randn(B, H, dtype=DT)
    out, fin = rec(x, {"h": h0}, lengths=LENGTHS)
    for b in range(B):
        n = int(LENGTHS[b])
        alone, alone_fin = rec(x[:n, b:b + 1], {"h": h0[b:b + 1]})
        torch.testing.assert_close(out[:n, b], alone[:, 0])
        torch.testing.assert_close(fin["h"][b], alone_fin["h"][0])
        torch.testing.assert_close(fin["c"][b], alone_fin["c"][0])


def test_padded_steps_output_exact_zeros():
    rec = randomize(sg.Recurrence(elman_cell()))
    out, _ = rec(torch.randn(T, B, I, dtype=DT), lengths=LENGTHS)
    for b in range(B):
        assert torch.all(out[int(LENGTHS[b]):, b] == 0)


def test_length_zero_keeps_the_initial_state():
    rec = randomize(sg.Recurrence(lstm_operators_cell()))
    h0, c0 = torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT)
    _, fin = rec(torch.randn(T, B, I, dtype=DT), {"h": h0, "c": c0}, lengths=LENGTHS)
    assert torch.equal(fin["h"][1], h0[1]) and torch.equal(fin["c"][1], c0[1])


def test_length_t_equals_no_mask():
    rec = randomize(sg.Recurrence(elman_cell()))
    x = torch.randn(T, B, I, dtype=DT)
    out, fin = rec(x, lengths=torch.full((B,), T))
    ref_out, ref_fin = rec(x)
    assert torch.equal(out, ref_out) and torch.equal(fin["h"], ref_fin["h"])


def test_padded_inputs_change_nothing_and_get_zero_gradient():
    rec = randomize(sg.Recurrence(elman_cell()))
    x = torch.randn(T, B, I, dtype=DT, requires_grad=True)
    out, fin = rec(x, lengths=LENGTHS)
    (out.sum() + fin["h"].sum()).backward()
    pad = torch.arange(T)[:, None] >= LENGTHS[None, :]
    assert torch.all(x.grad[pad] == 0) and torch.any(x.grad[~pad] != 0)
    noisy = x.detach().clone()
    noisy[pad] = 1e3
    out2, fin2 = rec(noisy, lengths=LENGTHS)
    assert torch.equal(out2, out.detach()) and torch.equal(fin2["h"], fin["h"].detach())


def test_all_padded_batch_returns_zeros_and_initial_states():
    rec = randomize(sg.Recurrence(elman_cell()))
    h0 = torch.randn(B, H, dtype=DT, requires_grad=True)
    out, fin = rec(torch.randn(T, B, I, dtype=DT), {"h": h0}, lengths=torch.zeros(B, dtype=torch.long))
    assert torch.all(out == 0) and torch.equal(fin["h"], h0)
    (out.sum() + fin["h"].sum()).backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in rec.parameters())
    assert torch.equal(h0.grad, torch.ones_like(h0))


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_a_loss_over_a_batch_without_real_steps_can_backpropagate(backend):
    rec = randomize(sg.Recurrence(elman_cell()))
    module = sg.compile(rec, backend=backend)
    out, fin = module(torch.randn(T, B, I, dtype=DT), lengths=torch.zeros(B, dtype=torch.long))
    out.sum().backward()  # nothing was computed, yet the loss is part of the graph
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in rec.parameters())


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_a_loss_over_a_sequence_of_no_steps_can_backpropagate(backend):
    rec = randomize(sg.Recurrence(elman_cell()))
    out, fin = sg.compile(rec, backend=backend)(torch.randn(0, B, I, dtype=DT))
    assert out.requires_grad and fin["h"].requires_grad  # as in every backend
    (out.sum() + fin["h"].sum()).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in rec.parameters())


@pytest.mark.parametrize("module", [lambda: sg.Recurrence(sg.cells.gru(4, 6)), lambda: sg.nn.GRU(4, 6)],
                         ids=["Recurrence", "sg.nn.GRU"])
@pytest.mark.parametrize("given", ["lengths", "mask"])
def test_lengths_or_a_mask_on_the_meta_device_are_refused_for_real_inputs(module, given):
    steps = {"lengths": torch.tensor([3, 2], device="meta"),
             "mask": torch.ones(3, 2, dtype=torch.bool, device="meta")}[given]
    with pytest.raises(sg.InputError, match=rf"{given} is on the meta device, which holds no values, but the "
                                            r"inputs are on cpu"):
        module()(torch.randn(3, 2, 4), **{given: steps})


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_a_pruned_level_of_the_parameter_tree_reads_its_masked_weight_at_every_call(backend):
    import torch.nn.utils.prune as prune
    rec = sg.compile(sg.Recurrence(sg.cells.gru(4, 6)), backend=backend)
    prune.l1_unstructured(rec.params.hh, "weight", amount=0.5)
    opt = torch.optim.SGD(rec.parameters(), lr=0.5)
    x = torch.randn(5, 3, 4)
    for _ in range(2):  # (the second call's backward failed: the weight was the first call's)
        rec(x)[0].pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    rec(x)
    pruned = rec.params.hh.weight_mask == 0
    assert bool(pruned.any()) and bool((rec.params.hh.weight[pruned] == 0).all())
    assert not torch.equal(rec.params.hh.weight_orig, rec.params.hh.weight_orig * rec.params.hh.weight_mask)


@pytest.mark.parametrize("with_kwargs", [False, True])
def test_a_forward_pre_hook_on_a_level_of_the_parameter_tree_runs_once_per_call(with_kwargs):
    rec, seen = sg.Recurrence(sg.cells.gru(4, 6)), []
    rec.params.hh.register_forward_pre_hook(lambda module, *args: seen.append(module), with_kwargs=with_kwargs)
    rec(torch.randn(3, 2, 4))
    assert seen == [rec.params.hh]


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_spectral_norm_on_a_level_of_the_parameter_tree_trains_its_original_weight(backend):
    rec = sg.compile(sg.Recurrence(sg.cells.gru(4, 6)), backend=backend)
    torch.nn.utils.spectral_norm(rec.params.hh, "weight")
    rec(torch.randn(5, 3, 4))[0].sum().backward()
    assert rec.params.hh.weight_orig.grad is not None and rec.params.hh.weight_orig.grad.abs().sum() > 0
    assert not torch.equal(rec.params.hh.weight, rec.params.hh.weight_orig)  # (divided by its estimated norm)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_a_batch_without_real_steps_backpropagates_to_inputs_with_frozen_weights(backend):
    rec = randomize(sg.Recurrence(elman_cell()))
    for p in rec.parameters():
        p.requires_grad_(False)
    x = torch.randn(T, B, I, dtype=DT, requires_grad=True)
    out, fin = sg.compile(rec, backend=backend)(x, lengths=torch.zeros(B, dtype=torch.long))
    (out.sum() + fin["h"].sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("cell", [lambda: sg.cells.lstm(I, H, dropout=0.25), lambda: sg.cells.lstm(I, H, zoneout=0.1)],
                         ids=["dropout", "zoneout"])
def test_noise_cells_in_eval_mode_run_padded_batches(cell):
    rec = sg.Recurrence(cell()).double().eval()  # the noise is one (1, ...) row of ones
    out, _ = rec(torch.randn(T, B, I, dtype=DT), lengths=LENGTHS)
    want, _ = sg.compile(rec, backend="torch")(torch.randn(T, B, I, dtype=DT), lengths=LENGTHS)
    assert out.shape == want.shape and torch.equal(out == 0, want == 0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_a_token_output_keeps_its_dtype_on_padded_steps(dtype):
    tok, h = sg.Input((), name="tok", dtype="long"), sg.State(4, name="h")
    h2 = sg.tanh(sg.Embedding(7, 4)(tok) + sg.Linear(4, 4)(h))
    rec = sg.Recurrence(sg.Cell([tok], {h: h2}, [h2, tok]))
    tokens = torch.randint(1, 7, (3, 2), dtype=dtype)
    (_, echoed), _ = rec(tokens, lengths=torch.tensor([3, 1]))
    assert echoed.dtype == dtype and echoed[:, 0].tolist() == tokens[:, 0].tolist() and echoed[1:, 1].tolist() == [0, 0]


@pytest.mark.parametrize("lengths", [None, torch.full((B,), T), LENGTHS], ids=["no mask", "full", "padded"])
def test_a_final_state_changed_in_place_leaves_backward_working(lengths):
    rec = randomize(sg.Recurrence(elman_cell()))
    out, fin = rec(torch.randn(T, B, I, dtype=DT), lengths=lengths)
    fin["h"].mul_(2)
    out.sum().backward()
    assert all(p.grad is not None for p in rec.parameters())


def test_the_reference_computes_a_padded_step_on_its_real_rows_only():
    # a padded row would meet sqrt at 0 (infinite derivative): skipped, it cannot spoil a gradient
    x, h = sg.Input(2, name="x"), sg.State(3, name="h")
    rec = sg.Recurrence(sg.Cell([x], {h: sg.sqrt(sg.abs(h)) + sg.Linear(2, 3)(x)})).double()
    h0 = torch.stack([torch.rand(3, dtype=DT) + 0.5, torch.zeros(3, dtype=DT)]).requires_grad_()
    out, fin = rec(torch.randn(3, 2, 2, dtype=DT), {"h": h0}, lengths=torch.tensor([3, 0]))
    (out.sum() + fin["h"].sum()).backward()
    assert torch.equal(h0.grad[1], torch.ones(3, dtype=DT))
    assert all(torch.isfinite(g).all() for g in [h0.grad] + [p.grad for p in rec.parameters()])


def test_mask_equals_lengths():
    rec = randomize(sg.Recurrence(lstm_operators_cell()))
    x = torch.randn(T, B, I, dtype=DT)
    mask = torch.arange(T)[:, None] < LENGTHS[None, :]
    out_l, fin_l = rec(x, lengths=LENGTHS)
    out_m, fin_m = rec(x, mask=mask)
    assert torch.equal(out_l, out_m)
    assert all(torch.equal(fin_l[k], fin_m[k]) for k in fin_l)


def test_batch_first_transposes_inputs_outputs_and_mask():
    cell = lstm_operators_cell()
    rec = randomize(sg.Recurrence(cell))
    rec_bf = sg.Recurrence(cell, batch_first=True).double()
    rec_bf.load_state_dict(rec.state_dict())
    x = torch.randn(T, B, I, dtype=DT)
    out, fin = rec(x, lengths=LENGTHS)
    mask_bf = torch.arange(T)[None, :] < LENGTHS[:, None]  # (B, T)
    out_bf, fin_bf = rec_bf(x.transpose(0, 1), mask=mask_bf)
    assert out_bf.shape == (B, T, H)
    torch.testing.assert_close(out_bf, out.transpose(0, 1))
    torch.testing.assert_close(fin_bf["c"], fin["c"])
    out_bl, _ = rec_bf(x.transpose(0, 1), lengths=LENGTHS)
    torch.testing.assert_close(out_bl, out_bf)


def test_batch_first_rejects_a_time_major_mask():
    rec = sg.Recurrence(elman_cell(), batch_first=True).double()
    with pytest.raises(sg.InputError, match=rf"mask must be a bool tensor of shape \({B}, {T}\), got shape \({T}, {B}\)"):
        rec(torch.randn(B, T, I, dtype=DT), mask=torch.ones(T, B, dtype=torch.bool))


def test_empty_sequence_returns_no_steps_and_the_initial_state():
    rec = randomize(sg.Recurrence(elman_cell()))
    h0 = torch.randn(B, H, dtype=DT)
    out, fin = rec(torch.randn(0, B, I, dtype=DT), {"h": h0})
    assert out.shape == (0, B, H) and torch.equal(fin["h"], h0)


# ---------------------------------------------------------------------------------------
# remember / forget, initial states
# ---------------------------------------------------------------------------------------
def test_remember_continues_where_the_last_call_stopped():
    cell = lstm_operators_cell()
    rec = randomize(sg.Recurrence(cell, remember=True))
    x = torch.randn(T, B, I, dtype=DT)
    ref = sg.Recurrence(cell).double()
    ref.load_state_dict(rec.state_dict())
    whole, whole_fin = ref(x)
    first, _ = rec(x[:2])
    second, fin = rec(x[2:])
    torch.testing.assert_close(torch.cat([first, second]), whole)
    torch.testing.assert_close(fin["c"], whole_fin["c"])


def test_remembered_state_is_detached():
    rec = randomize(sg.Recurrence(elman_cell(), remember=True))
    x1 = torch.randn(3, B, I, dtype=DT, requires_grad=True)
    rec(x1)
    second, _ = rec(torch.randn(3, B, I, dtype=DT))
    assert torch.autograd.grad(second.sum(), [x1], allow_unused=True) == (None,)


def test_forget_restarts_from_the_initial_state():
    rec = randomize(sg.Recurrence(elman_cell(), remember=True))
    x = torch.randn(T, B, I, dtype=DT)
    fresh, _ = rec(x)
    carried, _ = rec(x)
    assert not torch.allclose(fresh, carried)
    rec.forget()
    again, _ = rec(x)
    assert torch.equal(again, fresh)


def test_explicit_state_overrides_remembered_state():
    rec = randomize(sg.Recurrence(elman_cell(), remember=True))
    x = torch.randn(T, B, I, dtype=DT)
    zeros = {"h": torch.zeros(B, H, dtype=DT)}
    fresh, _ = rec(x)
    assert torch.equal(rec(x, zeros)[0], fresh)


def test_a_partial_explicit_state_keeps_the_remembered_rest():
    cell = lstm_operators_cell()
    rec = randomize(sg.Recurrence(cell, remember=True))
    x = torch.randn(T, B, I, dtype=DT)
    _, fin = rec(x)
    h0 = torch.zeros(B, H, dtype=DT)
    got, _ = rec(x, {"h": h0})
    ref = sg.Recurrence(cell).double()
    ref.load_state_dict(rec.state_dict())
    want, _ = ref(x, {"h": h0, "c": fin["c"]})
    torch.testing.assert_close(got, want)


def test_the_remembered_state_follows_a_dtype_conversion():
    rec = sg.Recurrence(elman_cell(), remember=True)
    rec(torch.randn(T, B, I))
    rec.double()
    out, fin = rec(torch.randn(T, B, I, dtype=DT))
    assert out.dtype == fin["h"].dtype == DT


def test_remember_with_a_new_batch_size_asks_for_forget():
    rec = randomize(sg.Recurrence(elman_cell(), remember=True))
    rec(torch.randn(T, B, I, dtype=DT))
    with pytest.raises(sg.InputError, match=rf"batch size {B} but this call has batch size 2; call forget\(\) first"):
        rec(torch.randn(T, 2, I, dtype=DT))


def test_learned_initial_state_gets_gradients():
    rec = randomize(sg.Recurrence(elman_cell(init="learned")))
    h_init = rec.init["h"]
    x = torch.randn(T, B, I, dtype=DT)
    out, fin = rec(x, lengths=LENGTHS)
    assert torch.equal(fin["h"][1], h_init.detach())  # the empty sequence ends where it started
    r = torch.randn_like(out)
    (out * r).sum().backward()
    h0 = h_init.detach().clone().requires_grad_()
    ref_out, _ = elman_torch(params(rec), x, h0.expand(B, H))
    mask = (torch.arange(T)[:, None] < LENGTHS[None, :])[..., None]
    (ref_out * mask * r).sum().backward()
    assert torch.any(h_init.grad != 0)
    torch.testing.assert_close(h_init.grad, h0.grad)


def test_partial_state_dict_starts_the_rest_from_zeros():
    rec = randomize(sg.Recurrence(lstm_operators_cell()))
    x = torch.randn(T, B, I, dtype=DT)
    c0 = torch.randn(B, H, dtype=DT)
    out, fin = rec(x, {"c": c0})
    ref_out, ref_h, ref_c = lstm_operators_torch(params(rec), x, torch.zeros(B, H, dtype=DT), c0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(fin["c"], ref_c)


# ---------------------------------------------------------------------------------------
# run-time errors name what was expected and what came
# ---------------------------------------------------------------------------------------
@pytest.fixture
def elman():
    return randomize(sg.Recurrence(elman_cell()))


def _x(*shape, dtype=DT):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("call,text", [
    (lambda r: r(_x(T, I)), rf"input 'x' \(declared at test_recurrence.py:\d+\) expects shape \(T, B, {I}\), "
                            rf"got \({T}, {I}\)"),
    (lambda r: r(_x(T, B, I + 1)), rf"expects shape \(T, B, {I}\), got \({T}, {B}, {I + 1}\)"),
    (lambda r: r(_x(T, B, I, dtype=torch.float32)), r"input 'x' has dtype torch.float32 but the parameters are "
                                                    r"torch.float64"),
    (lambda r: r(_x(T, B, I, dtype=torch.int64)), r"expects a floating-point tensor, got dtype torch.int64"),
    (lambda r: r((_x(T, B, I), _x(T, B, I))), r"the cell has 1 input \['x'\] but forward got 2 tensors; pass one tensor per input"),
    (lambda r: r([_x(B, I) for _ in range(T)]), r"forward got 6 tensors; a list of one tensor per step\? .*torch.stack"),
    (lambda r: r(_x(T, B, I), lengths=torch.tensor([T + 1, 1, 1, 1])), rf"lengths must lie in \[0, {T}\] "
                                                                       rf"\(T = {T}\), got {T + 1}"),
    (lambda r: r(_x(T, B, I), lengths=torch.tensor([-1, 1, 1, 1])), rf"lengths must lie in \[0, {T}\] "
                                                                    rf"\(T = {T}\), got -1"),
    (lambda r: r(_x(T, B, I), lengths=torch.tensor([1, 2])), rf"lengths must have shape \({B},\) "
                                                             r"\(one per sequence\), got \(2,\)"),
    (lambda r: r(_x(T, B, I), lengths=torch.full((B,), 2.0)), r"lengths must be integers, got dtype torch.float32"),
    (lambda r: r(_x(T, B, I), mask=torch.ones(B, T, dtype=torch.bool)), rf"mask must be a bool tensor of shape "
                                                                        rf"\({T}, {B}\), got shape \({B}, {T}\)"),
    (lambda r: r(_x(T, B, I), mask=[[True] * B] * T), rf"mask must be a bool tensor of shape \({T}, {B}\), got a list"),
    (lambda r: r(_x(T, B, I), mask=torch.ones(T, B)), r"mask must have dtype torch.bool, got torch.float32"),
    (lambda r: r(_x(T, B, I), lengths=torch.full((B,), T), mask=torch.ones(T, B, dtype=torch.bool)),
     r"give lengths or mask, not both"),
    (lambda r: r(_x(T, B, I), {"z": _x(B, H)}), r"unknown state name\(s\) \['z'\]; the cell's states are \['h'\]"),
    (lambda r: r(_x(T, B, I), {"h": _x(B, H + 1)}), rf"state 'h' \(declared at test_recurrence.py:\d+\) expects "
                                                    rf"shape \({B}, {H}\), got \({B}, {H + 1}\)"),
    (lambda r: r(_x(T, B, I), context=_x(B, 3)), r"context given but the cell declares no sg.Context"),
    (lambda r: r(_x(T, B, I), lengths=torch.full((B,), 2 + 0j)), r"lengths must be integers, got dtype torch.complex64"),
    (lambda r: r(_x(T, B, I), lengths="52"), rf"lengths must be a tensor or list of {B} ints \(one per sequence\), got str"),
    (lambda r: r(_x(T, B, I), lengths=torch.ones(T, dtype=torch.int64)),
     rf"lengths must have shape \({B},\) .*got \({T},\); x is read as \(T, B, \.\.\.\): is it batch-first\?"),
    (lambda r: r((_x(T, B, I), None)), r"x must be a tensor or a tuple of 1 tensors, got a tuple of Tensor, NoneType"),
], ids=["rank", "features", "float_dtype", "int_for_float", "input_count", "list_of_steps", "length_too_big", "length_negative",
        "lengths_shape", "lengths_float", "mask_shape", "mask_list", "mask_dtype", "lengths_and_mask", "unknown_state",
        "state_shape", "context_not_declared", "lengths_complex", "lengths_str", "lengths_of_t", "tuple_with_none"])
def test_bad_argument_raises_input_error_naming_expected_and_got(elman, call, text):
    with pytest.raises(sg.InputError, match=text):
        call(elman)


@pytest.fixture
def attention():
    return randomize(sg.Recurrence(attention_cell()))


@pytest.mark.parametrize("context,text", [
    (None, r"the cell needs context \['memory', 'memory_mask'\] \(a dict of \(B, \*size\) tensors\), got NoneType"),
    ({"memory": _x(B, S, D)}, r"missing context 'memory_mask' \(declared at test_recurrence.py:\d+\)"),
    ({"memory": _x(B, S, D), "memory_mask": _x(B, S), "extra": _x(B, S)},
     r"unknown context name\(s\) \['extra'\]; the cell's contexts are \['memory', 'memory_mask'\]"),
    ({"memory": _x(B, S + 1, D), "memory_mask": _x(B, S)},
     rf"context 'memory' \(declared at test_recurrence.py:\d+\) expects shape \({B}, {S}, {D}\), "
     rf"got \({B}, {S + 1}, {D}\)"),
    (_x(B, S, D), r"the cell has contexts \['memory', 'memory_mask'\]; pass a dict by name"),
    ({"memory": _x(B, S, D).long(), "memory_mask": _x(B, S)},
     r"context 'memory' \(declared at test_recurrence.py:\d+\) expects a floating-point tensor, got dtype torch.int64"),
], ids=["missing_all", "missing_one", "unknown", "shape", "bare_tensor_for_two", "int_for_float"])
def test_bad_context_raises_input_error(attention, context, text):
    with pytest.raises(sg.InputError, match=text):
        attention(_x(T, B, E), context=context)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("shape", [(4 * H, H + 1), (4 * H, H - 1), (H, 4 * H)])
def test_a_parameter_replaced_by_one_of_another_shape_is_refused_naming_both_shapes(backend, shape):
    rec = sg.Recurrence(sg.cells.lstm(I, H))
    run = sg.compile(rec, backend=backend)
    rec.params.hh.weight = torch.nn.Parameter(torch.randn(*shape))  # the C loops would read past its end
    with pytest.raises(sg.InputError, match=rf"parameter 'hh.weight' \(declared at test_recurrence.py:\d+\) "
                                            rf"must have shape \({4 * H}, {H}\), got \({shape[0]}, {shape[1]}\)"):
        run(_x(T, B, I).float())


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_a_parameter_of_another_dtype_than_the_rest_is_refused(backend):
    rec = sg.Recurrence(sg.cells.gru(I, H))
    run = sg.compile(rec, backend=backend)
    rec.params.hh.bias = torch.nn.Parameter(rec.params.hh.bias.double())
    with pytest.raises(sg.InputError, match=r"parameter 'hh.bias' \(declared at .*\) is torch.float64 on cpu but "
                                            r"parameter 'ih.weight' and the others are torch.float32 on cpu"):
        run(_x(T, B, I).float())


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64])
def test_the_one_parameter_of_another_dtype_is_named_whatever_the_input(x_dtype):
    lstm = sg.nn.LSTM(I, H)
    lstm.weight_ih_l0.data = lstm.weight_ih_l0.data.double()  # the first of four; the rest stay float32
    with pytest.raises(sg.InputError, match=r"parameter 'weight_ih_l0' .*is torch.float64 on cpu but "
                                            r"'?(parameter )?'?\w+'? and the others are torch.float32"):
        lstm(_x(T, B, I).to(x_dtype))


def test_sg_nn_names_a_replaced_weight_by_its_attribute():
    lstm = sg.nn.LSTM(I, H)
    lstm.weight_hh_l0 = torch.nn.Parameter(torch.randn(4 * H, H + 1))
    with pytest.raises(sg.InputError, match=r"parameter 'weight_hh_l0' .* must have shape"):
        lstm(_x(T, B, I).float())


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_lengths_of_unsigned_dtypes_torch_cannot_reduce_work(elman, dtype):
    lengths, x = torch.tensor([T, 2, 0, 4]), _x(T, B, I)
    torch.testing.assert_close(elman(x, lengths=lengths.to(dtype))[0], elman(x, lengths=lengths)[0])


def test_two_inputs_that_disagree_on_steps_are_named():
    a, b, h = sg.Input(I, name="a"), sg.Input(2, name="b"), sg.State(H, name="h")
    rec = sg.Recurrence(sg.Cell(inputs=[a, b], states={h: sg.tanh(sg.Linear(I + 2 + H, H)(sg.concat([a, b, h])))}))
    with pytest.raises(sg.InputError, match=rf"inputs 'a' and 'b' disagree on \(T, B\): \({T}, {B}\) and \({T - 1}, {B}\)"):
        rec((torch.randn(T, B, I), torch.randn(T - 1, B, 2)))


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_a_final_state_that_is_an_input_is_a_copy_of_it(backend):
    x, prev = sg.Input(I, name="x"), sg.State(I, name="prev")
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={prev: x}, outputs=[x - prev]), remember=True)
    xs = torch.randn(T, B, I)
    _, final = sg.compile(rec, backend=backend)(xs)
    final["prev"].zero_()  # the caller's to change: the input stays as it was
    assert final["prev"].untyped_storage().data_ptr() != xs.untyped_storage().data_ptr() and xs[-1].abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_two_states_of_one_next_value_come_back_as_two_tensors(backend):
    x, h, g = sg.Input(I, name="x"), sg.State(H, name="h"), sg.State(H, name="g")
    v = sg.tanh(sg.Linear(I + 2 * H, H)(sg.concat([x, h, g])))
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={h: v, g: v}))
    with torch.no_grad():
        _, final = sg.compile(rec, backend=backend)(torch.randn(T, B, I))
    final["h"].zero_()
    assert final["g"].abs().sum() > 0


def test_remember_under_a_torch_func_transform_is_refused():
    rec = sg.Recurrence(sg.cells.gru(I, H), remember=True)
    params = dict(rec.named_parameters())

    def loss(p, x):
        return torch.func.functional_call(rec, p, (x,))[0].sum()
    with pytest.raises(sg.InputError, match=r"remember=True keeps each call's final state .* torch.func transform"):
        torch.func.grad(loss)(params, torch.randn(T, B, I))


@pytest.mark.parametrize("kind", ["lengths", "mask"])
def test_lengths_or_a_mask_batched_by_vmap_are_refused_naming_the_way_out(kind):
    rec = sg.Recurrence(sg.cells.gru(I, H))
    xs, lengths = torch.randn(3, T, B, I), torch.randint(0, T + 1, (3, B))
    per_example = lengths if kind == "lengths" else torch.arange(T)[None, :, None] < lengths[:, None, :]
    with pytest.raises(sg.InputError, match=rf"{kind}= is batched by torch.func.vmap.*outside vmap's in_dims"):
        torch.func.vmap(lambda x, v: rec(x, **{kind: v})[0])(xs, per_example)


def test_per_example_lengths_under_vmap_of_grad_are_refused_too():
    rec = sg.Recurrence(sg.cells.gru(I, H))
    params = dict(rec.named_parameters())
    xs, lengths = torch.randn(3, T, B, I), torch.randint(0, T + 1, (3, B))

    def loss(p, x, n):  # per-example gradients: grad's wrapper hides vmap's batch inside it
        return torch.func.functional_call(rec, p, (x,), {"lengths": n})[0].sum()
    with pytest.raises(sg.InputError, match=r"lengths= is batched by torch.func.vmap"):
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, lengths)


def test_lengths_shared_by_every_vmapped_example_run_each_example_with_them():
    rec = sg.Recurrence(sg.cells.gru(I, H))
    xs, lengths = torch.randn(3, T, B, I), torch.randint(0, T + 1, (B,))
    got = torch.func.vmap(lambda x: rec(x, lengths=lengths)[0])(xs)
    torch.testing.assert_close(got, torch.stack([rec(x, lengths=lengths)[0] for x in xs]))


def test_a_dry_run_on_meta_goes_through_an_embedding():
    tok, h = sg.Input(name="tok", dtype="long"), sg.State(H, name="h")
    cell = sg.Cell(inputs=[tok], states={h: sg.tanh(sg.Embedding(10, H)(tok) + h)})
    rec = sg.Recurrence(cell).to("meta")
    out, _ = rec(torch.zeros(T, B, dtype=torch.long, device="meta"))
    assert out.shape == (T, B, H) and out.is_meta


def test_a_state_remembered_on_meta_is_dropped_by_to_empty():
    rec = sg.Recurrence(sg.cells.gru(I, H), remember=True).to("meta")
    rec(torch.randn(T, B, I, device="meta"))  # a dry run for shapes
    rec.to_empty(device="cpu")
    assert rec._memory is None


@pytest.mark.parametrize("kw", [dict(lengths=torch.tensor([T, 2, 0, 4])), dict(mask=torch.ones(T, B, dtype=torch.bool))],
                         ids=["lengths", "mask"])
def test_the_reference_gives_shapes_on_meta_with_padding(kw):
    rec = sg.Recurrence(sg.cells.gru(I, H)).to("meta")
    kw = {k: v.to("meta") for k, v in kw.items()}
    out, final = rec(torch.randn(T, B, I, device="meta"), **kw)
    assert out.shape == (T, B, H) and out.is_meta and final["h"].shape == (B, H)


def test_reading_values_in_another_order_are_matched_by_key():
    rec = randomize(sg.Recurrence(sg.cells.gru(I, H)))
    values = dict(reversed(list(rec.param_tensors().items())))
    x = _x(T, B, I)
    expected, _ = rec(x)
    for backend in ("reference", "torch", "cpu"):
        run = sg.compile(rec, backend=backend)
        with rec.reading(values):
            torch.testing.assert_close(run(x)[0], expected)


def test_a_final_state_meeting_the_batch_only_through_eval_noise_has_rows_of_its_own():
    x, h = sg.Input(I, name="x"), sg.State(2, name="h")
    cell = sg.Cell(inputs=[x], states={h: sg.dropout(sg.Parameter(2, name="bias"), 0.3)}, outputs=[sg.Linear(I, 2)(x)])
    rec = sg.Recurrence(cell).double().eval()
    _, final = rec(_x(T, B, I))
    final["h"][0].zero_()  # the caller's to change, row by row
    assert final["h"][1].abs().sum() > 0


def test_input_error_is_a_value_error():
    assert issubclass(sg.InputError, ValueError)


# ---------------------------------------------------------------------------------------
# no_grad memory stays flat
# ---------------------------------------------------------------------------------------
class _StorageTracker(TorchDispatchMode):
    """Records a weak reference to the storage of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.refs.append(weakref.ref(o.untyped_storage()))
        return out


def _live_storages_after_run(rec, x, keep_graph: bool) -> int:
    """How many storages made during forward() outlive it, besides the outputs and final states
    (views of the input and of the weights, such as x[t] or W.t(), share storages made before)."""
    with torch.set_grad_enabled(keep_graph), _StorageTracker() as tracker:
        out, fin = rec(x)
    gc.collect()
    returned = {out.untyped_storage().data_ptr()} | {v.untyped_storage().data_ptr() for v in fin.values()}
    before = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in rec.parameters()}
    alive = {s.data_ptr() for s in (r() for r in tracker.refs) if s is not None}
    return len(alive - returned - before)


def _long_run_cell():
    x, h = sg.Input(2, name="x"), sg.State(16, name="h")
    h_next = sg.tanh(sg.Linear(2 + 16, 16)(sg.concat([x, h])))
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[sg.Linear(16, 1)(h_next)])


def test_no_grad_long_run_keeps_no_per_step_tensors():
    rec = sg.Recurrence(_long_run_cell())
    assert _live_storages_after_run(rec, torch.randn(2000, 2, 2), keep_graph=False) == 0


def test_storage_tracker_sees_what_autograd_keeps():
    # the control for the test above: with gradients on, per-step tensors do outlive forward()
    rec = sg.Recurrence(_long_run_cell())
    assert _live_storages_after_run(rec, torch.randn(100, 2, 2), keep_graph=True) >= 100


# ---------------------------------------------------------------------------------------
# dropout noise
# ---------------------------------------------------------------------------------------
def _dropout_lstm(p):
    x, h, c = sg.Input(I, name="x"), sg.State(H, name="h"), sg.State(H, name="c")
    xh = sg.concat([sg.dropout(x, p), sg.dropout(h, p, per_sequence=True)])
    i, f, g, o = sg.chunk(sg.Linear(I + H, 4 * H, name="gates")(xh), 4)
    c_next = sg.sigmoid(f) * c + sg.sigmoid(i) * sg.tanh(g)
    return sg.Cell(inputs=[x], states={h: sg.sigmoid(o) * sg.tanh(c_next), c: c_next})


def test_eval_mode_is_deterministic_and_equals_no_dropout():
    rec = randomize(sg.Recurrence(_dropout_lstm(0.3))).eval()
    plain = sg.Recurrence(_dropout_lstm(0.0)).double()
    plain.load_state_dict(rec.state_dict())
    x = torch.randn(T, B, I, dtype=DT)
    first, second = rec(x)[0][0], rec(x)[0][0]
    assert torch.equal(first, second)
    torch.testing.assert_close(first, plain(x)[0][0])


@pytest.mark.parametrize("lengths", [None, torch.tensor([T, 2, 0, 4])], ids=["full", "padded"])
def test_an_output_meeting_the_batch_only_through_noise_has_every_row_in_eval_mode(lengths):
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    bias = sg.dropout(sg.Parameter(2, name="bias"), 0.3)  # batched only through its keep-mask
    cell = sg.Cell(inputs=[x], states={h: sg.tanh(sg.Linear(I + H, H)(sg.concat([x, h])))}, outputs=[h, bias])
    rec = sg.Recurrence(cell).double().eval()
    (_, out), _ = rec(torch.randn(T, B, I, dtype=DT), lengths=lengths)
    (_, compiled), _ = sg.compile(rec, backend="torch")(torch.randn(T, B, I, dtype=DT), lengths=lengths)
    assert out.shape == (T, B, 2)
    torch.testing.assert_close(out, compiled)


def test_training_mode_draws_noise():
    rec = randomize(sg.Recurrence(_dropout_lstm(0.3))).train()
    x = torch.randn(T, B, I, dtype=DT)
    assert not torch.allclose(rec(x)[0][0], rec(x)[0][0])


def _noise_cell(per_sequence):
    ones = sg.Input(64, name="ones")
    return sg.Cell(inputs=[ones], outputs=[sg.dropout(ones, 0.5, per_sequence=per_sequence)])


def test_per_sequence_mask_is_constant_over_time():
    rec = sg.Recurrence(_noise_cell(per_sequence=True)).train()
    out, _ = rec(torch.ones(T, B, 64))
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(out, out[:1].expand_as(out))
    assert not torch.equal(out[:, 0], out[:, 1])  # each sequence draws its own mask


def test_per_step_mask_changes_over_time():
    rec = sg.Recurrence(_noise_cell(per_sequence=False)).train()
    out, _ = rec(torch.ones(T, B, 64))
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(out[0], out[1])


def test_noise_is_one_in_eval_mode():
    rec = sg.Recurrence(_noise_cell(per_sequence=True)).eval()
    assert torch.equal(rec(torch.ones(T, B, 64))[0], torch.ones(T, B, 64))


def test_state_given_as_a_bare_tensor_is_a_clear_input_error():
    x, h = sg.Input(2, name="x"), sg.State(3, name="h")
    rec = sg.Recurrence(sg.Cell([x], {h: sg.tanh(sg.Linear(5, 3)(sg.concat([x, h])))}))
    with pytest.raises(sg.InputError, match="state must be a dict from state name to tensor"):
        rec(torch.randn(4, 2, 2), torch.zeros(2, 3))


def test_context_that_is_not_a_tensor_is_a_clear_input_error():
    x, z = sg.Input(2, name="x"), sg.Context(2, name="z")
    h = sg.State(2, name="h")
    rec = sg.Recurrence(sg.Cell([x], {h: sg.tanh(x + z + h)}))
    with pytest.raises(sg.InputError, match="context 'z' .* must be a tensor of shape"):
        rec(torch.randn(4, 2, 2), context={"z": [[0.0, 0.0]] * 2})


def test_remember_on_a_cell_without_states_runs_twice():
    x = sg.Input(2, name="x")
    rec = sg.Recurrence(sg.Cell([x], {}, [sg.tanh(x)]), remember=True)
    rec(torch.randn(3, 2, 2))
    assert rec(torch.randn(3, 2, 2))[0].shape == (3, 2, 2)


@pytest.mark.parametrize("name", ["enc.h", "forward"])
def test_names_that_cannot_be_state_dict_keys_are_refused_when_the_cell_is_built(name):
    x = sg.Input(2, name="x")
    with pytest.raises(sg.WiringError, match=f"name '{name}'"):
        h = sg.State(2, name=name, init="learned")
        sg.Cell([x], {h: sg.tanh(x + h)})
    with pytest.raises(sg.WiringError, match=f"module name '{name}'"):
        h = sg.State(2, name="h")
        sg.Cell([x], {h: sg.Linear(4, 2, name=name)(sg.concat([x, h]))})


@pytest.mark.parametrize("make", [lambda: sg.Recurrence(sg.cells.lstm(3, 5, peephole=True)),
                                  lambda: sg.Recurrence(sg.cells.indrnn(3, 5)),
                                  lambda: sg.Stack([sg.Recurrence(sg.cells.lstm(3, 5)), sg.Recurrence(sg.cells.gru(5, 4))])])
def test_a_module_saved_whole_with_torch_save_loads_and_gives_the_same_outputs(make, tmp_path):
    module = make()
    x = torch.randn(4, 2, 3)
    torch.save(module, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(loaded(x)[0], module(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_nan_in_the_padding_reaches_neither_outputs_nor_gradients(backend):
    torch.manual_seed(0)
    rec = sg.Recurrence(sg.cells.gru(3, 5))
    module = rec if backend == "reference" else sg.compile(rec, backend=backend)
    x = torch.randn(4, 2, 3)
    clean = x.clone().requires_grad_()
    x[2:, 1] = float("nan")
    x.requires_grad_()
    lengths = torch.tensor([4, 2])
    out, final = module(x, lengths=lengths)
    want_out, want_final = module(clean, lengths=lengths)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(final["h"], want_final["h"])
    grads = torch.autograd.grad(out.sum(), [x, *rec.parameters()])
    want = torch.autograd.grad(want_out.sum(), [clean, *rec.parameters()])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    assert (grads[0][2:, 1] == 0).all()


def _context_cell(token: bool):
    x, h = sg.Input(3, name="x"), sg.State(4, name="h")
    c = sg.Context((), name="c", dtype="long") if token else sg.Context(4, name="c")
    read = sg.Embedding(5, 4, name="table")(c) if token else sg.Linear(4, 4, name="table")(c)
    h_next = sg.tanh(sg.Linear(4, 4)(h) + sg.Linear(3, 4)(x) + read)
    return sg.Recurrence(sg.Cell([x], {h: h_next}, [h_next], contexts=[c])).double()


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("token", [False, True], ids=["nan_context", "out_of_range_token"])
def test_the_context_of_a_sequence_without_real_steps_is_never_read(backend, token):
    torch.manual_seed(0)
    rec = _context_cell(token)
    module = rec if backend == "reference" else sg.compile(rec, backend=backend)
    clean = torch.tensor([1, 0, 2]) if token else torch.randn(3, 4, dtype=DT)
    bad = clean.clone()
    bad[1] = -1 if token else float("nan")
    x, lengths = torch.randn(5, 3, 3, dtype=DT), torch.tensor([5, 0, 3])
    results = []
    for c in (bad, clean):
        out, fin = module(x, context=c, lengths=lengths)
        results.append((out, fin["h"], *torch.autograd.grad(out.sum() + fin["h"].sum(), list(rec.parameters()))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_an_out_of_range_token_on_a_padded_step_is_never_looked_up():
    tok, h = sg.Input(name="tok", dtype="long"), sg.State(4, name="h")
    rec = sg.Recurrence(sg.Cell([tok], {h: sg.tanh(sg.Embedding(10, 4)(tok) + h)}))
    tokens = torch.randint(10, (4, 2))
    padded = tokens.clone()
    padded[2:, 1] = -1
    lengths = torch.tensor([4, 2])
    torch.testing.assert_close(rec(padded, lengths=lengths)[0], rec(tokens, lengths=lengths)[0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_an_out_of_range_token_on_a_real_step_is_an_input_error_naming_step_and_sequence(backend):
    tok, h = sg.Input(name="tok", dtype="long"), sg.State(4, name="h")
    rec = sg.Recurrence(sg.Cell([tok], {h: sg.tanh(sg.Embedding(10, 4, name="emb")(tok) + h)}))
    module = rec if backend == "reference" else sg.compile(rec, backend=backend)
    tokens = torch.randint(10, (4, 3))
    tokens[2, 1] = 10
    with pytest.raises(sg.InputError, match=r"input 'tok' holds id 10 at step 2 of sequence 1, but Embedding 'emb' "
                                            r"\(declared at test_recurrence.py:\d+\) has 10 rows \(ids 0 to 9\)"):
        module(tokens)


def _two_ids_per_step_cell():
    """Two ids per step: the first reads a table of 100 rows, the second one of 10, through
    sg.narrow and sg.reshape."""
    tok, h = sg.Input(2, name="tok", dtype="long"), sg.State(4, name="h")
    big, small = sg.Embedding(100, 4, name="big"), sg.Embedding(10, 4, name="small", padding_idx=0)
    e = big(sg.reshape(sg.narrow(tok, -1, 0, 1), ())) + sg.reshape(small(sg.narrow(tok, -1, 1, 1)), (4,))
    return sg.Cell([tok], {h: sg.tanh(e + h)})


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_token_picked_by_narrow_for_an_embedding_is_checked_against_its_table(backend):
    rec = sg.Recurrence(_two_ids_per_step_cell())
    module = rec if backend == "reference" else sg.compile(rec, backend=backend)
    tokens = torch.randint(1, 10, (4, 3, 2))
    tokens[:, :, 0] = 50  # in range for the big table only: no error
    module(tokens)
    tokens[1, 2, 1] = 50
    with pytest.raises(sg.InputError, match=r"input 'tok' holds id 50 at step 1 of sequence 2, but Embedding "
                                            r"'small' \(declared at test_recurrence.py:\d+\) has 10 rows"):
        module(tokens)


def test_the_padding_warning_looks_at_the_picked_ids_only():
    rec = sg.Recurrence(_two_ids_per_step_cell())
    tokens = torch.randint(1, 10, (4, 3, 2))
    tokens[-1, :, 0] = 0  # id 0 where the big table (no padding) reads: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec(tokens)
    tokens[-1, 1, 1] = 0
    with pytest.warns(UserWarning, match=r"padding id 0 at the last step of sequence\(s\) \[1\]"):
        rec(tokens)


def test_an_out_of_range_token_context_is_an_input_error_naming_the_sequence():
    rec = _context_cell(token=True)
    with pytest.raises(sg.InputError, match=r"context 'c' holds id 5 at sequence 2, but Embedding 'table'"):
        rec(torch.randn(5, 3, 3, dtype=DT), context=torch.tensor([1, 0, 5]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.bool, torch.float32])
def test_token_input_of_a_dtype_embedding_cannot_index_is_an_input_error(dtype):
    tok, h = sg.Input(name="tok", dtype="long"), sg.State(4, name="h")
    rec = sg.Recurrence(sg.Cell([tok], {h: sg.tanh(sg.Embedding(10, 4)(tok) + h)}))
    with pytest.raises(sg.InputError, match=rf"input 'tok' .* holds integer indices \(torch.int64 or torch.int32\), "
                                            rf"got dtype {dtype}"):
        rec(torch.zeros(3, 2, dtype=dtype))


def test_token_context_of_a_float_dtype_is_an_input_error():
    x, ids, h = sg.Input(4, name="x"), sg.Context(name="ids", size=1, dtype="long"), sg.State(4, name="h")
    rec = sg.Recurrence(sg.Cell([x], {h: sg.tanh(x + h + sg.sum(sg.Embedding(10, 4)(ids), dim=0))}))
    with pytest.raises(sg.InputError, match=r"context 'ids' .* holds integer indices .* got dtype torch.float32"):
        rec(torch.zeros(3, 2, 4), context=torch.zeros(2, 1))


def test_a_float_context_of_another_dtype_is_an_input_error():
    rec = _context_cell(token=False)
    with pytest.raises(sg.InputError, match=r"context 'c' .* has dtype torch.float32 but this call computes in "
                                            r"torch.float64"):
        rec(torch.randn(5, 3, 3, dtype=DT), context=torch.randn(3, 4))


def test_a_context_of_another_dtype_is_taken_under_autocast():
    rec = _context_cell(token=False).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = rec(torch.randn(5, 3, 3), context=torch.randn(3, 4, dtype=torch.bfloat16))
    assert out.shape == (5, 3, 4)


def test_context_dtype_is_checked_when_declared():
    with pytest.raises(ValueError, match="Context dtype must be 'float' or 'long', got 'int'"):
        sg.Context(3, name="c", dtype="int")


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_an_initial_state_of_another_dtype_is_an_input_error(elman, dtype):
    with pytest.raises(sg.InputError, match=rf"state 'h' .* has dtype {dtype} but the inputs are torch.float64"):
        elman(_x(T, B, I), {"h": torch.zeros(B, H, dtype=dtype)})


@pytest.mark.parametrize("compiled", [False, True])
def test_with_no_steps_the_final_state_is_a_copy_of_the_initial_one_not_the_same_tensor(compiled):
    rec = sg.Recurrence(elman_cell()).double()
    module = sg.compile(rec, backend="torch") if compiled else rec
    h0 = torch.randn(B, H, dtype=DT)
    _, fin = module(torch.randn(0, B, I, dtype=DT), {"h": h0})
    assert torch.equal(fin["h"], h0) and fin["h"].data_ptr() != h0.data_ptr()


def test_zeroing_rows_of_the_returned_final_state_restarts_them_at_the_next_call():
    rec = randomize(sg.Recurrence(elman_cell(), remember=True))
    x = torch.randn(T, B, I, dtype=DT)
    _, fin = rec(x)
    with torch.no_grad():
        fin["h"][0] = 0
    out, _ = rec(x)
    ref = sg.Recurrence(elman_cell()).double()
    ref.load_state_dict(rec.state_dict())
    fresh, _ = ref(x[:, :1])
    torch.testing.assert_close(out[:, 0], fresh[:, 0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_bool_mask_given_as_a_float_context_is_read_as_zeros_and_ones(backend):
    rec = randomize(sg.Recurrence(attention_cell()))
    module = rec if backend == "reference" else sg.compile(rec, backend=backend)
    y = torch.randn(T, B, E, dtype=DT)
    mem, valid = _memory([S, 3, 1, 5])
    want = module(y, context={"memory": mem, "memory_mask": valid})[0][0]
    got = module(y, context={"memory": mem, "memory_mask": valid.bool()})[0][0]
    torch.testing.assert_close(got, want)


def _two_input_cell():
    a, b, s = sg.Input(2, name="a"), sg.Input(2, name="b"), sg.State(2, name="s")
    return sg.Cell(inputs=[a, b], states={s: sg.tanh(a + b + s)})


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_two_float_inputs_of_different_dtypes_are_an_input_error(backend):
    rec = sg.compile(sg.Recurrence(_two_input_cell()), backend=backend)
    with pytest.raises(sg.InputError, match=r"inputs 'a' and 'b' \(declared at test_recurrence.py:\d+\) have dtypes "
                                            r"torch.float32 and torch.float64"):
        rec((torch.randn(3, 2, 2), torch.randn(3, 2, 2, dtype=torch.float64)))


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("where", ["input", "state"])
def test_a_tensor_on_another_device_than_the_inputs_is_an_input_error(backend, where):
    rec = sg.compile(sg.Recurrence(_two_input_cell()), backend=backend)
    xs = [torch.randn(3, 2, 2), torch.randn(3, 2, 2, device="meta" if where == "input" else "cpu")]
    state = {"s": torch.zeros(2, 2, device="meta")} if where == "state" else None
    name = "b" if where == "input" else "s"
    with pytest.raises(sg.InputError, match=rf"{where} '{name}' \(declared at .*\) is on meta but the inputs are on "
                                            rf"cpu; move it"):
        rec(xs, state)


def test_inputs_on_another_device_than_the_parameters_are_an_input_error(elman):
    with pytest.raises(sg.InputError, match=r"the inputs are on meta but the parameters are on cpu"):
        elman(torch.randn(T, B, I, dtype=DT, device="meta"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("how", ["setattr", "load_state_dict_assign"])
def test_a_parameter_replaced_after_a_call_is_the_one_the_next_call_reads(backend, how):
    rec = randomize(sg.Recurrence(elman_cell()))
    module = sg.compile(rec, backend=backend)
    x = torch.randn(T, B, I, dtype=DT)
    module(x)
    new = {k: torch.randn_like(v) for k, v in rec.state_dict().items()}
    if how == "setattr":
        for key, value in new.items():
            owner, _, leaf = key.removeprefix("params.").rpartition(".")
            setattr(rec.params.get_submodule(owner), leaf, torch.nn.Parameter(value))
    else:
        rec.load_state_dict(new, assign=True)
    fresh = randomize(sg.Recurrence(elman_cell()))
    fresh.load_state_dict(new)
    torch.testing.assert_close(module(x)[0], fresh(x)[0])


def test_values_given_with_reading_belong_to_the_calling_thread():
    rec = randomize(sg.Recurrence(elman_cell()))
    given = {k: torch.zeros_like(v) for k, v in rec.param_tensors().items()}
    with entered_in_another_thread(lambda: rec.reading(given), lambda r: r.param_tensors()) as seen_there:
        assert all(seen_there[k] is v for k, v in given.items())
        assert all(v is p for v, p in zip(rec.param_tensors().values(), rec.parameters()))  # not the other's
    other = {k: torch.ones_like(v) for k, v in given.items()}
    with rec.reading(given):
        with rec.reading(other) as again:
            assert all(v is other[k] for k, v in again.param_tensors().items())
        assert all(v is given[k] for k, v in rec.param_tensors().items())  # a nested block gives the outer values back


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_a_state_remembered_under_inference_mode_starts_a_training_call(backend):
    rec = randomize(sg.Recurrence(elman_cell(), remember=True))
    module = sg.compile(rec, backend=backend)
    x = torch.randn(T, B, I, dtype=DT)
    with torch.inference_mode():
        _, first = module(x)
    out, _ = module(x)
    out.sum().backward()
    plain = sg.Recurrence(elman_cell()).double()
    plain.load_state_dict(rec.state_dict())
    want, _ = plain(x, {"h": first["h"].clone()})
    torch.testing.assert_close(out, want)


def test_a_parameter_module_replaced_after_a_call_is_the_one_the_next_call_reads():
    rec = randomize(sg.Recurrence(elman_cell()))
    x = torch.randn(T, B, I, dtype=DT)
    rec(x)
    owner = next(name for name, _ in rec.params.named_children())
    fresh = copy.deepcopy(getattr(rec.params, owner))
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(2.0)
    setattr(rec.params, owner, fresh)
    twin = randomize(sg.Recurrence(elman_cell()))
    twin.load_state_dict(rec.state_dict())
    torch.testing.assert_close(rec(x)[0], twin(x)[0])


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_remember_under_activation_checkpointing_is_refused(backend, reentrant):
    # the checkpoint's second run would start from the state its first run stored: wrong gradients
    rec = sg.compile(sg.Recurrence(sg.cells.gru(I, H), remember=True), backend=backend)
    x = torch.randn(T, B, I, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(lambda v: rec(v)[0], x, use_reentrant=reentrant)
    with pytest.raises(sg.InputError, match=r"remember=True, and this call runs during a backward pass"):
        out.sum().backward()


def test_a_checkpointed_layer_that_is_given_its_state_gets_the_gradients_of_an_uncheckpointed_one():
    rec = sg.Recurrence(sg.cells.gru(I, H))
    x, h0 = torch.randn(T, B, I, requires_grad=True), torch.randn(B, H)
    torch.utils.checkpoint.checkpoint(lambda v: rec(v, {"h": h0})[0], x, use_reentrant=False).sum().backward()
    checkpointed, x.grad = x.grad, None
    rec(x, {"h": h0})[0].sum().backward()
    assert torch.allclose(checkpointed, x.grad)


def test_a_recurrence_prints_its_parameters_shapes():
    text = repr(sg.Recurrence(sg.cells.gru(4, 8)))
    assert "(ih): ParamTree(weight: (24, 4), bias: (24,))" in text and "states={h: (8,)}" in text


@pytest.mark.parametrize("name", ["plan", "source"])
def test_asking_an_uncompiled_recurrence_for_its_plan_names_sg_compile(name):
    rec = sg.Recurrence(sg.cells.gru(4, 8))
    assert getattr(rec, name, None) is None
    with pytest.raises(AttributeError, match=rf"reference interpreter and has no {name}\(\): sg.compile\(module\)"):
        getattr(rec, name)()


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_under_autocast_inputs_and_states_of_another_float_dtype_are_cast_as_autocast_casts_operands(backend):
    torch.manual_seed(0)
    rec = sg.Recurrence(sg.cells.gru(3, 4))
    module = rec if backend == "reference" else sg.compile(rec, backend=backend)
    x = torch.randn(5, 2, 3, dtype=torch.bfloat16, requires_grad=True)  # as an autocast op before it gives
    h0 = torch.randn(2, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, final = module(x, {"h": h0})
        want, want_final = rec(x.float(), {"h": h0.float()})
    torch.testing.assert_close(out, want, atol=1e-2, rtol=2e-2)  # bfloat16 products, grouped differently
    torch.testing.assert_close(final["h"], want_final["h"], atol=1e-2, rtol=2e-2)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_outside_autocast_an_input_of_another_dtype_is_still_an_input_error():
    with pytest.raises(sg.InputError, match=r"input 'x' has dtype torch.bfloat16 but the parameters are torch.float32"):
        sg.Recurrence(sg.cells.gru(3, 4))(torch.randn(5, 2, 3, dtype=torch.bfloat16))


def test_under_autocast_a_float64_input_is_still_an_input_error_as_autocast_never_casts_float64():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(sg.InputError, match=r"input 'x' has dtype torch.float64 but the parameters are torch.float32"):
            sg.Recurrence(sg.cells.gru(3, 4))(torch.randn(5, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_under_autocast_a_state_that_is_a_raw_linear_output_runs(backend):
    x, h = sg.Input(3, name="x"), sg.State(4, name="h")
    h_next = sg.Linear(7, 4)(sg.concat([x, h]))  # the product itself is the next state
    rec = sg.Recurrence(sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next]))
    module = rec if backend == "reference" else sg.compile(rec, backend=backend)
    xs = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = module(xs)
        want, _ = rec(xs)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)


def _token_lstm():
    tok = sg.Input(name="tok", dtype="long")
    h, c = sg.State(6, name="h"), sg.State(6, name="c")
    e = sg.Embedding(11, 4, padding_idx=0, name="emb")(tok)  # Torch7's LookupTableMaskZero(10, 4)
    _, nxt = sg.cells.lstm(4, 6)(e, {"h": h, "c": c}, scope="lstm")
    return sg.Recurrence(sg.Cell(inputs=[tok], states={h: nxt["h"], c: nxt["c"]}, outputs=[nxt["h"]]))


ZERO_PADDED = torch.tensor([[3, 5, 2, 0], [4, 1, 0, 0], [7, 7, 7, 7]]).T  # (T, B), Torch7's zero padding


def test_zero_padded_tokens_without_lengths_warn_once_that_padded_steps_run_as_real_steps():
    rnn = _token_lstm()
    with pytest.warns(UserWarning, match=r"input 'tok' holds its embedding's padding id 0 at the last step of "
                                         r"sequence\(s\) \[0, 1\], and the call has no lengths= or mask=") as seen:
        rnn(ZERO_PADDED)
    assert seen[0].filename == __file__  # the user's line, past torch's Module.__call__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnn(ZERO_PADDED)  # once per module


@pytest.mark.parametrize("how", ["lengths", "mask", "no padding"])
def test_tokens_with_their_padding_marked_or_without_padding_do_not_warn(how):
    rnn = _token_lstm()
    kwargs = {"lengths": {"lengths": (ZERO_PADDED != 0).sum(0)}, "mask": {"mask": ZERO_PADDED != 0},
              "no padding": {}}[how]
    tokens = ZERO_PADDED.clamp(min=1) if how == "no padding" else ZERO_PADDED
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnn(tokens, **kwargs)
