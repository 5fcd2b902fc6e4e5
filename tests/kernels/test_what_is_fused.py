"""What the two kernel generators (Triton and C) refuse to fuse, with the reason the plan shows;
both share the row-layout rules (kernels/codegen.py: row_problem)."""
import pytest

import seqgraph as sg
from seqgraph.compiler import ops
from seqgraph.kernels.c_codegen import c_region_supported, generate_c
from seqgraph.kernels.codegen import generate, region_from_outputs, region_supported
from seqgraph.kernels.region import Region

from regions import grad_leaf

GENERATORS = {"triton": (region_supported, generate), "c": (c_region_supported, generate_c)}


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_a_matrix_product_is_not_fused_and_says_why(gen):
    supported, generate_source = GENERATORS[gen]
    x = sg.Input(4, name="x")
    lin = sg.Linear(4, 3, bias=False)
    region = region_from_outputs([sg.tanh(lin(x))], [x, lin.weight])
    ok, why = supported(region)
    says = "matrix products run as GEMM stages" if gen == "c" else "matrix products run through torch"
    assert not ok and says in why
    with pytest.raises(NotImplementedError, match=says):
        generate_source(region)


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_a_bias_gradient_summed_over_the_batch_is_not_fused(gen):
    x, b = sg.Input(4, name="x"), sg.Parameter(4, name="b")
    y = x + b
    g = grad_leaf(y)
    _, gb = ops.REGISTRY["add"].vjp(y, g)
    ok, why = GENERATORS[gen][0](region_from_outputs([gb], [g]))
    assert not ok and "no batch dim" in why


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_a_softmax_over_a_leading_dim_is_not_fused(gen):
    x = sg.Input((3, 4), name="x")
    ok, why = GENERATORS[gen][0](region_from_outputs([sg.softmax(x, dim=0)], [x]))
    assert not ok and "reduces a dim other than the last" in why


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_a_broadcast_along_a_leading_dim_is_not_fused(gen):
    x, p = sg.Input((2, 4), name="x"), sg.Parameter(4, name="p")
    ok, why = GENERATORS[gen][0](region_from_outputs([x * p], [x, p]))
    assert not ok and "along a dim other than the row" in why


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_a_node_reading_a_value_outside_the_region_is_a_value_error(gen):
    x, y = sg.Input(4, name="x"), sg.Input(4, name="y")
    with pytest.raises(ValueError, match="neither an input nor computed earlier"):
        GENERATORS[gen][0](Region(nodes=[x + y], inputs=[x], outputs=[]))
