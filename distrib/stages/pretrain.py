"""Pretraining: a freshly initialised (or locally loaded) causal LM, next-token loss, every weight trains."""

from __future__ import annotations

import torch

from distrib.config import Config
from distrib.model import build_model
from distrib.trainer import LossOut, causal_lm_loss


class PretrainStage:
    name = "pretrain"

    def build_model(self, cfg: Config, hf_cfg, dtype: torch.dtype) -> torch.nn.Module:
        return build_model(cfg.model, hf_cfg, seed=cfg.seed, dtype=dtype)

    def loss(self, model: torch.nn.Module, batch: dict) -> LossOut:
        return causal_lm_loss(model, batch)
