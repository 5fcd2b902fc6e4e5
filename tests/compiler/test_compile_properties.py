"""Property: every cell the checker accepts compiles, and the torch backend equals the reference;
with some weights frozen and some inputs constant, both backends give the reference's other gradients."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cell_recipes(max_steps=6), st.integers(0, 2**16), st.sampled_from(["torch", "cpu"]))
def test_random_cells_with_frozen_weights_give_the_references_other_gradients(recipe, seed, backend):
    # the compiled backward skips what only an unneeded gradient uses: the rest must not change
    cell, sizes = build_cell(recipe)
    torch.manual_seed(seed)
    rec = sg.Recurrence(cell).double()
    comp = sg.compile(rec, backend=backend)
    params = list(rec.parameters())
    frozen = torch.rand(len(params)) < 0.5
    for p, f in zip(params, frozen):
        p.requires_grad_(not bool(f))
    xs = tuple(torch.randn(4, 3, s, dtype=torch.float64, requires_grad=bool(torch.rand(()) < 0.5)) for s in sizes)
    wrt = [p for p in params if p.requires_grad] + [x for x in xs if x.requires_grad]
    if not wrt:
        return
    grads = []
    for module in (rec, comp):
        out, fin = module(xs, lengths=torch.tensor([4, 2, 0]))
        loss = (out * out).sum() + sum(v.sum() for v in fin.values())
        grads.append(torch.autograd.grad(loss, wrt, allow_unused=True))
    for a, b in zip(*grads):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
        else:
            torch.testing.assert_close(b, a)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cell_recipes(max_steps=6), st.integers(0, 2**16), st.sampled_from(["torch", "cpu"]), st.booleans())
def test_a_loss_on_some_results_gives_none_only_where_the_reference_gradient_is_none_or_zero(recipe, seed, backend,
                                                                                          masked):
    # the compiled backward gives None to what no result the loss reads depends on (reached_by_gradient)
    cell, sizes = build_cell(recipe)
    torch.manual_seed(seed)
    rec = sg.Recurrence(cell).double()
    comp = sg.compile(rec, backend=backend)
    names = [prev.name for prev, _ in rec.cell.states]
    picks = torch.rand(1 + len(names)) < 0.5
    picks[int(torch.randint(len(picks), ()))] = True  # at least one result
    xs = tuple(torch.randn(4, 3, s, dtype=torch.float64, requires_grad=True) for s in sizes)
    h0 = {n: torch.randn(3, *p.shape, dtype=torch.float64, requires_grad=True)
          for n, (p, _) in zip(names, rec.cell.states)}
    wrt = list(rec.parameters()) + list(xs) + list(h0.values())
    grads = []
    for module in (rec, comp):
        out, fin = module(xs, h0, lengths=torch.tensor([4, 2, 0]) if masked else None)
        results = [out] + [fin[n] for n in names]
        loss = sum((r * r).sum() for r, p in zip(results, picks) if p)
        grads.append(torch.autograd.grad(loss, wrt, allow_unused=True))
    for want, got in zip(*grads):
        if got is None:
            assert want is None or want.abs().max() == 0
        elif want is None:
            assert got.abs().max() == 0
        else:
            torch.testing.assert_close(got, want)
