"""The compiler pipeline: the ordered list of passes, run with timings and debug dumps.

`compile_plan(cell)` runs each pass (a plain function StepGraph -> StepGraph) in order, writes
outputs of per-example matrices as flat rows (the compiled module reshapes them), then lays out
the plan and derives both backward variants (with and without masking), so that
`plan()` can show everything before anything runs. SEQGRAPH_DEBUG=1 prints each pass with its
time, 2 adds the IR after each pass, 3 adds the generated source (printed by the backend).
Must not generate code.
"""
from __future__ import annotations

import sys
import time

from ..settings import debug_level
from .flatten_per_example_matrices import flatten_per_example_matrices, write_matrix_outputs_as_rows
from .fuse_gate_matmuls import fuse_gate_matmuls
from .hoist_loop_invariant_terms import hoist_loop_invariant_terms
from .hoist_previous_inputs import hoist_previous_inputs
from .ir import format_graph
from .ops import fusable as triton_fusable
from .plan import Plan, build_plan
from .simplify import simplify
from .split_linear_over_concat import split_linear_over_concat
from .stepgraph import StepGraph

PASSES = [simplify, hoist_previous_inputs, flatten_per_example_matrices, split_linear_over_concat, fuse_gate_matmuls,
          hoist_loop_invariant_terms, simplify]


def compile_plan(cell, unroll: int = 1, fusable=None, fused_loop: bool = False, norms_in_loop: bool = False) -> Plan:
    """The plan of `cell`; `fusable(node) -> (ok, why)` says what the backend's kernels compute
    inline (default: the Triton rules); `fused_loop`: they run each fused stage of a step as one
    kernel (the cpu and triton backends; the torch backend runs an op at a time);
    `norms_in_loop`: its backward loops also sum a vector weight's gradient over the steps as
    they go (the cpu backend), so state-free row norms are computed in the loop too."""
    level = debug_level()
    step = StepGraph.from_cell(cell)
    if level >= 2:
        print(f"[seqgraph] IR of {cell!r}:\n{format_graph(step.order())}", file=sys.stderr)
    for p in PASSES:
        t0 = time.perf_counter()
        step = p(step)
        if level >= 1:
            print(f"[seqgraph] pass {p.__name__}: {1e3 * (time.perf_counter() - t0):.2f} ms; {step.notes[-1]}",
                  file=sys.stderr)
        if level >= 2:
            print(f"[seqgraph] IR after {p.__name__}:\n{format_graph(step.order())}", file=sys.stderr)
    step = write_matrix_outputs_as_rows(step)
    t0 = time.perf_counter()
    plan = build_plan(step, unroll, fusable or triton_fusable, fused_loop, norms_in_loop)
    for masked in (False, True):
        try:
            plan.backward_plan(masked)
        except NotImplementedError as e:
            step.notes.append(f"backward ({'masked' if masked else 'plain'}) falls back to autograd over the "
                              f"reference loop: {e}")
    if level >= 1:
        print(f"[seqgraph] plan and derivative: {1e3 * (time.perf_counter() - t0):.2f} ms", file=sys.stderr)
    return plan
