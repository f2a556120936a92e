"""``parallel.*`` and the raw ``deepspeed`` section: how the model is spread, and what DeepSpeed may still be told.

The typed keys own every DeepSpeed setting they generate (:data:`DEEPSPEED_OWNED`); the raw section only tunes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from distrib.config.fields import Float, Int, _Section, _whole_number
from distrib.config.yaml_io import _dotted, _show
from distrib.errors import ConfigError


class ParallelConfig(_Section):
    """How the model is spread: ZeRO stage, tensor parallel size, CPU offload."""

    zero_stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(_whole_number)] = 1
    tp: Int = Field(1, gt=0)
    offload_optimizer: bool = False
    offload_params: bool = False
    #: How long a collective may wait for a rank before the job ends naming it.
    timeout_minutes: Float = Field(30.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
        if self.tp > 1 and self.zero_stage == 3:
            raise ConfigError(
                f"parallel.tp={self.tp} with parallel.zero_stage=3 is not supported (its checkpoints cannot be "
                "consolidated); use parallel.zero_stage=1 or 2 with tensor parallelism, or parallel.tp=1"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("parallel.offload_params needs parallel.zero_stage=3")
        return self


def _set(typed: str) -> str:
    """The usual fix for a DeepSpeed key the typed config owns."""
    return f"remove it from deepspeed and set {typed}"


_PRECISION = _set("precision=bf16, precision=fp16 or precision=fp32")

#: DeepSpeed keys the typed config owns: dotted path under ``deepspeed`` -> (typed key, fix).
#:
#: :func:`distrib.parallel.engine.deepspeed_config` generates these from typed keys, and ``deepspeed.*``
#: is merged over its output last, so a raw value would silently win while checkpoints, the resume
#: check, ``distrib plan`` and ``zero.Init`` still believe the typed one (``parallel.zero_stage=1`` with
#: ``deepspeed.zero_optimization.stage=3`` trained ZeRO-3). Any such key is refused, whatever its
#: value, and so is a non-mapping value given for a section on the way to one (``deepspeed.bf16=true``
#: replaces the generated ``bf16`` section). ``{v}`` in a fix is the value that was given. Keys not listed
#: here (``zero_optimization.reduce_bucket_size``, ``optimizer.params.torch_adam``, ``fp16.initial_scale_power``,
#: ``offload_optimizer.pin_memory``, ``comms_logger``, ``flops_profiler``, ...) tune DeepSpeed and stay allowed.
DEEPSPEED_OWNED: dict[str, tuple[str, str]] = {
    "zero_optimization.stage": ("parallel.zero_stage", _set("parallel.zero_stage={v}")),
    "zero_optimization.offload_optimizer.device": (
        "parallel.offload_optimizer", _set("parallel.offload_optimizer=true or false")),
    "zero_optimization.offload_param.device": (
        "parallel.offload_params", _set("parallel.offload_params=true or false")),
    "zero_optimization.cpu_offload": ("parallel.offload_optimizer", _set("parallel.offload_optimizer={v}")),
    "zero_optimization.cpu_offload_param": ("parallel.offload_params", _set("parallel.offload_params={v}")),
    "bf16.enabled": ("precision", _PRECISION),
    "bfloat16.enabled": ("precision", _PRECISION),
    "fp16.enabled": ("precision", _PRECISION),
    "torch_autocast.enabled": ("precision", _PRECISION),
    "amp": ("precision", _PRECISION),
    "train_batch_size": ("train.global_batch_size", _set("train.global_batch_size={v}")),
    "train_micro_batch_size_per_gpu": ("train.micro_batch_size", _set("train.micro_batch_size={v}")),
    "gradient_accumulation_steps": (
        "train.global_batch_size",
        _set("train.global_batch_size = train.micro_batch_size x {v} x data-parallel size"),
    ),
    "gradient_clipping": ("train.grad_clip", _set("train.grad_clip={v}")),
    "optimizer.type": (
        "distrib (always AdamW)",
        "remove it from deepspeed and tune AdamW with train.lr, train.beta1, train.beta2, train.eps and "
        "train.weight_decay",
    ),
    "optimizer.params.lr": ("train.lr", _set("train.lr={v}")),
    "optimizer.params.betas": ("train.beta1 and train.beta2", _set("train.beta1 and train.beta2")),
    "optimizer.params.eps": ("train.eps", _set("train.eps={v}")),
    "optimizer.params.weight_decay": ("train.weight_decay", _set("train.weight_decay={v}")),
    "scheduler": (
        "train.lr_decay and train.warmup_steps",
        _set("train.lr_decay, train.warmup_steps and train.min_lr_ratio"),
    ),
    "tensor_parallel.autotp_size": ("parallel.tp", _set("parallel.tp={v}")),
    "tensor_parallel.tp.tp_size": ("parallel.tp", _set("parallel.tp={v}")),
    "checkpoint.load_universal": (
        "distrib itself",
        "remove it from deepspeed (a resume at another data-parallel size converts to and loads the universal "
        "format automatically)",
    ),
}


def _check_json(node: Any, path: tuple = (), _done: set | None = None) -> None:
    """Refuse values of the raw ``deepspeed`` section that JSON cannot hold.

    DeepSpeed's config is JSON; YAML can also give dates (``2024-01-01``), sets (``!!set``) and bytes
    (``!!binary``), which would break writing config.yaml into a checkpoint or DeepSpeed itself.
    """
    _done = set() if _done is None else _done
    if isinstance(node, (dict, list)):
        if id(node) in _done:
            return
        _done.add(id(node))
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            _check_json(child, (*path, key), _done)
    elif node is not None and not isinstance(node, (str, int, float)):
        raise ConfigError(
            f"deepspeed.{_dotted(path)}={_show(node)} is a {type(node).__name__}, which DeepSpeed's JSON config "
            "cannot hold; quote it or write a number, string, boolean, list or mapping"
        )


def _check_deepspeed(ds: dict) -> None:
    """Refuse the first key of :data:`DEEPSPEED_OWNED` found in ``ds`` (the raw ``deepspeed`` section)."""
    for path, (typed, fix) in DEEPSPEED_OWNED.items():
        parts = path.split(".")
        node: Any = ds
        for depth, part in enumerate(parts, 1):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
            given = ".".join(parts[:depth])
            if depth == len(parts):
                if isinstance(node, str):
                    value = node if node.isprintable() and 0 < len(node) <= 60 else "VALUE"
                else:
                    value = _show(node) if isinstance(node, (int, float)) or node is None else "VALUE"
                raise ConfigError(f"deepspeed.{path} is set by {typed}; {fix.format(v=value)}")
            if not isinstance(node, dict):
                raise ConfigError(
                    f"deepspeed.{given}={_show(node)} replaces the section holding deepspeed.{path}, which is set by "
                    f"{typed}; {fix.format(v='VALUE')}"
                )
