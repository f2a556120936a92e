"""Fine-tuning as users run it: a tiny pretrained base, the other built-in domain, 1-2 CPU processes.

fp32 so that layouts compare to a few ulps and frozen weights compare bitwise.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import TINY, losses, metrics, run_distrib, run_probe, small

pytestmark = pytest.mark.slow

RTOL = 1e-4
PROBE = str(Path(__file__).with_name("finetune_probe.py"))
MODES = {
    "lora": ["finetune.lora.rank=4"],
    "freeze": ["finetune.freeze.embeddings=true", "finetune.freeze.bottom_layers=1"],
}


def _ft(out, cache, base, *extra):
    return small(out, cache, f"init_from={base}", "data.name=prose", "train.max_steps=8", "eval.every_steps=4",
                 "checkpoint.every_steps=4", *extra)


def probe(tmp_path, args, nproc) -> dict:
    return run_probe(PROBE, tmp_path / f"report-{nproc}.json", TINY, args, nproc)


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_cache, base):
    """1 process, ZeRO-0: the unsharded reference of each fine-tuning mode."""
    refs = {}
    for mode, args in MODES.items():
        out = tmp_path_factory.mktemp(f"ref-{mode}")
        run_distrib(*_ft(out, data_cache, base, "parallel.zero_stage=0", *args), stage="finetune")
        refs[mode] = out
    return refs


@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_finetune_on_2_processes_matches_1_process_and_changes_only_what_trains(tmp_path, data_cache, base,
                                                                                references, mode, zero):
    out = tmp_path / "run"
    report = probe(tmp_path, _ft(out, data_cache, base, f"parallel.zero_stage={zero}", *MODES[mode]), nproc=2)
    assert report["n_frozen"] > 0 and report["n_trainable"] > 0
    assert report["frozen_changed"] == []  # every frozen tensor bitwise as it was, on every shard
    assert report["trainable_unchanged"] == []  # every trainable one moved
    ref, got = losses(references[mode]), losses(out)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=RTOL)
    if mode == "lora":
        # peft loads the exported adapter onto the base and gives the trained engine's logits; so does the merged hf/
        assert report["adapter_max_diff"] <= 1e-5 * report["logit_scale"]
        assert report["merged_max_diff"] <= 1e-4 * report["logit_scale"]


def test_loss_weighs_every_target_token_of_the_global_batch_once(tmp_path, data_cache, base):
    """Prompt/response micro-batches hold different numbers of targets: the 2-process gradient of step 1 is the
    gradient of (sum of token losses / number of target tokens) over the whole global batch, computed by hand."""
    from transformers import AutoModelForCausalLM

    from distrib.data import collate
    from distrib.train.trainer import causal_lm_loss
    from tests.helpers import prepared

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 1}.", "response": " " + " ".join(
        str(i + k) for k in range(1 + i % 9))}) + "\n" for i in range(160)))
    args = ("data.source=files", f"data.train_files=[{pairs}]", "data.format=prompt_response", "data.seq_len=32",
            "data.validation_fraction=0.1", "parallel.zero_stage=0", "train.max_steps=1", "eval.at_start=false",
            "grads=true")
    two = probe(tmp_path, small(tmp_path / "two", data_cache, f"init_from={base}", *args), nproc=2)
    one = probe(tmp_path, small(tmp_path / "one", data_cache, f"init_from={base}", *args), nproc=1)
    counts = one["micro_batch_targets"]
    assert len(set(counts)) > 1, counts  # the micro-batches really differ in target tokens

    model = AutoModelForCausalLM.from_pretrained(base / "hf", dtype=torch.float32)
    from distrib.data import GlobalBatchSampler

    data = prepared(tmp_path / "one")
    sampler = GlobalBatchSampler(len(data.train), 8, 8, 1, 0, seed=1234)
    batch = collate(data.train, sampler.micro_batches(0)[0])
    out = causal_lm_loss(model, batch)
    (out.total / out.tokens).backward()
    for name, p in model.named_parameters():
        want = p.grad.numpy()
        np.testing.assert_allclose(np.array(one["grads"][name]), want, rtol=1e-4, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(np.array(two["grads"][name]), want, rtol=1e-4, atol=1e-7, err_msg=name)


def _ckpt_bytes(out) -> int:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return sum(f.stat().st_size for f in (out / "checkpoints" / latest).rglob("*") if f.is_file())


def _optimizer_bytes(out) -> list[int]:
    return [r["optimizer_state_bytes"] for r in json.loads((out / "layout.json").read_text())["ranks"]]


def test_lora_optimizer_state_and_checkpoint_are_a_small_fraction_of_a_full_finetune(tmp_path, data_cache, base):
    lora, full = tmp_path / "lora", tmp_path / "full"
    run_distrib(*_ft(lora, data_cache, base, "parallel.zero_stage=2", *MODES["lora"]), nproc=2, stage="finetune")
    run_distrib(*_ft(full, data_cache, base, "parallel.zero_stage=2"), nproc=2, stage="finetune")
    lora_opt, full_opt = _optimizer_bytes(lora), _optimizer_bytes(full)
    assert all(b > 0 for b in lora_opt + full_opt)
    assert max(lora_opt) < 0.05 * min(full_opt), (lora_opt, full_opt)  # measured from the engine, per rank
    assert _ckpt_bytes(lora) < 0.10 * _ckpt_bytes(full), (_ckpt_bytes(lora), _ckpt_bytes(full))


def test_lora_lowers_validation_loss_on_the_new_domain_and_a_frozen_control_does_not(tmp_path, data_cache, base):
    lora, control = tmp_path / "lora", tmp_path / "control"
    args = ("parallel.zero_stage=2", "train.max_steps=40", "eval.every_steps=10", "train.lr=1e-2")
    run_distrib(*_ft(lora, data_cache, base, *args, "finetune.lora.rank=8",
                     "finetune.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,lm_head]"), nproc=2, stage="finetune")
    run_distrib(*_ft(control, data_cache, base, *args, "finetune.freeze.all=true"), nproc=2, stage="finetune")
    ev = {name: [r["eval_loss"] for r in metrics(run) if "eval_loss" in r] for name, run in
          (("lora", lora), ("control", control))}
    assert ev["lora"][0] == ev["control"][0]  # both start from the same base on the same data
    assert ev["lora"][-1] < ev["lora"][0] - 0.1, ev["lora"]  # 10% lower perplexity on prose
    print(f"prose validation loss: base {ev['lora'][0]:.3f}, LoRA {ev['lora'][-1]:.3f}, control {ev['control'][-1]:.3f}")
    assert ev["control"] == [ev["control"][0]] * len(ev["control"]), ev["control"]


def test_finetune_resumes_bitwise(tmp_path, data_cache, base):
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ("parallel.zero_stage=2", "train.max_steps=24", "checkpoint.every_steps=100", *MODES["lora"])
    run_distrib(*_ft(whole, data_cache, base, *args), nproc=2, stage="finetune")
    run_distrib(*_ft(split, data_cache, base, *args, "train.exit_after_steps=6"), nproc=2, stage="finetune")
    run_distrib(*_ft(split, data_cache, base, *args), nproc=2, stage="finetune")
    assert losses(split) == losses(whole) and sorted(losses(whole)) == list(range(1, 25))
    for name in ("adapter/adapter_model.safetensors", "hf/model.safetensors"):
        assert (split / name).read_bytes() == (whole / name).read_bytes(), name


def test_resume_onto_a_changed_base_is_refused_in_one_line(tmp_path, data_cache, base):
    import shutil

    mine = tmp_path / "base-copy"
    shutil.copytree(base / "hf", mine)
    out = tmp_path / "run"
    args = ("parallel.zero_stage=1", *MODES["lora"], "train.exit_after_steps=4")
    run_distrib(*_ft(out, data_cache, mine, *args), nproc=2, stage="finetune")
    weights = mine / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(raw))
    before = sorted(p.name for p in out.rglob("*"))
    proc = run_distrib(*_ft(out, data_cache, mine, *args), nproc=2, stage="finetune", check=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("distrib: error:")]
    assert len(err) == 1 and err[0].startswith(f"distrib: error: the base model {mine} has changed since step_00000004")
    assert sorted(p.name for p in out.rglob("*")) == before


def test_lora_with_cpu_offload_matches_the_reference(tmp_path, data_cache, base, references):
    out = tmp_path / "run"
    run_distrib(*_ft(out, data_cache, base, "parallel.zero_stage=2", "parallel.offload_optimizer=true",
                     *MODES["lora"]), nproc=2, stage="finetune")
    ref, got = losses(references["lora"]), losses(out)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=RTOL)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
