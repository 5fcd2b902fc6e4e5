"""The environment switches read in one place: SEQGRAPH_DEBUG and TRITON_INTERPRET."""
import pytest

from seqgraph.settings import debug_level, triton_interpreting


@pytest.mark.parametrize("raw,level", [("", 0), ("0", 0), ("2", 2), ("3", 3), ("yes", 1), ("off", 0), (" 1 ", 1)])
def test_debug_level_reads_numbers_and_words(monkeypatch, raw, level):
    monkeypatch.setenv("SEQGRAPH_DEBUG", raw)
    assert debug_level() == level


def test_debug_level_is_zero_when_unset(monkeypatch):
    monkeypatch.delenv("SEQGRAPH_DEBUG", raising=False)
    assert debug_level() == 0


@pytest.mark.parametrize("raw,on", [("1", True), ("true", True), ("ON", True), ("0", False), ("false", False), ("off", False), ("", False)])
def test_triton_interpreting_reads_the_usual_spellings(monkeypatch, raw, on):
    monkeypatch.setenv("TRITON_INTERPRET", raw)
    assert triton_interpreting() is on


def test_env_reads_what_os_environ_holds_after_every_kind_of_change(monkeypatch):
    import os
    from seqgraph.settings import env
    monkeypatch.delenv("SEQGRAPH_PROBE", raising=False)
    assert env("SEQGRAPH_PROBE") is None and env("SEQGRAPH_PROBE", "d") == "d"
    monkeypatch.setenv("SEQGRAPH_PROBE", "é 1")
    assert env("SEQGRAPH_PROBE") == os.environ["SEQGRAPH_PROBE"] == "é 1"
    os.environ["SEQGRAPH_PROBE"] = "2"
    assert env("SEQGRAPH_PROBE") == "2"
    del os.environ["SEQGRAPH_PROBE"]
    assert env("SEQGRAPH_PROBE") is None


def test_env_reads_an_os_environ_replaced_by_a_plain_dict(monkeypatch):
    import os
    from seqgraph.settings import env
    monkeypatch.setattr(os, "environ", {"SEQGRAPH_DEBUG": "2"})
    assert env("SEQGRAPH_DEBUG") == "2" and debug_level() == 2 and env("CC") is None


def test_a_compiled_model_inside_torch_compile_does_not_recompile_when_the_environment_grows(monkeypatch):
    import torch
    import seqgraph as sg
    torch._dynamo.reset()
    model = torch.compile(sg.nn.GRU(3, 4), fullgraph=True)  # backend="auto" reads $CC at every call
    x = torch.randn(4, 2, 3)
    model(x)
    for k in range(10):  # past torch.compile's recompile limit (8)
        monkeypatch.setenv(f"SEQGRAPH_UNRELATED_{k}", "1")
        model(x)
