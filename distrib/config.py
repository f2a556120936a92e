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
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which causal LM to build.

    Either ``pretrained`` (a local Hugging Face directory) or an architecture built from the
    size fields below. ``vocab_size`` defaults to the tokenizer's length.
    """

    arch: Literal["llama", "gpt2"] = "llama"
    pretrained: str | None = None
    hidden_size: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    max_position_embeddings: int | None = Field(None, gt=0)
    vocab_size: int | None = Field(None, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_embeddings: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_std: float = Field(0.02, gt=0)
    activation_checkpointing: bool = False

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


class DataConfig(_Section):
    """Where text comes from, how it is tokenized and packed.

    ``source``: ``builtin`` (an offline corpus built from this Python's standard library; ``name`` picks
    the domain, ``code`` or ``prose``), ``files`` (local text/jsonl/json/parquet, ``train_files`` and optional
    ``validation_files``) or ``hub`` (``name`` is a Hugging Face dataset id, for clusters with network).
    """

    source: Literal["builtin", "files", "hub"] = "builtin"
    name: str | None = "code"
    hub_config: str | None = None
    train_files: list[str] = Field(default_factory=list)
    validation_files: list[str] = Field(default_factory=list)
    text_field: str = "text"
    validation_fraction: float = Field(0.02, gt=0.0, lt=0.5)
    max_documents: int | None = Field(None, gt=0)
    seq_len: int = Field(256, gt=1)
    tokenizer: str | None = None
    vocab_size: int = Field(4096, ge=300)
    num_proc: int = Field(2, gt=0)
    cache_dir: str | None = None
    trace_samples: bool = False

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "builtin" and self.name not in ("code", "prose"):
            raise ConfigError(f"data.name={self.name!r} is not a built-in corpus; use data.name=code or data.name=prose")
        if self.source == "files" and not self.train_files:
            raise ConfigError("data.source=files needs data.train_files (a list of .txt/.jsonl/.json/.parquet paths or globs)")
        if self.source == "hub" and not self.name:
            raise ConfigError("data.source=hub needs data.name, a Hugging Face dataset id such as 'HuggingFaceFW/fineweb'")
        return self


class TrainConfig(_Section):
    """Optimisation and schedule. ``global_batch_size`` = micro batch x gradient accumulation x data-parallel size."""

    max_steps: int = Field(100, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    global_batch_size: int = Field(8, gt=0)
    lr: float = Field(3e-4, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(10, ge=0)
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, gt=0.0, lt=1.0)
    beta2: float = Field(0.95, gt=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    exit_after_steps: int | None = Field(None, gt=0)
    exit_after_minutes: float | None = Field(None, gt=0.0)
    log_every_steps: int = Field(1, gt=0)

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

    zero_stage: Literal[0, 1, 2, 3] = 1
    tp: int = Field(1, gt=0)
    offload_optimizer: bool = False
    offload_params: bool = False

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
    every_steps: int = Field(100, gt=0)
    keep_last: int = Field(2, gt=0)
    resume: bool = True


class EvalConfig(_Section):
    """Validation loss every ``every_steps`` on the first ``max_samples`` blocks (the same set at any dp size)."""

    every_steps: int = Field(50, gt=0)
    max_samples: int = Field(64, gt=0)
    at_start: bool = True


class MetricsConfig(_Section):
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: float | None = Field(None, gt=0.0)


class ExportConfig(_Section):
    at_end: bool = True


class Config(_Section):
    output_dir: str = "runs/default"
    seed: int = 1234
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    deepspeed: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.parallel.offload_params and self.precision == "fp16":
            raise ConfigError("parallel.offload_params with precision=fp16 is not supported here; use precision=bf16")
        max_pos = self.model.max_position_embeddings
        if self.model.pretrained is None and max_pos is not None and max_pos < self.data.seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings={max_pos}; "
                "lower data.seq_len or raise the model's context"
            )
        if "train_micro_batch_size_per_gpu" in self.deepspeed or "train_batch_size" in self.deepspeed:
            raise ConfigError("set batch sizes with train.micro_batch_size/train.global_batch_size, not under deepspeed.*")
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
        """(attention heads, key/value heads), read from ``model.pretrained`` when set."""
        if self.model.pretrained:
            cfg_file = Path(self.model.pretrained) / "config.json"
            raw = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            heads = raw.get("num_attention_heads") or raw.get("n_head") or 1
            return heads, raw.get("num_key_value_heads") or heads
        return self.model.num_heads, self.model.num_kv_heads or self.model.num_heads

    def check_paths(self) -> None:
        """Checks that the files the run reads exist; run before any process group is made."""
        import glob

        if self.model.pretrained and not (Path(self.model.pretrained) / "config.json").is_file():
            raise ConfigError(
                f"model.pretrained={self.model.pretrained!r} is not a Hugging Face model directory (no config.json)"
            )
        if self.data.tokenizer and not Path(self.data.tokenizer).is_dir():
            raise ConfigError(f"data.tokenizer={self.data.tokenizer!r} is not a directory; point it at a saved tokenizer")
        if self.data.source == "files":
            for key in ("train_files", "validation_files"):
                for pattern in getattr(self.data, key):
                    if not glob.glob(pattern):
                        raise ConfigError(f"data.{key}: {pattern!r} matches no file; fix the path or glob")

    def identity_hash(self) -> str:
        """Hash of everything that defines the run (not the run-control keys)."""
        data = self.model_dump(mode="json")
        for key in RUN_CONTROL_KEYS:
            _pop_path(data, key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


#: Keys that may change between a run and its resume: they steer one invocation, not the run.
RUN_CONTROL_KEYS = (
    "output_dir",
    "train.exit_after_steps",
    "train.exit_after_minutes",
    "train.log_every_steps",
    "checkpoint",
    "eval",
    "metrics",
    "export",
    "data.num_proc",
    "data.cache_dir",
    "data.trace_samples",
    "parallel.offload_optimizer",
    "parallel.offload_params",
)


def _pop_path(data: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.get(p, {})
    data.pop(leaf, None)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} is not key.path=value; write e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    return key.strip().split("."), value


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for p in path[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {p} is a value, not a section")
        node = child
    node[path[-1]] = value


def _describe(err: dict, data: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        section = Config
        for p in err["loc"][:-1]:
            section = section.model_fields[p].annotation
        valid = ", ".join(sorted(section.model_fields)) if isinstance(section, type) and issubclass(section, BaseModel) else ""
        return f"unknown key {loc!r}; valid keys here: {valid}"
    if kind == "value_error" and isinstance(err.get("ctx", {}).get("error"), ConfigError):
        return str(err["ctx"]["error"])
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{loc}: {err['msg'].rstrip('.')}{got_s}; fix {loc} in the YAML or with {loc}=VALUE"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML, apply ``key.path=value`` overrides, validate.

    Raises:
        ConfigError: one line naming the offending key and the fix.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file such as configs/pretrain/tiny.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, not {type(data).__name__}")
    data = copy.deepcopy(data)
    for item in overrides:
        key, value = parse_override(item)
        _apply_override(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0], data)) from None
    except ConfigError:
        raise


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
