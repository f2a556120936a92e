"""Distillation: a frozen teacher, a smaller student, logit and hidden-state losses, on the one loop.

What differs from pretraining is what is built and what the loss is:

* the **teacher** (``teacher:``) is a second model the loop wraps in a DeepSpeed engine without
  optimizer: eval mode, no gradients, no optimizer state, partitioned by ZeRO-3 and split by tensor
  parallelism like the student, never in a checkpoint (checkpoints record its path and sha256);
* the **student** is the model section (its own size, trained from scratch), a model of its own
  (``init_from``), or blocks cut from the teacher (``student.init_from_teacher_layers``: written once
  to ``<output_dir>/student_init/`` before any worker starts, then loaded like any pretrained model);
* the **loss** is :func:`distrib.train.distill.distill_loss` (``distill.loss.*``); the hidden-state term's
  projections train with the student as ``student.distill_projections`` and are dropped on export;
* **evaluation** reports the student's plain next-token loss (``eval_loss``, comparable with the
  teacher's and with pretraining) and, as parts, the distillation loss (``eval_loss/distill`` and its
  components) and the teacher's own next-token loss on the same blocks (``eval_loss/teacher``).

Everything that can be wrong with a teacher/student pair (no teacher, vocabularies that differ, a layer
the teacher lacks, a layer map naming a layer either model lacks) is found in :meth:`DistillStage.prepare`,
in the process the user started, before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from distrib.checkpoint.base import resolve_model_dir
from distrib.config import Config, ConfigError, FinetuneConfig, ModelConfig
from distrib.config.distill import _check_teacher_layers
from distrib.model import attention, build_model, depth_and_width, hf_config, weights_deferred
from distrib.model.student import (PROJECTIONS_ATTR, check_widths, make_projections, resolve_layer_map,
                                   student_from_teacher_layers)
from distrib.parallel.zero import gathered
from distrib.train.distill import distill_loss
from distrib.train.trainer import LossOut, next_token_ce_sum

#: Model keys that define an architecture; a student cut from the teacher takes them from the teacher.
_ARCHITECTURE_KEYS = ("arch", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                      "max_position_embeddings", "vocab_size", "rope_theta", "tie_embeddings")


def _read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


class DistillStage:
    name = "distill"

    def __init__(self):
        self.teacher = None  # the teacher's engine, given by the Trainer (bind)
        self.layer_map: list[list[int]] | None = None
        self.loss_cfg = None

    # -- before anything starts (the launching process) ---------------------------------------------
    @staticmethod
    def prepare(cfg: Config) -> Config:
        """Resolve the teacher and the student's weights; check that they fit together.

        Returns ``cfg`` with ``teacher`` the teacher's Hugging Face directory, ``data.tokenizer`` the
        teacher's tokenizer (unless set), and the student's ``model.pretrained`` (cut from the teacher,
        written by :meth:`materialize` once every other check has passed) or ``model.vocab_size`` (the
        teacher's, for a student of its own size). Writes nothing, except a teacher given as a checkpoint,
        exported once to ``<output_dir>/teacher``.

        Raises:
            ConfigError: one line for a missing teacher, vocabularies that differ, a teacher layer that
                does not exist, a layer map naming a layer a model lacks, or widths that cannot be compared.
        """
        if not cfg.teacher:
            raise ConfigError("distill needs teacher: a distrib run directory (e.g. runs/finetune-tiny-lora), a "
                              "checkpoint or a Hugging Face model directory")
        layers = cfg.student.init_from_teacher_layers
        if layers is not None:
            _refuse_architecture_keys(cfg)
        out = Path(cfg.output_dir)
        teacher = resolve_model_dir(cfg.teacher, "teacher", out / "teacher")
        t_raw = _read_config(teacher)
        t_vocab = t_raw.get("vocab_size")
        tokenizer = _tokenizer(cfg, teacher)
        _check_vocabulary(cfg, teacher, t_vocab)
        s_layers, s_width = _student_depth_and_width(cfg, t_raw)
        t_layers, t_width = depth_and_width(t_raw)
        check_widths(s_width, t_width, resolve_layer_map(cfg.distill, s_layers, t_layers), cfg.distill)
        _check_tp_divides_heads(cfg.parallel.tp, t_raw)

        data = cfg.data.model_copy(update={"tokenizer": tokenizer})
        update: dict = {"teacher": str(teacher), "data": data}
        if layers is not None:  # written by materialize(), once every check has passed
            update["model"] = cfg.model.model_copy(update={"pretrained": str(out / "student_init")})
        elif not cfg.model.pretrained:
            update["model"] = cfg.model.model_copy(update={"vocab_size": t_vocab})
        return cfg.model_copy(update=update)

    @staticmethod
    def materialize(cfg: Config) -> None:
        """Write what :meth:`prepare` promised: the student cut from the teacher (``<output_dir>/student_init``)."""
        layers = cfg.student.init_from_teacher_layers
        if layers is not None:
            _student_from_teacher(Path(cfg.teacher), layers, Path(cfg.model.pretrained), cfg.data.tokenizer)

    @staticmethod
    def check(cfg: Config) -> None:
        """Keys of other stages on a distillation run would be silently ignored: refuse them."""
        if cfg.finetune != FinetuneConfig():
            raise ConfigError("finetune.* keys are set but this is the distill stage; the student trains whole "
                              "(remove the finetune section), or fine-tune it afterwards with `distrib finetune`")

    # -- in every worker ----------------------------------------------------------------------------
    def build_model(self, cfg: Config, hf_cfg, dtype: torch.dtype) -> torch.nn.Module:
        """The student, with the hidden-state projections (when the loss needs them) attached as a submodule."""
        t_layers, t_width = depth_and_width(_read_config(Path(cfg.teacher)))
        student = build_model(cfg.model, hf_cfg, seed=cfg.seed, dtype=dtype, gathered=gathered)
        self.loss_cfg = cfg.distill.loss
        self.layer_map = resolve_layer_map(cfg.distill, student.config.num_hidden_layers, t_layers)
        projections = make_projections(student.config.hidden_size, t_width, self.layer_map, cfg.distill,
                                       seed=cfg.seed)
        if projections is not None:
            setattr(student, PROJECTIONS_ATTR, projections.to(dtype))
        return student

    def build_frozen(self, cfg: Config, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
        """The teacher, frozen, in the training precision (built under ZeRO-3's zero.Init when it applies).

        Split by tensor parallelism (within :func:`distrib.model.deferred_weights`) it is built on the meta
        device like the student, as the pretrained model in its directory, so that no rank ever holds the
        whole teacher: each rank then reads only its own shards from the teacher's safetensors files when
        its engine is built (:func:`distrib.parallel.tensor_parallel.materialize_shards`).
        """
        if weights_deferred():
            model_cfg = ModelConfig(pretrained=cfg.teacher, attn_implementation=cfg.model.attn_implementation)
            teacher = build_model(model_cfg, hf_config(model_cfg), seed=cfg.seed, dtype=dtype)
        else:
            teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=dtype,
                                                           attn_implementation=attention(cfg.model))
        teacher.config.use_cache = False
        teacher.requires_grad_(False)
        teacher.eval()
        return {"teacher": teacher}

    def bind(self, frozen: dict) -> None:
        """Receive the frozen models as the loop wrapped them (DeepSpeed engines without optimizer)."""
        self.teacher = frozen["teacher"]
        self.teacher.eval()

    def _forward(self, model, batch: dict):
        hidden = self.layer_map is not None
        with torch.no_grad():
            t_out = self.teacher(input_ids=batch["input_ids"], output_hidden_states=hidden)
        s_out = model(input_ids=batch["input_ids"], output_hidden_states=hidden)
        return s_out, t_out

    def _projections(self, model):
        return getattr(getattr(model, "module", model), PROJECTIONS_ATTR, None)

    def loss(self, model: torch.nn.Module, batch: dict):
        s_out, t_out = self._forward(model, batch)
        return distill_loss(s_out, t_out, batch["labels"], self.loss_cfg, self._projections(model), self.layer_map)

    def eval_loss(self, model: torch.nn.Module, batch: dict):
        """The student's next-token loss; the distillation loss and the teacher's next-token loss as parts."""
        s_out, t_out = self._forward(model, batch)
        labels = batch["labels"]
        out = distill_loss(s_out, t_out, labels, self.loss_cfg, self._projections(model), self.layer_map)
        parts = {"distill": out.total, **out.parts, "teacher": next_token_ce_sum(t_out.logits, labels)}
        return LossOut(total=next_token_ce_sum(s_out.logits, labels), tokens=out.tokens, parts=parts)


def _refuse_architecture_keys(cfg: Config) -> None:
    """A student cut from the teacher has the teacher's architecture: refuse model keys that would size it."""
    sized = [k for k in _ARCHITECTURE_KEYS if k in cfg.model.model_fields_set]
    if sized:
        raise ConfigError(
            f"model.{sized[0]} is set, but student.init_from_teacher_layers builds the student with the "
            f"teacher's architecture; remove model.{sized[0]}, or remove student.init_from_teacher_layers "
            "to train a student of your own size"
        )


def _tokenizer(cfg: Config, teacher: Path) -> str:
    """The tokenizer to train with: the teacher's, unless one is set (by the user, or by init_from's base)."""
    has_tokenizer = any((teacher / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = cfg.data.tokenizer
    if tokenizer is None:
        if not has_tokenizer:
            raise ConfigError(f"teacher={cfg.teacher!r} has no tokenizer in {teacher}; set data.tokenizer to the "
                              "tokenizer the teacher was trained with")
        return str(teacher)
    if has_tokenizer and Path(tokenizer).resolve() != teacher.resolve():
        _check_same_tokenizer(tokenizer, teacher, cfg)
    return tokenizer


def _check_vocabulary(cfg: Config, teacher: Path, t_vocab: int | None) -> None:
    """The student's vocabulary must be the teacher's: the KL terms compare distributions over it."""
    if cfg.student.init_from_teacher_layers is not None:
        s_vocab = t_vocab
    elif cfg.model.pretrained:
        s_vocab = _read_config(Path(cfg.model.pretrained)).get("vocab_size")
    else:
        s_vocab = cfg.model.vocab_size or t_vocab
    if s_vocab != t_vocab:
        where = "init_from's model" if cfg.model.pretrained else "model.vocab_size"
        raise ConfigError(
            f"vocabulary mismatch: the student's {where} has {s_vocab} tokens but the teacher {teacher} has "
            f"{t_vocab}; distillation compares distributions over one vocabulary, so "
            + ("use a student trained with the teacher's tokenizer" if cfg.model.pretrained
               else "remove model.vocab_size (the student takes the teacher's)")
        )


def _student_depth_and_width(cfg: Config, t_raw: dict) -> tuple[int, int]:
    """The student's layers and hidden size, from the configs alone (the teacher's config.json is ``t_raw``)."""
    layers = cfg.student.init_from_teacher_layers
    if layers is not None:
        t_layers, t_width = depth_and_width(t_raw)
        _check_teacher_layers(layers, t_layers)
        return len(layers), t_width
    if cfg.model.pretrained:
        return depth_and_width(_read_config(Path(cfg.model.pretrained)))
    return cfg.model.num_layers, cfg.model.hidden_size


def _check_tp_divides_heads(tp: int, t_raw: dict) -> None:
    """The teacher is split like the student: ``tp`` must divide its attention heads."""
    for key in ("num_attention_heads", "n_head", "num_key_value_heads"):
        n = t_raw.get(key)
        if tp > 1 and isinstance(n, int) and n % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide the teacher's {key}={n}; the teacher is split "
                              f"like the student, so pick a tp that divides {n}")


def _check_same_tokenizer(tokenizer: str, teacher: Path, cfg: Config) -> None:
    mine, theirs = AutoTokenizer.from_pretrained(tokenizer), AutoTokenizer.from_pretrained(teacher)
    if mine.get_vocab() != theirs.get_vocab():
        raise ConfigError(
            f"vocabulary mismatch: data.tokenizer={tokenizer!r} ({len(mine)} tokens) is not the teacher's tokenizer "
            f"({len(theirs)} tokens in {teacher}); distillation needs one vocabulary: remove data.tokenizer to use "
            "the teacher's"
        )


def _student_from_teacher(teacher: Path, layers: list[int], dest: Path, tokenizer: str) -> Path:
    """Write the student cut from ``teacher``'s blocks ``layers`` to ``dest`` once (kept on later starts)."""
    marker = dest / "distrib-layers.json"
    want = {"teacher": str(teacher), "layers": list(layers)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):  # the ranks of an srun/mpirun job all get here
        if marker.is_file() and json.loads(marker.read_text()) == want:
            return dest
        model = AutoModelForCausalLM.from_pretrained(teacher)
        student = student_from_teacher_layers(model, layers)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(tmp)
        (tmp / "distrib-layers.json").write_text(json.dumps(want))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    return dest
