"""The cell DSL: leaves, functions, operators and nngraph-style modules that build nodes.

Modules (`sg.Linear(I, H)(x)`), functions (`sg.tanh(x)`, `sg.concat([x, h])`) and Python
operators on nodes (`a + b`, `1 - z`, `-a`, `abs(a)`) build nodes of the op registry; Python,
numpy and torch used on a node where they cannot work raise a TypeError naming what to use. A module object owns
parameter leaves, so calling it twice shares its weights. Nothing here runs a tensor: this
module only builds graphs and must not run them (seqgraph.compiler.interpret does).
"""
from __future__ import annotations

import builtins
import functools
import math
import numbers
import operator
from typing import Callable, Sequence

import torch

from .compiler import ops
from .compiler.ir import Node
from .compiler.ops import lift, make
from .errors import ShapeError, mention, user_site

Size = int | Sequence[int]
Operand = Node | float  # a node, or a Python number that becomes a constant


def _count(v, what: str) -> int:
    """v as a positive int: Python's or numpy's integers, not a bool, a float or a string; the
    ValueError names `what` (e.g. "Linear (declared at cell.py:3): in_features")."""
    if not isinstance(v, bool):
        try:
            n = operator.index(v)
        except TypeError:
            n = 0
        if n >= 1:
            return n
    raise ValueError(f"{what} must be a positive int, got {v!r}")


def _index(v, what: str) -> int:
    """v as an int (a dim or a position): a float or a bool is a TypeError naming `what` and the
    user's line, not a failure at run time."""
    if not isinstance(v, bool):
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise TypeError(f"{what} (at {user_site()}) must be an int, got {v!r}")


def _shape(size: Size, what: str) -> tuple:
    if isinstance(size, bool):
        raise TypeError(f"{what} (at {user_site()}): size must be an int or a tuple of ints, got {size!r}")
    try:  # one int, numpy's too
        size = (operator.index(size),)
    except TypeError:
        pass
    try:
        if any(isinstance(s, bool) for s in size):
            raise TypeError
        shape = tuple(operator.index(s) for s in size)
    except TypeError:
        raise TypeError(f"{what} (at {user_site()}): size must be an int or a tuple of ints, got {size!r}") from None
    if any(s <= 0 for s in shape):
        raise ValueError(f"{what} (at {user_site()}): sizes must be positive, got {shape}")
    return shape


def _real_number(x) -> float | None:
    """x as a float when it is a Python or numpy number or a one-element tensor; None for a
    bool, a string or anything else."""
    try:
        return None if isinstance(x, (bool, str)) else float(x)
    except (TypeError, ValueError, RuntimeError):
        return None


def probability(p, who: str, what: str = "the probability p") -> float:
    """p as a float in [0, 1): a Python or numpy number, or a one-element tensor; not a bool or a
    string. The ValueError names `who`, `what` and the user's line."""
    value = _real_number(p)
    if value is None or not 0.0 <= value < 1.0:
        raise ValueError(f"{who} (at {user_site()}): {what} must be a number in [0, 1), got {p!r}")
    return value


def _epsilon(eps, who: str) -> float:
    """eps as a float >= 0; the ValueError names `who` and the user's line (torch's habit
    F.layer_norm(x, normalized_shape) puts a shape where eps goes)."""
    value = _real_number(eps)
    if value is None or not 0.0 <= value < float("inf"):
        raise ValueError(f"{who} (at {user_site()}): eps must be a number >= 0, got {eps!r} (the size "
                         f"normalised is the last dim of the node, not an argument)")
    return value


def _no_size(size) -> bool:
    """Whether `size` is the empty tuple (an Input or Context of one value per example)."""
    return isinstance(size, tuple) and size == ()


# ---------------------------------------------------------------------------------------
# leaves
# ---------------------------------------------------------------------------------------
def Input(size: Size = (), name: str | None = None, dtype: str = "float") -> Node:
    """A per-step input: at run time a (T, B, *size) tensor (integer tokens: dtype="long")."""
    if dtype not in ("float", "long"):
        raise ValueError(f"Input dtype must be 'float' or 'long', got {dtype!r}")
    shape = () if _no_size(size) else _shape(size, "Input")
    return make("input", (), name=name, shape=shape, batched=True, dtype=dtype)


def State(size: Size, name: str | None = None, init: str = "zeros") -> Node:
    """The value of a state at the previous step; its next value is given in `sg.Cell(states=)`.
    init: "zeros" or "learned" (a trained initial value shared by every sequence)."""
    if not isinstance(init, str) or init not in ("zeros", "learned"):
        raise ValueError(f"State init must be 'zeros' or 'learned', got {init!r}")
    return make("state", (), name=name, shape=_shape(size, "State"), batched=True, init=init)


def Context(size: Size = (), name: str | None = None, dtype: str = "float") -> Node:
    """An input that is the same at every step, given once per call as (B, *size) (no size:
    one value per sequence, e.g. a class id with dtype="long")."""
    if dtype not in ("float", "long"):
        raise ValueError(f"Context dtype must be 'float' or 'long', got {dtype!r}")
    shape = () if _no_size(size) else _shape(size, "Context")
    return make("context", (), name=name, shape=shape, batched=True, dtype=dtype)


# initialisers are module-level functions (bound with partial), so a module pickles
def _fill_uniform(low: float, high: float, t: torch.Tensor) -> torch.Tensor:
    return t.uniform_(low, high)


def _fill_value(value: float, t: torch.Tensor) -> torch.Tensor:
    return t.fill_(value)


def _fill_normal(t: torch.Tensor) -> torch.Tensor:
    return t.normal_()


def _fill_normal_but_row(row: int, t: torch.Tensor) -> torch.Tensor:
    """Normal values, with row `row` zero (torch.nn.Embedding's padding row)."""
    t.normal_()
    t[row].zero_()
    return t


def _uniform(bound: float, low: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fills uniformly in [-bound, bound), or in [low, bound) when low is given."""
    return functools.partial(_fill_uniform, -bound if low is None else low, bound)


def Parameter(size: Size, name: str | None = None, init: Callable | str | float | torch.Tensor = "uniform") -> Node:
    """A free trainable tensor (no batch dim) such as peephole weights. `init`: "zeros",
    "ones", "uniform" (±1/sqrt(last dim)), a number, a tensor of this shape (copied), or a
    function that fills the tensor it is given in place or returns the values."""
    shape = _shape(size, "Parameter")
    return make("param", (), name=name, shape=shape, batched=False, init=_init_fn(init, shape))


def _call_init(fn: Callable, t: torch.Tensor) -> torch.Tensor:
    """fn(t), taking what it returns when that is not t itself (torch.ones_like, say)."""
    out = fn(t)
    if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
        if tuple(out.shape) != tuple(t.shape):
            raise ValueError(f"the init function {getattr(fn, '__name__', fn)!r} returned a tensor of shape "
                             f"{tuple(out.shape)} for a parameter of shape {tuple(t.shape)}")
        t.copy_(out)
    return t


def _copy_values(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t.copy_(values)


def _init_fn(init, shape):
    accepted = (f"an init is \"zeros\", \"ones\", \"uniform\", a number, a tensor or array of shape {shape} or a "
                f"function that fills (or returns) a tensor")
    if isinstance(init, Node):
        raise ValueError(f"unknown init {init!r} (at {user_site()}): it fills a tensor once, it is not a node; {accepted}")
    if isinstance(init, str):
        if init in ("zeros", "ones"):
            return functools.partial(_fill_value, 0.0 if init == "zeros" else 1.0)
        if init == "uniform":
            return _uniform(1.0 / math.sqrt(shape[-1] if shape else 1))
    elif isinstance(init, numbers.Real) and not isinstance(init, bool):
        return functools.partial(_fill_value, float(init))
    elif isinstance(init, torch.Tensor) or hasattr(init, "__array__"):  # a tensor, or a numpy array
        values = torch.as_tensor(init).detach().clone()
        if values.dim() == 0:
            return functools.partial(_fill_value, float(values))
        if tuple(values.shape) != tuple(shape):
            raise ValueError(f"init tensor (at {user_site()}) has shape {tuple(values.shape)} but the parameter's is {shape}")
        return functools.partial(_copy_values, values)
    elif callable(init):
        return functools.partial(_call_init, init)
    raise ValueError(f"unknown init {init!r} (at {user_site()}); {accepted}")


def Noise(size: Size, p: float, per_sequence: bool = False, name: str | None = None) -> Node:
    """A keep-mask for dropout-like regularisers: in training each element is 1 with
    probability 1-p, else 0 (one draw per step, or once per sequence with per_sequence=True);
    in evaluation it is the constant 1-p, its expectation."""
    p = probability(p, "Noise")
    return make("noise", (), name=name, shape=_shape(size, "Noise"), batched=True, p=p,
                per_sequence=bool(per_sequence))


# ---------------------------------------------------------------------------------------
# functions
# ---------------------------------------------------------------------------------------
def _node(x, fn: str) -> Node:
    if isinstance(x, Module):
        raise TypeError(f"sg.{fn} got the module {type(x).__name__} where a node was expected; "
                        f"did you forget to call it on a node, e.g. {type(x).__name__}(...)(x)?")
    return lift(x)


def _unary(op):
    def f(a: Operand, name: str | None = None) -> Node:
        return make(op, (_node(a, op),), name=name)
    f.__name__ = op
    f.__doc__ = f"Elementwise {op}."
    return f


sigmoid, tanh, relu, exp, log, sqrt = (_unary(o) for o in ("sigmoid", "tanh", "relu", "exp", "log", "sqrt"))
abs = _unary("abs")  # noqa: A001 - mirrors torch.abs
sign = _unary("sign")
sign.__doc__ = "Elementwise sign: -1, 0 or 1 (0 at nan, as torch.sign); its derivative is 0."


def stop_gradient(a: Node, name: str | None = None) -> Node:
    """The value of `a`, through which no gradient flows (torch's detach); e.g. the shift of a
    numerically stable softmax, whose gradient is zero anyway."""
    return make("stop_gradient", (_node(a, "stop_gradient"),), name=name)


def maximum(a: Operand, b: Operand, name: str | None = None) -> Node:
    """The elementwise maximum (torch.maximum; nan wins); at a tie the gradient splits evenly."""
    return make("maximum", (_node(a, "maximum"), _node(b, "maximum")), name=name)


def minimum(a: Operand, b: Operand, name: str | None = None) -> Node:
    """The elementwise minimum (torch.minimum; nan wins); at a tie the gradient splits evenly."""
    return make("minimum", (_node(a, "minimum"), _node(b, "minimum")), name=name)


def concat(nodes: Sequence[Node], dim: int = -1, name: str | None = None) -> Node:
    """The nodes side by side along `dim`, a per-example dim (the batch is never counted:
    -1, the last, is the feature dim), e.g. sg.concat([x, h])."""
    if isinstance(nodes, (Node, set, frozenset, dict, str)) or not hasattr(nodes, "__iter__"):
        why = " (a set has no order: the features would come in any order)" if isinstance(nodes, (set, frozenset)) else ""
        raise TypeError(f"sg.concat takes a list of nodes, e.g. sg.concat([x, h]), got {type(nodes).__name__}"
                        f"{why} (at {user_site()})")
    nodes = list(nodes)  # a generator, map or dict.values() in its order
    for k, n in enumerate(nodes):
        if isinstance(n, numbers.Number) and not isinstance(n, bool):
            raise TypeError(f"sg.concat (at {user_site()}): operand {k} is the number {n!r}, which has no features "
                            f"to put side by side; concatenate nodes (a constant vector: sg.Parameter with a "
                            f"fixed init, or x * 0 + {n!r} for one the size of x)")
    return make("concat", tuple(_node(n, "concat") for n in nodes), name=name, dim=_index(dim, "sg.concat: dim"))


class _ChunkGroup:
    """The pieces of one chunk/split call; the checker reports pieces left unused."""

    def __init__(self, site):
        self.site = site
        self.pieces: list[Node] = []


def split(a: Node, sizes: Sequence[int], dim: int = -1) -> tuple[Node, ...]:
    """Cut `a` along `dim` into pieces of the given sizes (which must add up to its size)."""
    a = _node(a, "split")
    if not isinstance(sizes, (list, tuple)):
        raise TypeError(f"sg.split (at {user_site()}) takes a list of piece sizes, e.g. sg.split(h, [2, 6]), got "
                        f"{sizes!r}; for n equal pieces use sg.chunk(h, n)")
    sizes = [_index(v, "sg.split: a piece size") for v in sizes]
    d = ops.norm_dim_or_raise(_index(dim, "sg.split: dim"), len(a.shape), "split")
    if any(s <= 0 for s in sizes):
        raise ShapeError(f"split (declared at {user_site()}): sizes {list(sizes)} include a piece of size "
                         f"{min(sizes)}; every piece needs a positive size")
    if builtins.sum(sizes) != a.shape[d]:
        raise ShapeError(f"split (declared at {user_site()}): sizes {list(sizes)} do not add up to "
                         f"{a.shape[d]}, the size of dim {dim} of {mention(a)}")
    group = _ChunkGroup(user_site())
    start = 0
    for k, s in enumerate(sizes):
        piece = make("slice", (a,), dim=d, start=start, stop=start + s, group=group, piece=k)
        group.pieces.append(piece)
        start += s
    return tuple(group.pieces)


def chunk(a: Node, n: int, dim: int = -1) -> tuple[Node, ...]:
    """Cut `a` into `n` equal pieces along `dim` (like torch.chunk, but the size must divide)."""
    a = _node(a, "chunk")
    try:
        n = _count(n, f"chunk (declared at {user_site()}): the number of pieces")
    except ValueError as e:
        raise ShapeError(str(e)) from None
    d = ops.norm_dim_or_raise(_index(dim, "sg.chunk: dim"), len(a.shape), "chunk")
    if a.shape[d] % n:
        raise ShapeError(f"chunk (declared at {user_site()}): {mention(a)} has size {a.shape[d]} "
                         f"along dim {dim}, which does not divide into {n} equal pieces")
    return split(a, [a.shape[d] // n] * n, dim=dim)


def narrow(a: Node, dim: int, start: int, length: int, name: str | None = None) -> Node:
    """The part [start, start+length) of `a` along `dim` (the rest may be left unused)."""
    dim, start, length = (_index(v, f"sg.narrow: {w}") for v, w in ((dim, "dim"), (start, "start"), (length, "length")))
    return make("slice", (_node(a, "narrow"),), name=name, dim=dim, start=start, stop=start + length)


def softmax(a: Node, dim: int = -1, name: str | None = None) -> Node:
    """Softmax along `dim`, a per-example dim (the batch is never counted)."""
    return make("softmax", (_node(a, "softmax"),), name=name, dim=_index(dim, "sg.softmax: dim"))


def layer_norm(a: Node, eps: float = 1e-5, name: str | None = None) -> Node:
    """Normalise the last dim to zero mean and unit variance (use sg.LayerNorm for a gain and bias)."""
    return make("layer_norm", (_node(a, "layer_norm"),), name=name, eps=_epsilon(eps, "sg.layer_norm"))


def sum(a: Node, dim: int = -1, keepdim: bool = False, name: str | None = None) -> Node:  # noqa: A001
    """The sum along `dim`, a per-example dim (one value per example: the batch is never summed)."""
    return make("sum", (_node(a, "sum"),), name=name, dim=_index(dim, "sg.sum: dim"), keepdim=bool(keepdim))


def mean(a: Node, dim: int = -1, keepdim: bool = False, name: str | None = None) -> Node:
    """The mean along `dim`, a per-example dim (the batch is never averaged over)."""
    return make("mean", (_node(a, "mean"),), name=name, dim=_index(dim, "sg.mean: dim"), keepdim=bool(keepdim))


def matmul(a: Node, b: Node, name: str | None = None) -> Node:
    """Batched matrix product over the last two per-example dims (both operands carry the batch,
    or one is a parameter): (S, D) @ (D, 1) -> (S, 1) for every sequence of the batch."""
    return make("matmul", (_node(a, "matmul"), _node(b, "matmul")), name=name)


def transpose(a: Node, d0: int = -2, d1: int = -1, name: str | None = None) -> Node:
    """Swap per-example dims d0 and d1 (the batch stays first)."""
    node = ops.transpose(_node(a, "transpose"), _index(d0, "sg.transpose: d0"), _index(d1, "sg.transpose: d1"))
    node.name = name
    return node


def reshape(a: Node, shape: Sequence[int], name: str | None = None) -> Node:
    """A new per-example shape with the same number of elements (the batch dim stays)."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__") or getattr(shape, "ndim", 1) != 1:
        raise TypeError(f"sg.reshape (at {user_site()}) takes the new per-example shape as a tuple of ints, "
                        f"e.g. sg.reshape(x, (2, 4)), got {shape!r}")
    return make("reshape", (_node(a, "reshape"),), name=name, shape=tuple(_index(v, "sg.reshape: a size") for v in shape))


def unsqueeze(a: Node, dim: int, name: str | None = None) -> Node:
    """A new per-example dim of size 1 at `dim`."""
    a = _node(a, "unsqueeze")
    shape = list(a.shape)
    dim, rank = _index(dim, "sg.unsqueeze: dim"), len(shape)
    if not -rank - 1 <= dim <= rank:
        raise ShapeError(f"unsqueeze (declared at {user_site()}): dim {dim} is out of range for a value with "
                         f"{rank} per-example dim{'' if rank == 1 else 's'} (the new dim goes at {-rank - 1} to {rank})")
    d = dim % (rank + 1)
    shape.insert(d, 1)
    return make("reshape", (a,), name=name, shape=tuple(shape))


def squeeze(a: Node, dim: int, name: str | None = None) -> Node:
    """Drop the per-example dim `dim`, which must have size 1."""
    a = _node(a, "squeeze")
    d = ops.norm_dim_or_raise(_index(dim, "sg.squeeze: dim"), len(a.shape), "squeeze")
    if a.shape[d] != 1:
        raise ShapeError(f"squeeze (declared at {user_site()}): dim {dim} of {mention(a)} has size {a.shape[d]}, not 1")
    return make("reshape", (a,), name=name, shape=a.shape[:d] + a.shape[d + 1:])


def dropout(a: Node, p: float, per_sequence: bool = False, name: str | None = None) -> Node:
    """Inverted dropout: zero each element with probability p in training (a new mask each
    step, or one mask per sequence with per_sequence=True, as in Gal's Bayesian RNNs); the
    identity in evaluation."""
    a = _node(a, "dropout")
    p = probability(p, "sg.dropout", "p, the probability of zeroing an element,")
    if p == 0:
        return a
    keep = Noise(a.shape, p, per_sequence=per_sequence)
    return make("mul", (a, make("mul", (keep, ops.const(1.0 / (1.0 - p))))), name=name)


def where_mask(mask: Node, a: Operand, b: Operand, name: str | None = None) -> Node:
    """mask * a + (1 - mask) * b for a 0/1 (or probability) mask: zoneout's blend."""
    mask, a, b = _node(mask, "where_mask"), lift(a), lift(b)
    try:
        ops.broadcast_shapes(ops.broadcast_shapes(mask.shape, a.shape), b.shape)
    except ops.ShapeProblem:
        err = ShapeError(f"where_mask (declared at {user_site()}): the mask, a and b must broadcast together; got "
                         f"mask {mention(mask)} {mask.shape}, a {mention(a)} {a.shape}, b {mention(b)} {b.shape}",
                         node=mask)
        ops._attach_picture(err)
        raise err from None
    out = mask * a + (1.0 - mask) * b
    out.name = name
    return out


# ---------------------------------------------------------------------------------------
# operators on nodes
# ---------------------------------------------------------------------------------------
def _binop(op, swap=False):
    def f(self, other):
        if isinstance(other, Module):
            raise other._not_a_node()
        other = lift(other)  # a tensor, array or list: a TypeError saying what to use instead
        return make(op, (other, self) if swap else (self, other))
    return f


Node.__add__, Node.__radd__ = _binop("add"), _binop("add", swap=True)
Node.__sub__, Node.__rsub__ = _binop("sub"), _binop("sub", swap=True)
Node.__mul__, Node.__rmul__ = _binop("mul"), _binop("mul", swap=True)
Node.__truediv__, Node.__rtruediv__ = _binop("div"), _binop("div", swap=True)
Node.__matmul__ = _binop("matmul")
Node.__neg__ = lambda self: make("neg", (self,))
Node.__abs__ = lambda self: make("abs", (self,))


def _no_pow(self, other, *_):
    raise TypeError(f"{self._called()}: ** is not an op of the DSL (at {user_site()}); "
                    "write h * h for a square, sg.sqrt(h) for a root, sg.exp(p * sg.log(h)) for other powers")


Node.__pow__ = Node.__rpow__ = _no_pow


# ---------------------------------------------------------------------------------------
# nngraph-style modules: construct, then call on a node (or a list of nodes)
# ---------------------------------------------------------------------------------------
class Module:
    """A callable that builds nodes. Parameters are created once, in the constructor, so a
    module called twice shares them (that is how weights are tied)."""

    def __init__(self, name: str | None = None):
        self.name = name
        self.site = user_site()

    def _param(self, pname: str, shape: tuple, init) -> Node:
        return make("param", (), name=pname, module=self, site=self.site, shape=shape, batched=False,
                    init=_init_fn(init, shape), pname=pname)

    def _failed(self, op: str, inputs: tuple) -> Node:
        """The node this module could not build (ops.failed_node), named and placed as its own."""
        return ops.failed_node(op, inputs, name=self.name, site=self.site, module=self)

    def params(self) -> dict[str, Node]:
        return {k: v for k, v in vars(self).items() if isinstance(v, Node) and v.op == "param"}

    def __call__(self, *args):
        name = type(self).__name__
        if not args:
            raise TypeError(f"{name} (declared at {self.site}) was called with no node (at {user_site()}); "
                            f"nngraph's {name}()() input idiom is sg.Input(size, name=...) here")
        if len(args) > 1:
            raise TypeError(f"{name} (declared at {self.site}) takes one node, or one list of nodes for a table "
                            f"module, but got {len(args)} arguments (at {user_site()}); pass a list, e.g. "
                            f"sg.Concat()([x, h]), or concat first: sg.Linear(...)(sg.concat([x, h]))")
        (x,) = args
        if isinstance(x, Module):
            raise TypeError(f"{type(self).__name__} (declared at {self.site}) was called on the module "
                            f"{type(x).__name__}, not on a node; did you forget a second set of parentheses, "
                            f"e.g. {type(x).__name__}(...)(x)?")
        out = self.forward(x)
        return out

    def forward(self, x):  # pragma: no cover - every module defines it
        raise NotImplementedError(type(self).__name__)

    def __repr__(self) -> str:
        args = [a for a in (self.extra_repr(), f"name={self.name!r}" if self.name else "") if a]
        return f"sg.{type(self).__name__}({', '.join(args)})"

    def extra_repr(self) -> str:
        """The constructor's arguments that differ from the defaults, as torch.nn modules print them."""
        return ""

    def _not_a_node(self) -> TypeError:
        name = type(self).__name__
        return TypeError(f"{name} (declared at {self.site}) is a module, not a node; did you forget a second "
                         f"set of parentheses, e.g. {name}(...)(x)?")

    def _arith(self, *args):
        raise self._not_a_node()

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _arith
    __truediv__ = __rtruediv__ = __matmul__ = __rmatmul__ = _arith

    def _make(self, op, inputs, **attrs):
        return make(op, inputs, name=self.name, module=self, site=user_site(), **attrs)


class Linear(Module):
    """y = x W^T + b, with W of shape (out_features, in_features), initialised like torch.nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, name: str | None = None):
        super().__init__(name)
        where = f"Linear (declared at {user_site()})"
        self.in_features = _count(in_features, f"{where}: in_features")
        self.out_features = _count(out_features, f"{where}: out_features")
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = self._param("weight", (self.out_features, self.in_features), _uniform(bound))
        self.bias = self._param("bias", (self.out_features,), _uniform(bound)) if bias else None

    def forward(self, x):
        x = _node(x, "Linear")
        if not x.shape or x.shape[-1] != self.in_features:
            nm = f" '{self.name}'" if self.name else ""
            got = x.shape[-1] if x.shape else "no feature dim"
            hint = ("it holds integer ids: look them up with sg.Embedding(num, dim) first" if x.dtype == "long"
                    else "a Linear has one input size: use another Linear, or concat the inputs first")
            err = ShapeError(f"Linear{nm} (declared at {self.site}), called at {user_site()}, expects "
                             f"{self.in_features} input features but its input {mention(x)} has {got}; {hint}",
                             node=self._failed("linear", (x, self.weight)))
            ops._attach_picture(err)
            raise err
        y = self._make("linear", (x, self.weight))
        return y if self.bias is None else self._make("add", (y, self.bias))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}" + (", bias=False" if self.bias is None else "")


class Embedding(Module):
    """Rows of a (num, dim) table for integer inputs. As in torch.nn.Embedding, the padding_idx
    row starts at zeros and gets no gradient (so it stays the padding vector unless you set
    it), and a negative padding_idx counts from the end."""

    def __init__(self, num: int, dim: int, padding_idx: int | None = None, name: str | None = None):
        super().__init__(name)
        where = f"Embedding (declared at {self.site})"
        self.num, self.dim = _count(num, f"{where}: num"), _count(dim, f"{where}: dim")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) \
                    or not -self.num <= padding_idx < self.num:
                raise ValueError(f"Embedding declared at {self.site}: padding_idx must be an integer in "
                                 f"[-{self.num}, {self.num}) (num = {self.num}), got {padding_idx!r}")
            padding_idx %= self.num
        self.padding_idx = padding_idx
        init = _fill_normal if padding_idx is None else functools.partial(_fill_normal_but_row, padding_idx)
        self.weight = self._param("weight", (self.num, self.dim), init)

    def forward(self, idx):
        return self._make("embedding", (_node(idx, "Embedding"), self.weight), padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num}, {self.dim}" + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


class LayerNorm(Module):
    """layer_norm over the last dim with a learned gain (ones) and bias (zeros)."""

    def __init__(self, size: int, eps: float = 1e-5, affine: bool = True, name: str | None = None):
        super().__init__(name)
        self.size = _count(size, f"LayerNorm (declared at {self.site}): size")
        self.eps = _epsilon(eps, "LayerNorm")
        self.weight = self._param("weight", (self.size,), "ones") if affine else None
        self.bias = self._param("bias", (self.size,), "zeros") if affine else None

    def forward(self, x):
        x = _node(x, "LayerNorm")
        if not x.shape or x.shape[-1] != self.size:
            nm = f" '{self.name}'" if self.name else ""
            err = ShapeError(f"LayerNorm{nm} (declared at {self.site}) normalises {self.size} features but {mention(x)} "
                             f"has {x.shape[-1] if x.shape else 'no feature dim'} (at {user_site()})",
                             node=self._failed("layer_norm", (x,)))
            ops._attach_picture(err)
            raise err
        y = self._make("layer_norm", (x,), eps=self.eps)
        if self.weight is not None:
            y = self._make("add", (self._make("mul", (y, self.weight)), self.bias))
        return y

    def extra_repr(self) -> str:
        return f"{self.size}" + (f", eps={self.eps}" if self.eps != 1e-5 else "") + \
            (", affine=False" if self.weight is None else "")


def _elementwise_module(cls_name: str, op: str):
    def forward(self, x):
        return self._make(op, (_node(x, cls_name),))
    return type(cls_name, (Module,), {"forward": forward, "__doc__": f"nngraph-style {op}."})


Tanh = _elementwise_module("Tanh", "tanh")
Sigmoid = _elementwise_module("Sigmoid", "sigmoid")
ReLU = _elementwise_module("ReLU", "relu")


def _list_of_nodes(xs, who, example: str | None = None):
    if isinstance(xs, Node) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{who} takes a list of nodes, e.g. {example or f'{who}()([a, b])'}, got "
                        f"{type(xs).__name__} (at {user_site()})")
    if not xs:
        raise ShapeError(f"{who} (at {user_site()}) needs at least one operand, got an empty list")
    return [_node(x, who) for x in xs]


class Concat(Module):
    """nngraph's JoinTable: Concat(dim)([a, b]) puts nodes side by side along a per-example dim
    (counted from 0 without the batch; -1, the default, is the feature dim)."""
    def __init__(self, dim: int = -1, name: str | None = None):
        super().__init__(name)
        self.dim = _index(dim, "Concat: dim")

    def forward(self, xs):
        return self._make("concat", tuple(_list_of_nodes(xs, "Concat")), dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" if self.dim != -1 else ""


class CAdd(Module):
    """Sum of a list of nodes (nngraph's CAddTable)."""

    def forward(self, xs):
        xs = _list_of_nodes(xs, "CAdd")
        out = xs[0]
        for x in xs[1:]:
            out = self._make("add", (out, x))
        return out


class CMul(Module):
    """Elementwise product of a list of nodes (nngraph's CMulTable)."""

    def forward(self, xs):
        xs = _list_of_nodes(xs, "CMul")
        out = xs[0]
        for x in xs[1:]:
            out = self._make("mul", (out, x))
        return out


class Identity(Module):
    """Its input, unchanged (inputs of a step are declared with sg.Input, not nn.Identity()())."""
    def forward(self, x):
        return x


class Dropout(Module):
    """sg.dropout as a module: Dropout(p)(x)."""
    def __init__(self, p: float, per_sequence: bool = False, name: str | None = None):
        super().__init__(name)
        self.p, self.per_sequence = p, per_sequence

    def forward(self, x):
        return dropout(x, self.p, per_sequence=self.per_sequence, name=self.name)

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", per_sequence=True" if self.per_sequence else "")
