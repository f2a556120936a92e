"""Build plain Hugging Face causal LMs from :class:`~distrib.config.ModelConfig`.

How a model is spread over processes is decided elsewhere (:mod:`distrib.parallel`); what this module offers
for it is plain: a model can be built under a context manager given by the caller (``init_context``; under
ZeRO-3 transformers builds it partitioned), its weights written through a function that makes a parameter
whole for the write (``gathered``), or built on the meta device with a :class:`~distrib.model.weights.WeightSource`
saying where each value comes from (:func:`deferred_weights`), for whoever splits it to fill only its parts.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ContextManager

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from distrib.config import ConfigError, ModelConfig
from distrib.model.weights import WEIGHT_SOURCE_ATTR, WeightSource, initial_value, safetensors_keys

#: Makes a list of parameters whole for a write within, and keeps what was written (see :func:`init_weights`).
Gathered = Callable[[list[torch.nn.Parameter]], ContextManager]


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


def depth_and_width(hf_cfg: PretrainedConfig | Mapping) -> tuple[int, int]:
    """(layers, hidden size) of a Llama-family or GPT-2 config, or of its ``config.json`` read as a dict."""
    get = hf_cfg.get if isinstance(hf_cfg, Mapping) else (lambda key: getattr(hf_cfg, key, None))
    return get("num_hidden_layers") or get("n_layer"), get("hidden_size") or get("n_embd")


def attention(cfg: ModelConfig) -> str:
    """The attention kernel to build with: ``model.attn_implementation``, ``auto`` read as ``sdpa`` (the
    trainer resolves ``auto`` itself before building, knowing whether the model will be compiled)."""
    return "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation


def _llama_ffn(hidden: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4h, rounded up to a multiple of 256 (64 for tiny models)."""
    width = int(8 * hidden / 3)
    step = 256 if hidden >= 1024 else 64
    return step * ((width + step - 1) // step)


#: Set by :func:`deferred_weights`: :func:`build_model` builds on the meta device.
_DEFERRED = contextvars.ContextVar("distrib_deferred_weights", default=False)


@contextlib.contextmanager
def deferred_weights(enabled: bool = True):
    """Within, :func:`build_model` builds parameters on the meta device and records where their values come from.

    For tensor parallelism: AutoTP splits the model inside ``deepspeed.initialize``, and a rank that built
    the whole model first would hold all of it (about 140 GB for 70B in bf16, on every rank of a node).
    Built empty, the model is split empty and each rank then fills only its own shards
    (:func:`distrib.parallel.tensor_parallel.materialize_shards`). A distillation teacher is built the same way
    (:meth:`distrib.stages.distill.DistillStage.build_frozen` asks :func:`weights_deferred`).
    """
    token = _DEFERRED.set(enabled)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def weights_deferred() -> bool:
    """Whether models are built on the meta device here (within :func:`deferred_weights`)."""
    return _DEFERRED.get()


def build_model(cfg: ModelConfig, hf_cfg: PretrainedConfig, *, seed: int = 0, init_context=None,
                dtype=torch.float32, gathered: Gathered | None = None):
    """Instantiate the model: weights from ``cfg.pretrained`` or freshly initialised.

    Inside :func:`deferred_weights` (and not under ``init_context``) the parameters stay on the meta
    device and the model carries a :class:`~distrib.model.weights.WeightSource` giving each one's value,
    bitwise what this function would have put there; a pretrained model whose files do not name every
    parameter in safetensors is built whole as before.

    Args:
        cfg: the model section.
        hf_cfg: from :func:`hf_config`.
        seed: seed of the initial weights (see :func:`init_weights`).
        init_context: a context manager to build under (``deepspeed.zero.Init`` for ZeRO-3).
        dtype: parameter dtype at construction.
        gathered: how the fresh weights are written into a model built partitioned (see :func:`init_weights`).
    """
    model = None
    if _DEFERRED.get() and init_context is None:
        model = _build_empty(cfg, hf_cfg, seed, dtype)
    if model is None:
        ctx = init_context if init_context is not None else contextlib.nullcontext()
        with ctx:
            if cfg.pretrained:
                model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, config=hf_cfg, dtype=dtype,
                                                             attn_implementation=attention(cfg))
            else:
                # ``dtype``, not ``torch_dtype``: transformers 5 warns on every rank for the old name.
                model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype,
                                                         attn_implementation=attention(cfg))
        if not cfg.pretrained:
            init_weights(model, cfg, seed, gathered)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _build_empty(cfg: ModelConfig, hf_cfg: PretrainedConfig, seed: int, dtype) -> torch.nn.Module | None:
    """The model with its parameters on the meta device and a :class:`WeightSource` attached (buffers are real).

    ``None`` when the values cannot be read one tensor at a time (a pretrained model without safetensors
    files naming every parameter): that model is built whole.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=attention(cfg))
    names = [name for name, _ in model.named_parameters()]
    if cfg.pretrained:
        keys = safetensors_keys(Path(cfg.pretrained), names, model.base_model_prefix)
        if keys is None:
            return None
        source = WeightSource(cfg, seed, dtype, keys)
        model.eval()  # as from_pretrained leaves it
    else:
        source = WeightSource(cfg, seed, dtype)
    setattr(model, WEIGHT_SOURCE_ATTR, source)
    return model


def init_weights(model: torch.nn.Module, cfg: ModelConfig, seed: int, gathered: Gathered | None = None) -> None:
    """Initialise every parameter from its own name-seeded generator (:func:`~distrib.model.weights.initial_value`).

    The weights then depend only on ``seed`` and the architecture, not on the order modules are
    built in, the ZeRO stage (``zero.Init`` builds differently), the world size or tp: a run is
    comparable across layouts from step 0.

    Args:
        gathered: called with ``[parameter]``, a context manager within which that parameter is whole and
            after which what was written to it is kept (for a model built partitioned:
            :func:`distrib.parallel.zero.gathered`); by default each parameter is written as it is.

    Raises:
        RuntimeError: a parameter holds no values (it was built partitioned and ``gathered`` is not given).
    """
    for name, param in model.named_parameters():
        with gathered([param]) if gathered is not None else contextlib.nullcontext(), torch.no_grad():
            if param.numel() == 0:
                raise RuntimeError(f"{name} holds no values (built partitioned?): pass the function that "
                                   "gathers it as `gathered`")
            param.copy_(initial_value(name, tuple(param.shape), cfg, seed))


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
