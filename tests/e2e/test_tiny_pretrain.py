"""The README's main job: configs/pretrain/tiny.yaml on 2 processes, as shipped."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import metrics

pytestmark = pytest.mark.slow


def test_tiny_config_learns_the_builtin_corpus_in_minutes(tiny_pretrained):
    out = tiny_pretrained
    rows = [r for r in metrics(out) if "time" in r]
    minutes = (rows[-1]["time"] - rows[0]["time"]) / 60
    evals = {r["step"]: r["eval_loss"] for r in metrics(out) if "eval_loss" in r}
    print(f"tiny.yaml: {minutes:.1f} min, eval loss {evals[0]:.3f} -> {evals[200]:.3f}")
    assert evals[200] < evals[0] - 2.0  # from ~ln(4096)=8.3 to below ~5 nats on held-out stdlib code
    assert evals[200] < min(evals[s] for s in evals if s <= 100)  # and still improving in the second half
    records = [r for r in metrics(out) if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= records[-1].keys()
    # MFU is relative to a measured matmul peak: a fraction, though a noisy machine can push a step past it
    mfu = sorted(r["mfu"] for r in records)
    assert 0 < mfu[len(mfu) // 2] < 1
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tok = AutoTokenizer.from_pretrained(out / "hf")
    ids = tok("import os\nimport sys\n\ndef main(", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
