"""Golden generated code: the source the compiler writes for standard cells is checked in.

A change to the generator that changes this code must say why: rerun with
SEQGRAPH_UPDATE_GOLDEN=1, read the diff in tests/golden/, and commit it with the reason.
Node ids and user sites are normalised away (ids come from a process-wide counter).
"""
import itertools
import os
import re

import pytest

import seqgraph as sg
from seqgraph.compiler import ir

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")
CASES = {
    "lstm_torch": (lambda: sg.cells.lstm(3, 5), "torch"),
    "gru_torch": (lambda: sg.cells.gru(3, 5), "torch"),
    "lstm_triton": (lambda: sg.cells.lstm(3, 5), "triton"),
    "lstm_cpu": (lambda: sg.cells.lstm(3, 5), "cpu"),
}


def normalise(source: str) -> str:
    """Number node ids (7+ digits here, not a float's fraction) by first appearance; drop
    file:line sites and the kernel files' hashes (they change with any edit of the generator's
    text)."""
    source = re.sub(r" @ \S+:\d+( \(in [^)]*\))?", "", source)
    source = re.sub(r"\bk[0-9a-f]{24}\.py\b", "k<hash>.py", source)
    names: dict[str, str] = {}
    return re.sub(r"(?<![.\d])\d{7,}", lambda m: names.setdefault(m.group(0), str(len(names))), source)


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_code_matches_golden(name, monkeypatch):
    monkeypatch.setattr(ir, "_ids", itertools.count(10**7))  # ids far from any shape or index
    sg.compiled.clear_cache()
    make, backend = CASES[name]
    text = normalise(sg.compile(sg.Recurrence(make()), backend=backend).source())
    path = os.path.join(GOLDEN, f"{name}.txt")
    if os.environ.get("SEQGRAPH_UPDATE_GOLDEN") == "1":
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"generated code for {name} changed; see the docstring of this file"
