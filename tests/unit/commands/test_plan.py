"""`distrib plan`: memory/batch planning for the shipped cluster configs, checked against DeepSpeed's own estimators.

DeepSpeed's ``*_all_cold`` estimators print a table (per CPU | per GPU | options) and return None; the
tests capture and parse that table, and use the numeric ``estimate_zero{2,3}_model_states_mem_needs``
helpers (which the tables are made from) where exact bytes are needed. The estimators know nothing of
tensor parallelism: for tp > 1 they are fed one tp rank's model (P/tp parameters, largest layer / tp)
over the data-parallel group, which is what ZeRO partitions.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from distrib.config import ConfigError, load_config
from distrib.commands.plan import DEFAULT_SUB_GROUP_SIZE, GIB, activation_bytes, format_plan, plan

zero_1_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
zero_3 = pytest.importorskip("deepspeed.runtime.zero.stage3")

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "pretrain"


def _cfg(name: str, *overrides: str):
    return load_config(CONFIGS / f"{name}.yaml", list(overrides))


def _ds_table(fn, *args, **kwargs) -> dict[str, tuple[float, float]]:
    """Run a DeepSpeed ``*_all_cold`` estimator; {options: (cpu GiB, gpu GiB)} from the table it prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert fn(*args, **kwargs) is None  # it only prints
    rows = {}
    for line in out.getvalue().splitlines():
        parts = [x.strip() for x in line.split("|")]
        if len(parts) == 3 and parts[0].endswith("GB"):
            cpu, gpu, options = parts
            # the device prints as "cpu " or "OffloadDeviceEnum.cpu" depending on the Python version
            options = " ".join(options.replace("OffloadDeviceEnum.", "").split()).replace(" ,", ",")
            rows[options] = (float(cpu[:-2]), float(gpu[:-2]))
    return rows


def _ds_layout(p):
    """(total params, largest layer, gpus per node, nodes) of the model ZeRO partitions, as DeepSpeed sees it."""
    per_node = max(1, min(p.gpus_per_node, p.world_size) // p.tp)
    return p.n_params / p.tp, p.largest_layer_params / p.tp, per_node, p.dp // per_node


# -- agreement with DeepSpeed's estimators --------------------------------------------------


@pytest.mark.parametrize("world_size", [8, 64])
def test_1b_zero2_model_states_agree_with_deepspeed_zero2_estimator(world_size):
    p = plan(_cfg("llama-1b"), world_size)
    assert p.zero_stage == 2 and p.tp == 1
    total, _, per_node, nodes = _ds_layout(p)
    table = _ds_table(zero_1_2.estimate_zero2_model_states_mem_needs_all_cold, total, per_node, nodes)
    _, ds_gpu_gib = table["offload_optimizer=none"]
    ours_gib = p.gpu.model_states / GIB
    assert ours_gib == pytest.approx(ds_gpu_gib, rel=0.10)
    # ZeRO-2 accounting is the same as DeepSpeed's (2 P + 18 P / N), to the byte.
    _, ds_gpu = zero_1_2.estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)
    assert p.gpu.model_states == pytest.approx(ds_gpu, rel=1e-6)


def test_7b_zero3_on_64_ranks_agrees_with_deepspeed_zero3_estimator():
    p = plan(_cfg("llama-7b"), world_size=64, gpus_per_node=8)
    assert (p.zero_stage, p.tp, p.dp, p.num_nodes) == (3, 1, 64, 8)
    total, largest, per_node, nodes = _ds_layout(p)
    assert (per_node, nodes) == (8, 8)
    table = _ds_table(zero_3.estimate_zero3_model_states_mem_needs_all_cold, total, largest, per_node, nodes)
    _, ds_gpu_gib = table["offload_param=none, offload_optimizer=none, zero_init=1"]
    ours_gib = p.gpu.model_states / GIB
    assert ours_gib == pytest.approx(ds_gpu_gib, rel=0.10)
    # The ZeRO-3 largest-layer working memory is the same term DeepSpeed adds: 4 B x the embedding (32000 x 4096).
    assert p.largest_layer_params == 32000 * 4096
    assert p.gpu.gathered == 4 * 32000 * 4096


def test_70b_tp8_zero2_agrees_with_deepspeed_zero2_estimator_on_the_tp_rank_model():
    p = plan(_cfg("llama-70b"), world_size=64, gpus_per_node=8)
    assert (p.zero_stage, p.tp, p.dp) == (2, 8, 8)
    total, _, per_node, nodes = _ds_layout(p)
    table = _ds_table(zero_1_2.estimate_zero2_model_states_mem_needs_all_cold, total, per_node, nodes)
    _, ds_gpu_gib = table["offload_optimizer=none"]
    assert p.gpu.model_states / GIB == pytest.approx(ds_gpu_gib, rel=0.10)


@pytest.mark.parametrize("name,world_size", [("llama-7b", 64), ("llama-7b", 512), ("llama-70b", 64), ("llama-70b", 512)])
def test_zero3_gap_to_deepspeed_estimator_is_exactly_the_16bit_shard_it_leaves_out(name, world_size):
    """stage3.py keeps a 16-bit weight shard and a 16-bit gradient buffer (2 + 2 B), fp32 master + Adam (12 B) and
    an fp32 gradient per optimizer sub-group (4 B, at most sub_group_size elements); the estimator uses 18 B.
    Every byte of disagreement is that 2 B x shard, less what the sub-group cap saves."""
    p = plan(_cfg(name, "parallel.zero_stage=3", "parallel.tp=1"), world_size)
    total, largest, per_node, nodes = _ds_layout(p)
    _, ds_gpu, _ = zero_3.estimate_zero3_model_states_mem_needs(
        total, largest, per_node, nodes, cpu_offload=False, cpu_offload_params=False)
    shard = total / p.dp
    expected_gap = 2 * shard - 4 * max(0.0, shard - DEFAULT_SUB_GROUP_SIZE)
    assert p.gpu.model_states - ds_gpu == pytest.approx(expected_gap, rel=1e-6, abs=64)
    assert 0 < p.gpu.model_states / ds_gpu - 1 < 2 / 18 + 1e-9


def test_zero3_offload_gpu_figures_equal_deepspeed_estimator():
    base = plan(_cfg("llama-7b"), 64)
    total, largest, per_node, nodes = _ds_layout(base)
    table = _ds_table(zero_3.estimate_zero3_model_states_mem_needs_all_cold, total, largest, per_node, nodes)

    opt = plan(_cfg("llama-7b", "parallel.offload_optimizer=true"), 64)
    assert opt.gpu.optimizer == 0 and opt.gpu.grads == 0
    assert opt.gpu.model_states / GIB == pytest.approx(table["offload_param=none, offload_optimizer=cpu, zero_init=1"][1], abs=0.01)
    assert opt.cpu.optimizer == pytest.approx(12 * total / 64)

    both = plan(_cfg("llama-7b", "parallel.offload_optimizer=true", "parallel.offload_params=true"), 64)
    assert both.gpu.params == 0 and both.cpu.params == pytest.approx(2 * total / 64)
    assert both.gpu.model_states / GIB == pytest.approx(table["offload_param=cpu, offload_optimizer=cpu, zero_init=1"][1], abs=0.01)
    assert both.cpu_bytes_per_node == pytest.approx(8 * both.cpu.total)


def test_1b_zero2_offload_leaves_only_16bit_weights_on_gpu_like_deepspeed():
    p = plan(_cfg("llama-1b", "parallel.offload_optimizer=true"), 8)
    _, ds_gpu = zero_1_2.estimate_zero2_model_states_mem_needs(p.n_params, 8, 1, cpu_offload=True)
    assert p.gpu.model_states == pytest.approx(ds_gpu, rel=1e-6)
    assert p.cpu.optimizer == pytest.approx(12 * p.n_params / 8) and p.cpu.grads == pytest.approx(4 * p.n_params / 8)


# -- sharding by stage ------------------------------------------------------------------------


def test_each_zero_stage_shards_one_more_model_state():
    n = 64
    by_stage = {s: plan(_cfg("llama-7b", f"parallel.zero_stage={s}"), n) for s in (0, 1, 2, 3)}
    P = by_stage[0].n_params
    s0, s1, s2, s3 = (by_stage[s].gpu for s in (0, 1, 2, 3))
    assert (s0.params, s0.grads, s0.optimizer) == pytest.approx((2 * P, 6 * P, 12 * P))
    assert (s1.params, s1.grads, s1.optimizer) == pytest.approx((2 * P, 2 * P + 4 * P / n, 12 * P / n))
    assert (s2.params, s2.grads, s2.optimizer) == pytest.approx((2 * P, 6 * P / n, 12 * P / n))
    assert (s3.params, s3.grads, s3.optimizer) == pytest.approx((2 * P / n, 6 * P / n, 12 * P / n))
    assert s0.model_states > s1.model_states > s2.model_states > s3.model_states


def test_tensor_parallel_divides_model_states_before_zero():
    tp1 = plan(_cfg("llama-70b", "parallel.tp=1"), 64)
    tp8 = plan(_cfg("llama-70b"), 64)
    assert tp1.dp == 64 and tp8.dp == 8
    # ZeRO-2 keeps whole 16-bit weights on every dp rank; tp divides them first ...
    assert tp8.gpu.params == pytest.approx(tp1.gpu.params / 8)
    # ... while the ZeRO-sharded optimizer state spreads over 64 ranks either way
    assert tp8.gpu.optimizer == pytest.approx(tp1.gpu.optimizer)
    assert tp8.gpu.activations < tp1.gpu.activations


def test_fp32_training_counts_4_byte_weights_and_grads():
    p = plan(_cfg("llama-1b", "precision=fp32"), 8)
    P = p.n_params
    assert p.gpu.params == pytest.approx(4 * P)
    assert p.gpu.grads == pytest.approx(4 * P / 8 + 4 * P / 8)
    assert p.gpu.optimizer == pytest.approx(12 * P / 8)  # DeepSpeed clones its own fp32 master partition
    p0 = plan(_cfg("llama-1b", "precision=fp32", "parallel.zero_stage=0"), 8)
    assert (p0.gpu.grads, p0.gpu.optimizer) == pytest.approx((4 * P, 8 * P))  # plain Adam: m and v only


# -- fit, batch, validation -------------------------------------------------------------------


def test_70b_without_zero_does_not_fit_on_8_ranks_of_80_gib():
    p = plan(_cfg("llama-70b", "parallel.zero_stage=0"), world_size=8, gpu_memory_gib=80)
    assert p.dp == 1
    assert not p.fits
    assert p.gpu.model_states > 80 * GIB


def test_7b_fits_on_64_ranks_of_80_gib():
    p = plan(_cfg("llama-7b"), world_size=64, gpus_per_node=8, gpu_memory_gib=80)
    assert p.fits
    assert p.gpu_required_bytes == pytest.approx(p.gpu.total + 0.10 * 80 * GIB)
    assert p.gpu_required_bytes <= 80 * GIB


def test_fit_depends_on_gpu_memory():
    p = plan(_cfg("llama-7b"), 64, gpu_memory_gib=12)  # ~12 GiB of states and activations + 10% margin
    assert p.gpu.total < 12 * GIB and not p.fits


@pytest.mark.parametrize("name,world_size", [("llama-1b", 8), ("llama-7b", 64), ("llama-70b", 512)])
def test_global_batch_tokens_is_global_batch_size_times_seq_len(name, world_size):
    cfg = _cfg(name)
    p = plan(cfg, world_size)
    assert p.global_batch_tokens == cfg.train.global_batch_size * cfg.data.seq_len
    assert p.global_batch_tokens >= 1_000_000  # millions of tokens per optimizer step
    assert p.dp == world_size // cfg.parallel.tp
    assert p.grad_accum_steps * p.micro_batch_size * p.dp == cfg.train.global_batch_size


def test_world_size_not_divisible_by_tp_raises_config_error():
    with pytest.raises(ConfigError, match="parallel.tp=8"):
        plan(_cfg("llama-70b"), world_size=12)


def test_batch_not_divisible_by_data_parallel_size_raises_config_error():
    with pytest.raises(ConfigError, match="global_batch_size"):
        plan(_cfg("llama-7b"), world_size=24)


def test_unset_vocab_size_with_a_missing_tokenizer_raises_config_error_asking_to_set_it(tmp_path):
    missing = tmp_path / "no-tokenizer"
    cfg = _cfg("llama-7b", "model.vocab_size=null", f"data.tokenizer={missing}")
    with pytest.raises(ConfigError) as e:
        plan(cfg, 64)
    assert str(e.value) == (
        f"model.vocab_size is unset and data.tokenizer={str(missing)!r} is not a directory; point data.tokenizer at a "
        "save_pretrained directory, or set model.vocab_size (e.g. model.vocab_size=32000) to plan"
    )


def test_plan_works_on_the_shipped_tiny_config_with_the_vocab_its_tokenizer_will_have():
    """tiny.yaml leaves model.vocab_size unset: the run trains a BPE of data.vocab_size tokens and sizes the model to it."""
    cfg = _cfg("tiny")
    assert cfg.model.vocab_size is None and cfg.data.tokenizer is None
    p = plan(cfg, world_size=2, gpus_per_node=2, gpu_memory_gib=16)
    assert p.vocab_size == cfg.data.vocab_size == 4096
    assert (p.tp, p.dp, p.zero_stage, p.grad_accum_steps) == (1, 2, 2, 2)
    # untied Llama: embedding + LM head + 4 x (attention 128x128 x2 + 128x64 x2, SwiGLU 3 x 128x352, 2 norms) + final norm
    layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 352 + 2 * 128
    assert p.n_params == 2 * 4096 * 128 + 4 * layer + 128
    assert p.fits
    assert plan(_cfg("tiny", "data.vocab_size=1000"), 2).vocab_size == 1000


def test_plan_cli_on_the_shipped_tiny_config_exits_0(capsys):
    from distrib.commands.cli import main

    assert main(["plan", str(CONFIGS / "tiny.yaml"), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "vocab 4096" in out and "ZeRO-2" in out and "fits      yes" in out


def test_unset_vocab_size_follows_a_local_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<eos>": 26}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(tmp_path / "tok")
    cfg = _cfg("tiny", f"data.tokenizer={tmp_path / 'tok'}")
    assert plan(cfg, 2).vocab_size == 27
    # an explicit model.vocab_size still wins
    assert plan(_cfg("tiny", f"data.tokenizer={tmp_path / 'tok'}", "model.vocab_size=64"), 2).vocab_size == 64


def test_7b_config_has_llama2_7b_parameter_count():
    p = plan(_cfg("llama-7b"), 64)
    assert p.n_params == pytest.approx(6.74e9, rel=0.01)


def test_70b_and_1b_configs_have_their_reference_parameter_counts():
    assert plan(_cfg("llama-70b"), 64).n_params == pytest.approx(68.98e9, rel=0.01)  # Llama-2-70B
    assert plan(_cfg("llama-1b"), 8).n_params == pytest.approx(1.236e9, rel=0.01)  # Llama-3.2-1B


@pytest.mark.parametrize("name", ["llama-1b", "llama-7b", "llama-70b"])
def test_shipped_cluster_configs_are_valid_and_cluster_shaped(name):
    cfg = _cfg(name)
    assert cfg.precision == "bf16"
    assert cfg.model.activation_checkpointing
    assert cfg.model.vocab_size is not None
    assert cfg.data.source == "hub" and cfg.data.name and cfg.data.hub_config
    assert cfg.data.tokenizer
    assert cfg.parallel.zero_stage == (3 if name == "llama-7b" else 2)
    assert cfg.parallel.tp == (8 if name == "llama-70b" else 1)
    assert 100 <= cfg.checkpoint.every_steps <= 1000


# -- activations ------------------------------------------------------------------------------


def test_activation_estimate_follows_korthikanti_formula():
    s, b, h, a, L = 4096, 2, 4096, 32, 32
    full = activation_bytes(seq_len=s, micro_batch=b, hidden=h, heads=a, layers=L, vocab=0)
    assert full == pytest.approx(L * s * b * h * (34 + 5 * a * s / h))
    tp8 = activation_bytes(seq_len=s, micro_batch=b, hidden=h, heads=a, layers=L, vocab=0, tp=8)
    assert tp8 == pytest.approx(L * s * b * h * (10 + 24 / 8 + 5 * a * s / (h * 8)))
    ckpt = activation_bytes(seq_len=s, micro_batch=b, hidden=h, heads=a, layers=L, vocab=0, checkpointing=True)
    assert ckpt == pytest.approx(L * 2 * s * b * h + full / L)
    logits = activation_bytes(seq_len=s, micro_batch=b, hidden=h, heads=a, layers=L, vocab=32000) - full
    assert logits == pytest.approx(s * b * 32000 * 6)


def test_activation_checkpointing_shrinks_planned_activations():
    on = plan(_cfg("llama-7b"), 64)
    off = plan(_cfg("llama-7b", "model.activation_checkpointing=false"), 64)
    assert off.gpu.activations > 10 * on.gpu.activations
    assert on.gpu.model_states == off.gpu.model_states


# -- report -----------------------------------------------------------------------------------


def test_format_plan_reports_memory_table_batch_and_verdict():
    text = format_plan(plan(_cfg("llama-7b"), 64))
    for needle in ("6.74 B parameters", "tp 1 x dp 64", "ZeRO-3", "4,194,304 tokens", "accumulation 8",
                   "parameters", "gradients", "optimizer state", "ZeRO-3 gathered layer", "activations",
                   "overhead", "fits      yes", "GiB"):
        assert needle in text, needle
    assert "fits      NO" in format_plan(plan(_cfg("llama-70b", "parallel.zero_stage=0"), 8))


def test_format_plan_shows_cpu_memory_when_offloading():
    text = format_plan(plan(_cfg("llama-7b", "parallel.offload_optimizer=true"), 64))
    assert "offload optimizer" in text and "CPU per node" in text


def test_distillation_plans_the_teacher_weights_only_and_the_student_cut_from_it(tmp_path):
    """The teacher adds its weights (training precision) per rank, partitioned under ZeRO-3, never gradients
    or optimizer state; a student cut from its layers has the teacher's architecture with fewer layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distrib.config import load_config
    from distrib.commands.plan import plan
    from tests.helpers import ROOT

    teacher = tmp_path / "run" / "hf"  # a run directory with an export, as users point at it
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(teacher)
    n_teacher = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(teacher).parameters())
    distill = str(ROOT / "configs/distill/tiny.yaml")
    zero2 = plan(load_config(distill, [f"teacher={tmp_path / 'run'}", "parallel.zero_stage=2"]), 2)
    zero3 = plan(load_config(distill, [f"teacher={tmp_path / 'run'}", "parallel.zero_stage=3"]), 2)
    assert zero2.teacher_params == n_teacher
    assert zero2.gpu.frozen == 2 * n_teacher  # bf16 weights, whole on every rank
    assert zero3.gpu.frozen == 2 * n_teacher / 2  # partitioned over dp=2
    assert zero2.num_layers == 2 and zero2.hidden_size == 64 and zero2.vocab_size == 1000  # [0, 2] of 4 layers
    per_layer = (n_teacher - zero2.n_params) / 2
    assert per_layer > 0 and zero2.n_params == n_teacher - 2 * per_layer
    assert zero2.gpu.model_states - zero2.gpu.frozen > 0 and zero2.gpu.optimizer == 12 * zero2.n_params / 2  # the student's alone


def test_the_shipped_7b_to_1b_distillation_fits_one_node_of_80_gib_gpus(tmp_path):
    from distrib.config import load_config
    from distrib.model import hf_config
    from distrib.commands.plan import plan
    from tests.helpers import ROOT

    teacher_cfg = load_config(ROOT / "configs/pretrain/llama-7b.yaml")
    hf_config(teacher_cfg.model, seq_len=teacher_cfg.data.seq_len).save_pretrained(tmp_path / "teacher")  # config only
    p = plan(load_config(ROOT / "configs/distill/llama-7b-to-1b.yaml", [f"teacher={tmp_path / 'teacher'}"]), 8)
    assert 6.5e9 < p.teacher_params < 7e9 and 1.0e9 < p.n_params < 1.6e9
    assert p.gpu.frozen == 2 * p.teacher_params / 8  # bf16, partitioned by ZeRO-3 over 8 ranks
    assert p.fits
