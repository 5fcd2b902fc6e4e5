"""Property: every cell the checker accepts compiles, and the torch backend equals the reference."""
import torch
from hypothesis import HealthCheck, given, settings

import seqgraph as sg

from strategies import build_cell, cell_recipes


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cell_recipes(max_steps=6))
def test_random_cells_compile_and_equal_the_reference(recipe):
    cell, sizes = build_cell(recipe)
    torch.manual_seed(0)
    rec = sg.Recurrence(cell).double()
    comp = sg.compile(rec, backend="torch")
    T, B = 4, 3
    xs = tuple(torch.randn(T, B, s, dtype=torch.float64, requires_grad=True) for s in sizes)
    lengths = torch.tensor([4, 2, 0])
    o1, s1 = rec(xs, lengths=lengths)
    o2, s2 = comp(xs, lengths=lengths)
    torch.testing.assert_close(o2, o1)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k])
    wrt = list(xs) + list(rec.parameters())
    loss1 = (o1 * o1).sum() + sum(v.sum() for v in s1.values())
    loss2 = (o2 * o2).sum() + sum(v.sum() for v in s2.values())
    for a, b in zip(torch.autograd.grad(loss1, wrt, allow_unused=True),
                    torch.autograd.grad(loss2, wrt, allow_unused=True)):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
        else:
            torch.testing.assert_close(b, a)
