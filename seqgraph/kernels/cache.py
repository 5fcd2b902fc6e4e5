"""Where generated kernels live on disk: the cache folder ($SEQGRAPH_CACHE_DIR) and safe
temporary files in it, shared by the Triton and C launchers. It must not import Triton (the
cpu backend builds its kernels without it)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where generated kernel files live: $SEQGRAPH_CACHE_DIR or ~/.cache/seqgraph/kernels."""
    return Path(os.environ.get("SEQGRAPH_CACHE_DIR") or Path.home() / ".cache" / "seqgraph" / "kernels")


class CacheNotWritable(OSError):
    """The kernel cache folder cannot be created or written."""


def temp_file_in_cache(folder: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """mkstemp in `folder` (created if missing), or CacheNotWritable saying which folder and how
    to choose another."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    except OSError as e:
        raise CacheNotWritable(f"seqgraph writes its generated kernels to {folder} and cannot: "
                               f"{e.strerror or e}. Set SEQGRAPH_CACHE_DIR to a folder you can write "
                               f"(it is now {os.environ.get('SEQGRAPH_CACHE_DIR', 'unset')!r})") from None
