"""A model split by tensor parallelism is built empty and each rank fills only its shards: bitwise the
shards of the model built whole (fresh or pretrained, a trained model or a distillation teacher), cut by
DeepSpeed AutoTP's own partition functions; from pretrained files, a rank reads only its shards' bytes."""

import pytest
import safetensors
import torch
from deepspeed import comm as dist
from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, SubParamLinearLayer
from deepspeed.module_inject.tp_shard import AutoTPMeta

from distrib.config import Config, ModelConfig
from distrib.model import WEIGHT_SOURCE_ATTR, build_model, deferred_weights, hf_config
from distrib.stages.distill import DistillStage
from distrib.parallel.deepspeed_compat import shard_part
from distrib.parallel.tensor_parallel import _gpt2_to_linear, fill_shards

TP = 2
COLUMN = {"llama": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"), "gpt2": ("mlp.c_fc",)}
ROW = {"llama": ("o_proj", "down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj")}
#: Column-parallel as sub-parameters [q; k; v], each split on its own (the plan of distrib.parallel.tensor_parallel).
FUSED_QKV = {"llama": (), "gpt2": ("attn.c_attn",)}
SIZES = {
    "llama": {"arch": "llama"},
    "gpt2": {"arch": "gpt2"},
    # every split uneven at tp=2: 3 kv heads (q, k, v and o split 2:1 on heads), an odd FFN and vocabulary
    "llama-uneven": {"arch": "llama", "hidden_size": 96, "num_heads": 6, "num_kv_heads": 3,
                     "intermediate_size": 129, "vocab_size": 97},
}


def _cfg(variant, **kw):
    sizes = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "vocab_size": 96}
    return ModelConfig(**{**sizes, **SIZES[variant], **kw})


class _Rank:
    """Stands for the tensor-parallel group as rank ``index`` of ``TP`` sees it (no process group needed)."""

    def __init__(self, index: int):
        self.index = index


@pytest.fixture(autouse=True)
def _tp_groups(monkeypatch):
    """AutoTP's layers built over a :class:`_Rank` split exactly as over a real group of ``TP`` ranks."""
    size, rank = dist.get_world_size, dist.get_rank
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: TP if isinstance(group, _Rank) else size(group))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: group.index if isinstance(group, _Rank) else rank(group))


def _split_like_autotp(model, arch, rank, column=LinearLayer):
    """Wrap the projections in AutoTP's training layers as rank ``rank`` of ``TP``: they split the parameters
    (real ones as AutoTP splits a model built whole; meta ones in shape only, as inside the engine)."""
    arch = arch.split("-")[0]
    group, meta = _Rank(rank), AutoTPMeta.from_model_config(model.config)
    layers = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        if any(name.endswith(s) for s in FUSED_QKV[arch]):
            layer = SubParamLinearLayer(module, group, shape=(3, -1), partition_dim=0, name=name, tp_meta=meta)
        elif any(name.endswith(s) for s in COLUMN[arch]):
            layer = column(module, group, name=name, tp_meta=meta)
        elif any(name.endswith(s) for s in ROW[arch]):
            layer = LinearAllreduce(module, group, name=name, tp_meta=meta)
        else:
            continue
        layers.append((name, layer))
    return layers


def _expected(whole, key, layer, rank):
    """Rank ``rank``'s part of an evenly split parameter, computed without AutoTP: columns cut on dim 0, rows
    on dim 1 (their bias whole), each third of a fused q/k/v on dim 0."""
    value = whole[key]
    if isinstance(layer, SubParamLinearLayer):
        return torch.cat([third.chunk(TP, dim=0)[rank] for third in value.chunk(3, dim=0)])
    if isinstance(layer, LinearAllreduce):
        return value if key.endswith("bias") else value.chunk(TP, dim=1)[rank]
    return value.chunk(TP, dim=0)[rank]


def _whole_split(model, arch, rank, unsplit=None):
    """``model`` (built whole) split as rank ``rank``: what a rank filling its shards must hold, bitwise
    (its values before the split, in the layout trained, put in ``unsplit``)."""
    if arch == "gpt2":
        _gpt2_to_linear(model, TP)
    if unsplit is not None:
        unsplit.update({n: p.detach().clone() for n, p in model.named_parameters()})
    _split_like_autotp(model, arch, rank)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _fill_empty(empty, arch, rank):
    """Split ``empty`` (built on the meta device) as rank ``rank`` and fill it; its split layers and each
    parameter's part (``None``: not split, or cut from the whole value by AutoTP's function)."""
    assert all(p.is_meta for p in empty.parameters())
    if arch == "gpt2":
        _gpt2_to_linear(empty, TP)
    shapes = {id(p): tuple(p.shape) for p in empty.parameters()}
    layers = _split_like_autotp(empty, arch, rank)
    parts = {n: shard_part(p, shapes[id(p)]) for n, p in empty.named_parameters()}
    fill_shards(empty, getattr(empty, WEIGHT_SOURCE_ATTR), shapes)
    return layers, parts


def _assert_bitwise(got: dict, want: dict, dtype: torch.dtype) -> None:
    """The shards filled in place equal those of the model built whole and split, bit for bit."""
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
        assert got[name].dtype == dtype and got[name].is_contiguous(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["llama", "gpt2", "llama-uneven"])
def test_each_rank_fills_exactly_its_slices_of_the_fresh_init(variant, dtype):
    cfg = _cfg(variant)
    arch = cfg.arch
    hf = hf_config(cfg, seq_len=32)
    for rank in range(TP):
        unsplit = {}
        want = _whole_split(build_model(cfg, hf, seed=3, dtype=dtype), arch, rank, unsplit)
        with deferred_weights():
            empty = build_model(cfg, hf, seed=3, dtype=dtype)
        layers, parts = _fill_empty(empty, arch, rank)
        assert layers
        got = dict(empty.named_parameters())
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
            assert got[key].dtype == dtype and got[key].is_contiguous(), key
        split = {f"{name}.{part}": layer for name, layer in layers for part in ("weight", "bias")
                 if hasattr(got.get(f"{name}.{part}"), "_tp_partition")}
        assert {n for n, part in parts.items() if part is not None} == split.keys()  # every split one, by ranges
        if variant != "llama-uneven":  # and those ranges are the even split, found without AutoTP too
            for key, layer in split.items():
                assert torch.equal(got[key], _expected(unsplit, key, layer, rank)), key
        else:
            assert any(got[n].numel() * TP != unsplit[n].numel() for n in split)  # uneven indeed
        # the objects AutoTP and the optimizer hold are the ones filled, with AutoTP's attributes kept
        assert all(hasattr(got[f"{name}.weight"], "_tp_partition") for name, _ in layers)


@pytest.fixture
def reads(monkeypatch):
    """``safetensors.safe_open`` recording, per tensor key, each read: ``("whole" | "slice", bytes held)``."""
    real = safetensors.safe_open
    log: dict[str, list[tuple[str, int]]] = {}

    def held(key, how, t):
        log.setdefault(key, []).append((how, t.untyped_storage().nbytes()))
        return t

    class Slice:
        def __init__(self, inner, key):
            self.inner, self.key = inner, key

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, index):
            return held(self.key, "slice", self.inner[index])

    class Open:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            return held(key, "whole", self.f.get_tensor(key))

        def get_slice(self, key):
            return Slice(self.f.get_slice(key), key)

    monkeypatch.setattr(safetensors, "safe_open", Open)
    return log


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["llama", "gpt2", "llama-uneven"])
def test_each_rank_reads_only_its_slices_of_the_pretrained_files(tmp_path, reads, variant, dtype):
    cfg = _cfg(variant)
    arch = cfg.arch
    build_model(cfg, hf_config(cfg, seq_len=32), seed=5).save_pretrained(tmp_path)  # fp32 files
    pre = cfg.model_copy(update={"pretrained": str(tmp_path)})
    for rank in range(TP):
        want = _whole_split(build_model(pre, hf_config(pre), dtype=dtype), arch, rank)
        with deferred_weights():
            empty = build_model(pre, hf_config(pre), dtype=dtype)
        assert not empty.training  # as from_pretrained leaves it
        keys = {n: key for n, (_, key) in getattr(empty, WEIGHT_SOURCE_ATTR).files.items()}
        reads.clear()
        layers, parts = _fill_empty(empty, arch, rank)
        got = dict(empty.named_parameters())
        _assert_bitwise(got, want, dtype)
        split = {n for n, p in got.items() if hasattr(p, "_tp_partition")}
        n_split = {"llama": 7 * 2 + 1, "gpt2": (2 + 2 + 1 + 1) * 2}[arch]  # projections (+ biases), lm_head
        assert len(split) == n_split and {n for n, part in parts.items() if part is not None} == split
        for name, p in got.items():
            log = reads[keys[name]]
            if name in split:
                # read in slices alone (one per range: q, k and v of GPT-2's c_attn), holding exactly the
                # shard's bytes of the fp32 file: never the whole tensor, nor a view of it
                assert {how for how, _ in log} == {"slice"}, (name, log)
                assert len(log) == len(parts[name][1]) and sum(n for _, n in log) == p.numel() * 4, (name, log)
            else:
                assert log == [("whole", p.numel() * 4)], (name, log)


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


class _OwnSplit(LinearLayer):
    """A column layer partitioning its own way (rank r takes the other ranks' rows): not a known range."""

    @torch.no_grad()
    def _tp_partition(self, params_list):
        for param in params_list:
            if param is not None:
                param.data = self.move(param.split(self._partition_sizes, dim=0)[TP - 1 - self.tp_index]).detach()


def test_a_layer_partitioning_its_own_way_gets_its_own_cut_of_the_whole_value(tmp_path, reads):
    cfg = _cfg("llama")
    build_model(cfg, hf_config(cfg, seq_len=32), seed=5).save_pretrained(tmp_path)
    pre = cfg.model_copy(update={"pretrained": str(tmp_path)})
    whole = build_model(pre, hf_config(pre))
    _split_like_autotp(whole, "llama", 0, column=_OwnSplit)
    want = {n: p.detach().clone() for n, p in whole.named_parameters()}
    with deferred_weights():
        empty = build_model(pre, hf_config(pre))
    shapes = {id(p): tuple(p.shape) for p in empty.parameters()}
    _split_like_autotp(empty, "llama", 0, column=_OwnSplit)
    reads.clear()
    fill_shards(empty, getattr(empty, WEIGHT_SOURCE_ATTR), shapes)
    got = dict(empty.named_parameters())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert shard_part(got[q], shapes[id(got[q])]) is None and [how for how, _ in reads[q]] == ["whole"]
    assert [how for how, _ in reads["model.layers.0.self_attn.o_proj.weight"]] == ["slice"]
    for name in want:
        assert torch.equal(got[name], want[name]), name
    full = build_model(pre, hf_config(pre)).state_dict()[q]
    assert torch.equal(got[q], full.chunk(TP)[TP - 1])  # the layer's own cut, not the usual one


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_teacher_split_by_tensor_parallelism_is_built_empty_and_filled_with_its_files_shards(tmp_path, reads,
                                                                                               arch, dtype):
    model_cfg = _cfg(arch)
    build_model(model_cfg, hf_config(model_cfg, seq_len=32), seed=7).save_pretrained(tmp_path)
    cfg = Config.model_validate({"teacher": str(tmp_path)})
    stage = DistillStage()

    # tp = 1: loaded whole from its files as before, frozen
    whole = stage.build_frozen(cfg, dtype)["teacher"]
    assert not hasattr(whole, WEIGHT_SOURCE_ATTR) and not whole.training
    assert not any(p.is_meta or p.requires_grad for p in whole.parameters())
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        files = {k: f.get_tensor(k) for k in f.keys()}
    for name, p in whole.named_parameters():
        assert torch.equal(p, files[name].to(dtype)), name

    for rank in range(TP):
        want = _whole_split(stage.build_frozen(cfg, dtype)["teacher"], arch, rank)
        with deferred_weights():
            teacher = stage.build_frozen(cfg, dtype)["teacher"]
        assert hasattr(teacher, WEIGHT_SOURCE_ATTR) and not teacher.training and not teacher.config.use_cache
        assert not any(p.requires_grad for p in teacher.parameters())
        reads.clear()
        _, parts = _fill_empty(teacher, arch, rank)
        got = dict(teacher.named_parameters())
        _assert_bitwise(got, want, dtype)
        assert not any(p.requires_grad or p.grad is not None for p in got.values())
        split = [n for n, part in parts.items() if part is not None]
        assert split and all({how for how, _ in reads[n]} == {"slice"} for n in split)
