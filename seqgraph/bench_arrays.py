"""The bench cells' equations once, for any array library with numpy-style functions.

The benchmark's JAX and Keras peers (bench_jax.py, bench_keras.py) each run the same cells as
bench.eager_step, written here once against a namespace `xp` of array functions: `jax.numpy`
with `jax.nn`'s activations, or `keras.ops`. Only functions both share are used (matmul,
transpose, split, sigmoid, tanh, mean, sqrt, softmax, reshape, stack, zeros_like, abs, maximum,
minimum, log_sigmoid, exp, einsum, sum, expand_dims), never methods or keyword spellings that
differ between them. This module must not import either library.
"""
from __future__ import annotations

from typing import Callable


def array_step(name: str, p: dict, xp) -> Callable:
    """Cell `name`'s published equations as step(x, state) -> (out, state), with weights `p`
    (seqgraph's parameter names) and array functions `xp` (bench.eager_step's twin)."""
    def linear(x, key, bias=True):
        y = xp.matmul(x, xp.transpose(p[f"{key}.weight"]))
        return y + p[f"{key}.bias"] if bias and f"{key}.bias" in p else y

    def layer_norm(v, key):
        mu = xp.mean(v, axis=-1, keepdims=True)
        var = xp.mean((v - mu) * (v - mu), axis=-1, keepdims=True)
        return (v - mu) / xp.sqrt(var + 1e-5) * p[f"{key}.weight"] + p[f"{key}.bias"]

    sig = xp.sigmoid
    if name in ("lstm", "peephole_lstm", "layer_norm_lstm"):
        ln = name == "layer_norm_lstm"

        def step(x, st):
            h, c = st
            gx, gh = linear(x, "ih"), linear(h, "hh")
            if ln:
                gx, gh = layer_norm(gx, "ln_ih"), layer_norm(gh, "ln_hh")
            i, f, g, o = xp.split(gx + gh, 4, axis=1)
            if name == "peephole_lstm":
                i, f = i + p["w_ci"] * c, f + p["w_cf"] * c
            c = sig(f) * c + sig(i) * xp.tanh(g)
            if name == "peephole_lstm":
                o = o + p["w_co"] * c
            h = sig(o) * xp.tanh(layer_norm(c, "ln_c") if ln else c)
            return h, (h, c)
        return step
    if name == "gru":
        def step(x, st):
            (h,) = st
            xr, xz, xn = xp.split(linear(x, "ih"), 3, axis=1)
            hr, hz, hn = xp.split(linear(h, "hh"), 3, axis=1)
            r, z = sig(xr + hr), sig(xz + hz)
            h = (1 - z) * xp.tanh(xn + r * hn) + z * h
            return h, (h,)
        return step
    if name == "mufuru":
        def step(x, st):
            (s,) = st
            H = s.shape[1]
            gx, gh = linear(x, "ih"), linear(s, "hh")
            r = sig(gx[:, :H] + gh[:, :H])
            v = xp.tanh(gx[:, H:2 * H] + linear(r * s, "hv", bias=False))
            w = xp.softmax(xp.reshape(gx[:, 2 * H:] + gh[:, H:], (-1, 8, H)), axis=1)
            ops = xp.stack([s, v, s * v, s - v, xp.zeros_like(s), 0.25 * xp.sqrt(xp.abs(s - v)),
                            xp.maximum(s, v), xp.minimum(s, v)], axis=1)
            s = xp.sum(w * ops, axis=1)
            return s, (s,)
        return step
    if name in ("qrnn", "qrnn_window2"):
        def step(x, st):
            gates = linear(x, "w")
            if name == "qrnn_window2":
                gates = gates + linear(st[1], "w_prev1", bias=False)
            z, f, o = xp.split(gates, 3, axis=1)
            z, f, o = xp.tanh(z), sig(f), sig(o)
            c = f * st[0] + (1 - f) * z
            return o * c, (c,) if name == "qrnn" else (c, x)
        return step
    if name == "mlstm":
        def step(x, st):
            C, n, m = st
            q, k, v, o = (linear(x, key) for key in "qkvo")
            k = k / k.shape[1] ** 0.5
            i_pre = linear(x, "i")
            log_f = xp.log_sigmoid(linear(x, "f", bias=False) + p["f_bias"])
            m_next = xp.maximum(log_f + m, i_pre)
            i, f = xp.exp(i_pre - m_next), xp.exp(log_f + m - m_next)
            C = xp.expand_dims(f, 2) * C + xp.expand_dims(i, 2) * (xp.expand_dims(v, 2) * xp.expand_dims(k, 1))
            n = f * n + i * k
            scale = xp.maximum(xp.abs(xp.sum(n * q, axis=-1, keepdims=True)), xp.exp(-m_next))
            h = sig(o) * xp.einsum("bij,bj->bi", C, q) / scale
            return h, (C, n, m_next)
        return step
    raise KeyError(name)


__all__ = ["array_step"]
