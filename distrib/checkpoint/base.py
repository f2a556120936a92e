"""The weights a stage starts from (``init_from``): resolved to a Hugging Face directory, hashed, checked.

``init_from`` may name a local Hugging Face directory, a distrib run directory (its ``hf/`` export, or
its latest checkpoint when it has none) or a distrib checkpoint. A checkpoint is exported once into
``<output_dir>/base/``; afterwards that copy is the base, whatever happens to the source run, so a
resume always re-attaches the same weights. Starting from a base is weights only: no optimizer state,
no data position (that is resume's job).

A fine-tune's checkpoints hold only what trains; they record the base's path and a content hash, and
a resume whose base no longer has that hash is refused in one line. The hash reads every weight file, so
a job computes it on one rank (:func:`model_refs` under ``Topology.from_main``) and a process at most once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from filelock import FileLock

from distrib.config import Config, ConfigError

#: Files whose bytes define a base model (weights and architecture).
_DEFINING = ("config.json", "*.safetensors", "*.bin")


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def resolve_base(cfg: Config) -> Path | None:
    """The Hugging Face directory ``cfg.init_from`` names (exporting a checkpoint once), or None.

    Raises:
        ConfigError: ``init_from`` does not exist or holds no model.
    """
    if not cfg.init_from:
        return None
    return resolve_model_dir(cfg.init_from, "init_from", Path(cfg.output_dir) / "base")


def resolve_model_dir(value: str, key: str, copy: Path) -> Path:
    """The Hugging Face directory a model reference names: itself, a run's ``hf/``, or a checkpoint exported once.

    Args:
        value: what the user wrote (a Hugging Face directory, a distrib run directory or a checkpoint).
        key: the config key it came from, for messages (``init_from``, ``teacher``).
        copy: where a checkpoint is exported; once there, that copy is used whatever happens to the source.

    Raises:
        ConfigError: ``value`` does not exist or holds no model.
    """
    src = Path(value).expanduser()
    if (copy / "config.json").is_file():  # exported for this run earlier: keep using it
        return copy
    if not src.exists():
        raise ConfigError(f"{key}={value!r} does not exist; point it at a distrib run directory, "
                          "a checkpoint or a Hugging Face model directory")
    if _is_hf_dir(src):
        return src
    if _is_hf_dir(src / "hf"):
        return src / "hf"
    from distrib.checkpoint import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(src)
    except ConfigError:
        raise ConfigError(
            f"{key}={value!r} is not a model: no config.json with weights, no hf/ export and no "
            "checkpoint; point it at a distrib run directory, a checkpoint or a Hugging Face model directory"
        ) from None
    from distrib.checkpoint.export import export_checkpoint

    copy.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(copy) + ".lock"):  # the ranks of an srun/mpirun job all get here
        if not (copy / "config.json").is_file():
            export_checkpoint(ckpt, copy)
    return copy


def with_base(cfg: Config, base: Path | None) -> Config:
    """``cfg`` with the model and (unless set) the tokenizer taken from ``base``.

    Raises:
        ConfigError: ``data.tokenizer`` disagrees with the base model's vocabulary, or the base has no
            tokenizer and none is set.
    """
    if base is None:
        return cfg
    vocab = json.loads((base / "config.json").read_text()).get("vocab_size")
    tokenizer = cfg.data.tokenizer
    if tokenizer is None:
        if not any((base / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ConfigError(f"init_from={cfg.init_from!r} has no tokenizer in {base}; set data.tokenizer to the "
                              "tokenizer the model was trained with")
        tokenizer = str(base)
    else:
        from transformers import AutoTokenizer

        n = len(AutoTokenizer.from_pretrained(tokenizer))
        if vocab is not None and n > vocab:
            raise ConfigError(
                f"data.tokenizer={tokenizer!r} has {n} tokens but the model of init_from={cfg.init_from!r} has a "
                f"vocabulary of {vocab}; remove data.tokenizer to use the model's own tokenizer"
            )
    data = cfg.data.model_copy(update={"tokenizer": tokenizer})
    model = cfg.model.model_copy(update={"pretrained": str(base)})
    return cfg.model_copy(update={"data": data, "model": model})


#: What this process has hashed: {directory: (stamps, sha256)}, for a read-only directory (no stamp cache
#: beside the files) whose hash two steps of one process need (the resume check, then the Trainer).
_hashed: dict[Path, tuple[list, str]] = {}


def base_hash(base: Path) -> str:
    """sha256 over the files that define the model, cached beside them by size and mtime.

    The cache (``.distrib-hash.json`` in the directory, when writable) spares re-reading a large
    model's weights at every start; any change to a file's size or mtime recomputes it. A process
    also remembers what it hashed, so that a read-only directory is read once per process.
    """
    files = sorted({p for pattern in _DEFINING for p in base.glob(pattern) if p.is_file()})
    stamps = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    key = base.resolve()
    if key in _hashed and _hashed[key][0] == stamps:
        return _hashed[key][1]
    cache = base / ".distrib-hash.json"
    try:
        saved = json.loads(cache.read_text())
        if saved["stamps"] == stamps:
            _hashed[key] = (stamps, saved["sha256"])
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    value = digest.hexdigest()
    _hashed[key] = (stamps, value)
    try:
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamps": stamps, "sha256": value}))
        os.replace(tmp, cache)
    except OSError:  # a read-only model directory: this process remembers it, the next one hashes again
        pass
    return value


def model_ref(path: Path) -> dict:
    """How a checkpoint refers to a model it does not hold (a fine-tune's base, a distillation's teacher)."""
    return {"path": str(path), "sha256": base_hash(path)}


def model_refs(cfg: Config) -> dict[str, dict | None]:
    """The models ``cfg``'s checkpoints refer to without holding them: ``{"base": ref, "teacher": ref}``.

    Each is a :func:`model_ref`, or None when the run has no such model. Hashing reads every weight file
    unless the stamp cache is valid: a job runs this on one rank (``Topology.from_main``).
    """
    return {"base": model_ref(Path(cfg.model.pretrained)) if cfg.init_from else None,
            "teacher": model_ref(Path(cfg.teacher)) if cfg.teacher else None}


def check_base(cfg: Config, checkpoint: Path, now: dict[str, dict | None] | None = None) -> None:
    """Refuse to resume ``checkpoint`` onto a base (or teacher) whose content changed since it was saved.

    Args:
        cfg: the run's config (``model.pretrained`` and ``teacher`` name the models now).
        checkpoint: the checkpoint to resume.
        now: :func:`model_refs` of ``cfg`` when the caller has them (the ranks of a job get them from one
            rank); a model they do not cover is hashed here.

    Raises:
        ConfigError: the hashes differ.
    """
    from distrib.checkpoint import read_state

    state = read_state(checkpoint)
    now = now or {}
    for what, key, saved, now_path in (("base model", "base", state.base, cfg.model.pretrained),
                                       ("teacher", "teacher", state.teacher, cfg.teacher)):
        if not saved:
            continue
        path = Path(now_path or saved["path"])
        ref = now.get(key)
        if ref is not None and ref["path"] == str(path):
            sha = ref["sha256"]
        else:
            sha = base_hash(path) if path.is_dir() else "missing"
        if sha != saved["sha256"]:
            raise ConfigError(
                f"the {what} {path} has changed since {checkpoint.name} was saved (sha256 {sha[:12]}, the checkpoint "
                f"was trained with {saved['sha256'][:12]}); restore it, or set checkpoint.resume=false to start over"
            )
