"""slurm/train.sbatch on a real one-machine Slurm cluster (scripts/local-slurm.sh).

Needs root: the fixture installs slurm-wlm and munge with apt-get if they are missing, writes
/etc/slurm/slurm.conf and starts munged, slurmctld and slurmd; it stops the daemons it started at
the end. Run with ``python -m pytest tests/cluster -q -x``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import ROOT, SMALL, TINY, metrics

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

LOCAL_SLURM = ROOT / "scripts" / "local-slurm.sh"
SBATCH = ROOT / "slurm" / "train.sbatch"
SLURM_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/distrib-slurm"))

#: local-slurm.sh exit codes meaning "this machine cannot host the cluster" (see the script).
CANNOT_INSTALL, NOT_ROOT = 10, 13

RUN_TIMEOUT = 600  # one training job, submit to end (about 45 s here)
SMALL_MAX_STEPS = int(next(o.split("=")[1] for o in SMALL if o.startswith("train.max_steps=")))
GLOBAL_BATCH = int(next(o.split("=")[1] for o in SMALL if o.startswith("train.global_batch_size=")))


# -- the cluster ----------------------------------------------------------------------------------
def _local_slurm(cmd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_SLURM), cmd], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "SLURM_LOCAL_DIR": str(SLURM_DIR)})


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root: scripts/local-slurm.sh installs slurm-wlm/munge and starts slurmd as root")
    was_running = _local_slurm("status", timeout=60).returncode == 0
    start = time.monotonic()
    proc = _local_slurm("start", timeout=1200)
    if proc.returncode in (CANNOT_INSTALL, NOT_ROOT):
        pytest.skip(f"cannot install Slurm on this machine (local-slurm.sh start exited {proc.returncode}): "
                    f"{proc.stderr.strip()[-1500:]}")
    assert proc.returncode == 0, (
        f"scripts/local-slurm.sh start exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{_daemon_logs()}")
    print(f"local Slurm cluster up in {time.monotonic() - start:.1f}s ({'already running' if was_running else 'started'})")
    yield
    if not was_running:  # leave a cluster someone else started alone
        stop = _local_slurm("stop", timeout=300)
        assert stop.returncode == 0, f"local-slurm.sh stop exited {stop.returncode}\n{stop.stderr}"


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    # The jobs run as root here, so any tmp directory is readable by them.
    return tmp_path_factory.mktemp("slurm-data-cache")


# -- helpers --------------------------------------------------------------------------------------
def _tail(path: Path, n: int = 80) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"({e})"


def _daemon_logs() -> str:
    return "\n".join(f"--- {p} (tail) ---\n{_tail(p, 60)}"
                     for p in (SLURM_DIR / "log" / "slurmctld.log", SLURM_DIR / "log" / "slurmd.log"))


def _diagnostics(job_id: str | None, job_out: Path) -> str:
    parts = [f"--- job output {job_out} (tail) ---\n{_tail(job_out, 120)}"]
    if job_id:
        show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
        parts.append(f"--- scontrol show job {job_id} ---\n{show.stdout}{show.stderr}")
    parts.append(_daemon_logs())
    return "\n".join(parts)


@contextmanager
def job_guard(job_out: Path):
    """Yields a dict to record the job id in; on any failure prints the job's output and the daemon
    logs and cancels the job, so a failed test leaves the cluster idle for the next one."""
    job: dict = {"id": None}
    try:
        yield job
    except BaseException:
        print(_diagnostics(job["id"], job_out))
        raise
    finally:
        if job["id"] and job_fields(job["id"]).get("JobState") not in (None, "COMPLETED", "FAILED", "CANCELLED"):
            subprocess.run(["scancel", job["id"]], capture_output=True, timeout=30)


def sbatch_env(overrides: list[str]) -> dict:
    return {**os.environ, "CONFIG": TINY, "OVERRIDES": " ".join(shlex.quote(o) for o in overrides),
            "DISTRIB_PYTHON": sys.executable}


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (empty once Slurm has forgotten the job)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return {}
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", proc.stdout))


def wait_for(what: str, predicate, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def loss_steps(out: Path) -> list[int]:
    return [r["step"] for r in metrics(out) if r.get("loss") is not None]


# -- tests ----------------------------------------------------------------------------------------
def test_sbatch_wait_trains_two_tasks_to_an_exported_model(slurm_cluster, tmp_path, data_cache):
    out, job_out = tmp_path / "run", tmp_path / "job.out"
    overrides = [*SMALL, f"output_dir={out}", f"data.cache_dir={data_cache}"]
    cmd = ["sbatch", "--wait", "--parsable", "--ntasks-per-node=2", "-o", str(job_out), str(SBATCH)]
    start = time.monotonic()
    with job_guard(job_out) as job:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=sbatch_env(overrides), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        job["id"] = proc.stdout.readline().strip().split(";")[0] or None  # --parsable prints the id first
        try:
            stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}: {stdout}{stderr}"
        print(f"job {job['id']}: submit to end {time.monotonic() - start:.1f}s")

        log = job_out.read_text()
        assert "2 task(s)" in log and "world=2 (dp=2" in log, "the job did not run 2 ranks"
        assert loss_steps(out) == list(range(1, SMALL_MAX_STEPS + 1))
        assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors").is_file()

        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out / "hf")
        assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2


def test_preemption_warning_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, data_cache):
    """Slurm's pre-preemption warning (--signal=B:USR1@...) mid-run: the job checkpoints, requeues
    itself, comes back, resumes from the checkpoint and finishes; no step and no sample is lost or
    repeated."""
    max_steps = 60
    out, job_out = tmp_path / "run", tmp_path / "job.out"
    overrides = [*SMALL, f"output_dir={out}", f"data.cache_dir={data_cache}", f"train.max_steps={max_steps}",
                 "data.trace_samples=true", "checkpoint.every_steps=1000", "eval.every_steps=1000"]
    start = time.monotonic()
    with job_guard(job_out) as job:
        proc = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "-o", str(job_out), str(SBATCH)],
                              cwd=ROOT, env=sbatch_env(overrides), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"sbatch exited {proc.returncode}: {proc.stdout}{proc.stderr}"
        job_id = job["id"] = proc.stdout.strip().split(";")[0]

        # A couple of optimizer steps in, send what `#SBATCH --signal=B:USR1@120` sends: SIGUSR1 to the
        # batch shell only.
        metrics_file = out / "metrics.jsonl"
        wait_for("the first training steps in metrics.jsonl",
                 lambda: metrics_file.is_file() and len(loss_steps(out)) >= 2, RUN_TIMEOUT, interval=0.2)
        signalled = time.monotonic()
        sc = subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], capture_output=True, text=True, timeout=30)
        assert sc.returncode == 0, f"scancel --signal=USR1 --batch failed: {sc.stderr}"

        # The script checkpoints and requeues: the job goes back to PENDING with one restart. Slurm holds
        # a requeued job for about two minutes (BeginTime = requeue + 121 s); fast-forward that hold.
        fields = wait_for("the job to requeue itself (JobState=PENDING, Restarts=1)",
                          lambda: (f := job_fields(job_id)).get("Restarts") == "1" and f.get("JobState") == "PENDING"
                          and f, 180)
        requeued = time.monotonic()
        assert fields.get("Requeue") == "1"
        # Release the hold only once the node has finished cleaning up the first run (no COMPLETING
        # state left): a start pushed into that window can fail at launch.
        wait_for("the node to be idle again after the requeue",
                 lambda: subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                                        timeout=30).stdout.split() == ["idle"], 120)
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True,
                       capture_output=True, timeout=30)

        fields = wait_for("the requeued job to finish",
                          lambda: (f := job_fields(job_id)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                                               "TIMEOUT", "NODE_FAIL") and f,
                          RUN_TIMEOUT, interval=1)
        print(f"job {job_id}: submit to signal {signalled - start:.1f}s, signal to requeue {requeued - signalled:.1f}s, "
              f"requeue to end {time.monotonic() - requeued:.1f}s")
        assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", fields
        assert (out / "hf" / "config.json").is_file(), "the resumed run did not export hf/"

        # The job output (appended across both runs) shows the stop, the requeue and the resume.
        log = job_out.read_text()
        stopped = re.findall(r"stopping early at step (\d+); the same command resumes from here", log)
        assert len(stopped) == 1, "expected exactly one early stop in the job output"
        stop_step = int(stopped[0])
        assert 1 <= stop_step < max_steps
        assert "received SIGUSR1" in log and f"requeueing job {job_id}" in log
        assert f"job {job_id} restart 1:" in log
        assert re.search(rf"resumed from \S*step_0*{stop_step} at step {stop_step}\b", log), "no resume in the output"

        # metrics: each step logged once, first run 1..stop_step, resumed run stop_step+1..max_steps
        assert loss_steps(out) == list(range(1, max_steps + 1))

        # Sample trace: every step 0..max_steps-1 exactly once per rank across both runs, each step's
        # union of indices is one global batch, and no dataset index is ever repeated (the dataset holds
        # far more than max_steps x global batch blocks, so the whole run is inside one epoch).
        per_step: dict[int, list[dict]] = defaultdict(list)
        traces = sorted((out / "trace").glob("samples-rank*.jsonl"))
        assert [t.name for t in traces] == ["samples-rank00000.jsonl", "samples-rank00001.jsonl"]
        for trace in traces:
            for line in trace.read_text().splitlines():
                rec = json.loads(line)
                per_step[rec["step"]].append(rec)
        assert sorted(per_step) == list(range(max_steps))
        seen: set[int] = set()
        for step, recs in sorted(per_step.items()):
            assert sorted(r["rank"] for r in recs) == [0, 1], f"step {step} traced by ranks {[r['rank'] for r in recs]}"
            union = {i for r in recs for i in r["indices"]}
            assert len(union) == GLOBAL_BATCH == sum(len(r["indices"]) for r in recs), f"step {step}: {recs}"
            assert not union & seen, f"step {step} repeats samples {sorted(union & seen)}"
            seen |= union
        assert len(seen) == max_steps * GLOBAL_BATCH


def test_srun_tasks_prepare_the_data_together(slurm_cluster, tmp_path):
    """``srun -n 2 distrib prepare-data``: both tasks tokenize one cache, which equals one process's build."""
    corpus = tmp_path / "docs.jsonl"
    with open(corpus, "w") as f:
        for i in range(6000):
            f.write(json.dumps({"text": f"document {i}: " + " ".join(f"w{(i * 7 + j) % 501}" for j in range(40))}) + "\n")
    overrides = ["data.source=files", f"data.train_files=[{corpus}]", "data.seq_len=64", "data.vocab_size=400",
                 "data.num_proc=1"]
    alone = subprocess.run([sys.executable, "-m", "distrib", "prepare-data", TINY, *overrides,
                            f"data.cache_dir={tmp_path / 'alone'}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=RUN_TIMEOUT)
    assert alone.returncode == 0, alone.stderr
    # The building task pauses in its first tokenizing task, so the other surely finds work left.
    env = {**os.environ, "DISTRIB_FAULT": "tokenize:pause:0:0"}
    proc = subprocess.run(["srun", "-n", "2", "--kill-on-bad-exit=1", sys.executable, "-m", "distrib", "prepare-data",
                           TINY, *overrides, f"data.cache_dir={tmp_path / 'job'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{_daemon_logs()}"
    built = {Path(line) for line in proc.stdout.splitlines() if line.startswith(str(tmp_path))}
    assert len(built) == 1, proc.stdout  # both tasks print the one cache
    built = built.pop()
    by = json.loads((built / "meta.json").read_text())["tokenized_by"]["train"]
    assert len(by) == 2, f"one task tokenized everything: {by}"
    reference = Path(alone.stdout.splitlines()[0])
    for split in ("train", "validation"):
        (a,), (b,) = (sorted((d / split).glob("*.arrow")) for d in (built, reference))
        assert a.read_bytes() == b.read_bytes(), split
