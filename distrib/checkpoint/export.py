"""Checkpoint -> a Hugging Face directory that ``transformers`` loads unchanged.

Works offline from the checkpoint alone (it carries its config and tokenizer), so the same code
serves ``distrib export CHECKPOINT OUT_DIR`` and the export at the end of a run. Weights are written
as safetensors in the training precision, in the layout ``save_pretrained`` uses (one
``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards with a
``model.safetensors.index.json`` once they exceed ``max_shard_size``).

A model trained from scratch is streamed: each parameter is read from the checkpoint's memory-mapped
files on its own (the ZeRO partitions of every rank gathered, or one universal ``fp32.pt`` per
parameter for tp > 1), converted and appended to its shard, so the exporting process holds about one
tensor at a time whatever the model's size. A fine-tune is streamed too (``_stream_on_base``): what
trained comes from the checkpoint, the rest from the base's safetensors files, a LoRA-adapted weight is
merged when it is written; only a base without safetensors files is still loaded whole (``_on_base``).
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from transformers import AutoTokenizer

from distrib import fs
from distrib.checkpoint import check_weights_only, convert_to_universal, load_weights, read_state
from distrib.config import Config, ConfigError
from distrib.model import empty_model, hf_config, safetensors_keys
from distrib.model.student import PROJECTIONS_ATTR
from distrib.parallel.engine import torch_dtype
from distrib.parallel.failures import settle
from distrib.parallel.tensor_parallel import to_hf_layout

if TYPE_CHECKING:
    from distrib.parallel.topology import Topology

#: What ``save_pretrained`` uses in the installed transformers: one file for any model we train.
MAX_SHARD_SIZE = "50GB"

#: A name -> a function that returns that tensor whole, in fp32 (floating) or as saved (integers).
Loaders = dict[str, Callable[[], torch.Tensor]]


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint directory, whatever the ZeRO stage and tp.

    Everything at once in memory: used only for a fine-tune whose base is not in safetensors files (rebuilt
    whole by ``_on_base``); every other export streams with ``checkpoint_tensors`` instead.
    """
    if read_state(ckpt).tp > 1:
        # Tensor-parallel slices are merged by DeepSpeed's universal converter (using the merge
        # patterns AutoTP saved with the checkpoint); it leaves one whole fp32 tensor per parameter.
        zero = convert_to_universal(ckpt) / "zero"
        state = {d.name: load_weights(d / "fp32.pt")["param"]
                 for d in sorted(zero.iterdir()) if (d / "fp32.pt").is_file()}
        cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
        return to_hf_layout(state, cfg)
    if not any(ckpt.glob("*model_states.pt")):  # a run in which nothing trained saved no engine state
        return {}
    if any(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # A fine-tune's checkpoint leaves frozen weights out (they are the base's); pretraining has none.
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, exclude_frozen_parameters=True)
    # ZeRO-0 in fp32 keeps whole weights (and the optimizer) in the model-states file.
    state = load_weights(ckpt / "mp_rank_00_model_states.pt")
    return {k: v.float() for k, v in state["module"].items()}


def checkpoint_tensors(ckpt: Path) -> Loaders:
    """The trained tensors of ``ckpt`` (frozen ones left out), each materialised only when called.

    The same tensors as ``consolidated_state_dict``, but the files are memory-mapped and a loader
    reads only its parameter's bytes, copies them and drops those pages again: reading every tensor
    in turn never holds more than one.
    """
    if read_state(ckpt).tp > 1:
        cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
        zero = convert_to_universal(ckpt) / "zero"
        return {d.name: _universal_loader(d / "fp32.pt", d.name, cfg)
                for d in sorted(zero.iterdir()) if (d / "fp32.pt").is_file()}
    if not any(ckpt.glob("*model_states.pt")):
        return {}
    if any(ckpt.glob("*optim_states.pt")):
        return _zero_tensors(ckpt)
    module = load_weights(ckpt / "mp_rank_00_model_states.pt", mmap=True)["module"]
    return {k: _copy_loader(v) for k, v in module.items()}


def export_checkpoint(ckpt: Path, out_dir: Path, adapter_dir: Path | None = None,
                      max_shard_size: int | str | None = None, topo: Topology | None = None) -> Path:
    """Write ``out_dir`` (config.json, safetensors weights, tokenizer files) from checkpoint ``ckpt``.

    A fine-tune's checkpoint (trained on a base, ``init_from``) is re-attached to its base; with LoRA the
    adapters are also written in peft's own format to ``adapter_dir`` (default ``out_dir/adapter``) and
    merged into the weights of ``out_dir``. ``max_shard_size`` (bytes, or a string like ``"5GB"``; by
    default the run's ``export.max_shard_size``) splits the weights into several files as
    ``save_pretrained`` does.

    With ``topo``, every rank of a job calls this, and a streamed export's weight files are dealt out
    among the ranks, each writing its own (the checkpoint is on a file system they share); rank 0
    writes the rest and publishes, the adapter too; a fine-tune whose base is loaded whole (no
    safetensors files) is written by rank 0 alone.

    Raises:
        ConfigError: ``ckpt`` is not a checkpoint, a file of it holds more than weights (it could run code), or
            ``out_dir`` holds something other than an export.
        TrainingError: writing failed for a full disk (or another OS error), on any rank; the partial export
            is removed and an earlier one in ``out_dir`` stays whole.
    """
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not (ckpt / "trainer_state.json").is_file() or not (ckpt / "config.yaml").is_file():
        raise ConfigError(f"{ckpt} is not a distrib checkpoint (no trainer_state.json); pass <output_dir>/checkpoints/step_N")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ConfigError(f"{out_dir} exists and is not an earlier export; choose an empty or new directory")
    cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    if max_shard_size is None:
        max_shard_size = cfg.export.max_shard_size
    if topo is not None and topo.world_size > 1:
        if cfg.init_from:
            if read_state(ckpt).tp > 1:
                convert_to_universal(ckpt, topo)  # what the merge below reads, converted by every rank
            built = _spread_on_base(cfg, ckpt, out_dir, topo)
            if built is not None:
                return _export_spread(ckpt, out_dir, cfg, max_shard_size, topo, built, adapter_dir)
            error = None
            try:
                if topo.is_main:  # a base loaded whole: by rank 0 alone
                    export_checkpoint(ckpt, out_dir, adapter_dir, max_shard_size)
            except Exception as e:  # noqa: BLE001 (every rank learns of it below)
                error = e
            settle(topo, error, _tmp(out_dir), f"exporting {ckpt} to {out_dir}", "the partial export was removed")
            return out_dir
        return _export_spread(ckpt, out_dir, cfg, max_shard_size, topo)
    check_weights_only(ckpt)  # before any loader, DeepSpeed's included, unpickles a file of it
    error, staged = None, []
    try:
        _export_alone(ckpt, out_dir, cfg, adapter_dir, max_shard_size, staged)
    except Exception as e:  # noqa: BLE001 (said in one line when it is the file system's doing)
        error = e

    def undo() -> None:
        for partial in (_tmp(out_dir), *staged, _tmp(_adapter_out(out_dir, adapter_dir))):
            shutil.rmtree(partial, ignore_errors=True)

    settle(None, error, _tmp(out_dir), f"exporting {ckpt} to {out_dir}", "the partial export was removed", undo=undo)
    return out_dir


def _export_alone(ckpt: Path, out_dir: Path, cfg: Config, adapter_dir: Path | None, max_shard_size: int | str,
                  staged: list[Path]) -> None:
    """:func:`export_checkpoint` in this process alone; a peft adapter written on the way is added to ``staged``."""
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    dtype = torch_dtype(cfg.precision)
    adapter = None
    if cfg.init_from:
        streamed = _stream_on_base(cfg, _student(cfg, checkpoint_tensors(ckpt)), ckpt, dtype, staging=out_dir.parent)
        if streamed is not None:
            model, tensors, adapter = streamed
        else:  # a base without safetensors files (or a LoRA variant merged otherwise): loaded whole
            model, adapter = _on_base(cfg, _student(cfg, consolidated_state_dict(ckpt)), ckpt, dtype,
                                      staging=out_dir.parent)
            model = model.to(dtype)
            state = model.state_dict()
            tensors = {k: (lambda t=t: t) for k, t in state.items()}
    else:
        model, tensors = _from_scratch(cfg, ckpt, len(tokenizer), dtype)
    staged.extend([adapter] if adapter is not None else [])
    model.config.use_cache = True

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        _save_config(model, tmp, dtype)
        save_weights(tmp, model, tensors, dtype, max_shard_size)
        tokenizer.save_pretrained(tmp)

    _publish(out_dir, write)
    if adapter is not None:
        _publish(_adapter_out(out_dir, adapter_dir), lambda tmp: os.replace(adapter, tmp))


def _tmp(out: Path) -> Path:
    """Where ``out`` is written before it is moved into place."""
    return out.with_name(out.name + ".tmp")


def _adapter_out(out_dir: Path, adapter_dir: Path | None) -> Path:
    return Path(adapter_dir) if adapter_dir else out_dir / "adapter"


def _export_spread(ckpt: Path, out_dir: Path, cfg: Config, max_shard_size: int | str, topo: Topology,
                   built: tuple | None = None, adapter_dir: Path | None = None) -> Path:
    """The streamed export of :func:`export_checkpoint`, its weight files written by every rank of ``topo``.

    The file a tensor goes to depends on the shapes only (``save_weights``' split), so every rank
    computes the same split and writes the files it is dealt; a failure on any rank fails them all,
    and the previous export stays whole. ``built``: a fine-tune's model, loaders and adapter, from
    :func:`_spread_on_base`.
    """
    if read_state(ckpt).tp > 1:
        convert_to_universal(ckpt, topo)  # by every rank, before any of them reads it
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    dtype = torch_dtype(cfg.precision)
    adapter = None
    if built is not None:
        model, tensors, adapter = built
    else:
        model, tensors = _from_scratch(cfg, ckpt, len(tokenizer), dtype)
    model.config.use_cache = True
    tmp = _tmp(out_dir)
    if topo.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    topo.barrier()

    def undo() -> None:
        for partial in (tmp, adapter, _tmp(_adapter_out(out_dir, adapter_dir))):
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)

    doing, error = f"exporting {ckpt} to {out_dir}", None
    try:
        save_weights(tmp, model, tensors, dtype, max_shard_size, part=(topo.rank, topo.world_size))
    except Exception as e:  # noqa: BLE001 (every rank learns of it below)
        error = e
    settle(topo, error, tmp, doing, "the partial export was removed", undo=undo)
    try:
        if topo.is_main:
            _save_config(model, tmp, dtype)
            tokenizer.save_pretrained(tmp)
            _publish(out_dir, lambda _: None, tmp)
            if adapter is not None:
                _publish(_adapter_out(out_dir, adapter_dir), lambda t: os.replace(adapter, t))
    except Exception as e:  # noqa: BLE001
        error = e
    settle(topo, error, tmp, doing, "the partial export was removed", undo=undo)  # also the closing barrier
    return out_dir


def _spread_on_base(cfg: Config, ckpt: Path, out_dir: Path, topo: Topology) -> tuple | None:
    """:func:`_stream_on_base` on every rank of ``topo`` (rank 0 alone writes the adapter), for
    :func:`_export_spread`; None on every rank when the base is to be loaded whole. A failure on any
    rank fails them all."""
    built, error = None, None
    try:
        built = _stream_on_base(cfg, _student(cfg, checkpoint_tensors(ckpt)), ckpt, torch_dtype(cfg.precision),
                                staging=out_dir.parent, write_adapter=topo.is_main)
    except Exception as e:  # noqa: BLE001 (every rank learns of it below)
        error = e

    def undo() -> None:
        if built is not None and built[2] is not None:
            shutil.rmtree(built[2], ignore_errors=True)

    settle(topo, error, out_dir.parent, f"exporting {ckpt} to {out_dir}", "nothing was exported", undo=undo)
    if topo.any(built is None):
        undo()
        return None
    return built


def _from_scratch(cfg: Config, ckpt: Path, vocab_size: int, dtype: torch.dtype) -> tuple[torch.nn.Module, Loaders]:
    """A pretrained-from-scratch model's export: its architecture on the meta device and the checkpoint's loaders."""
    model = empty_model(hf_config(cfg.model, vocab_size=vocab_size, seq_len=cfg.data.seq_len)).to(dtype)
    tensors = _student(cfg, checkpoint_tensors(ckpt))
    _check_matches(model, tensors, ckpt)
    return model, tensors


def _student(cfg: Config, tensors: dict) -> dict:
    """Leave out the hidden-state projections a distillation trained with the student (not part of it)."""
    if not cfg.teacher:
        return tensors
    return {k: v for k, v in tensors.items() if not k.startswith(PROJECTIONS_ATTR + ".")}


def _saved_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries ``save_pretrained`` writes for ``model``, in its order: tied aliases left out."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(model.state_dict(), model)


def _check_matches(model: torch.nn.Module, tensors: Loaders, ckpt: Path) -> None:
    """Every tensor the model saves is in the checkpoint, and nothing else is (tied aliases aside)."""
    every = set(model.state_dict())
    missing = sorted(set(_saved_names(model)) - set(tensors))
    unexpected = sorted(set(tensors) - every)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing}, unexpected {unexpected}")


def _save_config(model: torch.nn.Module, out: Path, dtype: torch.dtype) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them for a ``dtype`` model."""
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__]
    model.config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)


def save_weights(out: Path, model: torch.nn.Module, tensors: Loaders, dtype: torch.dtype,
                 max_shard_size: int | str = MAX_SHARD_SIZE, part: tuple[int, int] = (0, 1)) -> list[str]:
    """Write ``model``'s weights into ``out`` as ``save_pretrained`` lays them out, one tensor at a time.

    Names, order, shapes and tied aliases come from ``model`` (it may live on the meta device); the
    values from ``tensors``, each loaded, converted to ``dtype`` (floating tensors) and written before
    the next is loaded. The shards are split by ``huggingface_hub``'s own rule, so the files and the
    index are those ``save_pretrained`` would write.

    ``part=(i, n)``: write only the files ``i, i + n, ...`` of the split (and the index only for
    ``i == 0``), so ``n`` processes write them all.

    Returns:
        the weight files of the split (all of them, whichever this call wrote).
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    specs = {}
    for name, ref in _saved_names(model).items():
        out_dtype = dtype if ref.is_floating_point() else ref.dtype
        specs[name] = (tuple(ref.shape), out_dtype)
    split = split_state_dict_into_shards_factory(
        specs, get_storage_size=lambda s: math.prod(s[0]) * s[1].itemsize,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    mine, every = part
    for filename, names in list(split.filename_to_tensors.items())[mine::every]:
        _write_safetensors(out / filename, {n: specs[n] for n in names}, tensors)
    if split.is_sharded and mine == 0:
        params = sum(p.numel() for p in model.parameters())
        index = {"metadata": {"total_parameters": params, **split.metadata}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _write_safetensors(path: Path, specs: dict[str, tuple[tuple, torch.dtype]], tensors: Loaders) -> None:
    """One safetensors file, its header first (sizes are known up front), then each tensor as loaded.

    ``safetensors.torch.save_file`` wants the whole shard in memory; the format is simple enough
    (a little-endian u64 header length, a JSON header padded to 8 bytes, the raw bytes) to write it
    tensor by tensor instead.
    """
    # safetensors' own order (widest dtype first, then by name), so the bytes are save_pretrained's
    specs = dict(sorted(specs.items(), key=lambda kv: (-kv[1][1].itemsize, kv[0])))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (shape, dtype) in specs.items():
            t = tensors[name]()
            if tuple(t.shape) != shape:
                raise RuntimeError(f"{name} has shape {tuple(t.shape)} in the checkpoint but {shape} in the model")
            t = t.to(dtype).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


# ----------------------------------------------------------------------------- reading checkpoints lazily

_PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4


def _release(t: torch.Tensor) -> None:
    """Drop the resident pages of ``t``, a slice of a memory-mapped checkpoint file already copied.

    Pages of a file mapping that were read stay in the process's resident set until unmapped, so
    reading a whole checkpoint through one mapping would grow it to the checkpoint's size. The mapping
    is private and never written, so a dropped page would simply be read from the file again. Only
    pages lying wholly inside ``t`` are dropped: a neighbour's bytes are never touched.
    """
    if _LIBC is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if hi > lo:
        _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _copy_loader(mapped: torch.Tensor) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        t = mapped.float() if mapped.is_floating_point() else mapped.clone()
        if t.data_ptr() == mapped.data_ptr():  # .float() of an fp32 tensor is the tensor itself
            t = t.clone()
        _release(mapped)
        return t
    return load


def _universal_loader(path: Path, name: str, cfg: Config) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        return to_hf_layout({name: _copy_loader(load_weights(path, mmap=True)["param"])()}, cfg)[name]
    return load


def _gather(parts: list[torch.Tensor], start: int, out: torch.Tensor) -> None:
    """Copy elements ``[start, start + len(out))`` of the concatenation of flat ``parts`` into ``out``."""
    base, end = 0, start + out.numel()
    for part in parts:
        lo, hi = max(start, base), min(end, base + part.numel())
        if lo < hi:
            piece = part[lo - base:hi - base]
            out[lo - start:hi - start] = piece
            _release(piece)
        base += part.numel()


def _natural(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def _zero_tensors(ckpt: Path) -> Loaders:
    """Loaders for a ZeRO checkpoint's fp32 master weights (stages 1-3) and buffers.

    Follows the layout DeepSpeed's ``zero_to_fp32`` reads: for stages 1 and 2 each parameter group is
    one flat vector cut into consecutive rank partitions, parameters packed in order (plus the
    alignment padding the optimizer records); for stage 3 each rank holds a ``ceil(numel / ranks)``
    piece of every parameter at the same offset. ``zero_to_fp32`` concatenates the stage-2 partitions
    into whole vectors (the model's size in memory); here each parameter is gathered from the mapped
    partitions alone.
    """
    from deepspeed.checkpoint.constants import (BUFFER_NAMES, FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT,
                                                PARAM_ALIGNMENT_PADDINGS, PARAM_SHAPES, PARTITION_COUNT,
                                                SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE)

    model_states = [load_weights(f, mmap=True) for f in sorted(ckpt.glob("*model_states.pt"), key=_natural)]
    optim_files = sorted(ckpt.glob("*optim_states.pt"), key=_natural)
    optims = [load_weights(f, mmap=True)[OPTIMIZER_STATE_DICT] for f in optim_files]
    # ZeRO-0 in bf16 (DeepSpeed's BF16_Optimizer) saves the stage-1/2 layout without naming a stage
    stage, ranks = optims[0].get(ZERO_STAGE, 0), optims[0][PARTITION_COUNT]
    ranks = max(ranks) if isinstance(ranks, list) else ranks
    if ranks != len(optims):
        raise RuntimeError(f"{ckpt} holds {len(optims)} optimizer shards for {ranks} ranks; the checkpoint is incomplete")
    first = model_states[0]
    loaders: Loaders = {k: _copy_loader(v) for k, v in first["module"].items() if k in first[BUFFER_NAMES]}
    shapes = first[PARAM_SHAPES]
    if stage <= 2:
        paddings = optims[0].get(PARAM_ALIGNMENT_PADDINGS)
        for g, group in enumerate(shapes):
            parts = [o[SINGLE_PARTITION_OF_FP32_GROUPS][g] for o in optims]
            offset = 0
            for i, (name, shape) in enumerate(group.items()):
                loaders[name] = _flat_loader(parts, offset, shape)
                offset += math.prod(shape)
                if paddings is not None:
                    offset += paddings[g][i]
            total = sum(p.numel() for p in parts)
            align = 2 * ranks  # stage 1/2 pad each group to a multiple of 2 x ranks; BF16_Optimizer to the ranks
            if offset > total or (stage > 0 and -(-offset // align) != -(-total // align)):
                raise RuntimeError(f"{ckpt}: parameter group {g} does not match its optimizer partitions")
    else:
        flat = [o[FP32_FLAT_GROUPS] for o in optims]
        offset = 0
        for name, shape in ((n, s) for group in shapes for n, s in group.items()):
            loaders[name] = _zero3_loader(flat, offset, shape, ranks)
            offset += -(-math.prod(shape) // ranks)
        if offset != sum(p.numel() for p in flat[0]):
            raise RuntimeError(f"{ckpt}: the parameters do not match their ZeRO-3 partitions")
    return loaders


def _flat_loader(parts: list[torch.Tensor], offset: int, shape) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        out = torch.empty(math.prod(shape), dtype=parts[0].dtype)
        _gather(parts, offset, out)
        return out.float().view(tuple(shape))
    return load


def _zero3_loader(flat: list[list[torch.Tensor]], offset: int, shape, ranks: int) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        numel = math.prod(shape)
        piece = -(-numel // ranks)
        out = torch.empty(piece * ranks, dtype=flat[0][0].dtype)
        for r in range(ranks):
            _gather(flat[r], offset, out[r * piece:(r + 1) * piece])
        return out[:numel].float().view(tuple(shape))
    return load


def _on_base(cfg: Config, state: dict[str, torch.Tensor], ckpt: Path, dtype: torch.dtype, staging: Path):
    """The fine-tuned model: its base with the same frozen parts and adapters, the trained tensors loaded.

    Built whole in memory (the base is loaded by ``from_pretrained`` and the LoRA merge needs the
    weights): the fallback of ``_stream_on_base`` for a base it cannot read one tensor at a time (no
    safetensors files), and the reference it is tested against; the result is written by the same writer.

    Returns:
        the plain model (LoRA merged), and the peft adapter directory written under ``staging`` (None
        without LoRA).
    """
    from transformers import AutoModelForCausalLM

    from distrib.model.adapters import apply_freeze, apply_lora, merged_model, save_adapter

    base = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, dtype=torch.float32)
    apply_freeze(base, cfg.finetune)
    model = apply_lora(base, cfg.finetune, seed=cfg.seed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = trainable - set(state)
    unexpected = set(state) - {n for n, _ in model.named_parameters()}
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match its base {cfg.model.pretrained}: missing "
                           f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
    if not cfg.finetune.lora.enabled:
        return model, None
    model = model.to(dtype)  # the adapter as it trained: on the base in the training precision
    # peft saves from the live model: write the adapter now, before merging consumes it.
    staging.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".adapter-", dir=staging))
    save_adapter(model, staged)
    return merged_model(model.to(torch.float32)), staged


def _publish(out_dir: Path, write, tmp: Path | None = None) -> None:
    """``write(tmp)`` then swap ``tmp`` in for ``out_dir`` (the old export stays whole until then).

    ``tmp``: a directory already written (by several processes), instead of a fresh ``out_dir.tmp``.
    """
    with fs.publishing(out_dir, tmp) as target:
        write(target)


# ----------------------------------------------------------------------------- a fine-tune, streamed

def _stream_on_base(cfg: Config, trained: Loaders, ckpt: Path, dtype: torch.dtype, staging: Path,
                    write_adapter: bool = True) -> tuple[torch.nn.Module, Loaders, Path | None] | None:
    """The fine-tuned model as :func:`_on_base` builds it, but as loaders: the base is never loaded whole.

    The fine-tune is rebuilt on the meta device (the base's architecture, then the same freeze and LoRA),
    which gives every name, tie and LoRA layer without a weight. Each tensor of the export then comes
    from one place, read when it is written: the checkpoint (what trained), the base's safetensors
    files (the rest), or, for a LoRA-adapted weight, the base weight plus peft's own ``get_delta_weight``
    of the trained adapter. The values are rounded as ``_on_base`` rounds them: read in fp32, the peft
    model cast to the training precision (the adapter is saved from it) and back to fp32 for the merge,
    the merged model cast to the training precision by the writer. Only the adapter (LoRA weights,
    ``modules_to_save`` copies, biases) is held, put into the meta model for peft's own
    ``save_pretrained``.

    Returns:
        (the plain model on the meta device, giving the names, ties and config of the export; its
        loaders; the peft adapter directory written under ``staging``, None without LoRA or without
        ``write_adapter``), or None when the base's weights are not all in safetensors files (the export
        then loads it whole).
    """
    from distrib.model.adapters import apply_freeze, apply_lora, plain_name, save_adapter

    base_dir = Path(cfg.model.pretrained)
    hf_cfg = hf_config(cfg.model)
    hf_cfg._name_or_path = str(cfg.model.pretrained)  # as from_pretrained records it (peft's adapter_config.json)
    skeleton = empty_model(hf_cfg).float()
    if skeleton.can_generate() and (base_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        skeleton.generation_config = GenerationConfig.from_pretrained(base_dir)  # as from_pretrained reads it
    model = empty_model(hf_cfg).float()  # from_pretrained(dtype=float32) in _on_base
    apply_freeze(model, cfg.finetune)
    pm = apply_lora(model, cfg.finetune, seed=cfg.seed)
    named = dict(pm.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    missing = trainable - set(trained)
    unexpected = set(trained) - set(named)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match its base {cfg.model.pretrained}: missing "
                           f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    lora = _lora_layers(pm)
    if lora is None:
        return None
    # every parameter object under all its names (a tied one has several); the plain names it may be stored under
    aliases: dict[int, list[str]] = {}
    for name, p in pm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    canonical = {id(p): n for n, p in named.items()}
    plain = {}  # plain name of the merged model -> parameter object of pm that gives it
    for name, p in pm.named_parameters(remove_duplicate=False):
        if ".lora_" not in name and ".original_module." not in name:
            plain[plain_name(name)] = p
    buffers = dict(skeleton.named_buffers())
    saved = list(_saved_names(skeleton))
    if any(n not in plain and n not in buffers for n in saved):
        return None
    # the parameters whose value is the base's: looked up in its files under their plain names
    from_base = {}
    for n in saved:
        if n in plain and canonical[id(plain[n])] not in trained:
            from_base[id(plain[n])] = sorted({plain_name(a) for a in aliases[id(plain[n])]})
    lc = cfg.finetune.lora
    held = [n for n in named if ".lora_" in n or ".modules_to_save." in n or (lc.enabled and lc.train_biases and "bias" in n)]
    for n in held:
        if n not in trained:
            from_base[id(named[n])] = sorted({plain_name(a) for a in aliases[id(named[n])]})
    wanted = sorted({k for keys in from_base.values() for k in keys} | {n for n in saved if n in buffers})
    found = safetensors_keys(base_dir, wanted, skeleton.base_model_prefix, partial=True)
    if found is None:
        return None
    for i, keys in from_base.items():
        if not any(k in found for k in keys):
            return None

    def value(p: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 value ``_on_base`` loads into ``p``: the checkpoint's, else the base's read in fp32."""
        name = canonical[id(p)]
        if name in trained:
            return trained[name]()
        file, key = next(found[k] for k in from_base[id(p)] if k in found)
        return _read_base(file, key).to(torch.float32)

    adapter = None
    if lc.enabled:
        # the adapter as _on_base saves it: peft's model cast to the training precision
        with torch.no_grad():
            _materialize(pm, {id(named[n]): named[n] for n in held}, lambda p: value(p).to(dtype), aliases)
        if write_adapter:
            staging.mkdir(parents=True, exist_ok=True)
            adapter = Path(tempfile.mkdtemp(prefix=".adapter-", dir=staging))
            save_adapter(pm, adapter)
        pm.to(torch.float32)  # and back to fp32 for the merge

    def loader(name: str) -> Callable[[], torch.Tensor]:
        if name not in plain:
            if name in found:
                file, key = found[name]
                return lambda: _read_base(file, key)
            return lambda: buffers[name].clone()
        p = plain[name]
        layer = lora.get(id(p))
        if layer is None:
            return lambda: value(p)

        def merged() -> torch.Tensor:
            weight = value(p).to(dtype).to(torch.float32)
            with torch.no_grad():
                for adapter_name in layer.active_adapters:
                    if adapter_name in layer.lora_A:
                        weight += layer.get_delta_weight(adapter_name)  # peft's merge, as merge_and_unload does it
            return weight
        return merged

    return skeleton, {n: loader(n) for n in saved}, adapter


def _lora_layers(pm: torch.nn.Module) -> dict[int, torch.nn.Module] | None:
    """id of each LoRA-adapted base weight -> its peft LoRA layer; None if one merges otherwise than by
    ``weight += get_delta_weight`` (DoRA and other variants, LoRA biases: not streamed)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for m in pm.modules():
        if isinstance(m, LoraLayer):
            if getattr(m, "lora_variant", {}) or any(getattr(m, "lora_bias", {}).values()):
                return None
            if not isinstance(m, torch.nn.Module) or not hasattr(m.get_base_layer(), "weight"):
                return None
            layers[id(m.get_base_layer().weight)] = m
    return layers


def _read_base(file: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, read alone (the file is mapped only for the read)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def _materialize(model: torch.nn.Module, params: dict[int, torch.nn.Parameter],
                 value: Callable[[torch.nn.Parameter], torch.Tensor], aliases: dict[int, list[str]]) -> None:
    """Replace each parameter of ``params`` (on the meta device) by a real one holding ``value(p)``, under
    every name it has, so that tied parameters stay one."""
    for i, p in params.items():
        real = torch.nn.Parameter(value(p), requires_grad=p.requires_grad)
        for name in aliases[i]:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = real
