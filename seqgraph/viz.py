"""Pictures of cells, graphs, unrolled recurrences and failing nodes, as Graphviz DOT.

`to_dot` turns a Cell, Graph, Recurrence, compiled model or a list of nodes into a
`graphviz.Digraph` (its DOT source is always available, no executable needed); `render`
writes it as svg/png/pdf (through Graphviz's `dot`) or as .dot source; `error_dot` and
`attach_error_picture` draw the neighbourhood of the node a GraphError names, in red; `main`
is `python -m seqgraph viz`. `node_style` and `add_node` are the one place a node's look is
decided, so a compiled plan's picture can reuse it. This module only draws: it must not change
a graph, run tensors, or let a picture failure hide the error it was meant to illustrate.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import traceback
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import graphviz

from .compiler.ir import Node, consumers, topo_order
from .compiler.ops import REGISTRY
from .errors import GraphError, Site
from .settings import debug_level

if TYPE_CHECKING:  # for the annotations only: these modules import this one
    from torch import nn

    from .cell import Cell, Graph
Drawable = Union["Cell", "Graph", "nn.Module", Node, Sequence[Node], graphviz.Digraph]

FORMATS = ("svg", "png", "pdf", "dot")
HOPS = 2  # how far an error picture reaches from the failing node
_MAX_LISTED = 8  # lines of a compact picture's parameters node

# One palette, so that every picture (and the legend in docs/pictures.md) agrees.
_INK = "#334155"
_LEAF_LOOK = {
    "input": dict(shape="invhouse", style="filled", fillcolor="#dbeafe", color="#1d4ed8"),
    "context": dict(shape="invhouse", style="filled", fillcolor="#ede9fe", color="#6d28d9"),
    "state": dict(shape="box", style="rounded,filled,bold", fillcolor="#dcfce7", color="#15803d"),
    "noise": dict(shape="hexagon", style="filled", fillcolor="#fef9c3", color="#a16207"),
    "param": dict(shape="cylinder", style="filled", fillcolor="#ffedd5", color="#c2410c"),
    "const": dict(shape="plaintext", fontsize="10", fontcolor=_INK),
}
_KIND_FILL = {"matmul": "#e2e8f0", "gather": "#e2e8f0", "reduction": "#f1f5f9", "layout": "#f8fafc"}
_EDGE_FROM = {"input": "#1d4ed8", "context": "#6d28d9", "state": "#15803d", "noise": "#a16207",
              "param": "#fb923c"}
_NEXT_EDGE = dict(style="dashed", color="#15803d", penwidth="1.6", fontcolor="#15803d", fontsize="9")
_SINK_LOOK = {
    "next": dict(shape="box", style="rounded,dashed,filled", fillcolor="#f0fdf4", color="#15803d"),
    "output": dict(shape="house", style="filled", fillcolor="#dbeafe", color="#1d4ed8"),
    "step": dict(shape="box", style="rounded,filled,bold", fillcolor="#f1f5f9", color=_INK),
}
_ERROR_LOOK = dict(color="red", fillcolor="#fee2e2", fontcolor="#991b1b", penwidth="2.5")
_DEFAULT_ATTRS = {"keepdim": False, "eps": 1e-5}
# attrs that are bookkeeping, not something a reader of the picture needs
_HIDDEN_ATTRS = {"failed", "group", "piece", "init", "shape", "batched", "dtype", "pname", "value", "p", "per_sequence"}


class GraphvizMissing(RuntimeError):
    """Rendering needs Graphviz's `dot` program and it is not installed."""


# ---------------------------------------------------------------------------------------
# text and the look of one node
# ---------------------------------------------------------------------------------------
def _text(*lines: str) -> str:
    """A DOT label from lines of user text: backslashes kept literal, never read as HTML."""
    return graphviz.nohtml("\\n".join(str(s).replace("\\", "\\\\").replace("\n", "\\n").replace("&", "&amp;")
                                      for s in lines if s))


def _shape_text(node: Node) -> str:
    if node.attrs.get("failed"):  # the op a ShapeError stopped from being built
        return "(shape error)"
    dims = (["B"] if node.batched else []) + [str(s) for s in node.shape]
    text = "(" + ",".join(dims) + ")"
    return text + " long" if node.dtype == "long" else text


def _site_text(site: Site | None) -> str:
    """`path:line` of a user's site; relative to the working directory when inside it."""
    if site is None:
        return "unknown site"
    path = site.path
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            path = rel
    except ValueError:  # another drive on Windows
        pass
    where = f"{path}:{site.line}".replace("\\", "/")
    return f"{where} (in {site.function})" if site.function and site.function != "<module>" else where


def _op_detail(node: Node) -> str:
    """The op and the attributes that change what it computes, e.g. `slice [0:16]`."""
    if node.op == "slice":
        a = node.attrs
        dim = "" if a["dim"] == len(node.inputs[0].shape) - 1 else f"dim {a['dim']} "
        return f"slice {dim}[{a['start']}:{a['stop']}]"
    shown = [f"{k}={v}" for k, v in node.attrs.items()
             if k not in _HIDDEN_ATTRS and isinstance(v, (int, float, str, bool, tuple))
             and not (k == "dim" and _is_last_dim(node, v)) and _DEFAULT_ATTRS.get(k, object()) != v]
    text = node.op + (" " + " ".join(shown) if shown else "")
    return text if len(text) <= 40 else text[:39] + "…"


def _is_last_dim(node: Node, dim) -> bool:
    rank = len(node.inputs[0].shape) if node.inputs else len(node.shape)
    return dim == rank - 1


def _param_key(node: Node) -> str:
    if node.module is not None:
        return f"{node.module.name or type(node.module).__name__.lower()}.{node.attrs.get('pname', 'param')}"
    return node.name or f"param_{node.id}"


def node_style(node: Node, key: str | None = None) -> dict:
    """The Graphviz attributes of `node`: label (name, op, shape (B,...)), colours and shape
    by role, and the user's file:line as tooltip. `key` names a parameter as in state_dict
    (cell.params); without it a key is guessed from the parameter's module."""
    site = _site_text(node.site)
    if node.op == "param":
        look = dict(_LEAF_LOOK["param"], label=_text(key or _param_key(node), "Parameter", _shape_text(node)))
    elif node.op == "const":
        look = dict(_LEAF_LOOK["const"], label=_text(f"{node.attrs['value']:g}"))
    elif node.op == "state":
        look = dict(_LEAF_LOOK["state"],
                    label=_text(node.label(), f"State (previous) init={node.attrs.get('init', 'zeros')}",
                                _shape_text(node)))
    elif node.op == "noise":
        per = ", per sequence" if node.attrs.get("per_sequence") else ""
        look = dict(_LEAF_LOOK["noise"], label=_text(node.label(), f"Noise p={node.attrs['p']:g}{per}",
                                                      _shape_text(node)))
    elif node.op in _LEAF_LOOK:
        look = dict(_LEAF_LOOK[node.op], label=_text(node.label(), node.display_op(), _shape_text(node)))
    else:
        op = _op_detail(node)
        if node.module is not None and type(node.module).__name__.lower() != node.op:
            op += f" ({type(node.module).__name__})"
        kind = REGISTRY[node.op].kind if node.op in REGISTRY else ""
        look = dict(shape="box", style="rounded,filled", fillcolor=_KIND_FILL.get(kind, "white"), color=_INK,
                    label=_text(node.name or "", op, _shape_text(node)))
    what = f"Parameter {key or _param_key(node)}" if node.op == "param" else \
        node.display_op() + (f" '{node.name}'" if node.name else "")
    look["tooltip"] = _text(f"{what} at {site}")
    return look


def node_id(node: Node, prefix: str = "") -> str:
    """The DOT identifier of `node` in a picture (a prefix tells unrolled steps apart)."""
    return f"{prefix}n{node.id}"


def add_node(dot: graphviz.Digraph, node: Node, prefix: str = "", key: str | None = None, **attrs) -> str:
    """Add `node` to `dot` with the look of `node_style` (extra `attrs` override it);
    returns its DOT identifier."""
    look = node_style(node, key)
    look.update(attrs)
    name = node_id(node, prefix)
    dot.node(name, **look)
    return name


def _edge_look(src: Node) -> dict:
    color = _EDGE_FROM.get(src.op)
    return {"color": color} if color else {}


def _new_digraph(name: str, **graph_attr) -> graphviz.Digraph:
    # the graph's DOT id is never shown: the user's name, as an identifier DOT always accepts
    ident = re.sub(r"\W", "_", name, flags=re.ASCII)
    dot = graphviz.Digraph(name=ident if ident[:1].isalpha() else f"g_{ident}")
    dot.attr(rankdir="TB", nodesep="0.25", ranksep="0.35", fontname="Helvetica", **graph_attr)
    dot.attr("node", fontname="Helvetica", fontsize="11", margin="0.08,0.04", color=_INK)
    dot.attr("edge", fontname="Helvetica", fontsize="9", color=_INK, arrowsize="0.7")
    return dot


# ---------------------------------------------------------------------------------------
# what a picture holds: the graph's parts, with chunk pieces folded into edges
# ---------------------------------------------------------------------------------------
class _Parts:
    """The nodes and roles of a Cell, Graph or bare list of nodes, in one shape."""

    def __init__(self, order: list[Node], inputs: list[Node], outputs: list[Node],
                 states: list[tuple[Node, Node]], params: dict[str, Node], name: str | None, site: Site | None):
        seen = {n.id for n in order}
        unread = [p for p, _ in states if p.id not in seen]  # a state nothing reads is still carried
        self.order, self.inputs, self.outputs, self.states = unread + order, inputs, outputs, states
        self.keys = {n.id: k for k, n in params.items()}
        self.name, self.site = name, site
        kept = {o.id for o in outputs} | {n.id for _, n in states}
        # a piece of chunk/split reads best as a label on the edge that uses it
        self.folded = {n.id for n in order
                       if n.op == "slice" and "group" in n.attrs and n.name is None and n.id not in kept}

    def visible(self) -> list[Node]:
        return [n for n in self.order if n.id not in self.folded]

    def in_edges(self, node: Node) -> list[tuple[Node, dict]]:
        """(source, edge attrs) for each operand of `node`, reading through folded pieces; the
        operands of an op whose order matters (1 - z, concat) are numbered #1, #2, ..."""
        numbered = len(node.inputs) > 1 and not REGISTRY[node.op].commutative and node.op != "linear"
        out = []
        for k, i in enumerate(node.inputs):
            src, pieces = i, []
            while src.id in self.folded:  # a piece of a piece: "[2:4] of [0:4]"
                pieces.append(_op_detail(src)[len("slice "):])
                src = src.inputs[0]
            label = " ".join(([f"#{k + 1}"] if numbered else []) + ([" of ".join(pieces)] if pieces else []))
            out.append((src, dict(_edge_look(src), label=label) if label else _edge_look(src)))
        return out

    def output_label(self, k: int) -> str:
        o = self.outputs[k]
        return f"output {k}" + (f": {o.name}" if o.name else "")


def _parts(obj) -> _Parts:
    if isinstance(obj, Node):
        obj = [obj]
    if isinstance(obj, (list, tuple)) and all(isinstance(n, Node) for n in obj):
        order = topo_order(obj)
        return _Parts(order, [n for n in order if n.op == "input"], list(obj), [],
                      {_param_key(n): n for n in order if n.op == "param"}, None, None)
    if hasattr(obj, "order") and hasattr(obj, "outputs") and hasattr(obj, "params"):
        return _Parts(list(obj.order), list(obj.inputs), list(obj.outputs), list(getattr(obj, "states", [])),
                      dict(obj.params), getattr(obj, "name", None), getattr(obj, "site", None))
    raise TypeError(f"sg.to_dot draws an sg.Cell, sg.Graph, sg.Recurrence, a compiled model or nodes; "
                    f"got {type(obj).__name__}{_draw_one_of(_recurrences_in(obj))}")


def _draw_one_of(inside: list[str]) -> str:
    """The hint naming a container's recurrences (the first four) to draw instead."""
    return (f"; it holds recurrences, draw one of them: {', '.join(inside[:4])}" + (", ..." if len(inside) > 4 else "")
            if inside else "")


def _recurrences_in(obj, compiled: bool = False) -> list[str]:
    """Where the recurrences inside a container module are, as expressions a user can draw
    (`compiled`: each wrapped in sg.compile(...) where it is not compiled yet)."""
    import torch.nn as nn
    from .recurrence import Recurrence
    if not isinstance(obj, nn.Module):
        return []
    def path(name: str) -> str:
        return "model" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in name.split(".") if p)
    found = [f"sg.compile({path(name)})" if compiled and not callable(getattr(m, "plan", None)) else path(name)
             for name, m in obj.named_modules() if name and isinstance(m, Recurrence)]
    for name, m in obj.named_modules():  # sg.nn layers: one recurrence per layer and direction
        if callable(getattr(m, "recurrence", None)) and hasattr(m, "num_layers"):
            found += [f"{path(name)}.recurrence({i}{', 1' if j else ''})"
                      for i in range(m.num_layers) for j in range(2 if m.bidirectional else 1)]
    return found


# ---------------------------------------------------------------------------------------
# to_dot
# ---------------------------------------------------------------------------------------
def to_dot(obj: Drawable, unroll: int | None = None, compact: bool = False,
           backward: bool = False) -> graphviz.Digraph:
    """A `graphviz.Digraph` of `obj`; `.source` is the DOT text, `.pipe(format="svg")` renders.

    obj: an sg.Cell or sg.Graph; an sg.Recurrence (its cell); a compiled model (its plan's
    own picture, when `obj.plan()` has a callable `to_dot`); a node or list of nodes (all they
    depend on); or an existing Digraph (returned as is).
    unroll=k draws k steps, one cluster each, parameters (and contexts) once outside them;
    compact=True draws each step as one box. With unroll or compact a compiled model is drawn
    from its cell, since its plan is the same at every step. backward=True draws a compiled
    model's backward plan: its fused kernels per step and the reductions after the loop.

        import seqgraph as sg
        x, h = sg.Input(4, name="x"), sg.State(8, name="h")
        cell = sg.Cell(inputs=[x], states={h: sg.tanh(sg.Linear(12, 8)(sg.concat([x, h])))})
        print(sg.to_dot(cell, unroll=2).source[:7])   # digraph
    """
    if isinstance(obj, (graphviz.Digraph, graphviz.Source)):
        return obj
    if unroll is not None and (isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1):
        raise ValueError(f"unroll must be a positive number of steps, got {unroll!r}")
    plan = getattr(obj, "plan", None)
    if backward:
        if not callable(plan) or unroll is not None or compact:
            raise ValueError("backward=True draws the backward plan of a compiled model (sg.compile(...)), "
                             f"without unroll or compact; got {type(obj).__name__}" + _backward_hint(obj, plan))
        return _backward_picture(plan())
    if callable(plan) and unroll is None and not compact:
        picture = getattr(plan(), "to_dot", None)
        if callable(picture):
            return picture()
    if hasattr(obj, "cell") and not hasattr(obj, "order"):
        obj = obj.cell
    parts = _parts(obj)
    if (unroll is not None or compact) and not parts.states:
        raise ValueError("unroll/compact draw the steps of a recurrence, but this graph has no states "
                         "(an sg.Graph or bare nodes); draw it without unroll")
    if compact:
        return _compact(parts, unroll or 1)
    if unroll is not None:
        return _unrolled(parts, unroll)
    return _single(parts)


def _backward_hint(obj, plan) -> str:
    """What to draw instead, for a model backward=True cannot draw."""
    if callable(plan):
        return " with unroll/compact"
    if hasattr(obj, "cell"):  # an uncompiled Recurrence: it trains through autograd, step by step
        return "; compile it first: sg.to_dot(sg.compile(model), backward=True)"
    return _draw_one_of(_recurrences_in(obj, compiled=True))


def _backward_picture(plan) -> graphviz.Digraph:
    """The backward plan's picture, or a ValueError where no backward was generated."""
    try:
        plan.backward_plan(False)
    except NotImplementedError as why:
        raise ValueError(f"this model has no generated backward to draw: it trains through autograd over "
                         f"the reference loop, because {why}") from None
    return plan.to_dot(backward=True)


def _title(dot: graphviz.Digraph, parts: _Parts, extra: str = "") -> None:
    if parts.name or extra:
        dot.attr(label=_text(" ".join(s for s in (parts.name and f"'{parts.name}'", extra) if s)),
                 labelloc="t", fontsize="13")


def _single(parts: _Parts) -> graphviz.Digraph:
    dot = _new_digraph(parts.name or "seqgraph")
    _title(dot, parts)
    for n in parts.visible():
        add_node(dot, n, key=parts.keys.get(n.id))
        for src, look in parts.in_edges(n):
            dot.edge(node_id(src), node_id(n), **look)
    for k, (prev, nxt) in enumerate(parts.states):
        dot.node(f"next_{k}", label=_text(f"next {prev.label()}", _shape_text(prev)),
                 tooltip=_text(f"the value of {prev.label()} at the next step"), **_SINK_LOOK["next"])
        dot.edge(node_id(nxt), f"next_{k}", **_NEXT_EDGE)
    for k, o in enumerate(parts.outputs):
        dot.node(f"out_{k}", label=_text(parts.output_label(k)), **_SINK_LOOK["output"])
        dot.edge(node_id(o), f"out_{k}", color="#1d4ed8")
    return dot


def _shared(node: Node) -> bool:
    """Drawn once for all steps: parameters, contexts and once-per-sequence noise."""
    return node.op in ("param", "context") or (node.op == "noise" and bool(node.attrs.get("per_sequence")))


def _ref(node: Node, prefix: str) -> str:
    """The DOT id of `node` in the step drawn with `prefix` (shared nodes have one id)."""
    return node_id(node) if _shared(node) else node_id(node, prefix)


def _carry_nodes(dot: graphviz.Digraph, parts: _Parts, steps: int) -> None:
    """The initial-state sources and final-state sinks of an unrolled picture."""
    for k, (prev, _) in enumerate(parts.states):
        dot.node(f"init_{k}", label=_text(f"initial {prev.label()}", f"init={prev.attrs.get('init', 'zeros')}",
                                          _shape_text(prev)),
                 tooltip=_text(f"{prev.label()} before step 0, declared at {_site_text(prev.site)}"),
                 **dict(_LEAF_LOOK["state"], style="filled,bold"))
        dot.node(f"final_{k}", label=_text(f"final {prev.label()}", f"after step {steps - 1}"),
                 tooltip=_text(f"the final_state[{prev.label()!r}] the recurrence returns"),
                 **dict(_SINK_LOOK["next"], style="filled,bold"))


def _unrolled(parts: _Parts, steps: int) -> graphviz.Digraph:
    dot = _new_digraph(parts.name or "seqgraph", compound="true")
    _title(dot, parts, f"unrolled over {steps} steps")
    visible = parts.visible()
    for n in visible:
        if _shared(n):
            add_node(dot, n, key=parts.keys.get(n.id))
    _carry_nodes(dot, parts, steps)
    edges = []  # added after all clusters, so that each node is first declared inside its own
    for t in range(steps):
        prefix = f"s{t}_"
        with dot.subgraph(name=f"cluster_step_{t}") as step:
            step.attr(label=f"step {t}", style="rounded,dashed", color="#94a3b8", fontcolor=_INK)
            for n in visible:
                if _shared(n):
                    continue
                carried = {"label": _text(n.label(), f"State, from step {t - 1}", _shape_text(n))} \
                    if n.op == "state" and t > 0 else {}
                add_node(step, n, prefix, **carried)
                edges += [(_ref(src, prefix), _ref(n, prefix), look) for src, look in parts.in_edges(n)]
            for k, o in enumerate(parts.outputs):
                step.node(f"{prefix}out_{k}", label=_text(f"{parts.output_label(k)} [t={t}]"),
                          **_SINK_LOOK["output"])
                edges.append((_ref(o, prefix), f"{prefix}out_{k}", dict(color="#1d4ed8")))
        for k, (prev, nxt) in enumerate(parts.states):
            if t == 0:
                edges.append((f"init_{k}", node_id(prev, prefix), _NEXT_EDGE))
            target = node_id(prev, f"s{t + 1}_") if t + 1 < steps else f"final_{k}"
            edges.append((_ref(nxt, prefix), target, dict(_NEXT_EDGE, label=_text(prev.label()))))
    for src, dst, look in edges:
        dot.edge(src, dst, **look)
    return dot


def _compact(parts: _Parts, steps: int) -> graphviz.Digraph:
    """Each step one box. However many parameters and states the cell has, the picture keeps
    one parameters node (listing them) with an edge into each step, and one bundled edge of
    states between steps, from one initial-state node and into one final-state node."""
    dot = _new_digraph(parts.name or "seqgraph")
    _title(dot, parts, f"unrolled over {steps} steps" if steps > 1 else "")
    shared = [n for n in parts.order if _shared(n)]
    params = [n for n in shared if n.op == "param"]
    if params:
        listed = [f"{parts.keys.get(n.id) or _param_key(n)} {_shape_text(n)}" for n in params]
        more = [f"... and {len(listed) - _MAX_LISTED} more"] if len(listed) > _MAX_LISTED else []
        dot.node("params", label=_text(f"{len(params)} parameters" if len(params) > 1 else "parameter",
                                       *listed[:_MAX_LISTED], *more),
                 tooltip=_text(", ".join(listed)), **_LEAF_LOOK["param"])
    for n in shared:
        if n.op != "param":
            add_node(dot, n)
    names = [prev.label() for prev, _ in parts.states]
    carried = _text(*(", ".join(names[i:i + 4]) for i in range(0, len(names), 4)))
    with dot.subgraph(name="steps") as row:
        row.attr(rank="same")
        if names:
            row.node("init", label=_text("initial state", *(
                f"{prev.label()} {_shape_text(prev)} {prev.attrs.get('init', 'zeros')}" for prev, _ in parts.states)),
                **dict(_LEAF_LOOK["state"], style="filled,bold"))
            row.node("final", label=_text("final state", *names, f"after step {steps - 1}"),
                     tooltip=_text("the final_state the recurrence returns"),
                     **dict(_SINK_LOOK["next"], style="filled,bold"))
        for t in range(steps):
            row.node(f"step_{t}", label=_text(f"step {t}", f"{parts.name or 'cell'}: {len(parts.visible())} nodes"),
                     tooltip=_text(f"cell declared at {_site_text(parts.site)}"), **_SINK_LOOK["step"])
    for t in range(steps):
        for x in parts.inputs:
            dot.node(f"s{t}_n{x.id}", label=_text(f"{x.label()}[{t}]", _shape_text(x)), **_LEAF_LOOK["input"],
                     tooltip=_text(f"Input {x.label()} at {_site_text(x.site)}"))
            dot.edge(f"s{t}_n{x.id}", f"step_{t}", **_edge_look(x))
        if params:
            dot.edge("params", f"step_{t}", **_edge_look(params[0]))
        for n in shared:
            if n.op != "param":
                dot.edge(node_id(n), f"step_{t}", **_edge_look(n))
        if names:
            dot.edge("init" if t == 0 else f"step_{t - 1}", f"step_{t}", label=carried, **_NEXT_EDGE)
        for k, o in enumerate(parts.outputs):
            dot.node(f"s{t}_out_{k}", label=_text(f"{parts.output_label(k)} [t={t}]"), **_SINK_LOOK["output"])
            dot.edge(f"step_{t}", f"s{t}_out_{k}", color="#1d4ed8")
    if names:
        dot.edge(f"step_{steps - 1}", "final", label=carried, **_NEXT_EDGE)
    return dot


# ---------------------------------------------------------------------------------------
# error pictures
# ---------------------------------------------------------------------------------------
def error_dot(err: GraphError, around: Iterable[Node] | None = None) -> graphviz.Digraph:
    """The nodes within HOPS of the node `err` names (and of both ends of `err.edge`), with
    the failing node and edge in red. Nodes know only their inputs, so the picture reaches
    upstream; pass `around` (the graph's outputs or all its nodes) to reach consumers too."""
    focus = [n for n in [getattr(err, "node", None), *(getattr(err, "edge", None) or ())] if isinstance(n, Node)]
    dot = _new_digraph("seqgraph_error")
    message = str(err.args[0]) if err.args else type(err).__name__
    dot.attr(label=_text(_shorten(message.split("\n")[0], 160)), labelloc="t", fontcolor="#991b1b", fontsize="12")
    if not focus:
        dot.node("error", label=_text(type(err).__name__, _shorten(message, 120)), shape="note",
                 style="filled", **{k: v for k, v in _ERROR_LOOK.items() if k != "penwidth"})
        return dot
    users = consumers(topo_order(list(around))) if around is not None else {}
    near = {n.id: n for n in focus}
    frontier = list(focus)
    for _ in range(HOPS):
        reached = []
        for n in frontier:
            for m in _neighbours(n, users):
                if m.id not in near:
                    near[m.id] = m
                    reached.append(m)
        frontier = reached
    failing = getattr(err, "node", None)
    red = {failing.id} if isinstance(failing, Node) else set()
    for n in near.values():
        extra = dict(_ERROR_LOOK, tooltip=_text(f"{message.split(chr(10))[0]} ({_site_text(n.site)})")) \
            if n.id in red else {}
        if n.id in red and "filled" not in node_style(n).get("style", ""):
            extra["style"] = "filled"
        add_node(dot, n, **extra)
    edge = getattr(err, "edge", None)
    bad = (edge[0].id, edge[1].id) if edge and all(isinstance(e, Node) for e in edge) else None
    for n in near.values():
        for i in n.inputs:
            if i.id in near:
                look = dict(color="red", penwidth="2.5") if bad == (i.id, n.id) else _edge_look(i)
                dot.edge(node_id(i), node_id(n), **look)
    if bad and edge[0] not in edge[1].inputs:  # e.g. a state's next value: not an operand edge
        label = f"next {edge[1].label()}" if edge[1].op == "state" else ""
        dot.edge(node_id(edge[0]), node_id(edge[1]), label=_text(label), style="dashed", color="red",
                 penwidth="2.5", fontcolor="red", constraint="false")
    return dot


def _neighbours(node: Node, users: dict[int, list[Node]]) -> list[Node]:
    """Operands, known consumers, and the sibling pieces of a chunk/split."""
    group = node.attrs.get("group")
    siblings = list(getattr(group, "pieces", ()))
    return list(node.inputs) + users.get(node.id, []) + siblings


def _shorten(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"


def attach_error_picture(err: GraphError, write: bool = False, around: Iterable[Node] | None = None) -> str | None:
    """Set `err.dot` to the DOT source of `error_dot(err)`. When SEQGRAPH_DEBUG is 1 or more
    (settings.debug_level) or write=True, also write it to a .dot file in $SEQGRAPH_DEBUG_DIR (or a
    temporary folder), set `err.dot_path` and add the path to the message; returns that path.
    Never raises: a picture that cannot be made must not hide the error itself."""
    try:
        if getattr(err, "node", None) is None and not getattr(err, "edge", None):
            return None
        source = error_dot(err, around).source
        err.dot = source
        if not (write or debug_level() >= 1):
            return None
        if getattr(err, "dot_path", None):  # already written and announced
            return err.dot_path
        folder = os.environ.get("SEQGRAPH_DEBUG_DIR") or os.path.join(tempfile.gettempdir(), "seqgraph-debug")
        os.makedirs(folder, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="seqgraph-error-", suffix=".dot", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
        err.dot_path = path
        first = err.args[0] if err.args else ""
        err.args = (f"{first}\n(picture of the failing node: {path})",) + tuple(err.args[1:])
        return path
    except Exception:  # noqa: BLE001 - the real error matters more than its picture
        return None


# ---------------------------------------------------------------------------------------
# render and the command line
# ---------------------------------------------------------------------------------------
_INSTALL = ("install Graphviz (Debian/Ubuntu: `apt-get install graphviz`, macOS: `brew install graphviz`, "
            "conda: `conda install -c conda-forge graphviz`, others: https://graphviz.org/download/) "
            "so that `dot` is on PATH, or write the DOT source instead with a .dot file name")


def render(obj: Drawable, path: str | os.PathLike, unroll: int | None = None, compact: bool = False,
           backward: bool = False) -> str:
    """Draw `obj` (anything `to_dot` takes) to `path`, in the format its extension names:
    .svg, .png, .pdf (rendered by Graphviz's `dot`) or .dot (the source, no `dot` needed).
    Returns the path written."""
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"sg.render: cannot tell the format of {path!r}; end the name with one of "
                         f"{', '.join('.' + f for f in FORMATS)}")
    dot = to_dot(obj, unroll=unroll, compact=compact, backward=backward)
    if fmt == "dot":
        with open(path, "w", encoding="utf-8") as f:
            f.write(dot.source)
        return path
    if shutil.which("dot") is None:
        raise GraphvizMissing(f"sg.render: writing {path!r} needs Graphviz's `dot` program, which is not on PATH; "
                              f"{_INSTALL}")
    try:
        data = dot.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise GraphvizMissing(f"sg.render: Graphviz's `dot` could not be run; {_INSTALL}") from None
    except graphviz.CalledProcessError as e:  # a seqgraph bug: the DOT it wrote was refused
        err = (e.stderr or b"").decode(errors="replace").strip()
        raise RuntimeError(f"sg.render: Graphviz's `dot` refused the picture of {path!r} ({err}); please "
                           f"report it with the cell's code") from None
    with open(path, "wb") as f:
        f.write(data)
    return path


def svg_or_none(dot: graphviz.Digraph) -> str | None:
    """The picture as SVG text for Jupyter's display, or None (Jupyter then shows the text
    repr) where Graphviz's `dot` is missing or fails."""
    try:
        return dot.pipe(format="svg").decode()
    except (graphviz.ExecutableNotFound, graphviz.CalledProcessError):
        return None


class _TargetError(ValueError):
    """The viz command's target names no file or no function in it."""


def _load_factory(target: str):
    """Import `path/to/file.py:function` by path and return the function."""
    path, sep, func = target.rpartition(":")
    if not sep or not path or not func:
        raise _TargetError(f"expected path/to/file.py:function, got {target!r}")
    if not os.path.isfile(path):
        raise _TargetError(f"no such file: {path}")
    name = "_seqgraph_viz_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # so the user's file can import its neighbours
    sys.modules[name] = module  # as an import does (dataclasses look their module up there)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    factory = getattr(module, func, None)
    if not callable(factory):
        raise _TargetError(f"{path} has no function {func!r}")
    return factory


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m seqgraph viz path/to/cell.py:make_cell [--unroll K] [--compact] [--backward] [-o out.svg]`:
    call the factory (no arguments; it returns a Cell, Graph or module) and draw what it
    returns; without -o the DOT source goes to stdout."""
    parser = argparse.ArgumentParser(prog="python -m seqgraph viz",
                                     description="Draw a seqgraph cell, graph or model with Graphviz.")
    parser.add_argument("target", help="path/to/file.py:function, a function that takes no arguments "
                                       "and returns an sg.Cell, sg.Graph or sg.Recurrence (compiled or not)")
    parser.add_argument("--unroll", type=int, default=None, metavar="K", help="draw K steps of the recurrence")
    parser.add_argument("--compact", action="store_true", help="one box per step")
    parser.add_argument("--backward", action="store_true", help="a compiled model's backward plan")
    parser.add_argument("-o", "--output", default=None,
                        help="file to write (.svg, .png, .pdf or .dot); default: DOT source on stdout")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.output is not None:  # refused before the user's file is imported and its factory run
        fmt = os.path.splitext(args.output)[1].lower().lstrip(".")
        if fmt not in FORMATS:
            parser.error(f"-o {args.output!r}: cannot tell the format; end the name with one of "
                         f"{', '.join('.' + f for f in FORMATS)}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            parser.error(f"-o {args.output!r}: its folder does not exist")
    doing = f"importing {args.target.rpartition(':')[0]}"
    try:
        factory = _load_factory(args.target)
        doing = f"calling {args.target}()"
        obj = factory()
    except GraphError as e:  # the picture asked for is the error's: written to -o when given
        if args.output is None:
            attach_error_picture(e, write=True)
        print(f"seqgraph viz: {doing} raised {type(e).__name__}: {e}", file=sys.stderr)
        if args.output is not None:
            try:
                print(f"seqgraph viz: the error's picture: {render(error_dot(e), args.output)}", file=sys.stderr)
            except (ValueError, GraphvizMissing, RuntimeError, OSError) as why:
                print(f"seqgraph viz: could not draw the error's picture to {args.output!r}: {why}", file=sys.stderr)
        return 1
    except _TargetError as e:
        print(f"seqgraph viz: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the user's file or factory: say what it raised, not where inside us
        path = os.path.abspath(args.target.rpartition(":")[0])
        tb = traceback.extract_tb(e.__traceback__)
        mine = [f for f in tb if os.path.abspath(f.filename) == path]
        if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == path:
            where = f" at {os.path.basename(path)}:{e.lineno}"
        elif mine:
            where = f" at {os.path.basename(path)}:{mine[-1].lineno}"
        else:  # the call itself failed: the factory wants arguments
            where = " (the factory is called with no arguments)" if e.__traceback__.tb_next is None else ""
        print(f"seqgraph viz: {doing} raised {type(e).__name__}: {e}{where}", file=sys.stderr)
        return 1
    try:
        if args.output is None:
            print(to_dot(obj, unroll=args.unroll, compact=args.compact, backward=args.backward).source)
        else:
            print(render(obj, args.output, unroll=args.unroll, compact=args.compact, backward=args.backward))
    except (ValueError, TypeError, GraphvizMissing) as e:
        print(f"seqgraph viz: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"seqgraph viz: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"seqgraph viz: cannot write {args.output!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0
