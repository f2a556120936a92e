"""Run distrib as a user does (a subprocess per run) and read what it leaves behind."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def run_probe(script: str, report: Path, config: str, args, nproc: int) -> dict:
    """Run a probe script (a stage run in-process that reports what the tests check) and read its report."""
    if nproc == 1:
        cmd = [sys.executable, script, str(report), config, *args]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(nproc), script, str(report),
               config, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(Path(report).read_text())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def small(out, cache, *extra: str) -> list[str]:
    """Overrides for a seconds-long run of the SMALL model into ``out`` with data cached in ``cache``."""
    return [f"output_dir={out}", f"data.cache_dir={cache}", *SMALL, *extra]


def prepared(out: Path):
    """The data a finished run trained on, from its saved config (a cache hit)."""
    import yaml

    from distrib.config import Config
    from distrib.data import prepare_data

    cfg = Config.model_validate(yaml.safe_load((Path(out) / "config.yaml").read_text()))
    return prepare_data(cfg.data, cfg.seed)


def export_matches_final_eval(out: Path, samples: int = 16, micro: int = 2) -> tuple[float, float]:
    """(loss of ``out/hf`` loaded by transformers on the eval blocks, the run's final logged eval loss).

    The final eval loss was computed by the trained, sharded model; equal values mean the export
    carries the trained weights (a loss is a function of the logits on every position).
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from distrib.data import collate

    model = AutoModelForCausalLM.from_pretrained(Path(out) / "hf")
    val = prepared(out).validation
    with torch.no_grad():
        batch_losses = [model(input_ids=b, labels=b).loss.item()
                        for b in (collate(val, range(i, i + micro))["input_ids"] for i in range(0, samples, micro))]
    last = max(r["step"] for r in metrics(out) if "eval_loss" in r)
    final_eval = [r for r in metrics(out) if r["step"] == last and "eval_loss" in r][0]["eval_loss"]
    return float(np.mean(batch_losses)), final_eval


def assert_universal_as_deepspeed_writes(ckpt: Path, scratch: Path) -> None:
    """``ckpt/universal`` (converted by the ranks of a run, each its share) equals what DeepSpeed's own
    converter writes from the same checkpoint in one process: the same files, tensor for tensor."""
    import shutil

    import torch

    from distrib.checkpoint import convert_to_universal

    copy = scratch / ckpt.name
    shutil.copytree(ckpt, copy, ignore=shutil.ignore_patterns("universal"))
    theirs, ours = convert_to_universal(copy), ckpt / "universal"
    files = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(ours)) for p in ours.rglob("*") if p.is_file())
    assert any(f.endswith("exp_avg.pt") for f in files), files

    def same(a, b, where):
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                same(a[k], b[k], f"{where}[{k!r}]")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        elif hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. the optimizer's loss scaler
            assert type(a) is type(b), where
            same(vars(a), vars(b), where)
        else:
            assert a == b, where

    for f in files:
        if f.endswith(".pt"):
            same(torch.load(theirs / f, weights_only=False), torch.load(ours / f, weights_only=False), f)
        else:
            assert (theirs / f).read_bytes() == (ours / f).read_bytes(), f


@contextlib.contextmanager
def tmpfs(mount: Path, size: str):
    """A real small file system: a tmpfs of ``size`` (``"1m"``, ``"64m"``) mounted at ``mount`` for the block,
    then unmounted. Mounting needs root (CI runs as root); elsewhere the test skips, saying why."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
