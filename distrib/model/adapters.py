"""Which parameters a fine-tune trains: frozen parts, LoRA adapters, optimizer groups, adapter export.

Pure functions on a plain ``torch.nn.Module`` (a Hugging Face causal LM: Llama family, GPT-2), with
no distributed code; the fine-tuning stage calls them in the order of :mod:`distrib.parallel.engine`::

    apply_freeze(model, cfg)              # requires_grad per finetune.freeze / train_top_layers / trainable
    model = apply_lora(model, cfg, seed)  # peft LoRA when finetune.lora.rank is set (else model unchanged)
    ... tensor parallel -> activation checkpointing -> DeepSpeed engine(model_parameters=param_groups(...))

Rules, in one place:

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
* **LoRA** (``lora.rank`` set). Adapters go into the target modules whose weight the freeze left
  trainable (``bottom_layers=2`` + LoRA: no adapters in blocks 0 and 1), and every base weight is then
  frozen (that is LoRA). ``lora.train_norms`` also trains the norm layers the freeze left trainable,
  ``lora.train_biases`` the biases (LayerNorm biases included), and ``trainable`` patterns train their
  parameters' modules in full. Norms and ``trainable`` modules become peft ``modules_to_save`` and biases
  peft's ``bias="all"``, so that :func:`save_adapter` writes everything that trains in peft's own format
  and ``peft.PeftModel.from_pretrained(base, out_dir)`` reproduces the adapted model exactly.

LoRA initialisation (peft's: ``lora_A`` Kaiming-uniform, ``lora_B`` zeros, so the adapted model starts
equal to the base) draws from torch's global generator: seed it identically on every rank before
:func:`apply_lora`, or pass ``seed`` to draw every ``lora_A`` from its own name-seeded generator, which
makes the adapters independent of anything built before them (the ZeRO stage, the world size).
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from pydantic import Field, model_validator
from peft.utils import ModulesToSaveWrapper
from transformers.pytorch_utils import Conv1D

from distrib.config import ConfigError, FinetuneConfig, FreezeConfig, LoraConfig  # noqa: F401 (re-exported)

# -- config ----------------------------------------------------------------------------------


#: LoRA target modules when ``finetune.lora.target_modules`` is unset: every attention projection.
#: Other model types fall back to peft's own per-architecture defaults.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
}

# -- model layout ----------------------------------------------------------------------------


@dataclass
class _Layout:
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


def _layout(model: torch.nn.Module) -> _Layout:
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
    return _Layout(_arch(model), blocks, n_layers, embeddings, head, tied)


def _is_linear(m: torch.nn.Module) -> bool:
    return isinstance(m, (torch.nn.Linear, Conv1D))


def _is_norm(m: torch.nn.Module) -> bool:
    return "Norm" in type(m).__name__ and any(True for _ in m.parameters(recurse=False))


def _target_matches(module_name: str, target: str) -> bool:
    """peft's rule for a list of target modules: the full name or a dot-separated suffix."""
    return module_name == target or module_name.endswith("." + target)


def _leaf_names(named: list[tuple[str, Any]]) -> list[str]:
    """Distinct last components of ``named``'s names, in model order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in named))


def _example_names(model: torch.nn.Module, layout: _Layout, limit: int = 6) -> str:
    """A few real parameter names: those outside the blocks and those of block 0, in model order."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False) if layout.layer_of(n) in (None, 0)]
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def _match_patterns(model: torch.nn.Module, patterns: list[str], key: str,
                    layout: _Layout) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
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


def _frozen_ids(model: torch.nn.Module, cfg: FinetuneConfig, layout: _Layout) -> set[int]:
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
    for hits in _match_patterns(model, f.patterns, "finetune.freeze.patterns", layout).values():
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
    layout = _layout(model)
    frozen = _frozen_ids(model, cfg, layout)
    unfrozen = {id(p) for hits in _match_patterns(model, cfg.trainable, "finetune.trainable", layout).values()
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


# -- LoRA ------------------------------------------------------------------------------------


def apply_lora(model: torch.nn.Module, cfg: FinetuneConfig, seed: int | None = None) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters per ``cfg.lora``; ``model`` itself when LoRA is off.

    Call after :func:`apply_freeze` (the region it leaves trainable is recomputed here from ``cfg``, so
    the result does not depend on it). Everything is checked before peft touches the model; peft then
    injects the adapters into ``model`` itself, which the returned wrapper holds.

    Args:
        model: a plain HF causal LM.
        cfg: the finetune section.
        seed: when given, every ``lora_A`` is re-drawn (Kaiming-uniform, as peft) from a generator seeded
            by ``seed`` and the parameter's name; otherwise peft draws from torch's global generator.

    Returns:
        a ``peft.PeftModelForCausalLM`` whose trainable parameters are exactly the adapters, the
        ``modules_to_save`` copies (norms with ``train_norms``, modules of ``trainable`` patterns) and,
        with ``train_biases``, the biases the freeze left trainable.

    Raises:
        ConfigError: a target module matches no linear module, every target is frozen, a ``trainable``
            pattern's module is also a LoRA target, or ``train_biases``/``train_norms`` has nothing to train.
    """
    lc = cfg.lora
    if not lc.enabled:
        return model
    layout = _layout(model)
    frozen = _frozen_ids(model, cfg, layout)
    patterns = _match_patterns(model, cfg.trainable, "finetune.trainable", layout)
    targets, adapted = _lora_targets(model, lc.target_modules, layout.arch, frozen)
    to_save = _trained_in_full(patterns, {n for n, _ in adapted})
    if lc.train_norms:
        to_save.update(dict.fromkeys(_trainable_norms(model, frozen)))
    ensure_tying = _tie_saved_copies(layout, to_save)
    bias_params, trained_biases = _lora_biases(model, lc.train_biases, layout.arch, frozen)
    peft_cfg = peft.LoraConfig(
        r=lc.rank,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=_peft_targets(model, targets, adapted),
        bias="all" if lc.train_biases else "none",
        modules_to_save=list(to_save) or None,
        ensure_weight_tying=ensure_tying,
        fan_in_fan_out=any(isinstance(m, Conv1D) for _, m in adapted),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # transformers 5 deprecates an attribute peft reads; nothing for the user to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # Adapters take the base layer's dtype: DeepSpeed keeps the fp32 master copy in the optimizer.
        wrapped = peft.get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
    if lc.train_biases:
        _keep_trained_biases(wrapped, bias_params, trained_biases)
    if seed is not None:
        _reseed_lora(wrapped, seed)
    return wrapped


def _lora_targets(model: torch.nn.Module, targets: list[str] | None, arch: str,
                  frozen: set[int]) -> tuple[list[str], list[tuple[str, torch.nn.Module]]]:
    """The target names (``finetune.lora.target_modules``, else the default for ``arch``) and the linear modules
    they adapt: those matching a target whose weight the freeze left trainable."""
    linear = [(n, m) for n, m in model.named_modules() if _is_linear(m)]
    if targets is None:
        targets = DEFAULT_TARGETS.get(arch) or _peft_default_targets(arch)
        if not targets:
            raise ConfigError(
                f"finetune.lora.target_modules has no default for model type {arch!r}; list the modules to adapt "
                f"among its linear modules: {', '.join(_leaf_names(linear))}"
            )
    for target in targets:
        if not any(_target_matches(n, target) for n, _ in linear):
            raise ConfigError(
                f"finetune.lora.target_modules: {target!r} matches no linear module of this {arch} model; "
                f"its linear modules are: {', '.join(_leaf_names(linear))}"
            )
    matched = [(n, m) for n, m in linear if any(_target_matches(n, t) for t in targets)]
    adapted = [(n, m) for n, m in matched if id(m.weight) not in frozen]
    if not adapted:
        raise ConfigError(
            "finetune.lora.target_modules: every module it names is frozen by finetune.freeze or "
            "finetune.train_top_layers; unfreeze those layers or target other modules"
        )
    return targets, adapted


def _trained_in_full(patterns: dict[str, list[tuple[str, torch.nn.Parameter]]],
                     adapted_names: set[str]) -> dict[str, None]:
    """The modules of the parameters ``finetune.trainable`` matches: trained in full, as peft ``modules_to_save``
    copies (an ordered set)."""
    to_save: dict[str, None] = {}
    for pattern, hits in patterns.items():
        for pname, _ in hits:
            owner = pname.rsplit(".", 1)[0] if "." in pname else ""
            if not owner:
                raise ConfigError(
                    f"finetune.trainable: {pattern!r} matches {pname}, a parameter of the model itself, which "
                    "peft cannot train next to LoRA; match parameters of submodules"
                )
            if owner in adapted_names:
                raise ConfigError(
                    f"finetune.trainable: {pattern!r} trains {pname} in full, but finetune.lora.target_modules "
                    f"adapts {owner}; remove the pattern or that target"
                )
            to_save[owner] = None
    return to_save


def _trainable_norms(model: torch.nn.Module, frozen: set[int]) -> list[str]:
    """The norm layers the freeze left trainable (``finetune.lora.train_norms`` trains them)."""
    norms = [n for n, m in model.named_modules()
             if _is_norm(m) and any(id(p) not in frozen for p in m.parameters(recurse=False))]
    if not norms:
        raise ConfigError(
            "finetune.lora.train_norms: every norm layer is frozen by finetune.freeze or "
            "finetune.train_top_layers; unfreeze some layers or remove finetune.lora.train_norms"
        )
    return norms


def _tie_saved_copies(layout: _Layout, to_save: dict[str, None]) -> bool:
    """With tied embeddings, add both the input embeddings and the head to ``to_save`` when either is in it, so
    that peft keeps the copies tied; whether it did (peft's ``ensure_weight_tying``)."""
    if layout.tied and layout.head is not None:
        pair = (layout.embeddings[0][0], layout.head[0])
        if any(name in to_save for name in pair):
            to_save.update(dict.fromkeys(pair))  # both, so that peft keeps the copies tied
            return True
    return False


def _lora_biases(model: torch.nn.Module, train_biases: bool, arch: str,
                 frozen: set[int]) -> tuple[dict[int, torch.nn.Parameter], set[int]]:
    """Every bias of ``model`` by ``id``, and the ids of those the freeze left trainable (``train_biases`` trains
    them)."""
    named_params = list(model.named_parameters(remove_duplicate=False))
    bias_params = {id(p): p for n, p in named_params if n.endswith("bias")}
    if train_biases and not bias_params:
        raise ConfigError(
            f"finetune.lora.train_biases: this {arch} model has no bias parameters; remove finetune.lora.train_biases"
        )
    trained_biases = {i for i in bias_params if i not in frozen}
    if train_biases and not trained_biases:
        raise ConfigError(
            "finetune.lora.train_biases: every bias is frozen by finetune.freeze or finetune.train_top_layers; "
            "unfreeze some layers or remove finetune.lora.train_biases"
        )
    return bias_params, trained_biases


def _peft_targets(model: torch.nn.Module, targets: list[str], adapted: list[tuple[str, torch.nn.Module]]) -> list[str]:
    """The short names when they name exactly the adapted modules (a readable adapter_config.json), else
    the full names of the adapted modules (peft matches full names exactly)."""
    named_by_targets = {n for n, _ in model.named_modules() if any(_target_matches(n, t) for t in targets)}
    return list(targets) if named_by_targets == {n for n, _ in adapted} else [n for n, _ in adapted]


def _keep_trained_biases(wrapped: torch.nn.Module, bias_params: dict[int, torch.nn.Parameter],
                         trained_biases: set[int]) -> None:
    """peft's ``bias="all"`` trains every bias; keep those the freeze left trainable, and not those of the
    originals of ``modules_to_save`` (their copies train instead)."""
    originals = {id(p) for m in wrapped.modules() if isinstance(m, ModulesToSaveWrapper)
                 for p in m.original_module.parameters()}
    for i, p in bias_params.items():
        p.requires_grad_(i in trained_biases and i not in originals)


def _peft_default_targets(arch: str) -> list[str] | None:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    found = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(arch)
    return list(found) if found else None


def _reseed_lora(model: torch.nn.Module, seed: int) -> None:
    """Draw every ``lora_A`` weight as peft does (Kaiming-uniform, a=sqrt(5)) from a name-seeded generator."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name and name.endswith(".weight"):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen))


# -- summaries -------------------------------------------------------------------------------

#: peft's additions to parameter names, removed when naming parameters in summaries.
_PEFT_PARTS = re.compile(r"^base_model\.model\.|\.base_layer(?=\.)|\.modules_to_save\.[^.]+(?=\.)|\.original_module(?=\.)")


def _plain_name(name: str) -> str:
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
            other.append(_plain_name(name))
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


# -- export ----------------------------------------------------------------------------------


def _check_gathered(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") and p.numel() == 0:
            raise RuntimeError(
                f"{name} is partitioned by ZeRO-3; gather the parameters first "
                "(with deepspeed.zero.GatheredParameters(model.parameters()) on every rank)"
            )


def merged_model(peft_model: torch.nn.Module) -> torch.nn.Module:
    """The plain HF model with the adapters merged into its weights (``merge_and_unload``), for export.

    ``peft_model`` is consumed: its base layers now hold the merged weights; do not train it further.
    ``modules_to_save`` copies replace their originals.
    """
    _check_gathered(peft_model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft_model.merge_and_unload()


def adapter_state_dict(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What peft saves of ``peft_model``: LoRA weights, ``modules_to_save`` copies and trained biases."""
    _check_gathered(peft_model)
    return peft.get_peft_model_state_dict(peft_model)


def save_adapter(peft_model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write ``peft_model``'s adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``).

    ``peft.PeftModel.from_pretrained(base, out_dir)`` on the same base model reproduces ``peft_model``.
    Call on one rank (the parameters must be whole: gather ZeRO-3 partitions first).
    """
    _check_gathered(peft_model)
    out = Path(out_dir)
    # save_embedding_layers=False: the vocabulary is never resized here, and "auto" may look the base
    # model up on the Hub.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    return out
