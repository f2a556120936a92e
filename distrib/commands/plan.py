"""Memory and batch plan for a config on N ranks, without starting a process group or training.

This is the engine behind ``distrib plan CONFIG --world-size N [--gpus-per-node G --gpu-memory-gib M]``:
it validates the config for N ranks (:meth:`Config.check_world`, so bad combinations raise
:class:`ConfigError`) and estimates per-rank memory at the configured ZeRO stage, tensor-parallel
size and offload settings.

Model states (bytes per parameter, DeepSpeed's mixed-precision accounting)
-------------------------------------------------------------------------
Let ``w`` be the bytes of the training dtype (2 for bf16/fp16, 4 for fp32), ``P_t = P / tp`` the
parameters one tensor-parallel rank owns, ``dp = world_size / tp`` and ``shard = P_t / dp``.

=====================  =========================  ===================  ===========================
category               what                       bytes / parameter    sharded over dp from stage
=====================  =========================  ===================  ===========================
parameters             training-dtype weights     w                    3
gradients              working gradients          w (*)                2
gradients              fp32 gradient partition    4                    1
optimizer state        fp32 master weights        4                    1
optimizer state        Adam m and v (fp32)        8                    1
ZeRO-3 gathered layer  largest layer, w=2 + grad  4 x largest layer    (stage 3 only, not sharded)
=====================  =========================  ===================  ===========================

(*) DeepSpeed accumulates gradients in the training dtype unless ``deepspeed.data_types.grad_accum_dtype``
is fp32, in which case this row is 4 B.

Where the two rows beyond the textbook ``2 + 2 + 12`` come from (read in DeepSpeed 0.19 itself):

* *fp32 gradient partition.* Before the optimizer step DeepSpeed casts this rank's gradient shard
  to fp32 (``stage_1_and_2.py``: ``flat_grad_partition.to(fp32)``; ``stage3.py``:
  ``_prepare_fp32_grad_for_sub_group``). Its own estimators count it: the ZeRO-2 estimator's
  comment reads ``18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states``.
  ZeRO-3 builds it one optimizer sub-group at a time, so it is capped at
  ``zero_optimization.sub_group_size`` elements (DeepSpeed default 1e9). With precision fp32 the
  flat copy still exists (it is the flattened gradient); at stage 0 a plain fp32 optimizer has none.
* *fp32 master weights with precision fp32.* DeepSpeed's ZeRO optimizers always ``clone()`` the
  partition into their own master copy, so stage >= 1 keeps 4 B/param of master weights even when
  training in fp32; a plain fp32 Adam at stage 0 keeps only m and v (8 B).
* *ZeRO-3 gathered layer.* ``estimate_zero3_model_states_mem_needs`` adds
  ``largest_layer_memory = 4 * largest_layer_params`` (the gathered 16-bit weights of the largest
  module and its 16-bit gradient before reduce-scatter); "layer" means one module's own parameters,
  as in DeepSpeed's ``model_to_params`` (for Llama the embedding or LM head).

Known difference from DeepSpeed's ZeRO-3 estimator: it uses ``18 * P / N`` for the sharded states
while ``stage3.py`` keeps a 16-bit parameter shard (``w``), a 16-bit gradient buffer
(``grad_partitions_flat_buffer``, ``w``), fp32 master + Adam (12) and the fp32 gradient (4): 20 B per
sharded parameter. This plan counts what ``stage3.py`` allocates, so it is up to 2 B x shard above the
estimator (at most 11%). The ZeRO-2 estimator (``2 P + 18 P / N``) is matched exactly at stage 2.

Tensor parallelism divides every parameter count by ``tp`` before ZeRO sharding. This treats the
embeddings, LM head and norms as sharded too, which Hugging Face's tp plan does not do for the
input embedding and norms: for Llama-2-70B at tp 8 that understates one rank's parameters by ~3%.

Offload: ``parallel.offload_optimizer`` moves the fp32 gradient partition, the master weights and
Adam state to CPU (ZeRO-3 also its 16-bit gradient buffer, ZeRO-2 keeps no gradient buffer on GPU);
``parallel.offload_params`` (ZeRO-3) moves the 16-bit parameter shard too, leaving the gathered layer.
CPU figures are reported per rank and per node (x gpus_per_node), without DeepSpeed's 1.5x buffer
factor.

Activations
-----------
See :func:`activation_bytes` (Korthikanti et al. 2022). Logits and loss are added separately.

Fit
---
``fits`` is ``gpu_total + overhead <= gpu_memory_gib`` where the overhead is a flat
:data:`OVERHEAD_FRACTION` (10%) of the GPU's memory, reserved for the CUDA/NCCL context, allocator
fragmentation and DeepSpeed's communication buckets (reduce/all-gather buckets, ZeRO-3 prefetch),
none of which is modelled above.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from distrib.config import Config, ConfigError
from distrib.model import empty_model, hf_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 2**30

#: Share of the GPU's memory held back for context, fragmentation and communication buffers.
OVERHEAD_FRACTION = 0.10

#: DeepSpeed's default ``zero_optimization.sub_group_size`` (elements per ZeRO-3 optimizer sub-group).
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000


@dataclass
class Memory:
    """Bytes held by one rank, by category."""

    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    gathered: float = 0.0  # ZeRO-3 working memory for the largest gathered layer
    activations: float = 0.0
    frozen: float = 0.0  # weights of models that never train (a distillation's teacher)

    @property
    def model_states(self) -> float:
        """Parameters + gradients + optimizer state (+ ZeRO-3 gathered layer, + frozen models' weights)."""
        return self.params + self.grads + self.optimizer + self.gathered + self.frozen

    @property
    def total(self) -> float:
        return self.model_states + self.activations


@dataclass
class Plan:
    """Everything :func:`plan` derived; raw numbers in bytes and elements so tests can assert on them."""

    # model
    arch: str
    n_params: int
    largest_layer_params: int
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    # layout
    world_size: int
    gpus_per_node: int
    num_nodes: int
    tp: int
    dp: int
    zero_stage: int
    precision: str
    offload_optimizer: bool
    offload_params: bool
    activation_checkpointing: bool
    # batch
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    global_batch_tokens: int
    grad_accum_steps: int
    # memory, bytes per rank
    gpu: Memory
    cpu: Memory
    gpu_memory_gib: float
    overhead_bytes: float
    fits: bool
    bytes_per_param: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    teacher_params: int = 0

    @property
    def params_per_tp_rank(self) -> float:
        return self.n_params / self.tp

    @property
    def gpu_total_bytes(self) -> float:
        return self.gpu.total

    @property
    def gpu_required_bytes(self) -> float:
        """GPU total plus the overhead margin: what must fit in ``gpu_memory_gib``."""
        return self.gpu.total + self.overhead_bytes

    @property
    def cpu_bytes_per_node(self) -> float:
        return self.cpu.total * min(self.gpus_per_node, self.world_size)


def activation_bytes(*, seq_len: int, micro_batch: int, hidden: int, heads: int, layers: int, vocab: int,
                     tp: int = 1, checkpointing: bool = False, dtype_bytes: int = 2) -> float:
    """Activation memory of one rank for one micro batch, in bytes.

    Per transformer layer, without recomputation (Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", arXiv:2205.05198, eq. 1-2, tensor parallel without
    sequence parallelism)::

        s·b·h·(10 + 24/t + 5·a·s/(h·t))   bytes   (= s·b·h·(34 + 5·a·s/h) at t = 1)

    with s the sequence length, b the micro batch, h the hidden size, a the attention heads and t
    the tensor-parallel size: 10·s·b·h (layer-norm inputs and dropout masks) is replicated across tp
    ranks, the rest is split. With activation checkpointing (one checkpoint per layer, as Hugging
    Face's ``gradient_checkpointing_enable`` does) only each layer's 16-bit input, 2·s·b·h, is kept,
    plus one layer's full activations while it is recomputed in the backward pass::

        L·2·s·b·h + s·b·h·(10 + 24/t + 5·a·s/(h·t))

    The output layer adds the logits, s·b·V·(w + 4)/t bytes: the training-dtype logits plus the
    fp32 copy cross-entropy works on (the paper's §4.3 counts the fp32 part, 4·s·b·V/t).

    The formula is for a GPT block (4h MLP, dropout, attention scores materialised); for Llama-style
    models it is conservative: SDPA/flash attention does not keep the a·s² scores (the 5·a·s/h term)
    and there is no dropout. The paper assumes 16-bit activations; ``dtype_bytes=4`` scales it by 2.
    """
    s, b, h, a, t = seq_len, micro_batch, hidden, heads, tp
    scale = dtype_bytes / 2
    per_layer = s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) * scale
    if checkpointing:
        layers_total = layers * 2 * s * b * h * scale + per_layer
    else:
        layers_total = layers * per_layer
    logits = s * b * vocab * (dtype_bytes + 4) / t
    return layers_total + logits


_SIZE_CACHE: dict[str, tuple[int, int]] = {}


def _model_sizes(hf_cfg) -> tuple[int, int]:
    """(total parameters, largest single module's own parameters), cached per architecture."""
    key = hf_cfg.to_json_string()
    if key not in _SIZE_CACHE:
        model = empty_model(hf_cfg)
        n_params = sum(p.numel() for p in model.parameters())
        # DeepSpeed's model_to_params: the largest module counting only its own (non-recursive) parameters.
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        _SIZE_CACHE[key] = (n_params, largest)
    return _SIZE_CACHE[key]


def _dim(hf_cfg, *names: str) -> int:
    for n in names:
        v = getattr(hf_cfg, n, None)
        if v is not None:
            return int(v)
    raise ConfigError(f"cannot read {names[0]} from the model config; planning supports llama and gpt2 architectures")


def tokenizer_vocab_size(cfg: Config) -> int | None:
    """The vocabulary the run's model will have when ``model.vocab_size`` is unset, without training anything.

    The model then takes the tokenizer's length (:class:`distrib.train.trainer.Trainer`): with
    ``data.tokenizer`` unset the run trains a byte-level BPE of ``data.vocab_size`` tokens, so that
    is the size (BPE training stops there; only a corpus too small to reach it gives fewer, and then
    the plan errs large); with ``data.tokenizer`` set it is that tokenizer's length, read from its
    directory. None for ``model.pretrained``, whose config.json carries the size.

    Raises:
        ConfigError: ``data.tokenizer`` is not a readable tokenizer directory.
    """
    if cfg.model.pretrained is not None:
        return None
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    if not cfg.data.tokenizer:
        return cfg.data.vocab_size
    path = Path(cfg.data.tokenizer).expanduser()
    fix = "point data.tokenizer at a save_pretrained directory, or set model.vocab_size (e.g. model.vocab_size=32000) to plan"
    if not path.is_dir():
        raise ConfigError(f"model.vocab_size is unset and data.tokenizer={cfg.data.tokenizer!r} is not a directory; {fix}")
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(path))
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError... for a bad directory
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"model.vocab_size is unset and data.tokenizer={cfg.data.tokenizer!r} cannot be loaded ({reason}); {fix}"
        ) from None


def plan(cfg: Config, world_size: int, gpus_per_node: int = 8, gpu_memory_gib: float = 80.0) -> Plan:
    """Check ``cfg`` for ``world_size`` ranks and estimate per-rank memory.

    With ``model.vocab_size`` unset the vocabulary is the tokenizer's (:func:`tokenizer_vocab_size`),
    so the shipped CPU config, whose tokenizer is trained at the start of the run, plans too.

    Raises:
        ConfigError: the config does not work on ``world_size`` ranks, or ``model.vocab_size`` is unset
            and ``data.tokenizer`` cannot be read.
    """
    _check_layout(world_size, gpus_per_node, gpu_memory_gib)
    cfg, teacher_cfg = _with_teacher(cfg)
    cfg = _with_init_from(cfg)
    cfg.check_world(world_size)
    hf_cfg = _student_hf_config(cfg, teacher_cfg)
    n_params, largest = _model_sizes(hf_cfg)
    hidden = _dim(hf_cfg, "hidden_size", "n_embd")
    layers = _dim(hf_cfg, "num_hidden_layers", "n_layer")
    heads = _dim(hf_cfg, "num_attention_heads", "n_head")
    vocab = _dim(hf_cfg, "vocab_size")

    par = cfg.parallel
    dp = cfg.dp_size(world_size)
    w, grad_w = _dtype_bytes(cfg)
    gpu, cpu = _model_states(cfg, n_params, largest, dp, w, grad_w)
    gpu.activations = activation_bytes(
        seq_len=cfg.data.seq_len, micro_batch=cfg.train.micro_batch_size, hidden=hidden, heads=heads,
        layers=layers, vocab=vocab, tp=par.tp, checkpointing=cfg.model.activation_checkpointing, dtype_bytes=w,
    )
    teacher_params = 0
    if teacher_cfg is not None:
        teacher_params = _add_teacher(gpu, cpu, cfg, teacher_cfg, dp, w)

    overhead = OVERHEAD_FRACTION * gpu_memory_gib * GIB
    fits = gpu.total + overhead <= gpu_memory_gib * GIB
    per_param = _bytes_per_param(par.zero_stage, w, grad_w)
    notes = _notes(cfg, w, grad_w, per_param, teacher_params, distilling=teacher_cfg is not None)

    return Plan(
        arch=cfg.model.arch if cfg.model.pretrained is None else type(hf_cfg).__name__,
        n_params=n_params, largest_layer_params=largest, hidden_size=hidden, num_layers=layers,
        num_heads=heads, vocab_size=vocab, world_size=world_size, gpus_per_node=gpus_per_node,
        num_nodes=-(-world_size // gpus_per_node), tp=par.tp, dp=dp, zero_stage=par.zero_stage,
        precision=cfg.precision, offload_optimizer=par.offload_optimizer, offload_params=par.offload_params,
        activation_checkpointing=cfg.model.activation_checkpointing, seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size, global_batch_size=cfg.train.global_batch_size,
        global_batch_tokens=cfg.train.global_batch_size * cfg.data.seq_len,
        grad_accum_steps=cfg.grad_accum_steps(world_size), gpu=gpu, cpu=cpu, gpu_memory_gib=gpu_memory_gib,
        overhead_bytes=overhead, fits=fits, bytes_per_param=per_param, notes=notes, teacher_params=teacher_params,
    )


def _check_layout(world_size: int, gpus_per_node: int, gpu_memory_gib: float) -> None:
    """Refuse command-line sizes no cluster has."""
    if world_size < 1:
        raise ConfigError(f"--world-size must be at least 1 (got {world_size})")
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1 (got {gpus_per_node})")
    if gpu_memory_gib <= 0:
        raise ConfigError(f"--gpu-memory-gib must be positive (got {gpu_memory_gib})")


def _with_teacher(cfg: Config) -> tuple[Config, PretrainedConfig | None]:
    """``cfg`` with ``teacher`` resolved to its Hugging Face directory, and the teacher's architecture (None: no teacher)."""
    if not cfg.teacher:
        return cfg, None
    teacher_dir = _hf_dir(cfg.teacher)
    if teacher_dir is None:
        raise ConfigError(f"teacher={cfg.teacher!r} has no config.json (nor hf/config.json); plan reads the "
                          "teacher's architecture from a Hugging Face directory or a run directory with an export")
    from transformers import AutoConfig

    teacher_cfg = AutoConfig.from_pretrained(teacher_dir)
    return cfg.model_copy(update={"teacher": str(teacher_dir)}), teacher_cfg


def _student_hf_config(cfg: Config, teacher_cfg: PretrainedConfig | None) -> PretrainedConfig:
    """The architecture the run trains: the model section's, or a student cut from the teacher."""
    if teacher_cfg is not None and cfg.student.init_from_teacher_layers is not None:
        hf_cfg = copy.deepcopy(teacher_cfg)  # a student cut from the teacher: its architecture, fewer layers
        hf_cfg.num_hidden_layers = len(cfg.student.init_from_teacher_layers)
        return hf_cfg
    vocab_size = tokenizer_vocab_size(cfg) if teacher_cfg is None else teacher_cfg.vocab_size
    return hf_config(cfg.model, vocab_size=vocab_size, seq_len=cfg.data.seq_len)


def _dtype_bytes(cfg: Config) -> tuple[int, int]:
    """(bytes of a training-dtype weight, bytes of an accumulated gradient element)."""
    w = 4 if cfg.precision == "fp32" else 2
    # DeepSpeed accumulates gradients in the model dtype unless data_types.grad_accum_dtype says otherwise.
    accum = str((cfg.deepspeed.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    return w, 4 if accum in ("fp32", "float32", "float") else w


def _model_states(cfg: Config, n_params: int, largest: int, dp: int, w: int, grad_w: int) -> tuple[Memory, Memory]:
    """(GPU, CPU) bytes one rank holds of the trained model's weights, gradients and optimizer state.

    The table of this module's docstring, placed on the GPU or, with offload, on the CPU.
    """
    par = cfg.parallel
    tp, stage = par.tp, par.zero_stage
    mixed = w == 2
    zero_cfg = cfg.deepspeed.get("zero_optimization") or {}
    sub_group = float(zero_cfg.get("sub_group_size") or DEFAULT_SUB_GROUP_SIZE)

    p_t = n_params / tp  # parameters one tp rank owns (everything treated as tp-sharded)
    shard = p_t / dp

    def count(stage_from: int) -> float:
        """Elements one rank holds of a state that ZeRO shards from ``stage_from`` on."""
        return shard if stage >= stage_from else p_t

    param_b = w * count(3)
    grad_lp_b = grad_w * count(2)
    fp32_grad_elems = count(1) if (stage >= 1 or mixed) else 0.0
    if stage == 3 and not par.offload_optimizer:
        fp32_grad_elems = min(fp32_grad_elems, sub_group)  # built one optimizer sub-group at a time
    fp32_grad_b = 4 * fp32_grad_elems
    master_b = 4 * count(1) if (stage >= 1 or mixed) else 0.0
    adam_b = 8 * count(1)
    gathered_b = 4 * largest / tp if stage == 3 else 0.0

    gpu, cpu = Memory(), Memory()
    gpu.gathered = gathered_b
    # parameters
    if par.offload_params:
        cpu.params = param_b
    else:
        gpu.params = param_b
    # gradients and optimizer state
    if par.offload_optimizer:
        cpu.optimizer = master_b + adam_b
        cpu.grads = fp32_grad_b
        if stage == 3:
            cpu.grads += grad_lp_b  # grad_partitions_flat_buffer lives on the offload device
        elif stage == 1:
            gpu.grads = grad_lp_b  # full 16-bit gradients accumulate on GPU until the boundary
        # stage 2: reduced gradients go straight to the CPU fp32 partition
    else:
        gpu.optimizer = master_b + adam_b
        gpu.grads = grad_lp_b + fp32_grad_b
    return gpu, cpu


def _add_teacher(gpu: Memory, cpu: Memory, cfg: Config, teacher_cfg: PretrainedConfig, dp: int, w: int) -> int:
    """Add a distillation teacher's frozen weights to ``gpu`` or ``cpu``; returns its parameter count."""
    par = cfg.parallel
    # Weights only, in the training precision: no gradients, no optimizer state; split by tp and,
    # under ZeRO-3, partitioned over dp like the student (plus its largest layer while gathered).
    teacher_params, teacher_largest = _model_sizes(teacher_cfg)
    frozen = w * teacher_params / par.tp / (dp if par.zero_stage == 3 else 1)
    if par.offload_params:
        cpu.frozen = frozen
    else:
        gpu.frozen = frozen
    if par.zero_stage == 3:
        gpu.gathered += w * teacher_largest / par.tp
    return teacher_params


def _bytes_per_param(stage: int, w: int, grad_w: int) -> dict[str, float]:
    """Bytes per parameter of each model state before sharding (the table of this module's docstring)."""
    mixed = w == 2
    return {
        "params": float(w),
        "grads": float(grad_w),
        "fp32_grads": 4.0 if (stage >= 1 or mixed) else 0.0,
        "master": 4.0 if (stage >= 1 or mixed) else 0.0,
        "adam": 8.0,
    }


def _notes(cfg: Config, w: int, grad_w: int, per_param: dict[str, float], teacher_params: int,
           distilling: bool) -> list[str]:
    """The assumptions behind the figures, one line each, as the report lists them."""
    stage = cfg.parallel.zero_stage
    notes = [
        f"model states: {cfg.precision} weights {w} B, grads {grad_w} B + fp32 grad partition {per_param['fp32_grads']:.0f} B, "
        f"fp32 master {per_param['master']:.0f} B + Adam m,v 8 B per parameter (DeepSpeed accounting); "
        "ZeRO-1 shards the fp32 parts, ZeRO-2 also the grads, ZeRO-3 also the weights",
        "tp divides every parameter count first (embeddings, LM head and norms treated as sharded)",
        "activations: Korthikanti et al. 2022, s*b*h*(10+24/t+5*a*s/(h*t)) per layer"
        + (" (checkpointing: 2*s*b*h per layer + one layer)" if cfg.model.activation_checkpointing else "")
        + " + logits s*b*V*(w+4)/t; conservative with flash/SDPA attention",
        f"overhead: {OVERHEAD_FRACTION:.0%} of GPU memory for CUDA/NCCL context, fragmentation, comm buckets",
    ]
    if stage == 3:
        notes.insert(1, "ZeRO-3 adds 4 B x largest layer for the gathered weights and grads (as DeepSpeed's estimator)")
    if distilling:
        notes.insert(1, f"teacher: {_count(teacher_params)} frozen parameters, weights only ({w} B each), split by tp"
                        + (" and partitioned over dp (ZeRO-3)" if stage == 3 else ", whole on every dp rank")
                        + "; its forward activations are freed layer by layer (no backward)")
    return notes


def _hf_dir(value: str) -> Path | None:
    """The Hugging Face directory a model reference names without exporting anything (None for a checkpoint)."""
    for path in (Path(value).expanduser(), Path(value).expanduser() / "hf"):
        if (path / "config.json").is_file():
            return path
    return None


def _with_init_from(cfg: Config) -> Config:
    """``cfg`` with ``init_from``'s model as ``model.pretrained`` (its architecture is the one trained)."""
    if not cfg.init_from:
        return cfg
    path = _hf_dir(cfg.init_from)
    if path is None:
        raise ConfigError(f"init_from={cfg.init_from!r} has no config.json (nor hf/config.json); plan reads the "
                          "architecture from a Hugging Face directory or a run directory with an export")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": str(path)})})


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def format_plan(p: Plan) -> str:
    """A readable report: model, layout, batch and a per-rank memory table in GiB."""
    g = lambda x: f"{x / GIB:9.2f}"  # noqa: E731
    offload = []
    if p.offload_optimizer:
        offload.append("optimizer")
    if p.offload_params:
        offload.append("params")
    lines = [
        f"model     {p.arch}: {_count(p.n_params)} parameters (hidden {p.hidden_size}, {p.num_layers} layers, "
        f"{p.num_heads} heads, vocab {p.vocab_size}); largest layer {_count(p.largest_layer_params)}",
        f"layout    {p.world_size} ranks = {p.num_nodes} node(s) x {min(p.gpus_per_node, p.world_size)} GPUs; "
        f"tp {p.tp} x dp {p.dp}; ZeRO-{p.zero_stage}; {p.precision}; "
        f"offload {', '.join(offload) if offload else 'none'}; "
        f"activation checkpointing {'on' if p.activation_checkpointing else 'off'}",
        f"batch     global {p.global_batch_size} sequences x {p.seq_len} tokens = {p.global_batch_tokens:,} tokens "
        f"({p.global_batch_tokens / 1e6:.2f} M); micro {p.micro_batch_size} x dp {p.dp} x accumulation {p.grad_accum_steps}",
        "",
        f"memory per rank (GiB)        {'GPU':>9} {'CPU':>9}",
        f"  parameters                 {g(p.gpu.params)} {g(p.cpu.params)}",
        f"  gradients                  {g(p.gpu.grads)} {g(p.cpu.grads)}",
        f"  optimizer state            {g(p.gpu.optimizer)} {g(p.cpu.optimizer)}",
    ]
    if p.zero_stage == 3:
        lines.append(f"  ZeRO-3 gathered layer      {g(p.gpu.gathered)} {g(0)}")
    if p.teacher_params:
        lines.append(f"  teacher (frozen)           {g(p.gpu.frozen)} {g(p.cpu.frozen)}")
    lines += [
        f"  = model states             {g(p.gpu.model_states)} {g(p.cpu.model_states)}",
        f"  activations                {g(p.gpu.activations)}",
        f"  overhead ({OVERHEAD_FRACTION:.0%} of GPU)      {g(p.overhead_bytes)}",
        f"  total                      {g(p.gpu_required_bytes)} {g(p.cpu.total)}",
    ]
    if p.cpu.total:
        lines.append(f"  CPU per node ({min(p.gpus_per_node, p.world_size)} ranks)                {g(p.cpu_bytes_per_node)}")
    verdict = "yes" if p.fits else "NO"
    lines += [
        "",
        f"fits      {verdict}: {p.gpu_required_bytes / GIB:.2f} GiB needed of {p.gpu_memory_gib:g} GiB per GPU",
        "",
        "assumptions",
        *(f"  - {n}" for n in p.notes),
    ]
    return "\n".join(lines)


def command(args, cfg) -> int:
    """``distrib plan CONFIG --world-size N [--gpus-per-node G] [--gpu-memory-gib M]``."""
    print(format_plan(plan(cfg, args.world_size, args.gpus_per_node, args.gpu_memory_gib)))
    return 0
