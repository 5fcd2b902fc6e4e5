"""seqgraph/__main__.py: the command line dispatches to its subcommands and says what it takes."""
from seqgraph.__main__ import main


def test_no_command_prints_the_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: python -m seqgraph demo" in capsys.readouterr().err


def test_help_prints_the_usage_and_succeeds(capsys):
    assert main(["--help"]) == 0
    assert "[-o out.svg]" in capsys.readouterr().out


def test_version_prints_the_package_version(capsys):
    import seqgraph
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"seqgraph {seqgraph.__version__}"


def test_an_unknown_command_is_named(capsys):
    assert main(["bnech"]) == 2
    assert "unknown command 'bnech'" in capsys.readouterr().err
