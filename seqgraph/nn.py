"""Drop-in replacements for torch.nn.RNN, LSTM and GRU (and their one-step RNNCell, LSTMCell
and GRUCell) built on seqgraph cells.

Same constructor arguments, same forward(input, hx) and return values, PackedSequence in and
out, and exactly torch's parameter names (weight_ih_l0, bias_hh_l1_reverse, weight_hr_l0, ...),
so a torch state_dict loads with strict=True in both directions. The module owns those
parameters itself; per layer and direction it builds an sg.Recurrence over a cell from
seqgraph.cells whose parameter tree holds those same Parameter objects, compiled for
`backend` ("auto", the default: C kernels on the CPU, Triton on CUDA; "reference" runs the
step-by-step interpreter, which also gives second-order gradients). Beyond torch, forward also
takes lengths= (or mask=) for padded batches. This module maps torch's interface
onto recurrences; it must not implement cell math (cells.py) or compilation (the backends).
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import cells
from .errors import InputError, refuse_torchscript
from .layers import reverse_sequences
from .recurrence import (ParamTree, Recurrence, autocast_casts, check_has_values, check_lengths_shape, odd_one_out,
                         register_nested)

BACKENDS = ("reference", "torch", "triton", "cpu", "auto")

# cell parameter key -> torch's parameter name stem
_TORCH_NAMES = {"ih.weight": "weight_ih", "hh.weight": "weight_hh", "ih.bias": "bias_ih", "hh.bias": "bias_hh",
                "hr.weight": "weight_hr"}


def _bind(rec: Recurrence, owner: nn.Module, names: dict[str, str]) -> Recurrence:
    """Make `rec` read the owner's torch-named Parameters: its `params` tree holds the very same
    Parameter objects (so a compiled twin, which shares `params`, reads them too). A weight the
    owner computes per access (weight_norm) or has deleted (weight drop) is left out: the
    owner's forward passes every weight in with `rec.reading`."""
    if set(names) != set(rec.cell.params):
        raise AssertionError(f"cell parameters {sorted(rec.cell.params)} do not match {sorted(names)}")
    rec.params = ParamTree()
    for key, name in names.items():
        p = getattr(owner, name, None)
        if isinstance(p, nn.Parameter):
            register_nested(rec.params, key, p)
    return rec


def _bound(owner: nn.Module, names: dict[str, str]) -> tuple:
    """(torch name, Parameter) of each weight a step's tree was just given by `_bind`."""
    return tuple((name, owner._parameters.get(name)) for name in names.values())


def _reads_own(owner: nn.Module, bound: tuple | None) -> bool:
    """Whether the owner still has exactly the Parameters its step's tree holds: then a call
    reads them there, without passing them in (`Recurrence.reading`, which a weight replaced
    since, or computed per access by a parametrization, needs)."""
    own = owner._parameters
    return bound is not None and all(p is not None and own.get(name) is p for name, p in bound)


def _rebind_after_load(module: nn.Module, incompatible_keys) -> None:
    module._rebind()


def _check_common(backend: str, sizes: dict[str, object]) -> None:
    """The constructor arguments every sg.nn module takes: a backend and positive sizes."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    for name, size in sizes.items():
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")


def _check_features(who: str, input: torch.Tensor, shapes: str) -> None:
    """Token ids (an embedding forgotten in front) are named as such, before a size check reads
    their shape as a batch of features."""
    if not input.is_floating_point():
        raise InputError(f"{who}: input has dtype {input.dtype} (shape {tuple(input.shape)}); it takes "
                         f"floating-point features, {shapes}: token ids go through an nn.Embedding first")


class _Owner(nn.Module):
    """What sg.nn's layers and cells share: they own their Parameters under torch.nn's names,
    and per layer and direction an sg.Recurrence (`_recs[layer][direction]`, not a submodule)
    whose parameter tree holds those same Parameters (`_torch_names[layer][direction]`: cell
    key -> torch name)."""

    __prepare_scriptable__ = refuse_torchscript  # torch.jit.script: refused by name

    def _own(self, recs: list[list[Recurrence]], torch_names: list[list[dict[str, str]]]) -> None:
        self._recs, self._torch_names = recs, torch_names
        self._note_bound()
        self.register_load_state_dict_post_hook(_rebind_after_load)

    def use_backend(self, backend: str, unroll: int = 1) -> None:
        """Run every layer and direction with a compiled backend (parameters stay shared)."""
        from .compiled import compile as sg_compile
        self._recs = [[sg_compile(rec, backend=backend, unroll=unroll) for rec in row] for row in self._recs]
        self.backend = backend

    def _rebind(self) -> None:
        """Point every recurrence at this module's current Parameter objects (after something
        replaced them: load_state_dict(assign=True), or conversions that swap parameters)."""
        for row, name_row in zip(self._recs, self._torch_names):
            for rec, names in zip(row, name_row):
                _bind(rec, self, names)
                if getattr(rec, "_source", None) is not None:  # a compiled twin: rebind its origin too
                    _bind(rec._source, self, names)
        self._note_bound()

    def _note_bound(self) -> None:
        self.__dict__["_bound"] = [[_bound(self, names) for names in row] for row in self._torch_names]

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._rebind()
        return out

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter uniform in ±1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)

    def _run(self, layer: int, direction: int, shown: str, *args, **kwargs):
        """Call the recurrence of one layer and direction, its weights read as this module's
        attributes now: from its tree while they are the very Parameters it holds, else passed
        in (a weight replaced since, or computed per access: weight_norm, weight drop)."""
        rec, names = self._recs[layer][direction], self._torch_names[layer][direction]
        if rec.training != self.training:
            rec.train(self.training)
        object.__setattr__(rec, "_shown_as", shown)  # how its errors name it, and its weights
        object.__setattr__(rec, "_param_shown", names)
        bound = self.__dict__.get("_bound")
        if _reads_own(self, bound[layer][direction] if bound else None):
            return rec(*args, **kwargs)
        with rec.reading({key: getattr(self, name) for key, name in names.items()}):
            return rec(*args, **kwargs)


class _RNNBase(_Owner):
    """Shared machinery of sg.nn.RNN / LSTM / GRU (torch.nn.RNNBase's interface)."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, nonlinearity: str = "tanh", device=None, dtype=None,
                 backend: str = "auto"):
        super().__init__()
        _check_common(backend, {"input_size": input_size, "hidden_size": hidden_size, "num_layers": num_layers})
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             "element being zeroed")
        input_size, hidden_size, num_layers = int(input_size), int(hidden_size), int(num_layers)
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if mode != "LSTM" and proj_size:
            raise ValueError(f"proj_size is only supported by LSTM, not {mode}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}")
        if mode == "RNN" and nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.nonlinearity = bidirectional, proj_size, nonlinearity
        self.backend = backend
        gates = {"RNN": 1, "LSTM": 4, "GRU": 3}[mode]
        out_size = proj_size or hidden_size
        D = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        recs, torch_names = [], []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else out_size * D
            row, name_row = [], []
            for direction in range(D):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                shapes = {"weight_ih": (gates * hidden_size, layer_in), "weight_hh": (gates * hidden_size, out_size)}
                if bias:
                    shapes.update(bias_ih=(gates * hidden_size,), bias_hh=(gates * hidden_size,))
                if proj_size:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                for stem, shape in shapes.items():
                    self.register_parameter(stem + sfx, nn.Parameter(torch.empty(shape, **factory)))
                cell = self._make_cell(layer_in)
                names = {k: _TORCH_NAMES[k] + sfx for k in cell.params}
                with torch.device("meta"):  # its own parameters are replaced at once: no memory, no random draws
                    rec = Recurrence(cell)
                row.append(_bind(rec, self, names))
                name_row.append(names)
            recs.append(row)
            torch_names.append(name_row)
        # A plain list, not submodules: the recurrences share this module's Parameters, and as
        # children they would list them again in state_dict under other names. An entry
        # _recs[layer][direction] may be swapped for a compiled twin (same interface and params).
        self._own(recs, torch_names)
        self.reset_parameters()
        if backend != "reference":
            self.use_backend(backend)

    def _make_cell(self, layer_in: int):
        if self.mode == "LSTM":
            return cells.lstm(layer_in, self.hidden_size, bias=self.bias, proj_size=self.proj_size)
        if self.mode == "GRU":
            return cells.gru(layer_in, self.hidden_size, bias=self.bias)
        return cells.rnn(layer_in, self.hidden_size, nonlinearity=self.nonlinearity, bias=self.bias)

    def flatten_parameters(self) -> None:
        """Accepted for drop-in compatibility with torch.nn; there is no cuDNN weight buffer to
        compact here, so there is nothing to do."""

    def recurrence(self, layer: int = 0, direction: int = 0) -> Recurrence:
        """The sg.Recurrence (or its compiled twin) that runs one layer and direction: its
        cell, picture (sg.to_dot(lstm.recurrence(1))), and, unless backend="reference",
        its plan() and source(). direction: 0 forward, 1 reverse (bidirectional layers)."""
        for name, v in (("layer", layer), ("direction", direction)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"sg.nn.{self.mode}.recurrence: {name} must be an int"
                                f"{' (0 forward, 1 reverse)' if name == 'direction' else ''}, got {v!r}")
        if not (0 <= layer < self.num_layers and 0 <= direction < self._directions):
            raise IndexError(f"sg.nn.{self.mode} has {self.num_layers} layer(s) and {self._directions} direction(s); "
                             f"got layer={layer}, direction={direction}")
        return self._recs[layer][direction]

    @property
    def all_weights(self) -> list[list[torch.Tensor]]:
        """torch.nn's all_weights: per layer and direction, [w_ih, w_hh, b_ih, b_hh] (biases if
        any, then w_hr with a projection)."""
        order = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        return [[getattr(self, name) for stem in order for name in names.values() if name.startswith(stem + "_l")]
                for name_row in self._torch_names for names in name_row]

    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    # -- forward --------------------------------------------------------------------------
    def _weight_like(self) -> torch.Tensor:
        """The first layer's input weight, a Parameter or (functional code's) a plain tensor."""
        return getattr(self, "weight_ih_l0")

    def forward(self, input, hx=None, *, lengths=None, mask=None):
        """torch.nn's forward: input (T, B, I) ((B, T, I) with batch_first), (T, I) unbatched,
        or a PackedSequence; hx as torch.nn (h_0, or (h_0, c_0) for LSTM), zeros if None.
        Returns (output, h_n) or (output, (h_n, c_n)); output is a PackedSequence when the
        input is one. lengths (B,) or mask (T, B) mark padded steps of a padded input: padded
        outputs are zero, the reverse direction starts at each sequence's own last step, and
        h_n holds each sequence's state at its last real step."""
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            if lengths is not None or mask is not None:
                raise InputError(f"sg.nn.{self.mode}: a PackedSequence carries its own lengths; "
                                 f"do not pass lengths/mask")
            # padded in the packed (longest first) order, which lets each step skip the rows that
            # have ended (docs/masking.md); hx and h_n are in the caller's order, as in torch
            _check_features(f"sg.nn.{self.mode}", input.data, f"a PackedSequence of ({self.input_size},) rows")
            x, lengths = pad_packed_sequence(PackedSequence(input.data, input.batch_sizes), batch_first=False)
        else:
            if not isinstance(input, torch.Tensor):
                raise InputError(f"sg.nn.{self.mode}: expected input to be a tensor (or a PackedSequence), got "
                                 f"{type(input).__name__}")
            _check_features(f"sg.nn.{self.mode}", input, f"(T, B, {self.input_size}) or unbatched (T, {self.input_size})")
            if input.dim() not in (2, 3):
                raise InputError(f"sg.nn.{self.mode}: expected input to be 2-D (unbatched) or 3-D, got "
                                 f"{getattr(input, 'shape', type(input).__name__)}")
            unbatched = input.dim() == 2
            if unbatched:  # one sequence: lengths may be a number or (1,), the mask (T,) or (T, 1)
                x = input.unsqueeze(1)
                if lengths is not None and torch.as_tensor(lengths).dim() == 0:
                    lengths = torch.as_tensor(lengths).reshape(1)
                if isinstance(mask, torch.Tensor) and mask.dim() == 1:
                    mask = mask.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
            if mask is not None and self.batch_first and not unbatched:
                want = (input.shape[0], input.shape[1])  # (B, T), as the input is laid out
                if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != want:
                    raise InputError(f"sg.nn.{self.mode}: with batch_first=True, mask must be a bool tensor of shape "
                                     f"{want} (B, T), got {tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
                mask = mask.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise InputError(f"sg.nn.{self.mode}: input.size(-1) must be equal to input_size. "
                             f"Expected {self.input_size}, got {x.shape[-1]}")
        p = self._weight_like()
        if x.dtype != p.dtype and not autocast_casts(x.dtype, p.dtype, x.device):
            named = list(self.named_parameters())
            if len({(v.dtype, v.device) for _, v in named}) > 1:  # (then the parameters are the mistake)
                odd, common = odd_one_out([v for _, v in named])
                raise InputError(f"sg.nn.{self.mode}: parameter {named[odd][0]!r} is {named[odd][1].dtype} on "
                                 f"{named[odd][1].device} but {named[common][0]!r} and the others are "
                                 f"{named[common][1].dtype} on {named[common][1].device}; give every parameter "
                                 f"one dtype and device (module.to(...))")
            raise InputError(f"sg.nn.{self.mode}: input has dtype {x.dtype} but the parameters are {p.dtype}")
        B = x.shape[1]
        if lengths is not None:
            check_has_values(lengths, "lengths", x.device, f"sg.nn.{self.mode}")
            lengths = torch.as_tensor(lengths).to(x.device)
            if not packed:  # (checked here: the layers read x time-major, whatever the caller's layout)
                check_lengths_shape(lengths, x.shape[0], B, self.batch_first and not unbatched, f"sg.nn.{self.mode}")
        h0, c0 = self._initial(hx, B, unbatched, x)
        if packed and input.sorted_indices is not None:
            h0, c0 = [None if v is None else v.index_select(1, input.sorted_indices) for v in (h0, c0)]

        layer_in = x
        h_n, c_n = [], []
        for layer, row in enumerate(self._recs):
            outs = []
            for direction in range(len(row)):
                k = layer * self._directions + direction
                state = None
                if h0 is not None:
                    state = {"h": h0[k]} if c0 is None else {"h": h0[k], "c": c0[k]}
                seq = layer_in if direction == 0 else reverse_sequences(layer_in, lengths, mask=mask)
                shown = f"sg.nn.{self.mode}" + (f" (layer {layer}, reverse)" if direction else
                                                 f" (layer {layer})" if self.num_layers > 1 else "")
                out, final = self._run(layer, direction, shown, seq, state, lengths=lengths, mask=mask)
                outs.append(out if direction == 0 else reverse_sequences(out, lengths, mask=mask))
                h_n.append(final["h"])
                if "c" in final:
                    c_n.append(final["c"])
            layer_in = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)

        output = layer_in
        h_n = torch.stack(h_n)
        c_n = torch.stack(c_n) if c_n else None
        if packed:
            output = PackedSequence(pack_padded_sequence(output, lengths.cpu(), enforce_sorted=True).data,
                                    input.batch_sizes, input.sorted_indices, input.unsorted_indices)
            if input.unsorted_indices is not None:
                h_n = h_n.index_select(1, input.unsorted_indices)
                c_n = None if c_n is None else c_n.index_select(1, input.unsorted_indices)
        elif unbatched:
            output, h_n = output.squeeze(1), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if self.mode == "LSTM" else h_n)

    def _initial(self, hx, B, unbatched, x):
        """Validate hx (torch's shapes) and return per-(layer, direction) stacks or None."""
        if hx is None:
            return None, None
        L = self.num_layers * self._directions
        out_size = self.proj_size or self.hidden_size
        if self.mode == "LSTM":
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise InputError("sg.nn.LSTM: hx must be a tuple (h_0, c_0)")
            pairs = [("h_0", hx[0], out_size), ("c_0", hx[1], self.hidden_size)]
        else:
            pairs = [("hx", hx, self.hidden_size)]
        got = []
        for name, v, size in pairs:
            want = (L, size) if unbatched else (L, B, size)
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != want:
                got_v = tuple(v.shape) if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
                raise InputError(f"sg.nn.{self.mode}: expected {name} of shape {want}, got {got_v}")
            if v.dtype != x.dtype and not autocast_casts(v.dtype, self._weight_like().dtype, x.device):
                raise InputError(f"sg.nn.{self.mode}: {name} has dtype {v.dtype} but the input is {x.dtype}")
            got.append(v.unsqueeze(1) if unbatched else v)
        return got[0], (got[1] if len(got) > 1 else None)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.mode == "RNN" and self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        for flag, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, flag) != default:
                s += f", {flag}={getattr(self, flag)}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


class RNN(_RNNBase):
    """torch.nn.RNN on seqgraph: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__("RNN", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         nonlinearity=nonlinearity, device=device, dtype=dtype, backend=backend)


class LSTM(_RNNBase):
    """torch.nn.LSTM on seqgraph (gate order i, f, g, o; proj_size gives LSTMP)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size=proj_size, device=device, dtype=dtype, backend=backend)


class GRU(_RNNBase):
    """torch.nn.GRU on seqgraph (gate order r, z, n; the reset gate applied after W_hn)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, backend=backend)


class _CellBase(_Owner):
    """Shared machinery of sg.nn.RNNCell / LSTMCell / GRUCell (torch.nn.RNNCellBase's
    interface): one step, forward(input, hx) on a Recurrence of one step."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        _check_common(backend, {"input_size": input_size, "hidden_size": hidden_size})
        if mode == "RNN" and nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.mode, self.input_size, self.hidden_size = mode, int(input_size), int(hidden_size)
        self.bias, self.nonlinearity, self.backend = bias, nonlinearity, backend
        gates = {"RNN": 1, "LSTM": 4, "GRU": 3}[mode]
        factory = {"device": device, "dtype": dtype}
        shapes = {"weight_ih": (gates * self.hidden_size, self.input_size),
                  "weight_hh": (gates * self.hidden_size, self.hidden_size)}
        if bias:
            shapes.update(bias_ih=(gates * self.hidden_size,), bias_hh=(gates * self.hidden_size,))
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        if mode == "LSTM":
            cell = cells.lstm(self.input_size, self.hidden_size, bias=bias)
        elif mode == "GRU":
            cell = cells.gru(self.input_size, self.hidden_size, bias=bias)
        else:
            cell = cells.rnn(self.input_size, self.hidden_size, nonlinearity=nonlinearity, bias=bias)
        names = {k: _TORCH_NAMES[k] for k in cell.params}
        with torch.device("meta"):  # its own parameters are replaced at once
            rec = Recurrence(cell)
        self._own([[_bind(rec, self, names)]], [[names]])
        self.reset_parameters()
        if backend != "reference":
            self.use_backend(backend)

    def recurrence(self) -> Recurrence:
        """The sg.Recurrence (or its compiled twin) that runs the step: its cell, picture,
        and, unless backend="reference", its plan() and source()."""
        return self._recs[0][0]

    def forward(self, input: torch.Tensor, hx=None):
        """torch.nn's cell forward: input (B, input_size) or (input_size,) unbatched; hx as
        torch.nn (h, or (h, c) for LSTMCell), zeros if None. Returns h' (or (h', c'))."""
        who = f"sg.nn.{self.mode}Cell"
        if not isinstance(input, torch.Tensor):
            raise InputError(f"{who}: expected input to be a tensor, got {type(input).__name__}")
        _check_features(who, input, f"(B, {self.input_size}) or unbatched ({self.input_size},)")
        if input.dim() not in (1, 2):
            raise InputError(f"{who}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != self.input_size:
            raise InputError(f"{who}: input has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        state = None
        if hx is not None:
            if self.mode == "LSTM":
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise InputError(f"{who}: hx must be a tuple (h, c), got {type(hx).__name__}")
                pairs = (("h", hx[0]), ("c", hx[1]))
            else:
                pairs = (("h", hx),)
            state = {}
            want = (self.hidden_size,) if unbatched else (x.shape[0], self.hidden_size)
            for name, v in pairs:
                what = "hx" if self.mode != "LSTM" else f"hx[{0 if name == 'h' else 1}]"
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != want:
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
                    raise InputError(f"{who}: expected {what} of shape {want} (as the "
                                     f"{'unbatched ' if unbatched else ''}input), got {got}")
                if v.dtype != x.dtype and not autocast_casts(v.dtype, self.weight_ih.dtype, x.device):
                    raise InputError(f"{who}: {what} has dtype {v.dtype} but the input is {x.dtype}")
                state[name] = v.unsqueeze(0) if unbatched else v
        _, final = self._run(0, 0, who, x.unsqueeze(0), state)
        h = final["h"].squeeze(0) if unbatched else final["h"]
        if self.mode != "LSTM":
            return h
        c = final["c"].squeeze(0) if unbatched else final["c"]
        return h, c

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.mode == "RNN" and self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


class RNNCell(_CellBase):
    """torch.nn.RNNCell on seqgraph: h' = act(W_ih x + b_ih + W_hh h + b_hh), one step."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__("RNN", input_size, hidden_size, bias, nonlinearity, device=device, dtype=dtype,
                         backend=backend)


class LSTMCell(_CellBase):
    """torch.nn.LSTMCell on seqgraph (gate order i, f, g, o), one step: returns (h', c')."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__("LSTM", input_size, hidden_size, bias, device=device, dtype=dtype, backend=backend)


class GRUCell(_CellBase):
    """torch.nn.GRUCell on seqgraph (gate order r, z, n), one step."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__("GRU", input_size, hidden_size, bias, device=device, dtype=dtype, backend=backend)


__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]
