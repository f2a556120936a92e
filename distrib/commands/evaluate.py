"""``distrib eval``: downstream evaluation of an exported model with EleutherAI's lm-eval harness.

    distrib eval MODEL_DIR [--tasks T1,T2] [--limit N] [--batch-size B]

``MODEL_DIR`` is a Hugging Face directory (a run's ``hf/``), a distrib run directory (its ``hf/`` is
evaluated) or a peft adapter directory (a fine-tune's ``adapter/``), evaluated on the base named by
its ``adapter_config.json`` through lm-eval's ``peft=`` model argument. The evaluation is
``lm_eval.simple_evaluate`` with the ``hf`` model type; its table is printed and its results are
written to ``MODEL_DIR/eval.json``.

The default tasks are the ones shipped with distrib (:mod:`distrib.commands.eval_tasks`: held-out perplexity on
the built-in corpora, a next-line multiple-choice task and the instruction data's held-out responses),
built from this Python's standard library on first use. Any other lm-eval task name works where its
data is already on the machine: the command forces ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE``, so
nothing is downloaded.

One process: lm-eval's ``hf`` model can split the requests across ranks started by ``accelerate
launch``, but distrib does not start or join such a job; under a launcher with more than one rank the
command refuses. Small models evaluate in seconds to minutes on CPU; a large one runs on the one GPU
(``cuda`` when there is one).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from distrib.commands.eval_tasks import TAG, TASKS, task_dir
from distrib.config import ConfigError
from distrib.launch.env import LaunchEnvError, world_size_hint

#: The file the results go to, in MODEL_DIR.
RESULT_FILE = "eval.json"

_OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class ModelSpec:
    """What lm-eval's ``hf`` model loads: the weights' directory, an optional peft adapter, the tokenizer."""

    pretrained: Path
    peft: Path | None
    tokenizer: Path

    def model_args(self) -> dict:
        import torch

        args = {"pretrained": str(self.pretrained), "tokenizer": str(self.tokenizer),
                # exported weights may be bf16; on CPU score in fp32 (bf16 matmuls there are slow and coarse)
                "dtype": "auto" if torch.cuda.is_available() else "float32"}
        if self.peft is not None:
            args["peft"] = str(self.peft)
        return args


def resolve_model(model_dir: str | Path) -> ModelSpec:
    """The model ``distrib eval MODEL_DIR`` evaluates; a one-line :class:`ConfigError` if there is none."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is not a directory; pass a run's hf/ directory, its run directory or its adapter/")
    if (path / "config.json").is_file():
        return ModelSpec(path, None, path)
    if (path / "adapter_config.json").is_file():
        return ModelSpec(*_adapter_base(path))
    if (path / "hf" / "config.json").is_file():
        return ModelSpec(path / "hf", None, path / "hf")
    raise ConfigError(
        f"{str(path)!r} is not a model: it has no config.json (a Hugging Face model), adapter_config.json "
        "(a peft adapter) or hf/config.json (a distrib run); pass a run's hf/ directory, its run directory or its adapter/"
    )


def _adapter_base(adapter: Path) -> tuple[Path, Path, Path]:
    """(base, adapter, tokenizer directory) of a peft adapter directory."""
    where = adapter / "adapter_config.json"
    try:
        base = json.loads(where.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot be read as JSON ({e}); re-export the fine-tuned run") from None
    if not base:
        raise ConfigError(f"{where} names no base_model_name_or_path; set it to the base model's directory")
    # A relative base is as the fine-tuning run wrote it: from the directory it ran in, or from the adapter.
    found = next((c for c in (Path(base), adapter / base) if (c / "config.json").is_file()), None)
    if found is None:
        raise ConfigError(
            f"{str(adapter)!r} is a peft adapter whose base {base!r} (base_model_name_or_path in adapter_config.json) "
            "is not on disk; run from the directory the fine-tuning ran in, or point base_model_name_or_path at the base"
        )
    has_tokenizer = any((adapter / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return found, adapter, adapter if has_tokenizer else found


def _force_offline() -> None:
    """Nothing may reach the network: set the offline switches, also in modules that already read them."""
    for name in _OFFLINE:
        os.environ[name] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub

        hub.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = True
        dc.HF_DATASETS_OFFLINE = True


def _check_one_process() -> None:
    """Refuse to be one of several ranks (torchrun, srun, mpirun): each would evaluate the whole model alone.

    An sbatch batch shell is one process, whatever its allocation's task count.
    """
    try:
        size = world_size_hint()
    except LaunchEnvError as e:
        raise ConfigError(str(e)) from None
    if size is not None and size > 1:
        raise ConfigError(f"distrib eval runs on one process, but this is one of {size} ranks started by a launcher; "
                          "run it outside the launcher: distrib eval MODEL_DIR")


def task_manager(tasks: str | list[str] | None, cache_root: str | Path | None = None):
    """``(task names, lm_eval TaskManager)`` with the shipped tasks registered; unknown names refused in one line.

    lm-eval's own task index (thousands of YAMLs, seconds to read) is only loaded when a requested
    name is not a shipped one.
    """
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = list(tasks) if tasks else list(TASKS)
    if not names or any(not n.strip() for n in names):
        raise ConfigError(f"--tasks: empty task name in {','.join(names)!r}; the shipped tasks are {', '.join(TASKS)}")
    from lm_eval.tasks import TaskManager

    shipped = set(TASKS) | {TAG}
    manager = TaskManager(include_path=str(task_dir(cache_root)), include_defaults=not set(names) <= shipped)
    known = manager.all_tasks
    for name in names:
        if name not in known and not fnmatch.filter(known, name):
            raise ConfigError(
                f"unknown task {name!r}; the shipped tasks are {', '.join(TASKS)} (all four: --tasks {TAG}), "
                "and any lm-eval task whose data is on this machine (lm-eval ls tasks)"
            )
    return names, manager


def evaluate_model(model_dir: str | Path, tasks: str | list[str] | None = None, limit: int | float | None = None,
                   batch_size: int = 16, write: bool = True, cache_root: str | Path | None = None) -> dict:
    """Evaluate the model of ``model_dir`` (see :func:`resolve_model`) with lm-eval, offline.

    Args:
        model_dir: a Hugging Face directory, a distrib run directory or a peft adapter directory.
        tasks: lm-eval task names (or patterns), a list or comma-separated; default: the shipped tasks.
        limit: at most this many documents per task (a fraction below 1 is a share), as lm-eval's ``limit``.
        batch_size: requests per forward pass.
        write: write the returned record to ``model_dir/eval.json``.
        cache_root: where the shipped tasks' data is generated (default ``$DISTRIB_CACHE`` or ``~/.cache/distrib``).

    Returns:
        the ``eval.json`` record: ``results`` (lm-eval's per-task metrics, e.g.
        ``results["distrib_code_nextline"]["acc_mutual_info,none"]``), ``n-samples``, ``higher_is_better``,
        ``versions``, ``n-shot`` as lm-eval returns them, and what was evaluated how.

    Raises:
        ConfigError: not a model, an adapter without its base, an unknown task, a task whose data
            is not on this machine, or several processes.
    """
    _check_one_process()
    spec = resolve_model(model_dir)
    _force_offline()
    names, manager = task_manager(tasks, cache_root)
    _check_loadable(names, manager)
    import lm_eval

    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # a line per left-truncated context
    import torch

    out = lm_eval.simple_evaluate(
        model="hf", model_args=spec.model_args(), tasks=names, task_manager=manager, limit=limit,
        batch_size=batch_size, device="cuda" if torch.cuda.is_available() else "cpu", log_samples=False,
    )
    record = {
        "model": str(spec.pretrained),
        "peft": None if spec.peft is None else str(spec.peft),
        "tasks": names,
        "limit": limit,
        "batch_size": batch_size,
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _version("lm_eval"),
        "task_data": str(manager.include_path),
        **{key: out[key] for key in ("results", "n-samples", "higher_is_better", "versions", "n-shot") if key in out},
    }
    record["table"] = _table(out)
    if write:
        target = Path(model_dir) / RESULT_FILE
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        tmp.replace(target)
    return record


def _check_loadable(names: list[str], manager) -> None:
    """Every task's documents load (offline): a missing data set is one line, not a traceback from lm-eval."""
    try:
        if hasattr(manager, "load"):  # lm-eval >= 0.4.10; get_task_dict before
            manager.load(names)
        else:
            from lm_eval.tasks import get_task_dict

            get_task_dict(names, manager)
    except Exception as e:  # datasets' offline errors vary by version and loader; all mean "not on disk"
        first = str(e).strip().split("\n")[0]
        raise ConfigError(f"--tasks {','.join(names)}: a task's data is not on this machine and nothing is "
                          f"downloaded ({type(e).__name__}: {first}); use the shipped tasks or pre-cache the data set") from None


def _table(out: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(out)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(model_dir: str, tasks: str | None, limit: float | None, batch_size: int) -> int:
    """``distrib eval``: evaluate, print lm-eval's table and where the results went."""
    names = tasks.split(",") if tasks is not None else None
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit {limit:g} must be positive (a count of documents, or a share below 1)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    record = evaluate_model(model_dir, names, int(limit) if limit is not None and limit >= 1 else limit, batch_size)
    print(record["table"])
    print(f"results: {Path(model_dir) / RESULT_FILE}")
    return 0


def command(args, cfg=None) -> int:
    """``distrib eval MODEL_DIR [--tasks T1,T2] [--limit N] [--batch-size B]``."""
    return main(args.model_dir, args.tasks, args.limit, args.batch_size)
