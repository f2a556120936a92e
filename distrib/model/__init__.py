"""Build plain Hugging Face causal LMs from :class:`~distrib.config.ModelConfig`.

Model code knows nothing of distribution: parallelism is applied afterwards by
:mod:`distrib.parallel.engine`. Under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` so
that no rank ever holds the whole model; under tensor parallelism, for the same reason, it is built
on the meta device and each rank fills only its shards once AutoTP has split it
(:func:`deferred_weights`, :func:`distrib.parallel.tensor_parallel.materialize_shards`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from distrib.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from distrib.parallel.tensor_parallel import Part


def hf_config(cfg: ModelConfig, vocab_size: int | None = None, seq_len: int | None = None) -> PretrainedConfig:
    """The ``transformers`` config for ``cfg`` (read from ``cfg.pretrained`` when set).

    Args:
        cfg: the model section.
        vocab_size: the tokenizer's length, used when ``cfg.vocab_size`` is unset.
        seq_len: the training context, used when ``cfg.max_position_embeddings`` is unset.
    """
    if cfg.pretrained:
        path = Path(cfg.pretrained)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.pretrained={cfg.pretrained!r} has no config.json; point it at a save_pretrained directory")
        return AutoConfig.from_pretrained(path)
    vocab = cfg.vocab_size or vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size is unknown: set it or let the tokenizer define it")
    if cfg.vocab_size and vocab_size and cfg.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            "raise it or leave it unset to follow the tokenizer"
        )
    max_pos = cfg.max_position_embeddings or seq_len or 2048
    if cfg.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size or _llama_ffn(cfg.hidden_size),
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
            max_position_embeddings=max_pos,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings,
            attention_dropout=cfg.dropout,
            initializer_range=cfg.init_std,
            use_cache=False,
        )
    return GPT2Config(
        vocab_size=vocab,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size,
        n_positions=max_pos,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        use_cache=False,
    )


def attention(cfg: ModelConfig) -> str:
    """The attention kernel to build with: ``model.attn_implementation``, ``auto`` read as ``sdpa`` (the
    trainer resolves ``auto`` itself before building, knowing whether the model will be compiled)."""
    return "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation


def _llama_ffn(hidden: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4h, rounded up to a multiple of 256 (64 for tiny models)."""
    width = int(8 * hidden / 3)
    step = 256 if hidden >= 1024 else 64
    return step * ((width + step - 1) // step)


#: Set by :func:`deferred_weights`: :func:`build_model` builds on the meta device.
_DEFERRED = contextvars.ContextVar("distrib_deferred_weights", default=False)
#: Attribute of a model built on the meta device: its :class:`WeightSource`.
WEIGHT_SOURCE_ATTR = "distrib_weight_source"


@contextlib.contextmanager
def deferred_weights(enabled: bool = True):
    """Within, :func:`build_model` builds parameters on the meta device and records where their values come from.

    For tensor parallelism: AutoTP splits the model inside ``deepspeed.initialize``, and a rank that built
    the whole model first would hold all of it (about 140 GB for 70B in bf16, on every rank of a node).
    Built empty, the model is split empty and each rank then fills only its own shards
    (:func:`distrib.parallel.tensor_parallel.materialize_shards`). A distillation teacher is built the same way
    (:meth:`distrib.stages.distill.DistillStage.build_frozen` asks :func:`weights_deferred`).
    """
    token = _DEFERRED.set(enabled)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def weights_deferred() -> bool:
    """Whether models are built on the meta device here (within :func:`deferred_weights`)."""
    return _DEFERRED.get()


def build_model(cfg: ModelConfig, hf_cfg: PretrainedConfig, *, seed: int = 0, init_context=None,
                dtype=torch.float32):
    """Instantiate the model: weights from ``cfg.pretrained`` or freshly initialised.

    Inside :func:`deferred_weights` (and not under ``init_context``) the parameters stay on the meta
    device and the model carries a :class:`WeightSource` giving each one's value, bitwise what this
    function would have put there; a pretrained model whose files do not name every parameter in
    safetensors is built whole as before.

    Args:
        cfg: the model section.
        hf_cfg: from :func:`hf_config`.
        seed: seed of the initial weights (see :func:`init_weights`).
        init_context: a context manager to build under (``deepspeed.zero.Init`` for ZeRO-3).
        dtype: parameter dtype at construction.
    """
    model = None
    if _DEFERRED.get() and init_context is None:
        model = _build_empty(cfg, hf_cfg, seed, dtype)
    if model is None:
        ctx = init_context if init_context is not None else contextlib.nullcontext()
        with ctx:
            if cfg.pretrained:
                model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, config=hf_cfg, dtype=dtype,
                                                             attn_implementation=attention(cfg))
            else:
                # ``dtype``, not ``torch_dtype``: transformers 5 warns on every rank for the old name.
                model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype,
                                                         attn_implementation=attention(cfg))
        if not cfg.pretrained:
            init_weights(model, cfg, seed)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _build_empty(cfg: ModelConfig, hf_cfg: PretrainedConfig, seed: int, dtype) -> torch.nn.Module | None:
    """The model with its parameters on the meta device and a :class:`WeightSource` attached (buffers are real).

    ``None`` when the values cannot be read one tensor at a time (a pretrained model without safetensors
    files naming every parameter): that model is built whole.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=attention(cfg))
    names = [name for name, _ in model.named_parameters()]
    if cfg.pretrained:
        keys = _safetensors_keys(Path(cfg.pretrained), names, model.base_model_prefix)
        if keys is None:
            return None
        source = WeightSource(cfg, seed, dtype, keys)
        model.eval()  # as from_pretrained leaves it
    else:
        source = WeightSource(cfg, seed, dtype)
    setattr(model, WEIGHT_SOURCE_ATTR, source)
    return model


def _safetensors_keys(path: Path, names: list[str], prefix: str,
                      partial: bool = False) -> dict[str, tuple[Path, str]] | None:
    """Where each parameter of ``names`` is stored: ``{name: (file, key)}``, or ``None`` if one is missing
    (with ``partial``, the missing ones are left out instead) or there are no safetensors files.

    Keys are the parameter names, or (older checkpoints of a bare base model) the names without
    ``<prefix>.``.
    """
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = {key: path / f for key, f in json.loads(index.read_text())["weight_map"].items()}
    elif (path / "model.safetensors").is_file():
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            files = dict.fromkeys(f.keys(), path / "model.safetensors")
    else:
        return None
    found = {}
    for name in names:
        bare = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None
        key = name if name in files else bare if bare in files else None
        if key is not None:
            found[name] = (files[key], key)
        elif not partial:
            return None
    return found


class WeightSource:
    """The value of each parameter of a model built on the meta device, one tensor (or one rank's part) at a time.

    Bitwise what :func:`build_model` gives the parameter when it builds the model whole: the name-seeded
    initial value (:func:`initial_value`) cast to the model's dtype, or the tensor read from the
    pretrained safetensors file cast to it.
    """

    def __init__(self, cfg: ModelConfig, seed: int, dtype: torch.dtype,
                 files: dict[str, tuple[Path, str]] | None = None):
        self.cfg, self.seed, self.dtype, self.files = cfg, seed, dtype, files

    def __contains__(self, name: str) -> bool:
        return self.files is None or name in self.files

    def tensor(self, name: str, shape: tuple[int, ...], transposed: bool = False,
               part: Part | None = None) -> torch.Tensor:
        """The whole value of parameter ``name`` (of ``shape``, in the Hugging Face layout; its transpose, of
        the reversed shape, with ``transposed``: GPT-2's ``Conv1D`` weights trained as ``nn.Linear``), or with
        ``part`` only that part of it (:data:`distrib.parallel.tensor_parallel.Part`: ranges of one dimension, in the
        model's layout, concatenated).

        A whole value is in memory of its own (:func:`_unpooled_empty`): it lives only until it is split, and
        freed it goes back to the system instead of leaving a hole between the shards that stay. A part is
        read alone from a pretrained file (:meth:`_read_part`); an initial value is drawn whole (its
        generator's sequence covers the whole tensor) and cut.
        """
        if part is not None:
            if self.files is None:
                dim, ranges = part
                value = self.tensor(name, shape, transposed)
                return torch.cat([value.narrow(dim, start, stop - start) for start, stop in ranges], dim)
            return self._read_part(name, shape, transposed, part)
        if self.files is None:
            value = initial_value(name, shape, self.cfg, self.seed, out=_unpooled_empty(shape, torch.float32))
        else:
            from safetensors import safe_open

            file, key = self.files[name]
            with safe_open(str(file), framework="pt") as f:
                value = f.get_tensor(key)
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{file}: {key} has shape {tuple(value.shape)}, the model expects {tuple(shape)}")
        if transposed:
            value = value.t()
        if value.dtype == self.dtype and self.files is None and not transposed:
            return value
        return _unpooled_empty(tuple(value.shape), self.dtype).copy_(value)

    def _read_part(self, name: str, shape: tuple[int, ...], transposed: bool, part: Part) -> torch.Tensor:
        """``part`` of the pretrained tensor ``name``, reading from its file only the ranges it is made of.

        ``safetensors``' ``pread`` backend (0.8 and later) reads exactly a slice's bytes into a tensor of
        its own; the default backend maps the file, and a slice is then a view of the mapping, copied
        out here (only the pages it spans are read). Slicing and casting commute, and so do slicing and
        transposing with the dimension mapped, so the part is bitwise the whole value's.
        """
        from safetensors import safe_open

        file, key = self.files[name]
        dim, ranges = part
        file_dim = len(shape) - 1 - dim if transposed else dim
        try:
            opened, owned = safe_open(str(file), framework="pt", backend="pread"), True
        except TypeError:  # a safetensors without backends
            opened, owned = safe_open(str(file), framework="pt"), False
        with opened as f:
            sliced = f.get_slice(key)
            if tuple(sliced.get_shape()) != tuple(shape):
                raise ValueError(f"{file}: {key} has shape {tuple(sliced.get_shape())}, the model expects "
                                 f"{tuple(shape)}")
            pieces = [sliced[(slice(None),) * file_dim + (slice(start, stop),)] for start, stop in ranges]
        value = pieces[0] if len(pieces) == 1 else torch.cat(pieces, file_dim)
        owned = owned or len(pieces) > 1
        del pieces
        if transposed:
            value = value.t()
        if owned and value.dtype == self.dtype and value.is_contiguous():
            return value
        return torch.empty(tuple(value.shape), dtype=self.dtype).copy_(value)


def _unpooled_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in an anonymous memory mapping of its own, unmapped when the tensor is freed.

    glibc's ``malloc`` puts blocks below an adaptive threshold (up to 32 MiB) in its heap; a short-lived
    whole tensor placed there between shards that stay leaves a hole the system never gets back. Filling
    a 1.1 B-parameter model split in two that way peaked 300-900 MB above its shards.
    """
    import mmap

    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, n), dtype=dtype).view(shape)


def initial_value(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 initial value of parameter ``name``, from a generator seeded by ``seed`` and the name alone.

    Same distributions as transformers' ``_init_weights``: matrices N(0, init_std) (GPT-2's residual
    projections scaled by 1/sqrt(2 layers)), biases 0, norm weights 1. Written into ``out`` (contiguous
    fp32 of ``shape``) when given.
    """
    out = torch.empty(shape, dtype=torch.float32) if out is None else out
    if len(shape) == 1:
        return out.fill_(0.0 if name.endswith("bias") else 1.0)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std = cfg.init_std
    if cfg.arch == "gpt2" and name.endswith("c_proj.weight"):
        std /= math.sqrt(2 * cfg.num_layers)
    return out.normal_(0.0, std, generator=gen)


def init_weights(model: torch.nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise every parameter from its own name-seeded generator (:func:`initial_value`).

    The weights then depend only on ``seed`` and the architecture, not on the order modules are
    built in, the ZeRO stage (``zero.Init`` builds differently), the world size or tp: a run is
    comparable across layouts from step 0.
    """
    import deepspeed

    for name, param in model.named_parameters():
        partitioned = hasattr(param, "ds_id")
        ctx = deepspeed.zero.GatheredParameters([param], modifier_rank=0) if partitioned else contextlib.nullcontext()
        with ctx, torch.no_grad():
            param.copy_(initial_value(name, tuple(param.shape), cfg, seed))


def empty_model(hf_cfg: PretrainedConfig) -> torch.nn.Module:
    """The architecture with parameters on the meta device (no memory), buffers real.

    For sizing a 70B model on a laptop and for assembling an export from a state dict
    (``load_state_dict(..., assign=True)``).
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_cfg)
    model.tie_weights()  # tied embeddings are one parameter, counted once
    return model


def count_parameters(hf_cfg: PretrainedConfig) -> int:
    """Parameter count without allocating weights."""
    return sum(p.numel() for p in empty_model(hf_cfg).parameters())


def _depth_and_width(hf_cfg: PretrainedConfig) -> tuple[int, int]:
    """(layers, hidden size) of a Llama-family or GPT-2 config."""
    return (getattr(hf_cfg, "num_hidden_layers", None) or hf_cfg.n_layer,
            getattr(hf_cfg, "hidden_size", None) or hf_cfg.n_embd)


def matmul_shape(hf_cfg: PretrainedConfig, tokens: int, tp: int = 1) -> tuple[int, int, int]:
    """``(m, k, n)`` of the model's largest matmuls on a micro-batch of ``tokens``: its MLP's up-projection
    (this rank's share of the FFN width under tensor parallelism). The shape a fair peak is measured on."""
    _, hidden = _depth_and_width(hf_cfg)
    ffn = getattr(hf_cfg, "intermediate_size", None) or getattr(hf_cfg, "n_inner", None) or 4 * hidden
    return tokens, hidden, max(1, ffn // tp)


def flops_per_token(hf_cfg: PretrainedConfig, n_params: int, seq_len: int, trainable: int | None = None) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention's 12·L·H·T (PaLM appendix B).

    With frozen weights (``trainable`` < N) the backward pass still computes input gradients through
    every layer (2N) but weight gradients only for what trains: 2N + 2N + 2·trainable.
    """
    layers, hidden = _depth_and_width(hf_cfg)
    trainable = n_params if trainable is None else min(trainable, n_params)
    return 4.0 * n_params + 2.0 * trainable + 12.0 * layers * hidden * seq_len


def forward_flops_per_token(hf_cfg: PretrainedConfig, seq_len: int) -> float:
    """Forward-only FLOPs per token of a model that does not train (a teacher): 2N + 4·L·H·T."""
    layers, hidden = _depth_and_width(hf_cfg)
    return 2.0 * count_parameters(hf_cfg) + 4.0 * layers * hidden * seq_len
