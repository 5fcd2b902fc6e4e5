"""The cell library: the standard recurrent cells, each written in the seqgraph DSL.

Every cell function here returns an `sg.Cell` (one step) built from the same public pieces a
user has (`sg.Linear`, `sg.chunk`, `sg.sigmoid`, ...), so each one doubles as an example of how
to declare a cell. The torch.nn-style cells (rnn, lstm, gru) keep input and recurrent
projections as separate `sg.Linear` modules named "ih" and "hh" (keys "ih.weight", "ih.bias",
"hh.weight", "hh.bias", gate order as in torch.nn; gru(reset_after=False) adds "hh_n"), which
is what lets `sg.nn` map torch.nn's state_dict onto them; the compiler hoists any input
projection out of the time loop whatever its name. `NormStabilizer` and
`norm_stabilizer_loss` (the norm-stabilising regulariser of Krueger & Memisevic, a wrapper
and a loss) are here too.
This module only declares cells: it must not run steps or know about backends.
"""
from __future__ import annotations

import numbers
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

import seqgraph as sg
from .dsl import _count
from .errors import InputError, refuse_torchscript, user_site
from .layers import _check_takes_lengths, _layout_of
from .recurrence import valid_steps

MUFURU_OPS = ("keep", "replace", "mul", "diff", "forget", "sqrt_diff", "max", "min")


def _activation(nonlinearity: str, allowed: Sequence[str] = ("tanh", "relu")) -> Callable:
    if nonlinearity not in allowed:
        raise ValueError(f"nonlinearity must be one of {list(allowed)}, got {nonlinearity!r}")
    return {"tanh": sg.tanh, "relu": sg.relu, "sigmoid": sg.sigmoid}[nonlinearity]


def _check_flags(who: str, **flags) -> None:
    """A switch given a number (a Torch7 port's rho or p in its place, say) is refused, not taken as true."""
    for name, value in flags.items():
        if not (isinstance(value, numbers.Integral) and value in (0, 1)):  # bools, and 0 / 1 as torch.nn takes
            raise TypeError(f"sg.cells.{who}: {name} must be True or False, got {value!r}")


def _check_sizes(who: str, **sizes) -> None:
    """Sizes are positive ints, named by their argument when not."""
    for name, value in sizes.items():
        sg.dsl._count(value, f"sg.cells.{who} (at {user_site()}): {name}")


def _check_probabilities(who: str, **ps) -> None:
    """Dropout-like probabilities are numbers in [0, 1), named by their argument when not."""
    for name, value in ps.items():
        sg.dsl.probability(value, f"sg.cells.{who}", f"{name}, a probability,")


def _keep_mask(size: int, p: float, name: str, per_sequence: bool = False):
    """A named sg.Noise keep-mask (named so that tests and pictures can find it)."""
    return sg.Noise(size, p, per_sequence=per_sequence, name=name)


def _gal_dropout(v, p: float, name: str):
    """Gal & Ghahramani's variational dropout: one mask per sequence, reused at every step."""
    if p == 0:
        return v
    return v * (_keep_mask(v.shape[-1], p, name, per_sequence=True) * (1.0 / (1.0 - p)))


def _zoneout(prev, new, p: float, name: str):
    """Zoneout (Krueger et al.): each unit keeps its previous value with probability p. The
    keep-new mask is 1 with probability 1-p in training and the constant 1-p in evaluation,
    so evaluation blends p*prev + (1-p)*new, the expectation."""
    if p == 0:
        return new
    return sg.where_mask(_keep_mask(new.shape[-1], p, name), new, prev)


# ---------------------------------------------------------------------------------------
# Elman RNN and Torch7's nn.Recurrent
# ---------------------------------------------------------------------------------------
def rnn(input_size: int, hidden_size: int, *, nonlinearity: str = "tanh", bias: bool = True) -> sg.Cell:
    """The Elman RNN of torch.nn.RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh).

    >>> cell = sg.cells.rnn(3, 5, nonlinearity="relu")
    >>> sorted(cell.params)
    ['hh.bias', 'hh.weight', 'ih.bias', 'ih.weight']
    """
    _check_flags("rnn", bias=bias)
    _check_sizes("rnn", input_size=input_size, hidden_size=hidden_size)
    act = _activation(nonlinearity)
    x = sg.Input(input_size, name="x")
    h = sg.State(hidden_size, name="h")
    ih = sg.Linear(input_size, hidden_size, bias=bias, name="ih")
    hh = sg.Linear(hidden_size, hidden_size, bias=bias, name="hh")
    h_next = act(ih(x) + hh(h))
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next], name=f"rnn_{nonlinearity}")


def _start_size(start) -> int | None:
    """Torch7's `start` as a state size (a number, a one-number table or tensor), or None for a
    module. A size that is not one positive integer is refused by name."""
    if callable(start):  # a module or a function
        return None
    if isinstance(start, (tuple, list, torch.Size)) or (isinstance(start, torch.Tensor) and start.dim() == 1):
        if len(start) != 1:
            raise ValueError(f"sg.cells.recurrent: start as a size must be one number (the state size; Torch7's "
                             f"nn.Add(start)), got {start!r}")
        start = start[0]
    if isinstance(start, torch.Tensor) and start.dim() == 0 and not start.is_floating_point():
        start = int(start)
    try:
        return _count(start, "sg.cells.recurrent: start as a size (the state size)")
    except ValueError:
        if isinstance(start, (numbers.Number, torch.Tensor)):
            raise
    raise TypeError(f"sg.cells.recurrent: start must be the state size (an int) or a module, got {start!r}")


def recurrent(start: int | sg.Module, input_module: sg.Module, feedback_module: sg.Module,
              transfer: sg.Module | Callable | None = None, merge: sg.Module | Callable | None = None, *,
              input_size: int | None = None, hidden_size: int | None = None,
              input_dtype: str | None = None) -> sg.Cell:
    """Torch7's nn.Recurrent(start, input, feedback, transfer, merge) as a cell.

    Step 1:   h = transfer(start(input(x)))
    Step t>1: h = transfer(merge([input(x), feedback(h_prev)]))
    `start` is the state size (then it is a learned bias, Torch7's nn.Add(size); a one-number
    tuple, list or tensor is a size too) or a module; `transfer` defaults to sg.Sigmoid() and
    `merge` to sg.CAdd(), as in Torch7. A one-unit state "started" (0 before the first step, 1
    after it) picks the branch, so the first step ignores the initial h exactly like Torch7; to
    continue a sequence pass state={"h": h0, "started": torch.ones(B, 1)}. Sizes are read from
    `in_features` / `out_features` of Linear modules unless given. An sg.Embedding as
    `input_module` (Torch7's LookupTable) makes the input token ids, (T, B) of longs;
    `input_dtype="long"` does so for another module that reads ids.

    >>> cell = sg.cells.recurrent(4, sg.Linear(3, 4), sg.Linear(4, 4), sg.Tanh())
    >>> cell.state_names
    ['h', 'started']
    """
    start_size = _start_size(start)
    if input_dtype is None:
        input_dtype = "long" if isinstance(input_module, sg.Embedding) else "float"
    if input_dtype not in ("float", "long"):
        raise ValueError(f"sg.cells.recurrent: input_dtype must be 'float' or 'long' (token ids), got {input_dtype!r}")
    if input_size is None and input_dtype == "float":
        input_size = getattr(input_module, "in_features", None)
    if hidden_size is None:
        hidden_size = start_size if start_size is not None else getattr(feedback_module, "out_features", None)
    if (input_size is None and input_dtype == "float") or hidden_size is None:
        raise ValueError("recurrent: cannot tell the input and state sizes from these modules; "
                         "pass input_size= and hidden_size=")
    for name, f in (("transfer", transfer), ("merge", merge)):
        if f is not None and not callable(f):
            raise TypeError(f"sg.cells.recurrent: {name} must be a module or a function, got {f!r} (Torch7's "
                            f"nn.Recurrent(start, input, feedback, transfer, rho, merge) takes rho fifth; here "
                            f"there is no rho: a Recurrence runs whole sequences, call it on windows to truncate)")
    transfer = transfer if transfer is not None else sg.Sigmoid()
    merge = merge if merge is not None else sg.CAdd()
    if start_size is not None:
        start_bias = sg.Parameter(start_size, name="start")  # Torch7's nn.Add(start)
        start_fn = lambda u: u + start_bias  # noqa: E731
    else:
        start_fn = start

    x = sg.Input(input_size, name="x") if input_dtype == "float" else sg.Input(name="x", dtype="long")
    h = sg.State(hidden_size, name="h")
    started = sg.State(1, name="started")
    u = input_module(x)
    first = transfer(start_fn(u))
    later = transfer(merge([u, feedback_module(h)]))
    h_next = sg.where_mask(started, later, first)
    return sg.Cell(inputs=[x], states={h: h_next, started: started * 0.0 + 1.0}, outputs=[h_next],
                   name="recurrent")


# ---------------------------------------------------------------------------------------
# LSTM family
# ---------------------------------------------------------------------------------------
def lstm(input_size: int, hidden_size: int, *, bias: bool = True, peephole: bool = False, proj_size: int = 0,
         layer_norm: bool = False, dropout: float = 0.0, zoneout: float = 0.0) -> sg.Cell:
    """An LSTM step; gate order i, f, g, o as in torch.nn.LSTM. The defaults give Torch7's
    FastLSTM (= torch.nn.LSTM's cell):

        i, f, g, o = chunk(W_ih x + b_ih + W_hh h + b_hh, 4)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g);   h' = sigmoid(o) * tanh(c')

    peephole:   Torch7 rnn's LSTM: diagonal cell-to-gate weights (sg.Parameter vectors
                "w_ci", "w_cf" read c, "w_co" reads c').
    proj_size:  LSTMP (Torch7's SeqLSTMP, torch's proj_size): h' = W_hr (o * tanh(c')) of
                size proj_size, and the recurrent projection reads that h.
    layer_norm: Ba et al.'s layer-normalised LSTM: LN_ih(W_ih x) + LN_hh(W_hh h) give the gates
                and h' = o * tanh(LN_c(c')); the LayerNorms' shifts are the gate biases, so
                the projections have none (and bias=False is refused).
    dropout:    Gal & Ghahramani's variational dropout on x and on the recurrent h: one mask
                per sequence, the same at every step ("drop_x", "drop_h").
    zoneout:    each unit of h and c keeps its previous value with this probability
                ("zoneout_h", "zoneout_c"); evaluation uses the expectation.
    States are "h" (size proj_size or hidden_size) and "c"; the output is h'.
    """
    _check_flags("lstm", bias=bias, peephole=peephole, layer_norm=layer_norm)
    _check_sizes("lstm", input_size=input_size, hidden_size=hidden_size)
    _check_probabilities("lstm", dropout=dropout, zoneout=zoneout)
    if proj_size < 0 or (proj_size and proj_size >= hidden_size):
        raise ValueError(f"proj_size must be 0 (no projection) or in (0, hidden_size={hidden_size}), "
                         f"got {proj_size}")
    if layer_norm and not bias:
        raise ValueError("lstm(layer_norm=True): the LayerNorms' shifts are the gate biases; "
                         "bias=False is not supported with layer_norm")
    H, out_size = hidden_size, proj_size or hidden_size
    x = sg.Input(input_size, name="x")
    h = sg.State(out_size, name="h")
    c = sg.State(H, name="c")

    ih = sg.Linear(input_size, 4 * H, bias=bias and not layer_norm, name="ih")
    hh = sg.Linear(out_size, 4 * H, bias=bias and not layer_norm, name="hh")
    gx = ih(_gal_dropout(x, dropout, "drop_x"))
    gh = hh(_gal_dropout(h, dropout, "drop_h"))
    if layer_norm:
        gx = sg.LayerNorm(4 * H, name="ln_ih")(gx)
        gh = sg.LayerNorm(4 * H, name="ln_hh")(gh)
    i, f, g, o = sg.chunk(gx + gh, 4)
    if peephole:
        i = i + sg.Parameter(H, name="w_ci") * c
        f = f + sg.Parameter(H, name="w_cf") * c
    c_next = sg.sigmoid(f) * c + sg.sigmoid(i) * sg.tanh(g)
    if peephole:
        o = o + sg.Parameter(H, name="w_co") * c_next
    c_read = sg.LayerNorm(H, name="ln_c")(c_next) if layer_norm else c_next
    h_next = sg.sigmoid(o) * sg.tanh(c_read)
    if proj_size:
        h_next = sg.Linear(H, proj_size, bias=False, name="hr")(h_next)
    h_next = _zoneout(h, h_next, zoneout, "zoneout_h")
    c_next = _zoneout(c, c_next, zoneout, "zoneout_c")
    return sg.Cell(inputs=[x], states={h: h_next, c: c_next}, outputs=[h_next], name="lstm")


# ---------------------------------------------------------------------------------------
# GRU family
# ---------------------------------------------------------------------------------------
def gru(input_size: int, hidden_size: int, *, bias: bool = True, reset_after: bool = True) -> sg.Cell:
    """A GRU step; gate order r, z, n as in torch.nn.GRU.

        r = sigmoid(W_ir x + W_hr h + b_r);   z = sigmoid(W_iz x + W_hz h + b_z)
        reset_after=True  (torch / cuDNN):  n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        reset_after=False (Torch7 rnn's GRU): n = tanh(W_in x + b_in + W_hn (r * h))
        h' = (1 - z) * n + z * h
    With reset_after=False the recurrent weights are split: "hh" (r and z, 2H rows) and
    "hh_n" (no bias), because W_hn must wait for r.
    """
    _check_flags("gru", bias=bias, reset_after=reset_after)
    _check_sizes("gru", input_size=input_size, hidden_size=hidden_size)
    H = hidden_size
    x = sg.Input(input_size, name="x")
    h = sg.State(H, name="h")
    ih = sg.Linear(input_size, 3 * H, bias=bias, name="ih")
    xr, xz, xn = sg.chunk(ih(x), 3)
    if reset_after:
        hr, hz, hn = sg.chunk(sg.Linear(H, 3 * H, bias=bias, name="hh")(h), 3)
        r, z = sg.sigmoid(xr + hr), sg.sigmoid(xz + hz)
        n = sg.tanh(xn + r * hn)
    else:
        hr, hz = sg.chunk(sg.Linear(H, 2 * H, bias=bias, name="hh")(h), 2)
        r, z = sg.sigmoid(xr + hr), sg.sigmoid(xz + hz)
        n = sg.tanh(xn + sg.Linear(H, H, bias=False, name="hh_n")(r * h))
    h_next = (1.0 - z) * n + z * h
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next], name="gru")


def _mufuru_op(op: str, s, v):
    if op == "keep":
        return s
    if op == "replace":
        return v
    if op == "mul":
        return s * v
    if op == "diff":
        return s - v
    if op == "sqrt_diff":  # 0.25 * sqrt(|s - v|), whose derivative is infinite where s == v (tanh
        # saturates to exactly 1 in float32, and s follows it): there 0 (a subgradient), so no nan
        # reaches the weights; elsewhere the value and derivative are sqrt's exactly
        d = sg.abs(s - v)
        apart = sg.sign(d)  # 1 where s != v, else 0
        return 0.25 * apart * sg.sqrt(d + (1.0 - apart))
    if op == "max":
        return sg.maximum(s, v)
    if op == "min":
        return sg.minimum(s, v)
    raise AssertionError(op)  # "forget" contributes 0 and is never built


def mufuru(input_size: int, hidden_size: int, ops: Sequence[str] = MUFURU_OPS, *,
           feature_activation: str = "tanh") -> sg.Cell:
    """The Multi-Function Recurrent Unit (Weissenborn & Rocktäschel; Torch7 rnn's MuFuRu).

        r = sigmoid(W_xr x + W_sr s + b_r)
        v = tanh(W_xv x + W_v (r * s) + b_v)    (the paper's and rnn's documented equation;
                                                 Torch7's Mufuru.lua: feature_activation="sigmoid")
        p_j = softmax_j(W_xj x + W_sj s + b_j)     (per unit, over the J ops)
        s' = sum_j p_j * op_j(s, v)
    with ops from keep (s), replace (v), mul (s*v), diff (s-v), forget (0),
    sqrt_diff (0.25*sqrt(|s-v|)), max, min. The softmax is spelled out elementwise (max,
    exp, division) so the compiler can fuse it. Layout: "ih" rows are [r, v, p_1..p_J],
    "hh" rows [r, p_1..p_J], and "hv" (no bias) reads r * s. Ops that never read v (keep and
    forget only) need no r or v: then "ih" and "hh" rows are [p_1..p_J], and there is no "hv".
    """
    _check_sizes("mufuru", input_size=input_size, hidden_size=hidden_size)
    if feature_activation not in ("tanh", "sigmoid"):
        raise ValueError(f"mufuru: feature_activation must be 'tanh' or 'sigmoid', got {feature_activation!r}")
    ops = tuple(ops)
    unknown = [o for o in ops if o not in MUFURU_OPS]
    if unknown or not ops or len(set(ops)) != len(ops):
        raise ValueError(f"mufuru ops must be distinct names from {list(MUFURU_OPS)}, got {list(ops)}")
    if all(o == "forget" for o in ops):
        raise ValueError("mufuru needs at least one op other than 'forget' (the state would always be 0)")
    if ops == ("keep",):
        raise ValueError("mufuru with 'keep' alone never changes its state; add another op (e.g. 'forget')")
    H, J = hidden_size, len(ops)
    x = sg.Input(input_size, name="x")
    s = sg.State(H, name="s")
    # r and v, when an op reads v; without them J >= 2 (keep or forget alone is refused above)
    gates = 2 if any(o not in ("keep", "forget") for o in ops) else 0
    xp = list(sg.chunk(sg.Linear(input_size, (gates + J) * H, name="ih")(x), gates + J))
    sp = list(sg.chunk(sg.Linear(H, (gates // 2 + J) * H, name="hh")(s), gates // 2 + J))
    v = None
    if gates:
        (xr, xv, *xp), (sr, *sp) = xp, sp
        r = sg.sigmoid(xr + sr)
        v = getattr(sg, feature_activation)(xv + sg.Linear(H, H, bias=False, name="hv")(r * s))

    logits = [a + b for a, b in zip(xp, sp)]
    top = logits[0]
    for q in logits[1:]:
        top = sg.maximum(top, q)
    top = sg.stop_gradient(top)  # the softmax is shift-invariant: the shift's gradient is zero
    e = [sg.exp(q - top) for q in logits]
    total = e[0]
    for q in e[1:]:
        total = total + q

    s_next = None
    for op, weight in zip(ops, e):
        if op == "forget":
            continue
        term = weight * _mufuru_op(op, s, v)
        s_next = term if s_next is None else s_next + term
    s_next = s_next / total
    return sg.Cell(inputs=[x], states={s: s_next}, outputs=[s_next], name="mufuru")


def indrnn(input_size: int, hidden_size: int, *, nonlinearity: str = "relu") -> sg.Cell:
    """The independently recurrent network (Li et al. 2018): h' = act(W x + b + u * h), with a
    recurrent weight vector "u" (one weight per unit, initialised in [0, 1))."""
    _check_sizes("indrnn", input_size=input_size, hidden_size=hidden_size)
    act = _activation(nonlinearity)
    x = sg.Input(input_size, name="x")
    h = sg.State(hidden_size, name="h")
    u = sg.Parameter(hidden_size, name="u", init=sg.dsl._uniform(1.0, low=0.0))
    h_next = act(sg.Linear(input_size, hidden_size, name="ih")(x) + u * h)
    return sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next], name="indrnn")


def qrnn(input_size: int, hidden_size: int, *, bias: bool = True, window: int = 1) -> sg.Cell:
    """The quasi-recurrent network (Bradbury et al. 2017) with fo-pooling:

        z, f, o = tanh(W_z x + b_z), sigmoid(W_f x + b_f), sigmoid(W_o x + b_o)
        c' = f * c + (1 - f) * z;   h' = o * c'

    One Linear "w" holds the three gates (3 * hidden_size outputs, order z, f, o). With a
    window of k > 1 (the paper's convolution width; 2 in its language models) the gates also
    read the inputs of the k - 1 steps before: W x becomes W x + W_prev1 x_prev1 + ..., with
    Linears "w_prev1", "w_prev2", ... (no bias) and states "x_prev1" (next value x),
    "x_prev2" (next value x_prev1), ...: zeros before the first step, or the last inputs of
    the previous call with remember=True. No gate reads c, so every product runs before the
    time loop for all steps at once (the compiler reads each x_prev as the input delayed by
    its steps), and a step is a few elementwise ops. State "c"; the output is h'."""
    _check_flags("qrnn", bias=bias)
    _check_sizes("qrnn", input_size=input_size, hidden_size=hidden_size)
    if not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sg.cells.qrnn (at {user_site()}): window must be an int >= 1 (the inputs of how many "
                         f"steps each gate reads), got {window!r}")
    x = sg.Input(input_size, name="x")
    c = sg.State(hidden_size, name="c")
    gates = sg.Linear(input_size, 3 * hidden_size, bias=bias, name="w")(x)
    states, newer = {}, x
    for k in range(1, window):
        x_prev = sg.State(input_size, name=f"x_prev{k}")
        gates = gates + sg.Linear(input_size, 3 * hidden_size, bias=False, name=f"w_prev{k}")(x_prev)
        states[x_prev], newer = newer, x_prev
    z, f, o = sg.chunk(gates, 3)
    z, f, o = sg.tanh(z), sg.sigmoid(f), sg.sigmoid(o)
    c_next = f * c + (1 - f) * z
    return sg.Cell(inputs=[x], states={c: c_next, **states}, outputs=[o * c_next], name="qrnn")


def mlstm(input_size: int, hidden_size: int) -> sg.Cell:
    """xLSTM's matrix-memory LSTM (Beck et al. 2024), one head: an (H, H) memory "C" written
    with the outer product v k^T, a normaliser "n" and a stabiliser "m" (one value), and gates
    that read x alone (no recurrent weights, as in the paper):

        log_f = logsigmoid(f x + f_bias);  m' = max(log_f + m, i x + i_bias)
        i, f = exp(i x + i_bias - m'), exp(log_f + m - m')     (the stabilised gates)
        C' = f C + i v k^T;  n' = f n + i k;  k = (k x + k_bias) / sqrt(H)
        h = sigmoid(o x + o_bias) * (C' q) / max(|n' . q|, exp(-m'))

    The Linears are "q", "k", "v", "o" (H outputs each) and "i", "f" (one each, "f" without a
    bias); "f_bias" starts at 3, so a new memory forgets slowly, as the paper's code starts it.
    The memory is carried as a flat row of H*H values by the compiled loops."""
    _check_sizes("mlstm", input_size=input_size, hidden_size=hidden_size)
    H = hidden_size
    x = sg.Input(input_size, name="x")
    C, n, m = sg.State((H, H), name="C"), sg.State(H, name="n"), sg.State(1, name="m")
    q, k, v, o = (sg.Linear(input_size, H, name=key)(x) for key in "qkvo")
    k = k * (1.0 / H ** 0.5)
    i_pre = sg.Linear(input_size, 1, name="i")(x)
    f_pre = sg.Linear(input_size, 1, bias=False, name="f")(x) + sg.Parameter(1, name="f_bias", init=3.0)
    log_f = sg.minimum(f_pre, 0.0) - sg.log(1.0 + sg.exp(-sg.abs(f_pre)))  # logsigmoid, without overflow
    m_next = sg.maximum(log_f + m, i_pre)
    i, f = sg.exp(i_pre - m_next), sg.exp(log_f + m - m_next)
    C_next = sg.unsqueeze(f, -1) * C + sg.unsqueeze(i, -1) * sg.matmul(sg.unsqueeze(v, -1), sg.unsqueeze(k, 0))
    n_next = f * n + i * k
    read = sg.reshape(sg.matmul(C_next, sg.unsqueeze(q, -1)), (H,))
    scale = sg.maximum(sg.abs(sg.sum(n_next * q, dim=-1, keepdim=True)), sg.exp(-m_next))
    h = sg.sigmoid(o) * read / scale
    return sg.Cell(inputs=[x], states={C: C_next, n: n_next, m: m_next}, outputs=[h], name="mlstm")


# ---------------------------------------------------------------------------------------
# norm stabilizer
# ---------------------------------------------------------------------------------------
NORM_STABILIZER_REDUCTIONS = ("mean", "sum", "sum_over_steps")


def norm_stabilizer_loss(seq: torch.Tensor, beta: float = 1.0, *, lengths=None, mask=None,
                         batch_first: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Krueger & Memisevic's norm-stabilising penalty of a state sequence (T, B, *size):
    beta * mean over sequences of [mean over t of (||h_t|| - ||h_{t-1}||)^2], where t runs
    over consecutive real steps of each sequence (n real steps give n - 1 differences, the
    mean divides by n - 1; padded steps, given by lengths or mask, are skipped; a sequence
    with fewer than two real steps adds 0). reduction="sum" sums over steps and sequences
    instead; "sum_over_steps" takes each step's mean over the sequences that have a difference
    there and sums those over steps: the gradient Torch7's nn.NormStabilizer(beta) trained
    with (its printed loss was that divided by T; its gradient was not)."""
    if reduction not in NORM_STABILIZER_REDUCTIONS:
        raise ValueError(f"norm_stabilizer_loss: reduction must be one of {NORM_STABILIZER_REDUCTIONS}, "
                         f"got {reduction!r}")
    if not isinstance(seq, torch.Tensor) or seq.dim() < 2:
        raise InputError(f"norm_stabilizer_loss: seq must be a tensor ({'B, T' if batch_first else 'T, B'}, ...), "
                         f"got {getattr(seq, 'shape', type(seq).__name__)}")
    if batch_first:
        seq = seq.transpose(0, 1)
    T, B = seq.shape[0], seq.shape[1]
    mask = valid_steps(T, B, lengths, mask, batch_first, seq.device, "norm_stabilizer_loss")
    if mask is None:
        mask = torch.ones(T, B, dtype=torch.bool, device=seq.device)
    # norms of the real steps, packed to the front of each column so consecutive real steps are adjacent
    norms = (seq.flatten(2) if seq.dim() > 2 else seq.unsqueeze(-1)).norm(dim=-1)
    order = torch.where(mask, torch.arange(T, device=seq.device).unsqueeze(1), T).argsort(dim=0)
    norms = norms.gather(0, order)
    n = mask.sum(0)
    pair = torch.arange(1, max(T, 1), device=seq.device).unsqueeze(1) < n.unsqueeze(0)  # (T-1, B)
    sq = (norms[1:] - norms[:-1]).pow(2) * pair
    if reduction == "sum":
        return beta * sq.sum()
    if reduction == "sum_over_steps":
        return beta * (sq.sum(1) / pair.sum(1).clamp(min=1)).sum()
    per_seq = sq.sum(0) / (n - 1).clamp(min=1)
    return beta * per_seq.mean() if B else seq.new_zeros(())


class NormStabilizer(nn.Module):
    """Wrap any recurrence (forward(x, state, lengths=, mask=) -> (out, final_state)) so that
    each forward also computes the norm-stabilising penalty of one of its output sequences;
    read it as `.loss` after the call and add it to the training loss:

        rnn = sg.NormStabilizer(sg.Recurrence(sg.cells.lstm(8, 16)), beta=1.0)
        out, state = rnn(x, lengths=lengths)
        (task_loss + rnn.loss).backward()

    `output` picks the output when the cell has several. To stabilise a state that is not an
    output (an LSTM's c), list it among the cell's outputs. The penalty is
    `norm_stabilizer_loss` (Torch7's nn.NormStabilizer, as a wrapper rather than a step module).
    """

    __prepare_scriptable__ = refuse_torchscript  # torch.jit.script: refused by name

    def __init__(self, module: nn.Module, beta: float = 1.0, output: int = 0, batch_first: bool | None = None,
                 reduction: str = "mean"):
        super().__init__()
        if reduction not in NORM_STABILIZER_REDUCTIONS:
            raise ValueError(f"sg.NormStabilizer: reduction must be one of {NORM_STABILIZER_REDUCTIONS}, "
                             f"got {reduction!r}")
        if isinstance(beta, torch.Tensor) and beta.numel() == 1 and beta.is_floating_point():
            beta = beta.item()
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta >= 0:
            raise ValueError(f"sg.NormStabilizer: beta, the penalty's weight, must be a number >= 0, got {beta!r}")
        _check_takes_lengths(module, "sg.NormStabilizer: module")
        self.module = module
        self.beta = float(beta)
        self.reduction = reduction
        self.output = output
        outputs = getattr(getattr(module, "cell", None), "outputs", None)
        if isinstance(output, bool) or not isinstance(output, numbers.Integral) or output < 0 or (
                outputs is not None and output >= len(outputs)):
            raise ValueError("sg.NormStabilizer: output picks one of the module's outputs"
                             + (f" (it has {len(outputs)})" if outputs is not None else "") + f", got {output!r}")
        self.batch_first = _layout_of("sg.NormStabilizer", [module], batch_first)
        self._loss: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor:
        """The penalty of the last forward call."""
        if self._loss is None:
            raise RuntimeError("sg.NormStabilizer: .loss is the penalty of the last forward call, and the module "
                               "has not been called yet: call it on a sequence first, then read .loss")
        return self._loss

    def forward(self, x, state: Mapping | None = None, *, lengths=None, mask=None, **kwargs):
        out, final = self.module(x, state, lengths=lengths, mask=mask, **kwargs)
        if isinstance(out, (tuple, list)):
            seq = out[self.output]
        elif self.output == 0:
            seq = out
        else:
            raise InputError(f"sg.NormStabilizer: output={self.output} picks one of several outputs, but the module "
                             f"returned one")
        self._loss = norm_stabilizer_loss(seq, self.beta, lengths=lengths, mask=mask, batch_first=self.batch_first,
                                          reduction=self.reduction)
        return out, final

    def extra_repr(self) -> str:
        return f"beta={self.beta}, output={self.output}, reduction={self.reduction!r}"


__all__ = ["rnn", "recurrent", "lstm", "gru", "mufuru", "indrnn", "qrnn", "mlstm", "NormStabilizer",
           "norm_stabilizer_loss", "MUFURU_OPS"]
