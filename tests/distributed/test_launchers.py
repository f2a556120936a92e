"""The documented ways to start training, run for real: mpirun, torchrun, two "nodes", a killed worker.

Every run is the small fp32 model of ``tests.helpers.SMALL`` on 2 CPU processes; the losses of each
launcher are compared with ``--nproc-per-node 2`` (torch's elastic agent, the one behind torchrun).
The ranks, data order and collectives are the same whoever started them, so the only possible
differences are reduction orders: RTOL is the same 1e-4 as in test_pretrain.py (in practice they
are bitwise equal).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, TINY, losses, metrics, run_distrib, small

pytestmark = pytest.mark.slow

RTOL = 1e-4
#: Bound on any one training run (a 2-process small run takes ~20 s on 2 CPU cores).
RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """``distrib pretrain ... --nproc-per-node 2``: 2 workers under torch's elastic agent."""
    out = tmp_path_factory.mktemp("nproc2")
    run_distrib(*small(out, data_cache), nproc=2)
    return out


# -- processes -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    # One thread per rank: 2 ranks on 2 cores must not oversubscribe them.
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


class Proc:
    """A command started in its own session (so the whole tree can be killed), output kept in files."""

    def __init__(self, cmd: list[str], logs: Path, name: str, env: dict[str, str] | None = None):
        self.cmd, self.name = cmd, name
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=out, stderr=err,
                                          stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def tail(self) -> str:
        out = self.out_path.read_text(errors="replace")[-2000:]
        err = self.stderr()[-6000:]
        return f"--- {self.name}: {' '.join(self.cmd)} (exit {self.popen.returncode})\n{out}\n--- stderr:\n{err}"

    def wait(self, deadline: float) -> int:
        try:
            return self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not finish in time\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL this process's session (its process group: launcher, agent and workers)."""
        if self.popen.poll() is None or _group_alive(self.pid):
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _run_all(procs: list[Proc], timeout: float = RUN_TIMEOUT) -> None:
    """Wait for every process (bounded); all must exit 0."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(deadline)
    failed = [p for p in procs if p.popen.returncode != 0]
    assert not failed, "\n".join(p.tail() for p in procs)


def _assert_same_losses(out: Path, reference: Path, procs: list[Proc], steps: int = 6) -> None:
    got, ref = losses(out), losses(reference)
    context = "\n".join(p.tail() for p in procs)
    assert sorted(got) == list(range(1, steps + 1)), context
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=RTOL,
                               err_msg=context)


def _worker_children(agent_pid: int) -> list[tuple[int, dict[str, str]]]:
    """``(pid, environ)`` of the agent's child processes that run ``-m distrib``."""
    try:
        import psutil
    except ImportError:
        psutil = None
    found = []
    if psutil is not None:
        for child in psutil.Process(agent_pid).children():
            try:
                cmd, environ = child.cmdline(), child.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "-m" in cmd and "distrib" in cmd:
                found.append((child.pid, environ))
        return found
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ')'
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
            raw = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if b"-m" in cmd and b"distrib" in cmd:
            environ = dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)
            found.append((int(stat.parent.name), environ))
    return found


# -- the launchers -----------------------------------------------------------------------------------


def _mpirun() -> str | None:
    """The mpirun of this Python's environment (the MPI mpi4py was built with), else the one on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("mpirun")


def test_mpirun_2_ranks_trains_to_completion_with_the_losses_of_nproc_per_node_2(tmp_path, data_cache, reference):
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun next to sys.executable nor on PATH (pip install mpich mpi4py)")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    launcher_args = []
    if "HYDRA" in version:  # MPICH / Intel MPI: start local ranks by fork, no ssh needed
        launcher_args = ["-launcher", "fork"]
    elif "Open MPI" in version and os.geteuid() == 0:
        launcher_args = ["--allow-run-as-root"]
    out = tmp_path / "mpi"
    cmd = [mpirun, *launcher_args, "-np", "2", sys.executable, "-m", "distrib", "pretrain", TINY,
           *small(out, data_cache)]
    # A free MASTER_PORT rather than the MPI default (29500), which a concurrent run may hold.
    # OMP_NUM_THREADS is in the environment mpirun passes on to its ranks.
    proc = Proc(cmd, tmp_path / "logs", "mpirun", env=_env(MASTER_PORT=str(_free_port())))
    try:
        _run_all([proc])
        assert "world=2 (dp=2" in proc.stderr(), proc.tail()
        assert (out / "hf" / "model.safetensors").is_file(), proc.tail()
        _assert_same_losses(out, reference, [proc])
    finally:
        proc.kill()


@pytest.mark.parametrize("stage", ["finetune", "distill"])
def test_mpirun_runs_every_stage_like_the_elastic_agent(tmp_path, data_cache, base, stage):
    """Every stage launches the same way: a LoRA fine-tune, a distillation under mpirun equal the same under
    --nproc-per-node 2."""
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun next to sys.executable nor on PATH (pip install mpich mpi4py)")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    launcher_args = ["-launcher", "fork"] if "HYDRA" in version else (
        ["--allow-run-as-root"] if "Open MPI" in version and os.geteuid() == 0 else [])
    if stage == "finetune":
        config, ft = TINY, ("data.name=prose", f"init_from={base}", "finetune.lora.rank=4", "parallel.zero_stage=3")
    else:  # a student cut from the base's second block, partitioned with its teacher by ZeRO-3
        config = str(ROOT / "configs/distill/tiny.yaml")
        ft = ("data.name=prose", f"teacher={base}", "student.init_from_teacher_layers=[1]", "parallel.zero_stage=3")

    def args(out):
        return [a for a in small(out, data_cache, *ft) if stage == "finetune" or not a.startswith("model.")]

    agent, mpi = tmp_path / "agent", tmp_path / "mpi"
    run_distrib(*args(agent), nproc=2, stage=stage, config=config)
    cmd = [mpirun, *launcher_args, "-np", "2", sys.executable, "-m", "distrib", stage, config, *args(mpi)]
    proc = Proc(cmd, tmp_path / "logs", "mpirun", env=_env(MASTER_PORT=str(_free_port())))
    try:
        _run_all([proc])
        assert (mpi / ("adapter/adapter_model.safetensors" if stage == "finetune" else "hf/model.safetensors")).is_file(), \
            proc.tail()
        assert losses(mpi) == losses(agent)
    finally:
        proc.kill()


def test_torchrun_console_script_gives_the_losses_of_nproc_per_node_2(tmp_path, data_cache, reference):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip(f"no torchrun console script next to {sys.executable}")
    out = tmp_path / "torchrun"
    cmd = [str(torchrun), "--nproc-per-node", "2", "-m", "distrib", "pretrain", TINY, *small(out, data_cache)]
    proc = Proc(cmd, tmp_path / "logs", "torchrun")
    try:
        _run_all([proc])
        assert (out / "hf" / "model.safetensors").is_file(), proc.tail()
        _assert_same_losses(out, reference, [proc])
    finally:
        proc.kill()


def test_two_nodes_on_one_machine_rendezvous_and_match_one_node_with_2_processes(tmp_path, data_cache, reference):
    out = tmp_path / "nodes"  # one output_dir, as on a shared filesystem
    endpoint, rdzv_id = f"127.0.0.1:{_free_port()}", f"test-{uuid.uuid4().hex[:12]}"
    nodes = []
    try:
        for node_rank in (0, 1):
            cmd = [sys.executable, "-m", "distrib", "pretrain", TINY, *small(out, data_cache),
                   "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", str(node_rank),
                   "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]
            nodes.append(Proc(cmd, tmp_path / "logs", f"node{node_rank}"))
        _run_all(nodes)
        context = "\n".join(p.tail() for p in nodes)
        assert "world=2 (dp=2" in context, context
        state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
        assert state["step"] == 6 and state["world_size"] == 2, context
        assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors").is_file(), context
        _assert_same_losses(out, reference, nodes)
    finally:
        for p in nodes:
            p.kill()


def _wait_for(cond, proc: Proc, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited before {what}\n{proc.tail()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{proc.tail()}")


def _records(out: Path) -> list[dict]:
    try:
        return metrics(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_killed_worker_is_restarted_and_resumes_exactly_from_the_latest_checkpoint(tmp_path, data_cache):
    from transformers import AutoModelForCausalLM

    out, max_steps, every = tmp_path / "run", 20, 5
    # dropout makes the RNG state part of what an exact resume has to restore
    args = small(out, data_cache, f"train.max_steps={max_steps}", f"checkpoint.every_steps={every}",
                 "eval.every_steps=10", "model.dropout=0.1")
    cmd = [sys.executable, "-m", "distrib", "pretrain", TINY, *args, "--nproc-per-node", "2", "--max-restarts", "1"]
    agent = Proc(cmd, tmp_path / "logs", "agent")
    try:
        def progress_past_a_checkpoint():
            # Some checkpoint L is published and steps after it were logged, at least 2 steps before the
            # next save (so the kill lands before it and the steps L+1..M are certainly run again).
            latest = out / "checkpoints" / "latest"
            if not latest.is_file():
                return None
            saved = int(latest.read_text().strip().removeprefix("step_"))
            logged = max((r["step"] for r in _records(out) if "loss" in r), default=0)
            return (saved, logged) if saved < logged <= saved + every - 2 else None

        saved, logged = _wait_for(progress_past_a_checkpoint, agent, RUN_TIMEOUT, "a checkpoint and steps after it")
        workers = _wait_for(lambda: _worker_children(agent.pid), agent, 30, "the workers")
        assert len(workers) == 2, f"expected 2 workers under the agent, found {workers}\n{agent.tail()}"
        # rank 0: it writes the metrics and publishes checkpoints, the harder one to lose
        victim = next((pid for pid, environ in workers if environ.get("RANK") == "0"), workers[0][0])
        before_kill = _records(out)
        os.kill(victim, signal.SIGKILL)

        _run_all([agent])
        stderr = agent.stderr()
        resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", stderr)
        assert resumed, f"the restarted workers did not resume\n{agent.tail()}"
        resumed_at = int(resumed.group(2))
        assert saved <= resumed_at < logged, f"resumed at {resumed_at}, killed at {logged} (saved {saved})"

        # the final checkpoint is complete and exports to a directory transformers loads
        latest = (out / "checkpoints" / "latest").read_text().strip()
        assert latest == f"step_{max_steps:08d}"
        state = json.loads((out / "checkpoints" / latest / "trainer_state.json").read_text())
        assert state["step"] == max_steps and state["samples_seen"] == max_steps * 8
        exported = tmp_path / "exported"
        export = subprocess.run([sys.executable, "-m", "distrib", "export", str(out / "checkpoints" / latest),
                                 str(exported)], capture_output=True, text=True, cwd=ROOT, timeout=RUN_TIMEOUT,
                                env=_env())
        assert export.returncode == 0, export.stderr[-4000:]
        model = AutoModelForCausalLM.from_pretrained(exported)
        assert model.config.num_hidden_layers == 2
        assert (exported / "model.safetensors").read_bytes() == (out / "hf" / "model.safetensors").read_bytes()

        # every step is logged; the steps run twice (after the checkpoint, before the kill) agree exactly
        records = [r for r in metrics(out) if "loss" in r]
        last = {r["step"]: r for r in records}
        assert sorted(last) == list(range(1, max_steps + 1)), sorted(last)
        first_run = {r["step"]: r["loss"] for r in before_kill if "loss" in r}
        rerun = range(resumed_at + 1, logged + 1)
        assert rerun, "no step was run twice"
        assert [first_run[s] for s in rerun] == [last[s]["loss"] for s in rerun]
        # ...and metrics.jsonl keeps one row per step (the rows after the resumed checkpoint were replaced)
        counts = {s: sum(r["step"] == s for r in records) for s in last}
        assert all(c == 1 for c in counts.values()), counts
    finally:
        agent.kill()
