"""A hung rank on NCCL: the environment the process group is made with, what NCCL raises, and the launcher's line.

The hung-rank guarantee runs end to end on gloo (tests/distributed/test_reliability.py); these check the parts
that differ on NCCL without a GPU: the variables set before the process group exists, that the loop reads what
torch 2.13's NCCL backend raises as a timeout (and nothing else), and what the launcher says of a rank that
NCCL's watchdog ended with SIGABRT.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

import distrib.parallel.topology as topology
from distrib.parallel.topology import Topology, collective_timed_out
from distrib.train.trainer import Trainer, TrainingError
from distrib.launch.env import nccl_env
from distrib.launch.local import failure_line

NCCL_VARS = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT",
             "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE",
             "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
#: What torch 2.13's ProcessGroupNCCL says when the watchdog finds a collective past its timeout.
WATCHDOG = ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=412, OpType=ALLREDUCE, "
            "NumelIn=1, NumelOut=1, Timeout(ms)=1800000) ran for 1800000 milliseconds before timing out.")


@pytest.fixture
def clean_env(monkeypatch):
    """None of the variables set; whatever a test (or Topology.init) sets is undone after it."""
    for name in NCCL_VARS:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_nccl_env_sets_error_handling_dump_on_timeout_buffer_and_dumps_in_the_run_dir(tmp_path):
    assert nccl_env(tmp_path / "run", environ={}) == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_FR_DUMP_TEMP_FILE": f"{tmp_path}/run/flight_recorder/rank_",
    }


@pytest.mark.parametrize("user", [
    {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, {"NCCL_ASYNC_ERROR_HANDLING": "3"},
    {"TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}, {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"}, {"TORCH_FR_BUFFER_SIZE": "100"},
    {"TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_"}, {"TORCH_FR_DUMP_TEMP_FILE": "/scratch/fr_"},
])
def test_nccl_env_leaves_what_the_user_set_under_either_name(tmp_path, user):
    env = nccl_env(tmp_path, environ=user)
    assert len(env) == 3
    ours = {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_BUFFER_SIZE",
            "TORCH_FR_DUMP_TEMP_FILE"}
    assert set(env) < ours  # never the old names, never a second value for a variable the user set


def test_nccl_env_without_a_run_dir_leaves_the_dumps_where_torch_puts_them():
    assert "TORCH_FR_DUMP_TEMP_FILE" not in nccl_env(None, environ={})


class _Made(Exception):
    """Raised where the process group would be made, with the environment it would be made with."""


def _env_at_process_group(monkeypatch, tmp_path, backend: str) -> dict:
    """The environment Topology.init makes the process group with, on an accelerator using ``backend``."""
    accel = SimpleNamespace(communication_backend_name=lambda: backend)
    monkeypatch.setattr(topology, "get_accelerator", lambda: accel)
    monkeypatch.setattr(topology.dist, "is_initialized", lambda: False)

    def init_distributed(**kwargs):
        raise _Made(dict(os.environ))

    monkeypatch.setattr(topology.deepspeed, "init_distributed", init_distributed)
    with pytest.raises(_Made) as made:
        Topology.init(run_dir=tmp_path / "run")
    return made.value.args[0]


def test_a_nccl_process_group_is_made_with_the_timeout_env_and_the_flight_recorder_dir(monkeypatch, tmp_path,
                                                                                       clean_env):
    env = _env_at_process_group(monkeypatch, tmp_path, "nccl")
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_BUFFER_SIZE"] == "2000"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == f"{tmp_path}/run/flight_recorder/rank_"
    assert (tmp_path / "run" / "flight_recorder").is_dir()  # torch writes the files, not the directory


def test_a_user_value_is_kept_when_the_nccl_process_group_is_made(monkeypatch, tmp_path, clean_env):
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    monkeypatch.setenv("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "/scratch/fr_")
    env = _env_at_process_group(monkeypatch, tmp_path, "nccl")
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == "/scratch/fr_" and "TORCH_FR_DUMP_TEMP_FILE" not in env
    assert not (tmp_path / "run" / "flight_recorder").exists()


def test_a_gloo_process_group_is_made_without_any_of_it(monkeypatch, tmp_path, clean_env):
    env = _env_at_process_group(monkeypatch, tmp_path, "gloo")
    assert not set(NCCL_VARS) & set(env)
    assert not (tmp_path / "run").exists()


TIMEOUTS = [
    dist.DistBackendError(WATCHDOG),  # raised by wait() on the work the watchdog marked
    dist.DistBackendError("NCCL communicator was aborted on rank 0."),  # the next collective, after the abort
    dist.DistBackendError(f"NCCL communicator was aborted on rank 1.  Original reason for failure was: {WATCHDOG}"),
    RuntimeError(WATCHDOG),  # torch before DistBackendError existed
    RuntimeError("NCCL communicator was aborted on rank 3. "),
    RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                 "15000ms for recv operation to complete"),  # gloo
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Application timeout caused pair closure"),
    dist.DistStoreError("wait timeout after 900000ms, keys: /default_pg/0//cuda//0"),
]
NOT_TIMEOUTS = [
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.35 GiB total capacity)"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 128x64)"),
    RuntimeError("DataLoader worker (pid 4242) exited unexpectedly"),
    dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.27.3"),
    dist.DistNetworkError("Connection reset by peer"),
    ValueError("timed out waiting for nothing"),  # not what a collective raises
]


@pytest.mark.parametrize("error", TIMEOUTS, ids=lambda e: f"{type(e).__name__}:{str(e)[:40]}")
def test_what_gloo_and_nccl_raise_for_a_collective_past_its_timeout_is_a_timeout(error):
    assert collective_timed_out(error)


@pytest.mark.parametrize("error", NOT_TIMEOUTS, ids=lambda e: f"{type(e).__name__}:{str(e)[:40]}")
def test_other_errors_are_not(error):
    assert not collective_timed_out(error)


def _fit_failing_with(error):
    """Trainer.fit on a trainer whose loop raises ``error``, on rank 0 of a job whose rank 1 did not arrive."""

    def loop():
        raise error

    late = "a collective timed out after 30 min on rank 0 at step 3, micro-batch 0, backward: rank 1 (...) did not arrive"
    return Trainer.fit(SimpleNamespace(_fit=loop, topo=SimpleNamespace(who_is_late=lambda: late)))


@pytest.mark.parametrize("error", TIMEOUTS[:3], ids=["watchdog", "aborted", "aborted-with-reason"])
def test_the_loop_ends_a_nccl_timeout_naming_the_rank_that_did_not_arrive(error):
    with pytest.raises(TrainingError, match=r"rank 1 \(\.\.\.\) did not arrive") as raised:
        _fit_failing_with(error)
    assert raised.value.from_this_rank


def test_the_loop_lets_an_unrelated_runtime_error_through():
    error = NOT_TIMEOUTS[0]
    with pytest.raises(RuntimeError) as raised:
        _fit_failing_with(error)
    assert raised.value is error


def test_the_launcher_names_the_rank_nccls_watchdog_aborted():
    failure = ProcessFailure(local_rank=1, pid=4242, exitcode=-6, error_file="/nonexistent/error.json")
    line = failure_line(3, failure)
    assert line.startswith("rank 3 (pid 4242) was aborted (SIGABRT)")
    assert "flight_recorder" in line and "\n" not in line


def test_the_launcher_names_the_rank_of_any_other_failure():
    failure = ProcessFailure(local_rank=0, pid=4242, exitcode=-9, error_file="/nonexistent/error.json")
    assert failure_line(2, failure) == "rank 2: Signal 9 (SIGKILL) received by PID 4242"
