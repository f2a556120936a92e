import pytest

from tests.helpers import run_distrib, small


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One processed-data cache for every distributed test (all use the same SMALL data)."""
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_cache):
    """One process, ZeRO-0, tp=1: the unsharded reference the layouts are compared with."""
    out = tmp_path_factory.mktemp("reference")
    run_distrib(*small(out, data_cache, "parallel.zero_stage=0"))
    return out


@pytest.fixture(scope="session")
def base(tmp_path_factory, data_cache):
    """The tiny pretrained model every fine-tuning test starts from: SMALL, 30 steps on the code corpus."""
    out = tmp_path_factory.mktemp("base")
    run_distrib(*small(out, data_cache, "train.max_steps=30", "parallel.zero_stage=2"), nproc=2)
    return out
