"""`sg.Attention`: a decoder step's attention over a per-example memory, as a DSL module.

`Attention(query_size, memory_size, score=...)` called on `[query, memory]` or `[query,
memory, mask]` returns `(context, weights)`: the scores of the memory's S rows against the
query, a softmax over the rows the mask keeps, and the weighted sum of the rows. The scores are
Luong's "dot" (`memory @ query`), "scaled_dot" (divided by sqrt(D), as a Transformer's),
"general" (`memory @ (W q)`) or Bahdanau's "additive" (`v . tanh(W_k memory + W_q query)`).
With `heads=h` the product scores split the query and the memory's features into h equal
parts, each attending on its own (a Transformer's multi-head attention, its projections left
to the caller), and the context joins the h parts.
It builds only DSL ops, written in the forms the compiler's pass flatten_per_example_matrices
turns into row ops, so every backend compiles it and the cpu backend runs a decoder using it
in one C loop. Builds graphs only; it must not run anything.
"""
from __future__ import annotations

import math

from .compiler.ir import Node
from .dsl import (Module, _count, _list_of_nodes, _node, _uniform, matmul, reshape, softmax, squeeze, tanh,
                  transpose, unsqueeze, where_mask)
from .dsl import abs as sg_abs, sum as sg_sum
from .errors import ShapeError, mention, user_site

SCORES = ("dot", "scaled_dot", "general", "additive")
_EXAMPLE = "sg.Attention(Q, D)([query, memory, mask])"


class Attention(Module):
    """Attention of a query (query_size,) over a memory (S, memory_size) per example; called on
    [query, memory] or [query, memory, mask] (mask: (S,), 1 where a row may be attended, 0 at
    padding, the opposite of torch's key_padding_mask), it returns (context (memory_size,),
    weights (S,)). `hidden_size`: the additive score's hidden width (default memory_size).
    `heads`: with h > 1 (a product score), head k attends with features k*D/h to (k+1)*D/h of
    the query and of the memory's rows, its scores scaled by sqrt(D/h) for "scaled_dot"; the
    weights are then (h, S) and the context the heads' contexts end to end.
    Keras: Attention / AdditiveAttention (whose additive score has no learned weights),
    MultiHeadAttention (with the projections written as sg.Linear around this)."""

    def __init__(self, query_size: int, memory_size: int, score: str = "dot", hidden_size: int | None = None,
                 heads: int = 1, name: str | None = None):
        super().__init__(name)
        where = f"Attention (declared at {self.site})"
        self.query_size = _count(query_size, f"{where}: query_size")
        self.memory_size = _count(memory_size, f"{where}: memory_size")
        if score not in SCORES:
            raise ValueError(f"{where}: score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")
        if score in ("dot", "scaled_dot") and self.query_size != self.memory_size:
            raise ValueError(f"{where}: a {score!r} score multiplies the memory's rows by the query, so "
                             f"query_size ({self.query_size}) must equal memory_size ({self.memory_size}); "
                             f"score='general' or 'additive' maps one to the other")
        if hidden_size is not None and score != "additive":
            raise ValueError(f"{where}: hidden_size is the additive score's hidden width; a {score!r} score "
                             f"has none")
        self.heads = _count(heads, f"{where}: heads")
        if self.heads > 1 and score == "additive":
            raise ValueError(f"{where}: heads split a product score's features; an 'additive' score has one "
                             f"head (use score='scaled_dot' for a Transformer's multi-head attention)")
        if self.memory_size % self.heads:
            raise ValueError(f"{where}: heads={self.heads} split the memory_size ({self.memory_size}) features "
                             f"into equal parts, so it must divide memory_size")
        self.score = score
        self.hidden_size = _count(hidden_size if hidden_size is not None else self.memory_size,
                                  f"{where}: hidden_size")
        # its own parameters, initialised as torch.nn.Linear's: state_dict keys `attention.keys_weight`
        def weight(pname: str, out: int, inp: int) -> Node:
            return self._param(pname, (out, inp), _uniform(1.0 / math.sqrt(inp)))
        if score == "general":
            self.general_weight = weight("general_weight", self.memory_size, self.query_size)
        elif score == "additive":
            self.keys_weight = weight("keys_weight", self.hidden_size, self.memory_size)
            self.query_weight = weight("query_weight", self.hidden_size, self.query_size)
            self.query_bias = self._param("query_bias", (self.hidden_size,),
                                          _uniform(1.0 / math.sqrt(self.query_size)))
            self.v_weight = weight("v_weight", 1, self.hidden_size)

    def __call__(self, *args, mask: Node | None = None) -> tuple[Node, Node]:
        """attend([query, memory]) or attend([query, memory, mask]); Keras's mask= works too."""
        if mask is not None and len(args) == 1:
            args = ([*_list_of_nodes(args[0], "Attention", _EXAMPLE), mask],)
        return super().__call__(*args)

    def forward(self, xs) -> tuple[Node, Node]:
        parts = _list_of_nodes(xs, "Attention", _EXAMPLE)
        if len(parts) not in (2, 3):
            raise TypeError(f"Attention (declared at {self.site}) takes [query, memory] or [query, memory, mask], "
                            f"got {len(parts)} node{'s' if len(parts) != 1 else ''} (at {user_site()})")
        query, memory = _node(parts[0], "Attention"), _node(parts[1], "Attention")
        mask = _node(parts[2], "Attention") if len(parts) == 3 else None
        self._check(query, memory, mask)
        if self.score == "additive":
            keys = self._make("linear", (memory, self.keys_weight))  # (once per call for a Context)
            q = self._make("add", (self._make("linear", (query, self.query_weight)), self.query_bias))
            scores = squeeze(self._make("linear", (tanh(keys + unsqueeze(q, 0)), self.v_weight)), -1)
        else:
            q = self._make("linear", (query, self.general_weight)) if self.score == "general" else query
            if self.heads > 1:
                return self._heads(q, memory, mask)
            scores = squeeze(matmul(memory, unsqueeze(q, -1)), -1)
            if self.score == "scaled_dot":
                scores = scores * (1.0 / math.sqrt(self.memory_size))
        weights = self._weights(scores, mask)
        context = sg_sum(memory * unsqueeze(weights, -1), dim=0, name=f"{self.name}_context" if self.name else None)
        return context, weights

    def _weights(self, scores: Node, mask: Node | None) -> Node:
        """softmax of the scores (S,) or (heads, S) along S, padding masked out."""
        if mask is not None:
            # a row at padding scores 10000 below every real row's score, whatever their scale
            # (sum |real scores| bounds each one): no weight; all padding gives equal weights
            below = sg_sum(sg_abs(scores * mask), keepdim=True) + 1e4
            scores = where_mask(mask, scores, -below)
        return softmax(scores, name=f"{self.name}_weights" if self.name else None)

    def _heads(self, q: Node, memory: Node, mask: Node | None) -> tuple[Node, Node]:
        """Multi-head attention: head k reads features k*Dh to (k+1)*Dh of q and of each row."""
        h, S, Dh = self.heads, memory.shape[0], self.memory_size // self.heads
        keys = transpose(reshape(memory, (S, h, Dh)), 0, 1)  # (h, S, Dh): a view, no copy in the loops
        scores = reshape(matmul(reshape(q, (h, 1, Dh)), transpose(keys)), (h, S))
        if self.score == "scaled_dot":
            scores = scores * (1.0 / math.sqrt(Dh))
        weights = self._weights(scores, mask)
        context = reshape(matmul(reshape(weights, (h, 1, S)), keys), (self.memory_size,),
                          name=f"{self.name}_context" if self.name else None)
        return context, weights

    def _check(self, query: Node, memory: Node, mask: Node | None) -> None:
        """A ShapeError naming the operand whose shape does not fit."""
        nm = f" '{self.name}'" if self.name else ""
        where = f"Attention{nm} (declared at {self.site}), called at {user_site()}"
        if query.shape != (self.query_size,):
            raise ShapeError(f"{where}: the query must have shape ({self.query_size},), but {mention(query)} has "
                             f"{query.shape}", node=query)
        if len(memory.shape) != 2 or memory.shape[1] != self.memory_size:
            raise ShapeError(f"{where}: the memory must have shape (S, {self.memory_size}) (an sg.Context((S, "
                             f"{self.memory_size})), say), but {mention(memory)} has {memory.shape}", node=memory)
        S = memory.shape[0]
        if mask is not None and mask.shape != (S,):
            raise ShapeError(f"{where}: the mask must have shape ({S},), one value per memory row, but "
                             f"{mention(mask)} has {mask.shape}", node=mask)
        if mask is not None and mask.dtype != "float":
            raise ShapeError(f"{where}: the mask must be a float value (an sg.Context({S}), given a bool or 0/1 "
                             f"float tensor: 1 where a row may be attended), but {mention(mask)} has dtype "
                             f"{mask.dtype}", node=mask)

    def extra_repr(self) -> str:
        extra = f", score={self.score!r}" if self.score != "dot" else ""
        if self.heads > 1:
            extra += f", heads={self.heads}"
        if self.score == "additive" and self.hidden_size != self.memory_size:
            extra += f", hidden_size={self.hidden_size}"
        return f"{self.query_size}, {self.memory_size}{extra}"
