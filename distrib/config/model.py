"""``model.*``: which causal LM a run builds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distrib.config.fields import Float, Int, PathStr, _Section
from distrib.errors import ConfigError


#: ``model.compile=auto`` compiles runs of at least this many optimizer steps (see :class:`ModelConfig`).
COMPILE_MIN_STEPS = 500


class ModelConfig(_Section):
    """Which causal LM to build.

    Either ``pretrained`` (a local Hugging Face directory) or an architecture built from the
    size fields below. ``vocab_size`` defaults to the tokenizer's length.
    """

    arch: Literal["llama", "gpt2"] = "llama"
    pretrained: PathStr | None = None
    hidden_size: Int = Field(256, gt=0)
    num_layers: Int = Field(4, gt=0)
    num_heads: Int = Field(4, gt=0)
    num_kv_heads: Int | None = Field(None, gt=0)
    intermediate_size: Int | None = Field(None, gt=0)
    max_position_embeddings: Int | None = Field(None, gt=0)
    vocab_size: Int | None = Field(None, gt=0)
    rope_theta: Float = Field(10000.0, gt=0)
    tie_embeddings: bool = False
    dropout: Float = Field(0.0, ge=0.0, lt=1.0)
    init_std: Float = Field(0.02, gt=0)
    activation_checkpointing: bool = False
    #: ``torch.compile`` the model (and the loss) before the first step: ``true``, ``false`` or ``auto``,
    #: which compiles a run of at least :data:`COMPILE_MIN_STEPS` steps where compilation works (tp 1,
    #: a compiler for the device) and skips shorter runs, which do not win back its tens of
    #: seconds. Where it cannot work the run says so in one line and trains uncompiled.
    compile: bool | Literal["auto"] = "auto"
    #: The attention kernel: ``sdpa`` (PyTorch's fused scaled-dot-product attention), ``eager`` (matmuls and a
    #: softmax, which torch.compile fuses itself) or ``auto``: ``eager`` for a compiled model on the CPU, where
    #: the compiled matmuls beat the CPU's sdpa kernel, else ``sdpa`` (see :func:`distrib.train.trainer.attention_for`).
    attn_implementation: Literal["auto", "sdpa", "eager"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.pretrained is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                    "pick a head count that divides the hidden size"
                )
            kv = self.num_kv_heads or self.num_heads
            if self.num_heads % kv:
                raise ConfigError(
                    f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads={kv}; "
                    "grouped-query attention needs num_heads % num_kv_heads == 0"
                )
            if self.arch == "gpt2" and self.num_kv_heads not in (None, self.num_heads):
                raise ConfigError("model.num_kv_heads is Llama-only; remove it for model.arch=gpt2")
        return self
