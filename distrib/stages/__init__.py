"""Stages of a base model's life. Each supplies models and an objective to the one Trainer."""

from distrib.stages.pretrain import PretrainStage

STAGES = {"pretrain": PretrainStage}
