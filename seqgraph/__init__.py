"""seqgraph: declare any recurrent cell as a symbolic graph, check it, compile it, see it.

    import seqgraph as sg
    x, h = sg.Input(8, name="x"), sg.State(16, name="h")
    h_next = sg.Tanh()(sg.Linear(8 + 16, 16)(sg.Concat()([x, h])))
    rnn = sg.Recurrence(sg.Cell(inputs=[x], states={h: h_next}, outputs=[h_next]))

The public API is re-exported here; internals are free to move. This module only
re-exports: it must not define behaviour of its own (tests/test_docs.py runs the example above).
"""
from .errors import GraphError, InputError, ShapeError, WiringError
from .dsl import (CAdd, CMul, Concat, Context, Dropout, Embedding, Identity, Input, LayerNorm, Linear, Module,
                  Noise, Parameter, ReLU, Sigmoid, State, Tanh, abs, chunk, concat, dropout, exp, layer_norm, log,
                  matmul, maximum, mean, minimum, narrow, relu, reshape, sigmoid, sign, softmax, split, sqrt, squeeze, stop_gradient,
                  sum, tanh, transpose, unsqueeze, where_mask)
from .attention import Attention
from .cell import Cell, Graph
from .recurrence import Recurrence

__version__ = "0.1.0"
from .viz import to_dot, render
from . import cells, nn  # noqa: E402  (sg.cells.lstm(...), sg.nn.LSTM(...))
from .cells import NormStabilizer  # noqa: E402
from .layers import Bidirectional, Repeater, SequenceLoss, Stack, reverse_sequences, stack  # noqa: E402
from .compiled import CompiledRecurrence, compile
