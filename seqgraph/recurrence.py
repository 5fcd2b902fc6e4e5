"""`sg.Recurrence`: a torch.nn.Module that runs a Cell over whole sequences.

It owns the cell's parameters (so parameters(), state_dict(), .to() and .double() work),
validates every run-time argument with a clear message, builds initial states, samples
dropout noise, turns lengths into a (T, B) mask, and implements the masking, remember/forget
and batch_first semantics once for every backend. The step loop itself is `_run_sequence`;
the reference version here calls the interpreter step by step, and compiled backends
override only that method. Nothing here may know about fusion or code generation.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .cell import Cell
from .compiler.interpret import evaluate, run_step
from .compiler.ir import topo_order
from .compiler.ops import REGISTRY
from .errors import InputError, WiringError, describe, refuse_torchscript, user_stacklevel

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)  # what torch.nn.functional.embedding takes


def _fmt(shape) -> str:
    """A tensor's shape as Python writes a tuple: (3, 8), (8,), ()."""
    return str(tuple(int(s) for s in shape))


def _got(v) -> str:
    """What came, for an error: a tensor's shape, or the type of anything else."""
    return _fmt(v.shape) if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"


def refuse_packed(x, who: str):
    """x, refused with a clear message if it is a PackedSequence: recurrences and the layers over
    them take padded (T, B, ...) tensors and lengths=."""
    if isinstance(x, PackedSequence):
        raise InputError(f"{who} takes a padded tensor with lengths=, not a PackedSequence: unpack it with "
                         f"torch.nn.utils.rnn.pad_packed_sequence (sg.nn.LSTM/GRU/RNN take PackedSequence)")
    return x


def _in_dtype(values: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The floating-point values cast to `dtype` (token ids stay integers)."""
    return [v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for v in values]


class _Reading(threading.local):
    """Per thread: `values`, {id(recurrence): the values its reading() block gives}. Every
    call looks there, so each thread starts with an empty dict (a missing attribute of a
    threading.local costs a caught AttributeError per look)."""

    def __init__(self):
        self.values: dict[int, dict[str, torch.Tensor]] = {}


_reading = _Reading()


def batched_by_vmap(t: torch.Tensor) -> bool:
    """Whether vmap batches `t` at some level: torch.func's (under vmap(grad(f)) the batch is
    wrapped in grad's), or the older one that is_grads_batched runs a backward under."""
    functorch = torch._C._functorch
    if functorch.is_legacy_batchedtensor(t):
        return True
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def check_lengths_shape(lengths: torch.Tensor, T: int, B: int, batch_first: bool, who: str) -> None:
    """An InputError unless `lengths` is (B,); it names x's layout when the length is T's."""
    if lengths.dim() != 1 or lengths.shape[0] != B:
        swapped = lengths.dim() == 1 and lengths.shape[0] == T != B
        hint = (f"; x is read as {'(B, T, ...) (batch_first=True)' if batch_first else '(T, B, ...)'}: is it "
                f"{'time-major' if batch_first else 'batch-first'}?") if swapped else ""
        raise InputError(f"{who}: lengths must have shape ({B},) (one per sequence), got {_fmt(lengths.shape)}{hint}")


def _picked_ids(rows: torch.Tensor, path) -> torch.Tensor:
    """Token ids (rows, ...) taken through the slices and reshapes `path` (nodes, in order)."""
    for n in path:
        rows = REGISTRY[n.op].torch(n, rows)
    return rows


def odd_one_out(tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(the first tensor whose dtype and device differ from the most common pair, the first
    that has it) among tensors that do not all agree."""
    kinds = [(getattr(t, "dtype", None), getattr(t, "device", None)) for t in tensors]
    common = max(kinds, key=kinds.count)  # (a tie: the first one's)
    return next(i for i, k in enumerate(kinds) if k != common), kinds.index(common)


def check_has_values(v, name: str, device, who: str) -> None:
    """Refuse lengths or a mask on the meta device for inputs that are not: it holds no values
    to read the steps from."""
    if isinstance(v, torch.Tensor) and v.is_meta and torch.device(device).type != "meta":
        raise InputError(f"{who}: {name} is on the meta device, which holds no values, but the inputs are on "
                         f"{device}; give {name} on the CPU or the inputs' device")


def valid_steps(T: int, B: int, lengths, mask, batch_first: bool, device, who: str) -> torch.Tensor | None:
    """A (T, B) bool tensor of the real steps given by `lengths` (B,) or `mask` ((B, T) with
    batch_first), or None when every step is real; an InputError naming `who` otherwise."""
    if lengths is not None and mask is not None:
        raise InputError(f"{who}: give lengths or mask, not both")
    for name, v in (("lengths", lengths), ("mask", mask)):
        if isinstance(v, torch.Tensor) and functorch_active() and batched_by_vmap(v):
            raise InputError(f"{who}: {name}= is batched by torch.func.vmap; the steps to run must be one "
                             f"(T, B) pattern per call, not one per vmapped example. Give {name} outside "
                             f"vmap's in_dims (shared by every example), or loop over the examples")
    for name, v in (("lengths", lengths), ("mask", mask)):
        check_has_values(v, name, device, who)
    if lengths is not None:
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{who}: lengths must be a tensor or list of {B} ints (one per sequence), "
                             f"got {type(lengths).__name__} {lengths!r:.40}") from None
        check_lengths_shape(lengths, T, B, batch_first, who)
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise InputError(f"{who}: lengths must be integers, got dtype {lengths.dtype}")
        if lengths.dtype in (torch.uint16, torch.uint32, torch.uint64):  # (types torch's min and max do not take)
            lengths = lengths.to(torch.int64)
        if torch.compiler.is_compiling():  # a traced graph checks on the device, without reading the values
            # (a message naming T would make the traced graph specialise on it)
            torch._assert_async(((lengths >= 0) & (lengths <= T)).all(), f"{who}: lengths must lie in [0, T]")
        elif B and not lengths.is_meta and (int(lengths.min()) < 0 or int(lengths.max()) > T):
            bad = int(lengths.min()) if int(lengths.min()) < 0 else int(lengths.max())
            raise InputError(f"{who}: lengths must lie in [0, {T}] (T = {T}), got {bad}")
        return torch.arange(T, device=device).unsqueeze(1) < lengths.to(device).unsqueeze(0)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != ((B, T) if batch_first else (T, B)):
            got = f"shape {_fmt(mask.shape)}" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
            want = f"({B}, {T})" if batch_first else f"({T}, {B})"
            raise InputError(f"{who}: mask must be a bool tensor of shape {want}, got {got}")
        if mask.dtype != torch.bool:
            raise InputError(f"{who}: mask must have dtype torch.bool, got {mask.dtype}")
        # a copy: the caller may refill the same buffer for the next call before this one's backward
        return (mask.transpose(0, 1) if batch_first else mask).to(device, copy=True,
                                                                   memory_format=torch.contiguous_format)
    return None


def token_output(o, cell: Cell, xs, contexts, valid, dtype, device) -> torch.Tensor:
    """An integer output (a token input passed on, a piece of one): the interpreter over all
    T*B rows at once (it reads no state), exact where a float buffer would round ids above
    2**24; zero on padded steps, as every output is."""
    T, B = xs[0].shape[0], xs[0].shape[1]
    leaves = {x.id: v.reshape((T * B,) + v.shape[2:]) for x, v in zip(cell.inputs, xs)}
    leaves.update({c.id: v.unsqueeze(0).expand((T,) + v.shape).reshape((T * B,) + v.shape[1:])
                   for c, v in zip(cell.contexts, contexts)})
    value = evaluate(topo_order([o]), leaves, dtype=dtype, device=device)[o.id].reshape((T, B) + o.shape)
    if valid is not None:
        value = value.masked_fill(~valid.view((T, B) + (1,) * len(o.shape)), 0)
    return value


def own_storage(finals: list[torch.Tensor], others: list[torch.Tensor]) -> list[torch.Tensor]:
    """The final states, each copied where it shares memory with one of `others` (the caller's
    initial state when no step ran; an output's last step; the state sequence backward reads)
    or with another final state (two states of one next value), so that changing a final state
    in place changes nothing else, as with nn.LSTM's h_n."""
    if functorch_active():  # torch.func's tensors show no storage
        return [f.clone() for f in finals]
    taken = {o.untyped_storage().data_ptr() for o in others if o.numel()}
    owned = []
    for f in finals:
        if f.numel():
            if f.untyped_storage().data_ptr() in taken:
                f = f.clone()
            taken.add(f.untyped_storage().data_ptr())
        owned.append(f)
    return owned


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_casts(given: torch.dtype, wanted: torch.dtype, device: torch.device) -> bool:
    """Whether autocast is on for `device`'s type and casts between these dtypes (float32 and
    half precision; never float64, nor a type autocast does not know: meta): a tensor of
    dtype `given` is then taken where `wanted` is, cast as an autocast op casts its operands."""
    if given not in _AUTOCAST_DTYPES or wanted not in _AUTOCAST_DTYPES:
        return False
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev) is tracing this call (never asked
    inside torch.compile, whose tracer cannot call the check and has its own path)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def _in_backward() -> bool:
    """Whether this runs inside a backward pass (a checkpointed forward run again, a hook)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def forward_ad_active() -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad.dual_level) is open: the generated
    loops' autograd Function has no forward derivative, so the reference loop runs."""
    return torch.autograd.forward_ad._current_level >= 0 and not torch.compiler.is_compiling()


class Recurrence(nn.Module):
    """Run `cell` over sequences.

    forward(x, state=None, *, lengths=None, mask=None, context=None) -> (outputs, final_state)
      x:        (T, B, *size) per input (a tuple for several inputs); (B, T, ...) if batch_first.
      state:    {state name: (B, *size)}; missing names start from their init.
      lengths:  (B,) integers in [0, T]; or mask: (T, B) bool (True = a real step).
      context:  {context name: (B, *size)}, or the tensor when the cell has one Context.
    On a padded step a sequence keeps its state and outputs zeros; final_state holds each
    sequence's state at its own last real step. With remember=True the final state of a call
    (detached) starts the next call; forget() resets it.
    """

    __prepare_scriptable__ = refuse_torchscript  # torch.jit.script: refused by name

    def __init__(self, cell: Cell, batch_first: bool = False, remember: bool = False):
        super().__init__()
        if not isinstance(cell, Cell):
            hint = (f"; call it to build the cell, e.g. sg.cells.{cell.__name__}(input_size, hidden_size)"
                    if getattr(cell, "__module__", None) == "seqgraph.cells" else "")
            raise TypeError(f"sg.Recurrence takes an sg.Cell, got {type(cell).__name__}{hint}")
        if not cell.inputs:  # (a cell without inputs may still be inlined into a bigger one)
            raise WiringError(f"sg.Recurrence: the cell declared at {cell.site} has no inputs, and a call takes its "
                              f"steps and batch size (T, B) from the per-step inputs: give it at least one sg.Input")
        self.cell = cell
        self.batch_first = batch_first
        self.remember = remember
        self._memory: dict[str, torch.Tensor] | None = None
        self.params = ParamTree()
        for key, node in cell.params.items():
            t = torch.empty(node.shape)
            with torch.no_grad():
                try:
                    node.attrs["init"](t)
                except ValueError as e:
                    raise ValueError(f"parameter {key!r} (declared at {node.site}): {e}") from None
            register_nested(self.params, key, nn.Parameter(t))
        self.init = nn.ParameterDict({
            prev.name: nn.Parameter(torch.zeros(prev.shape))
            for prev, _ in cell.states if prev.attrs.get("init") == "learned"})

    # state_dict layout version: 2 reads an Embedding's padding row as stored (torch.nn.Embedding's
    # rule); version 1 read it as zeros whatever it held, so its checkpoints hold a random row
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version", 2) < 2:  # a checkpoint of version 1: its padding rows read as zeros
            for key, node in self.cell.params.items():
                pads = {u.attrs["padding_idx"] for u in self.cell.order
                        if u.op == "embedding" and u.inputs[1] is node and u.attrs.get("padding_idx") is not None}
                name = f"{prefix}params.{key}"
                if pads and name in state_dict:
                    state_dict[name] = state_dict[name].clone()  # (load_state_dict's own copy of the dict)
                    state_dict[name][sorted(pads)] = 0
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    # -- parameters -------------------------------------------------------------------------
    def param_tensors(self) -> dict[str, torch.Tensor]:
        """The cell's parameters by their keys (`gate.weight`); inside `reading(values)`, those
        values instead."""
        # (the empty check first: outside reading() nothing depends on id(self), which
        # torch.compile would otherwise guard on, compiling again for every instance)
        mine = _reading.values
        values = mine.get(id(self)) if mine else None
        if values is not None:
            return values
        # the walk reads nn.Module's dicts directly (no __getattr__), so a module or Parameter
        # replaced since the last call is the one read
        tree = self._modules["params"]
        return {key: _read_param(tree, owner, leaf) for key, owner, leaf in self._paths()}

    def _run_weight_hooks(self) -> None:
        """Run the forward pre-hooks that hook-based weight tools (torch.nn.utils.prune,
        spectral_norm, weight_norm) put on a level of the parameter tree (`rec.params.hh`),
        once per call, as that module's own call would: the levels hold parameters and are
        never called, and the tools compute the weight a call reads (weight_orig * mask, say)
        in that hook."""
        for mod in self._modules["params"].modules():
            if mod._forward_pre_hooks:
                with_kwargs = mod._forward_pre_hooks_with_kwargs
                for key, hook in tuple(mod._forward_pre_hooks.items()):
                    hook(mod, (), {}) if key in with_kwargs else hook(mod, ())

    def _paths(self) -> list[tuple[str, tuple, str]]:
        """(key, owner path, leaf name) of each parameter, each key split once."""
        paths = self.__dict__.get("_param_paths")
        if paths is None:
            paths = self.__dict__["_param_paths"] = [(key, tuple(key.split(".")[:-1]), key.split(".")[-1])
                                                     for key in self.cell.params]
        return paths

    @contextlib.contextmanager
    def reading(self, values: dict[str, torch.Tensor]):
        """Run calls inside the block with these tensors for the cell's parameters: an owner
        whose weights are computed per access (torch.nn.utils.parametrize, weight drop) passes
        them in this way. The values belong to the calling thread: threads sharing one module
        each read their own."""
        if set(values) != set(self.cell.params):
            raise KeyError(f"reading() needs exactly the cell's parameters {sorted(self.cell.params)}, "
                           f"got {sorted(values)}")
        mine = _reading.values
        before = mine.get(id(self))
        mine[id(self)] = {key: values[key] for key in self.cell.params}  # in the cell's order, as the loops read them
        try:
            yield self
        finally:
            if before is None:
                del mine[id(self)]
            else:
                mine[id(self)] = before

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self._memory and next(iter(self._memory.values())).is_meta:
            self._memory = None  # a state remembered on "meta" holds no values to carry (to_empty() after a dry run)
        elif self._memory:  # the remembered state follows .to(), .double(), .cuda()
            self._memory = {k: fn(v) for k, v in self._memory.items()}
        return out

    def _with_memory(self, remembered: dict, state, B: int):
        """The states of this call under remember=True: the `remembered` ones (read once by the
        caller: another thread may forget() meanwhile), each replaced by the caller's where given."""
        kept = next(iter(remembered.values())).shape[0]
        given = dict(state) if isinstance(state, Mapping) else None
        if kept != B and (given is None or set(given) != set(remembered)):
            raise InputError(f"{self._where()}: remember=True carries states of batch size {kept} "
                             f"but this call has batch size {B}; call forget() first")
        if state is None or given is not None:
            # a state remembered under torch.inference_mode cannot be saved for a backward:
            # outside that mode the call starts from a normal copy of it
            # (torch.compile cannot ask, and its graphs never run in inference mode)
            fresh = torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
            memory = {k: v.clone() if not fresh and v.is_inference() else v for k, v in remembered.items()}
            return {**memory, **(given or {})}
        return state  # not a dict: _initial_states names the mistake

    def forget(self) -> None:
        """Drop the remembered state: the next call starts from the initial states."""
        self._memory = None

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], state: Mapping[str, torch.Tensor] | None = None, *,
                lengths: torch.Tensor | Sequence[int] | None = None, mask: torch.Tensor | None = None,
                context: torch.Tensor | Mapping[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        compiling = torch.compiler.is_compiling()  # (asked once: every call asks it here three times)
        if self.remember and functorch_active():
            raise InputError(f"{self._where()}: remember=True keeps each call's final state for the next call, "
                             f"and under a torch.func transform (grad, vmap, jacrev) that state would be "
                             f"the transform's own tensor; pass state= and take the final state instead")
        if self.remember and not compiling and _in_backward():
            raise InputError(f"{self._where()}: remember=True, and this call runs during a backward pass: "
                             f"activation checkpointing (torch.utils.checkpoint) running the forward again? "
                             f"That second run would start from the state the first run stored, not from the "
                             f"one it started from, and give wrong gradients. Around a checkpoint carry the "
                             f"state yourself: remember=False, out, final = rnn(x, state), then "
                             f"state = {{k: v.detach() for k, v in final.items()}}")
        self._run_weight_hooks()
        xs = self._check_inputs(x)
        T, B = xs[0].shape[0], xs[0].shape[1]
        dtype, device = self._float_dtype(xs), xs[0].device
        if any(v.dtype != dtype and v.is_floating_point() for v in xs):  # (autocast: inputs of another dtype)
            xs = [v.to(dtype) if v.is_floating_point() else v for v in xs]
        valid = self._check_mask(lengths, mask, T, B, device)
        if valid is not None:  # padding is never read: a nan or an out-of-range token there stays out
            xs = [v.masked_fill(~valid.view(T, B, *([1] * (v.dim() - 2))), 0) for v in xs]
        remembered = self._memory if self.remember else None
        if remembered:
            state = self._with_memory(remembered, state, B)
        states0 = self._initial_states(state, B, dtype, device)
        contexts = self._check_contexts(context, B, dtype, device)
        if valid is not None and contexts:  # nor the context of a sequence without one real step
            # asking whether all are live would wait for a GPU, or break a traced graph: there, always zeroed
            live = valid.any(0)
            if valid.device.type != "cpu" or compiling or not bool(live.all()):
                contexts = [v.masked_fill(~live.view(B, *([1] * (v.dim() - 1))), 0) for v in contexts]
        if not (compiling or torch.jit.is_tracing()):  # (traced: the lookup's own check)
            self._check_ids("input", self.cell.inputs, xs)
            self._check_ids("context", self.cell.contexts, contexts)
            if valid is None:
                self._warn_unmarked_padding(xs)
        noises = self._sample_noise(T, B, dtype, device)
        outs, finals = self._run_sequence(xs, states0, contexts, noises, valid, dtype, device)
        if not compiling:  # (the loop's custom op returns copies there)
            finals = own_storage(finals, states0 + xs + contexts)  # (a state whose next value is an input)
        final_state = {prev.name: v for (prev, _), v in zip(self.cell.states, finals)}
        if self.remember:
            self._memory = {k: v.detach() for k, v in final_state.items()}
        if self.batch_first:
            outs = [o.transpose(0, 1) for o in outs]
        return (outs[0] if len(outs) == 1 else tuple(outs)), final_state

    def _run_sequence(self, xs, states0, contexts, noises, valid, dtype, device):
        if torch.jit.is_tracing():  # the Python loop over T is unrolled into the trace
            warnings.warn(f"seqgraph: torch.jit.trace of {self._where()} records the example's {xs[0].shape[0]} "
                          f"steps: the traced module runs that many steps whatever T it is given (ONNX export "
                          f"too; lengths= and mask= stay free). torch.export keeps T free.", RuntimeWarning,
                          stacklevel=2)
        return self._reference_loop(xs, states0, contexts, noises, valid, dtype, device)

    def _reference_loop(self, xs, states0, contexts, noises, valid, dtype, device):
        """The reference loop: the interpreter once per step. A step with padding runs on its
        real rows only (gathered, then scattered back): a padded row keeps its state, outputs
        zero and gets no gradient from the step, so nothing the step would compute there (an
        infinite derivative, say) can reach the real rows."""
        params = self.param_tensors()
        T, B = xs[0].shape[0], xs[0].shape[1]
        states = list(states0)
        outs: list[list[torch.Tensor]] = [[] for _ in self.cell.outputs]
        # one wait for the device, not T; "meta" tensors have shapes only: every step runs on all rows.
        # Traced (torch.jit.trace, torch.export, torch.compile) the values of `valid` are unknown
        # until run: every step runs on all rows and keeps its real ones (padded inputs are zeros)
        traced = valid is not None and not valid.is_meta and (torch.jit.is_tracing() or torch.compiler.is_compiling())
        full = [True] * T if valid is None or valid.is_meta or traced else valid.all(1).tolist()
        # noise drawn as one row (evaluation mode) gives a value that meets the batch only through it one row
        one_row = B != 1 and any((n.shape[0] if node.attrs["per_sequence"] else n.shape[1]) == 1
                                 for node, n in zip(self.cell.noises, noises))
        fit = _batch_rows if one_row else (lambda step, rows: step)
        for t in range(T):
            step_noise = [n[t] if node.attrs["per_sequence"] is False else n
                          for node, n in zip(self.cell.noises, noises)]
            leaves = ([x[t] for x in xs], states, contexts, step_noise)
            if traced:
                o_all, next_all = fit(run_step(self.cell, *leaves, params, dtype=dtype, device=device), B)
                real = valid[t]
                o = [v.masked_fill(~real.view((B,) + (1,) * (v.dim() - 1)), 0) for v in o_all]
                states = [torch.where(real.view((B,) + (1,) * (s.dim() - 1)), v.to(s.dtype), s)
                          for s, v in zip(states, next_all)]
            elif full[t]:
                o, states = fit(run_step(self.cell, *leaves, params, dtype=dtype, device=device), B)
            else:
                rows = valid[t].nonzero().squeeze(1)
                # noise drawn as one (1, ...) row (eval mode, p = 0) broadcasts to any rows
                pick = [[v.index_select(0, rows) if v.dim() and v.shape[0] == B else v for v in group]
                        for group in leaves]
                if not rows.numel():  # nothing to compute; the outputs' dtypes from one row, unused
                    pick = [[v[:1] if v.dim() and v.shape[0] == B else v for v in group] for group in leaves]
                with torch.set_grad_enabled(torch.is_grad_enabled() and bool(rows.numel())):
                    o_real, next_real = fit(run_step(self.cell, *pick, params, dtype=dtype, device=device),
                                            max(rows.numel(), 1))
                o = [v.new_zeros((B,) + v.shape[1:]) for v in o_real]
                if rows.numel():
                    o = [z.index_copy(0, rows, v) for z, v in zip(o, o_real)]
                    states = [s.index_copy(0, rows, v.to(s.dtype)) for s, v in zip(states, next_real)]
            # under autocast a step's ops pick their dtypes (a product without a bias gives
            # bfloat16): outputs and states are kept in the recurrence's dtype, as the compiled
            # loops' buffers keep them
            o, states = _in_dtype(o, dtype), _in_dtype(states, dtype)
            for lst, v in zip(outs, o):
                lst.append(v)

        def no_steps(node):  # T = 0: an empty output of the node's own dtype
            if node.dtype == "long":
                return token_output(node, self.cell, xs, contexts, valid, dtype, device)
            return torch.zeros((0, B) + node.shape, dtype=dtype, device=device)
        stacked = [torch.stack(lst) if lst else no_steps(node) for lst, node in zip(outs, self.cell.outputs)]
        if T == 0 or (valid is not None and not traced and not any(full) and not valid.any()):
            # no real step at all: the outputs are zeros and the final states the initial ones,
            # still in the graph with zero gradients, as in the compiled backends, so that a
            # loss over them can call backward
            leaves = [*params.values(), *xs, *contexts, *states0]
            link = sum(v.reshape(-1)[:0].sum() for v in leaves if v.requires_grad)
            if isinstance(link, torch.Tensor):
                stacked = [v + link.to(v.dtype) if v.is_floating_point() else v for v in stacked]
                states = [v + link.to(v.dtype) for v in states]
        # the final states are the caller's to change in place: not tensors autograd saved
        # (traced, always copied: torch.jit.trace checks its graph by a second run without
        # gradients, which must record the same ops)
        states = [v.clone() if v.requires_grad or torch.jit.is_tracing() else v for v in states]
        return stacked, states

    # -- argument checks ------------------------------------------------------------------------
    def _where(self) -> str:
        """How errors name this module: its class and cell, or the layer that runs it (sg.nn.LSTM)."""
        return getattr(self, "_shown_as", None) or f"{type(self).__name__}({self.cell.name or 'cell'})"

    def _check_inputs(self, x) -> list[torch.Tensor]:
        n = len(self.cell.inputs)
        if isinstance(x, PackedSequence):  # (the message names the module: built only for a refusal)
            refuse_packed(x, self._where())
        if isinstance(x, torch.Tensor):
            x = (x,)
        elif not isinstance(x, (tuple, list)) or not all(isinstance(v, torch.Tensor) for v in x):
            got = type(x).__name__ if not isinstance(x, (tuple, list)) else \
                f"a {type(x).__name__} of " + ", ".join(type(v).__name__ for v in x)
            raise InputError(f"{self._where()}: x must be a tensor or a tuple of {n} tensors, got {got}")
        if len(x) != n:
            names = [i.name for i in self.cell.inputs]
            # Torch7's Sequencer took a table of steps: alike tensors with no time dim
            per_step = n == 1 and len({(v.shape, v.dtype) for v in x}) == 1 \
                and x[0].dim() == 1 + len(self.cell.inputs[0].shape)
            hint = ("a list of one tensor per step? stack them into one: torch.stack(steps)" if per_step
                    else "pass one tensor per input, in order")
            raise InputError(f"{self._where()}: the cell has {n} input{'s' if n != 1 else ''} {names} "
                             f"but forward got {len(x)} tensors; {hint}")
        xs = []
        layout = "(B, T, " if self.batch_first else "(T, B, "
        ref = None  # (T, B) and the input that gave them
        device = x[0].device
        for node, v in zip(self.cell.inputs, x):
            if v.dim() != 2 + len(node.shape) or tuple(v.shape[2:]) != node.shape:
                expect = layout + ", ".join(map(str, node.shape)) + ")" if node.shape else layout[:-2] + ")"
                # a (B, *size) tensor for a (T, B, *size) input: one the same at every step?
                hint = ("; a tensor that is the same at every step (an encoder's memory) is an sg.Context, "
                        "passed with context=" if v.dim() == 1 + len(node.shape) and tuple(v.shape[1:]) == node.shape
                        else "")
                raise InputError(f"{self._where()}: input {node.name!r} (declared at {node.site}) expects shape "
                                 f"{expect}, got {_fmt(v.shape)}{hint}")
            self._check_dtype("input", node, v)
            if v.device != device:
                self._check_device("input", node, v, device)
            if self.batch_first:
                v = v.transpose(0, 1)
            lead = tuple(v.shape[:2])
            if ref is not None and lead != ref[0]:
                raise InputError(f"{self._where()}: inputs {ref[1]!r} and {node.name!r} disagree on (T, B): "
                                 f"{ref[0]} and {lead}")
            ref = ref or (lead, node.name)
            xs.append(v)
        return xs

    def _check_ids(self, what: str, leaves, values: list[torch.Tensor]) -> None:
        """Token inputs (or contexts) that an Embedding reads hold ids of its table's rows
        where they are read (padding was zeroed): else an InputError saying where."""
        for node, v in zip(leaves, values):
            if node.dtype != "long" or v.device.type != "cpu":  # (on a GPU the lookup's own check: no extra wait)
                continue
            lead = 2 if what == "input" else 1  # inputs (T, B, ...), time-major here; contexts (B, ...)
            for table, path in self._lookups_of(node):
                num = table.inputs[1].shape[0]
                ids = _picked_ids(v.reshape((-1,) + tuple(v.shape[lead:])), path)
                bad = (ids < 0) | (ids >= num)
                if ids.numel() and bool(bad.any()):
                    first = tuple(bad.nonzero()[0].tolist())
                    row = first[0]
                    at = f"step {row // v.shape[1]} of sequence {row % v.shape[1]}" if what == "input" \
                        else f"sequence {row}"
                    raise InputError(f"{self._where()}: {what} {node.name!r} holds id {int(ids[first])} at {at}, "
                                     f"but {describe(table)} has {num} rows (ids 0 to {num - 1})")

    def _lookups_of(self, node) -> list[tuple]:
        """The cell's embedding lookups whose ids are the token leaf `node`, or picked from it by
        slices (sg.narrow, chunk, split) and reshapes: (lookup, those ops from the leaf on)."""
        found = []
        for n in self.cell.order:
            if n.op != "embedding":
                continue
            path, ids = [], n.inputs[0]
            while ids.op in ("slice", "reshape"):
                path.append(ids)
                ids = ids.inputs[0]
            if ids is node:
                found.append((n, path[::-1]))
        return found

    def _warn_unmarked_padding(self, xs: list[torch.Tensor]) -> None:
        """Once per module: a call without lengths= or mask= whose token input ends, in some
        sequence, with the padding id of an Embedding reading it (Torch7's zero padding, which
        its MaskZero skipped). Here those steps run as real ones, so the outputs and the final
        state are not those of the unpadded sequences."""
        if self.__dict__.get("_warned_padding"):
            return
        for node, v in zip(self.cell.inputs, xs):
            if node.dtype != "long" or v.device.type != "cpu" or v.shape[0] < 2:
                continue
            for pad, path in sorted({(n.attrs["padding_idx"], tuple(path)) for n, path in self._lookups_of(node)
                                     if n.attrs.get("padding_idx") is not None}, key=lambda e: e[0]):
                rows = (_picked_ids(v[-1], path) == pad).reshape(v.shape[1], -1).any(1).nonzero().flatten().tolist()
                if rows:
                    self.__dict__["_warned_padding"] = True
                    warnings.warn(
                        f"{self._where()}: input {node.name!r} holds its embedding's padding id {pad} at the last "
                        f"step of sequence(s) {rows[:5]}{' ...' if len(rows) > 5 else ''}, and the call has no "
                        f"lengths= or mask=, so padded steps run as real steps (they change the outputs and "
                        f"the final state). Pass lengths=(tokens != {pad}).sum(0) or mask= (padding_idx only "
                        f"makes the embedding's row zero; it does not mask steps as Torch7's MaskZero did). "
                        f"Warned once per module.", UserWarning, stacklevel=user_stacklevel())
                    return

    def _check_dtype(self, what: str, node, v: torch.Tensor) -> None:
        """An index leaf takes what torch's embedding takes; a float leaf any floating dtype."""
        if node.dtype == "long" and v.dtype not in _INDEX_DTYPES:
            raise InputError(f"{self._where()}: {what} {node.name!r} (declared at {node.site}) holds integer "
                             f"indices (torch.int64 or torch.int32), got dtype {v.dtype}")
        if node.dtype == "float" and v.dtype not in _FLOATS:
            raise InputError(f"{self._where()}: {what} {node.name!r} (declared at {node.site}) expects a "
                             f"floating-point tensor, got dtype {v.dtype}")

    def _check_device(self, what: str, node, v: torch.Tensor, device: torch.device) -> None:
        if v.device != device:
            raise InputError(f"{self._where()}: {what} {node.name!r} (declared at {node.site}) is on {v.device} "
                             f"but the inputs are on {device}; move it (.to({str(device)!r}))")

    def _float_dtype(self, xs) -> torch.dtype:
        """The one floating dtype of the call: every float input's, which the parameters share.
        Under autocast, the parameters' (float inputs of another dtype are cast to it, as an
        autocast op casts its operands; autocast then picks each op's own dtype)."""
        params = self.param_tensors()  # what this call reads (reading() values too)
        first = next(iter(params.values()), None)
        pdtype = first.dtype if first is not None else None
        if first is not None and xs[0].device != first.device:
            raise InputError(f"{self._where()}: the inputs are on {xs[0].device} but the parameters are on "
                             f"{first.device}; move one of them (e.g. module.to({str(xs[0].device)!r}))")
        self._check_params(params)
        if pdtype is not None and all(autocast_casts(v.dtype, pdtype, v.device) for node, v in zip(self.cell.inputs, xs)
                                      if node.dtype == "float" and v.dtype != pdtype):
            return pdtype  # (every float input has it, or autocast casts it to it)
        seen = None  # (node, dtype) of the first float input
        for node, v in zip(self.cell.inputs, xs):
            if node.dtype != "float":
                continue
            if seen is not None and v.dtype != seen[1]:
                raise InputError(f"{self._where()}: inputs {seen[0].name!r} and {node.name!r} (declared at "
                                 f"{node.site}) have dtypes {seen[1]} and {v.dtype}; give them one dtype")
            if pdtype is not None and v.dtype != pdtype:
                raise InputError(f"{self._where()}: input {node.name!r} has dtype {v.dtype} but the parameters "
                                 f"are {pdtype}; convert one of them (e.g. module.to({v.dtype}))")
            seen = seen or (node, v.dtype)
        return seen[1] if seen else pdtype or torch.get_default_dtype()

    def _check_params(self, params: dict[str, torch.Tensor]) -> None:
        """Every parameter (and learned initial state) has its declared shape and the first
        one's dtype and device: one replaced since the cell was built (tied, loaded, computed
        by a parametrization) could otherwise be read past its end by the C loops. (Every call
        asks: the messages are built only for a refusal.)"""
        if torch.jit.is_tracing():  # (reading a parameter's shape there records it as a constant, which fails)
            return
        learned = self._learned_states()
        values = list(params.values())
        if learned:
            values += [self.init[prev.name] for prev in learned]
        if not values:
            return
        nodes = self.__dict__.get("_checked_nodes")
        if nodes is None:
            nodes = self.__dict__["_checked_nodes"] = list(self.cell.params.values()) + learned
        first = values[0]
        dtype, device = getattr(first, "dtype", None), getattr(first, "device", None)
        for k, (node, v) in enumerate(zip(nodes, values)):
            if not isinstance(v, torch.Tensor) or v.shape != node.shape or v.dtype is not dtype \
                    or v.device != device:
                self._refuse_param(k, nodes, values)

    def _learned_states(self) -> list:
        learned = self.__dict__.get("_learned")
        if learned is None:
            learned = self.__dict__["_learned"] = [prev for prev, _ in self.cell.states
                                                   if prev.attrs.get("init") == "learned"]
        return learned

    def _refuse_param(self, k: int, nodes: list, values: list) -> None:
        """The InputError for values[k], which _check_params found wrong."""
        shown = self.__dict__.get("_param_shown", {})  # an owner's names for them (sg.nn: weight_hh_l0)
        keys = list(self.cell.params)

        def what(i):
            return (f"parameter {shown.get(keys[i], keys[i])!r}" if i < len(keys)
                    else f"learned initial state {nodes[i].name!r}")
        node, v = nodes[k], values[k]
        if not isinstance(v, torch.Tensor):
            raise InputError(f"{self._where()}: {what(k)} (declared at {node.site}) must be a tensor, "
                             f"got {type(v).__name__}")
        if v.shape != node.shape:
            raise InputError(f"{self._where()}: {what(k)} (declared at {node.site}) must have shape "
                             f"{tuple(node.shape)}, got {tuple(v.shape)}")
        odd, common = odd_one_out(values)  # (name the one that differs from the rest, not the first)
        raise InputError(f"{self._where()}: {what(odd)} (declared at {nodes[odd].site}) is {values[odd].dtype} on "
                         f"{values[odd].device} but {what(common)} and the others are {values[common].dtype} on "
                         f"{values[common].device}; give every parameter one dtype and device (module.to(...))")

    def _check_mask(self, lengths, mask, T, B, device):
        if lengths is None and mask is None:  # every step real (the common call: no name to build)
            return None
        return valid_steps(T, B, lengths, mask, self.batch_first, device, self._where())

    def _initial_states(self, state, B, dtype, device) -> list[torch.Tensor]:
        if state is not None and not isinstance(state, (dict, Mapping)):  # (a dict first: no ABC check)
            raise InputError(f"{self._where()}: state must be a dict from state name to tensor (states: "
                             f"{self.cell.state_names}), got {type(state).__name__}")
        state = dict(state or {})
        names = self.cell.state_names
        if any(k not in names for k in state):
            unknown = sorted(set(state) - set(names))
            raise InputError(f"{self._where()}: unknown state name(s) {unknown}; the cell's states are {names}")
        out = []
        for prev, _ in self.cell.states:
            v = state.get(prev.name)
            if v is None:
                if prev.attrs.get("init") == "learned":
                    v = self.init[prev.name].to(dtype).unsqueeze(0).expand(B, *prev.shape)
                else:
                    v = torch.zeros((B,) + prev.shape, dtype=dtype, device=device)
            else:
                if not isinstance(v, torch.Tensor) or v.shape != (B, *prev.shape):
                    raise InputError(f"{self._where()}: state {prev.name!r} (declared at {prev.site}) expects shape "
                                     f"{_fmt((B,) + prev.shape)}, got {_got(v)}")
                if v.dtype != dtype:
                    if not autocast_casts(v.dtype, dtype, device):
                        raise InputError(f"{self._where()}: state {prev.name!r} (declared at {prev.site}) has dtype "
                                         f"{v.dtype} but the inputs are {dtype}; convert it (.to({dtype}))")
                    v = v.to(dtype)  # (autocast casts an op's operands to the dtype it computes in)
                if v.device != device:
                    self._check_device("state", prev, v, device)
            out.append(v)
        return out

    def _check_contexts(self, context, B, dtype, device) -> list[torch.Tensor]:
        nodes = self.cell.contexts
        if not nodes:
            if context is not None:
                raise InputError(f"{self._where()}: context given but the cell declares no sg.Context")
            return []
        if isinstance(context, torch.Tensor):
            if len(nodes) != 1:
                raise InputError(f"{self._where()}: the cell has contexts {[c.name for c in nodes]}; pass a dict by name")
            context = {nodes[0].name: context}
        if not isinstance(context, Mapping):
            raise InputError(f"{self._where()}: the cell needs context {[c.name for c in nodes]} "
                             f"(a dict of (B, *size) tensors), got {type(context).__name__}")
        unknown = sorted(set(context) - {c.name for c in nodes})
        if unknown:
            raise InputError(f"{self._where()}: unknown context name(s) {unknown}; the cell's contexts are "
                             f"{[c.name for c in nodes]}")
        out = []
        for c in nodes:
            if c.name not in context:
                raise InputError(f"{self._where()}: missing context {c.name!r} (declared at {c.site})")
            v = context[c.name]
            if not isinstance(v, torch.Tensor):
                raise InputError(f"{self._where()}: context {c.name!r} (declared at {c.site}) must be a tensor of "
                                 f"shape {_fmt((B,) + c.shape)}, got {type(v).__name__}")
            if tuple(v.shape) != (B,) + c.shape:
                # a memory of another length than the cell declared: padding is the way
                other_length = len(c.shape) >= 1 and v.dim() == 1 + len(c.shape) and v.shape[0] == B \
                    and tuple(v.shape[2:]) == c.shape[1:]
                hint = (f"; its length {c.shape[0]} is fixed when the cell is declared: pad every such tensor "
                        f"to {c.shape[0]} and mask the padding" if other_length else "")
                raise InputError(f"{self._where()}: context {c.name!r} (declared at {c.site}) expects shape "
                                 f"{_fmt((B,) + c.shape)}, got {_fmt(v.shape)}{hint}")
            if not (c.dtype == "float" and v.dtype == torch.bool):  # a bool mask is read as 0/1
                self._check_dtype("context", c, v)
                # as a state's: the call computes in one dtype (autocast picks each op's own)
                if c.dtype == "float" and v.dtype != dtype and not autocast_casts(v.dtype, dtype, device):
                    raise InputError(f"{self._where()}: context {c.name!r} (declared at {c.site}) has dtype "
                                     f"{v.dtype} but this call computes in {dtype} (its inputs' and "
                                     f"parameters' dtype); convert it (.to({dtype}))")
            self._check_device("context", c, v, device)
            out.append(v.to(dtype) if c.dtype == "float" else v)
        return out

    def _sample_noise(self, T, B, dtype, device) -> list[torch.Tensor]:
        out = []
        for n in self.cell.noises:
            p = n.attrs["p"]
            lead = (B,) if n.attrs["per_sequence"] else (T, B)
            if self.training and p > 0:
                out.append(torch.empty(lead + n.shape, dtype=dtype, device=device).bernoulli_(1.0 - p))
            else:
                ones = (1,) if n.attrs["per_sequence"] else (T, 1)
                out.append(torch.full(ones + n.shape, 1.0 - p, dtype=dtype, device=device))
        return out

    def extra_repr(self) -> str:
        return f"cell={self.cell!r}, batch_first={self.batch_first}, remember={self.remember}"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("plan", "source"):  # (asked of the reference: getattr(rec, "plan", None) stays None)
                raise AttributeError(f"{self._where()} runs the reference interpreter and has no {name}(): "
                                     f"sg.compile(module) returns its compiled twin, which has (an sg.nn layer "
                                     f"or cell: backend='auto', or use_backend('auto'))") from None
            raise

    def _repr_svg_(self):  # Jupyter shows the cell's picture inline
        return self.cell._repr_svg_()


def _batch_rows(step: tuple[list, list], rows: int) -> tuple[list, list]:
    """A step's outputs and next states, each with `rows` rows: a value that meets the batch
    only through noise drawn as one row (evaluation mode) comes out with one row, and is the
    same for every row (copied out: a final state is the caller's to change, row by row)."""
    def fit(vs):
        return [v.expand((rows,) + v.shape[1:]).clone() if v.dim() and v.shape[0] == 1 != rows else v for v in vs]
    return fit(step[0]), fit(step[1])


class ParamTree(nn.Module):
    """A level of a cell's parameter tree (`rec.params.ih.weight`): a module that holds
    Parameters and runs nothing; it prints their shapes."""

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {tuple(p.shape)}" for name, p in self._parameters.items() if p is not None)


def register_nested(root: nn.Module, key: str, p: nn.Parameter) -> None:
    """root.<key> = p, making the ParamTree levels on the way (a key such as "gate.weight")."""
    *path, leaf = key.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part) or not isinstance(getattr(mod, part), nn.Module):
            mod.add_module(part, ParamTree())
        mod = getattr(mod, part)
    mod.register_parameter(leaf, p)


def _read_param(root: nn.Module, owner: tuple, leaf: str) -> torch.Tensor:
    """root.<owner...>.<leaf>, through the modules' own dicts where the value lives there."""
    mod = root
    for part in owner:
        mod = mod._modules[part] if part in mod._modules else getattr(mod, part)
    p = mod._parameters.get(leaf)
    return p if p is not None else getattr(mod, leaf)
