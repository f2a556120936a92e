"""Pretraining: a freshly initialised (or locally loaded) causal LM, next-token loss, every weight trains."""

from __future__ import annotations

import torch

from distrib.config import Config, ConfigError, FinetuneConfig
from distrib.model import build_model
from distrib.parallel.zero import gathered
from distrib.stages import refuse_distill_keys
from distrib.train.trainer import LossOut, causal_lm_loss


class PretrainStage:
    name = "pretrain"

    @staticmethod
    def check(cfg: Config) -> None:
        """Stage-specific checks, before anything starts.

        Raises:
            ConfigError: fine-tuning keys on a pretraining run (they would be silently ignored).
        """
        refuse_distill_keys(cfg, "pretrain")
        if cfg.finetune != FinetuneConfig():
            raise ConfigError("finetune.* keys are set but this is the pretrain stage; run `distrib finetune`, or "
                              "remove the finetune section")

    def build_model(self, cfg: Config, hf_cfg, dtype: torch.dtype) -> torch.nn.Module:
        return build_model(cfg.model, hf_cfg, seed=cfg.seed, dtype=dtype, gathered=gathered)

    def loss(self, model: torch.nn.Module, batch: dict) -> LossOut:
        return causal_lm_loss(model, batch)
