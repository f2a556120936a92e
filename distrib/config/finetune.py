"""``finetune.*``: which parameters a fine-tune freezes and trains, and its LoRA adapters.

The rules that apply these keys to a model are in :mod:`distrib.model.adapters`.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from distrib.config.fields import Float, Int, _Section
from distrib.errors import ConfigError


class FreezeConfig(_Section):
    """What stays frozen before anything is made trainable again by ``finetune.trainable``."""

    #: Input embeddings and other embedding tables outside the blocks (GPT-2 ``wpe``); a tied head too.
    embeddings: bool = False
    #: The output head (``lm_head``); tied input embeddings too.
    head: bool = False
    #: Freeze transformer blocks ``0 .. bottom_layers - 1``.
    bottom_layers: Int = Field(0, ge=0)
    #: ``fnmatch`` patterns over parameter names to freeze as well.
    patterns: list[str] = Field(default_factory=list)
    #: Freeze every base weight on purpose: with no adapters nothing trains and the run only measures the
    #: loss (a control); without this key a configuration that freezes everything is refused.
    all: bool = False


class LoraConfig(_Section):
    """LoRA adapters through ``peft``: off unless ``rank`` is set."""

    rank: Int | None = None
    alpha: Float = Field(16.0, gt=0.0)
    dropout: Float = Field(0.0, ge=0.0, lt=1.0)
    #: Module names (peft's rule: a module's full name or a dot-separated suffix of it, e.g. ``q_proj``
    #: or ``attn.c_proj``); default per architecture, see :data:`DEFAULT_TARGETS`.
    target_modules: list[str] | None = None
    #: Also train the norm layers the freeze left trainable (peft ``modules_to_save``).
    train_norms: bool = False
    #: Also train the biases the freeze left trainable (peft ``bias="all"``).
    train_biases: bool = False

    @property
    def enabled(self) -> bool:
        return self.rank is not None

    @model_validator(mode="after")
    def _check(self) -> "LoraConfig":
        if self.rank is not None and self.rank < 1:
            raise ConfigError(
                f"finetune.lora.rank={self.rank} must be at least 1; set a rank such as 8, "
                "or remove finetune.lora.rank to fine-tune without LoRA"
            )
        if self.rank is None:
            # Only values that differ from the default: a dumped config (config.yaml) holds every key.
            for key, field in type(self).model_fields.items():
                if key != "rank" and getattr(self, key) != field.get_default(call_default_factory=True):
                    raise ConfigError(
                        f"finetune.lora.{key} is set but finetune.lora.rank is not; set finetune.lora.rank "
                        f"(e.g. 8) to fine-tune with LoRA, or remove finetune.lora.{key}"
                    )
        if self.target_modules is not None:
            if not self.target_modules:
                raise ConfigError(
                    "finetune.lora.target_modules is empty; list module names such as [q_proj, v_proj], "
                    "or remove it for the architecture's default"
                )
            for name in self.target_modules:
                if not name.strip() or name != name.strip() or ".." in name or name.startswith(".") or name.endswith("."):
                    raise ConfigError(
                        f"finetune.lora.target_modules: {name!r} is not a module name; write names such as q_proj "
                        "or attn.c_proj"
                    )
        return self


class FinetuneConfig(_Section):
    """Which parameters a fine-tune trains. All keys combine; see :mod:`distrib.model.adapters`."""

    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    #: Train only the top K transformer blocks and the final norm (embeddings and head frozen).
    train_top_layers: Int | None = Field(None, gt=0)
    #: ``fnmatch`` patterns over parameter names made trainable after freezing (wins over every freeze).
    trainable: list[str] = Field(default_factory=list)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if self.train_top_layers is not None and self.freeze.bottom_layers:
            raise ConfigError(
                f"finetune.train_top_layers={self.train_top_layers} and finetune.freeze.bottom_layers="
                f"{self.freeze.bottom_layers} both choose the frozen layers; set only one of them"
            )
        return self
