"""seqgraph/cuda_graphs.py: which calls are replayed as CUDA graphs (replays need a GPU: tests/kernels)."""
import pytest
import torch

from seqgraph import cuda_graphs


def test_graphs_are_only_for_cuda_devices():
    assert not cuda_graphs.enabled(torch.device("cpu"))


@pytest.mark.parametrize("raw, on", [("0", False), ("off", False), ("False", False), ("no", False), ("1", True),
                                     ("", True), ("yes", True)])
def test_the_switch_turns_graphs_off_on_cuda(monkeypatch, raw, on):
    monkeypatch.setenv("SEQGRAPH_CUDA_GRAPHS", raw)
    assert cuda_graphs.enabled(torch.device("cuda")) is on


def test_a_nested_argument_tree_flattens_and_comes_back_whole():
    a, b = torch.randn(2, 3), torch.randn(4)
    tree = [1, (a, [b, None]), "x"]
    leaves: list = []
    spec = cuda_graphs._flatten(tree, leaves)
    assert leaves[0] is a and leaves[1] is b
    back = cuda_graphs._unflatten(spec, leaves)
    assert back[0] == 1 and back[1][0] is a and back[1][1][0] is b and back[1][1][1] is None and back[2] == "x"


def test_the_capture_key_tells_layouts_apart():
    x = torch.randn(4, 6)
    assert cuda_graphs._shape_key([x]) != cuda_graphs._shape_key([x.t()])
    assert cuda_graphs._shape_key([x]) == cuda_graphs._shape_key([torch.randn(4, 6)])


@pytest.mark.gpu
def test_a_graphed_loop_replays_the_captured_call_on_new_values():
    loop = cuda_graphs.GraphedLoop(lambda x: x * 2, "double")
    for _ in range(3):
        x = torch.randn(8, device="cuda")
        torch.testing.assert_close(loop(x), x * 2)
    assert loop.replays == 2 and len(loop.graphs) == 1  # the first call runs eagerly


def test_a_graph_is_keyed_by_the_tensors_devices():
    from seqgraph.cuda_graphs import _shape_key
    assert _shape_key((torch.zeros(2, 3),)) != _shape_key((torch.zeros(2, 3, device="meta"),))


def test_a_layout_is_captured_the_second_time_it_comes_and_the_least_recent_goes_first(monkeypatch):
    captured = []

    class Replayable:
        def replay(self):
            pass

    def capture(args):
        captured.append(tuple(args[0].shape))
        static = args[0].clone()
        return Replayable(), [static], ("T", 0), [static]

    loop = cuda_graphs.GraphedLoop(lambda x: x * 2, "double", max_graphs=2)
    monkeypatch.setattr(loop, "_capture", capture)
    a, b, c = torch.zeros(2), torch.zeros(3), torch.zeros(4)
    for x in (a, a, b, b, a, c, c):
        loop(x)
    assert captured == [(2,), (3,), (4,)]  # each on its second call; a, used again, outlives b
    assert sorted(key[1][0][0] for key in loop.graphs) == [(2,), (4,)]
