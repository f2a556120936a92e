"""Pretraining as users run it: 1-2 CPU processes with gloo, compared against each other."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distrib.data import GlobalBatchSampler
from tests.helpers import (ROOT, TINY, assert_universal_as_deepspeed_writes, export_matches_final_eval, losses, metrics,
                           prepared, run_distrib, small)

pytestmark = pytest.mark.slow

# fp32 on CPU: the only differences between layouts are reduction orders (all-reduce of 2 partial
# gradients vs. one sum), a few ulps that Adam carries forward over 6 steps.
RTOL = 1e-4


ZERO_LAYOUTS = {
    "zero0": ["parallel.zero_stage=0"],
    "zero1": ["parallel.zero_stage=1"],
    "zero2": ["parallel.zero_stage=2"],
    "zero3": ["parallel.zero_stage=3"],
    "zero2-offload-optimizer": ["parallel.zero_stage=2", "parallel.offload_optimizer=true"],
    "zero3-offload-all": ["parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_params=true"],
    "zero2-activation-checkpointing": ["parallel.zero_stage=2", "model.activation_checkpointing=true"],
}


@pytest.mark.parametrize("layout", ZERO_LAYOUTS)
def test_zero_stage_on_2_processes_matches_1_process(tmp_path, data_cache, reference, layout):
    out = tmp_path / "run"
    run_distrib(*small(out, data_cache, *ZERO_LAYOUTS[layout]), nproc=2)
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=RTOL)
    # evaluation sees the same validation blocks at any dp size
    ref_eval = {r["step"]: r["eval_loss"] for r in metrics(reference) if "eval_loss" in r}
    got_eval = {r["step"]: r["eval_loss"] for r in metrics(out) if "eval_loss" in r}
    assert ref_eval.keys() == got_eval.keys() == {0, 3, 6}
    np.testing.assert_allclose(list(got_eval.values()), list(ref_eval.values()), rtol=RTOL)


def _weights(out):
    return load_file(str(out / "hf" / "model.safetensors"))


@pytest.mark.parametrize("stage", [1, 3])
def test_stopped_and_resumed_run_is_bitwise_identical_to_uninterrupted(tmp_path, data_cache, stage):
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ("model.dropout=0.1", f"parallel.zero_stage={stage}", "checkpoint.every_steps=100")
    run_distrib(*small(whole, data_cache, *args), nproc=2)
    first = run_distrib(*small(split, data_cache, *args, "train.exit_after_steps=4"), nproc=2)
    assert "stopping early at step 4" in first.stderr
    assert (split / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not (split / "hf").exists()
    run_distrib(*small(split, data_cache, *args), nproc=2)

    assert losses(split) == losses(whole)  # exact, step for step
    a, b = _weights(whole), _weights(split)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_at_smaller_data_parallel_size_sees_each_sample_once(tmp_path, data_cache):
    out, whole = tmp_path / "run", tmp_path / "whole"
    args = ("parallel.zero_stage=2", "data.trace_samples=true", "train.exit_after_steps=3")
    run_distrib(*small(out, data_cache, *args), nproc=2)
    run_distrib(*small(out, data_cache, "parallel.zero_stage=2", "data.trace_samples=true"), nproc=1)
    run_distrib(*small(whole, data_cache, "parallel.zero_stage=2"), nproc=2)

    by_step: dict[int, list[int]] = {}
    for f in (out / "trace").glob("samples-rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], []).extend(rec["indices"])
    assert sorted(by_step) == list(range(6))
    # the data position is a global sample index: each step consumes exactly its 8 positions
    latest = (out / "checkpoints" / "latest").read_text()
    state = json.loads((out / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["samples_seen"] == 6 * 8 and state["dp"] == 1
    consumed = [i for s in sorted(by_step) for i in by_step[s]]
    assert len(consumed) == len(set(consumed)) == 48  # nothing repeated, nothing skipped
    num_samples = len(prepared(out).train)
    sampler = GlobalBatchSampler(num_samples, 8, 2, 1, 0, seed=1234)
    for step, got in by_step.items():
        assert sorted(got) == sorted(sampler.dataset_index(p) for p in sampler.positions(step))
    # and training continued from the same state: losses follow the uninterrupted 2-process run
    ref, got = losses(whole), losses(out)
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], rtol=RTOL)


def test_resume_at_larger_data_parallel_size_converts_on_every_rank_and_continues(tmp_path, data_cache, reference):
    """1 -> 2 processes at ZeRO-2: both new ranks convert the checkpoint to the universal format, each its
    share, into what DeepSpeed's converter writes, and training continues as the unsharded reference."""
    out = tmp_path / "run"
    run_distrib(*small(out, data_cache, "parallel.zero_stage=2", "train.exit_after_steps=3"), nproc=1)
    run_distrib(*small(out, data_cache, "parallel.zero_stage=2"), nproc=2)
    state = json.loads((out / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["dp"] == 2
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], rtol=RTOL)
    assert_universal_as_deepspeed_writes(out / "checkpoints" / "step_00000003", tmp_path / "alone")


def test_export_loads_in_transformers_and_reproduces_the_trained_model(tmp_path, data_cache):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    # Weights split into files of at most 200KB, the two ranks writing them in turn.
    run_distrib(*small(out, data_cache, "parallel.zero_stage=3", "export.max_shard_size=200KB"), nproc=2)
    files = sorted(p.name for p in (out / "hf").glob("model-*.safetensors"))
    assert len(files) >= 2 and (out / "hf" / "model.safetensors.index.json").is_file(), files
    tok = AutoTokenizer.from_pretrained(out / "hf")
    text = "def f(x):\n    return x"
    assert tok.decode(tok(text)["input_ids"]) == text
    # the trained model was ZeRO-3-sharded; the export must reproduce its final eval loss
    exported, trained = export_matches_final_eval(out)
    assert exported == pytest.approx(trained, rel=1e-5)
    # `distrib export` on the same checkpoint, one process, the run's shard size: the same files, byte for byte
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "distrib", "export", str(out / "checkpoints" / "step_00000006"),
                           str(again)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in (out / "hf").iterdir())
    for name in [*files, "model.safetensors.index.json", "config.json"]:
        assert (again / name).read_bytes() == (out / "hf" / name).read_bytes(), name


LOGITS_PROBE = """
import sys, torch
from pathlib import Path
from distrib.launch.env import detect
from distrib.config import load_config
from distrib.stages import stage_class
from distrib.parallel.topology import Topology
from distrib.train.trainer import Trainer
from distrib.data import collate
from transformers import AutoModelForCausalLM

cfg = load_config(sys.argv[1], sys.argv[3:])
detect().export()
topo = Topology.init()
trainer = Trainer(cfg, topo, stage_class("pretrain")())
trainer.fit()
batch = collate(trainer.data.validation, range(4))["input_ids"]
with torch.no_grad():
    trained = trainer.engine.module(input_ids=batch).logits
    exported = AutoModelForCausalLM.from_pretrained(Path(cfg.output_dir) / "hf")(input_ids=batch).logits
torch.testing.assert_close(exported, trained, rtol=0, atol=0)
print("LOGITS-MATCH", tuple(trained.shape))
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_exported_logits_equal_the_trained_engine_logits(tmp_path, data_cache, precision):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", LOGITS_PROBE, TINY, "--",
                           *small(out, data_cache, f"precision={precision}", "parallel.zero_stage=2")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert "LOGITS-MATCH" in proc.stdout, proc.stderr[-4000:]


def test_pretraining_continues_from_a_local_hf_directory(tmp_path, data_cache, reference):
    """model.pretrained + data.tokenizer: start from an exported model (here the reference's), weights and all."""
    out = tmp_path / "continued"
    hf = reference / "hf"
    run_distrib(*small(out, data_cache, f"model.pretrained={hf}", f"data.tokenizer={hf}", "train.max_steps=3"), nproc=2)
    start = [r for r in metrics(out) if r["step"] == 0][0]["eval_loss"]
    final_of_source = [r for r in metrics(reference) if r["step"] == 6][0]["eval_loss"]
    assert start == pytest.approx(final_of_source, rel=1e-5)
    assert losses(out)[1] < losses(reference)[1]  # the first batch already meets trained weights
