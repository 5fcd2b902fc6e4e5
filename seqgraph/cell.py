"""`sg.Cell` (one step of a recurrence) and `sg.Graph` (a plain graph, nngraph's gModule).

Building either runs the checker, names unnamed leaves (input_0, state_0, ...) and gives every
parameter a stable key (`<module>.<weight|bias>`, or the Parameter's own name) that becomes its
name in the torch state_dict. A Graph called on nodes inlines a copy of itself, sharing its
parameters. This module describes graphs; it must not run them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .compiler.check import check_cell, check_graph
from .compiler.ir import Node, format_graph
from .compiler.ops import const_key
from .dsl import _ChunkGroup
from .errors import ShapeError, WiringError, describe, user_site


def _as_list(xs, what) -> list:
    if xs is None:
        return []
    if isinstance(xs, Node):
        return [xs]
    if isinstance(xs, (list, tuple)):
        return list(xs)
    raise TypeError(f"{what} must be a node or a list of nodes, got {type(xs).__name__}")


def _name_leaves(order: list[Node]) -> None:
    counters: dict[str, int] = {}
    taken = {n.name for n in order if n.op in ("input", "state", "context", "noise") and n.name}
    for n in order:
        if n.op in ("input", "state", "context", "noise") and not n.name:
            while True:
                k = counters.get(n.op, 0)
                counters[n.op] = k + 1
                cand = f"{n.op}_{k}"
                if cand not in taken:
                    break
            n.name = cand
            taken.add(cand)


def _check_name(name: str, node: Node, what: str, subject: str | None = None, owner=None) -> None:
    """Names become state_dict keys and attribute names: no dots, nothing torch.nn.Module (or
    the container `owner` that holds them) owns."""
    import torch.nn as nn
    owner = owner or nn.Module
    if "." in name or not name or hasattr(owner, name) or name in _module_attributes():
        why = ("contains a '.'" if "." in name else "is empty" if not name
               else f"is taken by torch.nn.{owner.__name__}")
        raise WiringError(f"{what} name {name!r} {why}; choose another name for {subject or describe(node)}", node=node)


def _module_attributes() -> set[str]:
    """What every torch.nn.Module instance sets on itself (`training`, `_parameters`, ...)."""
    import torch.nn as nn
    return set(vars(nn.Module()))


def _param_keys(order: list[Node]) -> dict[str, Node]:
    """Stable, unique state_dict keys for every parameter leaf, in graph order (compiled code
    binds parameters by position): a module's are `<module name>.<its parameter>`, a free
    parameter's its own name. Names the user gave are reserved before any is generated
    (`linear_1` skips a user's `linear_1`). The parameters of a cell or graph inlined with
    `scope=` carry their key (`layer1.ih.weight`, see _scoped_params)."""
    params = [n for n in order if n.op == "param"]
    keyed = [n for n in params if "key" in n.attrs]
    if not keyed:
        return _keys_in_one_scope(order)
    keys = _keys_in_one_scope([n for n in params if "key" not in n.attrs])
    for n in keyed:
        key = n.attrs["key"]
        clash = next((k for k in keys if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
        if clash is not None:
            raise WiringError(f"parameter key {key!r} of {_owner_text(n)} clashes with {clash!r} of "
                              f"{_owner_text(keys[clash])}; give each inlined cell a scope of its own", node=n)
        keys[key] = n
    position = {n.id: k for k, n in enumerate(params)}
    return dict(sorted(keys.items(), key=lambda item: position[item[1].id]))


def _owner_text(param: Node) -> str:
    """`the Linear declared at cell.py:12`: what a parameter belongs to, for an error message."""
    m = param.module
    return f"the {type(m).__name__} declared at {m.site}" if m is not None else describe(param)


def _keys_in_one_scope(order: list[Node]) -> dict[str, Node]:
    modules = list({id(n.module): n for n in order if n.op == "param" and n.module is not None}.values())
    named: dict[str, Node] = {}  # a user-given module name -> a parameter node of that module
    for n in modules:
        m = n.module
        if m.name:
            _check_name(m.name, n, "module", f"the {type(m).__name__} declared at {m.site}")
            if m.name in named:
                raise WiringError(f"two modules are named {m.name!r}: one declared at {named[m.name].module.site} "
                                  f"and one at {m.site}; rename one (two cells inlined into one cell: give each "
                                  f"call its own scope, cell(x, state, scope='layer1'))", node=n)
            named[m.name] = n
    module_names: dict[int, str] = {}
    used = set(named)
    for n in modules:
        m = n.module
        name = m.name
        if not name:
            base = type(m).__name__.lower()
            _check_name(base, n, "module", f"the {type(m).__name__} declared at {m.site}")
            name, k = base, 1
            while name in used:
                name, k = f"{base}_{k}", k + 1
            used.add(name)
        module_names[id(m)] = name
    params: dict[str, Node] = {}
    for n in order:
        if n.op != "param":
            continue
        if n.module is None:
            key = n.name or f"param_{sum(1 for k in params if k.startswith('param_'))}"
            _check_name(key, n, "parameter")
            if key in params and params[key] is not n:
                raise WiringError(f"two parameters are named {key!r}: {describe(params[key])} and {describe(n)}", node=n)
            if key in used:
                m = next(x.module for x in modules if module_names[id(x.module)] == key)
                raise WiringError(f"parameter {key!r} has the name of the {type(m).__name__} declared at {m.site}, "
                                  f"whose parameters are '{key}.*'; rename one of them", node=n)
        else:
            key = f"{module_names[id(n.module)]}.{n.attrs['pname']}"
        params[key] = n
    return params


def _state_pairs(states, site: str) -> list[tuple[Node, Node]]:
    """states= given as a sequence: (State, next value) pairs, or a clear error."""
    pairs = []
    for item in [states] if isinstance(states, Node) or not hasattr(states, "__iter__") else states:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(v, Node) for v in item)):
            shown = describe(item) if isinstance(item, Node) else type(item).__name__
            raise WiringError(f"Cell declared at {site}: states= must be a dict from each sg.State to its next "
                              f"value ({{h: h_next}}) or a list of (state, next value) pairs, got {shown}",
                              node=item if isinstance(item, Node) else None)
        pairs.append(tuple(item))
    return pairs


def _shown_state(state: dict) -> str:
    """`{'h': Node, 'c': Tensor}`: what a call was given, for an error message."""
    return "{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in state.items()) + "}"


def _scoped_params(owner, scope: str | None, site) -> dict[int, Node] | None:
    """The stand-ins of `owner`'s (a Cell's or Graph's) parameters in `scope`, by the id of the
    parameter they stand for: new leaves keyed `<scope>.<key>`, made once per scope and then
    shared by every call with it (None without a scope: the parameters themselves)."""
    if scope is None:
        return None
    if not isinstance(scope, str):
        raise TypeError(f"scope must be a name (a str), got {type(scope).__name__} at {site}")
    _check_name(scope, None, "scope", f"the call at {site}")
    # by key, so a copied or unpickled owner keeps its own (one pickled before scopes has none yet)
    made = owner.__dict__.setdefault("_scopes", {}).setdefault(scope, {})
    for key, n in owner.params.items():
        if key not in made:
            made[key] = Node("param", (), {**n.attrs, "key": f"{scope}.{key}"}, n.shape, False, n.dtype,
                             name=f"{scope}.{key}", site=n.site, module=n.module)  # (its key: names say which)
    return {n.id: made[key] for key, n in owner.params.items()}


def _scoped_name(scope: str | None, name: str | None) -> str | None:
    """A copied node's name in `scope` (`layer1.h_next`), so that errors, pictures and
    generated code tell apart the nodes of two scoped copies of one cell."""
    return f"{scope}.{name}" if scope is not None and name else name


def _inline(order: list[Node], bound: dict[Node, Node], who: str, params: dict[int, Node] | None = None,
            scope: str | None = None) -> dict[int, Node]:
    """Copy `order` with each formal leaf replaced by the node `bound` gives it: {original id:
    copy}. Parameters, constants and contexts are shared, not copied (that is how weights are
    tied), unless `params` maps a parameter to its stand-in; each chunk group gets a group of
    its own. `who` names the call in a shape error; the copies' names are in `scope`."""
    env: dict[int, Node] = {}
    groups: dict[int, _ChunkGroup] = {}  # id of an original chunk group -> this copy's
    for formal, actual in bound.items():
        if actual.shape != formal.shape or actual.dtype != formal.dtype:
            raise ShapeError(f"{who} expects {formal.op} {formal.name!r} of shape {formal.shape} {formal.dtype}, "
                             f"but got {describe(actual)} of shape {actual.shape} {actual.dtype}", node=actual)
        env[formal.id] = actual
    for n in order:
        if n.id in env:
            continue
        if n.op in ("param", "const", "context"):
            env[n.id] = (params or {}).get(n.id, n)
            continue
        ins = tuple(env[i.id] for i in n.inputs)
        batched = any(i.batched for i in ins) if ins else n.batched  # a Noise leaf keeps its own
        attrs = n.attrs
        if "group" in attrs:  # a chunk's pieces form a new group in each copy, for the checker
            old = attrs["group"]
            if id(old) not in groups:
                groups[id(old)] = _ChunkGroup(old.site)
            attrs = {**attrs, "group": groups[id(old)]}
        env[n.id] = Node(n.op, ins, attrs, n.shape, batched, n.dtype, name=_scoped_name(scope, n.name), site=n.site,
                         module=n.module)
        if "group" in attrs:
            attrs["group"].pieces.append(env[n.id])
    for g in groups.values():
        g.pieces.sort(key=lambda piece: piece.attrs["piece"])
    return env


class Cell:
    """One step of a recurrence.

    inputs:   per-step sg.Input nodes, in the order forward() takes them.
    states:   {sg.State node: its next value}.
    outputs:  nodes returned at every step (default: the next values of all states).
    contexts: the sg.Context nodes (default: those the graph uses, in graph order).
    """

    def __init__(self, inputs: Sequence[Node] | Node, states: Mapping[Node, Node] | None = None,
                 outputs: Sequence[Node] | Node | None = None, contexts: Sequence[Node] | None = None,
                 name: str | None = None):
        self.site = user_site()
        self.name = name
        self.inputs = _as_list(inputs, "inputs")
        if states is None:
            pairs = []
        elif isinstance(states, Mapping):
            pairs = list(states.items())
        else:
            pairs = _state_pairs(states, self.site)
        self.states = pairs
        self.outputs = _as_list(outputs, "outputs") if outputs is not None else [n for _, n in pairs]
        if not self.outputs and not pairs:
            raise WiringError(f"Cell declared at {self.site} has no outputs and no states")
        contexts = None if contexts is None else _as_list(contexts, "contexts")
        self.order = check_cell(self.inputs, pairs, self.outputs, contexts)
        _name_leaves(self.order)
        for n in self.order:  # a learned initial state becomes a parameter named after its state
            if n.op == "state" and n.attrs.get("init") == "learned":
                _check_name(n.name, n, "learned State", owner=torch.nn.ParameterDict)
        self.contexts = list(contexts) if contexts is not None else [n for n in self.order if n.op == "context"]
        self.noises = [n for n in self.order if n.op == "noise"]
        self.params = _param_keys(self.order)
        self._scopes: dict[str, dict[str, Node]] = {}  # scope -> parameter key -> its stand-in there

    def __call__(self, x, state: Mapping[str, Node] | None = None, *, scope: str | None = None):
        """Inline one step of this cell into the graph being built (a cell inside a bigger
        cell, as nngraph nested gModules): `outs, next_state = cell(x, {"h": h, "c": c})`.
        x: a node per input (a list when there are several); state: a node per state, by name.
        Returns the outputs (one node, or a tuple) and the next states by name. Without
        `scope` the copy shares this cell's parameters, keyed as in the cell (a cell called
        twice is one set of weights); `scope="layer1"` gives it parameters of its own, keyed
        `layer1.<the cell's key>` (the same scope again shares them)."""
        site = user_site()
        xs = [x] if isinstance(x, Node) else list(x) if isinstance(x, (list, tuple)) else None
        if xs is None or not all(isinstance(v, Node) for v in xs):
            raise TypeError(f"a Cell (declared at {self.site}) is the graph of one step and does not run by itself: "
                            "run it over sequences with sg.Recurrence(cell)(x), or compile it with sg.compile(cell); "
                            "called on nodes, cell(x, state) inlines one step into a bigger cell")
        state = self._state_nodes(state, site)
        if len(xs) != len(self.inputs):
            raise WiringError(f"{self._shown()} (declared at {self.site}) takes {len(self.inputs)} "
                              f"input(s) but was called with {len(xs)} at {site}")
        formals = self.inputs + [prev for prev, _ in self.states]
        env = _inline(self.order, dict(zip(formals, xs + [state[n] for n in self.state_names])),
                      f"{self._shown()} (declared at {self.site}), called at {site},",
                      _scoped_params(self, scope, site), scope)
        outs = tuple(env[o.id] for o in self.outputs)
        return (outs[0] if len(outs) == 1 else outs), {p.name: env[q.id] for p, q in self.states}

    def _state_nodes(self, state, site) -> dict[str, Node]:
        """`state` of a call on nodes: a node for each state, by name."""
        names = self.state_names
        given = dict(state) if isinstance(state, Mapping) else {} if state is None and not names else None
        if given is None or set(given) != set(names) or not all(isinstance(v, Node) for v in given.values()):
            got = _shown_state(given) if given is not None else type(state).__name__
            raise WiringError(f"{self._shown()} (declared at {self.site}), called at {site}, needs a dict with a "
                              f"node for each of its states {names}, by name; got {got}")
        return given

    def _shown(self) -> str:
        return f"Cell {self.name!r}" if self.name else "Cell"

    @property
    def state_names(self) -> list[str]:
        return [p.name for p, _ in self.states]

    def signature(self) -> tuple:
        """A hashable structural description: equal for cells that compile to the same code."""
        index = {n.id: k for k, n in enumerate(self.order)}
        rows = []
        for n in self.order:
            attrs = tuple(sorted((k, const_key(v) if k == "value" else v) for k, v in n.attrs.items()
                                 if k not in ("group", "init", "piece", "key") and not callable(v)))
            rows.append((n.op, tuple(index[i.id] for i in n.inputs), attrs, n.shape, n.batched, n.dtype))
        roles = (tuple(index[x.id] for x in self.inputs),
                 tuple((index[p.id], index[q.id]) for p, q in self.states),
                 tuple(index[o.id] for o in self.outputs),
                 tuple(index[c.id] for c in self.contexts))
        return tuple(rows), roles

    def __repr__(self) -> str:
        def sized(nodes):  # name: per-example shape (as Python writes a tuple)
            return "{" + ", ".join(f"{n.name}: {tuple(n.shape)}" for n in nodes) + "}"
        return (f"<sg.Cell{' ' + self.name if self.name else ''} inputs={sized(self.inputs)} "
                f"states={sized([p for p, _ in self.states])} outputs={len(self.outputs)} nodes={len(self.order)}>")

    def dump(self) -> str:
        """The graph as text, one node per line."""
        return format_graph(self.order)

    def _repr_svg_(self):  # Jupyter shows the picture inline
        from .viz import svg_or_none, to_dot
        return svg_or_none(to_dot(self))


class Graph:
    """A plain graph from inputs to outputs (nngraph's gModule). Calling it on nodes inlines a
    copy whose parameters are shared with the original: `y = g(x)` or `y1, y2 = g([a, b])`."""

    def __init__(self, inputs: Sequence[Node] | Node, outputs: Sequence[Node] | Node, name: str | None = None):
        self.site = user_site()
        self.name = name
        self.inputs = _as_list(inputs, "inputs")
        self.outputs = _as_list(outputs, "outputs")
        self.single_output = isinstance(outputs, Node)
        self.order = check_graph(self.inputs, self.outputs)
        _name_leaves(self.order)
        self.params = _param_keys(self.order)
        self._scopes: dict[str, dict[str, Node]] = {}  # scope -> parameter key -> its stand-in there

    def __call__(self, xs, *, scope: str | None = None):
        """Inline a copy into the graph being built; without `scope` it shares this graph's
        parameters, with `scope="name"` it has its own, keyed `name.<key>`."""
        site = user_site()
        hint = ("to run it on tensors, make it a cell without states and run one step: "
                "sg.Recurrence(sg.Cell(inputs, states={}, outputs=[...]))((x1, x2)) with inputs (1, B, size)")
        if not isinstance(xs, (Node, list, tuple)):
            raise TypeError(f"{self._shown()} (declared at {self.site}) is called on nodes, to build a graph; got a "
                            f"{type(xs).__name__} at {site} ({hint})")
        args = [xs] if isinstance(xs, Node) else list(xs)
        if len(args) != len(self.inputs):
            raise WiringError(f"{self._shown()} (declared at {self.site}) takes {len(self.inputs)} "
                              f"inputs but was called with {len(args)} at {site}")
        if not all(isinstance(a, Node) for a in args):
            bad = next(a for a in args if not isinstance(a, Node))
            raise TypeError(f"{self._shown()} (declared at {self.site}) is called on nodes, to build a graph; got "
                            f"a {type(bad).__name__} among its inputs at {site} ({hint})")
        env = _inline(self.order, dict(zip(self.inputs, args)), f"{self._shown()} (declared at {self.site}), called "
                      f"at {site},", _scoped_params(self, scope, site), scope)
        outs = tuple(env[o.id] for o in self.outputs)
        return outs[0] if self.single_output else outs

    def _shown(self) -> str:
        return f"Graph {self.name}" if self.name else "Graph"

    def __repr__(self) -> str:
        return f"<sg.Graph{' ' + self.name if self.name else ''} inputs={len(self.inputs)} outputs={len(self.outputs)} nodes={len(self.order)}>"

    def _repr_svg_(self):
        from .viz import svg_or_none, to_dot
        return svg_or_none(to_dot(self))
