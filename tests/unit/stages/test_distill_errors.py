"""Bad distillation input: one line naming the key and the fix, exit 2, before anything is written."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distrib import data
from distrib.commands.cli import main
from distrib.config import DataConfig
from tests.helpers import ROOT, TINY

DISTILL = str(ROOT / "configs/distill/tiny.yaml")
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
         "class Point:\n    def __init__(self, x, y):\n        self.x = x\n"] * 4


def _save_model(path, vocab_texts=TEXTS, vocab_size=300, layers=4):
    tok = data.load_or_train_tokenizer(DataConfig(vocab_size=vocab_size), vocab_texts)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("teacher") / "hf")


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("other-tokenizer")
    tok = data.load_or_train_tokenizer(DataConfig(vocab_size=400), ["the quick brown fox jumps\n"] * 20)
    tok.save_pretrained(path)
    return path


def _refused(capsys, tmp_path, *args, stage="distill", config=DISTILL) -> str:
    out = tmp_path / "run"
    capsys.readouterr()  # what fixtures printed
    code = main([stage, config, f"output_dir={out}", "metrics.progress_bar=false", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("distrib: error: "), err
    assert not out.exists()  # nothing written
    return err[0].removeprefix("distrib: error: ")


def test_a_missing_teacher_is_named(capsys, tmp_path):
    msg = _refused(capsys, tmp_path, f"teacher={tmp_path / 'nowhere'}")
    assert msg.startswith(f"teacher='{tmp_path / 'nowhere'}' does not exist; point it at a distrib run directory")


def test_no_teacher_at_all(capsys, tmp_path):
    assert _refused(capsys, tmp_path, "teacher=null").startswith("distill needs teacher: a distrib run directory")


def test_a_teacher_that_is_no_model(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    msg = _refused(capsys, tmp_path, f"teacher={tmp_path / 'empty'}")
    assert msg.startswith(f"teacher='{tmp_path / 'empty'}' is not a model")


def test_a_student_vocabulary_other_than_the_teachers(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "student.init_from_teacher_layers=null",
                   "model.vocab_size=1000", "model.hidden_size=32", "model.num_heads=2")
    assert msg.startswith(f"vocabulary mismatch: the student's model.vocab_size has 1000 tokens but the teacher {teacher} "
                          "has 300")
    assert msg.endswith("remove model.vocab_size (the student takes the teacher's)")


def test_a_tokenizer_other_than_the_teachers(capsys, tmp_path, teacher, other_tokenizer):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", f"data.tokenizer={other_tokenizer}")
    assert msg.startswith(f"vocabulary mismatch: data.tokenizer='{other_tokenizer}'")
    assert msg.endswith("remove data.tokenizer to use the teacher's")


def test_a_student_init_from_a_model_with_another_vocabulary(capsys, tmp_path, teacher):
    other = _save_model(tmp_path / "other", vocab_size=350)
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "student.init_from_teacher_layers=null", f"init_from={other}")
    assert msg.startswith("vocabulary mismatch")


def test_a_teacher_layer_out_of_range(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "student.init_from_teacher_layers=[0,5]")
    assert msg == ("student.init_from_teacher_layers: 5 names no layer of the teacher, which has 4 layers; "
                   "use indices 0..3")


def test_a_layer_map_naming_a_layer_the_student_lacks(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "student.init_from_teacher_layers=[1]",
                   "distill.loss.hidden=1", "distill.layer_map=[[2,2]]")
    assert msg.startswith("distill.layer_map: [2, 2] names student layer 2, but the student has 1 layers")


def test_a_layer_map_naming_a_layer_the_teacher_lacks(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "distill.loss.hidden=1", "distill.layer_map=[[1,5]]")
    assert msg.startswith("distill.layer_map: [1, 5] names teacher layer 5, but the teacher has 4 layers")


def test_a_negative_loss_weight(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "distill.loss.kl=-1")
    assert msg.startswith("distill.loss.kl=-1 must be >= 0")


def test_all_loss_weights_zero(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "distill.loss.kl=0")
    assert msg.startswith("distill.loss: every weight is 0, so nothing would be learned")


def test_a_student_size_beside_a_student_cut_from_the_teacher(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "model.num_layers=3")
    assert msg.startswith("model.num_layers is set, but student.init_from_teacher_layers builds the student")


def test_widths_that_cannot_be_compared_without_a_projection(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "student.init_from_teacher_layers=null",
                   "model.hidden_size=16", "model.num_heads=2", "model.num_layers=1", "distill.loss.hidden=1",
                   "distill.projection=false")
    assert msg.startswith("distill.projection=false, but the student's hidden size 16 differs from the teacher's 32")


def test_a_tensor_parallel_size_the_teachers_heads_do_not_allow(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "parallel.tp=4", "parallel.zero_stage=1")
    assert msg.startswith("parallel.tp=4 does not divide the teacher's num_key_value_heads=2")


def test_distillation_keys_on_another_stage(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", stage="pretrain", config=TINY)
    assert msg == "teacher is set but this is the pretrain stage; run `distrib distill`, or remove teacher"
    msg = _refused(capsys, tmp_path, "distill.loss.ce=1", stage="pretrain", config=TINY)
    assert msg.startswith("distill is set but this is the pretrain stage")


def test_finetune_keys_on_distillation(capsys, tmp_path, teacher):
    msg = _refused(capsys, tmp_path, f"teacher={teacher}", "finetune.lora.rank=4")
    assert msg.startswith("finetune.* keys are set but this is the distill stage")
