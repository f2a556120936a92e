"""Start N local workers (and join a multi-node job) with torch's elastic agent.

This is what ``distrib <stage> CONFIG --nproc-per-node N`` uses when no launcher started the
process: the same agent as ``torchrun``, so workers that die are restarted (``--max-restarts``) and
nodes meet through a c10d rendezvous (``--rdzv-endpoint HOST:PORT``).
"""

from __future__ import annotations

import json
import os
import sys
import time

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
    os.environ[HAND_ERRORS_ENV] = "1"
    try:
        run(get_args_parser().parse_args(torchrun_args(worker_argv, **kwargs)))
    except ChildFailedError as e:
        said = [f.message for _, f in sorted(e.failures.items()) if f.error_file_data.get("distrib")]
        for message in dict.fromkeys(said):  # each once, in rank order
            print(f"distrib: error: {message}", file=sys.stderr)
        if not said:
            print(f"distrib: a worker failed: {e.get_first_failure()[1].message}", file=sys.stderr)
        return 1
    finally:
        os.environ.pop(HAND_ERRORS_ENV, None)
    return 0
