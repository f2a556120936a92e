"""Tensor parallelism (DeepSpeed AutoTP) on a data x tensor grid, against the unsharded reference."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import SMALL, losses, metrics, run_distrib

pytestmark = pytest.mark.slow

# fp32: tp splits each matmul's reduction (row-parallel outputs are all-reduced partial sums), so
# results differ from tp=1 by reduction order only.
RTOL = 1e-4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def small(out, cache, *extra):
    return [f"output_dir={out}", f"data.cache_dir={cache}", *SMALL, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("tp1")
    run_distrib(*small(out, data_cache, "parallel.zero_stage=0"))
    return out


def _assert_losses_match(out, reference):
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], rtol=RTOL)


def test_tp2_on_2_processes_matches_tp1_and_shards_the_projections(tmp_path, data_cache, reference):
    out = tmp_path / "tp2"
    run_distrib(*small(out, data_cache, "parallel.tp=2", "parallel.zero_stage=1"), nproc=2)
    _assert_losses_match(out, reference)

    layout = json.loads((out / "layout.json").read_text())
    assert (layout["dp"], layout["tp"]) == (1, 2)
    full = json.loads((reference / "layout.json").read_text())["ranks"][0]
    for rank in layout["ranks"]:
        sharded = {n: k for n, k in rank["params"].items() if n.rsplit(".", 2)[-2] in PROJECTIONS}
        assert len(sharded) == 2 * len(PROJECTIONS)  # 2 layers
        for name, numel in sharded.items():
            assert numel * 2 == full["params"][name], name
        # every other parameter (embeddings, norms, lm_head) is whole or split, never more than whole
        assert rank["param_bytes"] < full["param_bytes"]
        print(f"rank {rank['rank']}: {rank['param_bytes']} parameter bytes vs {full['param_bytes']} unsharded")


def test_dp2_x_tp2_on_4_processes_matches_tp1(tmp_path, data_cache, reference):
    out = tmp_path / "dp2tp2"
    run_distrib(*small(out, data_cache, "parallel.tp=2", "parallel.zero_stage=2"), nproc=4, timeout=900)
    _assert_losses_match(out, reference)
    layout = json.loads((out / "layout.json").read_text())
    assert (layout["dp"], layout["tp"]) == (2, 2)
    assert [(r["dp_rank"], r["tp_rank"]) for r in layout["ranks"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_tp2_resume_is_identical_and_export_matches_unsharded(tmp_path, data_cache, reference):
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ("parallel.tp=2", "parallel.zero_stage=1", "checkpoint.every_steps=100")
    run_distrib(*small(whole, data_cache, *args), nproc=2)
    run_distrib(*small(split, data_cache, *args, "train.exit_after_steps=4"), nproc=2)
    run_distrib(*small(split, data_cache, *args), nproc=2)
    assert losses(split) == losses(whole)
    a, b = load_file(str(whole / "hf" / "model.safetensors")), load_file(str(split / "hf" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # The export is one whole HF model: transformers loads it, and its loss on the validation
    # blocks equals the final eval loss the tp-sharded model computed.
    from transformers import AutoModelForCausalLM

    from distrib.data import collate
    from tests.distributed.test_pretrain import _prepared

    model = AutoModelForCausalLM.from_pretrained(whole / "hf")
    ref = load_file(str(reference / "hf" / "model.safetensors"))
    assert a.keys() == ref.keys()
    for name in a:
        assert a[name].shape == ref[name].shape
    val = _prepared(whole).validation
    with torch.no_grad():
        batch_losses = [model(input_ids=b, labels=b).loss.item()
                        for b in (collate(val, range(i, i + 2))["input_ids"] for i in range(0, 16, 2))]
    final_eval = [r for r in metrics(whole) if r["step"] == 6][0]["eval_loss"]
    assert np.mean(batch_losses) == pytest.approx(final_eval, rel=1e-5)
