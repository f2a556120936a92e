"""Metrics and console output: one row per step in metrics.jsonl across resumes, log-friendly
progress when not on a terminal, and library warnings shown once (rank 0), not once per rank."""

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from distrib.config import ModelConfig
from distrib.train.metrics import MetricsLogger, default_plain_every
from distrib.model import build_model, hf_config
from tests.helpers import ROOT


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_run(path, steps, torn: str = ""):
    """A metrics.jsonl as a run leaves it: an eval-only row at step 0, then one row per step."""
    rows = [{"step": 0, "eval_loss": 7.0}] + [{"step": s, "loss": 7.0 - s / 10, "lr": 1e-3} for s in steps]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    return path.read_text().splitlines()


def _logger(tmp_path, start_step, **kw):
    kw.setdefault("progress_bar", False)
    return MetricsLogger(tmp_path, True, tensorboard=False, total_steps=100, start_step=start_step, **kw)


def test_resume_keeps_only_the_rows_up_to_the_resume_step_then_appends(tmp_path):
    lines = _write_run(tmp_path / "metrics.jsonl", range(1, 11))
    m = _logger(tmp_path, start_step=4)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:5]  # steps 0..4, byte for byte
    m.log({"step": 5, "loss": 1.0})
    m.close()
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
    assert not list(tmp_path.glob("*.tmp"))


def test_fresh_start_empties_the_file(tmp_path):
    _write_run(tmp_path / "metrics.jsonl", range(1, 11))
    m = _logger(tmp_path, start_step=0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    m.log({"step": 0, "eval_loss": 6.0})
    m.close()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == [{"step": 0, "eval_loss": 6.0}]


def test_every_row_carries_its_wall_clock_time(tmp_path):
    before = time.time()
    m = _logger(tmp_path, start_step=0)
    m.log({"step": 0, "eval_loss": 6.0})
    m.log({"step": 1, "loss": 5.0})
    m.close()
    times = [r["time"] for r in _rows(tmp_path / "metrics.jsonl")]
    assert all(isinstance(t, float) for t in times)
    assert before <= times[0] <= times[1] <= time.time()


def test_a_torn_last_line_is_dropped_on_resume(tmp_path):
    lines = _write_run(tmp_path / "metrics.jsonl", range(1, 7), torn='{"step": 7, "lo')  # killed mid-write
    m = _logger(tmp_path, start_step=10)
    m.log({"step": 11, "loss": 1.0})
    m.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.splitlines()[:-1] == lines[:-1]
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5, 6, 11]


def test_not_a_terminal_prints_a_plain_line_every_n_steps(tmp_path):
    out = io.StringIO()  # isatty() is False, as for a Slurm log or CI
    m = _logger(tmp_path, start_step=0, progress_bar=True, plain_every=10, stream=out)
    assert m.bar is None
    m.log({"step": 0, "eval_loss": 7.0})
    for step in range(3, 101, 3):  # a logging interval that does not divide plain_every
        record = {"step": step, "loss": 3.2109, "tokens_per_s": 4120.4}
        if step == 39:
            record["eval_loss"] = 3.4
        m.log(record)
    m.log({"step": 100, "loss": 3.0, "tokens_per_s": 4000.0})  # the last step always prints
    m.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [0, 12, 21, 30, 42, 51, 60, 72, 81, 90, 100]
    assert lines[0] == "step 0/100 eval_loss 7"
    assert lines[3].startswith("step 30/100 loss 3.211 tokens/s 4120 eta ")
    assert lines[-1] == "step 100/100 loss 3 tokens/s 4000"


def test_resumed_run_prints_its_first_step_at_once(tmp_path):
    out = io.StringIO()
    m = _logger(tmp_path, start_step=40, progress_bar=True, plain_every=10, stream=out)
    for step in range(41, 52):
        m.log({"step": step, "loss": 1.0})
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["41/100", "50/100"]


def test_a_terminal_gets_the_tqdm_bar(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    m = _logger(tmp_path, start_step=0, progress_bar=True, plain_every=10, stream=out)
    for step in range(1, 21):
        m.log({"step": step, "loss": 2.0})
    assert m.bar is not None and m.bar.n == 20
    m.close()
    assert "\r" in out.getvalue() and "step 10/100" not in out.getvalue()


def test_no_progress_bar_means_no_console_output(tmp_path):
    out = io.StringIO()
    m = _logger(tmp_path, start_step=0, progress_bar=False, stream=out)
    m.log({"step": 1, "loss": 2.0})
    m.close()
    assert out.getvalue() == ""


@pytest.mark.parametrize("total, every", [(3, 1), (50, 5), (200, 10), (100_000, 10)])
def test_default_plain_interval(total, every):
    assert default_plain_every(total) == every


QUIET_PROBE = textwrap.dedent("""
    import warnings
    from distrib.utils import quiet_other_ranks
    quiet_other_ranks()
    from deepspeed.utils import logger as ds_logger  # imported after, as in a worker
    import datasets.utils.logging
    import transformers.utils.logging
    ds_logger.warning("DS-WARNING")
    transformers.utils.logging.get_logger("transformers.probe").warning("HF-WARNING")
    datasets.utils.logging.get_logger("datasets.probe").warning("DATASETS-WARNING")
    warnings.warn("PY-FUTURE", FutureWarning)
    warnings.warn("PY-USER")
    ds_logger.error("DS-ERROR")
""")
WARNINGS = ["DS-WARNING", "HF-WARNING", "DATASETS-WARNING", "PY-FUTURE", "PY-USER"]


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_shows_library_warnings(rank):
    env = {**os.environ, "RANK": str(rank)}
    proc = subprocess.run([sys.executable, "-c", QUIET_PROBE], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "DS-ERROR" in output  # errors still show on every rank
    shown = [w for w in WARNINGS if w in output]
    assert shown == (WARNINGS if rank == 0 else []), output


def test_building_a_model_raises_no_dtype_deprecation_warning(tmp_path):
    """Fresh and from a local HF directory: both pass the dtype under the name transformers 5 expects."""
    import transformers.utils.logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.addHandler(handler)
    hf_logger.setLevel(logging.WARNING)
    transformers.utils.logging.warning_once.cache_clear()  # an earlier test may have warned already
    try:
        cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, vocab_size=64)
        fresh = build_model(cfg, hf_config(cfg, seq_len=16), dtype=torch.bfloat16)
        fresh.save_pretrained(tmp_path / "hf")
        cfg = ModelConfig(pretrained=str(tmp_path / "hf"))
        loaded = build_model(cfg, hf_config(cfg), dtype=torch.bfloat16)
    finally:
        hf_logger.removeHandler(handler)
        hf_logger.setLevel(level)
    for model in (fresh, loaded):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not [r.getMessage() for r in records if "dtype" in r.getMessage()]
