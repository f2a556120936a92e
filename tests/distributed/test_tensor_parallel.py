"""Tensor parallelism (DeepSpeed AutoTP) on a data x tensor grid, against the unsharded reference."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_universal_as_deepspeed_writes, export_matches_final_eval, losses, run_distrib, small

pytestmark = pytest.mark.slow

# fp32: tp splits each matmul's reduction (row-parallel outputs are all-reduced partial sums), so
# results differ from tp=1 by reduction order only.
RTOL = 1e-4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    # The export's universal conversion, each rank extracting and merging its share, is DeepSpeed's own.
    assert_universal_as_deepspeed_writes(out / "checkpoints" / "step_00000006", tmp_path / "alone")


def test_dp2_x_tp2_on_4_processes_matches_tp1(tmp_path, data_cache, reference):
    out = tmp_path / "dp2tp2"
    run_distrib(*small(out, data_cache, "parallel.tp=2", "parallel.zero_stage=2"), nproc=4, timeout=900)
    _assert_losses_match(out, reference)
    layout = json.loads((out / "layout.json").read_text())
    assert (layout["dp"], layout["tp"]) == (2, 2)
    assert [(r["dp_rank"], r["tp_rank"]) for r in layout["ranks"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert_universal_as_deepspeed_writes(out / "checkpoints" / "step_00000006", tmp_path / "alone")


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

    # The export is one whole HF model with the unsharded shapes, carrying the trained weights.
    ref = load_file(str(reference / "hf" / "model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in ref.items()}
    exported, trained = export_matches_final_eval(whole)
    assert exported == pytest.approx(trained, rel=1e-5)


def test_tp2_composes_with_bf16_and_activation_checkpointing(tmp_path, data_cache):
    """bf16 rounds differently once matmuls are split, so the comparison is looser (stated: 2e-2)."""
    tp1, tp2 = tmp_path / "tp1", tmp_path / "tp2"
    common = ("precision=bf16", "model.activation_checkpointing=true", "parallel.zero_stage=2")
    run_distrib(*small(tp1, data_cache, *common))
    run_distrib(*small(tp2, data_cache, *common, "parallel.tp=2"), nproc=2)
    a, b = losses(tp1), losses(tp2)
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=2e-2)
    assert b[6] < b[1]
