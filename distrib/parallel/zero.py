"""ZeRO-3's partitioned parameters, as plain model code needs them: whole for the time of a write.

A model built under ``deepspeed.zero.Init`` holds on each rank only a slice of every parameter. Model code
that writes weights (:func:`distrib.model.init_weights`) takes :func:`gathered` as an argument instead of
knowing about partitions.
"""

from __future__ import annotations

import contextlib

import deepspeed
import torch


def gathered(params: list[torch.nn.Parameter]):
    """Within, the ZeRO-3-partitioned ones of ``params`` are whole on every rank, and what rank 0 writes into
    them is partitioned again on exit; parameters that are not partitioned are left as they are."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
