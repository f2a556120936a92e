"""Typed run configuration: YAML + ``key.path=value`` overrides -> validated :class:`Config`.

Every section owns its schema and its checks. Errors are raised as :class:`ConfigError`, a
one-line message naming the key and how to fix it; the CLI turns it into exit code 2 before
any process group starts or any file is written.

Keys that only steer *this* invocation (how long it runs, how often it logs) are listed in
:data:`RUN_CONTROL_KEYS`; everything else is part of the run's identity, hashed into every
checkpoint so that a resume with a changed model, data or optimizer is refused.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key and the fix."""


# -- YAML ------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e3``, ``5e-5``, ``1E+3`` and ``1.0e3`` as floats.

    PyYAML follows YAML 1.1, whose float pattern needs a dot and a signed exponent, so ``1e3``
    and ``1.0e3`` were the *strings* '1e3' and '1.0e3' and ``train.max_steps=1e3`` was refused.
    YAML 1.2 (and every JSON reader) reads them as numbers; so do we, in files and overrides alike.
    Only implicit resolution changes: no new tags, nothing beyond ``safe_load``'s plain types.
    """


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings :class:`_Loader` would read as floats (``output_dir: '1e3'``).

    ``<output_dir>/config.yaml`` is a config file too: it must load back to the same values.
    """


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _parse_yaml(text: str) -> Any:
    """``yaml.load`` with :class:`_Loader` (safe: plain scalars, lists and mappings only).

    Raises:
        ValueError: a one-line reason. PyYAML signals bad input with ``YAMLError`` but also with
            ``ValueError`` (an impossible date such as 2024-13-45, ``!!int abc``) and deep nesting
            with ``RecursionError``; all of them mean "this text is not a config we can read".
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        reason = e.problem or e.context or type(e).__name__
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{_one_line(reason)}{where}") from None
    except RecursionError:
        raise ValueError(f"nested more than Python can parse; keep it under {_MAX_DEPTH} levels") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        raise ValueError(_one_line(str(e)) or type(e).__name__) from None


def _one_line(text: str) -> str:
    """The first line of ``text`` (a library's message), without trailing punctuation."""
    lines = str(text).splitlines()
    return lines[0].strip().rstrip(".:") if lines else ""


def _show(value: Any, limit: int = 60) -> str:
    """``value`` as the user would write it in YAML, on one line and at most ``limit`` characters."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, float) and not math.isfinite(value):
        text = ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    elif isinstance(value, int):
        try:
            text = str(value)
        except ValueError:  # more digits than int -> str converts
            text = f"<a {value.bit_length()}-bit integer>"
    else:
        text = repr(value)  # escapes newlines and other line breaks
    return _clip(text, limit)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dotted(parts: Any) -> str:
    """A key path for a message: ``train.lr``, or its repr if a user-typed part holds a line break or control character."""
    text = ".".join(str(p) for p in parts)
    return text if text.isprintable() else repr(text)


#: Deepest nesting a config value may have; real configs use under 10 levels, and pydantic's
#: serializer (config.yaml, the identity hash) gives up a little beyond 250.
_MAX_DEPTH = 100


def _check_tree(node: Any, source: str, path: tuple = (), _open: set | None = None, _done: set | None = None) -> None:
    """Refuse what YAML can express but a config cannot: non-string keys, self-containing aliases, deep nesting.

    A key YAML reads as a boolean or number (``on:``, ``yes:``, ``1:``) would otherwise surface as a
    confusing schema error far from its cause; an alias that contains itself (``a: &x [*x]``) makes an
    infinitely deep value, and a very deep one loads but cannot be dumped or hashed later, when the
    run is already up. Shared aliases are fine and are visited once, so a "billion laughs" document
    is checked in linear time.
    """
    _open = set() if _open is None else _open
    _done = set() if _done is None else _done
    if not isinstance(node, (dict, list)) or id(node) in _done:
        return
    where = _dotted(path) or "the top level"
    if id(node) in _open:
        raise ConfigError(
            f"{source}: the YAML alias at {where} refers to a value that contains it; remove the recursive alias"
        )
    if len(path) >= _MAX_DEPTH:
        raise ConfigError(
            f"{source}: the value at {_clip(where, 100)} is nested more than {_MAX_DEPTH} levels deep; flatten it"
        )
    _open.add(id(node))
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, child in items:
        if isinstance(node, dict) and not isinstance(key, str):
            under = f"under {where}" if path else "at the top level"
            raise ConfigError(
                f"{source}: key {_show(key)} {under} is not a string (YAML read it as {type(key).__name__}); "
                "quote it in the YAML"
            )
        _check_tree(child, source, (*path, key), _open, _done)
    _open.discard(id(node))
    _done.add(id(node))


# -- typed scalars ---------------------------------------------------------------------------


def _whole_number(value: Any) -> Any:
    """Before-validator of integer fields: no booleans, and floats only when they are whole.

    YAML ``true`` is a Python ``bool``, an ``int`` subclass that pydantic would take as 1
    (``model.hidden_size=true`` built a 1-wide model). Exponent notation gives floats
    (``train.max_steps=1e3`` is 1000.0), which are accepted when integral.
    """
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_int", "a boolean is not an integer")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticCustomError("finite_number", "not a finite number")
        if not value.is_integer():
            raise PydanticCustomError("not_whole", "not a whole number")
        return int(value)
    return value


def _real_number(value: Any) -> Any:
    """Before-validator of float fields: no booleans, no integers beyond float's range.

    Integers are fine (``train.lr=1`` is 1.0); ``true`` is not a number even though it is an int.
    """
    if isinstance(value, bool):
        raise PydanticCustomError("bool_for_float", "a boolean is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "not a finite number")  # before gt/ge, which .nan fails obscurely
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            raise PydanticCustomError("too_large", "too large for a float") from None
    return value


def _no_nul(value: str) -> str:
    """After-validator of path fields: a NUL character makes every ``os`` call raise ValueError, not OSError."""
    if "\x00" in value:
        raise PydanticCustomError("nul_in_path", "a path cannot hold a NUL character")
    return value


#: A filesystem path given as a string.
PathStr = Annotated[str, AfterValidator(_no_nul)]
#: An integer config field: YAML ints and whole floats (``1e3``), never booleans.
Int = Annotated[int, BeforeValidator(_whole_number)]
#: A float config field: finite ints or floats, never booleans, ``.nan`` or ``.inf``.
Float = Annotated[float, BeforeValidator(_real_number), AllowInfNan(False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    #: the compiled matmuls beat the CPU's sdpa kernel, else ``sdpa`` (see :func:`distrib.trainer.attention_for`).
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


#: The files ``data.train_files`` and ``data.validation_files`` may name (read by :mod:`distrib.readers`).
DATA_FILE_TYPES = ".txt/.jsonl/.json/.csv/.parquet (the first four also compressed as .gz/.bz2/.xz)"


class DataConfig(_Section):
    """Where text comes from, how it is tokenized and packed.

    ``source``: ``builtin`` (an offline corpus built from this Python's standard library; ``name`` picks
    the domain, ``code``, ``prose`` or ``instruct``), ``files`` (local files, ``train_files`` and optional
    ``validation_files``, each a list of paths and globs of :data:`DATA_FILE_TYPES`) or ``hub`` (``name`` is a
    Hugging Face dataset id, for clusters with network).

    ``format``: ``text`` (documents in ``text_field``, packed back to back for pretraining) or
    ``prompt_response`` (rows with ``prompt_field`` and ``response_field``; the loss is on the responses
    only). The built-in ``instruct`` corpus (documented standard-library functions: docstring -> code) is
    always ``prompt_response``, whatever ``format`` says.
    """

    source: Literal["builtin", "files", "hub"] = "builtin"
    name: str | None = "code"
    hub_config: str | None = None
    train_files: list[PathStr] = Field(default_factory=list)
    validation_files: list[PathStr] = Field(default_factory=list)
    text_field: str = "text"
    format: Literal["text", "prompt_response"] = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    validation_fraction: Float = Field(0.02, gt=0.0, lt=0.5)
    max_documents: Int | None = Field(None, gt=0)
    seq_len: Int = Field(256, gt=1)
    tokenizer: PathStr | None = None
    vocab_size: Int = Field(4096, ge=300)
    num_proc: Int = Field(2, gt=0)
    cache_dir: PathStr | None = None
    trace_samples: bool = False

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "builtin" and self.name not in ("code", "prose", "instruct"):
            raise ConfigError(
                f"data.name={self.name!r} is not a built-in corpus; use data.name=code, data.name=prose or data.name=instruct"
            )
        if self.source == "builtin" and self.name != "instruct" and self.format == "prompt_response":
            raise ConfigError(
                f"data.format=prompt_response needs prompt/response rows, but the built-in corpus data.name={self.name!r} "
                "is plain text; use data.name=instruct or data.format=text"
            )
        if self.format == "prompt_response" and self.prompt_field == self.response_field:
            raise ConfigError(
                f"data.prompt_field and data.response_field are both {self.prompt_field!r}; name two different fields"
            )
        if self.source == "files" and not self.train_files:
            raise ConfigError(f"data.source=files needs data.train_files, a list of paths or globs of data files: {DATA_FILE_TYPES}")
        if self.source == "hub" and not self.name:
            raise ConfigError("data.source=hub needs data.name, a Hugging Face dataset id such as 'HuggingFaceFW/fineweb'")
        return self


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


def _set(typed: str) -> str:
    """The usual fix for a DeepSpeed key the typed config owns."""
    return f"remove it from deepspeed and set {typed}"


_PRECISION = _set("precision=bf16, precision=fp16 or precision=fp32")

#: DeepSpeed keys the typed config owns: dotted path under ``deepspeed`` -> (typed key, fix).
#:
#: :func:`distrib.parallelize.deepspeed_config` generates these from typed keys, and ``deepspeed.*``
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
    """Which parameters a fine-tune trains. All keys combine; see this module's docstring."""

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


# -- distillation ----------------------------------------------------------------------------
#: The loss components, in the order they are summed, with the words a message uses for each.
COMPONENTS: dict[str, str] = {
    "kl": "forward KL term",
    "reverse_kl": "reverse KL term",
    "ce": "cross-entropy term",
    "hidden": "hidden-state term",
}


def _num(value: float) -> str:
    """A weight as the user wrote it: ``-1``, ``0.5``, ``1e-30``."""
    return f"{value:g}"


class DistillLossConfig(_Section):
    """Weights of the distillation loss components and the softmax temperature (see this module's docstring)."""

    #: Forward KL(teacher || student) over the vocabulary, scaled by temperature^2.
    kl: Float = 1.0
    #: Reverse KL(student || teacher), scaled by temperature^2.
    reverse_kl: Float = 0.0
    #: Next-token cross-entropy of the student on the data (temperature 1).
    ce: Float = 0.0
    #: MSE between mapped hidden states (``distill.layer_map``).
    hidden: Float = 0.0
    #: Softmax temperature of both KL terms; above 1 softens both distributions.
    temperature: Float = 1.0

    @model_validator(mode="after")
    def _check(self) -> "DistillLossConfig":
        for key, what in COMPONENTS.items():
            value = getattr(self, key)
            if value < 0:
                raise ConfigError(
                    f"distill.loss.{key}={_num(value)} must be >= 0; set it to 0 to leave the {what} out, "
                    "or to a positive weight"
                )
        if all(getattr(self, key) == 0 for key in COMPONENTS):
            raise ConfigError(
                "distill.loss: every weight is 0, so nothing would be learned; "
                "set distill.loss.kl=1 (or ce, reverse_kl, hidden)"
            )
        if self.temperature <= 0:
            raise ConfigError(
                f"distill.loss.temperature={_num(self.temperature)} must be > 0; set distill.loss.temperature=1 "
                "(or above 1 to soften both distributions)"
            )
        return self

    def weights(self) -> dict[str, float]:
        """The components with weight > 0 -> their weights, in :data:`COMPONENTS` order."""
        return {key: getattr(self, key) for key in COMPONENTS if getattr(self, key) > 0}


def _pair_problem(pair: Any) -> str | None:
    """Why ``pair`` is not a ``[student_layer, teacher_layer]`` pair of non-negative ints, or None."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in pair):
        return "is not a pair of layer indices; write [student_layer, teacher_layer] pairs such as [[2, 4], [4, 8]]"
    if min(pair) < 0:
        return "holds a negative layer; hidden-state indices start at 0 (the embeddings output)"
    return None


def _show_pair(pair: Any) -> str:
    return f"[{', '.join(str(x) for x in pair)}]" if isinstance(pair, (list, tuple)) else repr(pair)


def _check_pairs(layer_map: Sequence) -> None:
    """Checks of ``distill.layer_map`` that need no model: non-empty, pairs of ints >= 0, no pair twice."""
    if len(layer_map) == 0:
        raise ConfigError(
            "distill.layer_map is empty; list [student_layer, teacher_layer] pairs, or remove it for the default "
            "evenly spaced map"
        )
    seen: set[tuple[int, int]] = set()
    for pair in layer_map:
        problem = _pair_problem(pair)
        if problem:
            raise ConfigError(f"distill.layer_map: {_show_pair(pair)} {problem}")
        if tuple(pair) in seen:
            raise ConfigError(f"distill.layer_map: {_show_pair(pair)} is listed twice; list each pair once")
        seen.add(tuple(pair))


class DistillConfig(_Section):
    """What the student learns from the teacher: loss weights, which hidden states meet, projections."""

    loss: DistillLossConfig = Field(default_factory=DistillLossConfig)
    #: ``[student_layer, teacher_layer]`` pairs of HF hidden-state indices (0 = embeddings output) for the
    #: hidden-state loss; unset: student layer i -> teacher layer round(i * T / S) (see the module docstring).
    layer_map: list[list[Int]] | None = None
    #: Learned linear projection student width -> teacher width for the hidden-state loss:
    #: null = when the widths differ, true = always, false = never (the widths must be equal).
    projection: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.layer_map is not None:
            _check_pairs(self.layer_map)
        if self.loss.hidden == 0:
            for key in ("layer_map", "projection"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"distill.{key} is set but distill.loss.hidden is 0, so no hidden states are compared; "
                        f"set distill.loss.hidden (e.g. 1), or remove distill.{key}"
                    )
        return self


def _check_teacher_layers(layers: Sequence, n_teacher: int | None = None) -> None:
    """Checks of ``student.init_from_teacher_layers``; with ``n_teacher``, also that every index exists."""
    key = "student.init_from_teacher_layers"
    teacher = f"the teacher's {n_teacher} layers (0..{n_teacher - 1})" if n_teacher is not None else "the teacher's layers"
    if len(layers) == 0:
        raise ConfigError(
            f"{key} is empty; list which of {teacher} to copy, e.g. [0, 2], or remove it to initialise the "
            "student randomly"
        )
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ConfigError(f"{key}: {i!r} is not a layer index; list whole numbers such as [0, 2]")
        if i < 0:
            upto = f" to {n_teacher - 1}" if n_teacher is not None else ""
            raise ConfigError(f"{key}: {i} is negative; use teacher layer indices from 0{upto}")
        if n_teacher is not None and i >= n_teacher:
            raise ConfigError(
                f"{key}: {i} names no layer of the teacher, which has {n_teacher} layers; use indices 0..{n_teacher - 1}"
            )
    seen: set[int] = set()
    for i in layers:
        if i in seen:
            raise ConfigError(f"{key}: layer {i} is listed twice; list each of {teacher} at most once")
        seen.add(i)
    for a, b in zip(layers, layers[1:]):
        if b < a:
            raise ConfigError(
                f"{key}=[{', '.join(map(str, layers))}] is not increasing ({b} after {a}); list the teacher layers "
                f"bottom to top, e.g. [{', '.join(map(str, sorted(layers)))}]"
            )


class StudentConfig(_Section):
    """How the student starts. Its size comes from the model section; these keys only say where weights come from."""

    #: Teacher block indices (0-based, increasing) whose weights initialise the student's blocks, in order;
    #: embeddings, final norm and head are copied too. The student then has len(...) layers.
    init_from_teacher_layers: list[Int] | None = None

    @model_validator(mode="after")
    def _check(self) -> "StudentConfig":
        if self.init_from_teacher_layers is not None:
            _check_teacher_layers(self.init_from_teacher_layers)
        return self


class Config(_Section):
    output_dir: PathStr = Field("runs/default", min_length=1)
    # numpy's sampler RNG refuses negative seeds, and torch.manual_seed takes 64 bits (the trainer adds rank and step)
    seed: Int = Field(1234, ge=0, lt=2**63)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    #: Start from these weights (a distrib run directory, a checkpoint or a Hugging Face directory):
    #: weights, architecture and tokenizer only, never optimizer state or data position.
    init_from: PathStr | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    #: Distillation: the frozen teacher (a distrib run directory, a checkpoint, or a Hugging Face directory).
    teacher: PathStr | None = None
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    deepspeed: dict[str, Any] = Field(default_factory=dict)

    @field_validator("deepspeed")
    @classmethod
    def _check_deepspeed_section(cls, ds: dict[str, Any]) -> dict[str, Any]:
        _check_deepspeed(ds)
        _check_json(ds)
        return ds

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.finetune.lora.enabled and self.parallel.tp > 1:
            raise ConfigError(
                f"finetune.lora with parallel.tp={self.parallel.tp} is not supported: DeepSpeed AutoTP does not split "
                "peft's LoRA layers; use parallel.tp=1 (LoRA's trainable state is small; ZeRO-3 partitions a large "
                "frozen base)"
            )
        if self.parallel.tp > 1 and self.finetune != FinetuneConfig():
            raise ConfigError(
                f"frozen parameters (finetune.*) with parallel.tp={self.parallel.tp} are not supported: DeepSpeed's "
                "converter that merges tensor-parallel checkpoints handles trained parameters only, so the run could "
                "not be exported; use parallel.tp=1 (ZeRO-3 partitions a large frozen base instead)"
            )
        if self.student.init_from_teacher_layers is not None:
            if self.init_from:
                raise ConfigError(
                    "init_from and student.init_from_teacher_layers both say where the student's weights come from; "
                    "keep one of them"
                )
        if self.parallel.offload_params and self.precision == "fp16":
            raise ConfigError("parallel.offload_params with precision=fp16 is not supported here; use precision=bf16")
        max_pos = self.model.max_position_embeddings
        if self.model.pretrained is None and max_pos is not None and max_pos < self.data.seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings={max_pos}; "
                "lower data.seq_len or raise the model's context"
            )
        return self

    # -- derived quantities ------------------------------------------------------------------
    def dp_size(self, world_size: int) -> int:
        return world_size // self.parallel.tp

    def grad_accum_steps(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.dp_size(world_size))

    def check_world(self, world_size: int) -> None:
        """Checks that need the number of ranks; run before any process group is made."""
        tp = self.parallel.tp
        if world_size % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide the world size {world_size}; use a tp that divides it")
        if tp > 1:
            heads, kv = self._head_counts()
            for key, n in (("num_heads", heads), ("num_kv_heads", kv)):
                if n % tp:
                    raise ConfigError(
                        f"parallel.tp={tp} does not divide model.{key}={n}; tensor parallelism splits attention "
                        f"heads across ranks, so pick a tp that divides {n}"
                    )
        dp = world_size // tp
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of train.micro_batch_size "
                f"x data-parallel size = {self.train.micro_batch_size} x {dp} = {per_step}; "
                f"set train.global_batch_size to a multiple of {per_step}"
            )

    def _head_counts(self) -> tuple[int, int]:
        """(attention heads, key/value heads), read from ``model.pretrained`` when set.

        A student cut from its teacher (``student.init_from_teacher_layers``) has the teacher's heads.
        """
        source = self.model.pretrained
        if self.student.init_from_teacher_layers is not None and self.teacher:
            source = self.teacher
        if source:
            cfg_file = Path(source) / "config.json"
            try:
                raw = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise ConfigError(
                    f"model.pretrained={self.model.pretrained!r} has an unreadable config.json ({_one_line(e)}); "
                    "point it at a save_pretrained directory"
                ) from None
            raw = raw if isinstance(raw, dict) else {}

            def count(*names: str, default: int) -> int:
                values = (raw.get(n) for n in names)
                return next((v for v in values if type(v) is int and v > 0), default)

            heads = count("num_attention_heads", "n_head", default=1)
            return heads, count("num_key_value_heads", default=heads)
        return self.model.num_heads, self.model.num_kv_heads or self.model.num_heads

    def check_paths(self) -> None:
        """Checks that the files the run reads exist and that it can write ``output_dir``.

        Run before any process group is made: a file where the run directory should be would
        otherwise surface as a traceback from the first mkdir, on every rank.
        """
        import glob

        out = Path(self.output_dir)
        for parent in (out, *out.parents):
            try:
                if not (parent.exists() or parent.is_symlink()):
                    continue
                if parent.is_dir():
                    break
            except OSError:
                break  # unreadable: leave the error to the run, which reports the path
            fix = "set output_dir to a new or existing run directory"
            if parent == out and out.is_file():
                raise ConfigError(f"output_dir={self.output_dir!r} is a file, not a directory; {fix}")
            if parent == out:
                raise ConfigError(f"output_dir={self.output_dir!r} exists but is not a directory; {fix}")
            raise ConfigError(
                f"output_dir={self.output_dir!r} is inside {str(parent)!r}, which is not a directory; "
                "set output_dir to a path under a directory"
            )
        if self.model.pretrained and not (Path(self.model.pretrained) / "config.json").is_file():
            raise ConfigError(
                f"model.pretrained={self.model.pretrained!r} is not a Hugging Face model directory (no config.json); "
                "point it at a save_pretrained directory"
            )
        if self.data.tokenizer and not Path(self.data.tokenizer).is_dir():
            raise ConfigError(f"data.tokenizer={self.data.tokenizer!r} is not a directory; point it at a saved tokenizer")
        if self.data.source == "files":
            for key in ("train_files", "validation_files"):
                for pattern in getattr(self.data, key):
                    pattern = os.path.expanduser(pattern)
                    # A "**" matches no directory too, which glob.glob does only with recursive=True, and
                    # that follows a link loop around; distrib.readers expands it, loop-safe, when the
                    # data is prepared (still before any worker starts).
                    if "**" not in pattern and not glob.glob(pattern):
                        raise ConfigError(f"data.{key}: {pattern!r} matches no file; fix the path or glob")

    def identity_hash(self) -> str:
        """Hash of everything that defines the run (not the run-control keys)."""
        data = self.model_dump(mode="json")
        for key in RUN_CONTROL_KEYS:
            _pop_path(data, key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        """The resolved config as YAML that :func:`load_config` reads back to the same config."""
        return yaml.dump(self.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


#: Keys that may change between a run and its resume: they steer one invocation, not the run.
RUN_CONTROL_KEYS = (
    "output_dir",
    "train.exit_after_steps",
    "train.exit_after_minutes",
    "train.log_every_steps",
    "train.nonfinite",
    "train.keep_host_memory",
    "parallel.timeout_minutes",
    "checkpoint",
    "eval",
    "metrics",
    "export",
    "data.num_proc",
    "data.cache_dir",
    "data.trace_samples",
    "parallel.offload_optimizer",
    "parallel.offload_params",
    # How the same computation runs: a resume may switch them (the losses agree within bf16 rounding).
    "model.compile",
    "model.attn_implementation",
)


def _pop_path(data: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.get(p, {})
    data.pop(leaf, None)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``key.path=value`` into the key's parts and the value, read as YAML (``1e-4`` is a float).

    An empty value (``train.exit_after_steps=``) is null. Each key part is stripped of spaces.

    Raises:
        ConfigError: no ``=``, an empty key part (``a..b=1``, ``.a=1``, ``a.=1``) or a value that is
            not valid YAML.
    """
    shown = f"override {_show(item, 100)}"
    if "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"{shown} is not key.path=value; write e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise ConfigError(f"{shown} has an empty part in the key {_show(key.strip(), 100)}; write e.g. train.lr=1e-4")
    try:
        value = _parse_yaml(raw) if raw.strip() else None
    except ValueError as e:
        raise ConfigError(f"{shown} has a value that is not valid YAML ({e}); fix it or quote it") from None
    _check_tree(value, shown, tuple(parts))
    return parts, value


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (``train`` -> TrainConfig), or None."""
    if isinstance(annotation, type) and typing.get_origin(annotation) is None and issubclass(annotation, BaseModel):
        return annotation
    return None


def _is_section(annotation: Any) -> bool:
    """Whether a field holds keys (a section, or the raw ``deepspeed`` mapping) rather than a value."""
    return _section_model(annotation) is not None or typing.get_origin(annotation) is dict


def _apply_override(data: dict, path: list[str], value: Any, item: str = "") -> None:
    """Set ``data[path[0]]...[path[-1]] = value``, creating the sections on the way.

    A part of the path that names a value in the schema (``train.lr`` in ``train.lr.x=1``) or that
    already holds a value is refused; unknown keys are left for validation, which suggests a spelling.
    """
    shown = f"override {_show(item or '.'.join(path), 100)}"
    node: dict = data
    section: type[BaseModel] | None = Config  # None under deepspeed.* and under unknown keys
    for depth, part in enumerate(path[:-1], 1):
        prefix = _dotted(path[:depth])
        field = section.model_fields.get(part) if section is not None else None
        if field is not None and not _is_section(field.annotation):
            raise ConfigError(f"{shown}: {prefix} is a value, not a section; set {prefix}=VALUE instead")
        section = _section_model(field.annotation) if field is not None else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"{shown}: {prefix} is already set to {_show(child)}, not a section; set {prefix}=VALUE instead"
            )
        node = child
    node[path[-1]] = value


#: Messages for the typed-scalar errors of :data:`Int` and :data:`Float`, by pydantic error type.
_SCALAR_ERRORS = {
    "bool_for_int": "{loc}={got} is a boolean, not an integer; set {loc} to a whole number",
    "bool_for_float": "{loc}={got} is a boolean, not a number; set {loc} to a number",
    "not_whole": "{loc}={got} is not a whole number; set {loc} to an integer",
    "finite_number": "{loc}={got} is not a finite number; set {loc} to a finite number",
    "too_large": "{loc}={got} is too large; set {loc} to a smaller number",
    "nul_in_path": "{loc}={got} holds a NUL character, which no path can; fix the path",
}


def _describe(err: dict, data: dict) -> str:
    """One line for pydantic's first error: the key, what is wrong with it and how to fix it."""
    loc = _dotted(err["loc"])
    # the key a user can set: the dotted path up to any list index (data.train_files, not data.train_files.0)
    key = _dotted(err["loc"][: next((i for i, p in enumerate(err["loc"]) if not isinstance(p, str)), None)])
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        section: Any = Config
        names = err["loc"][:-1]
        for p in names:
            section = _section_model(section.model_fields[p].annotation) if section is not None else None
        fields = sorted(section.model_fields) if section is not None else []
        what = "section" if isinstance(got, dict) else "key"
        close = difflib.get_close_matches(str(err["loc"][-1]), fields, n=1)
        hint = f"; did you mean {'.'.join([*map(str, names), close[0]])!r}?" if close else ";"
        unknown = ".".join(str(p) for p in err["loc"])  # repr below escapes whatever the user typed
        return f"unknown {what} {unknown!r}{hint} valid keys here: {', '.join(fields)}"
    if kind == "value_error" and isinstance(err.get("ctx", {}).get("error"), ConfigError):
        return str(err["ctx"]["error"])
    if kind in _SCALAR_ERRORS:
        return _SCALAR_ERRORS[kind].format(loc=loc, got=_show(got))
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{loc} is a section of keys, not {_show(got)}; set keys under it (e.g. {loc}.KEY=VALUE) or remove it"
    got_s = "" if isinstance(got, dict) else f" (got {_show(got)})"
    return f"{loc}: {_one_line(err['msg'])}{got_s}; fix {key} in the YAML or with {key}=VALUE"


def _read_config_file(path: str | Path) -> dict:
    """The mapping a config file holds.

    Raises:
        ConfigError: the path is missing, a directory or unreadable; the file is empty (or only
            comments or ``null``), not valid YAML, not a mapping, or has non-string keys.
    """
    p = Path(path)
    name = f"config file {str(p)!r}"
    if p.is_dir():
        raise ConfigError(f"{name} is a directory, not a YAML file; pass a file such as configs/pretrain/tiny.yaml")
    if not p.exists():
        raise ConfigError(f"{name} does not exist; pass a YAML file such as configs/pretrain/tiny.yaml")
    if not p.is_file():
        raise ConfigError(f"{name} is not a regular file; pass a YAML file such as configs/pretrain/tiny.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{name} is not UTF-8 text; save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"{name} cannot be read ({_one_line(e.strerror or e)}); check its permissions") from None
    try:
        data = _parse_yaml(text)
    except ValueError as e:
        raise ConfigError(f"{name} is not valid YAML: {e}; fix the syntax there") from None
    if data is None:
        # Training the defaults into runs/default is never what an empty file meant.
        raise ConfigError(
            f"{name} is empty (no keys, only comments or null); add keys, e.g. start from configs/pretrain/tiny.yaml"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name} must hold a mapping of keys, not {type(data).__name__}; write one key: value per line, "
            "e.g. 'precision: bf16'"
        )
    _check_tree(data, name)
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML, apply ``key.path=value`` overrides, validate.

    Any input either gives a :class:`Config` or raises :class:`ConfigError` (one line); nothing else
    escapes, whatever the file or the overrides hold (``tests/unit/test_config_properties.py``).

    Raises:
        ConfigError: one line naming the offending key and the fix.
    """
    data: dict = _read_config_file(path) if path is not None else {}
    data = copy.deepcopy(data)
    for item in overrides:
        key, value = parse_override(item)
        _apply_override(data, key, value, item)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0], data)) from None


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two dumped configs (run-control keys ignored)."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        if any(key == rc or key.startswith(rc + ".") for rc in RUN_CONTROL_KEYS):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, key + ".")
        elif a != b:
            diffs.append(f"{key} ({a!r} -> {b!r})")
    return diffs
