"""Start N local workers (and join a multi-node job) with torch's elastic agent; end them with it.

This is what ``distrib <stage> CONFIG --nproc-per-node N`` uses when no launcher started the
process: the same agent as ``torchrun``, so workers that die are restarted (``--max-restarts``) and
nodes meet through a c10d rendezvous (``--rdzv-endpoint HOST:PORT``). A process started this way (or
by ``torchrun``, or as a stage of ``distrib run``) calls :func:`die_with_launcher` so that it does not
outlive the process that started it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import sys
import threading
import time

from distrib.launch.env import FLIGHT_RECORDER_DIR, NCCL_ASYNC_ERROR_HANDLING

#: The pid of the process that started this one, set by it for :func:`die_with_launcher` (``distrib run`` for a
#: stage's command, :func:`run_local` for its workers).
LAUNCHER_PID_ENV = "DISTRIB_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

#: Signals the agent forwards to its workers; SIGUSR1 is Slurm's usual pre-preemption warning.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

#: Set for the workers of :func:`run_local`: a worker that ends in a one-line error hands it to the agent
#: (:func:`hand_to_launcher`), and :func:`run_local` prints it when the job has ended, after the agent's own
#: log lines, so that what went wrong is the last thing said.
HAND_ERRORS_ENV = "DISTRIB_HAND_ERRORS_TO_LAUNCHER"


def hand_to_launcher(message: str) -> bool:
    """In a worker: leave ``message`` for :func:`run_local` to print; False when it falls to the worker.

    The message goes into the error file the elastic agent gives each worker (``TORCHELASTIC_ERROR_FILE``),
    where the agent reads why a worker failed. Only under :func:`run_local`, and only in the agent's last
    attempt: a failure it restarts the workers after is said at once.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not os.environ.get(HAND_ERRORS_ENV) or not path:
        return False
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) < int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
        return False
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time()), "distrib": True}, f)
    except OSError:  # its file system is full too: the worker says it itself
        return False
    return True


def torchrun_args(worker_argv: list[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                  rdzv_endpoint: str | None = None, rdzv_id: str = "distrib", max_restarts: int = 0) -> list[str]:
    """The ``torchrun`` command line (without the program name) that runs ``python -m distrib worker_argv``."""
    args = ["--nproc-per-node", str(nproc_per_node), "--max-restarts", str(max_restarts),
            "--signals-to-handle", FORWARDED_SIGNALS]
    if nnodes == 1 and rdzv_endpoint is None:
        args.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the host of node 0)")
        args += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]
    return args + ["-m", "distrib", *worker_argv]


def run_local(worker_argv: list[str], **kwargs) -> int:
    """Run the workers to completion under the elastic agent; returns a process exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # Since torch 2.5 the c10d rendezvous lets the workers share the agent's TCPStore, and the agent
    # keeps that store across worker restarts: restarted workers then read the previous attempt's
    # process-group keys (gloo/NCCL addresses of dead ranks) and fail with "connection refused", so
    # --max-restarts could never succeed (pytorch/pytorch#135712; reproduced with torch 2.13 and plain
    # torchrun). Rank 0 then hosts a fresh store per attempt, as before torch 2.5. Every node of a job
    # must agree on this, hence unconditional; an explicit value in the environment wins.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # The agent gives the workers TORCH_NCCL_ASYNC_ERROR_HANDLING=1 unless it has a value itself: 1 ends a rank
    # whose collective timed out with SIGABRT, before its loop can name the rank that did not arrive.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", NCCL_ASYNC_ERROR_HANDLING)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the workers' environment is a copy of this one
    os.environ[HAND_ERRORS_ENV] = "1"
    try:
        run(get_args_parser().parse_args(torchrun_args(worker_argv, **kwargs)))
    except ChildFailedError as e:
        said = [f.message for _, f in sorted(e.failures.items()) if f.error_file_data.get("distrib")]
        for message in dict.fromkeys(said):  # each once, in rank order
            print(f"distrib: error: {message}", file=sys.stderr)
        if not said:
            print(f"distrib: a worker failed: {failure_line(*e.get_first_failure())}", file=sys.stderr)
        return 1
    finally:
        os.environ.pop(LAUNCHER_PID_ENV, None)
        os.environ.pop(HAND_ERRORS_ENV, None)
    return 0


def failure_line(rank: int, failure) -> str:
    """What the agent's record of the first failed worker (a ``ProcessFailure``) says, naming the rank.

    A worker ended by SIGABRT was most often ended by NCCL's watchdog after a collective timed out (or
    an NCCL error) without its loop seeing it: the line says so, and where the flight recorder's dumps
    show which rank did not arrive.
    """
    if failure.signal_name() == "SIGABRT":
        return (f"rank {rank} (pid {failure.pid}) was aborted (SIGABRT), as NCCL's watchdog ends a rank whose "
                f"collective timed out; the dumps in the run's {FLIGHT_RECORDER_DIR}/ show which rank did not arrive "
                f"(torchfrtrace <output_dir>/{FLIGHT_RECORDER_DIR} -p rank_), and that rank's log where it stopped")
    return f"rank {rank}: {failure.message}"

def die_with_launcher(poll_seconds: float = 0.5) -> None:
    """End this process the moment the process that started it dies, however it dies (``kill -9`` included).

    A worker of an elastic agent (``distrib ... --nproc-per-node``, ``torchrun``) runs in a session of its
    own, and a stage of ``distrib run`` is a child the pipeline waits on: when the starter is killed alone
    (by a scheduler, the OOM killer, ``kill -9``), they would keep training and writing to a run directory
    whose lock died with it. On Linux the kernel kills this process when its parent ends
    (``PR_SET_PDEATHSIG``), whatever it is doing: a collective, data preparation, C code holding the GIL.
    Where that is not available a daemon thread checks the parent every ``poll_seconds``.

    Applies when the starter named itself in ``DISTRIB_LAUNCHER_PID`` (which then leaves this process's
    environment, so what it starts in turn is not tied to the wrong process) or under ``torchrun``
    (``TORCHELASTIC_RUN_ID`` set; the starter is then the parent). srun and mpirun end their tasks
    themselves. Call it first thing, from the main thread.
    """
    named = os.environ.pop(LAUNCHER_PID_ENV, "")
    if not named.isdigit() and not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    launcher = int(named) if named.isdigit() else os.getppid()
    watched = die_with_parent()
    if os.getppid() != launcher:  # it died before the kernel was watching
        _stop(launcher)
    if not watched:
        def watch() -> None:
            while os.getppid() == launcher:
                time.sleep(poll_seconds)
            _stop(launcher)

        threading.Thread(target=watch, name="distrib-die-with-launcher", daemon=True).start()


def die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent ends; whether it will (not elsewhere).

    The parent is the thread that started this process: call it only in a process started by a thread that
    lives as long as its parent process does (the main thread; a ``multiprocessing`` pool's initial workers).
    """
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # a C library without prctl
        return False


def _stop(launcher: int) -> None:
    print(f"distrib: the launcher (pid {launcher}) is gone; stopping this process (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
