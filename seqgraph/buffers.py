"""Large CPU buffers of compiled time loops, kept and reused across calls.

A compiled loop writes what its backward reads (the states of every step, saved gate values)
and its backward writes the gradients of the hoisted values into fresh (T, B, ...) buffers,
tens of MB each at a real size. On the CPU a fresh buffer that large is fresh memory from the
kernel, and touching it page by page costs more than the loop's own arithmetic (an mLSTM at
T=50 B=16 H=128 spent half its single-thread fwd+bwd in page faults). So the generated code takes such
buffers from here (`empty`, `zeros`): a buffer comes back for a later call that needs as many
elements or down to 1/`SPARE` of them (another T or B: bucketed or unpadded batches) once
nothing else holds its memory. It keeps flat bases, allocated a little larger than asked
(rounded up to the next of four steps per power of two), hands out a view of their first
elements; a new base drops the free smaller ones, which it serves. A base is free again only
when it is its storage's one user (PyTorch's own count, as inductor's CUDA graph trees use
it): a saved tensor, a gradient autograd kept as a `.grad`, a view the caller holds, each
keeps it taken. A call may take several buffers (an LSTM's saved gates) and a caller may
hold several calls' graphs, so up to `KEEP` bases of a dtype are kept (past that, a free one
no longer asked for makes room, else a buffer comes straight from torch), and `LIMIT` bytes in
all (the least recently used go first); `SEQGRAPH_REUSE_BUFFERS=0` turns reuse off. GPU
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
KEEP = 32  # bases kept per dtype: what calls take at once (4 of a size each, 4 graphs alive, two sizes, say)
LIMIT = 1 << 30  # bytes kept in all
SPARE = 8  # a free base serves a call that needs at least 1/SPARE of it

_lock = threading.Lock()
_kept: OrderedDict[int, tuple[tuple, torch.Tensor]] = OrderedDict()  # id -> (group, flat base), least recent first


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


def _capacity(n: int) -> int:
    """n rounded up to a multiple of a quarter of its highest power of two (at most a quarter more)."""
    step = 1 << max(n.bit_length() - 3, 0)
    return (n + step - 1) // step * step


def empty(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` with `like`'s dtype and device, as
    like.new_empty(shape), its memory reused from an earlier call where it can be."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if not _poolable(like, n * like.element_size()):
        return like.new_empty(shape)
    group = (like.dtype, torch.is_inference_mode_enabled())
    with _lock:
        # the smallest free base that holds n elements, and at most SPARE times that
        mine = [(key, base) for key, (g, base) in _kept.items() if g == group]  # least recently used first
        fitting = sorted((base.numel(), i) for i, (_, base) in enumerate(mine) if n <= base.numel() <= SPARE * n)
        for _, i in fitting:  # (asked of those that fit only: the count is a call into torch)
            key, base = mine[i]
            if _free(base):
                _kept.move_to_end(key)
                return base[:n].view(shape)
        size = _capacity(n)
        free = [key for key, base in mine if _free(base)]
        stale = free[0] if free else None  # the least recently used free base
        smaller = [key for key in free if _kept[key][1].numel() < size]  # what a new base supersedes
        for key in smaller:  # (the new one serves their calls, down to 1/SPARE of its size)
            del _kept[key]
        if len(mine) - len(smaller) >= KEEP:  # a free base no longer asked for makes room; else all are taken
            if stale is None or stale in smaller:
                _trim()
                return like.new_empty(shape)
            del _kept[stale]
        base = like.new_empty((size,))
        _kept[id(base)] = (group, base)
        _trim()
        return base[:n].view(shape)


def zeros(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`empty`, filled with zeros."""
    return empty(like, shape).zero_()


def _kept_total() -> int:
    """The bytes of every kept base (the caller holds the lock)."""
    return sum(b.numel() * b.element_size() for _, b in _kept.values())


def _trim() -> None:
    """Drop the least recently used bases until at most LIMIT bytes are kept."""
    total = _kept_total()
    while total > LIMIT and _kept:
        _, (_, base) = _kept.popitem(last=False)
        total -= base.numel() * base.element_size()


def kept_bytes() -> int:
    """The bytes of the buffers kept now (taken or free)."""
    with _lock:
        return _kept_total()


def clear() -> None:
    """Forget every kept buffer (memory still in use is freed when its last user goes)."""
    with _lock:
        _kept.clear()


__all__ = ["empty", "zeros", "clear", "kept_bytes", "reuse_enabled", "MIN_BYTES", "KEEP", "LIMIT"]
