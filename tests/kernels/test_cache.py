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


def _run_in_fresh_process(code: str, cache) -> subprocess.CompletedProcess:
    env = dict(os.environ, SEQGRAPH_CACHE_DIR=str(cache), PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


_COMPILE_AND_COMPARE = ("import sys, torch, seqgraph as sg\n"
                        "rec = sg.Recurrence(sg.cells.gru(3, 4))\n"
                        "x = torch.randn(2, 1, 3)\n"
                        "torch.testing.assert_close(sg.compile(rec, backend=sys.argv[1])(x)[0], rec(x)[0])\n")


@pytest.mark.skipif(find_compiler() is None, reason="the cpu backend needs a C compiler")
@pytest.mark.parametrize("damage", ["cut_short", "emptied", "source_cut_and_library_gone"])
def test_a_damaged_cached_c_library_is_rebuilt(tmp_path, damage):
    # in fresh processes: mapping a library cut short kills the process (SIGBUS)
    code = _COMPILE_AND_COMPARE.replace("sys.argv[1]", "'cpu'")
    assert _run_in_fresh_process(code, tmp_path).returncode == 0
    (lib,) = (tmp_path / "cpu").glob("c*.so")
    data = lib.read_bytes()
    if damage == "cut_short":
        lib.write_bytes(data[: len(data) * 3 // 4])
    elif damage == "emptied":
        lib.write_bytes(b"")
    else:
        source = lib.with_suffix(".c")
        source.write_text(source.read_text()[:1000])
        lib.unlink()
    run = _run_in_fresh_process(code, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(lib.read_bytes()) == len(data)  # built again whole


def test_a_damaged_cached_triton_kernel_is_written_again(tmp_path):
    pytest.importorskip("triton")
    code = _COMPILE_AND_COMPARE.replace("sys.argv[1]", "'triton'")
    assert _run_in_fresh_process(code, tmp_path).returncode == 0
    kernel = sorted(tmp_path.glob("k*.py"))[0]
    kernel.write_text(kernel.read_text()[:300])
    run = _run_in_fresh_process(code, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]


def test_library_is_whole_tells_a_library_from_a_copy_cut_short(tmp_path):
    import torch
    from seqgraph.kernels.cache import library_is_whole
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")  # an ELF library of torch's
    if not os.path.exists(lib):
        pytest.skip("torch's libc10.so is an ELF library on Linux only")
    data = open(lib, "rb").read()
    whole, short, empty = tmp_path / "whole.so", tmp_path / "short.so", tmp_path / "empty.so"
    whole.write_bytes(data)
    short.write_bytes(data[:-1])
    empty.write_bytes(b"")
    assert library_is_whole(whole) and not library_is_whole(short) and not library_is_whole(empty)
    assert not library_is_whole(tmp_path / "missing.so")


@pytest.mark.skipif(find_compiler() is None, reason="the cpu backend needs a C compiler")
def test_cache_files_may_be_read_by_others_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        assert _run_in_fresh_process(_COMPILE_AND_COMPARE.replace("sys.argv[1]", "'cpu'"), tmp_path).returncode == 0
    finally:
        os.umask(old)
    modes = {p.suffix: p.stat().st_mode & 0o777 for p in (tmp_path / "cpu").glob("c*")}
    assert modes == {".c": 0o644, ".so": 0o755, ".lock": 0o644}  # (another user locks it read-only)
