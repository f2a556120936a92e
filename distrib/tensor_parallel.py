"""Tensor-parallel plans: what DeepSpeed AutoTP needs to know to split each architecture.

Llama-family models are split by AutoTP's built-in rules (q/k/v, gate/up column-parallel;
o/down row-parallel). Architectures AutoTP does not train are prepared here before the engine
is built, and their weights are put back into the Hugging Face layout on export.
"""

from __future__ import annotations

import torch

from distrib.config import Config


def apply_plan(model: torch.nn.Module, cfg: Config, ds_config: dict) -> dict:
    """Prepare ``model`` for tensor parallelism and return the DeepSpeed config to use.

    Called after the model is built and before the engine is, only when ``parallel.tp > 1``.
    """
    return ds_config


def to_hf_layout(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Map a consolidated tensor-parallel state dict back to the model's Hugging Face layout."""
    return state
