"""Regenerate the example pictures of docs/pictures.md: `python docs/img/make_pictures.py`.

The cells are written here with the DSL (not taken from a library) so that the pictures show
exactly the code beside them. Tooltips in the SVGs name this file's lines, relative to the
repository root. Needs Graphviz's `dot`.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import seqgraph as sg  # noqa: E402
from seqgraph import viz  # noqa: E402


def lstm_cell(I=4, H=8):
    x, h, c = sg.Input(I, name="x"), sg.State(H, name="h"), sg.State(H, name="c")
    gates = sg.Linear(I + H, 4 * H, name="gates")(sg.concat([x, h]))
    i, f, g, o = sg.chunk(gates, 4)
    c_next = (sg.sigmoid(f) * c + sg.sigmoid(i) * sg.tanh(g)).named("c_next")
    h_next = (sg.sigmoid(o) * sg.tanh(c_next)).named("h_next")
    return sg.Cell(inputs=[x], states={h: h_next, c: c_next}, outputs=[h_next], name="lstm")


def gru_cell(I=4, H=8):
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    z, r = sg.chunk(sg.sigmoid(sg.Linear(I + H, 2 * H, name="zr")(sg.concat([x, h]))), 2)
    n = sg.tanh(sg.Linear(I + H, H, name="candidate")(sg.concat([x, r * h])))
    h_next = ((1 - z) * n + z * h).named("h_next")
    return sg.Cell(inputs=[x], states={h: h_next}, name="gru")


def broken_cell(I=4, H=8):
    x, h = sg.Input(I, name="x"), sg.State(H, name="h")
    h_next = sg.tanh(sg.Linear(I + H, H // 2, name="step")(sg.concat([x, h])))  # H // 2: a bug
    return sg.Cell(inputs=[x], states={h: h_next}, name="broken")


def main() -> None:
    os.chdir(ROOT)  # tooltips then read docs/img/make_pictures.py:LINE
    out = os.path.relpath(HERE)
    try:  # first: its node numbers are then the same whatever compiling the others makes
        broken_cell()
    except sg.GraphError as err:
        sg.render(viz.error_dot(err), os.path.join(out, "error.svg"))
    else:
        raise AssertionError("broken_cell() was expected to raise a ShapeError")
    sg.render(lstm_cell(), os.path.join(out, "lstm_cell.svg"))
    sg.render(gru_cell(), os.path.join(out, "gru_unrolled_3.svg"), unroll=3)
    sg.render(gru_cell(), os.path.join(out, "gru_compact_3.svg"), unroll=3, compact=True)
    fast = sg.compile(sg.Recurrence(lstm_cell()), backend="torch")
    sg.render(fast, os.path.join(out, "lstm_plan.svg"))
    sg.render(fast, os.path.join(out, "lstm_plan_backward.svg"), backward=True)


if __name__ == "__main__":
    main()
