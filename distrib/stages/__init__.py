"""Stages of a base model's life. Each supplies models and a loss to the one Trainer."""

from distrib.stages.pretrain import PretrainStage

STAGES = {"pretrain": PretrainStage}
