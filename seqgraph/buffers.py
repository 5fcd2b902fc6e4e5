"""Large CPU buffers of compiled time loops, kept and reused across calls.

A compiled loop writes what its backward reads (the states of every step, saved gate values)
and its backward writes the gradients of the hoisted values into fresh (T, B, ...) buffers,
tens of MB each at a real size. On the CPU a fresh buffer that large is fresh memory from the
kernel, and touching it page by page costs more than the loop's own arithmetic (an mLSTM at
T=50 B=16 H=128 spent half its single-thread fwd+bwd in page faults). So the generated code takes such
buffers from here (`empty`, `zeros`): a buffer comes back for another call of the same shape
once nothing else holds its memory. It hands out a view and keeps the base, and a buffer is
free again only when the base is its storage's one user (PyTorch's own count, as inductor's
CUDA graph trees use it): a saved tensor, a gradient autograd kept as a `.grad`, a view the
caller holds, each keeps it taken. A call may take several buffers of one shape (an LSTM's saved
gates) and a caller may hold several calls' graphs, so up to `KEEP` buffers of one shape are
kept (past that, a buffer comes straight from torch), and `LIMIT` bytes in all (the least
recently used shape goes first); `SEQGRAPH_REUSE_BUFFERS=0` turns reuse off. GPU
buffers, small ones and any tensor under tracing come straight from torch (CUDA's caching
allocator already reuses memory). This module must not decide what a loop allocates; the code
generators do.
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict

import torch

from .settings import switched_on

MIN_BYTES = 1 << 20  # smaller buffers come from malloc's heap, which reuses them without faults
KEEP = 16  # buffers kept per shape: what calls take at once (4 of a shape each, 4 graphs alive, say)
LIMIT = 1 << 30  # bytes kept in all

_lock = threading.Lock()
_kept: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()  # key -> bases, least recently used first


def _fresh_lock_after_fork() -> None:
    """A child forked while another thread took a buffer would wait for the lock forever."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_after_fork)


def reuse_enabled() -> bool:
    """Whether buffers are reused ($SEQGRAPH_REUSE_BUFFERS, on unless 0/false/no/off)."""
    return switched_on("SEQGRAPH_REUSE_BUFFERS", True)


def _free(base: torch.Tensor) -> bool:
    """Whether nothing but `base` uses its memory (the count includes the storage handle asked for)."""
    return torch._C._storage_Use_Count(base.untyped_storage()._cdata) == 2


def _poolable(like: torch.Tensor, nbytes: int) -> bool:
    return (nbytes >= MIN_BYTES and like.device.type == "cpu" and type(like) is torch.Tensor
            and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(like)
            and reuse_enabled())


def empty(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` with `like`'s dtype and device, as
    like.new_empty(shape), its memory reused from an earlier call where it can be."""
    shape = tuple(int(s) for s in shape)
    if not _poolable(like, math.prod(shape) * like.element_size()):
        return like.new_empty(shape)
    key = (shape, like.dtype, torch.is_inference_mode_enabled())
    with _lock:
        bases = _kept.get(key)
        if bases is not None:
            _kept.move_to_end(key)
            for base in bases:
                if _free(base):
                    return base.view(shape)
        base = like.new_empty(shape)
        bases = _kept.setdefault(key, [])
        if len(bases) >= KEEP:  # (all taken: keeping this one would drop one in use)
            return base
        bases.append(base)
        _trim()
        return base.view(shape)


def zeros(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`empty`, filled with zeros."""
    return empty(like, shape).zero_()


def _kept_total() -> int:
    """The bytes of every kept base (the caller holds the lock)."""
    return sum(b.numel() * b.element_size() for bases in _kept.values() for b in bases)


def _trim() -> None:
    """Drop the least recently used bases until at most LIMIT bytes are kept."""
    total = _kept_total()
    while total > LIMIT and _kept:
        key, bases = next(iter(_kept.items()))
        base = bases.pop(0)
        total -= base.numel() * base.element_size()
        if not bases:
            del _kept[key]


def kept_bytes() -> int:
    """The bytes of the buffers kept now (taken or free)."""
    with _lock:
        return _kept_total()


def clear() -> None:
    """Forget every kept buffer (memory still in use is freed when its last user goes)."""
    with _lock:
        _kept.clear()


__all__ = ["empty", "zeros", "clear", "kept_bytes", "reuse_enabled", "MIN_BYTES", "KEEP", "LIMIT"]
