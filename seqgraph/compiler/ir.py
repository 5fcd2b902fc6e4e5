"""The graph IR: a `Node` is one value of one step, built from an op and its input nodes.

A node knows its op (a key of the op registry), its inputs, its attributes, its inferred
per-example shape (the batch dimension is implicit and never part of `shape`), whether it
carries a batch dimension at all (parameters and constants do not), its dtype kind
("float" or "long"), an optional user name and the user's creation site. Nodes are
immutable once built, except for `.named()`, which only sets the display name. This module
builds and orders nodes; it must not run them (see interpret.py) nor know any op's math.
"""
from __future__ import annotations

import contextlib
import itertools
import operator
import sys
import threading
from typing import Iterable, Iterator, Sequence

from ..errors import Site, in_package, user_site

_ids = itertools.count()


class _Deriving(threading.local):
    site: Site | None = None  # the site nodes made now take (sites_from), else None


_deriving = _Deriving()


@contextlib.contextmanager
def sites_from(node: "Node") -> Iterator[None]:
    """Nodes made inside the block without a site of their own take `node`'s: a derivative's
    nodes are tagged with the user line of the value they differentiate, not with the line
    that happened to start the compile."""
    before = _deriving.site
    _deriving.site = node.site
    try:
        yield
    finally:
        _deriving.site = before


def default_site() -> Site:
    """The site of a node made now without one: sites_from's, else the user's calling line."""
    return _deriving.site or user_site()


# the sg functions whose names match torch's (a torch function on a node names its sg twin)
_SG_FUNCTIONS = frozenset({"sigmoid", "tanh", "relu", "exp", "log", "sqrt", "abs", "maximum", "minimum", "softmax",
                           "sum", "mean", "matmul", "transpose", "reshape", "unsqueeze", "squeeze", "layer_norm",
                           "dropout", "split", "chunk", "narrow"})


_OPERATOR_UFUNCS = {"add": operator.add, "subtract": operator.sub, "multiply": operator.mul,
                    "true_divide": operator.truediv, "divide": operator.truediv, "power": operator.pow,
                    "matmul": operator.matmul}


def _calling_torch_module() -> str | None:
    """The class name of the torch.nn module whose forward called torch on a node, if one did
    (torch.nn.LayerNorm(4)(x) reaches us through F.layer_norm): looked for among the torch
    frames between this error and the user's code, never beyond it."""
    frame = sys._getframe(1)
    while frame is not None and in_package(frame.f_globals.get("__name__") or "", ("seqgraph",)):
        frame = frame.f_back
    while frame is not None and in_package(frame.f_globals.get("__name__") or "", ("torch",)):
        me = frame.f_locals.get("self")
        if me is not None and in_package(type(me).__module__, ("torch.nn.modules",)):
            return type(me).__name__
        frame = frame.f_back
    return None


def _module_hint(module: str) -> str:
    """What to write instead of torch.nn's module `module` on a node: its sg twin, if any."""
    import seqgraph
    twin = getattr(seqgraph, module, None)
    if isinstance(twin, type):
        return f"here sg.{module}"
    recurrent = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn", "LSTMCell": "lstm", "GRUCell": "gru", "RNNCell": "rnn"}
    if module in recurrent:  # a recurrent module inside a step: its cell, or the layer around the whole model
        return (f"a step is one cell: here sg.cells.{recurrent[module]}(...) builds it (sg.nn.{module} is "
                f"torch.nn's {module} on seqgraph, for tensors)")
    return "see docs/dsl.md for the modules there are"


def _refused_in_torch(what: str, where: str, hint: str) -> str:
    """The message for torch code (`what`: a function, or a torch.nn module) run on a node."""
    return (f"{what} cannot run on {where}, a symbolic value (at {user_site(('torch',))}): build the step with "
            f"seqgraph's own functions and modules; {hint}")


def _hint(name: str) -> str:
    """What to write instead of torch's or numpy's function `name` on a node."""
    hint = {"cat": "sg.concat", "concatenate": "sg.concat", "linear": "sg.Linear", "add": "+", "mul": "*",
            "multiply": "*", "sub": "-", "subtract": "-", "div": "/", "divide": "/", "true_divide": "/",
            "negative": "-x", "absolute": "sg.abs", "matmul": "sg.matmul", "max": "sg.maximum",
            "min": "sg.minimum", "where": "sg.where_mask", "embedding": "sg.Embedding"}.get(name)
    if hint is None and name in _SG_FUNCTIONS:
        hint = f"sg.{name}"
    return f"here {hint}" if hint else "see docs/dsl.md for the ops there are"


class Node:
    __slots__ = ("id", "op", "inputs", "attrs", "shape", "batched", "dtype", "name", "site", "module")

    def __init__(self, op: str, inputs: Sequence["Node"], attrs: dict, shape: tuple, batched: bool,
                 dtype: str = "float", name: str | None = None, site: Site | None = None, module=None):
        self.id = next(_ids)
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = dict(attrs)
        self.shape = tuple(int(s) for s in shape)
        self.batched = bool(batched)
        self.dtype = dtype
        self.name = name
        self.site = site if site is not None else default_site()
        self.module = module  # the sg.Module whose call made this node, if any

    # -- pickling and copying -------------------------------------------------------
    # ids are unique within one process (the passes key their maps by them): a node loaded
    # from a file or copied takes a fresh one, never the id some node built here already has
    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__ if k != "id"}

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple):  # pickled by an older seqgraph: (None, {slot: value})
            state = state[1]
        for k, v in state.items():
            if k != "id":
                object.__setattr__(self, k, v)
        self.id = next(_ids)

    # -- naming -------------------------------------------------------------------
    def named(self, name: str) -> "Node":
        """Give this node a name used in errors, pictures and generated code."""
        self.name = name
        return self

    def display_op(self) -> str:
        if self.module is not None:
            return type(self.module).__name__
        return {"input": "Input", "state": "State", "context": "Context", "param": "Parameter",
                "const": "Constant", "noise": "Noise"}.get(self.op, self.op)

    def label(self) -> str:
        return self.name or f"{self.op}_{self.id}"

    def __repr__(self) -> str:
        b = "B," if self.batched else ""
        return f"<{self.op} {self.label()!r} ({b}{','.join(map(str, self.shape))}) at {self.site}>"

    def __hash__(self) -> int:
        return self.id

    def __eq__(self, other) -> bool:  # identity between nodes; `==` on values is not an op in the DSL
        if isinstance(other, Node):
            return self is other
        raise self._symbolic("==")

    def __ne__(self, other) -> bool:
        if isinstance(other, Node):
            return self is not other
        raise self._symbolic("!=")

    def _called(self) -> str:
        """How a message about misusing this node names it: `node 'h' (declared at f.py:3)`, or
        for a node the user did not name `the unnamed add node (declared at f.py:3)` (never an
        internal label such as add_22, which the user never saw)."""
        what = f"node {self.name!r}" if self.name else f"the unnamed {self.display_op()} node"
        return f"{what} (declared at {self.site})"

    def _symbolic(self, what: str) -> TypeError:
        return TypeError(f"{self._called()} is a symbolic value: {what} cannot see "
                         f"what it will hold at run time (at {user_site()}); use sg.where_mask, sg.maximum, "
                         "sg.minimum or sg.relu to compute with comparisons, and `is` to test identity")

    def __lt__(self, other):
        raise self._symbolic("<")

    def __le__(self, other):
        raise self._symbolic("<=")

    def __gt__(self, other):
        raise self._symbolic(">")

    def __ge__(self, other):
        raise self._symbolic(">=")

    def __len__(self) -> int:
        raise TypeError(f"{self._called()} is one symbolic value, not a sequence "
                        f"(len at {user_site()}); its per-example shape is node.shape")

    def __getitem__(self, key):
        raise TypeError(f"{self._called()} cannot be indexed (at {user_site()}); "
                        "use sg.narrow(node, dim, start, length), sg.chunk or sg.split to take parts of it")

    # numpy and torch functions cannot run on a symbolic value: they say so, naming the sg
    # function to use, instead of building object arrays or failing deep inside torch
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method == "__call__" and ufunc.__name__ in _OPERATOR_UFUNCS and len(inputs) == 2 and not kwargs \
                and not any(type(i).__name__ == "ndarray" for i in inputs):
            # np.float64(0.5) * h: numpy's scalar asks us; the Python operator on its value does it
            a, b = (i if isinstance(i, Node) or not hasattr(i, "item") else i.item() for i in inputs)
            return _OPERATOR_UFUNCS[ufunc.__name__](a, b)
        if any(type(i).__name__ == "ndarray" for i in inputs):  # np.ones(4) * h
            raise TypeError(f"expected a seqgraph node or a Python number, got ndarray (at {user_site(('numpy',))}): "
                            "an array is not part of a step's graph; use sg.Parameter for a trained one, "
                            "sg.Context for one given with each call, or a Python number")
        name = "sum" if (ufunc.__name__, method) == ("add", "reduce") else ufunc.__name__
        raise TypeError(f"numpy's {name} cannot run on {self._called()}, a "
                        f"symbolic value (at {user_site(('numpy',))}): build the step with seqgraph's own "
                        f"functions; {_hint(name)}")

    def __array__(self, *args, **kwargs):
        raise TypeError(f"{self._called()} is symbolic; numpy cannot compute with "
                        f"it (at {user_site()}): use the sg functions (sg.sum, sg.tanh, sg.maximum, ...)")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func)).strip("_")
        node = next((a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, Node)), None)
        where = f"{node._called()}" if node is not None else "a seqgraph node"
        module = _calling_torch_module()
        what, hint = (f"torch.nn.{module}", _module_hint(module)) if module else (f"torch's {name}", _hint(name))
        raise TypeError(_refused_in_torch(what, where, hint))

    def __getattr__(self, name: str):
        # called only for a name the node does not have: a tensor's method (x.dim() inside a
        # torch module called on a node) says what a node is instead of a bare AttributeError
        import torch
        if name.startswith("__") or name in Node.__slots__ or not hasattr(torch.Tensor, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        module = _calling_torch_module()
        if module is not None:
            raise AttributeError(_refused_in_torch(f"torch.nn.{module}", self._called(), _module_hint(module)))
        hint = {"view": "here sg.reshape", "unsqueeze": "here sg.unsqueeze",
                "size": "here node.shape: its shape per example, without the batch dimension (node.shape[-1] "
                        "is its number of features, node.elements its number of elements)",
                "dim": "here len(node.shape): its number of dimensions per example, without the batch",
                "numel": "here node.elements: its number of elements per example"}.get(name) or _hint(name)
        raise AttributeError(f"{self._called()} is a symbolic value, not a tensor, "
                             f"and has no method {name!r} (at {user_site(('torch',))}): torch modules and tensor "
                             f"methods cannot run on a node; build the step with seqgraph's functions and "
                             f"modules, {hint}")

    def __bool__(self) -> bool:
        raise TypeError(f"{self._called()} is a symbolic value: Python's if, and, "
                        "or and not cannot see what it will hold at run time; use sg.where_mask, sg.maximum "
                        "or sg.minimum to choose between values, and `is None` to test for a missing node")

    def __iter__(self):
        raise TypeError(f"{self._called()} is one symbolic value and cannot be iterated; "
                        "use sg.chunk(node, n) or sg.split(node, sizes) to take it apart")

    @property
    def elements(self) -> int:
        """The number of elements per example (the product of `shape`)."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    # operator overloading is attached by seqgraph.dsl (which knows the ops)


LEAF_OPS = frozenset({"input", "state", "context", "param", "const", "noise"})


def topo_order(outputs: Iterable[Node], stop: set[int] = frozenset()) -> list[Node]:
    """All nodes that `outputs` depend on, each after its inputs (deterministic order). The walk
    does not go through the nodes whose ids are in `stop` (they are listed, as leaves)."""
    order: list[Node] = []
    seen: set[int] = set()
    for root in outputs:
        if root.id in seen:
            continue
        stack = [(root, iter(() if root.id in stop else root.inputs))]
        seen.add(root.id)
        while stack:
            node, it = stack[-1]
            child = next(it, None)
            if child is None:
                stack.pop()
                order.append(node)
            elif child.id not in seen:
                seen.add(child.id)
                stack.append((child, iter(() if child.id in stop else child.inputs)))
    return order


def consumers(order: Sequence[Node]) -> dict[int, list[Node]]:
    """Map node id -> the nodes (in `order`) that read it."""
    users: dict[int, list[Node]] = {n.id: [] for n in order}
    for n in order:
        for i in n.inputs:
            users.setdefault(i.id, []).append(n)
    return users


def format_graph(order: Sequence[Node]) -> str:
    """One line per node: `%12 = sigmoid(%10) : (B,64) float  # gate_i @ cell.py:7` (for debug dumps)."""
    lines = []
    for n in order:
        args = ", ".join(f"%{i.id}" for i in n.inputs)
        attrs = {k: v for k, v in n.attrs.items() if k not in ("init", "group", "shape", "batched", "dtype")}
        a = f" {attrs}" if attrs else ""
        b = "B," if n.batched else ""
        nm = f"{n.name} " if n.name else ""
        lines.append(f"%{n.id} = {n.op}({args}){a} : ({b}{','.join(map(str, n.shape))}) {n.dtype}  # {nm}@ {n.site}")
    return "\n".join(lines)
