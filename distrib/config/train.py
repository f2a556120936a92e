"""``train``, ``checkpoint``, ``eval``, ``metrics`` and ``export`` sections: the loop and what it saves and measures."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distrib.config.fields import Float, Int, _Section
from distrib.errors import ConfigError


class TrainConfig(_Section):
    """Optimisation and schedule. ``global_batch_size`` = micro batch x gradient accumulation x data-parallel size."""

    max_steps: Int = Field(100, gt=0)
    micro_batch_size: Int = Field(4, gt=0)
    global_batch_size: Int = Field(8, gt=0)
    lr: Float = Field(3e-4, gt=0.0)
    min_lr_ratio: Float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: Int = Field(10, ge=0)
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: Float = Field(0.1, ge=0.0)
    #: Weight decay applies to matrices only: never to biases or norms, and to embeddings only when true.
    decay_embeddings: bool = False
    beta1: Float = Field(0.9, gt=0.0, lt=1.0)
    beta2: Float = Field(0.95, gt=0.0, lt=1.0)
    eps: Float = Field(1e-8, gt=0.0)
    grad_clip: Float = Field(1.0, ge=0.0)
    exit_after_steps: Int | None = Field(None, gt=0)
    exit_after_minutes: Float | None = Field(None, gt=0.0)
    log_every_steps: Int = Field(1, gt=0)
    #: What a non-finite loss does: ``stop`` (name the step, save nothing) or ``skip`` the micro-batch.
    nonfinite: Literal["stop", "skip"] = "stop"
    #: On the CPU, keep host memory a step frees for the next step instead of returning it to the OS
    #: (see :func:`distrib.utils.keep_freed_host_memory`): each step then reuses its activations' pages
    #: rather than faulting in fresh zeroed ones. The resident size stays at its peak.
    keep_host_memory: bool = True

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}; make it micro batch x accumulation x data-parallel size"
            )
        if self.warmup_steps >= self.max_steps and self.max_steps > 1:
            raise ConfigError(
                f"train.warmup_steps={self.warmup_steps} must be below train.max_steps={self.max_steps}; shorten the warmup"
            )
        return self


class CheckpointConfig(_Section):
    every_steps: Int = Field(100, gt=0)
    keep_last: Int = Field(2, gt=0)
    resume: bool = True


class EvalConfig(_Section):
    """Validation loss every ``every_steps`` on the first ``max_samples`` blocks (the same set at any dp size)."""

    every_steps: Int = Field(50, gt=0)
    max_samples: Int = Field(64, gt=0)
    at_start: bool = True


class MetricsConfig(_Section):
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: Float | None = Field(None, gt=0.0)


class ExportConfig(_Section):
    """What a finished run writes to ``<output_dir>/hf``.

    ``at_end``: export when the run reaches ``train.max_steps``. ``max_shard_size`` (``5GB``, ``500MB``):
    weights above it are split into ``model-0000i-of-0000N.safetensors`` files with an index, as
    ``save_pretrained`` splits them (``transformers``' default, 50GB, keeps most models in one file);
    the ranks of the run write the files in parallel.
    """

    at_end: bool = True
    max_shard_size: str = "50GB"

    @model_validator(mode="after")
    def _check(self) -> "ExportConfig":
        file_size(self.max_shard_size, "export.max_shard_size")
        return self


def file_size(value: str, key: str) -> int:
    """Bytes in ``value`` (``5GB``, ``500MB``: the sizes ``save_pretrained`` takes), or one line naming ``key``."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = parse_size_to_int(value)
    except ValueError:
        size = 0
    if size <= 0:
        raise ConfigError(f"{key}={value!r} is not a size; write it as a number and a unit, such as 5GB, 500MB or 100KB")
    return size
