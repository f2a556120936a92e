"""Stages of a base model's life. Each supplies models and a loss to the one Trainer.

The registry names every stage once: the CLI's subcommands and the Slurm script's ``STAGE`` come from
it. Entries are import paths, so that reading a config (and refusing a bad one) imports no model code.
"""

from __future__ import annotations

import importlib

from distrib.config import ConfigError, DistillConfig, StudentConfig

STAGES = {
    "pretrain": "distrib.stages.pretrain:PretrainStage",
    "finetune": "distrib.stages.finetune:FinetuneStage",
    "distill": "distrib.stages.distill:DistillStage",
}


def refuse_distill_keys(cfg, stage: str) -> None:
    """Distillation keys on another stage would be silently ignored: one line naming them."""
    for key, unset in (("teacher", None), ("student", StudentConfig()), ("distill", DistillConfig())):
        if getattr(cfg, key) != unset:
            raise ConfigError(f"{key} is set but this is the {stage} stage; run `distrib distill`, or remove {key}")


def stage_class(name: str):
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)
