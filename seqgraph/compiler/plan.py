"""The plan: everything the compiler decided for one cell, in a form people can read.

`build_plan` takes the optimised StepGraph and lays out the three phases of a call:
before the loop (invariants once, hoisted nodes for all T*B rows as big GEMMs), the loop
(stages of the step; the saved values; the state sequence) and the backward loop (the
derivative's stages, what it reads, and the weight-gradient reductions done once after the
loop as single large GEMMs). `Plan.describe(T, B)` writes it out with FLOPs, bytes and a memory
estimate. This module decides layout only and must not generate code; code generation
reads the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .derive_backward import StepDerivative, derive_backward
from .hoist import classify, folded_into_products_and_norms, keep_elementwise_in_loop, keep_expansions_in_loop
from .ir import Node, consumers, topo_order
from .ops import REGISTRY, fusable as triton_fusable
from .rematerialize import compared_values, rematerialize
from .schedule import Fusable, Stage, schedule
from .stepgraph import StepGraph


@dataclass
class BackwardPlan:
    deriv: StepDerivative
    pre: list[Node]  # derivative nodes that read only invariants: once, before the backward loop
    loop: list[Node]  # in the backward loop, per step
    post: list[Node]  # reductions over all steps (weight gradients): once, after the loop
    stash: list[Node]  # per-step values the post-loop reductions read, kept as (T, B, ...)
    accumulate: list[Node]  # read values of batch-carrying invariants: summed over steps in the loop
    saved: list[Node]  # forward loop values the derivative reads, saved as (T, B, ...)
    stages: list[Stage] = field(default_factory=list)
    recomputed: list[Node] = field(default_factory=list)  # forward values the backward step makes again (in loop)
    reads_used: set[int] = field(default_factory=set)  # ids of the loop's reads whose values backward reads


@dataclass
class Plan:
    step: StepGraph
    cls: dict[int, str]
    invariant: list[Node]  # once per call, before the loop
    hoisted: list[Node]  # for all T*B rows at once, before the loop
    reads: list[Node]  # hoisted/invariant values the loop reads (hoisted ones indexed by t)
    loop: list[Node]  # computed inside the loop, topological
    stages: list[Stage]
    backward: dict[bool, BackwardPlan] = field(default_factory=dict)  # keyed by "masked"
    unroll: int = 1
    fusable: Fusable = triton_fusable  # what the backend's kernels compute inline
    loops: str = "Python"  # how the backend runs the time loops (set by the backend's code generator)
    hoisted_stages: list[Stage] = field(default_factory=list)  # the hoisted nodes cut into stages as a step's are
    hoisted_kernels: str = ""  # how the backend runs hoisted_regions() (set by its code generator; "": torch ops)
    state_free_in_loop: list[Node] = field(default_factory=list)  # elementwise ops reading no state, computed in the loop

    def backward_ok(self, masked: bool) -> bool:
        """Whether the symbolic backward exists (else autograd runs the reference loop)."""
        try:
            self.backward_plan(masked)
            return True
        except NotImplementedError:
            return False

    def backward_plan(self, masked: bool) -> BackwardPlan:
        if masked not in self.backward:
            self.backward[masked] = _plan_backward(self, masked)
        return self.backward[masked]

    # -- reading the plan -------------------------------------------------------------------
    def hoisted_gemms(self) -> list[Node]:
        return [n for n in self.hoisted if REGISTRY[n.op].kind == "matmul"]

    def hoisted_regions(self) -> list[Stage]:
        """The fused stages of the hoisted nodes worth a kernel of their own, forward and backward:
        those with two ops or more beyond adding or scaling by unbatched values (a QRNN's gates
        over its input projection), where torch passes over all T*B rows once per op forward and
        again backward. A bias, a LayerNorm's scale and shift, and a sum of products (a QRNN's
        window: W x + W' x_prev1) do not count: torch folds them into the product or the norm."""
        folded = folded_into_products_and_norms(self.hoisted, self.cls)
        return [s for s in self.hoisted_stages
                if s.kind == "fused" and sum(_own_pass(n) and n.id not in folded for n in s.nodes) >= 2]

    def step_gemms(self) -> list[Node]:
        return [n for s in self.stages if s.kind == "gemm" for n in s.nodes]

    def describe(self, T: int | None = None, B: int | None = None, itemsize: int = 4) -> str:
        from .report import describe_plan
        return describe_plan(self, T, B, itemsize)

    def __str__(self) -> str:
        return self.describe()

    def to_dot(self, backward: bool = False):
        from .report import plan_dot
        return plan_dot(self, backward)


def _own_pass(n: Node) -> bool:
    """Whether torch code passes over a hoisted elementwise op's rows for it alone: not for a
    bias or scale (an add, sub or mul with an unbatched operand), which it folds into the product
    or the LayerNorm before it."""
    if REGISTRY[n.op].kind != "elementwise":
        return False
    return n.op not in ("add", "sub", "mul") or all(i.batched for i in n.inputs)


def _slices_into_loop(order: list[Node], cls: dict[int, str], results: set[int]) -> None:
    """A hoisted slice read only inside the loop (a gate's piece of the input projection) is
    taken inside the loop instead: the loop then reads one (T, B, W) tensor, not one per piece,
    and its gradient is one tensor too (not a zero-filled copy per piece)."""
    users = consumers(order)
    for n in reversed(order):
        if n.op == "slice" and cls[n.id] == "hoisted" and n.batched and \
                all(cls[u.id] == "step" for u in users.get(n.id, [])) and (users.get(n.id) or n.id in results):
            cls[n.id] = "step"


def build_plan(step: StepGraph, unroll: int = 1, fusable: Fusable = triton_fusable, fused_loop: bool = False,
               norms_in_loop: bool = False) -> Plan:
    """`fused_loop`: the backend runs each fused stage of a step as one kernel (C, Triton), so
    hoisted elementwise ops that only those stages read are better computed there; with
    `norms_in_loop` (C), row norms too (see keep_elementwise_in_loop)."""
    order = step.order()
    cls = classify(order)
    keep_expansions_in_loop(order, cls, {r.id for r in step.results})
    in_loop = keep_elementwise_in_loop(order, cls, {r.id for r in step.results}, fusable, norms_in_loop) \
        if fused_loop else []
    _slices_into_loop(order, cls, {r.id for r in step.results})
    loop = [n for n in order if cls[n.id] == "step" and n.inputs]
    in_loop_reads: dict[int, Node] = {}
    for n in loop:
        for i in n.inputs:
            if cls[i.id] != "step" and i.op != "const":
                in_loop_reads.setdefault(i.id, i)
    for r in step.results:  # results that do not depend on a state are read from before the loop
        if cls[r.id] != "step":
            in_loop_reads.setdefault(r.id, r)
    reads = [n for n in order if n.id in in_loop_reads]
    pre = topo_order(reads)
    invariant = [n for n in pre if cls[n.id] == "invariant" and n.inputs]
    hoisted = [n for n in pre if cls[n.id] == "hoisted" and n.inputs]
    live_after = {r.id for r in step.results}
    stages = schedule(loop, live_after, fusable)
    hoisted_stages = schedule(hoisted, {r.id for r in reads}, fusable)
    return Plan(step, cls, invariant, hoisted, reads, loop, stages, unroll=unroll, fusable=fusable,
                hoisted_stages=hoisted_stages, state_free_in_loop=in_loop)


def result_dependencies(plan: Plan) -> tuple:
    """For each output of the step, then each next state: (the indices of the loop's reads,
    the indices of the states) that it reads within one step."""
    read_at = {r.id: k for k, r in enumerate(plan.reads)}
    state_at = {p.id: j for j, (p, _) in enumerate(plan.step.states)}
    memo: dict[int, tuple[frozenset, frozenset]] = {}

    def deps(n: Node) -> tuple[frozenset, frozenset]:
        if n.id not in memo:
            if n.id in read_at:
                memo[n.id] = (frozenset([read_at[n.id]]), frozenset())
            elif n.id in state_at:
                memo[n.id] = (frozenset(), frozenset([state_at[n.id]]))
            else:
                parts = [deps(i) for i in n.inputs]
                memo[n.id] = (frozenset().union(*(r for r, _ in parts)), frozenset().union(*(s for _, s in parts)))
        return memo[n.id]
    for n in plan.step.order():  # (in order: no deep recursion)
        deps(n)
    return tuple(deps(n) for n in plan.step.results)


def derivative_nodes_roots(d: StepDerivative) -> list[Node]:
    return [g for g in d.grad_prev if g is not None] + list(d.grad_of.values())


def _plan_backward(plan: Plan, masked: bool) -> BackwardPlan:
    step = plan.step
    float_reads = [r for r in plan.reads if r.dtype == "float"]
    deriv = derive_backward(plan.loop, step.states, step.outputs, float_reads, masked)
    loop_ids = {n.id for n in plan.loop}
    read_ids = {r.id for r in plan.reads}
    prev_ids = {p.id for p, _ in step.states}
    # the derivative's own nodes; forward values, reads and leaves are bound, never recomputed
    nodes = topo_order(derivative_nodes_roots(deriv), stop=loop_ids | read_ids | prev_ids | deriv.leaves)
    # where each derivative node runs: "fwd" (a forward value), "inv" (invariant), "step", "post"
    where: dict[int, str] = {}
    for n in nodes:
        if n.id in loop_ids:
            where[n.id] = "fwd"
        elif n.id in deriv.leaves or n.id in prev_ids:
            where[n.id] = "step"
        elif n.id in read_ids:
            where[n.id] = "step" if plan.cls[n.id] == "hoisted" else "inv"
        elif not n.inputs:
            where[n.id] = "inv" if n.op in ("const", "param", "context") or plan.cls.get(n.id) == "invariant" else "step"
        else:
            kinds = {where[i.id] for i in n.inputs}
            if kinds <= {"inv"}:
                where[n.id] = "inv"
            elif "post" in kinds or (not n.batched and kinds & {"step", "fwd"}):
                where[n.id] = "post"
            else:
                where[n.id] = "step"
    post = [n for n in nodes if where[n.id] == "post"]
    for n in post:
        if not REGISTRY[n.op].sums_rows and n.op != "add":
            raise NotImplementedError(f"the derivative reduces over steps through {n.op!r}, which the "
                                      f"compiler cannot move after the loop")
    stash_ids: dict[int, Node] = {}
    for n in post:
        for i in n.inputs:
            if where[i.id] in ("step", "fwd") and i.batched:
                stash_ids.setdefault(i.id, i)
    stash = [n for n in nodes if n.id in stash_ids]
    bound = loop_ids | read_ids | prev_ids | deriv.leaves
    pre = [n for n in nodes if where[n.id] == "inv" and n.inputs and n.id not in bound]
    loop = [n for n in nodes if where[n.id] == "step" and n.inputs and n.id not in bound]
    accumulate = [r for r in float_reads if r.id in deriv.grad_of and plan.cls[r.id] == "invariant" and r.batched]
    used = {i.id for n in loop + post for i in n.inputs} | {n.id for n in stash}
    roots = {g.id for g in deriv.grad_prev if g is not None} | {g.id for g in deriv.grad_of.values()}
    saved = [n for n in plan.loop if n.id in used or n.id in roots]
    keep = roots | stash_ids.keys() | compared_values(nodes)
    saved, recomputed = rematerialize(plan.loop, saved, read_ids | prev_ids, keep, plan.fusable)
    loop = recomputed + loop
    live_after = {n.id for n in stash} | roots
    stages = schedule(loop, live_after, plan.fusable)
    reads_used = ({i.id for n in pre + loop + post for i in n.inputs} | {n.id for n in stash}) & read_ids
    return BackwardPlan(deriv, pre, loop, post, stash, accumulate, saved, stages, recomputed, reads_used)
