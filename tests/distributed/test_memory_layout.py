"""layout.json's per-rank bytes, measured from the engine, at ZeRO-0 and ZeRO-3 in bf16."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_distrib, small

pytestmark = pytest.mark.slow


def _layout(out, data_cache, zero: int) -> dict:
    run_distrib(*small(out, data_cache, "precision=bf16", f"parallel.zero_stage={zero}", "train.max_steps=3",
                       "train.warmup_steps=0", "export.at_end=false"), nproc=2)
    return json.loads((out / "layout.json").read_text())


def test_zero3_holds_half_of_what_zero0_holds_per_rank(tmp_path, data_cache):
    z0, z3 = _layout(tmp_path / "z0", data_cache, 0), _layout(tmp_path / "z3", data_cache, 3)
    n = z0["total_params"]
    for r in z0["ranks"]:
        # bf16 weights whole on every rank; Adam's two moments and the fp32 master weights too (12 bytes a parameter)
        assert r["param_bytes"] == 2 * n and r["optimizer_state_bytes"] == 12 * n
        assert r["peak_rss_bytes"] > 0
    held0 = max(r["param_bytes"] + r["optimizer_state_bytes"] for r in z0["ranks"])
    held3 = max(r["param_bytes"] + r["optimizer_state_bytes"] for r in z3["ranks"])
    assert held3 <= 0.55 * held0, (held3, held0)  # each of 2 ranks: half, plus padding to alignment
