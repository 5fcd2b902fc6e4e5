import pytest


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory):
    """Each kernel test module writes its kernels to a fresh cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEQGRAPH_CACHE_DIR", str(tmp_path_factory.mktemp("kernels")))
        yield
