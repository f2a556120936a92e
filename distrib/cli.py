"""``distrib`` command line: one entry point for every stage, export and planning.

    distrib pretrain CONFIG [key.path=value ...] [--nproc-per-node N [--nnodes M --node-rank R
                     --rdzv-endpoint HOST:PORT] [--max-restarts K]]
    distrib export CHECKPOINT OUT_DIR
    distrib plan CONFIG [key.path=value ...] --world-size N [--gpus-per-node G] [--gpu-memory-gib M]

A training command runs as one worker of whatever launcher started it (torchrun, srun, mpirun),
or as a single process. Given ``--nproc-per-node`` outside any launcher it starts the workers itself
with torch's elastic agent. The config is validated first, in the process the user started: a bad
config exits with code 2 and one line, before any process group or file exists.
"""

from __future__ import annotations

import argparse
import sys

from distrib.config import ConfigError, load_config

TRAIN_STAGES = ("pretrain",)
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in TRAIN_STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("config", help="YAML config, e.g. configs/pretrain/tiny.yaml")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
        p.add_argument("--nproc-per-node", type=int, default=None, help="start N local workers (outside a launcher)")
        p.add_argument("--nnodes", type=int, default=1, help="number of nodes (with --nproc-per-node)")
        p.add_argument("--node-rank", type=int, default=0, help="this node's rank (with --nnodes)")
        p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (node 0)")
        p.add_argument("--rdzv-id", default="distrib", help="rendezvous id shared by the nodes of one job")
        p.add_argument("--max-restarts", type=int, default=0, help="restart failed workers up to K times")
    p = sub.add_parser("export", help="write a Hugging Face directory from a checkpoint")
    p.add_argument("checkpoint", help="<output_dir>/checkpoints/step_N")
    p.add_argument("out_dir")
    p = sub.add_parser("plan", help="check a config for N ranks and estimate per-rank memory")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    return parser


def _fail(msg: str) -> int:
    print(f"distrib: error: {msg}", file=sys.stderr)
    return EXIT_CONFIG


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
        if args.command == "export":
            from distrib.export import export_checkpoint

            print(export_checkpoint(args.checkpoint, args.out_dir))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "plan":
            from distrib.plan import format_plan, plan

            print(format_plan(plan(cfg, args.world_size, args.gpus_per_node, args.gpu_memory_gib)))
            return 0
        cfg.check_paths()
        return _train(args, cfg)
    except ConfigError as e:
        return _fail(str(e))


def _train(args, cfg) -> int:
    from distrib.checkpoint import check_resumable
    from launch.env import LaunchEnvError, detect

    try:
        env = detect()
    except LaunchEnvError as e:
        return _fail(str(e))
    if args.nproc_per_node is not None and env.launcher == "none":
        if args.nproc_per_node < 1 or args.nnodes < 1:
            return _fail("--nproc-per-node and --nnodes must be at least 1")
        cfg.check_world(args.nproc_per_node * args.nnodes)
        check_resumable(cfg)
        from launch.local import run_local

        worker_argv = [args.command, args.config, *args.overrides]
        return run_local(worker_argv, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                         node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                         max_restarts=args.max_restarts)
    from distrib.utils import StopRequest

    stop = StopRequest()
    cfg.check_world(env.world_size)
    resume_from = check_resumable(cfg)
    env.export()

    from distrib.stages import STAGES
    from distrib.topology import Topology
    from distrib.trainer import Trainer
    from distrib.utils import setup_logging

    setup_logging()
    topo = Topology.init(tp=cfg.parallel.tp)
    try:
        Trainer(cfg, topo, STAGES[args.command](), resume_from=resume_from, stop=stop).fit()
    finally:
        topo.shutdown()
    return 0
