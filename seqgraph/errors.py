"""Errors raised when a graph is built, checked or run, and the user's creation site.

Every error seqgraph raises about a graph's shapes or wiring is a `GraphError`; its message
names the node, its op and the file:line where the user created it (Python misused on a node,
`torch.tanh(h)` or `h > 0`, is a TypeError that says what to write instead); torch.jit.script
of a seqgraph module is refused by name (`refuse_torchscript`). This module only formats and
finds sites: it must not import torch or know about ops.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Site:
    """Where a user created a node: the first stack frame outside seqgraph itself."""

    path: str
    line: int
    function: str = ""

    def __str__(self) -> str:
        return f"{os.path.basename(self.path)}:{self.line}"


UNKNOWN_SITE = Site("<unknown>", 0)


def _user_frame(also_skip: tuple[str, ...], depth: int):
    """(frame, its level counted from the frame `depth` out from this one, which is 1) of the
    innermost frame from there outwards that is outside seqgraph and `also_skip`; or (None, 0)."""
    frame, level = sys._getframe(depth), 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        module = frame.f_globals.get("__name__") or ""
        if not path.startswith(_PACKAGE_DIR + os.sep) and not in_package(module, also_skip):
            return frame, level
        frame, level = frame.f_back, level + 1
    return None, 0


def user_site(also_skip: tuple[str, ...] = ()) -> Site:
    """The innermost caller frame that is not inside the seqgraph package (nor in the packages
    named in `also_skip`, e.g. numpy, for a call that reached us through them)."""
    frame, _ = _user_frame(also_skip, 2)
    return UNKNOWN_SITE if frame is None else Site(os.path.abspath(frame.f_code.co_filename), frame.f_lineno,
                                                   frame.f_code.co_name)


def user_stacklevel(also_skip: tuple[str, ...] = ("torch",)) -> int:
    """The `stacklevel` that makes a warnings.warn, in the function calling this, point at the
    user's line: the innermost frame outside seqgraph (and `also_skip`: torch's Module.__call__)."""
    frame, level = _user_frame(also_skip, 2)
    return level if frame is not None else 1


def in_package(module: str, packages: tuple[str, ...]) -> bool:
    """Whether `module` is one of `packages` or inside one ("torch.nn" is in torch; "torchhelpers" is not)."""
    return any(module == p or module.startswith(p + ".") for p in packages)


class GraphError(Exception):
    """A cell or graph is wrong. `node` is the offending node (when there is one) and
    `dot` a Graphviz picture of the neighbourhood with it drawn in red (see seqgraph.viz)."""

    def __init__(self, message: str, node=None, edge=None):
        super().__init__(message)
        self.node = node
        self.edge = edge
        self.dot = None
        self.dot_path = None


class ShapeError(GraphError):
    """Operands whose shapes (or dtypes) do not fit the op."""


class WiringError(GraphError):
    """Inputs not used, states without next values, unknown names: the graph's connections."""


class InputError(ValueError):
    """A tensor given at run time does not match what the cell declared."""


def describe(node) -> str:
    """`Linear 'gate_i' (declared at mycell.py:12)`: how messages name a node."""
    label = node.display_op()
    name = f" '{node.name}'" if node.name else ""
    return f"{label}{name} (declared at {node.site})"


def mention(node) -> str:
    """How a message refers to an operand: `'x'` when the user named it, else what made it and
    where (`Linear (declared at mycell.py:12)`), never an internal label such as `add_22`."""
    return repr(node.name) if node.name else describe(node)


def refuse_torchscript(module) -> None:
    """`__prepare_scriptable__` of seqgraph's modules: torch.jit.script compiles a module's Python
    source, which seqgraph's forward (keyword arguments, generated code) is not written for."""
    raise NotImplementedError(
        f"torch.jit.script cannot compile {type(module).__name__}: seqgraph's modules take keyword arguments "
        f"and run generated code, which TorchScript does not support. For deployment use torch.export (of an "
        f"sg.compile'd module: T stays free) or torch.compile; sg.nn's LSTM, GRU and RNN keep torch.nn's "
        f"state_dict keys, so their weights load into torch.nn's own layers, which script.")
