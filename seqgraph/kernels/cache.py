"""Where generated kernels live on disk: the cache folder ($SEQGRAPH_CACHE_DIR), safe
temporary files in it, and the check that a cached library is whole, shared by the Triton and
C launchers. Files are written whole (a temporary, then an atomic rename) with the permissions
the umask gives, so that a cache may be shared between users. It must not import Triton (the
cpu backend builds its kernels without it)."""
from __future__ import annotations

import os
import struct
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where generated kernel files live: $SEQGRAPH_CACHE_DIR or ~/.cache/seqgraph/kernels."""
    return Path(os.environ.get("SEQGRAPH_CACHE_DIR") or Path.home() / ".cache" / "seqgraph" / "kernels")


class CacheNotWritable(OSError):
    """The kernel cache folder cannot be created or written."""


def temp_file_in_cache(folder: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """mkstemp in `folder` (created if missing), readable as the umask allows (mkstemp's own
    files are private to their creator), or CacheNotWritable saying which folder and how to
    choose another."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        os.fchmod(fd, 0o666 & ~_umask())
        return fd, path
    except OSError as e:
        raise CacheNotWritable(f"seqgraph writes its generated kernels to {folder} and cannot: "
                               f"{e.strerror or e}. Set SEQGRAPH_CACHE_DIR to a folder you can write "
                               f"(it is now {os.environ.get('SEQGRAPH_CACHE_DIR', 'unset')!r})") from None


def share_library(path: str) -> None:
    """Give a library the compiler wrote the permissions the umask allows an executable file."""
    os.chmod(path, 0o777 & ~_umask())


def _umask() -> int:
    """The process's umask, from /proc where there is one: reading it through os.umask means
    setting it for a moment, which races with threads creating files (two libraries build at
    once); elsewhere, the umask this module found when imported."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


_UMASK_AT_IMPORT = os.umask(0o022)
os.umask(_UMASK_AT_IMPORT)


def library_is_whole(path: Path) -> bool:
    """Whether the ELF library at `path` is as long as its header says (a copy cut short, by a
    full disk or an interrupted copy of the folder, would kill the process that maps it with
    SIGBUS). On macOS, whose libraries are not ELF, any file of 4 bytes or more passes; elsewhere
    a file that is not ELF does not."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if head[:4] != b"\x7fELF":
        return sys.platform == "darwin" and len(head) >= 4
    wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
    if len(head) < (64 if wide else 52):
        return False
    if wide:
        (shoff,), (shentsize, shnum) = struct.unpack_from(order + "Q", head, 0x28), struct.unpack_from(order + "HH", head, 0x3A)
    else:
        (shoff,), (shentsize, shnum) = struct.unpack_from(order + "I", head, 0x20), struct.unpack_from(order + "HH", head, 0x2E)
    return shoff + shentsize * shnum <= size
