"""What a model costs to train, from its config alone: FLOPs per token and the shape of its largest matmul.

Read by the loop for its throughput metrics (MFU); nothing here allocates weights.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from distrib.model.build import count_parameters, depth_and_width


def matmul_shape(hf_cfg: PretrainedConfig, tokens: int, tp: int = 1) -> tuple[int, int, int]:
    """``(m, k, n)`` of the model's largest matmuls on a micro-batch of ``tokens``: its MLP's up-projection
    (this rank's share of the FFN width under tensor parallelism). The shape a fair peak is measured on."""
    _, hidden = depth_and_width(hf_cfg)
    ffn = getattr(hf_cfg, "intermediate_size", None) or getattr(hf_cfg, "n_inner", None) or 4 * hidden
    return tokens, hidden, max(1, ffn // tp)


def flops_per_token(hf_cfg: PretrainedConfig, n_params: int, seq_len: int, trainable: int | None = None) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention's 12·L·H·T (PaLM appendix B).

    With frozen weights (``trainable`` < N) the backward pass still computes input gradients through
    every layer (2N) but weight gradients only for what trains: 2N + 2N + 2·trainable.
    """
    layers, hidden = depth_and_width(hf_cfg)
    trainable = n_params if trainable is None else min(trainable, n_params)
    return 4.0 * n_params + 2.0 * trainable + 12.0 * layers * hidden * seq_len


def forward_flops_per_token(hf_cfg: PretrainedConfig, seq_len: int) -> float:
    """Forward-only FLOPs per token of a model that does not train (a teacher): 2N + 4·L·H·T."""
    layers, hidden = depth_and_width(hf_cfg)
    return 2.0 * count_parameters(hf_cfg) + 4.0 * layers * hidden * seq_len
