"""``distrib pretrain|finetune|distill`` and ``distrib prepare-data``: check everything, then train.

Everything that can be found wrong is found in the process the user started, before a worker or process group
exists: the config, the world, the resume point and the data (prepared into the shared cache now, so a bad file
is one line, not a traceback per rank). Then the same process either starts the workers itself
(``--nproc-per-node``, torch's elastic agent) or, started by a launcher, is one of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distrib.checkpoint import check_resumable, read_state
from distrib.checkpoint.base import check_base, resolve_base, with_base
from distrib.config import Config, ConfigError
from distrib.data import prepare_data
from distrib.launch.env import LaunchEnv, detect, launcher_rank
from distrib.launch.local import run_local
from distrib.lock import RunLock, held_by_launcher
from distrib.stages import stage_class

def train(args: argparse.Namespace, cfg: Config) -> int:
    """Run a training stage: checks, data, lock, then workers (started here or by a launcher)."""
    env = detect()
    local = args.nproc_per_node is not None and env.launcher == "none"
    world = _world(args, env, local)
    if launcher_rank() == 0 and args.node_rank == 0 and not held_by_launcher(cfg.output_dir):
        RunLock(cfg.output_dir).check_free()  # a busy directory is the first thing to say
    cfg, stage = _resolve(cfg, args.command)
    cfg.check_world(world)
    resume_from = check_resumable(cfg)
    # Hashing the base reads its weights: here only in the one process the user started (the workers' parent, or
    # the single process); the ranks of a launcher's job compare in the Trainer, with rank 0's hash for all.
    if resume_from is not None and (local or world == 1):
        check_base(cfg, resume_from)
    if resume_from is not None and _finished(cfg, resume_from):
        return 0
    if hasattr(stage, "materialize"):  # what the stage builds from its inputs (a student cut from the teacher)
        stage.materialize(cfg)
    prepare_data(cfg.data, cfg.seed)  # bad data is one line here; workers after this hit the cache
    if local:
        return _start_workers(args, cfg)
    # Imported here: a process that only checks and starts workers (--nproc-per-node) never loads the loop
    # (DeepSpeed, torch.compile, the models' code), seconds of start-up per launch.
    from distrib.train.rank import run_rank
    return run_rank(cfg, stage, env, resume_from)


def prepare(args: argparse.Namespace, cfg: Config) -> int:
    """Build the data cache of ``cfg`` (or find it built) and print its path, blocks and tokens.

    The cache is the one training looks up: the tokenizer is resolved as the stages resolve it
    (``init_from``'s or the teacher's unless ``data.tokenizer`` is set), and the key depends on
    neither the ranks nor ``data.num_proc`` (the processes that tokenize here), so a job's ranks
    then load it instead of building it.
    """
    cfg = with_base(cfg, resolve_base(cfg))
    if cfg.teacher:
        cfg = stage_class("distill").prepare(cfg)
    prepared = prepare_data(cfg.data, cfg.seed)
    meta = json.loads((prepared.cache_path / "meta.json").read_text())
    print(prepared.cache_path)
    for split in ("train", "validation"):
        print(f"{split}: {meta['blocks'][split]} blocks of {cfg.data.seq_len} tokens "
              f"({meta['tokens'][split]} tokens of {meta['documents'][split]} documents)")
    return 0


def _world(args: argparse.Namespace, env: LaunchEnv, local: bool) -> int:
    """The job's world size; a ``--nproc-per-node`` that contradicts the launcher is refused."""
    if args.nproc_per_node is not None and not local:
        raise ConfigError(
            f"--nproc-per-node is for starting workers by hand, but this process was started by {env.launcher} "
            f"with {env.world_size} ranks; drop --nproc-per-node (and --nnodes) and size the job with {env.launcher}")
    if local and (args.nproc_per_node < 1 or args.nnodes < 1):
        raise ConfigError("--nproc-per-node and --nnodes must be at least 1")
    return args.nproc_per_node * args.nnodes if local else env.world_size


def _resolve(cfg: Config, command: str):
    """``cfg`` with ``init_from``'s model, config and tokenizer, and what the stage needs besides (a teacher)."""
    cfg = with_base(cfg, resolve_base(cfg))
    stage = stage_class(command)
    if hasattr(stage, "prepare"):
        cfg = stage.prepare(cfg)
    stage.check(cfg)
    return cfg, stage


def _start_workers(args: argparse.Namespace, cfg: Config) -> int:
    """Start the workers with torch's elastic agent, holding the run's lock while they run (node 0's, when nodes
    share the file system)."""
    lock = RunLock(cfg.output_dir).acquire() if args.node_rank == 0 else None
    try:
        worker_argv = [args.command, args.config, *args.overrides]
        return run_local(worker_argv, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                         node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                         max_restarts=args.max_restarts)
    finally:
        if lock is not None:
            lock.release()


def _finished(cfg: Config, checkpoint: Path) -> bool:
    """A run already at ``train.max_steps``: say so (exporting first if its export is missing), do nothing else."""
    step = read_state(checkpoint).step
    if step < cfg.train.max_steps:
        return False
    hf = Path(cfg.output_dir) / "hf"
    if cfg.export.at_end and not (hf / "config.json").is_file():
        check_base(cfg, checkpoint)  # the export merges onto the base: refuse a changed one
        from distrib.checkpoint.export import export_checkpoint  # the model code, only when a run must export

        export_checkpoint(checkpoint, hf, adapter_dir=Path(cfg.output_dir) / "adapter")
    if launcher_rank() == 0:
        where = f"; its export is {hf}" if (hf / "config.json").is_file() else ""
        print(f"distrib: {cfg.output_dir} already finished at step {step}{where}; "
              "raise train.max_steps to train it further", file=sys.stderr)
    return True
