"""Rank-0 metrics: a progress bar on the console, ``metrics.jsonl`` and TensorBoard.

MFU = achieved model FLOP/s / (peak FLOP/s per device x devices). Achieved FLOPs come from
:func:`distrib.model.flops_per_token`; the peak is ``metrics.peak_tflops`` or, when unset, a
short matmul measurement on the local device in the training dtype (a fair CPU default; on GPUs
set the datasheet figure, e.g. 989 for H100 bf16 dense).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator


def measure_peak_tflops(dtype: torch.dtype, size: int = 1024, trials: int = 5, seconds: float = 0.1) -> float:
    """Sustained square-matmul throughput of this device in ``dtype`` (TFLOP/s).

    The best of several short trials, so a moment of contention (another process, a compile) does
    not pass for the device's peak.
    """
    accel = get_accelerator()
    device = accel.current_device_name()
    gen = torch.Generator(device=device).manual_seed(0)  # leave the training RNG streams untouched
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        accel.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        accel.synchronize()
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start) / 1e12)
    return best


class MetricsLogger:
    """Writes metrics on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool, *, tensorboard: bool, progress_bar: bool,
                 total_steps: int, start_step: int):
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(output_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("eval_") else f"eval/{k[5:]}", v, step)
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "eval_loss", "tokens_per_s") if record.get(k) is not None}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
