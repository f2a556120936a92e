import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def _quiet_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """configs/pretrain/tiny.yaml as shipped, on 2 processes: the README's main job (about 80 s here)."""
    from tests.helpers import run_distrib

    root = tmp_path_factory.mktemp("tiny")
    out = root / "pretrain"
    run_distrib(f"output_dir={out}", f"data.cache_dir={root / 'cache'}", "metrics.progress_bar=false",
                nproc=2, timeout=900)
    return out


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_pretrained):
    """configs/finetune/tiny-lora.yaml as shipped, on the tiny pretrained model (about 40 s here)."""
    from tests.helpers import ROOT, run_distrib

    out = tiny_pretrained.parent / "finetune"
    run_distrib(f"output_dir={out}", f"init_from={tiny_pretrained}", f"data.cache_dir={tiny_pretrained.parent / 'cache'}",
                "metrics.progress_bar=false", nproc=2, timeout=900, stage="finetune",
                config=str(ROOT / "configs/finetune/tiny-lora.yaml"))
    return out
