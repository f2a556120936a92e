"""Turn a plain model into a trained-in-parallel one, in a fixed order.

    freeze -> adapters -> tensor parallel -> activation checkpointing -> DeepSpeed engine

The order matters: adapters are attached to the frozen base before tensor parallelism so that
the sharded layers are the final ones, activation checkpointing wraps the final layers, and the
DeepSpeed engine (ZeRO partitioning, precision, optimizer) comes last because it takes ownership of
whatever parameters are still trainable at that point. Activation checkpointing is switched on in
:func:`distrib.model.build_model` (it is a property of the HF module).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import deepspeed
import torch

from distrib.config import Config
from distrib.model.trainable import param_groups
from distrib.parallel.topology import Topology

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: Config, world_size: int, *, load_universal: bool = False,
                     accelerator: str | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config generated from ours; ``cfg.deepspeed`` is merged over it last.

    Settings that only pay on a GPU depend on the accelerator (``accelerator``: its name, by default
    DeepSpeed's current one): on CUDA and other devices, communication overlaps the backward pass,
    offloaded state is pinned for fast copies, and ZeRO-3 keeps DeepSpeed's default persistence
    threshold (small parameters stay whole, saving a gather each); on the CPU, where there is no copy
    engine to overlap and pinning only costs, all three are off and every parameter is partitioned.
    Any of them can be set under ``deepspeed.zero_optimization``.
    """
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
    gpu = accelerator != "cpu"
    t, p = cfg.train, cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage >= 1:
        zero.update(overlap_comm=gpu, contiguous_gradients=True, reduce_bucket_size=5e7)
    if p.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
        if not gpu:
            zero["stage3_param_persistence_threshold"] = 0
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": t.eps,
                "weight_decay": t.weight_decay,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if p.tp > 1:
        ds["tensor_parallel"] = {"autotp_size": p.tp}
    return _deep_merge(ds, cfg.deepspeed)


def lr_lambda(cfg: Config):
    """Linear warmup to ``train.lr``, then cosine/linear decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.lr_decay == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if t.lr_decay == "cosine" else 1.0 - progress
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * shape

    return factor


def build_engine(model: torch.nn.Module, cfg: Config, topo: Topology, ds_config: dict):
    """Wrap ``model`` in a DeepSpeed engine with AdamW over its trainable parameters.

    Two parameter groups: matrices decay, biases and norms (and embeddings unless
    ``train.decay_embeddings``) do not. A model with nothing to train (a frozen control run, a teacher)
    gets an engine without optimizer: ZeRO-3 still partitions it, nothing holds optimizer state.
    """
    groups = param_groups(model, cfg.train.weight_decay, decay_embeddings=cfg.train.decay_embeddings)
    if not groups:
        # ZeRO-1/2 partition optimizer state only: without an optimizer they are ZeRO-0 (replicated
        # weights, as under ZeRO-1/2); ZeRO-3 keeps partitioning the weights.
        ds_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "gradient_clipping")}
        zero = {k: v for k, v in ds_config["zero_optimization"].items() if not k.startswith("offload_optimizer")}
        if zero["stage"] in (1, 2):
            zero = {"stage": 0}
        ds_config["zero_optimization"] = zero
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups or None,
        config=ds_config,
        lr_scheduler=(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))) if groups else None,
        # With tp > 1 DeepSpeed must count batch sizes over the dp axis only (our Topology is its mpu).
        mpu=topo if topo.tp > 1 else None,
    )
    return engine
