"""Layers built from recurrences: stacks, bidirectional wrappers, repeaters, sequence losses.

Each layer takes any "recurrence-like" module: one whose forward(x, state, lengths=, mask=)
returns (outputs, final_state) — an sg.Recurrence, a compiled one, an sg.nn module or your own.
Layers use inner modules only through that call, so a compiled backend drops in unchanged.
All of them accept lengths or a mask for padded batches and initial states, and none of them
detaches anything, so an encoder's final state can start a decoder with gradients flowing.
Padded steps are never read as data: reversal keeps padding in place and reverses each
sequence within its own real steps. This module must not build cells or know about backends.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import numbers
import warnings
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .cell import Cell
from .dsl import probability
from .errors import InputError, refuse_torchscript, user_stacklevel
from .recurrence import Recurrence, refuse_packed, valid_steps


# ---------------------------------------------------------------------------------------
# index helpers for padded batches
# ---------------------------------------------------------------------------------------
def _ranks(valid: torch.Tensor):
    """For a (T, B) mask: each step's rank among its sequence's real steps, the number of real
    steps per sequence, and the position of the r-th real step (rows r >= n are unused)."""
    T = valid.shape[0]
    t = torch.arange(T, device=valid.device).unsqueeze(1).expand_as(valid)
    rank = valid.long().cumsum(0) - 1
    n = valid.long().sum(0)
    position = torch.where(valid, t, t + T).argsort(dim=0)
    return rank, n, position, t


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index[t, b], b, ...] for a time-major x."""
    shaped = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand_as(x)
    return x.gather(0, shaped)


def reverse_sequences(x: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None, batch_first: bool = False, *,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reverse each sequence of a padded batch within its own real steps (Torch7's
    SeqReverseSequence, made length-aware): padded steps stay where they are, untouched.

    x: (T, B, ...) or (B, T, ...) with batch_first. lengths: (B,) ints; or mask: (T, B) bool
    (any pattern: the real steps are reversed among themselves). Neither: a plain flip.

    >>> x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]).T   # (T=4, B=2)
    >>> sg.reverse_sequences(x, torch.tensor([3, 2])).T.tolist()
    [[3, 2, 1, 0], [5, 4, 0, 0]]
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise InputError(f"reverse_sequences: x must be a tensor of shape {'(B, T, ...)' if batch_first else '(T, B, ...)'}"
                         f", got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    xt = x.transpose(0, 1) if batch_first else x
    T, B = xt.shape[0], xt.shape[1]
    valid = valid_steps(T, B, lengths, mask, batch_first, x.device, "reverse_sequences")
    if valid is None:
        out = xt.flip(0)
    else:
        rank, n, position, t = _ranks(valid)
        mirrored = position.gather(0, (n.unsqueeze(0) - 1 - rank).clamp(min=0))
        out = _gather_time(xt, torch.where(valid, mirrored, t))
    return out.transpose(0, 1) if batch_first else out


def _shift_within(x: torch.Tensor, valid: torch.Tensor | None, by: int) -> torch.Tensor:
    """out at a real step of rank k = x at the real step of rank k - by; zero where that does
    not exist and on padded steps (time-major)."""
    if valid is None:
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    rank, n, position, _ = _ranks(valid)
    src = rank - by
    exists = valid & (src >= 0) & (src < n.unsqueeze(0))
    index = position.gather(0, src.clamp(0, x.shape[0] - 1))
    out = _gather_time(x, index)
    return out * exists.reshape(exists.shape + (1,) * (x.dim() - 2)).to(out.dtype)


def _layout_of(who: str, modules: Sequence[nn.Module], batch_first: bool | None) -> bool:
    """The batch_first of the wrapped modules. A wrapper passes its input to them as it came, so
    its own batch_first (used for lengths, masks and reversal) must agree with theirs."""
    known = {bool(m.batch_first) for m in modules if hasattr(m, "batch_first")}
    if len(known) > 1:
        raise ValueError(f"{who}: the wrapped modules disagree on batch_first; give them one layout")
    inner = known.pop() if known else None
    if batch_first is None:
        return bool(inner)
    if inner is not None and bool(batch_first) != inner:
        raise ValueError(f"{who}(batch_first={batch_first}) wraps modules with batch_first={inner}: a wrapper cannot "
                         f"change the layout its inner modules read; set batch_first on them instead "
                         f"(e.g. sg.Recurrence(cell, batch_first={batch_first}))")
    return bool(batch_first)


def _recurrence_cell(module: nn.Module) -> Cell | None:
    """The cell of an sg.Recurrence (compiled, or inside torch.compile's wrapper); None for any
    other module, whose cell-like attributes layers do not read."""
    module = getattr(module, "_orig_mod", module)
    return module.cell if isinstance(module, Recurrence) else None


def _forward_parameters(module: nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of the module's forward (or of its __call__, where it defines that
    instead); None for a forward Python cannot describe (its first call will say)."""
    entry = module.__call__ if type(module).forward is nn.Module.forward else module.forward
    try:
        return list(inspect.signature(entry).parameters.values())
    except (TypeError, ValueError):
        return None


def _check_takes_lengths(module: nn.Module, who: str) -> None:
    """Layers call each module as module(x, state, lengths=, mask=): one whose forward takes
    neither (torch.nn.GRU, say) is refused when built, not at its first call."""
    params = _forward_parameters(module)
    if params is None:
        return
    if any(p.kind is p.VAR_KEYWORD for p in params) or {"lengths", "mask"} <= {p.name for p in params}:
        return
    hint = f"sg.nn.{type(module).__name__} (torch.nn's interface, with lengths=) or " \
        if type(module).__name__ in ("RNN", "LSTM", "GRU") else ""
    raise TypeError(f"{who} ({type(module).__module__}.{type(module).__qualname__}) has a forward without "
                    f"lengths= and mask=, which layers pass to each module; use {hint}an sg.Recurrence")


def _check_takes_a_state(module: nn.Module, who: str) -> None:
    """Repeater calls its module as module(x, state): one whose forward takes one argument (a
    torch.nn.Linear, say) is refused when built, not at its first call."""
    params = _forward_parameters(module)
    if params is None:
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    raise TypeError(f"{who} ({type(module).__module__}.{type(module).__qualname__}) has a forward that takes no "
                    f"state; it is called as module(x, state), as a recurrent module is: use an sg.Recurrence "
                    f"or an sg.nn layer")


def _feature_sizes(module: nn.Module) -> tuple[int | None, int | None]:
    """(input features, output features) of a Recurrence layer when its cell says (one input,
    one output, each a vector per step) or of an sg.nn layer; None where it does not (any other
    module)."""
    from .nn import _RNNBase
    if isinstance(module, _RNNBase):
        return module.input_size, (module.proj_size or module.hidden_size) * (2 if module.bidirectional else 1)
    cell = _recurrence_cell(module)
    if cell is None:
        return None, None
    ins, outs = cell.inputs, cell.outputs
    size_in = ins[0].shape[-1] if len(ins) == 1 and len(ins[0].shape) == 1 and ins[0].dtype == "float" else None
    size_out = outs[0].shape[-1] if len(outs) == 1 and len(outs[0].shape) == 1 else None
    return size_in, size_out


def _check_one_output(module: nn.Module, who: str) -> None:
    """Layers pass one output sequence on: a cell with several outputs is refused when built."""
    cell = _recurrence_cell(module)
    if cell is not None and len(cell.outputs) != 1:
        raise ValueError(f"{who}: its cell has {len(cell.outputs)} outputs; layers pass one output sequence on, so give "
                         f"the cell a single output")


def _single_output(out, who: str) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and not isinstance(out, PackedSequence):
        raise InputError(f"{who}: an inner module returned {len(out)} outputs; layers pass one output "
                         f"sequence on, so give the cell a single output")
    return out


# ---------------------------------------------------------------------------------------
# stacks
# ---------------------------------------------------------------------------------------
class Stack(nn.Module):
    """Recurrence-like layers run one after the other (rnnlib's list of hidden sizes).

    forward(x, state=None, *, lengths=None, mask=None, **kwargs) -> (output, [final_state per layer])
    state: None or a list with one initial state (or None) per layer; kwargs (e.g. context=,
    an attention memory) go to every layer. Dropout with probability `dropout` is applied
    between layers (not after the last), like torch.nn.LSTM. `remember` reads and sets it on
    every layer that has it.
    """

    __prepare_scriptable__ = refuse_torchscript  # torch.jit.script: refused by name

    def __init__(self, layers: Sequence[nn.Module], dropout: float = 0.0):
        super().__init__()
        if not layers:
            raise ValueError("sg.Stack needs at least one layer")
        for k, layer in enumerate(layers):
            if not isinstance(layer, nn.Module):
                hint = ": wrap a cell in sg.Recurrence(cell) first" if isinstance(layer, Cell) else ""
                raise TypeError(f"sg.Stack: layer {k} must be a torch.nn.Module (a sg.Recurrence, say), "
                                f"got {type(layer).__name__}{hint}")
        dropout = probability(dropout, "sg.Stack", "dropout")
        layout = _layout_of("sg.Stack", layers, None)
        if any(hasattr(m, "batch_first") for m in layers):  # wrappers around the stack read it
            self.batch_first = layout
        for k, layer in enumerate(layers):
            _check_takes_lengths(layer, f"sg.Stack: layer {k}")
            _check_one_output(layer, f"sg.Stack layer {k}")
        for k in range(1, len(layers)):
            gives, takes = _feature_sizes(layers[k - 1])[1], _feature_sizes(layers[k])[0]
            if None not in (gives, takes) and gives != takes:
                raise ValueError(f"sg.Stack: layer {k - 1} outputs {gives} features per step but layer {k} takes "
                                 f"{takes}; each layer's input size must be the previous layer's output size")
        self.layers = nn.ModuleList(layers)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x, state: Sequence | None = None, *, lengths=None, mask=None, **kwargs):
        if state is None:
            state = [None] * len(self.layers)
        if isinstance(state, dict) or len(state) != len(self.layers):
            raise InputError(f"sg.Stack: state must be a list with one entry (a state or None) per layer "
                             f"({len(self.layers)} layers)")
        finals = []
        for k, (layer, s) in enumerate(zip(self.layers, state)):
            if k and self.dropout is not None:
                x = self.dropout(x)
            with _naming_errors(f"sg.Stack layer {k}"):
                x, final = layer(x, s, lengths=lengths, mask=mask, **kwargs)
            x = _single_output(x, f"sg.Stack layer {k}")
            finals.append(final)
        return x, finals

    def forget(self) -> None:
        """Drop the state every remember=True layer carries: the next call starts afresh."""
        _forget_all(self.layers)

    @property
    def remember(self) -> bool:
        """Whether every layer carries its final state into the next call."""
        return all(getattr(m, "remember", False) for m in self.layers)

    @remember.setter
    def remember(self, on: bool) -> None:
        lacking = [f"layer {k} ({type(m).__name__})" for k, m in enumerate(self.layers) if not hasattr(m, "remember")]
        if lacking and on:  # (switching it off asks nothing of them)
            raise AttributeError(f"sg.Stack: {', '.join(lacking)} cannot remember its state between calls (an "
                                 f"sg.Recurrence can); pass each layer's final state back in instead")
        for m in self.layers:
            if hasattr(m, "remember"):
                m.remember = bool(on)


@contextlib.contextmanager
def _naming_errors(who: str):
    """An InputError raised inside says which layer or direction of a wrapper it came from."""
    try:
        yield
    except InputError as e:
        raise InputError(f"{who}: {e}") from None


def _forget_all(modules) -> None:
    for m in modules:
        if callable(getattr(m, "forget", None)):
            m.forget()


def _output_size(module: nn.Module) -> int:
    cell = getattr(module, "cell", None)
    if cell is None or len(cell.outputs) != 1:
        raise ValueError("sg.stack: each cell must have exactly one output (it feeds the next layer)")
    return cell.outputs[0].shape[-1]


def stack(cell_fn: Callable, input_size: int, hidden_sizes: Sequence[int], dropout: float = 0.0,
          batch_first: bool = False, remember: bool = False, **cell_kwargs) -> Stack:
    """rnnlib's makeRecurrent{cellfn, inputsize, hids}: one sg.Recurrence per hidden size,
    each cell made by cell_fn(in_size, hidden_size, **cell_kwargs) and fed by the previous one;
    `remember` makes every layer carry its state into the next call (truncated BPTT).

    >>> model = sg.stack(sg.cells.lstm, 8, [16, 16], dropout=0.1)
    >>> out, finals = model(torch.randn(5, 2, 8), lengths=torch.tensor([5, 3]))
    """
    if getattr(hidden_sizes, "ndim", None) == 1 and hasattr(hidden_sizes, "tolist"):  # a numpy array, a tensor
        hidden_sizes = hidden_sizes.tolist()
    if isinstance(hidden_sizes, (int, str)) or not isinstance(hidden_sizes, Sequence):
        hint = f" (for one layer: [{hidden_sizes!r}])" if isinstance(hidden_sizes, numbers.Integral) else ""
        raise TypeError(f"sg.stack: hidden_sizes must be a list with one size per layer, got {hidden_sizes!r}{hint}")
    layers, size = [], input_size
    for hidden in hidden_sizes:
        try:
            cell = cell_fn(size, hidden, **cell_kwargs)
        except TypeError as e:
            if not cell_kwargs or "keyword argument" not in str(e):
                raise
            raise TypeError(f"sg.stack: {e}; sg.stack takes dropout, batch_first and remember, and hands every "
                            f"other keyword ({', '.join(cell_kwargs)}) to the cell function") from None
        if not isinstance(cell, Cell):
            made = f"an instance of {type(cell).__module__}.{type(cell).__qualname__}"
            raise TypeError(f"sg.stack: cell_fn(input_size, hidden_size) must return an sg.Cell (sg.cells.lstm, "
                            f"say, or a function of yours that builds one), but {getattr(cell_fn, '__name__', cell_fn)!r} "
                            f"returned {made}")
        rec = Recurrence(cell, batch_first=batch_first, remember=remember)
        size = _output_size(rec)
        layers.append(rec)
    return Stack(layers, dropout=dropout)


# ---------------------------------------------------------------------------------------
# bidirectional
# ---------------------------------------------------------------------------------------
def _first_sequence(x, batch_first: bool) -> torch.Tensor:
    """The (T, B, ...) tensor (or the first of a tuple, for a cell of several inputs) that gives
    a call its steps and batch size; anything else is an InputError saying what was expected."""
    parts = list(x) if isinstance(x, tuple) else [x]
    if parts and all(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in parts):
        return parts[0]
    got = ", ".join(f"a tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                    for v in parts) or "an empty tuple"
    raise InputError(f"sg.Bidirectional: x must be a tensor {'(B, T, ...)' if batch_first else '(T, B, ...)'} "
                     f"(or a tuple of them, one per input of the cell), got {got}")


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A copy with its own parameters, re-initialised where we know how: each module with a
    reset_parameters(), each Recurrence (by its cell's initialisers), and inside any other
    module (a Stack, a NormStabilizer) those it holds. A module that owns parameters and has
    neither keeps them as copied, with a warning."""
    twin = copy.deepcopy(module)
    _reinitialise(twin, "fwd")
    return twin


def _reinitialise(module: nn.Module, path: str) -> None:
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    if isinstance(module, Recurrence):
        with torch.no_grad():
            for key, node in module.cell.params.items():
                node.attrs["init"](module.param_tensors()[key])
            for learned in module.init.values():  # learned initial states start from zero, as new ones do
                learned.zero_()
        return
    if module._parameters:
        warnings.warn(f"sg.Bidirectional: the backward direction is a copy of fwd, re-initialised where seqgraph "
                      f"knows how; {path} ({type(module).__name__}) has no reset_parameters(), so its "
                      f"parameters {sorted(module._parameters)} keep fwd's values. Pass bwd= to choose them.",
                      UserWarning, stacklevel=user_stacklevel())
    for name, child in module.named_children():
        _reinitialise(child, f"{path}.{name}")


class Bidirectional(nn.Module):
    """Run `fwd` over each sequence and `bwd` over each sequence reversed within its own
    length, then merge the two output sequences step by step (Torch7's BiSequencer).

    bwd:    default: a copy of fwd with freshly initialised parameters.
    merge:  "concat" (last dim), "sum", or a function (out_fwd, out_bwd) -> out.
    lm:     BiSequencerLM: the forward output at step t has seen only steps < t and the
            backward output only steps > t (each shifted by one real step, zero-filled), so
            neither sees the word it should predict.
    forward(x, state=None, *, lengths=None, mask=None, **kwargs) -> (out, (final_fwd, final_bwd))
    state: None or (state_fwd, state_bwd); kwargs (e.g. context=) go to both directions.
    """

    __prepare_scriptable__ = refuse_torchscript  # torch.jit.script: refused by name

    def __init__(self, fwd: nn.Module, bwd: nn.Module | None = None, merge: str | Callable = "concat",
                 lm: bool = False, batch_first: bool | None = None):
        super().__init__()
        if not (merge in ("concat", "sum") or callable(merge)):
            raise ValueError(f"merge must be 'concat', 'sum' or a function, got {merge!r}")
        for what, m in (("fwd", fwd), ("bwd", bwd)):
            if not isinstance(m, nn.Module) and not (what == "bwd" and m is None):
                hint = ": wrap a cell in sg.Recurrence(cell) first" if isinstance(m, Cell) else ""
                raise TypeError(f"sg.Bidirectional: {what} must be a torch.nn.Module (a sg.Recurrence, say), "
                                f"got {type(m).__name__}{hint}")
        _check_takes_lengths(fwd, "sg.Bidirectional: fwd")
        if bwd is not None:
            _check_takes_lengths(bwd, "sg.Bidirectional: bwd")
        self.fwd = fwd
        self.bwd = bwd if bwd is not None else _fresh_copy(fwd)
        self._refuse_remembering_bwd(ValueError, ", copied from fwd" if bwd is None else "")
        _check_one_output(self.fwd, "sg.Bidirectional fwd")
        _check_one_output(self.bwd, "sg.Bidirectional bwd")
        (in_f, out_f), (in_b, out_b) = _feature_sizes(self.fwd), _feature_sizes(self.bwd)
        if None not in (in_f, in_b) and in_f != in_b:
            raise ValueError(f"sg.Bidirectional: both directions read the same sequence, but fwd takes {in_f} "
                             f"features per step and bwd {in_b}")
        if merge == "sum" and None not in (out_f, out_b) and out_f != out_b:
            raise ValueError(f"sg.Bidirectional: merge='sum' adds the two outputs, but fwd outputs {out_f} "
                             f"features per step and bwd {out_b}; use merge='concat' or cells of one size")
        self.merge = merge
        self.lm = lm
        self.batch_first = _layout_of("sg.Bidirectional", [self.fwd, self.bwd], batch_first)

    def _refuse_remembering_bwd(self, error: type, origin: str = "") -> None:
        """Raise `error` when the backward direction (or a layer inside it) has remember=True:
        when built, and at every call (it may be switched on later, bwd.remember = True)."""
        if any(getattr(m, "remember", False) for m in self.bwd.modules()):  # (a Stack of them too)
            raise error(f"sg.Bidirectional: the backward direction reads each call's sequences from their end, "
                        f"so it cannot carry its state into the next call (remember=True{origin}); give bwd= a "
                        f"module without remember (the forward direction may remember)")

    def forward(self, x, state=None, *, lengths=None, mask=None, **kwargs):
        self._refuse_remembering_bwd(InputError)
        if state is None:
            state = (None, None)
        if isinstance(state, dict) or len(state) != 2:
            raise InputError("sg.Bidirectional: state must be None or a pair (state_fwd, state_bwd)")
        bf = self.batch_first
        x = refuse_packed(x, "sg.Bidirectional")
        if isinstance(x, list):  # one tensor per input of the cell, as a Recurrence takes it
            x = tuple(x)
        first = _first_sequence(x, bf)
        T, B = (first.shape[1], first.shape[0]) if bf else (first.shape[0], first.shape[1])
        valid = valid_steps(T, B, lengths, mask, bf, first.device, "sg.Bidirectional")
        with _naming_errors("sg.Bidirectional (forward direction)"):
            out_f, fin_f = self.fwd(x, state[0], lengths=lengths, mask=mask, **kwargs)
        out_f = _single_output(out_f, "sg.Bidirectional fwd")
        mirror = None if valid is None else _layout(valid, bf)
        x_rev = tuple(reverse_sequences(v, batch_first=bf, mask=mirror) for v in x) if isinstance(x, tuple) else \
            reverse_sequences(x, batch_first=bf, mask=mirror)
        with _naming_errors("sg.Bidirectional (backward direction)"):
            out_b, fin_b = self.bwd(x_rev, state[1], lengths=lengths, mask=mask, **kwargs)
        out_b = reverse_sequences(_single_output(out_b, "sg.Bidirectional bwd"), batch_first=bf, mask=mirror)
        if self.lm:
            out_f = self._time_major(_shift_within(self._time_major(out_f), valid, 1))
            out_b = self._time_major(_shift_within(self._time_major(out_b), valid, -1))
        if self.merge == "concat":
            out = torch.cat([out_f, out_b], dim=-1)
        elif self.merge == "sum":
            if out_f.shape != out_b.shape:
                raise InputError(f"sg.Bidirectional: merge='sum' adds the two outputs, but fwd gave "
                                 f"{tuple(out_f.shape)} and bwd {tuple(out_b.shape)}")
            out = out_f + out_b
        else:
            out = self.merge(out_f, out_b)
        return out, (fin_f, fin_b)

    def forget(self) -> None:
        """Drop the state a remember=True forward direction carries."""
        _forget_all([self.fwd, self.bwd])

    @property
    def remember(self) -> bool:
        """Whether the forward direction carries its final state into the next call (the
        backward one reads each sequence from its end, so it cannot)."""
        return bool(getattr(self.fwd, "remember", False))

    @remember.setter
    def remember(self, on: bool) -> None:
        if not hasattr(self.fwd, "remember"):
            if on:  # (switching it off asks nothing of it)
                raise AttributeError(f"sg.Bidirectional: fwd ({type(self.fwd).__name__}) cannot remember its state "
                                     f"between calls (an sg.Recurrence can); pass its final state back in instead")
            return
        self.fwd.remember = bool(on)

    def _time_major(self, x):
        return x.transpose(0, 1) if self.batch_first else x

    def extra_repr(self) -> str:
        m = self.merge if isinstance(self.merge, str) else getattr(self.merge, "__name__", "callable")
        return f"merge={m}, lm={self.lm}"


def _layout(valid: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return valid.transpose(0, 1) if batch_first else valid


# ---------------------------------------------------------------------------------------
# repeater
# ---------------------------------------------------------------------------------------
class Repeater(nn.Module):
    """Feed the same input at each of `steps` steps (Torch7's Repeater, for RCNN-like models).

    forward(x, state=None, **kwargs): x is (B, *size), without a time dim; returns the inner
    module's (outputs, final_state) with outputs of `steps` steps."""

    __prepare_scriptable__ = refuse_torchscript  # torch.jit.script: refused by name

    def __init__(self, module: nn.Module, steps: int, batch_first: bool | None = None):
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"sg.Repeater: steps must be an int >= 0, got {steps!r}")
        _check_takes_a_state(module, "sg.Repeater: module")
        self.module = module
        self.steps = int(steps)
        self.batch_first = _layout_of("sg.Repeater", [module], batch_first)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], state=None, **kwargs):
        """x: (B, *size), or a tuple of them for a cell with several inputs."""
        dim = 1 if self.batch_first else 0
        x = refuse_packed(x, "sg.Repeater")  # a PackedSequence is a tuple too: refuse it before unpacking tuples

        cell = getattr(self.module, "cell", None)
        ranks = [1 + len(i.shape) for i in cell.inputs] if isinstance(cell, Cell) else None

        def repeat(v: torch.Tensor, k: int = 0) -> torch.Tensor:
            if not isinstance(v, torch.Tensor):
                raise InputError(f"sg.Repeater: x must be a (B, *size) tensor or a tuple of them, got {type(v).__name__}")
            if ranks is not None and k < len(ranks) and (v.dim() != ranks[k]
                                                         or tuple(v.shape[1:]) != tuple(cell.inputs[k].shape)):
                want = "(B, " + ", ".join(map(str, cell.inputs[k].shape)) + ")"
                raise InputError(f"sg.Repeater: input {k} must be {want}, one input with no time dim that every one "
                                 f"of the {self.steps} steps reads, got shape {tuple(v.shape)}")
            shape = list(v.shape)
            shape.insert(dim, self.steps)
            return v.unsqueeze(dim).expand(shape)
        xs = tuple(repeat(v, k) for k, v in enumerate(x)) if isinstance(x, (tuple, list)) else repeat(x)
        return self.module(xs, state, **kwargs)

    def extra_repr(self) -> str:
        return f"steps={self.steps}"


# ---------------------------------------------------------------------------------------
# losses over sequences
# ---------------------------------------------------------------------------------------
class SequenceLoss(nn.Module):
    """A per-step criterion over whole padded sequences that ignores padded steps (Torch7's
    SequencerCriterion + MaskZeroCriterion; with repeat_target=True, RepeaterCriterion).

    criterion: a function (input_rows, target_rows) -> per-row losses, e.g.
               nn.CrossEntropyLoss(reduction="none") (a torch loss that reduces is refused).
    reduction: "mean" (over all real steps and their elements, as torch's "mean": weighted by a
               criterion's class `weight`, without its `ignore_index` rows; seqgraph reads
               those from an nn.CrossEntropyLoss or nn.NLLLoss object, so a plain function
               calling F.cross_entropy(..., weight=, ignore_index=) gets every row counted
               once), "sum", or
               "sum_over_steps": the sum over steps of each step's mean over its real rows,
               which is Torch7's SequencerCriterion around a criterion that averages over the
               batch (its default), with MaskZeroCriterion's padded rows left out.
    forward(input, target, *, lengths=None, mask=None): input (T, B, ...), target (T, B, ...)
    (or (B, ...) with repeat_target: the same target at every step); batch_first swaps T, B.

    >>> loss = sg.SequenceLoss(nn.CrossEntropyLoss(reduction="none"))
    >>> value = loss(torch.randn(4, 2, 5), torch.randint(5, (4, 2)), lengths=torch.tensor([4, 2]))
    """

    __prepare_scriptable__ = refuse_torchscript  # torch.jit.script: refused by name

    def __init__(self, criterion: Callable, reduction: str = "mean", repeat_target: bool = False,
                 batch_first: bool = False):
        super().__init__()
        if reduction not in ("mean", "sum", "sum_over_steps"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'sum_over_steps', got {reduction!r}")
        if isinstance(criterion, type):
            raise TypeError(f"SequenceLoss takes a criterion object, e.g. {criterion.__name__}(reduction='none'), "
                            f"not the class {criterion.__name__}")
        if not callable(criterion):
            raise TypeError(f"SequenceLoss takes a criterion object, e.g. torch.nn.CrossEntropyLoss(reduction='none'), "
                            f"got {criterion!r}")
        if getattr(criterion, "reduction", "none") != "none":
            raise ValueError(f"SequenceLoss needs per-row losses to drop padded steps: build the criterion with "
                             f"reduction='none' (got reduction={criterion.reduction!r})")
        self.criterion = criterion
        self.reduction = reduction
        self.repeat_target = repeat_target
        self.batch_first = batch_first

    def forward(self, input: torch.Tensor, target: torch.Tensor, *, lengths=None, mask=None) -> torch.Tensor:
        layout = "(B, T, ...)" if self.batch_first else "(T, B, ...)"
        if not isinstance(input, torch.Tensor) or input.dim() < 2:
            raise InputError(f"SequenceLoss: input must be a tensor {layout}, got {_shape_or_type(input)}")
        if not isinstance(target, torch.Tensor):
            raise InputError(f"SequenceLoss: target must be a tensor, got {type(target).__name__}")
        if self.batch_first:
            input = input.transpose(0, 1)
        T, B = input.shape[0], input.shape[1]
        if self.repeat_target:
            if target.dim() == 0 or target.shape[0] != B:
                raise InputError(f"SequenceLoss: with repeat_target=True the target is one per sequence, (B, ...) "
                                 f"with B = {B}, got {tuple(target.shape)}")
            target = target.unsqueeze(0).expand((T,) + tuple(target.shape))
        elif self.batch_first:
            target = target.transpose(0, 1)
        if tuple(target.shape[:2]) != (T, B):
            raise InputError(f"SequenceLoss: input has (T, B) = {(T, B)} but target has {tuple(target.shape[:2])}")
        valid = valid_steps(T, B, lengths, mask, self.batch_first, input.device, "SequenceLoss")
        if valid is None:
            rows_in, rows_tgt = input.reshape((T * B,) + input.shape[2:]), target.reshape((T * B,) + target.shape[2:])
        else:
            rows_in, rows_tgt = input[valid], target[valid]
        try:
            losses = self.criterion(rows_in, rows_tgt)
        except Exception as e:  # the criterion's own error, which sees rows, not sequences: say which
            if hasattr(e, "add_note"):  # (Python 3.11+)
                e.add_note(f"in sg.SequenceLoss, called on the real steps' rows: input {tuple(rows_in.shape)} and "
                           f"target {tuple(rows_tgt.shape)}"
                           + (" (the target repeated at every step)" if self.repeat_target else ""))
            raise
        if losses.dim() == 0 or losses.shape[0] != rows_in.shape[0]:
            raise InputError(f"SequenceLoss: the criterion must return one loss per row ({rows_in.shape[0]} rows), "
                             f"got shape {tuple(losses.shape)}")
        if self.reduction == "sum_over_steps":
            steps = torch.arange(T, device=input.device).repeat_interleave(B)  # of each row t * B + b
            if valid is not None:
                steps = steps[valid.reshape(-1)]
            return _sum_of_step_means(self.criterion, rows_tgt, losses, steps, T)
        total = losses.sum()
        if self.reduction == "sum" or losses.numel() == 0:  # no real step: a loss of 0, not 0/0
            return total
        return total / _mean_denominator(self.criterion, rows_tgt, losses)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, repeat_target={self.repeat_target}"


def _shape_or_type(v) -> str:
    return f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def _sum_of_step_means(criterion: Callable, target: torch.Tensor, losses: torch.Tensor, steps: torch.Tensor,
                       T: int) -> torch.Tensor:
    """The sum over steps of each step's mean loss (the mean as _mean_denominator's, per step;
    a step without a real row adds 0). `steps`: the step of each row of `losses`."""
    if losses.numel() == 0:  # no real step: a loss of 0
        return losses.sum()
    per_row = losses.reshape(losses.shape[0], -1)
    weights = _row_weights(criterion, target, losses).to(per_row.dtype)
    total = per_row.new_zeros(T).index_add(0, steps, per_row.sum(1))
    count = per_row.new_zeros(T).index_add(0, steps, weights)
    return (total / torch.where(count > 0, count, 1.0)).sum()


def _class_weighted(criterion: Callable, target: torch.Tensor, losses: torch.Tensor) -> bool:
    """Whether torch's mean of this criterion divides by class weights: CrossEntropyLoss and
    NLLLoss with class-index targets (their `weight`, and 0 for `ignore_index` rows)."""
    return isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)) and not target.dtype.is_floating_point \
        and target.dtype != torch.bool and target.shape == losses.shape


def _row_weights(criterion: Callable, target: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """How much each row counts in torch's mean, (rows,): its elements, or its targets' class
    weights (see _class_weighted)."""
    rows = losses.shape[0]
    if not _class_weighted(criterion, target, losses):
        return losses.new_full((rows,), losses[0].numel() if rows else 1)
    counts = target != criterion.ignore_index
    w = counts.to(losses.dtype) if criterion.weight is None else criterion.weight[torch.where(counts, target, 0)] * counts
    return w.reshape(rows, -1).sum(1)


def _mean_denominator(criterion: Callable, target: torch.Tensor, losses: torch.Tensor):
    """What torch's reduction="mean" divides by: the summed row weights of a class-weighted
    criterion (0 when every row is ignored, as in torch), else the number of losses (at least
    1, so no real steps give a loss of 0)."""
    if not _class_weighted(criterion, target, losses):
        return max(losses.numel(), 1)
    return _row_weights(criterion, target, losses).sum()


__all__ = ["Stack", "stack", "Bidirectional", "Repeater", "reverse_sequences", "SequenceLoss"]
