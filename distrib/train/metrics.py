"""Rank-0 metrics: progress on the console, ``metrics.jsonl`` and TensorBoard.

MFU = achieved model FLOP/s / (peak FLOP/s per device x devices). Achieved FLOPs come from
:func:`distrib.model.flops_per_token`; the peak is ``metrics.peak_tflops`` or, when unset, a
short matmul measurement on the local device in the training dtype (a fair CPU default; on GPUs
set the datasheet figure, e.g. 989 for H100 bf16 dense).
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from distrib import faults

if TYPE_CHECKING:
    import torch


def measure_peak_tflops(dtype: torch.dtype, shape: tuple[int, int, int] = (1024, 1024, 1024), trials: int = 5,
                        seconds: float = 0.1) -> float:
    """Sustained matmul throughput of this device in ``dtype`` on an ``(m, k, n)`` product (TFLOP/s).

    Pass the shape of the model's own largest matmuls (tokens of a micro-batch x hidden x FFN width): a
    rate measured on other sizes would be a peak the model's matmuls cannot reach (or could beat), and
    MFU against it would flatter or wrong the run. The best of several short trials, so a moment of
    contention (another process, a compile) does not pass for the device's peak.
    """
    import torch
    from deepspeed.accelerator import get_accelerator  # here, not at import: reading metrics needs neither

    m, k, n_cols = shape
    accel = get_accelerator()
    device = accel.current_device_name()
    gen = torch.Generator(device=device).manual_seed(0)  # leave the training RNG streams untouched
    a = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
    b = torch.randn(k, n_cols, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        accel.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        accel.synchronize()
        best = max(best, 2 * m * k * n_cols * n / (time.perf_counter() - start) / 1e12)
    return best


class MetricsLogger:
    """Writes metrics on rank 0; a no-op elsewhere.

    ``metrics.jsonl`` holds one row per logged step of the run as it stands: a fresh start empties
    it, and a resume at step ``k`` first drops the rows after ``k`` (steps the resumed run repeats),
    so no step appears twice. Every row carries ``time``, the wall clock when it was written (seconds
    since the Unix epoch), from which ``distrib report`` takes a run's time. On a terminal the
    console shows a tqdm bar; when the stream is not a terminal (Slurm logs, CI) a bar's redraws
    would fill the file, so one plain line is printed every ``plain_every`` steps instead.

    A row that cannot be written (a full disk) does not raise: the error is kept in ``failure`` and
    nothing more is written; the trainer stops every rank on it at the end of the step, where they all
    meet (raised here, on rank 0 alone, it would leave the others waiting in their next collective).
    """

    def __init__(self, output_dir: Path, enabled: bool, *, tensorboard: bool, progress_bar: bool,
                 total_steps: int, start_step: int, plain_every: int | None = None, stream: TextIO | None = None):
        """Open the outputs (rank 0 only).

        Args:
            output_dir: the run directory; ``metrics.jsonl`` and ``tensorboard/`` go there.
            enabled: whether this process writes (rank 0).
            tensorboard: also write TensorBoard scalars.
            progress_bar: show progress on ``stream``: a bar on a terminal, plain lines otherwise.
            total_steps: the run's ``train.max_steps``.
            start_step: the step the run resumes from, 0 for a fresh start.
            plain_every: steps between plain lines when ``stream`` is not a terminal; by default
                :func:`default_plain_every`. Only logged steps can be printed, so the effective
                spacing is at least the trainer's logging interval.
            stream: where progress goes (default ``sys.stderr``, tqdm's own default).
        """
        self.enabled = enabled
        self.failure: BaseException | None = None
        self.file = None
        self.tb = None
        self.bar = None
        self.plain_every = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "metrics.jsonl"
        if start_step > 0:
            keep_rows_through(path, start_step)
        # A fresh start ("w") empties the file: its rows belong to a run this one does not continue.
        self.file = open(path, "a" if start_step > 0 else "w", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_full_disk_in_threads()
            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            self.stream = stream if stream is not None else sys.stderr
            if _is_tty(self.stream):
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train",
                                file=self.stream)
            else:
                self.plain_every = plain_every if plain_every is not None else default_plain_every(total_steps)
                if self.plain_every < 1:
                    raise ValueError(f"plain_every must be at least 1, got {self.plain_every}")
                self.total_steps, self.start_step = total_steps, start_step
                self._next_plain = start_step  # the first logged step prints: the run is alive
                self._started = time.monotonic()

    def log(self, record: dict) -> None:
        if not self.enabled or self.failure is not None:
            return
        try:
            self._write(record)
        except Exception as e:  # noqa: BLE001 (see the class docstring)
            self.failure = e

    def _write(self, record: dict) -> None:
        faults.at("metrics", 0, record["step"])  # this logger writes on rank 0 only
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        clean.setdefault("time", time.time())  # wall clock (Unix seconds): the report's run time is the rows' span
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
        if self.plain_every is not None and (step >= self._next_plain or step >= self.total_steps):
            # Due once a logged step reaches the next multiple, so a logging interval that does not
            # divide plain_every still prints about every plain_every steps.
            self._next_plain = (step // self.plain_every + 1) * self.plain_every
            print(self._plain_line(record), file=self.stream, flush=True)

    def _plain_line(self, record: dict) -> str:
        step = record["step"]
        parts = [f"step {step}/{self.total_steps}"]
        for key, label, fmt in (("loss", "loss", ".4g"), ("eval_loss", "eval_loss", ".4g"),
                                ("tokens_per_s", "tokens/s", ".0f")):
            if record.get(key) is not None:
                parts.append(f"{label} {record[key]:{fmt}}")
        done = step - self.start_step
        if 0 < done and step < self.total_steps:
            parts.append(f"eta {_duration((time.monotonic() - self._started) / done * (self.total_steps - step))}")
        return " ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


def _quiet_full_disk_in_threads() -> None:
    """Keep a full disk in TensorBoard's writer thread from printing a traceback.

    TensorBoard writes its event files from a thread of its own. On a full disk that thread dies, and
    Python prints its traceback, while the writer raises the same error at its next call in the
    training thread, which is where the run reports it in one line. Other errors in threads still print.
    """
    if getattr(threading.excepthook, "_distrib", False):
        return
    previous = threading.excepthook

    def hook(args) -> None:
        if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in (errno.ENOSPC, errno.EDQUOT)):
            previous(args)

    hook._distrib = True
    threading.excepthook = hook


def default_plain_every(total_steps: int) -> int:
    """Every 10 steps, or every 10% of a run shorter than 100 steps.

    A fixed step interval keeps a long run's log informative (a 7B step takes seconds; 10% of
    100k steps would be hours of silence) at a few lines a minute at most, and a short run still
    prints about 10 lines.
    """
    return max(1, min(10, total_steps // 10))


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """``(line, row)`` for every line of a ``metrics.jsonl`` that parses to a row with an integer ``step``.

    Lines that do not (a crash mid-write tears the last one) are left out. No file: no rows.
    """
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append((line, row))
    return rows


def keep_rows_through(path: Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` at ``path`` with only its rows at or before ``step``, in order.

    Lines that do not parse (a crash mid-write tears the last one) are dropped. The rewrite is
    atomic (a temporary file moved over the original), so a crash here loses nothing.
    """
    if not path.is_file():
        return
    # the original text: kept rows stay byte-identical
    kept = [line + "\n" for line, row in read_rows(path) if row["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
