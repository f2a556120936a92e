"""A base model's whole life in one command: ``distrib run [PIPELINE.yaml] [key=value ...]``.

A pipeline file names one config per stage, with overrides, and one ``output_dir`` for all of them::

    output_dir: runs/pipeline
    nproc_per_node: 2
    pretrain:
      config: ../pretrain/tiny.yaml        # relative to this file
    finetune:
      config: ../finetune/tiny-lora.yaml
      overrides: {train.max_steps: 100}
    distill:
      config: ../distill/tiny.yaml

The stages run in the order pretrain -> finetune -> distill (any of them may be left out), each in
``<output_dir>/<stage>/``, each stage's output feeding the next: the fine-tune's ``init_from`` is the
pretraining run, the distillation's ``teacher`` the fine-tuned run (or the pretraining run without a
fine-tune), unless the stage's config or overrides say otherwise.

Each stage is the stage's own command (``distrib pretrain ... --nproc-per-node N``) in a child
process, so locks, resume, data preparation and export are exactly those of a stage run by hand. A
finished stage is skipped; an interrupted one resumes; the same command run again carries on where it
stopped. At the end :func:`distrib.commands.report.write_report` writes ``summary.json``, ``summary.md`` and
the plots into ``output_dir``.

On the command line: ``output_dir=DIR`` moves the whole pipeline, ``nproc_per_node=N`` (or
``--nproc-per-node N``) sizes every stage, ``STAGE.key=value`` overrides one stage's key
(``finetune.train.max_steps=50``), and any other ``key=value`` applies to every stage
(``data.cache_dir=/scratch/cache``).

Everything that can be checked before a stage runs is checked first, for every stage: an unknown
stage, a missing stage config, a stage config that fails validation (named ``STAGE: ...``), a world
size that does not fit. One line, exit 2, nothing run or written.
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distrib.checkpoint import latest_checkpoint, read_state
from distrib.commands.evaluate import evaluate_model
from distrib.commands.report import format_markdown, write_report
from distrib.config import ConfigError, load_config, parse_override
from distrib.config.yaml_io import _parse_yaml
from distrib.launch.env import detect
from distrib.lock import RunLock
from distrib.launch.local import LAUNCHER_PID_ENV

#: Where the embedded default lives (the repository's configs/, beside the package).
DEFAULT_PIPELINE = Path(__file__).resolve().parents[2] / "configs" / "pipeline" / "default.yaml"
ORDER = ("pretrain", "finetune", "distill")
_PIPELINE_KEYS = ("output_dir", "nproc_per_node", "downstream")
_STAGE_KEYS = ("config", "overrides")


@dataclass
class StagePlan:
    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    output_dir: Path = Path()


@dataclass
class Pipeline:
    output_dir: Path
    nproc_per_node: int
    stages: list[StagePlan]
    #: lm-eval on every stage's model at the end ({"tasks": ..., "limit": ...}); None: not run
    downstream: dict | None = field(default_factory=dict)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_override(key: str, value: Any) -> str:
    """``key=value`` with the value in YAML flow form, so it reads back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return f"{key}={text}"


def load_pipeline(path: str | Path | None, overrides: list[str] = (), nproc_per_node: int | None = None) -> Pipeline:
    """Read and check a pipeline file (the embedded default when ``path`` is None) with command-line overrides.

    Raises:
        ConfigError: one line naming the stage and key.
    """
    path = Path(path) if path is not None else DEFAULT_PIPELINE
    raw = _read_pipeline_file(path)
    settings, per_stage = _split_overrides(raw, overrides)
    if nproc_per_node is not None:
        settings["nproc_per_node"] = nproc_per_node
    out, nproc, downstream = _check_settings(**settings)
    stages = [_stage_plan(name, raw[name], path, out / name, per_stage[name]) for name in ORDER if name in raw]
    _wire(stages, out)
    # Validate every stage now, before anything runs.
    for stage in stages:
        try:
            cfg = load_config(stage.config, stage.overrides)
            cfg.check_world(nproc)
        except ConfigError as e:
            raise ConfigError(f"{stage.name}: {e}") from None
    return Pipeline(out, nproc, stages, downstream)


def _read_pipeline_file(path: Path) -> dict:
    """The pipeline file's mapping, refused in one line when it is missing, unreadable or names no stage."""
    if not path.is_file():
        raise ConfigError(f"pipeline file {str(path)!r} does not exist; pass a file such as configs/pipeline/default.yaml")
    try:
        raw = _parse_yaml(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"pipeline file {str(path)!r} cannot be read ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"pipeline file {str(path)!r} holds no stages; name at least one of {', '.join(ORDER)} "
                          "with its config, e.g. 'pretrain: {config: ../pretrain/tiny.yaml}'")
    for key in raw:
        if key not in ORDER and key not in _PIPELINE_KEYS:
            raise ConfigError(f"{key!r} in {path} is not a stage{_suggest(str(key), (*ORDER, *_PIPELINE_KEYS))}; "
                              f"stages are {', '.join(ORDER)} (and the keys {', '.join(_PIPELINE_KEYS)})")
    return raw


def _split_overrides(raw: dict, overrides: list[str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The pipeline keys' values (the file's, overridden) and each stage's command-line overrides.

    An override sets a pipeline key (``output_dir=``, ``nproc_per_node=``, ``downstream[.KEY]=``), one
    stage's key (``STAGE.key=value``), or a key of every stage (any other ``key=value``).
    """
    per_stage: dict[str, list[str]] = {name: [] for name in ORDER}
    settings = {"output_dir": raw.get("output_dir", "runs/pipeline"), "nproc_per_node": raw.get("nproc_per_node", 1),
                "downstream": raw.get("downstream", {})}
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] == "downstream":
            if len(keys) == 1:
                settings["downstream"] = value
            else:
                downstream = settings["downstream"]
                downstream = dict(downstream) if isinstance(downstream, dict) else {}
                downstream[".".join(keys[1:])] = value
                settings["downstream"] = downstream
        elif keys[0] in ("output_dir", "nproc_per_node") and len(keys) == 1:
            settings[keys[0]] = value
        elif keys[0] in ORDER and len(keys) > 1:
            if keys[0] not in raw:
                raise ConfigError(f"{item!r} overrides the {keys[0]} stage, which this pipeline does not run; "
                                  f"its stages are {', '.join(k for k in ORDER if k in raw)}")
            per_stage[keys[0]].append(_as_override(".".join(keys[1:]), value))
        elif keys[0] in ORDER:
            raise ConfigError(f"{item!r} names a stage but no key; write {keys[0]}.KEY=VALUE, e.g. "
                              f"{keys[0]}.train.max_steps=50")
        else:
            for name in ORDER:
                per_stage[name].append(item)
    return settings, per_stage


def _check_settings(output_dir: Any, nproc_per_node: Any, downstream: Any) -> tuple[Path, int, dict | None]:
    """The pipeline keys checked: (output directory, processes per stage, downstream settings or None)."""
    nproc = nproc_per_node
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"nproc_per_node={nproc!r} must be a whole number >= 1 (processes per stage on this machine)")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"output_dir={output_dir!r} must be a directory path")
    if downstream is True or downstream is None:
        downstream = {}
    if downstream is False:
        downstream = None
    if downstream is not None and (not isinstance(downstream, dict) or set(downstream) - {"tasks", "limit"}):
        raise ConfigError(f"downstream={downstream!r} must be false (no evaluation) or a mapping with tasks (lm-eval "
                          "task names) and limit (items per task), e.g. downstream.limit=100")
    return Path(output_dir), nproc, downstream


def _stage_plan(name: str, spec: Any, path: Path, output_dir: Path, overrides: list[str]) -> StagePlan:
    """One stage of the pipeline file (``spec``, its config relative to ``path``), with the command line's overrides."""
    if not isinstance(spec, dict) or "config" not in spec:
        raise ConfigError(f"{name}: no config; give the stage's YAML, e.g. '{name}: {{config: ../{name}/tiny.yaml}}'")
    for key in spec:
        if key not in _STAGE_KEYS:
            raise ConfigError(f"{name}.{key} is not a stage setting{_suggest(str(key), _STAGE_KEYS)}; a stage has "
                              "config (its YAML) and overrides (a mapping of dotted keys to values)")
    config = Path(str(spec["config"])).expanduser()
    if not config.is_absolute():
        config = path.parent / config
    if not config.is_file():
        raise ConfigError(f"{name}.config={str(spec['config'])!r} does not exist (looked for {config}; relative "
                          "paths are relative to the pipeline file)")
    extra = spec.get("overrides") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{name}.overrides must be a mapping of dotted keys to values, e.g. "
                          "{train.max_steps: 50}")
    return StagePlan(name, config, [_as_override(k, v) for k, v in extra.items()] + overrides, output_dir)


def _wire(stages: list[StagePlan], out: Path) -> None:
    """Each stage's output feeds the next, unless the stage says otherwise (its own ``init_from`` or ``teacher``)."""
    names = [s.name for s in stages]
    for stage in stages:
        wiring = [f"output_dir={stage.output_dir}"]
        set_keys = {o.split("=", 1)[0] for o in stage.overrides}
        if stage.name == "finetune" and "pretrain" in names and "init_from" not in set_keys:
            wiring.append(f"init_from={out / 'pretrain'}")
        if stage.name == "distill" and "teacher" not in set_keys:
            feeder = "finetune" if "finetune" in names else "pretrain" if "pretrain" in names else None
            if feeder:
                wiring.append(f"teacher={out / feeder}")
        stage.overrides = stage.overrides + wiring


def _finished(stage: StagePlan) -> int | None:
    """The step a finished, exported stage ended at; None when it still has work to do."""
    try:
        cfg = load_config(stage.config, stage.overrides)
        last = latest_checkpoint(stage.output_dir / "checkpoints")
    except ConfigError:
        return None
    if last is None or not (stage.output_dir / "hf" / "config.json").is_file():
        return None
    step = read_state(last).step
    return step if step >= cfg.train.max_steps else None


def run_pipeline(p: Pipeline, say=print) -> int:
    """Run the stages in order (skipping finished ones), then write the report; returns the exit code."""
    p.output_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(p.output_dir).acquire()
    try:
        for stage in p.stages:
            step = _finished(stage)
            if step is not None:
                say(f"distrib run: {stage.name} finished at step {step} ({stage.output_dir}); skipped")
                continue
            cmd = [sys.executable, "-m", "distrib", stage.name, str(stage.config), *stage.overrides,
                   "--nproc-per-node", str(p.nproc_per_node)]
            say(f"distrib run: {stage.name}: {' '.join(cmd[2:])}")
            # the stage's command ends when this process does, killed or not (launch.local.die_with_launcher)
            code = subprocess.run(cmd, env={**os.environ, LAUNCHER_PID_ENV: str(os.getpid())}).returncode
            if code != 0:
                say(f"distrib run: {stage.name} stopped with exit code {code}; fix the cause and run the same "
                    "command again: finished stages are skipped, this one resumes")
                return code
        if p.downstream is not None:
            for stage in p.stages:  # each stage's model on the same tasks; eval.json beside its run
                say(f"distrib run: {stage.name}: downstream evaluation (lm-eval)")
                evaluate_model(stage.output_dir, tasks=p.downstream.get("tasks"), limit=p.downstream.get("limit"))
        summary = write_report(p.output_dir)
        say(format_markdown(summary))
        say(f"distrib run: summary in {p.output_dir / 'summary.md'} and {p.output_dir / 'summary.json'}, plots "
            f"{p.output_dir / 'loss.png'} and {p.output_dir / 'throughput.png'}")
        return 0
    finally:
        lock.release()


def main(path: str | None, overrides: list[str], nproc_per_node: int | None) -> int:
    env = detect()
    if env.launcher != "none" and env.world_size > 1:
        raise ConfigError(f"distrib run starts each stage's processes itself, but this process was started by "
                          f"{env.launcher} with {env.world_size} ranks; run it as one process, or under Slurm submit "
                          "one job per stage (slurm/README.md)")
    # A first argument with '=' is an override, not a pipeline file.
    if path is not None and "=" in path and not Path(path).exists():
        overrides, path = [path, *overrides], None
    p = load_pipeline(path, overrides, nproc_per_node)
    if p.output_dir.exists() and not p.output_dir.is_dir():
        raise ConfigError(f"output_dir={str(p.output_dir)!r} is a file, not a directory; set output_dir to a new or "
                          "existing pipeline directory")
    RunLock(p.output_dir).check_free()
    return run_pipeline(p)


def command(args, cfg=None) -> int:
    """``distrib run [PIPELINE.yaml] [overrides] [--nproc-per-node N]``."""
    first = args.args[0] if args.args and "=" not in args.args[0] else None
    return main(first, args.args[1:] if first else args.args, args.nproc_per_node)
