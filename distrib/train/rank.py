"""One rank of a training job: join the process group, take the run's lock, run the loop, say a failure once.

What every worker runs after :mod:`distrib.commands.train` has checked the config, the world, the resume point
and the data; the process that only checks and starts the workers never imports this module (nor the loop).
"""

from __future__ import annotations

import sys
from pathlib import Path

from distrib.config import Config, ConfigError
from distrib.errors import TrainingError
from distrib.fs import full_disk
from distrib.launch.env import LaunchEnv
from distrib.launch.local import hand_to_launcher
from distrib.lock import RunLock, held_by_launcher
from distrib.parallel.topology import Topology
from distrib.train.trainer import Trainer
from distrib.utils import StopRequest, setup_logging

EXIT_FAILED = 1


def run_rank(cfg: Config, stage, env: LaunchEnv, resume_from: Path | None) -> int:
    """This process is one rank of the job: join the process group, take the run's lock (rank 0) and run the loop.

    Returns the process's exit code: 0, or :data:`EXIT_FAILED` after a failure said in one line (once, by the
    rank that knows it).
    """
    stop = StopRequest()
    env.export()
    setup_logging()
    topo = Topology.init(tp=cfg.parallel.tp, timeout_minutes=cfg.parallel.timeout_minutes, run_dir=cfg.output_dir)
    lock = None
    try:
        # Under srun or mpirun every process is a worker: rank 0 takes the lock, and all ranks learn
        # whether it could before anything is written.
        refused = None
        if topo.is_main and not held_by_launcher(cfg.output_dir):
            try:
                lock = RunLock(cfg.output_dir).acquire()
            except ConfigError as e:
                refused = str(e)
        if topo.any(refused is not None):
            raise ConfigError(refused or "another run holds output_dir")
        Trainer(cfg, topo, stage(), resume_from=resume_from, stop=stop).fit()
    except TrainingError as e:
        if topo.is_main or e.from_this_rank:
            _say(str(e))
        return EXIT_FAILED
    except Exception as e:
        # A full disk where the ranks do not learn of it together: this rank says so, once, instead of a traceback.
        disk = full_disk(e, cfg.output_dir)
        if disk is None:
            raise
        _say(f"writing to {cfg.output_dir} failed on rank {topo.rank}: {disk}; free space on it and run the same "
             "command to resume")
        return EXIT_FAILED
    finally:
        if lock is not None:
            lock.release()
        topo.shutdown()
    return 0


def _say(msg: str) -> None:
    """A worker's one-line error: for the launcher to print when the job has ended, when it is ours, else now."""
    if not hand_to_launcher(msg):
        print(f"distrib: error: {msg}", file=sys.stderr)
