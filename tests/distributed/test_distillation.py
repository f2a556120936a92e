"""Distillation as users run it: a tiny pretrained teacher, a smaller student, 1-2 CPU processes.

fp32 so that layouts compare to a few ulps and the teacher's weights compare bitwise.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import ROOT, SMALL, export_matches_final_eval, losses, metrics, run_distrib, run_probe

pytestmark = pytest.mark.slow

RTOL = 1e-4
DISTILL = str(ROOT / "configs/distill/tiny.yaml")
PROBE = str(Path(__file__).with_name("distill_probe.py"))
#: SMALL's run settings without its model: the student's architecture comes from each variant.
RUN = [a for a in SMALL if not a.startswith("model.")]
STUDENTS = {
    # one of the teacher's two blocks, its embeddings, norm and head; every loss term, the hidden-state
    # term through a learned projection (forced on at equal widths)
    "cut": ["student.init_from_teacher_layers=[1]", "distill.loss.ce=0.5", "distill.loss.reverse_kl=0.25",
            "distill.loss.hidden=1.0", "distill.projection=true", "distill.loss.temperature=2.0"],
    # a student of its own, narrower size: the hidden-state term needs a 32 -> 64 projection
    "own": ["student.init_from_teacher_layers=null", "model.hidden_size=32", "model.num_layers=1",
            "model.num_heads=2", "model.num_kv_heads=2", "model.intermediate_size=64", "distill.loss.hidden=1.0",
            "distill.loss.ce=0.5"],
}


def _distill(out, cache, teacher, student, *extra) -> list[str]:
    return [f"output_dir={out}", f"data.cache_dir={cache}", f"teacher={teacher}", *RUN, "data.name=prose",
            "train.max_steps=8", "eval.every_steps=4", "checkpoint.every_steps=4", *STUDENTS[student], *extra]


def run(*args, nproc=None, **kw):
    return run_distrib(*args, nproc=nproc, stage="distill", config=DISTILL, **kw)


def probe(tmp_path, args, nproc=2) -> dict:
    return run_probe(PROBE, tmp_path / "report.json", DISTILL, args, nproc)


@pytest.fixture(scope="module")
def refs(tmp_path_factory, data_cache, base):
    """1 process, ZeRO-0: the unsharded reference of each student, made on first use."""
    made = {}

    def get(student: str) -> Path:
        if student not in made:
            out = tmp_path_factory.mktemp(f"distill-ref-{student}")
            run(*_distill(out, data_cache, base, student, "parallel.zero_stage=0"))
            made[student] = out
        return made[student]

    return get


def _params(model_dir: Path) -> int:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                   else int(torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys())


def _same_losses(a: Path, b: Path) -> None:
    ra = {r["step"]: r for r in metrics(a)}
    rb = {r["step"]: r for r in metrics(b)}
    assert ra.keys() == rb.keys()
    for step in ra:
        keys = [k for k in ra[step] if k.startswith(("loss", "eval_loss"))]
        assert keys and keys == [k for k in rb[step] if k.startswith(("loss", "eval_loss"))]
        for k in keys:
            assert rb[step][k] == pytest.approx(ra[step][k], rel=RTOL), (step, k)


@pytest.mark.parametrize("student", STUDENTS)
def test_zero3_on_2_processes_matches_1_process_and_the_teacher_is_untouched(tmp_path, data_cache, base, refs,
                                                                             student):
    out = tmp_path / "run"
    report = probe(tmp_path, _distill(out, data_cache, base / "hf", student, "parallel.zero_stage=3"))
    ref = refs(student)
    _same_losses(ref, out)
    rows = metrics(out)
    parts = {"cut": {"kl", "reverse_kl", "ce", "hidden"}, "own": {"kl", "ce", "hidden"}}[student]
    assert {k.split("/")[1] for k in rows[-1] if k.startswith("loss/")} == parts  # each component logged
    assert {"eval_loss", "eval_ppl", "eval_loss/distill", "eval_loss/teacher"} <= rows[-1].keys()

    # The teacher: bitwise the files it came from, no gradient, no optimizer, in eval mode, its loss constant.
    assert report["n_teacher"] > 0 and report["teacher_changed"] == []
    assert report["teacher_requires_grad"] == [] and report["teacher_grads"] == []
    # (under ZeRO-3 an engine without optimizer holds only DeepSpeed's parameter partitioner)
    assert report["teacher_optimizer"] in ("NoneType", "DeepSpeedZeRoOffload"), report["teacher_optimizer"]
    assert report["teacher_optimizer_state_bytes"] == 0 and report["teacher_training_mode"] is False
    assert len({r["eval_loss/teacher"] for r in rows if "eval_loss/teacher" in r}) == 1

    # Per-rank memory, measured from the engines: the teacher is partitioned and holds no optimizer state.
    layout = json.loads((out / "layout.json").read_text())
    teacher_total = _params(base / "hf")
    for rank in layout["ranks"]:
        assert rank["teacher"]["optimizer_state_bytes"] == 0 and rank["teacher"]["trainable_numel"] == 0
        assert rank["teacher"]["param_numel"] <= teacher_total / 2 + 4096  # ZeRO-3 shards it like the student
        assert rank["optimizer_state_bytes"] > 0
    assert sum(r["trainable_numel"] for r in layout["ranks"]) < teacher_total

    # The export: the student alone (no projection), smaller than the teacher, and the engine's logits.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert not any("distill_projections" in n for n, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == _params(out / "hf") < teacher_total
    exported, final = export_matches_final_eval(out)
    assert exported == pytest.approx(final, rel=1e-4)


def test_tensor_parallel_2_matches_1_process(tmp_path, data_cache, base, refs):
    out = tmp_path / "tp2"
    run(*_distill(out, data_cache, base / "hf", "cut", "parallel.zero_stage=1", "parallel.tp=2"), nproc=2)
    _same_losses(refs("cut"), out)
    layout = json.loads((out / "layout.json").read_text())
    assert all(r["teacher"]["optimizer_state_bytes"] == 0 for r in layout["ranks"])
    exported, final = export_matches_final_eval(out)  # the tp slices merged back: the engine's logits
    assert exported == pytest.approx(final, rel=1e-4)


def test_distillation_resumes_bitwise(tmp_path, data_cache, base):
    args = ("parallel.zero_stage=2", "train.max_steps=24", "eval.every_steps=8", "checkpoint.every_steps=8")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(*_distill(straight, data_cache, base / "hf", "own", *args), nproc=2)
    run(*_distill(resumed, data_cache, base / "hf", "own", *args, "train.exit_after_steps=8"), nproc=2)
    assert max(losses(resumed)) == 8
    run(*_distill(resumed, data_cache, base / "hf", "own", *args), nproc=2)
    assert losses(resumed) == losses(straight)  # 16 steps after the resume, every one equal
    assert (resumed / "hf/model.safetensors").read_bytes() == (straight / "hf/model.safetensors").read_bytes()
    state = json.loads((resumed / "checkpoints/step_00000024/trainer_state.json").read_text())
    assert state["teacher"]["path"] == str(base / "hf") and len(state["teacher"]["sha256"]) == 64


def test_resume_onto_a_changed_teacher_is_refused_in_one_line(tmp_path, data_cache, base):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(base / "hf", teacher)
    out = tmp_path / "run"
    args = ("parallel.zero_stage=0", "train.exit_after_steps=4")
    run(*_distill(out, data_cache, teacher, "cut", *args))
    weights = teacher / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    before = sorted(p.name for p in out.rglob("*"))
    proc = run(*_distill(out, data_cache, teacher, "cut", *args), check=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("distrib: error:")]
    assert len(err) == 1 and err[0].startswith(f"distrib: error: the teacher {teacher} has changed since step_00000004")
    assert sorted(p.name for p in out.rglob("*")) == before


def test_distillation_beats_cross_entropy_alone_on_the_shipped_tiny_config(tmp_path, tiny_finetuned):
    """configs/distill/tiny.yaml as shipped (teacher: the tiny LoRA fine-tune), against the same student trained
    with cross-entropy alone on the same data for the same steps."""
    cache = f"data.cache_dir={tiny_finetuned.parent / 'cache'}"
    kl, ce = tmp_path / "kl", tmp_path / "ce"
    run(f"output_dir={kl}", f"teacher={tiny_finetuned}", cache, "metrics.progress_bar=false", nproc=2, timeout=900)
    run(f"output_dir={ce}", f"teacher={tiny_finetuned}", cache, "metrics.progress_bar=false", "distill.loss.kl=0",
        "distill.loss.ce=1", nproc=2, timeout=900)

    def final(out):
        rows = [r for r in metrics(out) if "eval_loss" in r]
        return rows[-1]["eval_loss"], rows[-1]["eval_loss/teacher"]

    (kl_loss, teacher_loss), (ce_loss, _) = final(kl), final(ce)
    print(f"distill tiny: teacher {teacher_loss:.3f}, student KL {kl_loss:.3f}, student CE only {ce_loss:.3f}")
    assert kl_loss < ce_loss - 0.25
    assert kl_loss < teacher_loss + 0.15  # within reach of its teacher
    student, teacher = _params(kl / "hf"), _params(tiny_finetuned / "hf")
    assert student < 0.85 * teacher
