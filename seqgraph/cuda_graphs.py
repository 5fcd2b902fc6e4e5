"""CUDA graph capture of the generated time loops: one launch instead of thousands.

On a GPU the generated forward and backward loops issue a few kernels per step, and at small
batch the CPU cannot issue them as fast as the GPU runs them. `GraphedLoop` captures one loop
function for fixed shapes (T, B, dtype, masked or not) into a CUDA graph the second time it
sees them (a first call runs eagerly, so shapes seen once cost no capture) and replays it
afterwards: inputs are copied into the graph's static buffers, the graph replays,
and every tensor that leaves is cloned, so a second call never overwrites what a first call
returned (two forwards before one backward stay correct). A loop that cannot be captured runs
eagerly, and says why once. Must not change what a loop computes.
"""
from __future__ import annotations

import threading
import warnings
from typing import Callable

import torch

from .settings import switched_on


def _flatten(tree, leaves: list):
    """Replace each tensor in nested lists/tuples by its index in `leaves`."""
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return ("T", len(leaves) - 1)
    if isinstance(tree, (list, tuple)):
        return (type(tree).__name__, [_flatten(t, leaves) for t in tree])
    return ("V", tree)


def _unflatten(spec, leaves):
    kind, body = spec
    if kind == "T":
        return leaves[body]
    if kind in ("list", "tuple"):
        items = [_unflatten(s, leaves) for s in body]
        return items if kind == "list" else tuple(items)
    return body


def _shape_key(tree) -> tuple:
    """What a captured graph depends on: the layout, and the device of every tensor, and the
    autocast state (a graph captured under autocast computes in its dtype)."""
    leaves: list = []
    spec = _flatten(tree, leaves)
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return repr(spec), tuple((tuple(t.shape), t.dtype, t.stride(), t.device) for t in leaves), autocast


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and switched_on("SEQGRAPH_CUDA_GRAPHS", True)


class GraphedLoop:
    """`fn(*args)` captured per input layout; call it like `fn`."""

    def __init__(self, fn: Callable, name: str, max_graphs: int = 8):
        self.fn = fn
        self.name = name
        self.max_graphs = max_graphs
        self.graphs: dict = {}
        self.failed: set = set()
        self.replays = 0
        self.lock = threading.Lock()  # one replay at a time: the static buffers are shared
        self.seen: dict = {}  # layout key -> calls so far, for layouts not captured yet

    def __call__(self, *args):
        with self.lock:
            return self._call(args)

    def _call(self, args):
        key = _shape_key(args)
        if key in self.failed:
            return self.fn(*args)
        entry = self.graphs.pop(key, None)
        if entry is not None:
            self.graphs[key] = entry  # most recently used last: the first is evicted first
        else:
            # a layout seen once runs eagerly: capturing costs a warm-up, a sync and a cache
            # flush, which sequence lengths that change every call would pay every call
            self.seen[key] = self.seen.pop(key, 0) + 1
            if len(self.seen) > 64:
                self.seen.pop(next(iter(self.seen)))
            if self.seen[key] < 2:
                return self.fn(*args)
            try:
                entry = self._capture(args)
            except Exception as e:  # capture is an optimisation: never let it change results
                self.failed.add(key)
                warnings.warn(f"seqgraph: the {self.name} loop could not be captured as a CUDA graph "
                              f"({type(e).__name__}: {e}); it runs without one")
                return self.fn(*args)
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = entry
        graph, static_in, out_spec, static_out = entry
        leaves: list = []
        _flatten(args, leaves)
        for dst, src in zip(static_in, leaves):
            dst.copy_(src)
        graph.replay()
        self.replays += 1
        return _unflatten(out_spec, [t.clone() for t in static_out])

    def _capture(self, args):
        leaves: list = []
        spec = _flatten(args, leaves)
        with torch.cuda.device(leaves[0].device):  # streams and the graph on the tensors' own GPU
            return self._capture_here(spec, leaves)

    def _capture_here(self, spec, leaves):
        static_in = [t.clone() for t in leaves]
        static_args = _unflatten(spec, static_in)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: compiles kernels, creates library handles
            self.fn(*static_args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*static_args)
        out_leaves: list = []
        out_spec = _flatten(out, out_leaves)
        return graph, static_in, out_spec, out_leaves
