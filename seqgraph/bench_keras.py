"""The benchmark's Keras peer: each bench cell as a Keras 3 RNN layer on the torch backend.

`python -m seqgraph bench --peers keras,...` adds a row per cell for Keras, on the same device
and tensors as the other peers: Keras 3 runs on torch here (KERAS_BACKEND=torch), so its
layers take and give torch tensors and its backward is torch's autograd. The LSTM and GRU are
Keras's own `keras.layers.LSTM` and `GRU` (cuDNN through torch on a GPU, where Keras's rules
allow it; else Keras's step loop); every other cell is what a Keras user writes for a cell of
their own: a cell layer whose `call` runs the cell's equations (bench_arrays.py) on
`keras.ops`, inside `keras.layers.RNN`. The weights are the seqgraph cell's, copied (Keras
keeps its LSTM's two biases as one, their sum). Keras is not a dependency of seqgraph: without
it, asking for this peer is refused by name, and a Keras already imported with another backend
is refused too. This module only builds the peer; bench.py times it. It must not import keras
at module level.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable

import torch

from .bench_arrays import array_step


def available() -> bool:
    return importlib.util.find_spec("keras") is not None


def _keras():
    """keras, imported on the torch backend (or refused if it already runs on another)."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    import keras
    if keras.backend.backend() != "torch":
        raise RuntimeError(f"the Keras peer needs Keras on the torch backend, but this process imported Keras on "
                           f"{keras.backend.backend()!r}: set KERAS_BACKEND=torch before importing it")
    return keras


def _gate_rows(w: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """w's gate blocks (rows of len(order) equal parts) in the order `order`."""
    parts = w.chunk(len(order), 0)
    return torch.cat([parts[k] for k in order], 0)


def _builtin_layer(keras, name: str, p: dict[str, torch.Tensor], H: int, dtype: str):
    """keras.layers.LSTM or GRU holding seqgraph's weights (the LSTM's gates i, f, g, o are Keras's
    order too; the GRU's r, z, n become Keras's z, r, h, with its two biases kept apart)."""
    W = {k: v.detach().cpu().double() for k, v in p.items()}
    if name == "lstm":
        layer = keras.layers.LSTM(H, return_sequences=True, dtype=dtype)
        values = [W["ih.weight"].T, W["hh.weight"].T, W["ih.bias"] + W["hh.bias"]]
    else:
        layer = keras.layers.GRU(H, return_sequences=True, reset_after=True, dtype=dtype)
        zrn = (1, 0, 2)
        values = [_gate_rows(W["ih.weight"], zrn).T, _gate_rows(W["hh.weight"], zrn).T,
                  torch.stack([_gate_rows(W["ih.bias"], zrn), _gate_rows(W["hh.bias"], zrn)])]
    layer.build((None, None, W["ih.weight"].shape[1]))
    layer.set_weights([v.numpy() for v in values])
    return layer


def _cell_layer(keras, name: str, p: dict[str, torch.Tensor], state_shapes: list[tuple[int, ...]], dtype: str):
    """keras.layers.RNN over a cell layer of our own: seqgraph's weights as its variables, the
    cell's equations on keras.ops as its call."""
    class Cell(keras.layers.Layer):
        def __init__(self):
            super().__init__(dtype=dtype)
            self.state_size = [s if len(s) > 1 else s[0] for s in state_shapes]
            self.output_size = state_shapes[0][0]
            self.keys = sorted(p)
            for i, k in enumerate(self.keys):
                v = p[k].detach().cpu().double().numpy()
                setattr(self, f"w{i}", self.add_weight(shape=v.shape, initializer=keras.initializers.Constant(v),
                                                       name=k.replace(".", "_")))

        def get_initial_state(self, batch_size):
            return [keras.ops.zeros((batch_size,) + s, dtype=self.compute_dtype) for s in state_shapes]

        def call(self, x, states):
            weights = {k: getattr(self, f"w{i}") for i, k in enumerate(self.keys)}
            out, new = array_step(name, weights, keras.ops)(x, tuple(states))
            return out, list(new)
    return keras.layers.RNN(Cell(), return_sequences=True, dtype=dtype)


def keras_layer(name: str, params: dict[str, torch.Tensor], state_shapes: list[tuple[int, ...]],
                device: torch.device, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The cell as a Keras layer, as a function of x (T, B, I) -> outputs (T, B, H) from zero
    states, on `device` in `dtype`."""
    keras = _keras()
    dt = str(dtype).replace("torch.", "")
    with keras.device(device.type):
        if name in ("lstm", "gru"):
            layer = _builtin_layer(keras, name, params, state_shapes[0][0], dt)
        else:
            layer = _cell_layer(keras, name, params, state_shapes, dt)

    def run(x: torch.Tensor) -> torch.Tensor:
        with keras.device(device.type):
            return layer(x.transpose(0, 1)).transpose(0, 1)  # Keras's RNN layers take (B, T, I)
    return run


__all__ = ["available", "keras_layer"]
