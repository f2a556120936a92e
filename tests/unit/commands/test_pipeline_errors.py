"""Bad pipelines: one line naming the stage and key, exit 2, before anything runs or is written."""

import pytest

from distrib.commands.cli import main
from distrib.commands.pipeline import DEFAULT_PIPELINE, load_pipeline
from tests.helpers import ROOT


def _refused(capsys, tmp_path, *args) -> str:
    out = tmp_path / "pipe"
    capsys.readouterr()
    code = main(["run", *args, f"output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("distrib: error: "), err
    assert not out.exists()  # nothing ran, nothing written
    return err[0].removeprefix("distrib: error: ")


def _file(tmp_path, text: str):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return str(path)


def test_an_unknown_stage_is_named_with_a_suggestion(capsys, tmp_path):
    f = _file(tmp_path, f"pretrain: {{config: {ROOT}/configs/pretrain/tiny.yaml}}\nfinetuen: {{config: x.yaml}}\n")
    msg = _refused(capsys, tmp_path, f)
    assert msg.startswith("'finetuen' in ") and "is not a stage (did you mean 'finetune'?)" in msg


def test_a_stage_without_its_config(capsys, tmp_path):
    f = _file(tmp_path, "pretrain: {overrides: {train.max_steps: 5}}\n")
    assert _refused(capsys, tmp_path, f).startswith("pretrain: no config; give the stage's YAML")


def test_a_stage_config_that_does_not_exist(capsys, tmp_path):
    f = _file(tmp_path, "finetune: {config: ../nowhere/ft.yaml}\n")
    msg = _refused(capsys, tmp_path, f)
    assert msg.startswith("finetune.config='../nowhere/ft.yaml' does not exist")


def test_a_stage_config_that_fails_validation_names_the_stage_and_key(capsys, tmp_path):
    f = _file(tmp_path, f"pretrain: {{config: {ROOT}/configs/pretrain/tiny.yaml}}\n"
                        f"finetune:\n  config: {ROOT}/configs/finetune/tiny-lora.yaml\n  overrides: {{train.lr: -1}}\n")
    msg = _refused(capsys, tmp_path, f)
    assert msg.startswith("finetune: train.lr")


def test_a_command_line_override_that_fails_validation(capsys, tmp_path):
    msg = _refused(capsys, tmp_path, "distill.distill.loss.kl=-2")
    assert msg.startswith("distill: distill.loss.kl=-2 must be >= 0")


def test_a_command_line_override_of_a_key_that_does_not_exist(capsys, tmp_path):
    msg = _refused(capsys, tmp_path, "finetune.train.max_stpes=5")
    assert msg.startswith("finetune: ") and "max_stpes" in msg and "max_steps" in msg


def test_an_override_naming_a_stage_the_pipeline_does_not_run(capsys, tmp_path):
    f = _file(tmp_path, f"pretrain: {{config: {ROOT}/configs/pretrain/tiny.yaml}}\n")
    msg = _refused(capsys, tmp_path, f, "distill.train.max_steps=5")
    assert msg.startswith("'distill.train.max_steps=5' overrides the distill stage, which this pipeline does not run")


def test_a_world_that_does_not_fit_a_stage(capsys, tmp_path):
    msg = _refused(capsys, tmp_path, "--nproc-per-node", "3")
    assert msg.startswith("pretrain: train.global_batch_size=32 is not a multiple of")


def test_the_default_pipeline_wires_each_stage_into_the_next(tmp_path):
    p = load_pipeline(None, [f"output_dir={tmp_path}", "finetune.train.max_steps=70", "seed=5"])
    assert [s.name for s in p.stages] == ["pretrain", "finetune", "distill"] and p.nproc_per_node == 2
    by = {s.name: s for s in p.stages}
    assert by["pretrain"].config == DEFAULT_PIPELINE.parent / "../pretrain/tiny.yaml"
    assert f"output_dir={tmp_path / 'pretrain'}" in by["pretrain"].overrides
    assert f"init_from={tmp_path / 'pretrain'}" in by["finetune"].overrides
    assert f"teacher={tmp_path / 'finetune'}" in by["distill"].overrides
    assert "train.max_steps=70" in by["finetune"].overrides and "train.max_steps=70" not in by["pretrain"].overrides
    assert all("seed=5" in s.overrides for s in p.stages)  # a key without a stage applies to every stage
