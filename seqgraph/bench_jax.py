"""The benchmark's JAX peer: each bench cell as a jax.lax.scan over a jitted step (optional).

`python -m seqgraph bench --peers jax,...` adds a row per cell for JAX on the same device type
(the CPU here): the cell's published equations written with jax.numpy, scanned over the steps
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


def available() -> bool:
    return importlib.util.find_spec("jax") is not None


def jax_step(name: str, p: dict) -> Callable:
    """The cell's equations as step(x, state) -> (out, state) on jax arrays (bench.eager_step's twin)."""
    import jax
    import jax.numpy as jnp
    sig = jax.nn.sigmoid

    def linear(x, key, bias=True):
        y = x @ p[f"{key}.weight"].T
        return y + p[f"{key}.bias"] if bias and f"{key}.bias" in p else y

    def layer_norm(v, key):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / jnp.sqrt(var + 1e-5) * p[f"{key}.weight"] + p[f"{key}.bias"]

    if name in ("lstm", "peephole_lstm", "layer_norm_lstm"):
        ln = name == "layer_norm_lstm"

        def step(x, st):
            h, c = st
            gx, gh = linear(x, "ih"), linear(h, "hh")
            if ln:
                gx, gh = layer_norm(gx, "ln_ih"), layer_norm(gh, "ln_hh")
            i, f, g, o = jnp.split(gx + gh, 4, axis=1)
            if name == "peephole_lstm":
                i, f = i + p["w_ci"] * c, f + p["w_cf"] * c
            c = sig(f) * c + sig(i) * jnp.tanh(g)
            if name == "peephole_lstm":
                o = o + p["w_co"] * c
            h = sig(o) * jnp.tanh(layer_norm(c, "ln_c") if ln else c)
            return h, (h, c)
        return step
    if name == "gru":
        def step(x, st):
            (h,) = st
            xr, xz, xn = jnp.split(linear(x, "ih"), 3, axis=1)
            hr, hz, hn = jnp.split(linear(h, "hh"), 3, axis=1)
            r, z = sig(xr + hr), sig(xz + hz)
            h = (1 - z) * jnp.tanh(xn + r * hn) + z * h
            return h, (h,)
        return step
    if name == "mufuru":
        def step(x, st):
            (s,) = st
            H = s.shape[1]
            gx, gh = linear(x, "ih"), linear(s, "hh")
            r = sig(gx[:, :H] + gh[:, :H])
            v = jnp.tanh(gx[:, H:2 * H] + linear(r * s, "hv", bias=False))
            w = jax.nn.softmax((gx[:, 2 * H:] + gh[:, H:]).reshape(-1, 8, H), axis=1)
            ops = jnp.stack([s, v, s * v, s - v, jnp.zeros_like(s), 0.25 * jnp.sqrt(jnp.abs(s - v)),
                             jnp.maximum(s, v), jnp.minimum(s, v)], 1)
            s = (w * ops).sum(1)
            return s, (s,)
        return step
    if name in ("qrnn", "qrnn_window2"):
        def step(x, st):
            gates = linear(x, "w")
            if name == "qrnn_window2":
                gates = gates + linear(st[1], "w_prev1", bias=False)
            z, f, o = jnp.split(gates, 3, axis=1)
            z, f, o = jnp.tanh(z), sig(f), sig(o)
            c = f * st[0] + (1 - f) * z
            return o * c, (c,) if name == "qrnn" else (c, x)
        return step
    if name == "mlstm":
        def step(x, st):
            C, n, m = st
            q, k, v, o = (linear(x, key) for key in "qkvo")
            k = k / k.shape[1] ** 0.5
            i_pre = linear(x, "i")
            log_f = jax.nn.log_sigmoid(linear(x, "f", bias=False) + p["f_bias"])
            m_next = jnp.maximum(log_f + m, i_pre)
            i, f = jnp.exp(i_pre - m_next), jnp.exp(log_f + m - m_next)
            C = f[:, :, None] * C + i[:, :, None] * (v[:, :, None] * k[:, None, :])
            n = f * n + i * k
            scale = jnp.maximum(jnp.abs((n * q).sum(-1, keepdims=True)), jnp.exp(-m_next))
            h = sig(o) * jnp.einsum("bij,bj->bi", C, q) / scale
            return h, (C, n, m_next)
        return step
    raise KeyError(name)


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
