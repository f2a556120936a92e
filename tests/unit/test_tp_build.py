"""A model split by tensor parallelism is built empty and each rank fills only its shards: bitwise the
shards of the model built whole (fresh or pretrained), cut by DeepSpeed AutoTP's own partition functions."""

import pytest
import torch
from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

from distrib.config import ModelConfig
from distrib.model import WEIGHT_SOURCE_ATTR, build_model, deferred_weights, hf_config
from distrib.tensor_parallel import _gpt2_to_linear, fill_shards

TP = 2
COLUMN = {"llama": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"), "gpt2": ("mlp.c_fc",)}
ROW = {"llama": ("o_proj", "down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj")}


def _cfg(arch, **kw):
    return ModelConfig(arch=arch, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=96,
                       **kw)


def _split_like_autotp(model, arch, rank):
    """Wrap the projections in AutoTP's training layers as rank ``rank`` of ``TP`` (no process group needed)."""
    layers = []
    for name, module in list(model.named_modules()):
        kind = (LinearLayer if any(name.endswith(s) for s in COLUMN[arch])
                else LinearAllreduce if any(name.endswith(s) for s in ROW[arch]) else None)
        if kind is None or not isinstance(module, torch.nn.Linear):
            continue
        layer = kind(module, None, name=name)  # no group: nothing is cut yet
        layer.tp_world_size, layer.tp_index = TP, rank
        layer._freeze_partition_sizes(layer._orig_weight_shape[0 if kind is LinearLayer else 1])
        layer._tp_partition([layer.weight, layer.bias])  # on meta: only the shapes change, as under AutoTP
        layers.append((name, kind, layer))
    return layers


def _expected(whole, name, kind, part, rank):
    """Rank ``rank``'s part of the whole model's parameter: AutoTP cuts columns on dim 0, rows on dim 1."""
    value = whole[name]
    if part == "bias" and kind is LinearAllreduce:
        return value
    return value.chunk(TP, dim=0 if kind is LinearLayer or part == "bias" else 1)[rank]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_rank_fills_exactly_its_slices_of_the_fresh_init(arch, dtype):
    cfg = _cfg(arch)
    hf = hf_config(cfg, seq_len=32)
    model = build_model(cfg, hf, seed=3, dtype=dtype)
    if arch == "gpt2":
        _gpt2_to_linear(model, TP)
    whole = {n: p.detach().clone() for n, p in model.named_parameters()}
    for rank in range(TP):
        with deferred_weights():
            empty = build_model(cfg, hf, seed=3, dtype=dtype)
        assert all(p.is_meta for p in empty.parameters())
        if arch == "gpt2":
            _gpt2_to_linear(empty, TP)
        shapes = {id(p): tuple(p.shape) for p in empty.parameters()}
        layers = _split_like_autotp(empty, arch, rank)
        assert layers
        fill_shards(empty, getattr(empty, WEIGHT_SOURCE_ATTR), shapes)
        got = dict(empty.named_parameters())
        assert got.keys() == whole.keys()
        split = set()
        for name, kind, _ in layers:
            for part in ("weight", "bias"):
                if f"{name}.{part}" in got:
                    key = f"{name}.{part}"
                    split.add(key)
                    assert torch.equal(got[key], _expected(whole, key, kind, part, rank)), key
                    assert got[key].dtype == dtype
        for key in got.keys() - split:
            assert torch.equal(got[key], whole[key]), key
        # the objects AutoTP and the optimizer hold are the ones filled, with AutoTP's attributes kept
        assert all(hasattr(got[f"{name}.weight"], "_tp_partition") for name, _, _ in layers)


def test_pretrained_weights_are_read_one_tensor_at_a_time(tmp_path):
    cfg = _cfg("gpt2")
    hf = hf_config(cfg, seq_len=32)
    build_model(cfg, hf, seed=5).save_pretrained(tmp_path)
    pre = cfg.model_copy(update={"pretrained": str(tmp_path)})
    whole = build_model(pre, hf_config(pre), dtype=torch.bfloat16)
    _gpt2_to_linear(whole, TP)
    want = {n: p.detach().clone() for n, p in whole.named_parameters()}
    with deferred_weights():
        empty = build_model(pre, hf_config(pre), dtype=torch.bfloat16)
    assert not empty.training  # as from_pretrained leaves it
    _gpt2_to_linear(empty, TP)
    shapes = {id(p): tuple(p.shape) for p in empty.parameters()}
    fill_shards(empty, getattr(empty, WEIGHT_SOURCE_ATTR), shapes)
    got = dict(empty.named_parameters())
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_pretrained_model_without_safetensors_is_built_whole(tmp_path):
    cfg = _cfg("llama")
    model = build_model(cfg, hf_config(cfg, seq_len=32))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    pre = cfg.model_copy(update={"pretrained": str(tmp_path)})
    with deferred_weights():
        loaded = build_model(pre, hf_config(pre))
    assert not any(p.is_meta for p in loaded.parameters())
    assert not hasattr(loaded, WEIGHT_SOURCE_ATTR)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))
