"""distrib.commands.report on run directories written by hand: exact numbers, the stages of a pipeline in order,
missing pieces as nulls, valid plots, the teacher/student comparison, and the command line."""

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

import distrib.commands.generate
from distrib.commands.report import WALL_TIME_NOTE, count_parameters, write_report
from tests.helpers import ROOT

T0 = 1_700_000_000.0
PNG = b"\x89PNG\r\n\x1a\n"

#: eval-only row at step 0, four training steps, evaluations at 2 and 4 (the last with the step's train row)
ROWS = [
    {"step": 0, "eval_loss": 8.0, "eval_ppl": math.exp(8.0), "time": T0},
    {"step": 1, "loss": 7.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "mfu": 0.01,
     "tokens_seen": 512, "samples_seen": 4, "target_tokens": 500, "time": T0 + 3.0},
    {"step": 2, "loss": 6.5, "lr": 1e-3, "grad_norm": 0.9, "tokens_per_s": 400.0, "mfu": 0.04,
     "tokens_seen": 1024, "samples_seen": 8, "target_tokens": 500, "eval_loss": 6.9, "eval_ppl": math.exp(6.9),
     "time": T0 + 5.5},
    {"step": 3, "loss": 6.0, "lr": 1e-3, "grad_norm": 0.8, "tokens_per_s": 200.0, "mfu": 0.09,
     "tokens_seen": 1536, "samples_seen": 12, "target_tokens": 500, "time": T0 + 7.0},
    {"step": 4, "loss": 5.25, "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 1000.0, "mfu": 0.02,
     "tokens_seen": 2048, "samples_seen": 16, "target_tokens": 500, "eval_loss": 5.5, "eval_ppl": math.exp(5.5),
     "time": T0 + 100.25},
]


def make_run(path, rows=ROWS, max_steps=4, checkpoint=True, export=True, torn="", **config):
    """A run directory as distrib leaves it, with only the files the report reads."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"output_dir": str(path), "init_from": None, "train": {"max_steps": max_steps}, **config}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    if rows is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
        (path / "layout.json").write_text(json.dumps({"world_size": 2, "total_params": 1_787_008,
                                                      "trainable_params": 28_672}))
    if checkpoint:
        step = path / "checkpoints" / "step_00000004"
        step.mkdir(parents=True)
        (step / "trainer_state.json").write_text("{}")
        (path / "checkpoints" / "latest").write_text("step_00000004")
    if export:
        (path / "hf").mkdir()
        (path / "hf" / "config.json").write_text("{}")
    return path


def test_single_run_numbers_are_exact(tmp_path):
    run = make_run(tmp_path / "run")
    summary = write_report(run)
    assert summary["kind"] == "run"
    assert summary["notes"]["wall_time_s"] == WALL_TIME_NOTE and "span of the logged steps" in WALL_TIME_NOTE
    [s] = summary["stages"]
    assert s["stage"] == "pretrain"
    assert (s["steps"], s["max_steps"], s["finished"], s["tokens"]) == (4, 4, True, 2048)
    assert s["final_train_loss"] == 5.25
    assert s["final_val_loss"] == 5.5
    assert s["final_val_ppl"] == pytest.approx(math.exp(5.5), rel=1e-12)
    assert s["median_tokens_per_s"] == 300.0  # median of 100, 400, 200, 1000 (the mean is 425)
    assert s["median_mfu"] == pytest.approx(0.03)  # of 0.01, 0.04, 0.09, 0.02 (the mean is 0.04)
    assert s["wall_time_s"] == 100.25  # first row (step 0's evaluation) to the last
    assert (s["total_params"], s["trainable_params"]) == (1_787_008, 28_672)
    assert s["checkpoint"] == str(run / "checkpoints" / "step_00000004")
    assert s["export"] == {"hf": str(run / "hf"), "adapter": None}
    assert "distill" not in s
    assert json.loads((run / "summary.json").read_text()) == summary


def test_summary_md_holds_the_rounded_numbers(tmp_path):
    run = make_run(tmp_path / "run")
    write_report(run)
    md = (run / "summary.md").read_text()
    row = [line for line in md.splitlines() if line.startswith("| pretrain |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells == ["pretrain", "4/4", "2.05K", "5.250", "5.500", "244.7", "300", "3%", "1m40s", "1.79M (28.7K)"]
    assert "span of the logged steps" in md
    assert str(run / "checkpoints" / "step_00000004") in md


def test_plots_are_pngs_with_one_panel_per_stage(tmp_path):
    single = make_run(tmp_path / "single")
    write_report(single)
    pipeline = tmp_path / "pipeline"
    for stage in ("pretrain", "finetune", "distill"):
        make_run(pipeline / stage)
    write_report(pipeline, measure_speed=False)
    for root in (single, pipeline):
        for name in ("loss.png", "throughput.png"):
            raw = (root / name).read_bytes()
            assert raw.startswith(PNG) and len(raw) > 1000
            Image.open(root / name).verify()
    widths = {root: Image.open(root / "loss.png").size[0] for root in (single, pipeline)}
    assert widths[pipeline] > 2.5 * widths[single]  # three panels side by side


def test_pipeline_reports_its_stages_in_order(tmp_path):
    pipeline = tmp_path / "pipeline"
    for stage in ("distill", "pretrain", "finetune"):  # created out of order
        make_run(pipeline / stage, rows=[dict(r, loss=r.get("loss") and r["loss"] + len(stage)) for r in ROWS])
    (pipeline / "notes").mkdir()  # not a stage
    summary = write_report(pipeline, measure_speed=False)
    assert summary["kind"] == "pipeline"
    assert [s["stage"] for s in summary["stages"]] == ["pretrain", "finetune", "distill"]
    assert [s["run_dir"] for s in summary["stages"]] == [str(pipeline / n) for n in ("pretrain", "finetune", "distill")]
    assert [s["final_train_loss"] for s in summary["stages"]] == [5.25 + 8, 5.25 + 8, 5.25 + 7]
    md = (pipeline / "summary.md").read_text()
    assert md.index("| pretrain |") < md.index("| finetune |") < md.index("| distill |")


def test_missing_pieces_are_null(tmp_path):
    # a run just started: its config, nothing logged, no checkpoint, no export
    fresh = make_run(tmp_path / "fresh", rows=None, checkpoint=False, export=False)
    [s] = write_report(fresh)["stages"]
    for key in ("steps", "finished", "tokens", "final_train_loss", "final_val_loss", "final_val_ppl",
                "median_tokens_per_s", "median_mfu", "wall_time_s", "total_params", "trainable_params", "checkpoint"):
        assert s[key] is None, key
    assert s["export"] == {"hf": None, "adapter": None}
    assert (fresh / "loss.png").read_bytes().startswith(PNG)
    assert "| pretrain | – | – |" in (fresh / "summary.md").read_text()


def test_in_progress_run_without_eval_or_times(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "time" and not k.startswith("eval")} for r in ROWS[1:3]]
    rows[1]["loss"] = None  # a non-finite loss is logged as null
    run = make_run(tmp_path / "run", rows=rows, max_steps=10, torn='{"step": 3, "lo')
    (run / "checkpoints" / "latest").write_text("step_00000099")  # names a checkpoint that is gone
    [s] = write_report(run, measure_speed=False)["stages"]
    assert (s["steps"], s["finished"], s["tokens"]) == (2, False, 1024)
    assert s["final_train_loss"] == 7.5  # the last finite loss
    assert s["median_tokens_per_s"] == 250.0  # both logged steps, the null loss's too
    assert (s["final_val_loss"], s["final_val_ppl"], s["wall_time_s"], s["checkpoint"]) == (None, None, None, None)


def test_perplexity_is_exp_of_the_final_loss_when_not_logged(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[-1]["eval_ppl"]
    [s] = write_report(make_run(tmp_path / "run", rows=rows))["stages"]
    assert s["final_val_ppl"] == math.exp(5.5)


def _save_llama(path, layers, hidden, tie=False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, tie_word_embeddings=tie, use_cache=False))
    model.save_pretrained(path)
    return model.num_parameters()


def test_parameters_counted_from_safetensors_headers(tmp_path):
    (tmp_path / "empty").mkdir()
    assert count_parameters(tmp_path / "empty") is None
    for tie in (False, True):
        n = _save_llama(tmp_path / f"tie{tie}", layers=2, hidden=32, tie=tie)
        assert count_parameters(tmp_path / f"tie{tie}") == n


def _distill_run(tmp_path, teacher_value):
    """A pipeline whose distill stage names its teacher, the pretrain stage's run directory."""
    pipeline = tmp_path / "pipeline"
    make_run(pipeline / "pretrain", export=False)
    teacher_params = _save_llama(pipeline / "pretrain" / "hf", layers=4, hidden=64)
    rows = [dict(r) for r in ROWS]
    rows[0]["eval_loss/teacher"] = 5.0
    rows[-1]["eval_loss/teacher"] = 4.75
    run = make_run(pipeline / "distill", rows=rows, export=False, teacher=teacher_value(pipeline / "pretrain"))
    student_params = _save_llama(run / "hf", layers=2, hidden=32)
    return pipeline, teacher_params, student_params


def test_distillation_student_beside_its_teacher(tmp_path, monkeypatch):
    pipeline, teacher_params, student_params = _distill_run(tmp_path, str)
    speeds = {str(pipeline / "pretrain" / "hf"): 100.0, str(pipeline / "distill" / "hf"): 300.0}
    monkeypatch.setattr(distrib.commands.generate, "generation_speed", lambda d, **kw: speeds[str(d)])
    summary = write_report(pipeline)
    pretrain, distill = summary["stages"]
    assert "distill" not in pretrain
    d = distill["distill"]
    assert d["student"] == {"params": student_params, "val_loss": 5.5, "tokens_per_s": 300.0}
    assert d["teacher"] == {"path": str(pipeline / "pretrain"), "model_dir": str(pipeline / "pretrain" / "hf"),
                            "params": teacher_params, "val_loss": 4.75, "tokens_per_s": 100.0}
    assert d["generation_speedup"] == 3.0
    assert d["compression"] == teacher_params / student_params
    md = (pipeline / "summary.md").read_text()
    assert "3x as fast" in md and "validation loss 5.500" in md and "validation loss 4.750" in md


def test_distillation_with_its_teacher_gone_or_speed_skipped(tmp_path, monkeypatch):
    pipeline, _, student_params = _distill_run(tmp_path, lambda p: str(p.parent / "gone"))
    monkeypatch.setattr(distrib.commands.generate, "generation_speed", lambda d, **kw: pytest.fail("nothing to compare"))
    d = write_report(pipeline)["stages"][1]["distill"]
    assert d["teacher"]["params"] is None and d["teacher"]["model_dir"] is None
    assert d["teacher"]["val_loss"] == 4.75  # logged by the run all the same
    assert (d["generation_speedup"], d["compression"], d["student"]["params"]) == (None, None, student_params)
    assert "Distillation: student" in (pipeline / "summary.md").read_text()


def test_real_generation_speed_of_student_and_teacher(tmp_path, monkeypatch):
    pipeline, _, _ = _distill_run(tmp_path, str)
    real = distrib.commands.generate.generation_speed
    monkeypatch.setattr(distrib.commands.generate, "generation_speed",  # both models load and decode, briefly
                        lambda d, **kw: real(d, prompt_tokens=4, new_tokens=3, repeats=1))
    d = write_report(pipeline)["stages"][1]["distill"]
    assert d["student"]["tokens_per_s"] > 0 and d["teacher"]["tokens_per_s"] > 0
    assert d["generation_speedup"] == d["student"]["tokens_per_s"] / d["teacher"]["tokens_per_s"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "distrib", "report", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_the_report_and_prints_the_table(tmp_path):
    run = make_run(tmp_path / "run")
    proc = _cli(run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (run / "summary.md").read_text()
    assert "| pretrain | 4/4 |" in proc.stdout
    assert {p.name for p in run.iterdir()} >= {"summary.json", "summary.md", "loss.png", "throughput.png"}


@pytest.mark.parametrize("target", ["absent", "empty"])
def test_cli_bad_directory_is_one_line_and_exit_2(tmp_path, target):
    (tmp_path / "empty").mkdir()
    proc = _cli(tmp_path / target)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distrib: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "empty").iterdir())  # nothing written
