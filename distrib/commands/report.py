"""What a run or a pipeline of runs did, in numbers and plots: ``distrib report RUN_DIR``.

Reads what runs leave behind (``config.yaml``, ``metrics.jsonl``, ``layout.json``, ``checkpoints/``,
``hf/``, ``adapter/``) and writes into ``RUN_DIR``:

* ``summary.json``: one entry per stage (steps, tokens, final losses, perplexity, median throughput and
  MFU, wall time, parameters, checkpoint and exports; for distillation the student beside its teacher);
* ``summary.md``: the same as a table a person reads;
* ``loss.png`` (train and validation loss per stage) and ``throughput.png`` (tokens/s per stage).

``RUN_DIR`` is one stage's run directory, or a pipeline directory holding stage run directories
``pretrain/``, ``finetune/``, ``distill/`` (any of them, reported in that order). Whatever is missing
(no evaluation yet, no export, a run still in progress, rows from before metrics carried a time) is
``null`` in the summary, never an error: a report is most useful while a run is still going.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from distrib.checkpoint import latest_checkpoint
from distrib.commands import generate
from distrib.config import ConfigError
from distrib.train.metrics import read_rows

#: Stage directories of a pipeline, in the order they run.
STAGE_ORDER = ("pretrain", "finetune", "distill")

WALL_TIME_NOTE = ("wall time is the span of the logged steps (first to last metrics.jsonl row's time): start-up, "
                  "data preparation and the final export are not in it; a resumed run's includes the time it was "
                  "stopped")


# -- reading a run -----------------------------------------------------------------------------


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()


def stage_dirs(run_dir: str | Path) -> list[tuple[str, Path]]:
    """``(stage name, run directory)`` for each stage under ``run_dir``, in pipeline order.

    Raises:
        ConfigError: ``run_dir`` is neither a run directory nor a pipeline directory.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; pass a run's output_dir or a pipeline directory")
    stages = [(name, root / name) for name in STAGE_ORDER if _is_run_dir(root / name)]
    if stages:
        return stages
    if _is_run_dir(root):
        return [(_stage_of(root), root)]
    raise ConfigError(
        f"{run_dir} is not a run directory (no config.yaml or metrics.jsonl) nor a pipeline directory (no "
        f"{', '.join(s + '/' for s in STAGE_ORDER)}); pass a run's output_dir"
    )


def _read_config(run: Path) -> dict:
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _stage_of(run: Path) -> str:
    """A lone run's stage: its directory name if that is a stage's, else what its config says it does."""
    if run.name in STAGE_ORDER:
        return run.name
    cfg = _read_config(run)
    if cfg.get("teacher"):
        return "distill"
    return "finetune" if cfg.get("init_from") else "pretrain"


def read_metrics(run: Path) -> list[dict]:
    """The rows of ``run/metrics.jsonl`` that parse (a run killed mid-write tears its last line)."""
    return [row for _, row in read_rows(run / "metrics.jsonl")]


def _num(value: Any) -> float | None:
    """``value`` as a finite number, or None (missing, null for a non-finite value, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row holding a number under ``key``."""
    return [(r["step"], v) for r in rows if (v := _num(r.get(key))) is not None]


def _last(rows: list[dict], key: str) -> float | None:
    series = _series(rows, key)
    return series[-1][1] if series else None


def _median(rows: list[dict], key: str) -> float | None:
    values = [v for _, v in _series(rows, key)]
    return statistics.median(values) if values else None


def _wall_time(rows: list[dict]) -> float | None:
    """Seconds from the first to the last row with a ``time``; None with fewer than two such rows."""
    times = [t for r in rows if (t := _num(r.get("time"))) is not None]
    return max(times) - min(times) if len(times) >= 2 else None


def _layout(run: Path) -> dict:
    try:
        layout = json.loads((run / "layout.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return layout if isinstance(layout, dict) else {}


def _latest_checkpoint(run: Path) -> str | None:
    try:
        path = latest_checkpoint(run / "checkpoints")
    except ConfigError:  # latest names a checkpoint that is gone: there is none to point at
        return None
    return str(path) if path is not None else None


def count_parameters(model_dir: Path) -> int | None:
    """Parameters of the Hugging Face model in ``model_dir`` without loading it; None if unknown.

    Read from the safetensors headers (tied weights are stored once, so this is the model's own count);
    for ``.bin`` weights, from an empty model built on the meta device from ``config.json``.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        total = 0
        for f in files:
            try:
                with open(f, "rb") as fh:
                    header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            except (OSError, ValueError):
                return None
            for name, entry in header.items():
                if name != "__metadata__":
                    total += math.prod(entry["shape"])
        return total
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        return model.num_parameters()
    except Exception:  # no config, or one transformers cannot build: the count is unknown, not an error
        return None


def _teacher_path(cfg: dict) -> str | None:
    """The teacher's location in a distillation config: ``teacher: PATH`` or ``teacher: {path|init_from|...}``."""
    teacher = cfg.get("teacher")
    if isinstance(teacher, str):
        return teacher
    if isinstance(teacher, dict):
        for key in ("path", "init_from", "pretrained", "model_dir", "dir"):
            if isinstance(teacher.get(key), str):
                return teacher[key]
    return None


def _teacher_dir(path: str, run: Path) -> Path | None:
    """The teacher's HF directory: ``path`` itself or ``path/hf`` (as given, or relative to the run's parent),
    else ``run/teacher``, where a distillation run exports a teacher given as a checkpoint."""
    for base in (Path(path).expanduser(), run.parent / path, run / "teacher"):
        found = generate.hf_dir_of(base)
        if found is not None:
            return found
    return None


def _speed(model_dir: Path) -> float | None:
    try:
        return generate.generation_speed(model_dir)
    except Exception:  # a model that does not load or run has no speed; the rest of the report stands
        return None


def _distill_summary(cfg: dict, run: Path, rows: list[dict], student_params: int | None, hf: Path | None,
                     measure_speed: bool) -> dict:
    """The student beside its teacher: parameters, validation loss and, when both load, generation speed."""
    path = _teacher_path(cfg)
    teacher_dir = _teacher_dir(path, run) if path else None
    teacher_params = count_parameters(teacher_dir) if teacher_dir else None
    student_hf_params = count_parameters(hf) if hf else None
    student = {"params": student_hf_params if student_hf_params is not None else student_params,
               "val_loss": _last(rows, "eval_loss"), "tokens_per_s": None}
    teacher = {"path": path, "model_dir": str(teacher_dir) if teacher_dir else None, "params": teacher_params,
               "val_loss": _last(rows, "eval_loss/teacher"), "tokens_per_s": None}
    speedup = None
    if measure_speed and hf is not None and teacher_dir is not None:
        student["tokens_per_s"], teacher["tokens_per_s"] = _speed(hf), _speed(teacher_dir)
        if student["tokens_per_s"] and teacher["tokens_per_s"]:
            speedup = student["tokens_per_s"] / teacher["tokens_per_s"]
    ratio = (teacher_params / student["params"]) if teacher_params and student["params"] else None
    return {"student": student, "teacher": teacher, "compression": ratio, "generation_speedup": speedup}


def summarize_stage(name: str, run: Path, measure_speed: bool = True) -> dict:
    """One stage's numbers; every one that the run has not (yet) produced is None."""
    cfg = _read_config(run)
    rows = read_metrics(run)
    layout = _layout(run)
    train = [r for r in rows if "loss" in r]  # training steps (a non-finite loss is logged as null)
    evals = [r for r in rows if _num(r.get("eval_loss")) is not None]
    final_val = evals[-1]["eval_loss"] if evals else None
    # the final evaluation's perplexity: as logged in that row, else exp of its loss (exp overflows past ~709)
    ppl = _num(evals[-1].get("eval_ppl")) if evals else None
    if ppl is None and final_val is not None and final_val < 700:
        ppl = math.exp(final_val)
    train_cfg = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    max_steps = train_cfg.get("max_steps") if isinstance(train_cfg.get("max_steps"), int) else None
    steps = train[-1]["step"] if train else None
    hf = run / "hf" if (run / "hf" / "config.json").is_file() else None
    adapter = run / "adapter" if (run / "adapter" / "adapter_config.json").is_file() else None
    summary = {
        "stage": name,
        "run_dir": str(run),
        "steps": steps,
        "max_steps": max_steps,
        "finished": (steps >= max_steps) if steps is not None and max_steps is not None else None,
        "tokens": _last(train, "tokens_seen"),
        "final_train_loss": _last(train, "loss"),
        "initial_val_loss": evals[0]["eval_loss"] if evals and evals[0].get("step") == 0 else None,
        "final_val_loss": final_val,
        "final_val_ppl": ppl,
        "median_tokens_per_s": _median(train, "tokens_per_s"),
        "median_mfu": _median(train, "mfu"),
        "wall_time_s": _wall_time(rows),
        "total_params": _num(layout.get("total_params")),
        "trainable_params": _num(layout.get("trainable_params")),
        "checkpoint": _latest_checkpoint(run),
        "export": {"hf": str(hf) if hf else None, "adapter": str(adapter) if adapter else None},
    }
    if cfg.get("teacher"):
        summary["distill"] = _distill_summary(cfg, run, rows, summary["total_params"], hf, measure_speed)
    downstream = read_downstream(run)
    if downstream is not None:
        summary["downstream"] = downstream
    return summary


#: The score a downstream table shows for a task: the first of these metrics it has.
HEADLINE_METRICS = ("acc_mutual_info", "acc", "bits_per_byte", "word_perplexity")


def read_downstream(run: Path) -> dict | None:
    """``{task: {metric: value}}`` from the run's ``eval.json`` (``distrib eval``), numbers only; None without one."""
    try:
        record = json.loads((run / "eval.json").read_text())
        results = record["results"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results.items() if isinstance(results, dict) else ()):
        scores = {k.split(",")[0]: v for k, v in metrics.items()
                  if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scores:
            out[task] = scores
    return out or None


def downstream_table(summary: dict) -> list[str]:
    """Markdown lines: every stage's model on the same tasks (one headline metric per task), or nothing."""
    stages = [s for s in summary["stages"] if s.get("downstream")]
    if not stages:
        return []
    tasks = sorted({t for s in stages for t in s["downstream"]})
    metric = {t: next((m for s in stages for m in HEADLINE_METRICS if m in s["downstream"].get(t, {})), None)
              for t in tasks}
    tasks = [t for t in tasks if metric[t]]
    head = ["stage", *(f"{t} ({metric[t]})" for t in tasks)]
    lines = ["", "Downstream (lm-eval; `distrib eval`), each stage's model on the same tasks:", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(head))) + "|"]
    for s in stages:
        cells = [s["stage"]] + [_fmt(s["downstream"].get(t, {}).get(metric[t]), ".4g") for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- writing the report ------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _si(value: float | None) -> str:
    """1234567 -> ``1.23M``: counts of tokens and parameters."""
    if value is None:
        return "–"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{seconds:.1f}s"


def _steps(stage: dict) -> str:
    if stage["steps"] is None:
        return "–"
    return f"{stage['steps']}/{stage['max_steps']}" if stage["max_steps"] is not None else str(stage["steps"])


def format_markdown(summary: dict) -> str:
    """``summary.md``: one table row per stage, then exports and the teacher/student comparison."""
    head = ["stage", "steps", "tokens", "train loss", "val loss", "val ppl", "tokens/s", "MFU", "wall time",
            "params (trainable)"]
    lines = [f"# Report: {summary['run_dir']}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(head))) + "|"]
    for s in summary["stages"]:
        mfu = None if s["median_mfu"] is None else 100 * s["median_mfu"]
        cells = [s["stage"], _steps(s), _si(s["tokens"]), _fmt(s["final_train_loss"], ".3f"),
                 _fmt(s["final_val_loss"], ".3f"), _fmt(s["final_val_ppl"], ".4g"),
                 _fmt(s["median_tokens_per_s"], ",.0f"), "–" if mfu is None else f"{mfu:.3g}%",
                 _duration(s["wall_time_s"]), f"{_si(s['total_params'])} ({_si(s['trainable_params'])})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Losses are the last logged; tokens/s and MFU are medians over the logged steps; {WALL_TIME_NOTE}.",
              ""]
    for s in summary["stages"]:
        where = [f"checkpoint `{s['checkpoint']}`" if s["checkpoint"] else "no checkpoint"]
        where += [f"{k} `{v}`" for k, v in s["export"].items() if v]
        lines.append(f"- {s['stage']}: " + ", ".join(where))
    for s in summary["stages"]:
        if "distill" in s:
            lines += ["", comparison_line(s)]
    lines += downstream_table(summary)
    return "\n".join(lines) + "\n"


def comparison_line(stage: dict) -> str:
    """The distilled student beside its teacher, in one sentence."""
    d = stage["distill"]
    st, te = d["student"], d["teacher"]
    text = (f"Distillation: student {_si(st['params'])} parameters, validation loss {_fmt(st['val_loss'], '.3f')}; "
            f"teacher {_si(te['params'])} parameters, validation loss {_fmt(te['val_loss'], '.3f')}")
    if d["compression"] is not None:
        text += f"; the student is {d['compression']:.3g}x smaller"
    if d["generation_speedup"] is not None:
        text += (f" and generates {d['generation_speedup']:.3g}x as fast ({st['tokens_per_s']:,.0f} vs. "
                 f"{te['tokens_per_s']:,.0f} tokens/s, greedy with KV cache)")
    return text + "."


def _plot(summary: dict, run_dir: Path, key: str, title: str, ylabel: str, filename: str,
          eval_key: str | None = None) -> Path:
    """One figure, one subplot per stage: ``key`` (and ``eval_key``) against the step."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend; PNGs render with Agg
    from matplotlib.ticker import MaxNLocator

    stages = summary["stages"]
    fig = Figure(figsize=(5.5 * len(stages), 4.2), layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, stage in zip(axes, stages):
        rows = read_metrics(Path(stage["run_dir"]))
        train = _series(rows, key)
        if train:
            label = "train (distillation loss)" if "distill" in stage else "train"
            ax.plot(*zip(*train), label=label if eval_key else None, color="tab:blue", linewidth=1.5)
        if eval_key:
            val = _series(rows, eval_key)
            if val:
                label = "validation (next-token loss)" if "distill" in stage else "validation"
                ax.plot(*zip(*val), "o-", label=label, color="tab:orange", linewidth=1.5, markersize=4)
            teacher = _series(rows, f"{eval_key}/teacher")
            if teacher:
                ax.plot(*zip(*teacher), "s--", label="teacher (validation)", color="tab:gray", markersize=3)
        if not train and not (eval_key and _series(rows, eval_key)):
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(stage["stage"])
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not eval_key:
            ax.set_ylim(bottom=0)  # throughput from zero: a dip reads as its true size
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"{title}: {run_dir.resolve().name}")
    path = run_dir / filename
    fig.savefig(path, dpi=100, format="png")
    return path


def write_report(run_dir: str | Path, measure_speed: bool = True) -> dict:
    """Write ``summary.json``, ``summary.md``, ``loss.png`` and ``throughput.png`` into ``run_dir``; return the summary.

    ``measure_speed`` times the distilled student's and its teacher's generation (a few seconds for
    small models); turn it off when only the training numbers are wanted.

    Raises:
        ConfigError: ``run_dir`` is neither a run nor a pipeline directory.
    """
    root = Path(run_dir)
    stages = stage_dirs(root)
    summary = {
        "run_dir": str(root),
        "kind": "pipeline" if stages[0][1] != root else "run",
        "notes": {"wall_time_s": WALL_TIME_NOTE,
                  "median_tokens_per_s": "median over the logged training steps",
                  "final_val_ppl": "perplexity of the last evaluation (exp of its loss)"},
        "stages": [summarize_stage(name, path, measure_speed) for name, path in stages],
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (root / "summary.md").write_text(format_markdown(summary))
    _plot(summary, root, "loss", "Loss", "loss (nats per target token)", "loss.png", eval_key="eval_loss")
    _plot(summary, root, "tokens_per_s", "Training throughput", "tokens/s", "throughput.png")
    return summary


def command(args, cfg=None) -> int:
    """``distrib report RUN_DIR [--no-speed]``."""
    print(format_markdown(write_report(args.run_dir, measure_speed=not args.no_speed)), end="")
    return 0
