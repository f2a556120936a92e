"""The root :class:`Config`: every section, the checks across sections, and the run's identity.

Keys that only steer *this* invocation are listed in :data:`RUN_CONTROL_KEYS`; everything else is hashed
(:meth:`Config.identity_hash`) into every checkpoint, and :func:`config_diff` names what a resume changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from distrib.config.data import DataConfig
from distrib.config.distill import DistillConfig, StudentConfig
from distrib.config.fields import Int, PathStr, _Section
from distrib.config.finetune import FinetuneConfig
from distrib.config.model import ModelConfig
from distrib.config.parallel import ParallelConfig, _check_deepspeed, _check_json
from distrib.config.train import CheckpointConfig, EvalConfig, ExportConfig, MetricsConfig, TrainConfig
from distrib.config.yaml_io import _Dumper, _one_line
from distrib.errors import ConfigError


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
        self.data.check_paths()

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
