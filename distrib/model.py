"""Build plain Hugging Face causal LMs from :class:`~distrib.config.ModelConfig`.

Model code knows nothing of distribution: parallelism is applied afterwards by
:mod:`distrib.parallelize`. Under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` so
that no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from distrib.config import ConfigError, ModelConfig


def hf_config(cfg: ModelConfig, vocab_size: int | None = None, seq_len: int | None = None) -> PretrainedConfig:
    """The ``transformers`` config for ``cfg`` (read from ``cfg.pretrained`` when set).

    Args:
        cfg: the model section.
        vocab_size: the tokenizer's length, used when ``cfg.vocab_size`` is unset.
        seq_len: the training context, used when ``cfg.max_position_embeddings`` is unset.
    """
    if cfg.pretrained:
        path = Path(cfg.pretrained)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.pretrained={cfg.pretrained!r} has no config.json; point it at a save_pretrained directory")
        return AutoConfig.from_pretrained(path)
    vocab = cfg.vocab_size or vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size is unknown: set it or let the tokenizer define it")
    if cfg.vocab_size and vocab_size and cfg.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            "raise it or leave it unset to follow the tokenizer"
        )
    max_pos = cfg.max_position_embeddings or seq_len or 2048
    if cfg.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size or _llama_ffn(cfg.hidden_size),
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
            max_position_embeddings=max_pos,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings,
            attention_dropout=cfg.dropout,
            initializer_range=cfg.init_std,
            use_cache=False,
        )
    return GPT2Config(
        vocab_size=vocab,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        n_positions=max_pos,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        use_cache=False,
    )


def _llama_ffn(hidden: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4h, rounded up to a multiple of 256 (64 for tiny models)."""
    width = int(8 * hidden / 3)
    step = 256 if hidden >= 1024 else 64
    return step * ((width + step - 1) // step)


def build_model(cfg: ModelConfig, hf_cfg: PretrainedConfig, *, seed: int = 0, init_context=None,
                dtype=torch.float32):
    """Instantiate the model: weights from ``cfg.pretrained`` or freshly initialised.

    Args:
        cfg: the model section.
        hf_cfg: from :func:`hf_config`.
        seed: seed of the initial weights (see :func:`init_weights`).
        init_context: a context manager to build under (``deepspeed.zero.Init`` for ZeRO-3).
        dtype: parameter dtype at construction.
    """
    ctx = init_context if init_context is not None else contextlib.nullcontext()
    with ctx:
        if cfg.pretrained:
            model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, config=hf_cfg, dtype=dtype,
                                                         attn_implementation=cfg.attn_implementation)
        else:
            # ``dtype``, not ``torch_dtype``: transformers 5 warns on every rank for the old name.
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=cfg.attn_implementation)
    if not cfg.pretrained:
        init_weights(model, cfg, seed)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def init_weights(model: torch.nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise every parameter from its own name-seeded generator.

    The weights then depend only on ``seed`` and the architecture, not on the order modules are
    built in, the ZeRO stage (``zero.Init`` builds differently), the world size or tp: a run is
    comparable across layouts from step 0. Same distributions as transformers' ``_init_weights``:
    matrices N(0, init_std) (GPT-2's residual projections scaled by 1/sqrt(2 layers)), biases 0,
    norm weights 1.
    """
    import deepspeed

    n_layers = cfg.num_layers
    for name, param in model.named_parameters():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        partitioned = hasattr(param, "ds_id")
        ctx = deepspeed.zero.GatheredParameters([param], modifier_rank=0) if partitioned else contextlib.nullcontext()
        with ctx, torch.no_grad():
            if param.ndim == 1:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            std = cfg.init_std
            if cfg.arch == "gpt2" and name.endswith("c_proj.weight"):
                std /= math.sqrt(2 * n_layers)
            param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))


def empty_model(hf_cfg: PretrainedConfig) -> torch.nn.Module:
    """The architecture with parameters on the meta device (no memory), buffers real.

    For sizing a 70B model on a laptop and for assembling an export from a state dict
    (``load_state_dict(..., assign=True)``).
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_cfg)
    model.tie_weights()  # tied embeddings are one parameter, counted once
    return model


def count_parameters(hf_cfg: PretrainedConfig) -> int:
    """Parameter count without allocating weights."""
    return sum(p.numel() for p in empty_model(hf_cfg).parameters())


def _depth_and_width(hf_cfg: PretrainedConfig) -> tuple[int, int]:
    """(layers, hidden size) of a Llama-family or GPT-2 config."""
    return (getattr(hf_cfg, "num_hidden_layers", None) or hf_cfg.n_layer,
            getattr(hf_cfg, "hidden_size", None) or hf_cfg.n_embd)


def matmul_shape(hf_cfg: PretrainedConfig, tokens: int, tp: int = 1) -> tuple[int, int, int]:
    """``(m, k, n)`` of the model's largest matmuls on a micro-batch of ``tokens``: its MLP's up-projection
    (this rank's share of the FFN width under tensor parallelism). The shape a fair peak is measured on."""
    _, hidden = _depth_and_width(hf_cfg)
    ffn = getattr(hf_cfg, "intermediate_size", None) or getattr(hf_cfg, "n_inner", None) or 4 * hidden
    return tokens, hidden, max(1, ffn // tp)


def flops_per_token(hf_cfg: PretrainedConfig, n_params: int, seq_len: int, trainable: int | None = None) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention's 12·L·H·T (PaLM appendix B).

    With frozen weights (``trainable`` < N) the backward pass still computes input gradients through
    every layer (2N) but weight gradients only for what trains: 2N + 2N + 2·trainable.
    """
    layers, hidden = _depth_and_width(hf_cfg)
    trainable = n_params if trainable is None else min(trainable, n_params)
    return 4.0 * n_params + 2.0 * trainable + 12.0 * layers * hidden * seq_len


def forward_flops_per_token(hf_cfg: PretrainedConfig, seq_len: int) -> float:
    """Forward-only FLOPs per token of a model that does not train (a teacher): 2N + 4·L·H·T."""
    layers, hidden = _depth_and_width(hf_cfg)
    return 2.0 * count_parameters(hf_cfg) + 4.0 * layers * hidden * seq_len
