"""What every pass test checks: the rewritten step computes the values the original did."""
import torch

from seqgraph.compiler.interpret import evaluate


def values(step, cell, B=3):
    torch.manual_seed(0)
    leaves = {}
    for n in cell.order:
        if n.op in ("input", "state", "context"):
            leaves[n.id] = torch.randn((B,) + n.shape, dtype=torch.float64)
        elif n.op == "param":
            leaves[n.id] = torch.randn(n.shape, dtype=torch.float64)
    for (mine, _), (users, _) in zip(step.states, cell.states):  # a matrix state carried as its row
        leaves.setdefault(mine.id, leaves[users.id].reshape((B,) + mine.shape))
    env = evaluate(step.order(), leaves, dtype=torch.float64, device=torch.device("cpu"))
    return [env[r.id] for r in step.results]


def same_values(before, after, cell):
    """The same values, a matrix (a state carried as a row) compared with the row it became."""
    for a, b in zip(values(before, cell), values(after, cell), strict=True):
        torch.testing.assert_close(b.reshape(a.shape), a)
