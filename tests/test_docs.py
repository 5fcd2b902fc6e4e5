"""The documentation runs: every ```python block of README.md and docs/*.md is executed, each
file's blocks in order in one namespace, with line numbers that point into the Markdown file.
A block is either ```python (it runs) or ```text (it does not); no other fence is allowed, so a
code example cannot quietly opt out. The quick start's demo is smoke-tested here too."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(.*)$")
ALLOWED = {"python", "text"}


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line of the code, code) for every fenced block of a Markdown file."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        m = FENCE.match(line.strip()) if line.lstrip().startswith("```") else None
        if m is None:
            if lang is not None:
                body.append(line)
            continue
        if lang is None:
            lang, start, body = m.group(1).strip(), number + 1, []
        else:
            blocks.append((lang, start, "\n".join(body) + "\n"))
            lang = None
    if lang is not None:
        raise AssertionError(f"{path.name}: the block opened at line {start - 1} is never closed")
    return blocks


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_readme_and_docs_have_python_examples():
    names = {p.name for p in markdown_files()}
    assert {"README.md", "dsl.md", "masking.md"} <= names
    for path in markdown_files():
        if path.name in ("README.md", "dsl.md", "masking.md"):
            assert any(lang == "python" for lang, _, _ in code_blocks(path)), f"{path.name} has no example"


@pytest.mark.parametrize("path", markdown_files(), ids=_id)
def test_every_fence_is_python_or_text(path):
    bad = [(start - 1, lang or "(none)") for lang, start, _ in code_blocks(path) if lang not in ALLOWED]
    assert not bad, f"{_id(path)}: fences must be ```python (runs) or ```text (does not); found {bad}"


@pytest.mark.parametrize("path", markdown_files(), ids=_id)
def test_python_blocks_run_in_order(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace: dict = {"__name__": f"doc:{_id(path)}"}
    for lang, start, code in code_blocks(path):
        if lang != "python":
            continue
        # pad with blank lines so tracebacks and node sites name the Markdown file's own lines
        source = "\n" * (start - 1) + code
        exec(compile(source, str(path), "exec"), namespace)


STANDALONE = [ROOT / "docs" / "coming-from-torch7.md"]  # pages that promise each block runs on its own


@pytest.mark.parametrize("path", STANDALONE, ids=_id)
def test_every_python_block_of_a_standalone_page_runs_alone(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for lang, start, code in code_blocks(path):
        if lang == "python":
            exec(compile("\n" * (start - 1) + code, str(path), "exec"), {"__name__": f"doc:{_id(path)}"})


def test_demo_runs_and_reports_against_the_baseline(capsys):
    from seqgraph.demo import main
    status = main(["--steps", "3", "--batch", "8", "--every", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert status in (0, 1)
    assert [line.split()[:2] for line in lines[1:4]] == [["step", "1"], ["step", "2"], ["step", "3"]]
    assert "baseline" in lines[-1] and "beat the trivial baseline" in lines[-1]
    assert (status == 0) == ("did NOT" not in lines[-1])


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--every"])
def test_demo_refuses_a_count_below_one(flag, capsys):
    from seqgraph.demo import main
    with pytest.raises(SystemExit):
        main([flag, "0"])
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


def test_demo_refuses_a_seed_torch_cannot_take(capsys):
    from seqgraph.demo import main
    with pytest.raises(SystemExit):
        main(["--seed", str(2**70)])
    assert "--seed must lie in [0, 2**63)" in capsys.readouterr().err


def test_demo_on_the_cpu_backend_without_a_c_compiler_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    from seqgraph.demo import main
    monkeypatch.setenv("CC", str(tmp_path / "no_such_cc"))
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(SystemExit):
        main(["--backend", "cpu", "--steps", "1"])
    assert "--backend cpu: backend='cpu' builds its kernels with a C compiler: $CC is " in capsys.readouterr().err


def test_the_package_docstring_example_runs():
    import textwrap

    import seqgraph
    code = textwrap.dedent("\n".join(line for line in seqgraph.__doc__.splitlines() if line.startswith("    ")))
    namespace: dict = {}
    exec(compile(code, "seqgraph/__init__.py docstring", "exec"), namespace)
    assert isinstance(namespace["rnn"], seqgraph.Recurrence)
