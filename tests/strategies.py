"""Hypothesis strategies for random cells, shared by the property tests of every backend.

A cell is drawn as a *recipe*: plain data (sizes and a list of steps over a pool of values)
that `build_cell` turns into an sg.Cell. Recipes shrink well and print readably when a
property fails, and building is deterministic, so a failing recipe is a reproducible bug.

    from strategies import cell_recipes, broken_recipes, build_cell
    @given(cell_recipes())
    def test_something(recipe):
        cell, input_sizes = build_cell(recipe)            # a valid cell
    @given(broken_recipes())
    def test_broken(recipe):
        with pytest.raises(sg.GraphError): build_cell(recipe)

Every value in a recipe's pool is a batched vector (per-example shape (k,)). The pool starts as
the inputs, the states and maybe a state holding an input from the step before (`delayed`);
each step appends one value (two for `chunk`) made from earlier ones. Whatever the steps leave
unconsumed (including unused inputs, states and chunk pieces) is concatenated into `final`,
the cell's output, and each next state is a Linear of `final` (a delayed one's is its input),
so every drawn recipe is a valid cell. `broken_recipes()` adds one `breakage` that the checker
must reject. The menu avoids non-differentiable points where it can (exp only of a tanh,
division only by 1 + b^2, log only of 1 + exp), so valid cells pass float64 gradcheck.
This module only draws and builds graphs; it must not run them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

import seqgraph as sg

UNARY = ("tanh", "sigmoid", "relu", "neg", "abs", "exp_of_tanh", "softplus", "smooth_sqrt", "layer_norm",
         "softmax")
BINARY = ("add", "sub", "mul", "safe_div", "maximum", "minimum")
WITH_CONSTANT = ("add", "mul", "rsub", "rdiv_safe")
CONSTANTS = (-1.5, -0.5, 0.5, 2.0)
MATVEC_FORMS = ("matmul", "sum_columns", "sum_rows", "transposed", "matrices")  # sum_rows, transposed contract the rows
BREAKAGES = ("unused_input", "wrong_next_shape", "linear_mismatch", "state_without_next", "unused_chunk_piece")
MAX_SIZE = 8


@dataclass(frozen=True)
class Step:
    """One value (two for chunk) made from pool values `args`.
    kind: linear | unary | binary | constant | param | concat | chunk | reduce | column_plus |
    matvec; `arg` is the out size (linear), op name (unary, binary), (op, number) (constant),
    "add"/"mul" (param), (sum|mean, keepdim) (reduce) or the form of a matvec (MATVEC_FORMS).
    column_plus is a one-column Linear of the first arg broadcast over the second:
    Linear(a, 1, bias=False)(args[0]) + args[1]. matvec multiplies a per-example matrix made
    from args[0] (M,) and args[1] (N,) (their outer product through matmul, or a tanh over
    broadcast operands) by the vector args[2], as attention does: matrix @ c (c of size N) or
    c @ matrix (c of size M), in one of the forms users write them; "matrices" first multiplies
    the matrix by a transposed (N, N) one made from c and takes a softmax along its rows, as
    multi-head attention does."""
    kind: str
    args: tuple
    arg: object = None


@dataclass(frozen=True)
class CellRecipe:
    input_sizes: tuple
    state_sizes: tuple
    steps: tuple = field(default_factory=tuple)
    breakage: str | None = None
    delayed: tuple = ()  # indices of inputs that a state "d<k>" holds from the step before (next value: the input)

    def __post_init__(self):
        if self.breakage not in (None,) + BREAKAGES:
            raise ValueError(f"unknown breakage {self.breakage!r}")


def _out_sizes(step: Step, sizes: list) -> list:
    a = sizes[step.args[0]]
    if step.kind == "linear":
        return [step.arg]
    if step.kind in ("unary", "constant", "param"):
        return [a]
    if step.kind == "binary":
        return [max(a, sizes[step.args[1]])]
    if step.kind == "concat":
        return [a + sizes[step.args[1]]]
    if step.kind == "chunk":
        return [a // 2, a // 2]
    if step.kind == "reduce":
        return [1]
    if step.kind == "column_plus":
        return [sizes[step.args[1]]]
    if step.kind == "matvec":
        return [sizes[step.args[1]] if step.arg in ("sum_rows", "transposed") else a]
    raise ValueError(f"unknown step kind {step.kind!r}")


@st.composite
def cell_recipes(draw, max_steps: int = 5, max_size: int = 4, breakage: str | None = None) -> CellRecipe:
    """A random valid cell: 1-2 inputs, 1-2 states, up to `max_steps` steps, sizes 1..max_size,
    and maybe a state holding an input from the step before (read like an input when compiled)."""
    inputs = tuple(draw(st.lists(st.integers(1, max_size), min_size=1, max_size=2)))
    states = tuple(draw(st.lists(st.integers(1, max_size), min_size=1, max_size=2)))
    delayed = tuple(draw(st.lists(st.integers(0, len(inputs) - 1), max_size=1)))
    sizes = list(inputs + states) + [inputs[k] for k in delayed]
    stateful = [False] * len(inputs) + [True] * len(states) + [False] * len(delayed)  # does the value read a state?
    steps = []
    for _ in range(draw(st.integers(0, max_steps))):
        i = draw(st.integers(0, len(sizes) - 1))
        a = sizes[i]
        kinds = ["linear", "unary", "binary", "constant", "param", "concat", "reduce", "column_plus", "matvec"]
        if a % 2 == 0:
            kinds.append("chunk")
        kind = draw(st.sampled_from(kinds))
        if kind == "linear":
            step = Step(kind, (i,), draw(st.integers(1, max_size)))
        elif kind == "unary":
            ops = [u for u in UNARY if a >= 2 or u not in ("layer_norm", "softmax")]
            step = Step(kind, (i,), draw(st.sampled_from(ops)))
        elif kind == "binary":
            # a partner of the same size, or of size 1 (broadcast); fall back to `a` itself
            partners = [j for j, s in enumerate(sizes) if s == a or s == 1 or a == 1]
            step = Step(kind, (i, draw(st.sampled_from(partners))), draw(st.sampled_from(BINARY)))
        elif kind == "constant":
            step = Step(kind, (i,), (draw(st.sampled_from(WITH_CONSTANT)), draw(st.sampled_from(CONSTANTS))))
        elif kind == "param":
            step = Step(kind, (i,), draw(st.sampled_from(("add", "mul"))))
        elif kind == "concat":
            partners = [j for j, s in enumerate(sizes) if a + s <= MAX_SIZE]
            if not partners:
                continue
            step = Step(kind, (i, draw(st.sampled_from(partners))))
        elif kind == "chunk":
            step = Step(kind, (i,))
        elif kind == "column_plus":  # both operands before the loop, or both in the step
            step = Step(kind, (i, draw(st.sampled_from([j for j, f in enumerate(stateful) if f == stateful[i]]))))
        elif kind == "matvec":
            j, form = draw(st.integers(0, len(sizes) - 1)), draw(st.sampled_from(MATVEC_FORMS))
            contracted = a if form in ("sum_rows", "transposed") else sizes[j]
            k = draw(st.sampled_from([m for m, s in enumerate(sizes) if s == contracted]))
            step = Step(kind, (i, j, k), form)
        else:
            step = Step(kind, (i,), (draw(st.sampled_from(("sum", "mean"))), draw(st.booleans())))
        new = _out_sizes(step, sizes)
        sizes += new
        stateful += [any(stateful[j] for j in step.args)] * len(new)
        steps.append(step)
    return CellRecipe(inputs, states, tuple(steps), breakage, delayed)


def broken_recipes(max_steps: int = 5, max_size: int = 4):
    """A random cell with exactly one wiring or shape mistake (see BREAKAGES)."""
    return st.sampled_from(BREAKAGES).flatmap(
        lambda b: cell_recipes(max_steps=max_steps, max_size=max_size, breakage=b))


def _unary(name: str, a):
    if name == "exp_of_tanh":
        return sg.exp(sg.tanh(a))
    if name == "softplus":
        return sg.log(1.0 + sg.exp(sg.tanh(a) * 3.0))
    if name == "smooth_sqrt":
        return sg.sqrt(a * a + 1.0)
    if name == "layer_norm":
        return sg.layer_norm(a)
    if name == "softmax":
        return sg.softmax(a)
    return getattr(sg, name)(a) if name != "neg" else -a


def _binary(name: str, a, b):
    if name == "add":
        return a + b
    if name == "sub":
        return a - b
    if name == "mul":
        return a * b
    if name == "safe_div":
        return a / (1.0 + b * b)
    return getattr(sg, name)(a, b)


def _constant(op: str, c: float, a):
    if op == "add":
        return a + c
    if op == "mul":
        return c * a
    if op == "rsub":
        return c - a
    return c / (1.0 + a * a)


def _matvec(form: str, a, b, c):
    if form in ("matmul", "sum_rows"):  # (M, N) per example, elementwise over broadcast operands
        matrix = sg.tanh(sg.unsqueeze(a, -1) * sg.unsqueeze(b, 0) + sg.unsqueeze(b, 0))
    else:  # or a product of a column and a row
        matrix = sg.matmul(sg.unsqueeze(a, -1), sg.unsqueeze(b, 0))
    if form == "matrices":
        square = sg.tanh(sg.unsqueeze(c, -1) * sg.unsqueeze(c, 0) + sg.unsqueeze(c, 0))
        matrix = sg.softmax(sg.matmul(matrix, sg.transpose(square)))
    if form in ("matmul", "matrices"):
        return sg.squeeze(sg.matmul(matrix, sg.unsqueeze(c, -1)), -1)
    if form == "sum_columns":
        return sg.sum(matrix * sg.unsqueeze(c, 0), dim=1)
    if form == "transposed":
        return sg.reshape(sg.matmul(sg.transpose(matrix), sg.unsqueeze(c, -1)), (b.shape[0],))
    return sg.sum(matrix * sg.unsqueeze(c, -1), dim=0)


def _positive_init(t):
    """Parameters in [0.5, 1.5): a module-level function, so a built cell pickles."""
    return t.uniform_(0.5, 1.5)


def build_cell(recipe: CellRecipe) -> tuple[sg.Cell, list[int]]:
    """The sg.Cell a recipe describes, and its input sizes (in the order forward() takes them).
    A recipe with a `breakage` raises the sg.GraphError the checker gives for it."""
    broken = recipe.breakage
    inputs = [sg.Input(s, name=f"x{k}") for k, s in enumerate(recipe.input_sizes)]
    states = [sg.State(s, name=f"h{k}") for k, s in enumerate(recipe.state_sizes)]
    delayed = [sg.State(inputs[k].shape, name=f"d{k}") for k in recipe.delayed]
    pool = list(inputs) + list(states) + delayed
    consumed: set[int] = set()
    for step in recipe.steps:
        a = pool[step.args[0]]
        consumed.update(step.args)
        if step.kind == "linear":
            pool.append(sg.Linear(a.shape[0], step.arg)(a))
        elif step.kind == "unary":
            pool.append(_unary(step.arg, a))
        elif step.kind == "binary":
            pool.append(_binary(step.arg, a, pool[step.args[1]]))
        elif step.kind == "constant":
            pool.append(_constant(step.arg[0], step.arg[1], a))
        elif step.kind == "param":
            p = sg.Parameter(a.shape, init=_positive_init)
            pool.append(a * p if step.arg == "mul" else a + p)
        elif step.kind == "concat":
            pool.append(sg.concat([a, pool[step.args[1]]]))
        elif step.kind == "chunk":
            pool.extend(sg.chunk(a, 2))
        elif step.kind == "column_plus":
            pool.append(sg.Linear(a.shape[0], 1, bias=False)(a) + pool[step.args[1]])
        elif step.kind == "matvec":
            pool.append(_matvec(step.arg, a, pool[step.args[1]], pool[step.args[2]]))
        else:
            fn, keepdim = step.arg
            r = getattr(sg, fn)(a, dim=-1, keepdim=keepdim)
            pool.append(r if keepdim else sg.unsqueeze(r, 0))
    sinks = [v for k, v in enumerate(pool) if k not in consumed]
    extra_inputs = []
    if broken == "unused_input":
        extra_inputs.append(sg.Input(2, name="unused"))
    if broken == "state_without_next":
        sinks.append(sg.State(2, name="orphan"))
    final = sinks[0] if len(sinks) == 1 else sg.concat(sinks)
    if broken == "unused_chunk_piece":
        doubled = final if final.shape[0] % 2 == 0 else sg.concat([final, final])
        final = sg.chunk(doubled, 2)[0]
    width = final.shape[0] + (1 if broken == "linear_mismatch" else 0)
    nexts = {}
    for k, h in enumerate(states):
        out = h.shape[0] + (1 if broken == "wrong_next_shape" and k == 0 else 0)
        nexts[h] = sg.tanh(sg.Linear(width, out, name=f"next_h{k}")(final))
    for k, d in zip(recipe.delayed, delayed):
        nexts[d] = inputs[k]
    cell = sg.Cell(inputs=inputs + extra_inputs, states=nexts, outputs=[final])
    return cell, list(recipe.input_sizes)


__all__ = ["CellRecipe", "Step", "cell_recipes", "broken_recipes", "build_cell", "BREAKAGES"]
