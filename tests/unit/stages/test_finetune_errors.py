"""Bad fine-tuning input: one line, exit 2, before any worker starts, nothing written."""

import json
from pathlib import Path

import pytest

from distrib.commands.cli import main
from tests.conftest import ROOT

TINY = str(ROOT / "configs/pretrain/tiny.yaml")


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny Hugging Face model directory with its tokenizer, as `save_pretrained` writes it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distrib.config import DataConfig
    from distrib.data import load_or_train_tokenizer

    out = tmp_path_factory.mktemp("hf-base")
    tok = load_or_train_tokenizer(DataConfig(vocab_size=300), ["def f(x):\n    return x\n"] * 20)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def refused(tmp_path, capsys, *args) -> str:
    before = snapshot(tmp_path)
    code = main(["finetune", TINY, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                 *args, "--nproc-per-node", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert snapshot(tmp_path) == before  # nothing created or changed
    return err.removeprefix("distrib: error: ")


def test_init_from_that_does_not_exist(tmp_path, capsys):
    assert refused(tmp_path, capsys, f"init_from={tmp_path / 'nope'}") == (
        f"init_from='{tmp_path / 'nope'}' does not exist; point it at a distrib run directory, a checkpoint or a "
        "Hugging Face model directory")


def test_init_from_that_is_not_a_model(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model")
    assert refused(tmp_path, capsys, f"init_from={empty}") == (
        f"init_from='{empty}' is not a model: no config.json with weights, no hf/ export and no checkpoint; point it "
        "at a distrib run directory, a checkpoint or a Hugging Face model directory")


def test_finetune_without_init_from(tmp_path, capsys):
    assert refused(tmp_path, capsys) == (
        "finetune needs init_from: a distrib run directory (e.g. runs/pretrain-tiny), a checkpoint or a Hugging "
        "Face model directory")


def test_lora_rank_zero(tmp_path, capsys, hf_base):
    assert refused(tmp_path, capsys, f"init_from={hf_base}", "finetune.lora.rank=0") == (
        "finetune.lora.rank=0 must be at least 1; set a rank such as 8, or remove finetune.lora.rank to fine-tune "
        "without LoRA")


def test_unknown_lora_target_lists_the_models_modules(tmp_path, capsys, hf_base):
    assert refused(tmp_path, capsys, f"init_from={hf_base}", "finetune.lora.rank=4",
                   "finetune.lora.target_modules=[qproj]") == (
        "finetune.lora.target_modules: 'qproj' matches no linear module of this llama model; its linear modules "
        "are: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head")


def test_lora_with_tensor_parallelism_names_the_limitation(tmp_path, capsys, hf_base):
    assert refused(tmp_path, capsys, f"init_from={hf_base}", "finetune.lora.rank=4", "parallel.tp=2").startswith(
        "finetune.lora with parallel.tp=2 is not supported: DeepSpeed AutoTP does not split peft's LoRA layers")


def test_frozen_layers_with_tensor_parallelism_names_the_limitation(tmp_path, capsys, hf_base):
    assert refused(tmp_path, capsys, f"init_from={hf_base}", "finetune.train_top_layers=1", "parallel.tp=2") == (
        "frozen parameters (finetune.*) with parallel.tp=2 are not supported: DeepSpeed's converter that merges "
        "tensor-parallel checkpoints handles trained parameters only, so the run could not be exported; use "
        "parallel.tp=1 (ZeRO-3 partitions a large frozen base instead)")


def test_a_tokenizer_that_disagrees_with_the_models_vocabulary(tmp_path, capsys, hf_base):
    from distrib.config import DataConfig
    from distrib.data import load_or_train_tokenizer

    big = tmp_path / "big-tokenizer"
    load_or_train_tokenizer(DataConfig(vocab_size=2000), [f"word{i} " * 3 for i in range(3000)]).save_pretrained(big)
    msg = refused(tmp_path, capsys, f"init_from={hf_base}", f"data.tokenizer={big}")
    assert msg.startswith(f"data.tokenizer='{big}' has ") and msg.endswith(
        "remove data.tokenizer to use the model's own tokenizer")


def test_prompt_field_missing_in_a_jsonl_line_names_file_and_line(tmp_path, capsys, hf_base):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(20)]
    rows[6] = {"question": "p6", "response": "r6"}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = refused(tmp_path, capsys, f"init_from={hf_base}", "data.source=files", f"data.train_files=[{data}]",
                  "data.format=prompt_response")
    assert msg.startswith(f"data.train_files: '{data}' line 7 has no 'prompt' field (data.prompt_field)")
