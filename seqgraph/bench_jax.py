"""The benchmark's JAX peer: each bench cell as a jax.lax.scan over a jitted step (optional).

`python -m seqgraph bench --peers jax,...` adds a row per cell for JAX on the same device type
(the CPU here): the cell's published equations (bench_arrays.py) on jax.numpy, scanned over the steps
by `jax.lax.scan`, forward jitted, and forward+backward as one jitted `jax.grad` of the
outputs' sum with respect to the weights and the input. The weights are the seqgraph cell's,
copied. JAX is not a dependency of seqgraph: without it installed, asking for this peer is
refused by name. This module only builds the peer; bench.py times it. It must not import jax
at module level.
"""
from __future__ import annotations

import importlib.util
import time
from typing import Callable

import torch

from .bench_arrays import array_step


def available() -> bool:
    return importlib.util.find_spec("jax") is not None


def jax_step(name: str, p: dict) -> Callable:
    """The cell's equations as step(x, state) -> (out, state) on jax arrays (bench.eager_step's twin)."""
    import types

    import jax
    import jax.numpy as jnp
    xp = types.SimpleNamespace(**{f: getattr(jnp, f) for f in (
        "matmul", "transpose", "split", "tanh", "mean", "sqrt", "reshape", "stack", "zeros_like", "abs", "maximum",
        "minimum", "exp", "einsum", "sum", "expand_dims")},
        sigmoid=jax.nn.sigmoid, softmax=jax.nn.softmax, log_sigmoid=jax.nn.log_sigmoid)
    return array_step(name, p, xp)


def jax_peer(name: str, params: dict[str, torch.Tensor], x: torch.Tensor,
             zeros: tuple[torch.Tensor, ...]) -> tuple[Callable, Callable, float]:
    """(forward, forward+backward, compile seconds) of the cell as a jitted lax.scan over `x`
    (T, B, I) from the states `zeros`, with `params` copied. Each call blocks until JAX is done."""
    import jax
    import jax.numpy as jnp

    def arr(t):
        return jnp.asarray(t.detach().cpu().numpy())
    p, xs, s0 = {k: arr(v) for k, v in params.items()}, arr(x), tuple(arr(z) for z in zeros)

    def run(p, xs, s0):
        step = jax_step(name, p)

        def body(state, xt):
            out, state = step(xt, state)
            return state, out
        return jax.lax.scan(body, s0, xs)[1]
    forward = jax.jit(run)
    gradient = jax.jit(jax.grad(lambda p, xs, s0: run(p, xs, s0).sum(), argnums=(0, 1)))

    def fwd():
        return forward(p, xs, s0).block_until_ready()

    def fwdbwd():
        return jax.block_until_ready(gradient(p, xs, s0))
    t0 = time.perf_counter()
    fwd()
    fwdbwd()
    return fwd, fwdbwd, time.perf_counter() - t0


__all__ = ["available", "jax_step", "jax_peer"]
