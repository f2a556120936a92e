"""``distrib`` command line: one entry point for every stage, export and planning.

    distrib pretrain CONFIG [key.path=value ...] [--nproc-per-node N [--nnodes M --node-rank R
                     --rdzv-endpoint HOST:PORT] [--max-restarts K]]
    distrib run [PIPELINE.yaml] [output_dir=DIR] [STAGE.key=value ...] [--nproc-per-node N]
    distrib export CHECKPOINT|RUN_DIR OUT_DIR
    distrib plan CONFIG [key.path=value ...] --world-size N [--gpus-per-node G] [--gpu-memory-gib M]
    distrib prepare-data CONFIG [key.path=value ...]
    distrib eval MODEL_DIR [--tasks T1,T2] [--limit N] [--batch-size B]
    distrib report RUN_DIR [--no-speed]
    distrib generate MODEL_DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]

A training command runs as one worker of whatever launcher started it (torchrun, srun, mpirun),
or as a single process. Given ``--nproc-per-node`` outside any launcher it starts the workers itself
with torch's elastic agent. The config is validated first, in the process the user started: a bad
config exits with code 2 and one line, before any process group or file exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distrib.config import ConfigError, load_config
from distrib.errors import TrainingError, full_disk
from distrib.stages import STAGES

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("config", help="YAML config, e.g. configs/pretrain/tiny.yaml")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
        p.add_argument("--nproc-per-node", type=int, default=None, help="start N local workers (outside a launcher)")
        p.add_argument("--nnodes", type=int, default=1, help="number of nodes (with --nproc-per-node)")
        p.add_argument("--node-rank", type=int, default=0, help="this node's rank (with --nnodes)")
        p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (node 0)")
        p.add_argument("--rdzv-id", default="distrib", help="rendezvous id shared by the nodes of one job")
        p.add_argument("--max-restarts", type=int, default=0, help="restart failed workers up to K times")
    p = sub.add_parser("run", help="pretrain -> fine-tune -> distil in one command, then a report")
    p.add_argument("args", nargs="*", metavar="[PIPELINE.yaml] key=value",
                   help="a pipeline file (default: the embedded configs/pipeline/default.yaml), then overrides: "
                        "output_dir=DIR, STAGE.key=value, or key=value for every stage")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per stage (default: the pipeline's)")
    p = sub.add_parser("export", help="write a Hugging Face directory from a checkpoint")
    p.add_argument("checkpoint", help="<output_dir>/checkpoints/step_N, <output_dir>/checkpoints/latest or <output_dir>")
    p.add_argument("out_dir")
    p.add_argument("--max-shard-size", default=None,
                   help="split the weights into files of at most this size, e.g. 5GB (default: the run's export.max_shard_size)")
    p = sub.add_parser("eval", help="evaluate an exported model with lm-eval (offline tasks shipped)")
    p.add_argument("model_dir", help="a run's hf/ directory, the run directory, or a fine-tune's adapter/")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval task names (default: the shipped ones)")
    p.add_argument("--limit", type=float, default=None, help="at most N documents per task")
    p.add_argument("--batch-size", type=int, default=16)
    p = sub.add_parser("plan", help="check a config for N ranks and estimate per-rank memory")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p = sub.add_parser("prepare-data", help="build a config's data cache now (once, on a login or CPU node; "
                       "under srun or mpirun its tasks share the tokenizing)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p = sub.add_parser("report", help="summarize a run or pipeline directory: summary.json, summary.md, plots")
    p.add_argument("run_dir", help="a run's output_dir, or a directory holding pretrain/, finetune/, distill/")
    p.add_argument("--no-speed", action="store_true", help="skip timing a distilled student against its teacher")
    p = sub.add_parser("generate", help="continue a prompt with an exported model")
    p.add_argument("model_dir", help="a run directory, its hf/ export or its adapter/ directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return parser


EXIT_FAILED = 1


def _fail(msg: str, code: int = EXIT_CONFIG) -> int:
    """Say ``msg`` in one line (once per job: every rank finds the same problem) and return ``code``."""
    if _launcher_rank() == 0:
        print(f"distrib: error: {msg}", file=sys.stderr)
    return code


def _launcher_rank() -> int:
    """This process's global rank as its launcher set it (0 when started by hand)."""
    import os

    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    commands = parser._subparsers._group_actions[0].choices
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # prints usage (or help) and exits
    # Options may stand anywhere on the line, between config overrides too.
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    try:
        if args.command == "run":
            from distrib.pipeline import main as run_pipeline

            first = args.args[0] if args.args and "=" not in args.args[0] else None
            return run_pipeline(first, args.args[1:] if first else args.args, args.nproc_per_node)
        if args.command == "export":
            from distrib.checkpoint import resolve_checkpoint
            from distrib.export import export_checkpoint

            if args.max_shard_size is not None:
                from distrib.config import file_size

                file_size(args.max_shard_size, "--max-shard-size")
            print(export_checkpoint(resolve_checkpoint(args.checkpoint), args.out_dir, max_shard_size=args.max_shard_size))
            return 0
        if args.command == "report":
            from distrib.report import format_markdown, write_report

            print(format_markdown(write_report(args.run_dir, measure_speed=not args.no_speed)), end="")
            return 0
        if args.command == "generate":
            from distrib.generate import generate

            print(generate(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed))
            return 0
        if args.command == "eval":
            from distrib.downstream import main as evaluate

            return evaluate(args.model_dir, args.tasks, args.limit, args.batch_size)
        cfg = load_config(args.config, args.overrides)
        if args.command == "plan":
            from distrib.plan import format_plan, plan

            print(format_plan(plan(cfg, args.world_size, args.gpus_per_node, args.gpu_memory_gib)))
            return 0
        if args.command == "prepare-data":
            return _prepare_data(cfg)
        cfg.check_paths()
        return _train(args, cfg)
    except ConfigError as e:
        return _fail(str(e))
    except TrainingError as e:  # outside a training run: an export that filled its disk, say
        return _fail(str(e), EXIT_FAILED)


def _prepare_data(cfg) -> int:
    """Build the data cache of ``cfg`` (or find it built) and print its path, blocks and tokens.

    The cache is the one training looks up: the tokenizer is resolved as the stages resolve it
    (``init_from``'s or the teacher's unless ``data.tokenizer`` is set), and the key depends on
    neither the ranks nor ``data.num_proc`` (the processes that tokenize here), so a job's ranks
    then load it instead of building it.
    """
    import json

    from distrib.base import resolve_base, with_base
    from distrib.data import prepare_data
    from distrib.stages import stage_class

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


def _train(args, cfg) -> int:
    """Run a training stage: checks, data, lock, then workers (started here or by a launcher).

    Everything that can be found wrong is found here, in the process the user started, before a
    worker or process group exists: the config, the world, the resume point and the data (prepared
    into the shared cache now, so a bad file is one line, not a traceback per rank).
    """
    from distrib.base import check_base, resolve_base, with_base
    from distrib.checkpoint import check_resumable
    from distrib.data import prepare_data
    from distrib.stages import stage_class
    from distrib.lock import RunLock, held_by_launcher
    from launch.env import LaunchEnvError, detect

    try:
        env = detect()
    except LaunchEnvError as e:
        return _fail(str(e))
    local = args.nproc_per_node is not None and env.launcher == "none"
    if args.nproc_per_node is not None and not local:
        return _fail(f"--nproc-per-node is for starting workers by hand, but this process was started by {env.launcher} "
                     f"with {env.world_size} ranks; drop --nproc-per-node (and --nnodes) and size the job with {env.launcher}")
    if local and (args.nproc_per_node < 1 or args.nnodes < 1):
        return _fail("--nproc-per-node and --nnodes must be at least 1")
    world = args.nproc_per_node * args.nnodes if local else env.world_size
    if local:  # this process checks and starts the workers; what DeepSpeed has to say, they say
        from distrib.utils import quiet_deepspeed

        quiet_deepspeed()
    if _launcher_rank() == 0 and args.node_rank == 0 and not held_by_launcher(cfg.output_dir):
        RunLock(cfg.output_dir).check_free()  # a busy directory is the first thing to say
    cfg = with_base(cfg, resolve_base(cfg))  # init_from: the model, its config and its tokenizer
    stage = stage_class(args.command)
    if hasattr(stage, "prepare"):  # models the stage needs besides init_from's (a teacher)
        cfg = stage.prepare(cfg)
    stage.check(cfg)
    cfg.check_world(world)
    resume_from = check_resumable(cfg)
    if resume_from is not None:
        check_base(cfg, resume_from)
    if resume_from is not None and _finished(cfg, resume_from):
        return 0
    if hasattr(stage, "materialize"):  # what the stage builds from its inputs (a student cut from the teacher)
        stage.materialize(cfg)
    prepare_data(cfg.data, cfg.seed)  # bad data is one line here; workers after this hit the cache

    if local:
        from launch.local import run_local

        # held by this process while its workers run (node 0's, when nodes share the file system)
        lock = RunLock(cfg.output_dir).acquire() if args.node_rank == 0 else None
        try:
            worker_argv = [args.command, args.config, *args.overrides]
            return run_local(worker_argv, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                             node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                             max_restarts=args.max_restarts)
        finally:
            if lock is not None:
                lock.release()

    from distrib.utils import StopRequest

    stop = StopRequest()
    from distrib.utils import die_with_launcher

    die_with_launcher()
    env.export()
    from distrib.utils import quiet_other_ranks

    quiet_other_ranks()  # before DeepSpeed is imported: its import already warns

    from distrib.topology import Topology
    from distrib.trainer import Trainer
    from distrib.utils import setup_logging

    setup_logging()
    topo = Topology.init(tp=cfg.parallel.tp, timeout_minutes=cfg.parallel.timeout_minutes)
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
            return _fail(refused or "another run holds output_dir")
        Trainer(cfg, topo, stage(), resume_from=resume_from, stop=stop).fit()
    except TrainingError as e:
        if topo.is_main or e.from_this_rank:
            _say_from_worker(str(e))
        return EXIT_FAILED
    except Exception as e:
        # A full disk where the ranks do not learn of it together: this rank says so, once, instead of a traceback.
        disk = full_disk(e, cfg.output_dir)
        if disk is None:
            raise
        _say_from_worker(f"writing to {cfg.output_dir} failed on rank {topo.rank}: {disk}; free space on it and run "
                         "the same command to resume")
        return EXIT_FAILED
    finally:
        if lock is not None:
            lock.release()
        topo.shutdown()
    return 0


def _say_from_worker(msg: str) -> None:
    """A worker's one-line error: for the launcher to print when the job has ended, when it is ours, else now."""
    from launch.local import hand_to_launcher

    if not hand_to_launcher(msg):
        print(f"distrib: error: {msg}", file=sys.stderr)


def _finished(cfg, checkpoint) -> bool:
    """A run already at ``train.max_steps``: say so (exporting first if its export is missing), do nothing else."""
    from distrib.checkpoint import read_state

    step = read_state(checkpoint).step
    if step < cfg.train.max_steps:
        return False
    hf = Path(cfg.output_dir) / "hf"
    if cfg.export.at_end and not (hf / "config.json").is_file():
        from distrib.export import export_checkpoint

        export_checkpoint(checkpoint, hf, adapter_dir=Path(cfg.output_dir) / "adapter")
    if _launcher_rank() == 0:
        where = f"; its export is {hf}" if (hf / "config.json").is_file() else ""
        print(f"distrib: {cfg.output_dir} already finished at step {step}{where}; "
              "raise train.max_steps to train it further", file=sys.stderr)
    return True
