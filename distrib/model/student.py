"""Distillation students: cut from the teacher, and the model side of the hidden-state loss.

Plain Hugging Face causal LMs (Llama family, GPT-2) and ``torch`` modules; the distillation stage builds the
student with these and trains it with :func:`distrib.train.distill.distill_loss`::

    student = student_from_teacher_layers(teacher, cfg.student.init_from_teacher_layers)  # optional
    layer_map = resolve_layer_map(cfg.distill, n_student_layers, n_teacher_layers)       # None: no hidden loss
    projections = make_projections(student_width, teacher_width, layer_map, cfg.distill, seed=cfg.seed)
    setattr(student, PROJECTIONS_ATTR, projections)                                      # when not None

Rules, in one place:

* **Layer indices** are Hugging Face ``hidden_states`` indices: 0 is the embeddings output and ``i`` the
  output of block ``i`` (1-based), so a model with ``L`` layers has hidden states ``0..L``. HF applies
  the final norm to the last one (``hidden_states[L]`` is normed in Llama and GPT-2), so mapping the
  student's last layer to the teacher's last compares normed states on both sides.
* **Default layer map** (``distill.layer_map`` unset, ``distill.loss.hidden > 0``): student layer
  ``i = 1..S`` -> teacher layer ``round(i * T / S)`` rounding halves up (S=2, T=4: ``[[1, 2], [2, 4]]``;
  S=3, T=4: ``[[1, 1], [2, 3], [3, 4]]``). The embeddings output (0) is not matched by default.
* **Projections** (``distill.projection``): one bias-free ``nn.Linear(student_width, teacher_width)`` per
  pair, trained with the student, when the widths differ (``null``, automatic) or always (``true``);
  ``false`` compares the states directly and needs equal widths. Bias-free: a linear map of the student's
  state, so that equal widths start from the identity (the plain MSE) and a constant offset is not
  learned away. Initialised from a generator seeded by ``seed`` and the pair, identically on every rank.
  They hang off the student as ``student.distill_projections`` (:data:`PROJECTIONS_ATTR`) while it trains;
  the export leaves them out.
* **Students cut from the teacher** (``student.init_from_teacher_layers``, DistilBERT-style layer
  dropping): the same class and config with fewer layers, whose embeddings, chosen blocks, final norm and
  head are deep copies of the teacher's; see :func:`student_from_teacher_layers`.
"""

from __future__ import annotations

import copy
import math
import zlib
from typing import Any, Sequence

import torch
from torch import nn

from distrib.config import ConfigError, DistillConfig
from distrib.config.distill import _check_pairs, _check_teacher_layers, _show_pair
from distrib.model.trainable import find_blocks  # one rule for finding the transformer blocks

#: The attribute of the student that holds the projections while it trains; the export drops it.
PROJECTIONS_ATTR = "distill_projections"


# -- layer map and projections ---------------------------------------------------------------


def default_layer_map(n_student_layers: int, n_teacher_layers: int) -> list[list[int]]:
    """Student layer ``i = 1..S`` -> teacher layer ``round(i * T / S)``, halves rounded up (HF hidden-state indices)."""
    s, t = n_student_layers, n_teacher_layers
    return [[i, (2 * i * t + s) // (2 * s)] for i in range(1, s + 1)]


def check_layer_map(layer_map: Sequence, n_student_layers: int, n_teacher_layers: int) -> None:
    """Refuse a layer map naming a hidden state a model does not have (each model has states ``0..layers``).

    Raises:
        ConfigError: one line naming the first bad pair, e.g. ``distill.layer_map: [5, 2] names student
            layer 5, but the student has 4 layers (hidden states 0..4); ...``.
    """
    _check_pairs(layer_map)
    for pair in layer_map:
        for side, index, n in (("student", pair[0], n_student_layers), ("teacher", pair[1], n_teacher_layers)):
            if index > n:
                raise ConfigError(
                    f"distill.layer_map: {_show_pair(pair)} names {side} layer {index}, but the {side} has {n} "
                    f"layers (hidden states 0..{n}); use {side} layers 0..{n} (0 is the embeddings output)"
                )


def resolve_layer_map(cfg: DistillConfig, n_student_layers: int, n_teacher_layers: int) -> list[list[int]] | None:
    """The checked layer map of ``cfg`` (its default when unset); None when the hidden-state loss is off."""
    if cfg.loss.hidden == 0:
        return None
    layer_map = cfg.layer_map if cfg.layer_map is not None else default_layer_map(n_student_layers, n_teacher_layers)
    check_layer_map(layer_map, n_student_layers, n_teacher_layers)
    return [list(pair) for pair in layer_map]


def projection_key(student_layer: int, teacher_layer: int) -> str:
    """The :class:`nn.ModuleDict` key of a pair's projection (parameter names ``s2_t4.weight``)."""
    return f"s{student_layer}_t{teacher_layer}"


def check_widths(student_hidden: int, teacher_hidden: int, layer_map: Sequence | None, cfg: DistillConfig) -> None:
    """Refuse hidden states that are compared directly (``distill.projection=false``) but differ in width.

    Raises:
        ConfigError: one line naming both widths.
    """
    if layer_map is not None and cfg.projection is False and student_hidden != teacher_hidden:
        raise ConfigError(
            f"distill.projection=false, but the student's hidden size {student_hidden} differs from the teacher's "
            f"{teacher_hidden}, so their hidden states cannot be compared; set distill.projection=true or remove it"
        )


def make_projections(student_hidden: int, teacher_hidden: int, layer_map: Sequence | None, cfg: DistillConfig,
                     seed: int = 0) -> nn.ModuleDict | None:
    """One bias-free ``nn.Linear(student_hidden, teacher_hidden)`` per pair of ``layer_map``, or None if none is needed.

    None when the hidden-state loss is off (``layer_map`` None or ``distill.loss.hidden`` 0) or the widths
    are equal and ``distill.projection`` is not true. Weights are fp32: the identity when the widths are
    equal, else ``U(-1/sqrt(student_hidden), 1/sqrt(student_hidden))`` (``nn.Linear``'s default range) drawn
    from a generator seeded by ``seed`` and the pair's key, so every rank and world size builds the same
    projections without touching torch's global generator.

    Raises:
        ConfigError: ``distill.projection=false`` with different widths.
    """
    if layer_map is None or cfg.loss.hidden == 0:
        return None
    check_widths(student_hidden, teacher_hidden, layer_map, cfg)
    differ = student_hidden != teacher_hidden
    if not (cfg.projection or differ):
        return None
    projections = nn.ModuleDict()
    bound = 1.0 / math.sqrt(student_hidden)
    for s, t in layer_map:
        key = projection_key(s, t)
        # skip_init: no draw from torch's global generator (nn.Linear's own init would make one)
        linear = nn.utils.skip_init(nn.Linear, student_hidden, teacher_hidden, bias=False, dtype=torch.float32)
        with torch.no_grad():
            if differ:
                gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
                linear.weight.copy_(torch.rand(teacher_hidden, student_hidden, generator=gen) * (2 * bound) - bound)
            else:
                linear.weight.copy_(torch.eye(teacher_hidden))
        projections[key] = linear
    return projections


# -- students cut from the teacher -----------------------------------------------------------


def student_from_teacher_layers(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A student of ``teacher``'s class and config with ``len(layers)`` layers, cut from the teacher.

    Its blocks are deep copies of the teacher's blocks ``layers`` (0-based, increasing), in that order;
    everything else (embeddings, final norm, head, rotary tables, generation config) is a deep copy of the
    teacher's, so tied embeddings stay tied. ``config.num_hidden_layers`` (GPT-2: ``n_layer``) becomes
    ``len(layers)`` (and ``config.layer_types``, where a model has it, keeps the chosen layers' entries);
    every ``layer_idx`` inside the copied blocks (Llama ``self_attn.layer_idx``, GPT-2 ``attn.layer_idx``)
    is renumbered ``0..len(layers)-1`` for the KV cache. Every parameter of the student is trainable
    (``requires_grad=True``) whatever the teacher's; dtype, device and train/eval mode are the teacher's.
    The teacher is not modified.

    Raises:
        ConfigError: ``layers`` is empty, names a layer the teacher does not have, lists one twice, is not
            increasing, or moves GPT-2 blocks whose attention is scaled by their index.
        RuntimeError: the teacher's parameters are partitioned by ZeRO-3 (gather them first).
    """
    for name, p in teacher.named_parameters():
        if hasattr(p, "ds_id") and p.numel() == 0:
            raise RuntimeError(
                f"{name} is partitioned by ZeRO-3; build the student from a teacher with whole parameters "
                "(before deepspeed.initialize, or under deepspeed.zero.GatheredParameters)"
            )
    blocks_name, n_teacher = find_blocks(teacher)
    layers = list(layers)
    _check_teacher_layers(layers, n_teacher)
    config = teacher.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and layers != list(range(len(layers))):
        raise ConfigError(
            f"student.init_from_teacher_layers=[{', '.join(map(str, layers))}] moves blocks whose attention is "
            "scaled by 1/(layer index + 1) (the teacher's scale_attn_by_inverse_layer_idx), so the saved student "
            f"would not reload as trained; copy the teacher's first layers, e.g. {list(range(len(layers)))}"
        )

    blocks = teacher.get_submodule(blocks_name)
    memo: dict[int, Any] = {id(blocks): nn.ModuleList()}  # the teacher's other blocks are never copied
    student = copy.deepcopy(teacher, memo)
    chosen = nn.ModuleList([copy.deepcopy(blocks[i], memo) for i in layers])  # same memo: shared tensors stay shared
    parent, _, attr = blocks_name.rpartition(".")
    setattr(student.get_submodule(parent), attr, chosen)

    cfg = student.config  # a copy of the teacher's, shared by every submodule of the student
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == n_teacher:
        cfg.layer_types = [layer_types[i] for i in layers]
    cfg.num_hidden_layers = len(layers)
    for k, block in enumerate(chosen):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = k
    for p in student.parameters():
        p.requires_grad_(True)
    return student
