import os

import pytest
import torch
from hypothesis import settings

# In CI, property tests draw the same examples every run (a red CI is then reproducible);
# on a developer's machine they explore new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Triton kernels run on the CPU through Triton's interpreter unless a GPU is present
# (torch does not import triton, so setting this after importing torch is in time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# generated kernels of a test run go to a temporary cache, not the user's home
if "SEQGRAPH_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["SEQGRAPH_CACHE_DIR"] = tempfile.mkdtemp(prefix="seqgraph-test-kernels-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
