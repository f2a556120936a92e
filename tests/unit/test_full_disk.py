"""A full disk, for real: what each writer of a run raises when its file system is full, that distrib
recognises every one of them as a full disk (and nothing else as one), and that a checkpoint save that fills
the disk leaves the previous checkpoint whole and no partial one.

Each test mounts a 1 MiB tmpfs (we run as root); without root, or where mounting fails, the tests skip.
"""

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distrib.checkpoint import Checkpointer, TrainState, is_complete, latest_checkpoint, load_weights
from distrib.config import load_config
from distrib.errors import TrainingError
from distrib.fs import file_system, full_disk
from distrib.parallel.failures import settle
from tests.helpers import ROOT, TINY, tmpfs

MIB = 1 << 20


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs mounted at ``tmp_path / "fs"``, unmounted afterwards."""
    with tmpfs(tmp_path / "fs", "1m") as mount:
        yield mount


def _fill(mount: Path) -> None:
    """Leave no byte free on ``mount``."""
    with open(mount / "filler", "wb") as f:
        try:
            f.write(b"\0" * 2 * MIB)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _raised(write) -> BaseException:
    with pytest.raises(BaseException) as info:
        write()
    return info.value


def _says_full(error: BaseException, path: Path, mount: Path) -> None:
    said = full_disk(error, path)
    assert said == f"the file system at {mount} (tmpfs, 1 MiB) is full", (repr(error), said)


def test_torch_save_to_a_full_disk_raises_a_runtime_error_without_errno_and_is_recognised(tiny_fs):
    # What every DeepSpeed checkpoint file is written with: torch.save to a path, through its zip writer.
    target = tiny_fs / "step.tmp" / "mp_rank_00_model_states.pt"
    target.parent.mkdir()
    error = _raised(lambda: torch.save({"module": {"w": torch.zeros(2 * MIB // 4)}}, target))
    assert type(error) is RuntimeError and not isinstance(error, OSError)
    assert "unexpected pos" in str(error) or "file write failed" in str(error), str(error)
    assert not any(isinstance(e, OSError) for e in (error.__cause__, error.__context__))  # no errno anywhere
    _says_full(error, target, tiny_fs)


def test_safetensors_on_a_full_disk_raises_its_own_error_and_is_recognised(tiny_fs):
    from safetensors.torch import save_file

    target = tiny_fs / "model.safetensors"
    error = _raised(lambda: save_file({"w": torch.zeros(2 * MIB // 4)}, str(target)))
    assert type(error).__name__ == "SafetensorError" and not isinstance(error, OSError)
    _says_full(error, target, tiny_fs)


def test_json_and_text_writes_on_a_full_disk_raise_enospc_and_are_recognised(tiny_fs):
    _fill(tiny_fs)
    state = tiny_fs / "trainer_state.json"
    error = _raised(lambda: state.write_text(json.dumps({"step": 20, "samples": list(range(1000))})))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    _says_full(error, state, tiny_fs)
    # metrics.jsonl: a line-buffered file, one row a step
    f = open(tiny_fs / "metrics.jsonl", "a", buffering=1)
    error = _raised(lambda: f.write(json.dumps({"step": 1, "loss": 1.5}) + "\n"))
    with contextlib.suppress(OSError):  # closing tries to write the row again
        f.close()
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    _says_full(error, tiny_fs / "metrics.jsonl", tiny_fs)


def test_a_tokenizers_save_pretrained_on_a_full_disk_raises_enospc_and_is_recognised(tiny_fs):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    _fill(tiny_fs)
    error = _raised(lambda: tokenizer.save_pretrained(tiny_fs / "tokenizer"))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    _says_full(error, tiny_fs / "tokenizer", tiny_fs)


def test_the_metrics_logger_keeps_a_full_disk_for_the_trainer_instead_of_raising(tiny_fs):
    from distrib.train.metrics import MetricsLogger

    logger = MetricsLogger(tiny_fs, True, tensorboard=False, progress_bar=False, total_steps=100, start_step=0)
    _fill(tiny_fs)
    logger.log({"step": 1, "loss": 1.0, "lr": 1e-3})  # does not raise: on rank 0 alone that would strand the others
    assert isinstance(logger.failure, OSError) and logger.failure.errno == errno.ENOSPC
    _says_full(logger.failure, tiny_fs / "metrics.jsonl", tiny_fs)
    logger.log({"step": 2, "loss": 1.0})  # quiet from then on: the trainer stops every rank on the first failure


#: TensorBoard's writer on a disk that fills under it, in a process of its own (pytest replaces the hook that
#: prints a dying thread's traceback). WRITER: a bare SummaryWriter, or the one of distrib's MetricsLogger.
_TENSORBOARD = """
import os, sys, time
from pathlib import Path
from torch.utils.tensorboard import SummaryWriter
from distrib.train.metrics import MetricsLogger

mount = Path(sys.argv[1])
if sys.argv[2] == "bare":
    writer = SummaryWriter(log_dir=str(mount / "tensorboard"))
else:
    writer = MetricsLogger(mount, True, tensorboard=True, progress_bar=False, total_steps=10, start_step=0).tb
with open(mount / "filler", "wb") as f:
    try:
        f.write(bytes(2 << 20))
    except OSError:
        pass
try:
    for step in range(1, 5000):
        writer.add_scalar("train/loss", 1.0, step)
    writer.flush()
except OSError as e:
    print("raised:", e.errno)
time.sleep(1)
"""


@pytest.mark.parametrize("writer", ["bare", "distrib"])
def test_tensorboards_writer_thread_dies_of_a_full_disk_without_a_traceback_under_distrib(tiny_fs, writer):
    proc = subprocess.run([sys.executable, "-c", _TENSORBOARD, str(tiny_fs), writer], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert f"raised: {errno.ENOSPC}" in proc.stdout, proc.stderr[-3000:]  # the training thread gets the error
    if writer == "bare":  # what the test guards against: the thread's traceback
        assert "Exception in thread" in proc.stderr and "Traceback" in proc.stderr
    else:
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_an_unrelated_runtime_error_is_not_a_full_disk(tiny_fs):
    assert full_disk(RuntimeError("CUDA out of memory"), tiny_fs) is None
    assert full_disk(ValueError("bad value"), tiny_fs) is None
    assert full_disk(OSError(errno.EACCES, "Permission denied"), tiny_fs) is None
    # torch's zip writer failing while the file system has room: some other I/O error, not a full disk
    writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert full_disk(writer, tiny_fs / "x.pt") is None
    _fill(tiny_fs)
    _says_full(writer, tiny_fs / "x.pt", tiny_fs)  # the same error with the file system full: a full disk


def test_a_quota_and_an_enospc_without_a_file_system_behind_them_are_named(tmp_path):
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert full_disk(quota, tmp_path).startswith("the disk quota on the file system at ")
    assert full_disk(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "gone" / "x").startswith(
        "the file system at ")
    assert file_system(tmp_path / "missing" / "file").startswith("the file system at /")


def test_a_failed_write_in_one_process_is_one_line_naming_the_file_system(tiny_fs):
    undone = []
    target = tiny_fs / "hf.tmp"
    target.mkdir()
    error = _raised(lambda: torch.save({"w": torch.zeros(2 * MIB // 4)}, target / "x.pt"))
    with pytest.raises(TrainingError) as info:
        settle(None, error, target, "exporting CKPT to OUT", "the partial export was removed",
               undo=lambda: undone.append(True))
    assert str(info.value) == (f"exporting CKPT to OUT failed: the file system at {tiny_fs} (tmpfs, 1 MiB) is full; "
                               "the partial export was removed; free space on it and run the same command again")
    assert undone == [True]
    bug = KeyError("a bug")
    with pytest.raises(KeyError):  # not the file system's doing: raised as it is, with its traceback
        settle(None, bug, target, "exporting", "nothing")
    settle(None, None, target, "exporting", "nothing")  # nothing failed


class _OneRank:
    """A job of one process, as the Checkpointer sees it."""

    rank, is_main, tp, dp, world_size = 0, True, 1, 1, 1

    def barrier(self):
        pass

    def any(self, flag):
        return bool(flag)


class _DeepSpeed:
    """DeepSpeed's save_checkpoint as far as the disk sees it: a model-states file written with torch.save.

    ``then_fill``: the disk fills right after this file is written (by another writer), so that the first
    write to fail is one of distrib's own (the RNG state, the metadata, the tokenizer).
    """

    module = object()

    def __init__(self, numel: int, then_fill: bool = False):
        self.weights, self.then_fill = torch.arange(float(numel)), then_fill

    def save_checkpoint(self, root, tag, client_state, save_latest, exclude_frozen_parameters=False):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": self.weights}}, Path(root) / tag / "mp_rank_00_model_states.pt")
        if self.then_fill:
            _fill(Path(root).parent.parent)


@pytest.mark.parametrize("writer", ["deepspeed", "distrib"])
def test_a_save_that_fills_the_disk_is_one_line_keeping_the_previous_checkpoint_and_no_partial(tiny_fs, writer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    run = tiny_fs / "run"
    cfg = load_config(TINY, [f"output_dir={run}", "checkpoint.keep_last=5"])
    ckpt = Checkpointer(run / "checkpoints", _OneRank(), cfg,
                        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE())))
    numel = 150_000  # 600 kB: one checkpoint fits on the 1 MiB disk, two do not
    ckpt.save(_DeepSpeed(numel), TrainState(step=10, run_id="a" * 32))
    with pytest.raises(TrainingError) as info:
        if writer == "deepspeed":  # DeepSpeed's torch.save runs out of room: a RuntimeError without errno
            ckpt.save(_DeepSpeed(numel), TrainState(step=20, run_id="a" * 32))
        else:  # the disk is full when distrib writes its own files of the checkpoint
            ckpt.save(_DeepSpeed(16, then_fill=True), TrainState(step=20, run_id="a" * 32))
    assert str(info.value) == (
        f"saving checkpoint step_00000020 of {run} failed: the file system at {tiny_fs} (tmpfs, 1 MiB) is full; the "
        "partial save was removed and step_00000010 is intact; free space on it and run the same command to resume")
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010"]  # no step_00000020.tmp
    previous = latest_checkpoint(root)
    assert previous.name == "step_00000010" and is_complete(previous)
    assert torch.equal(load_weights(previous / "mp_rank_00_model_states.pt")["module"]["w"], torch.arange(float(numel)))
