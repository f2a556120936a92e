"""LoRA adapters through peft: which modules adapt, what else trains beside them, adapter export.

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

import math
import warnings
import zlib
from pathlib import Path

import peft
import torch
from peft.utils import ModulesToSaveWrapper
from transformers.pytorch_utils import Conv1D

from distrib.config import ConfigError, FinetuneConfig, FreezeConfig, LoraConfig  # noqa: F401 (re-exported)
from distrib.model.trainable import (  # noqa: F401 (the freezing rules, re-exported: one import for a fine-tune)
    Layout,
    apply_freeze,
    check_gathered,
    find_blocks,
    format_summary,
    frozen_ids,
    is_linear,
    is_norm,
    layout_of,
    leaf_names,
    match_patterns,
    param_groups,
    plain_name,
    target_matches,
    trainable_summary,
)

# -- config ----------------------------------------------------------------------------------


#: LoRA target modules when ``finetune.lora.target_modules`` is unset: every attention projection.
#: Other model types fall back to peft's own per-architecture defaults.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
}


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
    layout = layout_of(model)
    frozen = frozen_ids(model, cfg, layout)
    patterns = match_patterns(model, cfg.trainable, "finetune.trainable", layout)
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
    linear = [(n, m) for n, m in model.named_modules() if is_linear(m)]
    if targets is None:
        targets = DEFAULT_TARGETS.get(arch) or _peft_default_targets(arch)
        if not targets:
            raise ConfigError(
                f"finetune.lora.target_modules has no default for model type {arch!r}; list the modules to adapt "
                f"among its linear modules: {', '.join(leaf_names(linear))}"
            )
    for target in targets:
        if not any(target_matches(n, target) for n, _ in linear):
            raise ConfigError(
                f"finetune.lora.target_modules: {target!r} matches no linear module of this {arch} model; "
                f"its linear modules are: {', '.join(leaf_names(linear))}"
            )
    matched = [(n, m) for n, m in linear if any(target_matches(n, t) for t in targets)]
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
             if is_norm(m) and any(id(p) not in frozen for p in m.parameters(recurse=False))]
    if not norms:
        raise ConfigError(
            "finetune.lora.train_norms: every norm layer is frozen by finetune.freeze or "
            "finetune.train_top_layers; unfreeze some layers or remove finetune.lora.train_norms"
        )
    return norms


def _tie_saved_copies(layout: Layout, to_save: dict[str, None]) -> bool:
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
    named_by_targets = {n for n, _ in model.named_modules() if any(target_matches(n, t) for t in targets)}
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


# -- export ----------------------------------------------------------------------------------


def merged_model(peft_model: torch.nn.Module) -> torch.nn.Module:
    """The plain HF model with the adapters merged into its weights (``merge_and_unload``), for export.

    ``peft_model`` is consumed: its base layers now hold the merged weights; do not train it further.
    ``modules_to_save`` copies replace their originals.
    """
    check_gathered(peft_model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft_model.merge_and_unload()


def adapter_state_dict(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What peft saves of ``peft_model``: LoRA weights, ``modules_to_save`` copies and trained biases."""
    check_gathered(peft_model)
    return peft.get_peft_model_state_dict(peft_model)


def save_adapter(peft_model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write ``peft_model``'s adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``).

    ``peft.PeftModel.from_pretrained(base, out_dir)`` on the same base model reproduces ``peft_model``.
    Call on one rank (the parameters must be whole: gather ZeRO-3 partitions first).
    """
    check_gathered(peft_model)
    out = Path(out_dir)
    # save_embedding_layers=False: the vocabulary is never resized here, and "auto" may look the base
    # model up on the Hub.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    return out
