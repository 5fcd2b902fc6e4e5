"""The environment switches that more than one module reads, parsed in one place.

`SEQGRAPH_DEBUG` (0 off; 1 passes and timings, 2 the IR after each pass, 3 generated source, 4
kernel launches; false, no and off count as 0, any other non-empty text as 1), `TRITON_INTERPRET`
(Triton's CPU interpreter) and how any on/off switch reads (`switched_on`). Switches that one
module owns (the cache folder, C flags, the loop split, the CPU GEMM, CUDA graphs) are read
there. This module only reads the environment; it must not cache a value, so a test or a user
may change a switch between calls.
"""
from __future__ import annotations

import os

import torch

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

_KEYS: dict[str, object] = {}  # name -> os.environ's key for it (bytes on POSIX)


def env(name: str, default: str | None = None) -> str | None:
    """os.environ.get(name, default), read afresh at every call. On POSIX CPython it reads
    os.environ's own store (kept in step by every write through os.environ): a one-step call
    reads several switches, and os.environ.get of an unset name raises and catches a KeyError
    inside, a microsecond or more each. Under torch.compile (whose tracer would guard on the
    store's size) or with os.environ replaced (a test's dict), os.environ.get itself."""
    environ = os.environ
    if torch.compiler.is_compiling():
        return environ.get(name, default)
    store = getattr(environ, "_data", None)
    if store is None or os.name != "posix":
        return environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = environ.encodekey(name)
    raw = store.get(key)
    return default if raw is None else environ.decodevalue(raw)


def switched_on(name: str, default: bool) -> bool:
    """An on/off environment switch: 1, true, yes, on or 0, false, no, off (any case); unset,
    empty or anything else gives `default`."""
    raw = env(name, "").strip().lower()
    return True if raw in _TRUE else False if raw in _FALSE else default


def debug_level() -> int:
    """SEQGRAPH_DEBUG as a number: 0 when unset, empty or "0"."""
    raw = env("SEQGRAPH_DEBUG", "").strip()
    try:
        return max(0, int(raw or 0))
    except ValueError:
        return 0 if raw.lower() in ("false", "no", "off") else 1


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, true, yes, on)."""
    return switched_on("TRITON_INTERPRET", False)
