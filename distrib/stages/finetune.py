"""Fine-tuning: a pretrained base (``init_from``), frozen layers and/or LoRA adapters, causal-LM loss.

The same loop as pretraining; what differs is what is built and what trains. The base comes from
``init_from`` (its architecture, weights and tokenizer); :mod:`distrib.model.adapters` freezes and attaches
adapters in the documented order (freeze -> adapters -> tensor parallel -> activation checkpointing ->
engine). On prompt/response data the labels of prompt tokens are -100, so the loss is the responses'.
"""

from __future__ import annotations

import torch

from distrib.config import Config, ConfigError
from distrib.model import build_model, empty_model, hf_config
from distrib.model.adapters import apply_freeze, apply_lora
from distrib.parallel.zero import gathered
from distrib.stages import refuse_distill_keys
from distrib.train.trainer import LossOut, causal_lm_loss


class FinetuneStage:
    name = "finetune"

    @staticmethod
    def check(cfg: Config) -> None:
        """Stage-specific checks, before anything starts.

        ``cfg`` already carries its base (:func:`distrib.checkpoint.base.with_base`). Freezing and adapters are tried
        on a weightless copy of the base, so an unknown module or pattern is one line here, not an error
        in every worker.

        Raises:
            ConfigError: no base to fine-tune, or a freeze/LoRA setting that does not fit the model.
        """
        refuse_distill_keys(cfg, "finetune")
        if not cfg.init_from and not cfg.model.pretrained:
            raise ConfigError("finetune needs init_from: a distrib run directory (e.g. runs/pretrain-tiny), a "
                              "checkpoint or a Hugging Face model directory")
        model = empty_model(hf_config(cfg.model))
        apply_freeze(model, cfg.finetune)
        apply_lora(model, cfg.finetune)

    def build_model(self, cfg: Config, hf_cfg, dtype: torch.dtype) -> torch.nn.Module:
        model = build_model(cfg.model, hf_cfg, seed=cfg.seed, dtype=dtype, gathered=gathered)
        apply_freeze(model, cfg.finetune)
        return apply_lora(model, cfg.finetune, seed=cfg.seed)

    def loss(self, model: torch.nn.Module, batch: dict) -> LossOut:
        return causal_lm_loss(model, batch)
