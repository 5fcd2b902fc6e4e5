"""Pass fuse_gate_matmuls: linears that share an operand become one GEMM."""
import seqgraph as sg
from seqgraph.compiler.fuse_gate_matmuls import fuse_gate_matmuls
from seqgraph.compiler.stepgraph import StepGraph

from pass_checks import same_values


def test_fuse_gate_matmuls_concatenates_weights_of_linears_sharing_an_operand():
    x, h = sg.Input(3, name="x"), sg.State(5, name="h")
    gates = [sg.Linear(5, 5, name=f"g{k}")(h) for k in range(3)]
    cell = sg.Cell([x], {h: sg.tanh(gates[0] + sg.Linear(3, 5)(x)) * gates[1] + gates[2]})
    before = StepGraph.from_cell(cell)
    after = fuse_gate_matmuls(before)
    lins = [n for n in after.order() if n.op == "linear" and n.inputs[0].op == "state"]
    assert len(lins) == 1 and lins[0].shape == (15,)
    same_values(before, after, cell)
