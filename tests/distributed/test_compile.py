"""model.compile: a compiled run trains like an eager one (bf16 rounding apart), and falls back in one line."""

from __future__ import annotations

import pytest

from tests.helpers import losses, run_distrib, small

pytestmark = pytest.mark.slow

BF16 = ["precision=bf16", "train.max_steps=12", "eval.every_steps=6", "checkpoint.every_steps=100"]


@pytest.fixture(scope="module")
def eager(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("eager")
    run_distrib(*small(out, data_cache, *BF16, "parallel.zero_stage=2", "model.compile=false"), nproc=2)
    return out


def _compiled(out, data_cache, zero: int, *extra: str):
    proc = run_distrib(*small(out, data_cache, *BF16, f"parallel.zero_stage={zero}", "model.compile=true", *extra),
                       nproc=2)
    said = proc.stdout + proc.stderr
    assert "model.compile: the model and its loss compile" in said and "training uncompiled" not in said
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, data_cache):
    return _compiled(tmp_path_factory.mktemp("compiled"), data_cache, 2)


@pytest.mark.parametrize("zero", [2, 3])
def test_compiled_losses_match_eager(tmp_path, data_cache, eager, compiled, zero):
    out = compiled if zero == 2 else _compiled(tmp_path, data_cache, zero)
    got, want = losses(out), losses(eager)
    assert got.keys() == want.keys() and len(got) == 12
    for step in want:  # bf16 has 8 bits of mantissa: the same computation in another order agrees to ~1%
        assert got[step] == pytest.approx(want[step], rel=2e-2), step
    assert got[12] < got[1] - 0.5  # and it trains


def test_a_failing_compiler_falls_back_to_eager_in_one_line(tmp_path, data_cache, eager):
    # sdpa as the eager run has it (auto would pick the attention that compiles best, fixed before the fallback)
    proc = run_distrib(*small(tmp_path, data_cache, *BF16, "parallel.zero_stage=2", "model.compile=true",
                              "model.attn_implementation=sdpa"), nproc=2, env={"DISTRIB_FAULT": "compile:fail:*:0"})
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "compiling failed" in ln]
    assert len(said) == 1 and said[0].endswith("training uncompiled") and "injected compiler failure" in said[0]
    assert losses(tmp_path) == losses(eager)  # exactly the eager run


def test_a_compiled_run_resumes_exactly(tmp_path, data_cache, compiled):
    _compiled(tmp_path, data_cache, 2, "train.exit_after_steps=5")
    _compiled(tmp_path, data_cache, 2)  # the same command: resumes at step 5 and compiles again
    assert losses(tmp_path) == losses(compiled)  # all 12 steps, the 7 after the resume included, bitwise
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (compiled / "hf" / "model.safetensors").read_bytes()
