"""Run distrib as a user does (a subprocess per run) and read what it leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/pretrain/tiny.yaml")

#: A model and data small enough that a 2-process run takes seconds; fp32 so that runs compare bitwise.
SMALL = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "data.seq_len=64",
    "data.vocab_size=512",
    "data.max_documents=200",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.max_steps=6",
    "train.warmup_steps=2",
    "train.lr=1e-2",
    "precision=fp32",
    "eval.every_steps=3",
    "eval.max_samples=16",
    "checkpoint.every_steps=3",
    "metrics.progress_bar=false",
    "metrics.tensorboard=false",
    "metrics.peak_tflops=1.0",
]


def run_distrib(*args: str, nproc: int | None = None, timeout: float = 600, check: bool = True,
                env: dict | None = None, stage: str = "pretrain", config: str = TINY) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distrib", stage, config, *args]
    if nproc is not None:
        cmd += ["--nproc-per-node", str(nproc)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
