"""seqgraph/kernels/cache.py: the kernel cache folder, shared by the C and Triton launchers."""
import os
import subprocess
import sys

import pytest

from seqgraph.kernels.c_launch import find_compiler
from seqgraph.kernels.cache import CacheNotWritable, cache_dir, temp_file_in_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_cache_folder_is_seqgraph_cache_dir_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path


def test_a_folder_that_cannot_be_written_says_how_to_choose_another(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CacheNotWritable, match="Set SEQGRAPH_CACHE_DIR to a folder you can write"):
        temp_file_in_cache(blocker / "sub", "x", ".tmp")


@pytest.mark.skipif(find_compiler() is None, reason="the cpu backend needs a C compiler")
def test_the_cpu_backend_compiles_and_runs_without_importing_triton(tmp_path):
    # importing Triton takes about 0.2 s, a fifth of a cold compile
    code = ("import sys, torch, seqgraph as sg\n"
            "m = sg.compile(sg.Recurrence(sg.cells.gru(3, 4)), backend='cpu')\n"
            "m(torch.randn(2, 1, 3, requires_grad=True))[0].sum().backward()\n"
            "assert m.backend_for() == 'cpu'\n"
            "print('triton' in sys.modules)\n")
    env = dict(os.environ, SEQGRAPH_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
