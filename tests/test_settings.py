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
