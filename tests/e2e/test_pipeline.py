"""`distrib run`: the embedded default pipeline with fewer steps, killed during fine-tuning and run again."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, metrics

pytestmark = pytest.mark.slow

STEPS = ["pretrain.train.max_steps=60", "pretrain.train.warmup_steps=6", "finetune.train.max_steps=24",
         "finetune.train.warmup_steps=4", "distill.train.max_steps=24", "distill.train.warmup_steps=4",
         "eval.every_steps=8", "checkpoint.every_steps=8", "metrics.progress_bar=false", "downstream.limit=20"]


def _run(out: Path, cache: Path, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distrib", "run", f"output_dir={out}", f"data.cache_dir={cache}", *STEPS]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True, **kw)


def _fingerprint(run: Path) -> dict[str, str]:
    """Every file of a run directory (checkpoints, metrics, export) -> sha256 and mtime."""
    return {str(p.relative_to(run)): f"{hashlib.sha256(p.read_bytes()).hexdigest()}:{p.stat().st_mtime_ns}"
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_pipeline_killed_during_finetuning_finishes_on_rerun_without_redoing_pretraining(tmp_path):
    out, cache = tmp_path / "pipe", tmp_path / "cache"
    first = _run(out, cache)
    try:
        deadline = time.monotonic() + 600
        while not (out / "finetune/checkpoints/latest").is_file():  # fine-tuning has saved at least once
            assert first.poll() is None, first.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "fine-tuning did not save a checkpoint within 10 minutes"
            time.sleep(0.5)
    finally:  # the pipeline and every worker of the stage, at once (and never left running when the test fails)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    pretrain_before = _fingerprint(out / "pretrain")

    second = _run(out, cache)
    try:
        log = second.communicate(timeout=900)[0]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
    assert second.returncode == 0, log[-6000:]
    assert "distrib run: pretrain finished at step 60" in log and "skipped" in log
    after = _fingerprint(out / "pretrain")
    after.pop("eval.json")  # the downstream evaluation at the end adds its scores beside the run
    assert after == pretrain_before  # pretraining was not redone: every file of it the same bytes, same mtime
    assert "resumed from" in log  # fine-tuning carried on from its checkpoint
    steps = [r["step"] for r in metrics(out / "finetune") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 24

    summary = json.loads((out / "summary.json").read_text())
    for f in ("summary.md", "loss.png", "throughput.png"):
        assert (out / f).stat().st_size > 0
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["pretrain", "finetune", "distill"]
    for s in stages.values():
        assert s["finished"] and s["tokens"] > 0 and s["median_tokens_per_s"] > 0 and s["wall_time_s"] > 0
        assert s["final_train_loss"] > 0 and s["final_val_ppl"] > 1 and s["trainable_params"] > 0
        assert Path(s["checkpoint"]).is_dir() and Path(s["export"]["hf"]).is_dir()
    pre, ft, dist = stages["pretrain"], stages["finetune"], stages["distill"]
    print(f"pipeline: pretrain val {pre['initial_val_loss']:.3f} -> {pre['final_val_loss']:.3f}; finetune (prose) "
          f"{ft['initial_val_loss']:.3f} -> {ft['final_val_loss']:.3f}; student {dist['final_val_loss']:.3f} vs "
          f"teacher {dist['distill']['teacher']['val_loss']:.3f}")
    assert pre["final_val_loss"] < pre["initial_val_loss"] - 1.0  # pretraining learns
    assert ft["final_val_loss"] < ft["initial_val_loss"] - 0.05  # fine-tuning lowers it on the new domain
    assert ft["export"]["adapter"] is not None
    d = dist["distill"]
    assert d["student"]["params"] < d["teacher"]["params"]
    assert dist["final_val_loss"] < d["teacher"]["val_loss"] + 0.3  # the student within 0.3 nats of its teacher
    assert d["generation_speedup"] > 0  # measured, not asserted faster: a busy machine skews a tiny model's timing

    # The downstream table: every stage's model on the same shipped lm-eval tasks.
    import math

    tasks = {"distrib_code_ppl", "distrib_prose_ppl", "distrib_code_nextline", "distrib_instruct_response"}
    for s in stages.values():
        assert set(s["downstream"]) == tasks and (Path(s["run_dir"]) / "eval.json").is_file()
        assert all(math.isfinite(v) for scores in s["downstream"].values() for v in scores.values())
    assert "distrib_code_nextline (acc_mutual_info)" in (out / "summary.md").read_text()

    from transformers import AutoModelForCausalLM

    for s in stages.values():
        AutoModelForCausalLM.from_pretrained(s["export"]["hf"])
