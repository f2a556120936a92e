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

Each command's code lives in its own module, named in :data:`HANDLERS` and imported when that command runs
(as the stages' registry does): reading a config and refusing a bad one imports neither torch nor DeepSpeed,
and a training process quiets DeepSpeed's import-time warnings before anything imports it.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from distrib.config import ConfigError, load_config
from distrib.errors import TrainingError
from distrib.launch.env import LaunchEnvError, detect, launcher_rank
from distrib.launch.local import die_with_launcher
from distrib.stages import STAGES
from distrib.utils import hide_deepspeed_deprecations, quiet_deepspeed, quiet_other_ranks

EXIT_CONFIG = 2


#: What ``distrib --help`` opens with: plain text, as a terminal shows it.
DESCRIPTION = ("Pretrain, fine-tune and distil causal language models with DeepSpeed ZeRO, then export, "
               "evaluate, plan and report on them.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrib", description=DESCRIPTION,
                                     epilog="'distrib COMMAND --help' lists a command's options.")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    def command(name: str, what: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")

    for stage in STAGES:
        p = command(stage, f"run the {stage} stage")
        p.add_argument("config", help="YAML config, e.g. configs/pretrain/tiny.yaml")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
        p.add_argument("--nproc-per-node", type=int, default=None, help="start N local workers (outside a launcher)")
        p.add_argument("--nnodes", type=int, default=1, help="number of nodes (with --nproc-per-node)")
        p.add_argument("--node-rank", type=int, default=0, help="this node's rank (with --nnodes)")
        p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (node 0)")
        p.add_argument("--rdzv-id", default="distrib", help="rendezvous id shared by the nodes of one job")
        p.add_argument("--max-restarts", type=int, default=0, help="restart failed workers up to K times")
    p = command("run", "pretrain -> fine-tune -> distil in one command, then a report")
    p.add_argument("args", nargs="*", metavar="[PIPELINE.yaml] key=value",
                   help="a pipeline file (default: the embedded configs/pipeline/default.yaml), then overrides: "
                        "output_dir=DIR, STAGE.key=value, or key=value for every stage")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per stage (default: the pipeline's)")
    p = command("export", "write a Hugging Face directory from a checkpoint")
    p.add_argument("checkpoint", help="<output_dir>/checkpoints/step_N, <output_dir>/checkpoints/latest or <output_dir>")
    p.add_argument("out_dir", help="the directory to write the model, its config and its tokenizer to")
    p.add_argument("--max-shard-size", default=None,
                   help="split the weights into files of at most this size, e.g. 5GB (default: the run's export.max_shard_size)")
    p = command("eval", "evaluate an exported model with lm-eval (offline tasks shipped)")
    p.add_argument("model_dir", help="a run's hf/ directory, the run directory, or a fine-tune's adapter/")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval task names (default: the shipped ones)")
    p.add_argument("--limit", type=float, default=None, help="at most N documents per task")
    p.add_argument("--batch-size", type=int, default=16, help="requests scored per forward pass (default: 16)")
    p = command("plan", "check a config for N ranks and estimate per-rank memory")
    p.add_argument("config", help="YAML config, e.g. configs/pretrain/llama-7b.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (processes, one per GPU) to plan for")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default: 80)")
    p = command("prepare-data", "build a config's data cache now (once, on a login or CPU node; "
                "under srun or mpirun its tasks share the tokenizing)")
    p.add_argument("config", help="YAML config, e.g. configs/pretrain/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p = command("report", "summarize a run or pipeline directory: summary.json, summary.md, plots")
    p.add_argument("run_dir", help="a run's output_dir, or a directory holding pretrain/, finetune/, distill/")
    p.add_argument("--no-speed", action="store_true", help="skip timing a distilled student against its teacher")
    p = command("generate", "continue a prompt with an exported model")
    p.add_argument("model_dir", help="a run directory, its hf/ export or its adapter/ directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample only from the likeliest tokens that together reach this probability (default: 1, all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling, so a command repeats (default: 0)")
    return parser


EXIT_FAILED = 1

#: Command -> "module:function"; the function takes the parsed arguments and the loaded config (None for
#: commands without one) and returns the exit code.
HANDLERS = {
    **{stage: "distrib.commands.train:train" for stage in STAGES},
    "prepare-data": "distrib.commands.train:prepare",
    "run": "distrib.commands.pipeline:command",
    "export": "distrib.commands.export:command",
    "eval": "distrib.commands.evaluate:command",
    "plan": "distrib.commands.plan:command",
    "report": "distrib.commands.report:command",
    "generate": "distrib.commands.generate:command",
}
#: Commands whose first argument is a config (with overrides), loaded and validated before anything else.
CONFIG_COMMANDS = {*STAGES, "plan", "prepare-data"}


def fail(msg: str, code: int = EXIT_CONFIG) -> int:
    """Say ``msg`` in one line (once per job: every rank finds the same problem) and return ``code``."""
    if launcher_rank() == 0:
        print(f"distrib: error: {msg}", file=sys.stderr)
    return code


def _unknown_command(word: str, commands) -> str:
    """One line for a command that is not one: the closest command, as a mistyped config key gets, and all of them."""
    close = difflib.get_close_matches(word, list(commands), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown command {word!r}{hint} (commands: {', '.join(commands)})"


def _parse(argv: list[str]) -> argparse.Namespace | int:
    """The parsed command line, or the exit code of one that is no command (argparse prints usage or help)."""
    parser = _parser()
    commands = parser._subparsers._group_actions[0].choices
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        return fail(_unknown_command(argv[0], commands))
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # prints usage (or help) and exits
    # Options may stand anywhere on the line, between config overrides too.
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def _quiet(args: argparse.Namespace) -> None:
    """Before DeepSpeed is imported (its import already warns): who in a training job says what.

    The process that checks the run and starts workers leaves DeepSpeed's warnings to them; a worker keeps
    library warnings to rank 0, and no rank repeats torch's deprecation of DeepSpeed's collectives every step.
    """
    if args.command not in STAGES:
        quiet_deepspeed()
        return
    env = detect()
    if args.nproc_per_node is not None and env.launcher == "none":
        quiet_deepspeed()
    else:
        quiet_other_ranks(env.rank)
        hide_deepspeed_deprecations()


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()  # first: a worker or a stage's command must not outlive what started it, even while starting
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    if isinstance(args, int):
        return args
    try:
        cfg = None
        if args.command in CONFIG_COMMANDS:
            cfg = load_config(args.config, args.overrides)
        if args.command in STAGES:
            cfg.check_paths()
        _quiet(args)
        module, function = HANDLERS[args.command].split(":")
        return getattr(importlib.import_module(module), function)(args, cfg)
    except (ConfigError, LaunchEnvError) as e:
        return fail(str(e))
    except TrainingError as e:  # outside a training run's workers: an export that filled its disk, say
        return fail(str(e), EXIT_FAILED)
