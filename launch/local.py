"""Start N local workers (and join a multi-node job) with torch's elastic agent.

This is what ``distrib <stage> CONFIG --nproc-per-node N`` uses when no launcher started the
process: the same agent as ``torchrun``, so workers that die are restarted (``--max-restarts``) and
nodes meet through a c10d rendezvous (``--rdzv-endpoint HOST:PORT``).
"""

from __future__ import annotations

import os
import sys

from distrib.launch.env import FLIGHT_RECORDER_DIR, NCCL_ASYNC_ERROR_HANDLING

#: Signals the agent forwards to its workers; SIGUSR1 is Slurm's usual pre-preemption warning.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


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
    try:
        run(get_args_parser().parse_args(torchrun_args(worker_argv, **kwargs)))
    except ChildFailedError as e:
        print(f"distrib: a worker failed: {failure_line(*e.get_first_failure())}", file=sys.stderr)
        return 1
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

