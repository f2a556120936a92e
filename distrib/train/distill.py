"""Knowledge distillation's loss: a student against a frozen teacher, as sums over the target tokens.

Pure functions on plain ``torch`` tensors and Hugging Face causal-LM outputs, with no distributed code; the
distillation stage calls them on the one training loop (the student, its layer map and its projections come
from :mod:`distrib.model.student`)::

    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_hidden_states=layer_map is not None)
    s_out = student(input_ids=ids, output_hidden_states=layer_map is not None)
    out = distill_loss(s_out, t_out, labels, cfg.distill.loss, projections, layer_map)   # a LossOut

Rules, in one place:

* **Target tokens** are those of :func:`distrib.train.trainer.causal_lm_loss`: logits at position ``t`` predict
  token ``t + 1``, and position ``t`` counts when ``labels[:, t + 1] != -100``. Every component is a *sum*
  over those positions (the loop divides by the global number of target tokens), computed in fp32 from
  only the target rows (the logits of other positions never enter the loss, whatever they hold).
* **Components** (``distill.loss``), each summed over target positions and returned unweighted in
  ``LossOut.parts`` when its weight is > 0 (logged as ``loss/kl`` etc.); ``total`` is their weighted sum:

  - ``kl``: forward KL(teacher || student) = ``T^2 * sum_v p_t (log p_t - log p_s)`` with
    ``p = softmax(logits / T)`` (Hinton et al.; the ``T^2`` keeps gradient magnitudes independent of ``T``).
  - ``reverse_kl``: KL(student || teacher) = ``T^2 * sum_v p_s (log p_s - log p_t)`` (mode-seeking).
  - ``ce``: next-token cross-entropy of the student against the labels, at temperature 1.
  - ``hidden``: for each ``[student_layer, teacher_layer]`` pair of the layer map (HF hidden-state indices,
    :mod:`distrib.model.student`), the mean over the hidden dimension of ``(proj(h_s) - h_t)^2``, averaged
    over the pairs, at the target positions.

  The teacher's tensors are detached: no gradient reaches the teacher whatever its ``requires_grad``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distrib.config import COMPONENTS, DistillLossConfig
from distrib.model.student import check_layer_map, default_layer_map, projection_key
from distrib.train.trainer import IGNORE_INDEX, LossOut


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum p (log p - log q)`` over every element; entries where p is 0 contribute 0 (as ``0 log 0 = 0``)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum()


def distill_loss(student_out: Any, teacher_out: Any, labels: torch.Tensor, cfg: DistillLossConfig,
                 projections: nn.ModuleDict | None = None, layer_map: Sequence | None = None) -> LossOut:
    """The distillation loss of one micro-batch as sums over its target tokens.

    Args:
        student_out, teacher_out: HF causal-LM outputs (``.logits`` ``[batch, seq, vocab]``; ``.hidden_states``
            when ``cfg.hidden > 0``, i.e. called with ``output_hidden_states=True``). The teacher's are
            detached here.
        labels: ``[batch, seq]``, ``-100`` where no token is predicted (the batch's ``labels``).
        cfg: the ``distill.loss`` section.
        projections: from :func:`distrib.model.student.make_projections`; a pair without one compares
            states directly.
        layer_map: ``[student_layer, teacher_layer]`` pairs for the hidden-state loss; None means
            :func:`distrib.model.student.default_layer_map` of the models' layer counts.

    Returns:
        ``LossOut(total = sum of weight x component, tokens = number of target tokens,
        parts = {component: unweighted sum} for the components with weight > 0)``, all fp32.
    """
    weights = cfg.weights()
    mask = labels[:, 1:] != IGNORE_INDEX
    tokens = mask.sum()
    s_logits = student_out.logits[:, :-1]
    t_logits = teacher_out.logits[:, :-1].detach()
    if s_logits.shape[:2] != mask.shape:
        raise ValueError(f"the student's logits {tuple(student_out.logits.shape)} do not match the labels "
                         f"{tuple(labels.shape)}")
    parts: dict[str, torch.Tensor] = {}
    if "kl" in weights or "reverse_kl" in weights:
        if t_logits.shape != s_logits.shape:
            raise ValueError(
                f"the teacher's logits {tuple(teacher_out.logits.shape)} and the student's "
                f"{tuple(student_out.logits.shape)} differ; distilling logits needs the same batch and vocabulary"
            )
        temp = cfg.temperature
        log_s = F.log_softmax(s_logits[mask].float() / temp, dim=-1)
        log_t = F.log_softmax(t_logits[mask].float() / temp, dim=-1)
        if "kl" in weights:
            parts["kl"] = temp * temp * _kl(log_t, log_s)
        if "reverse_kl" in weights:
            parts["reverse_kl"] = temp * temp * _kl(log_s, log_t)
    if "ce" in weights:
        parts["ce"] = F.cross_entropy(s_logits[mask].float(), labels[:, 1:][mask], reduction="sum")
    if "hidden" in weights:
        parts["hidden"] = _hidden_loss(student_out, teacher_out, mask, projections, layer_map)
    parts = {key: parts[key] for key in COMPONENTS if key in parts}
    total = sum((weights[key] * value for key, value in parts.items()), torch.zeros((), device=mask.device))
    return LossOut(total=total, tokens=tokens, parts=parts)


def _hidden_loss(student_out: Any, teacher_out: Any, mask: torch.Tensor, projections: nn.ModuleDict | None,
                 layer_map: Sequence | None) -> torch.Tensor:
    s_states, t_states = student_out.hidden_states, teacher_out.hidden_states
    if s_states is None or t_states is None:
        raise ValueError("distill.loss.hidden > 0 needs hidden states: call the student and the teacher with "
                         "output_hidden_states=True")
    if layer_map is None:
        layer_map = default_layer_map(len(s_states) - 1, len(t_states) - 1)
    check_layer_map(layer_map, len(s_states) - 1, len(t_states) - 1)
    total = torch.zeros((), device=mask.device)
    for s, t in layer_map:
        h_s = s_states[s][:, :-1][mask].float()
        h_t = t_states[t][:, :-1].detach()[mask].float()
        key = projection_key(s, t)
        if projections is not None and key in projections:
            # Called as a module, so that ZeRO-3 gathers its partitioned weight; in the weight's dtype.
            proj = projections[key]
            h_s = proj(h_s.to(proj.weight.dtype)).float()
        if h_s.shape[-1] != h_t.shape[-1]:
            raise ValueError(
                f"hidden-state loss: student layer {s} is {h_s.shape[-1]} wide and teacher layer {t} is "
                f"{h_t.shape[-1]} wide, and there is no projection {key!r}; build them with make_projections"
            )
        total = total + ((h_s - h_t) ** 2).mean(dim=-1).sum()
    return total / len(layer_map)
