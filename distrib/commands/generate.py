"""Text from an exported model, and how fast a model decodes.

``distrib generate MODEL_DIR --prompt TEXT`` prints the prompt's continuation. ``MODEL_DIR`` is any
directory a run exports: a Hugging Face directory (``<output_dir>/hf``, loaded with
``AutoModelForCausalLM`` and ``AutoTokenizer``), a run directory (its ``hf/`` is used), or a fine-tune's
peft ``adapter/`` directory, applied to the base its ``adapter_config.json`` names.

:func:`generation_speed` measures greedy decoding with the KV cache in tokens per second; the run report
uses it to compare a distilled student with its teacher on the same machine.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distrib.config import ConfigError

if TYPE_CHECKING:
    import torch  # imported where used: a bad argument is refused before torch loads

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's pieces live: the weights directory, an optional peft adapter on them, the tokenizer."""

    weights: Path
    adapter: Path | None
    tokenizer: Path | None


def is_hf_dir(path: Path) -> bool:
    """A directory ``from_pretrained`` can load weights from: ``config.json`` beside safetensors or bin files."""
    path = Path(path)
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def hf_dir_of(path: str | Path) -> Path | None:
    """The Hugging Face directory ``path`` stands for: ``path`` itself or its ``hf/`` export; None if neither."""
    path = Path(path).expanduser()
    for candidate in (path, path / "hf"):
        if is_hf_dir(candidate):
            return candidate
    return None


def resolve_model(model_dir: str | Path) -> ModelSource:
    """What ``model_dir`` names: an HF directory, a run directory (its ``hf/``) or a peft adapter directory.

    Raises:
        ConfigError: ``model_dir`` holds none of these, or an adapter's base model is missing.
    """
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise ConfigError(f"{model_dir} does not exist; pass a run directory, its hf/ export or its adapter/ directory")
    hf = hf_dir_of(path)
    if hf is not None:
        return ModelSource(hf, None, hf if _has_tokenizer(hf) else None)
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        try:
            base_name = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"{adapter_config} is not valid JSON; re-export the run with distrib export") from None
        base = hf_dir_of(base_name) if base_name else None
        if base is None:
            raise ConfigError(
                f"the adapter {path} is for the base model {base_name!r}, which is not a model directory here; "
                f"pass the merged export ({path.parent / 'hf'}) instead"
            )
        tokenizer = path if _has_tokenizer(path) else base if _has_tokenizer(base) else None
        return ModelSource(base, path, tokenizer)
    raise ConfigError(
        f"{model_dir} is not a model directory (no config.json with weights, no hf/ export, no adapter_config.json); "
        "pass a run directory, its hf/ export or its adapter/ directory"
    )


def _device() -> torch.device:
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(source: ModelSource, device: torch.device | None = None) -> torch.nn.Module:
    """The model of ``source`` in eval mode on ``device`` (default: the GPU if any, else the CPU).

    On the CPU the weights are cast to fp32: bf16 and fp16 matmuls are slow or unsupported there.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    device = device or _device()
    dtype = torch.float32 if device.type == "cpu" else "auto"
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load would bury the one line of output
    try:
        model = AutoModelForCausalLM.from_pretrained(source.weights, dtype=dtype)
        if source.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(source.adapter))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def load_tokenizer(source: ModelSource, model_dir: str | Path):
    """The tokenizer saved with the model.

    Raises:
        ConfigError: there is none, or it does not load.
    """
    from transformers import AutoTokenizer

    if source.tokenizer is None:
        raise ConfigError(f"{model_dir} has no tokenizer (no tokenizer.json or tokenizer_config.json in "
                          f"{source.weights}); export the run again with distrib export, which saves it")
    try:
        return AutoTokenizer.from_pretrained(source.tokenizer)
    except Exception as e:  # tokenizers raises bare Exception; the directory is the only input here
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"the tokenizer in {source.tokenizer} does not load ({type(e).__name__}: {detail}); "
                          "export the run again with distrib export") from None


def _check_args(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    if not temperature >= 0:
        raise ConfigError(f"--temperature={temperature} must be 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p={top_p} must be in (0, 1]; 1 keeps the whole distribution")


def _learned_positions(config) -> int | None:
    """The position table size of models with learned absolute positions (GPT-2's n_positions), else None."""
    n = getattr(config, "n_positions", None)
    return n if isinstance(n, int) else None


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> str:
    """The continuation of ``prompt`` (without the prompt) by the model in ``model_dir``.

    Greedy when ``temperature`` is 0, else sampling at ``temperature`` with nucleus ``top_p``, seeded by
    ``seed`` so a command repeats. Decoding uses the KV cache and stops at the end-of-text token or after
    ``max_new_tokens`` tokens; special tokens are left out of the text.

    Raises:
        ConfigError: ``model_dir`` is not a model with a tokenizer, or an argument is out of range.
    """
    _check_args(max_new_tokens, temperature, top_p)
    source = resolve_model(model_dir)
    import torch

    tokenizer = load_tokenizer(source, model_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ConfigError("the prompt is empty and the tokenizer has no bos or eos token to start from; "
                              "pass a non-empty --prompt")
        ids = torch.tensor([[start]])
    model = load_model(source)
    limit = _learned_positions(model.config)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ConfigError(f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens={max_new_tokens} exceeds the "
                          f"model's {limit} positions; shorten the prompt or lower --max-new-tokens")
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                             **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generation_speed(model_dir: str | Path, prompt_tokens: int = 32, new_tokens: int = 32, repeats: int = 3,
                     device: torch.device | None = None) -> float:
    """Greedy decoding speed of the model in ``model_dir``, in new tokens per second.

    A fixed random prompt of ``prompt_tokens`` tokens (seeded, the same for every model of a vocabulary)
    is decoded for exactly ``new_tokens`` tokens with the KV cache (``use_cache=True``: exported configs
    turn it off for training). One untimed warm-up run comes first (allocations, kernel selection); the
    result is the median over ``repeats`` timed runs, so one disturbed run does not decide it. The
    prompt's forward pass is part of the time, as it is for a user.

    Raises:
        ConfigError: ``model_dir`` is not a model, or an argument is below 1.
    """
    if min(prompt_tokens, new_tokens, repeats) < 1:
        raise ConfigError(f"prompt_tokens={prompt_tokens}, new_tokens={new_tokens} and repeats={repeats} "
                          "must all be at least 1")
    import torch

    model = load_model(resolve_model(model_dir), device)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=gen).to(model.device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  use_cache=True, pad_token_id=0)

    def once() -> float:
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return (out.shape[1] - prompt_tokens) / (time.perf_counter() - start)

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def command(args, cfg=None) -> int:
    """``distrib generate MODEL_DIR --prompt TEXT [...]``."""
    print(generate(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed))
    return 0
