"""Tensor-parallel plans: what DeepSpeed AutoTP needs to know to split each architecture.

Llama-family models are split by AutoTP's built-in rules (q/k/v, gate/up column-parallel;
o/down row-parallel). Architectures AutoTP does not train are prepared here before the engine
is built, and their weights are put back into the Hugging Face layout on export.

GPT-2
-----
AutoTP's training path refuses GPT-2: its projections are ``transformers.pytorch_utils.Conv1D``
(weight ``[in, out]``) and its attention projects q, k and v with one fused ``c_attn``. Before the
engine is built, :func:`apply_plan` therefore

* replaces every block ``Conv1D`` (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``)
  by the equivalent ``nn.Linear`` (weight transposed to ``[out, in]``, same values, same bias) under
  the same attribute, so parameter names (``...attn.c_attn.weight``) do not change;
* tells ``GPT2Attention`` the per-rank width of q, k and v (``split_size``), the one attribute its
  forward uses that depends on the full width (``head_dim`` stays; the heads are ``-1`` in its
  reshapes). AutoTP itself shards ``num_heads``/``embed_dim`` of the modules whose weights it split;
* returns a DeepSpeed config whose ``tensor_parallel.partition_config`` is DeepSpeed's configurable
  AutoTP plan: ``c_attn`` column-parallel as three sub-parameters ``[q; k; v]`` (``shape [3, -1]``,
  each split on head boundaries, so every rank holds the same heads of q, k and v), ``c_fc``
  column-parallel, both ``c_proj`` row-parallel (all-reduce after the matmul, bias added once).
  A custom plan takes precedence over the HF ``tp_plan`` and over AutoTP's heuristics (and their
  "not supported" assertion) in ``DeepSpeedEngine._apply_autotp_partitioning``.

Building split models
---------------------
A model AutoTP splits is built on the meta device (:func:`distrib.model.deferred_weights`): a rank
never holds the whole model. That is the trained model and, in distillation, the frozen teacher
(built from its safetensors files like any pretrained model). AutoTP splits the empty model inside
``deepspeed.initialize`` (its layers keep meta tensors meta); :func:`materialize_shards` then fills,
before DeepSpeed uses any parameter, each one with this rank's part of its value, one tensor at a time,
so the shards are bitwise those of a model built whole and split:

* where AutoTP's split keeps ranges along one dimension (:func:`~distrib.parallel.deepspeed_compat.shard_part`:
  the rows of Llama's q/k/v/gate/up and of GPT-2's ``c_fc``, the columns of o/down and both GPT-2
  ``c_proj``, each of the q, k and v thirds of GPT-2's fused ``c_attn``), that part alone is read from the
  pretrained safetensors files (bytes read bounded by the shard, not the tensor), or cut from the whole initial
  value (a seeded generator draws the whole tensor anyway);
* any other split parameter gets its whole value cut by the very partition function AutoTP would
  have applied, and the parameters AutoTP does not split (embeddings, norms, row-parallel biases) their
  whole value.

A rank's peak is its shards plus the largest tensor it reads whole (or, fresh, the largest initial value).

AutoTP records the same plan as the checkpoint's universal-checkpoint metadata, so DeepSpeed's
universal converter merges the slices (``c_attn`` per sub-parameter) into whole ``nn.Linear``
weights; :func:`to_hf_layout` transposes them back to ``Conv1D``'s ``[in, out]``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from pathlib import Path

import torch

from distrib.config import Config
from distrib.model import WEIGHT_SOURCE_ATTR, WeightSource
from distrib.parallel.deepspeed_compat import after_autotp_split, autotp_partition, shard_part

#: GPT-2 block projections (relative to a block): column-parallel, fused-qkv column, row-parallel.
_GPT2_COLUMN = ("mlp.c_fc",)
_GPT2_QKV = ("attn.c_attn",)
_GPT2_ROW = ("attn.c_proj", "mlp.c_proj")
_GPT2_PROJECTIONS = _GPT2_QKV + _GPT2_COLUMN + _GPT2_ROW
#: Parameter names of those projections' weights in a GPT-2 state dict (any prefix).
_GPT2_WEIGHT_RE = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


#: Marks a parameter whose Hugging Face value is the transpose of its layout here (GPT-2 ``Conv1D`` weights).
_HF_TRANSPOSED = "distrib_hf_transposed"


def _model_type(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _cfg_is_gpt2(cfg: Config) -> bool:
    """Whether ``cfg`` describes a GPT-2 model (read from ``model.pretrained`` when set)."""
    if cfg.model.pretrained:
        cfg_file = Path(cfg.model.pretrained) / "config.json"
        if cfg_file.is_file():
            return json.loads(cfg_file.read_text()).get("model_type") == "gpt2"
    return cfg.model.arch == "gpt2"


def apply_plan(model: torch.nn.Module, cfg: Config, ds_config: dict) -> dict:
    """Prepare ``model`` for tensor parallelism and return the DeepSpeed config to use.

    Called after the model is built and before the engine is, only when ``parallel.tp > 1``.
    Llama-family models are left to AutoTP's defaults (``ds_config`` is returned as is).
    """
    if _model_type(model) != "gpt2":
        return ds_config
    _gpt2_to_linear(model, cfg.parallel.tp)
    ds = copy.deepcopy(ds_config)
    tp_section = ds.setdefault("tensor_parallel", {"autotp_size": cfg.parallel.tp})
    # A plan given explicitly under ``deepspeed.tensor_parallel.partition_config`` wins.
    tp_section.setdefault("partition_config", gpt2_partition_config())
    return ds


def gpt2_partition_config() -> dict:
    """DeepSpeed's configurable-AutoTP plan for a GPT-2 whose block projections are ``nn.Linear``."""

    def patterns(names):
        return [rf".*\.h\.\d+\.{re.escape(n)}\.weight$" for n in names]

    return {
        "use_default_specs": False,
        # Anything else (embeddings, layer norms, lm_head) stays replicated.
        "strict_mode": False,
        "layer_specs": [
            # [q; k; v] along the output dim: split each of the three on head boundaries.
            {"patterns": patterns(_GPT2_QKV), "partition_type": "column", "shape": [3, -1], "partition_dim": 0},
            {"patterns": patterns(_GPT2_COLUMN), "partition_type": "column"},
            {"patterns": patterns(_GPT2_ROW), "partition_type": "row"},
        ],
    }


def _gpt2_to_linear(model: torch.nn.Module, tp: int) -> None:
    """Replace the GPT-2 blocks' ``Conv1D`` projections by equal ``nn.Linear`` modules, in place."""
    import deepspeed
    from transformers.pytorch_utils import Conv1D

    blocks = [m for m in model.modules() if type(m).__name__ == "GPT2Block"]
    if not blocks:
        raise NotImplementedError(f"tensor parallelism for {type(model).__name__}: no GPT2Block found")
    for block in blocks:
        attn = block.attn
        if getattr(attn, "is_cross_attention", False) or hasattr(block, "crossattention"):
            raise NotImplementedError("tensor parallelism for GPT-2 with cross-attention is not supported")
        if attn.num_heads % tp or attn.embed_dim % tp:
            raise ValueError(f"parallel.tp={tp} does not divide GPT-2's {attn.num_heads} heads")
        for path in _GPT2_PROJECTIONS:
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            conv = getattr(parent, attr)
            if isinstance(conv, torch.nn.Linear):
                continue  # already converted
            if not isinstance(conv, Conv1D):
                raise NotImplementedError(f"GPT-2 {path} is a {type(conv).__name__}, expected Conv1D")
            setattr(parent, attr, _conv1d_as_linear(conv, deepspeed))
        # q, k and v each hold this rank's heads only: split the fused output at the per-rank width.
        attn.split_size = attn.embed_dim // tp


def _conv1d_as_linear(conv: torch.nn.Module, deepspeed) -> torch.nn.Linear:
    """``nn.Linear`` computing what ``conv`` does: weight ``[in, out]`` -> ``[out, in]``, same bias."""
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    partitioned = any(hasattr(p, "ds_id") for p in params)  # built under zero.Init (ZeRO-3)
    if partitioned:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            weight, bias = conv.weight.data.clone(), None if conv.bias is None else conv.bias.data.clone()
    else:
        weight, bias = conv.weight.data, None if conv.bias is None else conv.bias.data
    n_in, n_out = weight.shape
    with torch.device("meta"):
        linear = torch.nn.Linear(n_in, n_out, bias=bias is not None)
    linear.weight = torch.nn.Parameter(weight.t().contiguous(), requires_grad=conv.weight.requires_grad)
    if weight.is_meta:  # filled later from the Hugging Face ([in, out]) value: transpose it then
        setattr(linear.weight, _HF_TRANSPOSED, True)
    if bias is not None:
        if partitioned:
            linear.bias = torch.nn.Parameter(bias, requires_grad=conv.bias.requires_grad)
        else:
            linear.bias = conv.bias  # the same parameter object
    return linear


def to_hf_layout(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Map a consolidated tensor-parallel state dict back to the model's Hugging Face layout.

    ``state`` holds whole tensors named like the training model's parameters. For GPT-2 trained
    with ``tp > 1`` the block projections were ``nn.Linear`` (``[out, in]``); ``Conv1D`` wants
    ``[in, out]``.
    """
    if cfg.parallel.tp <= 1 or not _cfg_is_gpt2(cfg):
        return state
    return {name: (t.t().contiguous() if _GPT2_WEIGHT_RE.search(name) else t) for name, t in state.items()}


@contextlib.contextmanager
def materialize_shards(model: torch.nn.Module):
    """Within, the engine built over ``model`` fills its meta parameters right after AutoTP splits them.

    For a model built on the meta device (it carries a :class:`distrib.model.WeightSource`); any other
    model is left alone. DeepSpeed offers no hook between AutoTP's split and the engine's first use of
    the parameters, so the fill is hooked into the split for the duration of the block
    (:func:`distrib.parallel.deepspeed_compat.after_autotp_split`).
    """
    source = getattr(model, WEIGHT_SOURCE_ATTR, None)
    if source is None:
        yield
        return
    # Whole shapes, before the split: the parameter objects survive it (AutoTP swaps their data).
    whole = {id(p): tuple(p.shape) for p in model.parameters() if p.is_meta}
    with after_autotp_split(model, lambda: fill_shards(model, source, whole)):
        yield
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if empty:
        raise RuntimeError(f"{len(empty)} parameters were never filled (first: {empty[0]}): the model was not "
                           "split by AutoTP inside the engine")
    delattr(model, WEIGHT_SOURCE_ATTR)


@torch.no_grad()
def fill_shards(model: torch.nn.Module, source: WeightSource, whole: dict[int, tuple[int, ...]]) -> None:
    """Give every meta parameter of ``model`` this rank's part of its value from ``source``, one tensor at a time.

    ``whole`` maps each parameter (by ``id``) to its shape before the split. A parameter AutoTP split
    carries its layer's partition function. Where that split is ranges along one dimension
    (:func:`~distrib.parallel.deepspeed_compat.shard_part`), ``source`` gives those ranges alone (from a
    pretrained file, only their bytes are read); otherwise it gives the whole value and the partition function
    is applied to it exactly as AutoTP applies it to a model built whole
    (:func:`~distrib.parallel.deepspeed_compat.autotp_partition`). The others (embeddings, norms, replicated biases)
    are whole on every rank. The peak is this rank's shards plus one whole tensor (and its fp32 initial value).

    A part read directly is left on the CPU where AutoTP's partition function would have moved it to the
    device: the engine moves the whole module there right after the split anyway.
    """
    from deepspeed.utils import debug

    # DeepSpeed's debug name maps hold weak references to the parameters, which forbid swapping their
    # contents: drop them here and record the names again once every parameter is filled.
    debug.debug_clear_module_and_param_names()
    empty = [(name, p) for name, p in model.named_parameters() if p.is_meta]
    # The largest first: their whole value then exists while this rank holds few shards yet.
    empty.sort(key=lambda item: -math.prod(whole[id(item[1])]))
    for name, param in empty:
        if name not in source:
            raise RuntimeError(f"{name} has no value to be filled from (built on the meta device)")
        shape = whole[id(param)]
        transposed = getattr(param, _HF_TRANSPOSED, False)
        part = shard_part(param, shape)
        value = source.tensor(name, shape[::-1] if transposed else shape, transposed=transposed, part=part)
        _fill(param, value)
        del value  # the parameter's reference is the only one left: the split frees the whole value
        if part is None:
            autotp_partition(param)
    debug.debug_extract_module_and_param_names(model)


def _fill(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Make meta ``param`` hold ``value``, keeping the object (optimizer groups and AutoTP refer to it) and its
    attributes (AutoTP's partition functions and checkpoint metadata)."""
    attrs = dict(param.__dict__)
    torch.utils.swap_tensors(param, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    param.__dict__.clear()
    param.__dict__.update(attrs)
