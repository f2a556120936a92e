"""distrib.commands.generate: continuations equal to transformers' own greedy decoding, from every kind of model
directory a run exports; the KV cache used although exported configs turn it off; bad input in one line."""

import json
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from distrib import data
from distrib.config import ConfigError, DataConfig
from distrib.commands.generate import generate, generation_speed, resolve_model
from tests.helpers import ROOT

PROMPT = "def add(a, b):"
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
         "class Point:\n    def __init__(self, x, y):\n        self.x = x\n"] * 4


def _tokenizer():
    return data.load_or_train_tokenizer(DataConfig(vocab_size=300), TEXTS)


def _model(vocab: int, seed: int = 0, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    """A tiny random Llama whose config, like distrib's exports, says use_cache=False."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init: confident, varied greedy choices
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as distrib leaves it: ``hf/`` with weights and tokenizer."""
    run = tmp_path_factory.mktemp("run")
    tok = _tokenizer()
    _model(len(tok)).save_pretrained(run / "hf")
    tok.save_pretrained(run / "hf")
    return run


def _reference(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             use_cache=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:]
    assert len(new) >= 5, "the reference stopped at once: the test would compare next to nothing"
    return tok.decode(new, skip_special_tokens=True)


def test_greedy_continuation_is_transformers_greedy_decoding(run_dir):
    tok = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    want = _reference(model, tok, PROMPT, 12)
    assert want.strip()
    assert generate(run_dir / "hf", PROMPT, max_new_tokens=12) == want
    assert generate(run_dir, PROMPT, max_new_tokens=12) == want  # a run directory means its hf/
    assert generate(run_dir, PROMPT, max_new_tokens=12, top_p=0.5, seed=7) == want  # greedy ignores both


def test_sampling_is_seeded(run_dir):
    a = generate(run_dir, PROMPT, max_new_tokens=20, temperature=1.5, seed=1)
    assert a == generate(run_dir, PROMPT, max_new_tokens=20, temperature=1.5, seed=1)
    assert a != generate(run_dir, PROMPT, max_new_tokens=20, temperature=1.5, seed=2)


def test_adapter_directory_runs_on_the_base_it_names(run_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(run_dir / "hf")  # records the base path for the adapter
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(run_dir / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    source = resolve_model(tmp_path / "adapter")
    assert (source.weights, source.adapter, source.tokenizer) == (run_dir / "hf", tmp_path / "adapter", run_dir / "hf")
    assert generate(tmp_path / "adapter", PROMPT, max_new_tokens=10) == _reference(peft_model.eval(), tok, PROMPT, 10)

    cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="base model .*gone.*not a model directory"):
        generate(tmp_path / "adapter", PROMPT)


def test_generation_speed_decodes_with_the_kv_cache(run_dir, monkeypatch):
    lengths = []
    forward = LlamaForCausalLM.forward

    def recording(self, *args, **kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", recording)
    speed = generation_speed(run_dir, prompt_tokens=6, new_tokens=5, repeats=3)
    assert speed > 0
    # warm-up + 3 timed runs, each: the prompt once, then one token per step with the cache (exactly 5 new
    # tokens: the end-of-text token does not stop a timing run)
    assert lengths == [6, 1, 1, 1, 1] * 4


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max-new-tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top-p"),
])
def test_bad_arguments_are_config_errors(run_dir, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate(run_dir, PROMPT, **kwargs)


def test_not_a_model_and_missing_tokenizer_are_config_errors(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="not a model directory"):
        generate(tmp_path, PROMPT)
    with pytest.raises(ConfigError, match="does not exist"):
        generate(tmp_path / "absent", PROMPT)
    (tmp_path / "hf").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "hf" / f).write_bytes((run_dir / "hf" / f).read_bytes())
    with pytest.raises(ConfigError, match="has no tokenizer"):
        generate(tmp_path, PROMPT)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "distrib", "generate", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_the_continuation(run_dir):
    proc = _cli(run_dir, "--prompt", PROMPT, "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == generate(run_dir, PROMPT, max_new_tokens=8) + "\n"


@pytest.mark.parametrize("args", [["--prompt", "x"], ["--prompt", "x", "--top-p", "2"]])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, run_dir, args):
    target = tmp_path if args[-1] == "x" else run_dir
    proc = _cli(target, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distrib: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
