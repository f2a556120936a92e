"""Checkpoint -> a Hugging Face directory that ``transformers`` loads unchanged.

Works offline from the checkpoint alone (it carries its config and tokenizer), so the same code
serves ``distrib export CHECKPOINT OUT_DIR`` and the export at the end of a run. ZeRO shards are
consolidated with DeepSpeed's own ``zero_to_fp32`` logic; weights are written as safetensors in the
training precision.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer

from distrib.checkpoint import convert_to_universal, read_state
from distrib.config import Config, ConfigError
from distrib.model import empty_model, hf_config
from distrib.parallelize import torch_dtype
from distrib.tensor_parallel import to_hf_layout


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint directory, whatever the ZeRO stage and tp."""
    if read_state(ckpt).tp > 1:
        # Tensor-parallel slices are merged by DeepSpeed's universal converter (using the merge
        # patterns AutoTP saved with the checkpoint); it leaves one whole fp32 tensor per parameter.
        zero = convert_to_universal(ckpt) / "zero"
        state = {d.name: torch.load(d / "fp32.pt", map_location="cpu", weights_only=True)["param"]
                 for d in sorted(zero.iterdir()) if (d / "fp32.pt").is_file()}
        cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
        return to_hf_layout(state, cfg)
    if not any(ckpt.glob("*model_states.pt")):  # a run in which nothing trained saved no engine state
        return {}
    if any(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # A fine-tune's checkpoint leaves frozen weights out (they are the base's); pretraining has none.
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, exclude_frozen_parameters=True)
    # ZeRO-0 in fp32 keeps whole weights (and the optimizer) in the model-states file.
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in state["module"].items()}


def export_checkpoint(ckpt: Path, out_dir: Path, adapter_dir: Path | None = None) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files) from checkpoint ``ckpt``.

    A fine-tune's checkpoint (trained on a base, ``init_from``) is re-attached to its base; with LoRA the
    adapters are also written in peft's own format to ``adapter_dir`` (default ``out_dir/adapter``) and
    merged into the weights of ``out_dir``.

    Raises:
        ConfigError: ``ckpt`` is not a checkpoint, or ``out_dir`` holds something other than an export.
    """
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not (ckpt / "trainer_state.json").is_file() or not (ckpt / "config.yaml").is_file():
        raise ConfigError(f"{ckpt} is not a distrib checkpoint (no trainer_state.json); pass <output_dir>/checkpoints/step_N")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ConfigError(f"{out_dir} exists and is not an earlier export; choose an empty or new directory")
    cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    dtype = torch_dtype(cfg.precision)
    state = consolidated_state_dict(ckpt)
    if cfg.teacher:  # the hidden-state projections trained with the student and are not part of it
        from distrib.distill import PROJECTIONS_ATTR

        state = {k: v for k, v in state.items() if not k.startswith(PROJECTIONS_ATTR + ".")}
    adapter = None
    if cfg.init_from:
        model, adapter = _on_base(cfg, state, ckpt, dtype, staging=out_dir.parent)
    else:
        hf_cfg = hf_config(cfg.model, vocab_size=len(tokenizer), seq_len=cfg.data.seq_len)
        model = empty_model(hf_cfg)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = {"lm_head.weight"} if hf_cfg.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
    model = model.to(dtype)
    model.config.dtype = dtype
    model.config.use_cache = True
    _publish(out_dir, lambda tmp: (model.save_pretrained(tmp, safe_serialization=True), tokenizer.save_pretrained(tmp)))
    if adapter is not None:
        _publish(Path(adapter_dir) if adapter_dir else out_dir / "adapter", lambda tmp: os.replace(adapter, tmp))
    return out_dir


def _on_base(cfg: Config, state: dict[str, torch.Tensor], ckpt: Path, dtype: torch.dtype, staging: Path):
    """The fine-tuned model: its base with the same frozen parts and adapters, the trained tensors loaded.

    Returns:
        the plain model (LoRA merged), and the peft adapter directory written under ``staging`` (None
        without LoRA).
    """
    from transformers import AutoModelForCausalLM

    from distrib.adapters import apply_freeze, apply_lora, merged_model, save_adapter

    base = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, dtype=torch.float32)
    apply_freeze(base, cfg.finetune)
    model = apply_lora(base, cfg.finetune, seed=cfg.seed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = trainable - set(state)
    unexpected = set(state) - {n for n, _ in model.named_parameters()}
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match its base {cfg.model.pretrained}: missing "
                           f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
    if not cfg.finetune.lora.enabled:
        return model, None
    model = model.to(dtype)  # the adapter as it trained: on the base in the training precision
    # peft saves from the live model: write the adapter now, before merging consumes it.
    staging.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".adapter-", dir=staging))
    save_adapter(model, staged)
    return merged_model(model.to(torch.float32)), staged


def _publish(out_dir: Path, write) -> None:
    """``write(tmp)`` then swap ``tmp`` in for ``out_dir`` (the old export stays whole until then)."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
