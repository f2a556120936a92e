"""What clusters do to runs, and what users do to output directories: each guarantee against its fault.

fp32 on 2 processes, so that "the same" means bitwise. Every resume is compared over dozens of steps
after it and on the exported weights' bytes: an error of one ulp shows only after many steps.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distrib.checkpoint import is_complete
from distrib.fs import file_system
from tests.helpers import ROOT, TINY, losses, metrics, run_distrib, small, tmpfs

pytestmark = pytest.mark.slow

LONG = 80  # steps: enough for an ulp of difference to grow into a different loss


def _long(out, cache, *extra):
    return small(out, cache, f"train.max_steps={LONG}", "eval.every_steps=40", "checkpoint.every_steps=10",
                 "train.log_every_steps=1", *extra)


def _weights(out) -> bytes:
    return (out / "hf" / "model.safetensors").read_bytes()


def _latest(out) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def _error_line(proc) -> str:
    """The one error line, and the last thing said (after the elastic agent's own log lines)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distrib: error:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert proc.stderr.rstrip().splitlines()[-1] == lines[0], proc.stderr[-4000:]
    return lines[0]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data_cache):
    """80 uninterrupted steps at ZeRO-2: the run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("whole")
    run_distrib(*_long(out, data_cache, "parallel.zero_stage=2"), nproc=2)
    return out


def _assert_same_run(got, ref):
    assert sorted(losses(got)) == list(range(1, LONG + 1))
    assert losses(got) == losses(ref)  # every step, exactly
    assert _weights(got) == _weights(ref)


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_after_a_stop_is_bitwise_exact_for_60_steps_after_it(tmp_path, data_cache, whole, stage):
    ref = whole
    if stage != 2:
        ref = tmp_path / "whole"
        run_distrib(*_long(ref, data_cache, f"parallel.zero_stage={stage}"), nproc=2)
    split = tmp_path / "split"
    run_distrib(*_long(split, data_cache, f"parallel.zero_stage={stage}", "train.exit_after_steps=20"), nproc=2)
    assert _latest(split) == "step_00000020"
    run_distrib(*_long(split, data_cache, f"parallel.zero_stage={stage}"), nproc=2)
    _assert_same_run(split, ref)
    # metrics.jsonl holds each step once, not the steps before the resume twice; every step has its grad norm
    rows = [r for r in metrics(split) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, LONG + 1))
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows)


def test_worker_killed_mid_step_restarts_and_ends_with_the_same_weights(tmp_path, data_cache, whole):
    out = tmp_path / "run"
    env = {"DISTRIB_FAULT": "step:kill:1:35", "DISTRIB_FAULT_MARK": str(tmp_path / "fired")}
    proc = run_distrib(*_long(out, data_cache, "parallel.zero_stage=2"), "--max-restarts", "1", nproc=2, env=env)
    assert (tmp_path / "fired").exists()
    assert "resumed from" in proc.stderr and "at step 30" in proc.stderr
    _assert_same_run(out, whole)


def test_kill_during_a_save_keeps_the_previous_checkpoint_and_the_next_start_cleans_up(tmp_path, data_cache, whole):
    out = tmp_path / "run"
    killed = run_distrib(*_long(out, data_cache, "parallel.zero_stage=2"), nproc=2, check=False,
                         env={"DISTRIB_FAULT": "save:kill:0:20"})
    assert killed.returncode != 0
    assert _latest(out) == "step_00000010"
    assert (out / "checkpoints" / "step_00000020.tmp").is_dir()  # the half-written save
    again = run_distrib(*_long(out, data_cache, "parallel.zero_stage=2"), nproc=2)
    assert "removing step_00000020.tmp" in again.stderr
    assert not list((out / "checkpoints").glob("*.tmp"))
    _assert_same_run(out, whole)


def test_a_real_full_disk_ends_the_run_in_one_line_and_the_last_checkpoint_exports(tmp_path):
    """The tiny config on a 64 MiB tmpfs, a 25 MB checkpoint every 5 steps: the third save fills the disk,
    inside DeepSpeed's torch.save (a RuntimeError without errno) on whichever rank runs out first."""
    with tmpfs(tmp_path / "disk", "64m") as disk:
        out = disk / "run"
        proc = run_distrib(f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "data.max_documents=300",
                           "checkpoint.every_steps=5", "checkpoint.keep_last=100", "train.max_steps=60",
                           "eval.every_steps=20", "eval.max_samples=16", "metrics.progress_bar=false",
                           nproc=2, check=False, timeout=900)
        assert proc.returncode == 1, proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-6000:]
        latest = _latest(out)
        assert _error_line(proc) == (
            f"distrib: error: saving checkpoint step_00000015 of {out} failed: the file system at {disk} (tmpfs, "
            f"64 MiB) is full; the partial save was removed and {latest} is intact; free space on it and run the "
            "same command to resume")
        assert latest == "step_00000010" and is_complete(out / "checkpoints" / latest)
        assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000005", "step_00000010"]

        # an export onto a full disk: one line too, nothing half-written left
        with tmpfs(tmp_path / "small", "1m") as small:
            export = subprocess.run([sys.executable, "-m", "distrib", "export", str(out / "checkpoints" / "latest"),
                                     str(small / "hf")], capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert export.returncode == 1 and "Traceback" not in export.stderr, export.stderr[-4000:]
            assert export.stderr.rstrip().splitlines()[-1] == (
                f"distrib: error: exporting {out / 'checkpoints' / latest} to {small / 'hf'} failed: the file system "
                f"at {small} (tmpfs, 1 MiB) is full; the partial export was removed; free space on it and run the same "
                "command again")
            assert list(small.iterdir()) == []

        hf = tmp_path / "hf"
        export = subprocess.run([sys.executable, "-m", "distrib", "export", str(out / "checkpoints" / "latest"),
                                 str(hf)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert export.returncode == 0, export.stderr[-4000:]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf)
    ids = AutoTokenizer.from_pretrained(hf)("def main(", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_a_full_disk_on_one_rank_during_a_save_is_named_by_rank_0_and_the_previous_checkpoint_survives(
        tmp_path, data_cache):
    out = tmp_path / "run"
    proc = run_distrib(*_long(out, data_cache, "parallel.zero_stage=2"), nproc=2, check=False,
                       env={"DISTRIB_FAULT": "save:enospc:1:20"})  # what Python's own writes raise, on rank 1 alone
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert _error_line(proc) == (
        f"distrib: error: saving checkpoint step_00000020 of {out} failed: {file_system(out)} is full; the partial "
        "save was removed and step_00000010 is intact; free space on it and run the same command to resume")
    assert _latest(out) == "step_00000010"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000010"]  # no partial one


def test_a_full_disk_in_a_write_of_rank_0_alone_stops_every_rank_at_once_in_one_line(tmp_path, data_cache):
    """metrics.jsonl is rank 0's: the other rank must not wait in its next collective for a rank that has gone."""
    out = tmp_path / "run"
    proc = run_distrib(*small(out, data_cache, "parallel.zero_stage=2", "train.max_steps=8", "train.log_every_steps=1",
                              "parallel.timeout_minutes=5"), nproc=2, check=False,
                       env={"DISTRIB_FAULT": "metrics:enospc:0:5"})
    assert proc.returncode == 1
    # neither a traceback from rank 0, nor rank 1 dying in a collective rank 0 left, nor one that timed out
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-4000:]
    assert _error_line(proc) == (
        f"distrib: error: writing metrics.jsonl of {out} failed: {file_system(out)} is full; the last checkpoint "
        "(step_00000003) is intact; free space on it and run the same command to resume")
    assert _latest(out) == "step_00000003"
    assert max(losses(out)) == 4


class _RunsCode:
    """What a tampered checkpoint file may hold: an object whose unpickling runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "rng/rank_00001.pt"])
def test_a_checkpoint_file_that_would_run_code_is_refused_in_one_line_on_resume_and_export(tmp_path, data_cache, name):
    import torch

    out, marker = tmp_path / "run", tmp_path / "ran"
    args = small(out, data_cache, "parallel.zero_stage=2", "train.exit_after_steps=3")
    run_distrib(*args, nproc=2)
    tampered = out / "checkpoints" / "step_00000003" / name
    torch.save({"module": _RunsCode(marker)}, tampered)
    refusal = (f"distrib: error: {tampered} is not a weights-only checkpoint file (it refers to posix.system, which "
               "loading it would call: it may run code); refusing to load it; restore the file the run wrote, or use "
               "another checkpoint")
    resumed = run_distrib(*args, nproc=2, check=False)  # the same command resumes from that checkpoint
    exported = subprocess.run([sys.executable, "-m", "distrib", "export", str(out), str(tmp_path / "hf")],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
    for proc in (resumed, exported):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
        assert _error_line(proc) == refusal
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_nonfinite_loss_stops_naming_the_step_with_the_last_checkpoint_intact(tmp_path, data_cache):
    out = tmp_path / "run"
    # only rank 1 sees the bad loss: the ranks must still agree to stop
    proc = run_distrib(*_long(out, data_cache, "parallel.zero_stage=2"), nproc=2, check=False,
                       env={"DISTRIB_FAULT": "step:nan:1:15"})
    assert proc.returncode == 1
    assert _error_line(proc) == (
        "distrib: error: the loss is not finite at step 15; stopped before saving, the last checkpoint "
        "(step_00000010) is intact; lower train.lr or check the data, or set train.nonfinite=skip to leave "
        "such micro-batches out")
    assert _latest(out) == "step_00000010"
    assert max(losses(out)) == 14


def test_nonfinite_skip_leaves_the_bad_micro_batch_out_and_trains_on(tmp_path, data_cache):
    out = tmp_path / "run"
    run_distrib(*small(out, data_cache, "parallel.zero_stage=3", "train.nonfinite=skip", "train.max_steps=6"),
                nproc=2, env={"DISTRIB_FAULT": "step:nan:1:4"})
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert rows[4]["skipped_micro_batches"] == 1
    assert all("skipped_micro_batches" not in rows[s] for s in (1, 2, 3, 5, 6))
    assert all(r["loss"] is not None for r in rows.values())  # every logged loss finite
    assert (out / "hf" / "config.json").is_file()


def test_ranks_that_prepared_different_data_stop_before_the_first_step_naming_the_rank(tmp_path, data_cache):
    out = tmp_path / "run"
    proc = run_distrib(*small(out, data_cache, "parallel.zero_stage=2"), nproc=2, check=False,
                       env={"DISTRIB_FAULT": "data:differ:1:0"})
    assert proc.returncode == 1
    line = _error_line(proc)
    assert line.startswith("distrib: error: rank 1 prepared other data than rank 0 (train_blocks: ")
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_a_hung_rank_ends_the_job_after_the_timeout_naming_that_rank(tmp_path, data_cache):
    out = tmp_path / "run"
    start = time.monotonic()
    proc = run_distrib(*small(out, data_cache, "parallel.zero_stage=2", "parallel.timeout_minutes=0.25"),
                       nproc=2, check=False, env={"DISTRIB_FAULT": "step:hang:1:3"}, timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - start < 200  # not the 30-minute default
    line = _error_line(proc)
    assert "a collective timed out after 0.25 min on rank 0 at step 3, micro-batch 0" in line
    assert "rank 1 (step 3, micro-batch 0, forward) did not arrive" in line


def test_a_second_run_on_the_same_output_dir_is_refused_while_the_first_runs(tmp_path, data_cache):
    """The first run hangs at step 20 (after its checkpoint at 10), so it is certainly alive when the second asks;
    killed with its workers (as a scheduler does), it leaves the directory free for the same command to resume."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "distrib", "pretrain", TINY,
                              *_long(out, data_cache, "parallel.zero_stage=2"), "--nproc-per-node", "2"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "DISTRIB_FAULT": "step:hang:*:20"},
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "latest").is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.5)
        config_before = (out / "config.yaml").read_bytes()
        second = run_distrib(*_long(out, data_cache, "parallel.zero_stage=2", "train.lr=1e-3"), nproc=2, check=False)
        assert second.returncode == 2
        line = _error_line(second)
        assert line.startswith(f"distrib: error: output_dir={str(out)!r} is in use by another run (pid ")
        assert line.endswith("wait for it to finish, stop it, or choose another output_dir")
        assert (out / "config.yaml").read_bytes() == config_before
        assert first.poll() is None  # the refusal was about a live run
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the lock dies with its holder: the directory is free again, and the same command resumes and finishes
    again = run_distrib(*_long(out, data_cache, "parallel.zero_stage=2"), nproc=2)
    assert "resumed from" in again.stderr
    assert max(losses(out)) == LONG


def test_finished_run_says_so_and_a_raised_max_steps_extends_it(tmp_path, data_cache):
    out = tmp_path / "run"
    run_distrib(*small(out, data_cache, "parallel.zero_stage=2"), nproc=2)
    exported = _weights(out)
    again = run_distrib(*small(out, data_cache, "parallel.zero_stage=2"), nproc=2)
    assert f"distrib: {out} already finished at step 6; its export is {out / 'hf'}" in again.stderr
    assert _weights(out) == exported
    longer = run_distrib(*small(out, data_cache, "parallel.zero_stage=2", "train.max_steps=9"), nproc=2)
    assert "train.max_steps raised from 6 to 9" in longer.stderr
    assert sorted(losses(out)) == list(range(1, 10))
    shorter = run_distrib(*small(out, data_cache, "parallel.zero_stage=2", "train.max_steps=7"), nproc=2, check=False)
    assert shorter.returncode == 2
    assert "a run can be extended, not shortened" in _error_line(shorter)
    # `distrib export` takes the run directory or checkpoints/latest as well as a step directory
    for source, name in ((out, "from-run"), (out / "checkpoints" / "latest", "from-latest")):
        proc = subprocess.run([sys.executable, "-m", "distrib", "export", str(source), str(tmp_path / name)],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / name / "model.safetensors").read_bytes() == _weights(out)


def test_evaluation_with_fewer_validation_blocks_than_a_batch_scores_them_all(tmp_path, data_cache):
    """3 validation blocks, micro-batch 2 x dp 2: the old code evaluated none and reported 0.0."""
    from tests.helpers import prepared

    out, ref = tmp_path / "run", tmp_path / "ref"
    args = ("eval.max_samples=3", "train.max_steps=2", "train.warmup_steps=1", "eval.every_steps=1")
    run_distrib(*small(out, data_cache, "parallel.zero_stage=3", *args), nproc=2)
    run_distrib(*small(ref, data_cache, "parallel.zero_stage=0", *args), nproc=None)
    got = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
    want = [r["eval_loss"] for r in metrics(ref) if "eval_loss" in r]
    assert all(v > 1.0 for v in got)
    assert got == pytest.approx(want, rel=1e-5)
    # and it is the token-mean loss over exactly those 3 blocks, as transformers computes it
    import torch
    from transformers import AutoModelForCausalLM

    from distrib.data import collate

    model = AutoModelForCausalLM.from_pretrained(ref / "hf")
    blocks = collate(prepared(ref).validation, range(3))["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=blocks, labels=blocks).loss.item()
    assert got[-1] == pytest.approx(expected, rel=1e-5)


def test_pruning_keeps_this_runs_newest_checkpoints_and_never_another_runs(tmp_path, data_cache):
    out = tmp_path / "run"
    run_distrib(*small(out, data_cache, "parallel.zero_stage=1", "train.max_steps=9"), nproc=2)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000009"]
    # a new run started over in the same directory, beside older, higher-numbered checkpoints: sorting by
    # name pruned its own new step_2 at once and left `latest` dangling
    run_distrib(*small(out, data_cache, "parallel.zero_stage=1", "checkpoint.resume=false",
                       "checkpoint.every_steps=2", "train.max_steps=4", "train.warmup_steps=1"), nproc=2)
    names = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000004", "step_00000006", "step_00000009"]
    assert _latest(out) == "step_00000004"
    runs = {n: json.loads((out / "checkpoints" / n / "trainer_state.json").read_text())["run_id"] for n in names}
    assert runs["step_00000002"] == runs["step_00000004"] != runs["step_00000006"] == runs["step_00000009"]
    # a third save of this lineage prunes its own oldest only
    run_distrib(*small(out, data_cache, "parallel.zero_stage=1", "checkpoint.every_steps=2", "train.max_steps=6",
                       "train.warmup_steps=1"), nproc=2)
    names = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert _latest(out) == "step_00000006"
    assert "step_00000002" not in names and "step_00000009" in names
    # the other run's step_6 was set aside under its lineage's name, not overwritten
    assert [n for n in names if n.startswith("step_00000006-")] == [f"step_00000006-{runs['step_00000006'][:8]}"]


def test_a_dangling_latest_is_one_line_not_a_silent_restart(tmp_path, data_cache):
    out = tmp_path / "run"
    run_distrib(*small(out, data_cache, "parallel.zero_stage=1"), nproc=2)
    (out / "checkpoints" / "latest").write_text("step_00000042")
    proc = run_distrib(*small(out, data_cache, "parallel.zero_stage=1", "train.max_steps=8"), nproc=2, check=False)
    assert proc.returncode == 2
    assert _error_line(proc) == (
        f"distrib: error: {out / 'checkpoints' / 'latest'} names 'step_00000042', which is missing or incomplete; "
        "write the name of a complete one (step_00000003, step_00000006) into it to resume from there, "
        "or set checkpoint.resume=false to start over")
