"""The streamed export: the same files as the in-memory ``save_pretrained`` export, sharded on request,
tied embeddings stored once; ZeRO partitions gathered per parameter."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from distrib.checkpoint import resolve_checkpoint
from distrib.config import Config
from distrib.checkpoint.export import _gather, _save_config, consolidated_state_dict, export_checkpoint, save_weights
from distrib.model import empty_model, hf_config
from distrib.parallel.engine import torch_dtype


def _in_memory_export(ckpt, out):
    """What the export wrote before it streamed: the whole model consolidated, then ``save_pretrained``."""
    cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    model = empty_model(hf_config(cfg.model, vocab_size=len(tokenizer), seq_len=cfg.data.seq_len))
    model.load_state_dict(consolidated_state_dict(ckpt), strict=False, assign=True)
    model.tie_weights()
    dtype = torch_dtype(cfg.precision)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _logits(model_dir, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits


@pytest.mark.slow
def test_streamed_export_of_the_tiny_run_equals_the_in_memory_export_whole_and_sharded(tiny_pretrained, tmp_path):
    ckpt = resolve_checkpoint(tiny_pretrained)  # ZeRO-2 on 2 ranks, bf16
    reference = _in_memory_export(ckpt, tmp_path / "reference")
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    expected = _logits(reference, ids)

    whole = export_checkpoint(ckpt, tmp_path / "whole")
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in reference.iterdir())
    for f in reference.iterdir():  # the same bytes: weights, config.json, generation_config.json, tokenizer
        assert (whole / f.name).read_bytes() == f.read_bytes(), f.name
    assert torch.equal(_logits(whole, ids), expected)

    sharded = export_checkpoint(ckpt, tmp_path / "sharded", max_shard_size="300KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (sharded / "model.safetensors").exists()
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    stored, total = {}, 0
    for s in shards:
        with safe_open(s, "pt") as f:
            for name in f.keys():
                stored[name] = s.name
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == total
    with safe_open(reference / "model.safetensors", "pt") as f:
        assert set(stored) == set(f.keys())
    assert torch.equal(_logits(sharded, ids), expected)


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(tmp_path):
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    trained = AutoModelForCausalLM.from_config(config)
    state = trained.state_dict()
    loaders = {k: (lambda v=v: v) for k, v in state.items() if k != "lm_head.weight"}  # as a ZeRO checkpoint holds them
    skeleton = empty_model(config).to(torch.bfloat16)
    out = tmp_path / "streamed"
    out.mkdir()
    _save_config(skeleton, out, torch.bfloat16)
    files = save_weights(out, skeleton, loaders, torch.bfloat16, max_shard_size="8KB")
    assert len(files) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"] and "model.embed_tokens.weight" in index["weight_map"]

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    trained.to(torch.bfloat16).save_pretrained(tmp_path / "saved", max_shard_size="8KB")
    for f in (tmp_path / "saved").iterdir():  # save_pretrained's files, byte for byte
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    ids = torch.randint(0, 96, (1, 12))
    assert torch.equal(_logits(out, ids), _logits(tmp_path / "saved", ids))


def test_a_parameter_is_gathered_across_rank_partitions():
    # ZeRO-1/2: one flat vector per group, cut into consecutive rank partitions; a parameter may span several
    flat = torch.arange(20, dtype=torch.float32)
    parts = list(flat.split([7, 7, 6]))
    for start, n in [(0, 20), (3, 4), (5, 9), (7, 7), (14, 6), (19, 1)]:
        out = torch.empty(n)
        _gather(parts, start, out)
        assert torch.equal(out, flat[start:start + n])


# -- durability of the checkpoint an export reads: each rank syncs what it wrote ----------------------

def _deepspeed_names(dp_rank, tp_rank, zero_stage):
    """The files DeepSpeed writes for one rank (bf16 optimizer names; ZeRO-3 shards the model states too)."""
    names = [f"bf16_zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"]
    if zero_stage == 3:
        names.append(f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_model_states.pt")
    elif dp_rank == 0:
        names.append(f"mp_rank_{tp_rank:02d}_model_states.pt")
    return names


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_every_rank_fsyncs_the_files_it_wrote_before_the_checkpoint_is_published(tmp_path, monkeypatch, zero_stage):
    import os
    import threading

    from distrib.checkpoint import Checkpointer, TrainState, latest_checkpoint
    from distrib.config import load_config
    from tests.helpers import TINY

    dp, tp = 3, 2
    world = dp * tp
    gate = threading.Barrier(world)
    flags = []
    local = threading.local()

    class Topo:
        def __init__(self, rank):
            self.rank, self.is_main, self.dp, self.tp, self.world_size = rank, rank == 0, dp, tp, world

        def barrier(self):
            gate.wait()

        def any(self, flag):
            flags.append(flag)
            gate.wait()
            result = any(flags)
            gate.wait()
            return result

    class Engine:
        module = object()

        def save_checkpoint(self, root, tag, client_state, save_latest, exclude_frozen_parameters=False):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)
            for name in _deepspeed_names(local.rank // tp, local.rank % tp, zero_stage):
                (Path(root) / tag / name).write_bytes(b"shard")

    class Tokenizer:
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "tokenizer.json").write_text("{}")

    synced = {r: [] for r in range(world)}
    real_fsync = os.fsync

    def fsync(fd):
        synced[local.rank].append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    cfg = load_config(TINY, [f"output_dir={tmp_path}"])
    root = tmp_path / "checkpoints"
    errors = []

    def rank_main(rank):
        local.rank = rank
        try:
            Checkpointer(root, Topo(rank), cfg, Tokenizer()).save(Engine(), TrainState(step=7))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            gate.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    final = latest_checkpoint(root)
    tmp = f"{root}/{final.name}.tmp"
    for rank in range(world):
        dp_rank, tp_rank = divmod(rank, tp)
        own = {f"{tmp}/{n}" for n in _deepspeed_names(dp_rank, tp_rank, zero_stage)} | {f"{tmp}/rng/rank_{rank:05d}.pt"}
        files = {p for p in synced[rank] if Path(p.replace(tmp, str(final))).is_file()}
        if rank == 0:  # its shard, and the shared files, the directories (before the rename) and the root (after)
            own |= {f"{tmp}/trainer_state.json", f"{tmp}/config.yaml", f"{tmp}/tokenizer/tokenizer.json"}
            assert {tmp, f"{tmp}/rng", f"{tmp}/tokenizer", str(root)} <= set(synced[0])
        assert files == own, rank  # its own files, each synced at its .tmp path: before the publish
    every = {str(p).replace(str(final), tmp) for p in final.rglob("*") if p.is_file()}
    assert every == {p for r in synced for p in synced[r] if Path(p.replace(tmp, str(final))).is_file()}
