"""Which parameters a fine-tune trains: frozen parts, the start-up summary, optimizer groups.

Pure functions on a plain ``torch.nn.Module`` (a Hugging Face causal LM: Llama family, GPT-2), with no
distributed code and no peft, so that pretraining and distillation import none of LoRA's machinery
(:mod:`distrib.model.adapters` adds LoRA on top of these rules).

* **Layer selection.** ``freeze.bottom_layers=N`` freezes transformer blocks ``0..N-1``;
  ``train_top_layers=K`` trains only the top ``K`` blocks and the final norm (embeddings and the output
  head are frozen; add ``trainable: [lm_head.weight]`` to train the head too). Blocks are found
  generically: the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules (``model.layers`` in Llama,
  ``transformer.h`` in GPT-2).
* **Embeddings and head.** ``freeze.embeddings`` freezes the input embeddings
  (``model.get_input_embeddings()``) and every other embedding table outside the blocks (GPT-2's
  position embeddings ``wpe``); ``freeze.head`` freezes ``model.get_output_embeddings()``. With tied
  embeddings (``tie_word_embeddings``) input embeddings and head are one tensor: freezing either
  freezes both, and a ``trainable`` pattern that matches either trains both.
* **Patterns.** ``freeze.patterns`` and ``trainable`` are ``fnmatch`` patterns (case-sensitive; ``*``
  also matches dots) over parameter names as ``model.named_parameters()`` gives them, tied names
  included (``lm_head.weight`` of a tied model). ``trainable`` is applied last and wins over every
  freeze. A pattern that matches nothing is a :class:`~distrib.config.ConfigError`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from distrib.config import ConfigError, FinetuneConfig

# -- model layout ----------------------------------------------------------------------------


@dataclass
class Layout:
    arch: str
    blocks: str  # full name of the ModuleList of transformer blocks
    n_layers: int
    embeddings: list[tuple[str, torch.nn.Module]]  # input embeddings first, then other tables outside the blocks
    head: tuple[str, torch.nn.Module] | None
    tied: bool

    def layer_of(self, name: str) -> int | None:
        """The block index of a parameter or module ``name``, or None outside the blocks."""
        prefix = self.blocks + "."
        if not name.startswith(prefix):
            return None
        index = name[len(prefix):].split(".", 1)[0]
        return int(index) if index.isdigit() else None


def _arch(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def find_blocks(model: torch.nn.Module) -> tuple[str, int]:
    """(full name, length) of the ``nn.ModuleList`` holding the transformer blocks."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    found = [(name, m) for name, m in lists if n is not None and len(m) == n]
    if not found:
        raise ValueError(f"cannot find the transformer blocks of this {_arch(model)} model (no ModuleList of "
                         f"config.num_hidden_layers={n} modules)")
    found.sort(key=lambda item: not re.search(r"(^|\.)(layers|h|blocks)$", item[0]))
    return found[0][0], len(found[0][1])


def layout_of(model: torch.nn.Module) -> Layout:
    blocks, n_layers = find_blocks(model)
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    embeddings: list[tuple[str, torch.nn.Module]] = []
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if inp is not None:
        embeddings.append((names[id(inp)], inp))
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding) and m is not inp and not name.startswith(blocks + "."):
            embeddings.append((name, m))
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = (names[id(out)], out) if out is not None else None
    tied = inp is not None and out is not None and out.weight is inp.weight
    return Layout(_arch(model), blocks, n_layers, embeddings, head, tied)


def is_linear(m: torch.nn.Module) -> bool:
    return isinstance(m, (torch.nn.Linear, Conv1D))


def is_norm(m: torch.nn.Module) -> bool:
    return "Norm" in type(m).__name__ and any(True for _ in m.parameters(recurse=False))


def target_matches(module_name: str, target: str) -> bool:
    """peft's rule for a list of target modules: the full name or a dot-separated suffix."""
    return module_name == target or module_name.endswith("." + target)


def leaf_names(named: list[tuple[str, Any]]) -> list[str]:
    """Distinct last components of ``named``'s names, in model order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in named))


def _example_names(model: torch.nn.Module, layout: Layout, limit: int = 6) -> str:
    """A few real parameter names: those outside the blocks and those of block 0, in model order."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False) if layout.layer_of(n) in (None, 0)]
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def match_patterns(model: torch.nn.Module, patterns: list[str], key: str,
                    layout: Layout) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Each pattern -> the (name, parameter) pairs it matches; a pattern matching nothing is refused."""
    named = list(model.named_parameters(remove_duplicate=False))
    hits: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for pattern in patterns:
        hits[pattern] = [(n, p) for n, p in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits[pattern]:
            raise ConfigError(
                f"{key}: {pattern!r} matches no parameter of this {layout.arch} model; parameter names look like "
                f"{_example_names(model, layout)} (fnmatch patterns: * also matches dots)"
            )
    return hits


def frozen_ids(model: torch.nn.Module, cfg: FinetuneConfig, layout: Layout) -> set[int]:
    """ids of the parameters that finetune.freeze and finetune.train_top_layers freeze."""
    f, top, n = cfg.freeze, cfg.train_top_layers, layout.n_layers
    if f.bottom_layers > n:
        raise ConfigError(
            f"finetune.freeze.bottom_layers={f.bottom_layers} exceeds the {n} layers of this {layout.arch} model; "
            f"set at most {n}"
        )
    if top is not None and top > n:
        raise ConfigError(
            f"finetune.train_top_layers={top} exceeds the {n} layers of this {layout.arch} model; set at most {n}"
        )
    first_trained = n - top if top is not None else f.bottom_layers
    frozen: set[int] = set()
    if f.embeddings or top is not None:
        frozen.update(id(p) for _, m in layout.embeddings for p in m.parameters())
    if (f.head or top is not None) and layout.head is not None:
        frozen.update(id(p) for p in layout.head[1].parameters())
    for name, p in model.named_parameters(remove_duplicate=False):
        layer = layout.layer_of(name)
        if layer is not None and layer < first_trained:
            frozen.add(id(p))
    for hits in match_patterns(model, f.patterns, "finetune.freeze.patterns", layout).values():
        frozen.update(id(p) for _, p in hits)
    return frozen


# -- freeze ----------------------------------------------------------------------------------


def apply_freeze(model: torch.nn.Module, cfg: FinetuneConfig) -> None:
    """Set ``requires_grad`` of every parameter of ``model`` (a plain HF causal LM) per ``cfg``.

    Parameters are trainable unless frozen by ``finetune.freeze`` or ``finetune.train_top_layers``;
    ``finetune.trainable`` patterns then make their matches trainable again. With LoRA enabled this is
    the region :func:`apply_lora` puts adapters into (peft then freezes the base weights).

    Raises:
        ConfigError: a pattern matches no parameter, a layer count exceeds the model's layers, or
            (without LoRA) no parameter is left trainable.
    """
    layout = layout_of(model)
    frozen = frozen_ids(model, cfg, layout)
    unfrozen = {id(p) for hits in match_patterns(model, cfg.trainable, "finetune.trainable", layout).values()
                for _, p in hits}
    for _, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(id(p) not in frozen or id(p) in unfrozen)
    if cfg.freeze.all:
        for p in model.parameters():
            p.requires_grad_(False)
        return
    if not cfg.lora.enabled and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            "finetune: this configuration freezes every parameter of the model; train some with finetune.trainable, "
            "finetune.train_top_layers or finetune.lora.rank (or set finetune.freeze.all=true for a run that only "
            "measures the loss)"
        )


# -- summaries -------------------------------------------------------------------------------

#: peft's additions to parameter names, removed when naming parameters in summaries.
_PEFT_PARTS = re.compile(r"^base_model\.model\.|\.base_layer(?=\.)|\.modules_to_save\.[^.]+(?=\.)|\.original_module(?=\.)")


def plain_name(name: str) -> str:
    """A parameter name as in the model before peft wrapped it (LoRA's own names keep their parts)."""
    return _PEFT_PARTS.sub("", name)


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # a ZeRO-3-partitioned parameter holds an empty tensor


def trainable_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Counts of a (possibly peft-wrapped) model's parameters, each tensor counted once.

    Returns:
        ``trainable_names`` (as ``named_parameters`` gives them), ``trainable`` and ``total`` (numbers of
        parameters), ``share`` (trainable / total), ``lora_modules`` and ``lora_layers`` (modules and
        blocks holding LoRA adapters), ``layers`` (sorted block indices holding a trainable
        non-LoRA parameter), ``other_names`` (trainable non-LoRA parameters outside the blocks, with
        peft's wrapper parts removed) and ``block_tensors`` (number of trainable non-LoRA tensors in blocks).
    """
    try:
        blocks = find_blocks(model)[0] + "."
    except ValueError:
        blocks = None
    names, trainable, total = [], 0, 0
    lora_modules: set[str] = set()
    lora_layers: set[int] = set()
    layers: set[int] = set()
    other: list[str] = []
    block_tensors = 0
    for name, p in model.named_parameters():
        total += _numel(p)
        if not p.requires_grad:
            continue
        names.append(name)
        trainable += _numel(p)
        layer = None
        if blocks is not None and name.startswith(blocks):
            index = name[len(blocks):].split(".", 1)[0]
            layer = int(index) if index.isdigit() else None
        if ".lora_" in name:
            lora_modules.add(name.split(".lora_", 1)[0])
            if layer is not None:
                lora_layers.add(layer)
        elif layer is not None:
            layers.add(layer)
            block_tensors += 1
        else:
            other.append(plain_name(name))
    return {
        "trainable_names": names,
        "trainable": trainable,
        "total": total,
        "share": trainable / total if total else 0.0,
        "lora_modules": len(lora_modules),
        "lora_layers": len(lora_layers),
        "layers": sorted(layers),
        "block_tensors": block_tensors,
        "other_names": other,
    }


def _unit(n: float) -> tuple[float, str]:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return scale, suffix
    return 1.0, ""


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts)


def format_summary(summary: dict[str, Any]) -> str:
    """One line for the start-up log, e.g.
    ``trainable: 0.41M of 6.8M parameters (6.0%): LoRA in 8 modules of 4 layers; model.norm.weight``."""
    scale, suffix = _unit(summary["total"])
    value = summary["trainable"] / scale
    if summary["trainable"] and value < 0.01:
        t_scale, t_suffix = _unit(summary["trainable"])
        trained = f"{summary['trainable'] / t_scale:.3g}{t_suffix}"
    else:
        trained = f"{value:.3g}{suffix}" if summary["trainable"] else "0"
    pct = 100.0 * summary["share"]
    share = f"{pct:.1f}%" if pct >= 1 or pct == 0 else f"{pct:.2g}%"
    line = f"trainable: {trained} of {summary['total'] / scale:.3g}{suffix} parameters ({share})"
    parts = []
    if summary["lora_modules"]:
        n_layers = summary["lora_layers"]
        parts.append(f"LoRA in {summary['lora_modules']} modules" + (f" of {n_layers} layers" if n_layers else ""))
    if summary["block_tensors"]:
        plural = "s" if len(summary["layers"]) > 1 else ""
        parts.append(f"{summary['block_tensors']} tensors of layer{plural} {_ranges(summary['layers'])}")
    other = summary["other_names"]
    if other:
        parts.append(", ".join(other) if len(other) <= 4 else f"{len(other)} tensors outside the layers")
    return line + (": " + "; ".join(parts) if parts else "")


# -- optimizer groups ------------------------------------------------------------------------


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """AdamW parameter groups over the trainable parameters of ``model`` (each tensor once).

    No weight decay on biases, norm parameters (1-D tensors, or names containing ``norm`` or ``ln_``)
    and embedding tables (parameters of ``nn.Embedding`` modules, a tied head included) unless
    ``decay_embeddings``; everything else (matrices, LoRA A and B) decays with ``weight_decay``.

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay, "name": "decay"},
        {"params": [...], "weight_decay": 0.0, "name": "no_decay"}]`` without empty groups; what
        ``deepspeed.initialize(model_parameters=...)`` and ``torch.optim.AdamW`` take.
    """
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        leaf = name.rsplit(".", 1)[-1]
        lowered = name.lower()
        if (ndim < 2 or leaf == "bias" or "norm" in lowered or "ln_" in lowered
                or (id(p) in embedding and not decay_embeddings)):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


# -- whole parameters ---------------------------------------------------------------------------------


def check_gathered(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") and p.numel() == 0:
            raise RuntimeError(
                f"{name} is partitioned by ZeRO-3; gather the parameters first "
                "(with deepspeed.zero.GatheredParameters(model.parameters()) on every rank)"
            )
