"""The one training loop every stage runs.

A stage (pretraining, fine-tuning, distillation) differs only in which models it builds, which
parameters train and what the loss is; it hands the Trainer a :class:`Stage` and the loop does the
rest: data, engine, resume, evaluation, metrics, checkpoints, export.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distrib import faults
from distrib.errors import TrainingError  # noqa: F401 (re-exported)
from distrib.model.trainable import format_summary, trainable_summary
from distrib.checkpoint.base import check_base, model_refs
from distrib.checkpoint import Checkpointer, TrainState, latest_checkpoint
from distrib.config import Config
from distrib.data import IGNORE_INDEX, GlobalBatchSampler, collate, prepare_data  # noqa: F401 (re-exported)
from distrib.train.metrics import MetricsLogger, keep_rows_through, measure_peak_tflops
from distrib.model import (count_parameters, deferred_weights, flops_per_token, forward_flops_per_token, hf_config,
                           matmul_shape)
from distrib.parallel.engine import build_engine, deepspeed_config, torch_dtype
from distrib.parallel.failures import writing
from distrib.parallel.tensor_parallel import apply_plan, materialize_shards
from distrib.parallel.topology import Topology, collective_timed_out
from distrib.utils import StopRequest, keep_freed_host_memory, log_main, peak_rss_bytes

@dataclass
class LossOut:
    """A micro-batch's loss as sums, so that the loop can weigh every target token of the global batch once.

    Attributes:
        total: sum of the per-token losses over the target tokens (what is optimised).
        tokens: number of target tokens.
        parts: named components, each also summed over the target tokens (logged as ``loss/<name>``).
    """

    total: torch.Tensor
    tokens: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Stage(Protocol):
    """What a stage supplies to the loop."""

    name: str

    def build_model(self, cfg: Config, hf_cfg, dtype: torch.dtype) -> torch.nn.Module:
        """The model to train, with frozen parts already frozen."""

    def loss(self, model: torch.nn.Module, batch: dict) -> LossOut:
        """The training (and evaluation) loss of one micro-batch, as sums over its target tokens."""

    # Optional, for stages with more than one model or another validation loss:
    #   build_frozen(cfg, dtype) -> {name: module}: models that never train (a teacher); the loop wraps
    #       each in an engine without optimizer (partitioned and split like the trained model) and hands
    #       the engines back through bind(engines).
    #   eval_loss(model, batch) -> LossOut: the validation loss when it is not the training loss.


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many positions of ``labels`` are predicted (the first position of each row never is)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def next_token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position's logits against the next label, summed over the targets, in fp32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


_compiled_ce = None


def compiled_next_token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`next_token_ce_sum` through ``torch.compile``: the fp32 upcast, log-softmax and gather fuse into
    one pass over the logits instead of three, each writing a logits-sized fp32 tensor."""
    global _compiled_ce
    if _compiled_ce is None:
        _compiled_ce = torch.compile(next_token_ce_sum)
    return _compiled_ce(logits, labels)


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> LossOut:
    """Next-token cross-entropy summed over the target tokens (``labels`` != -100), in fp32.

    Compiled with the model: when ``model`` is a compiled engine (``model.compile``) so is the loss.
    """
    logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"]
    ce = compiled_next_token_ce_sum if getattr(model, "is_compiled", False) else next_token_ce_sum
    return LossOut(total=ce(logits, labels), tokens=target_tokens(labels))


class Trainer:
    """Runs ``stage`` to ``train.max_steps`` under ``cfg`` on ``topo``, resuming where a run stopped."""

    def __init__(self, cfg: Config, topo: Topology, stage: Stage, resume_from: Path | None = None,
                 stop: StopRequest | None = None):
        self.compile_wanted, self.compile_blocker = compile_decision(cfg, topo.tp)
        if cfg.model.attn_implementation == "auto":
            attention = attention_for(self.compile_wanted, topo.device.type)
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"attn_implementation": attention})})
        self.cfg, self.topo, self.stage = cfg, topo, stage
        self.out = Path(cfg.output_dir)
        self.started = time.monotonic()
        self.stop = stop or StopRequest()
        refs = self._open_run(resume_from)
        universal = resume_from is not None and self.ckpt.needs_universal(resume_from)
        if universal:
            self.ckpt.make_universal(resume_from)
        ds_config = deepspeed_config(cfg, topo.world_size, load_universal=universal)
        model, frozen = self._build(ds_config)
        self._engines(model, frozen, ds_config)
        self._restore(refs, resume_from, universal)
        self._ready_loop(frozen, resume_from)

    def _open_run(self, resume_from: Path | None) -> dict:
        """The run directory, the data and the checkpointer; the references to the frozen models it starts from."""
        cfg, topo = self.cfg, self.topo
        # The base's and the teacher's hashes read every weight file (unless their stamp cache is valid): rank 0
        # computes them, once for all ranks; a resume onto changed ones is refused before anything is written.
        refs = topo.from_main(lambda: model_refs(cfg))
        if resume_from is not None:
            check_base(cfg, resume_from, refs)
        if cfg.train.keep_host_memory and topo.device.type == "cpu":
            keep_freed_host_memory()  # before the model and its first step allocate
        with self._writing("config.yaml"):
            if topo.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "config.yaml").write_text(cfg.to_yaml())
                Checkpointer.clean_partial_in(self.out / "checkpoints")
        self.data = prepare_data(cfg.data, cfg.seed)
        self._check_same_data()
        with self._writing("tokenizer/"):
            if topo.is_main:
                self.data.tokenizer.save_pretrained(self.out / "tokenizer")
        self.hf_cfg = hf_config(cfg.model, vocab_size=len(self.data.tokenizer), seq_len=cfg.data.seq_len)
        self.ckpt = Checkpointer(self.out / "checkpoints", topo, cfg, self.data.tokenizer)
        return refs

    def _build(self, ds_config: dict) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
        """The stage's model to train and its frozen models (a teacher), plain modules with frozen parts frozen."""
        cfg, stage = self.cfg, self.stage
        self.n_params = count_parameters(self.hf_cfg)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and world size
        self.dtype = torch_dtype(cfg.precision)
        # Split by AutoTP, the model (and a teacher) is built empty: each rank fills only its own shards
        # (materialize_shards).
        with deferred_weights(self.topo.tp > 1):
            model = self._under_zero_init(ds_config, lambda: stage.build_model(cfg, self.hf_cfg, self.dtype))
            frozen = {}
            if hasattr(stage, "build_frozen"):
                frozen = self._under_zero_init(ds_config, lambda: stage.build_frozen(cfg, self.dtype))
        self.trainable = trainable_summary(model)
        return model, frozen

    def _engines(self, model: torch.nn.Module, frozen: dict[str, torch.nn.Module], ds_config: dict) -> None:
        """Wrap the models in DeepSpeed engines: split by tensor parallelism, partitioned by ZeRO, compiled."""
        cfg, topo = self.cfg, self.topo
        # Each model's own plan (a teacher's architecture may differ from the student's).
        frozen_ds = {name: apply_plan(m, cfg, ds_config) if topo.tp > 1 else ds_config for name, m in frozen.items()}
        if topo.tp > 1:
            ds_config = apply_plan(model, cfg, ds_config)
        with materialize_shards(model):
            self.engine = build_engine(model, cfg, topo, ds_config)
        # Models that never train: engines without optimizer (nothing trainable), never checkpointed.
        self.frozen = {}
        for name, m in frozen.items():
            with materialize_shards(m):
                self.frozen[name] = build_engine(m, cfg, topo, frozen_ds[name])
        self.compiled = self._compile()
        if self.frozen:
            self.stage.bind(self.frozen)
        self.trains = self.trainable["trainable"] > 0  # else an engine without optimizer (see build_engine)
        # DeepSpeed reports no gradient norm for a plain fp32 optimizer (ZeRO-0): measure it ourselves.
        self.own_grad_norm = cfg.parallel.zero_stage == 0 and cfg.precision == "fp32"
        self.skip_nonfinite = cfg.train.nonfinite == "skip"

    def _restore(self, refs: dict, resume_from: Path | None, universal: bool) -> None:
        """The train state: fresh, or the checkpoint's (engine, step, data position, RNG streams)."""
        cfg, topo = self.cfg, self.topo
        self.state = TrainState(world_size=topo.world_size, dp=topo.dp, tp=topo.tp, zero_stage=cfg.parallel.zero_stage,
                                config_hash=cfg.identity_hash(), max_steps=cfg.train.max_steps,
                                base=refs["base"], teacher=refs["teacher"])
        # What is frozen comes from the base again at every start; checkpoints hold what trains.
        self.ckpt.exclude_frozen = self.trainable["trainable"] < self.trainable["total"]
        self.ckpt.engine_state = self.trains
        if resume_from is None:
            torch.manual_seed(cfg.seed + topo.rank)  # per-rank streams (dropout) from here on
            return
        prev = self.ckpt.load(self.engine, resume_from, universal)
        self.state.step, self.state.samples_seen, self.state.tokens_seen = prev.step, prev.samples_seen, prev.tokens_seen
        self.state.run_id = prev.run_id
        log_main(f"resumed from {resume_from} at step {prev.step} (saved with dp={prev.dp}, now dp={topo.dp})")
        if prev.max_steps and prev.max_steps != cfg.train.max_steps:
            log_main(f"train.max_steps raised from {prev.max_steps} to {cfg.train.max_steps}: the learning-rate "
                     f"schedule is recomputed for {cfg.train.max_steps} steps")
        if universal:  # the saved per-rank RNG streams belong to another layout: start fresh ones
            torch.manual_seed(cfg.seed + topo.rank + 1_000_003 * prev.step)

    def _ready_loop(self, frozen: dict[str, torch.nn.Module], resume_from: Path | None) -> None:
        """The sampler, the FLOP counts behind MFU, the layout and start-up lines, the metrics and sample traces."""
        cfg, topo = self.cfg, self.topo
        self.sampler = GlobalBatchSampler(len(self.data.train), cfg.train.global_batch_size,
                                          cfg.train.micro_batch_size, topo.dp, topo.dp_rank, cfg.seed)
        self.device = topo.device
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(self.hf_cfg, self.n_params, cfg.data.seq_len,
                                               trainable=self.trainable["trainable"])
        for m in frozen.values():  # their forward passes are work done for every token too
            self.flops_per_token += forward_flops_per_token(m.config, cfg.data.seq_len)
        shape = matmul_shape(self.hf_cfg, cfg.train.micro_batch_size * cfg.data.seq_len, topo.tp)
        # the devices are alike: the best
        peak = cfg.metrics.peak_tflops or topo.max(measure_peak_tflops(self.dtype, shape))
        self.peak_flops = peak * 1e12 * topo.world_size
        self._write_layout()  # before the progress bar starts drawing
        log_main(format_summary(self.trainable))
        log_main(
            f"{self.stage.name}: {self.n_params / 1e6:.2f}M params, world={topo.world_size} (dp={topo.dp} x "
            f"tp={topo.tp}), ZeRO-{cfg.parallel.zero_stage}, {cfg.precision}, grad accum "
            f"{cfg.grad_accum_steps(topo.world_size)}, {len(self.data.train)} train blocks of {cfg.data.seq_len} tokens"
        )
        with self._writing("metrics.jsonl"):
            self.metrics = MetricsLogger(self.out, topo.is_main, tensorboard=cfg.metrics.tensorboard,
                                         progress_bar=cfg.metrics.progress_bar, total_steps=cfg.train.max_steps,
                                         start_step=self.state.step)
        self.trace, self.trace_failure = None, None
        with self._writing("trace/"):
            if cfg.data.trace_samples:
                (self.out / "trace").mkdir(parents=True, exist_ok=True)
                trace = self.out / "trace" / f"samples-rank{topo.rank:05d}.jsonl"
                if resume_from is not None:  # rows name the step before it counts: keep those done before step k
                    keep_rows_through(trace, self.state.step - 1)
                self.trace = open(trace, "a" if resume_from is not None else "w", buffering=1)

    def _writing(self, what: str):
        """A context for a write of ``what`` (rank 0's shared files, or each rank's own): a failure on any rank
        stops every rank after it, together, instead of leaving the others in their next collective."""
        return writing(self.topo, self.out, f"writing {what} of {self.out}", self._kept,
                       then="run the same command to resume")

    def _kept(self) -> str:
        last = latest_checkpoint(self.out / "checkpoints")
        return f"the last checkpoint ({last.name}) is intact" if last else "no checkpoint was written yet"

    def _compile(self) -> bool:
        """Compile the engines' models under ``model.compile`` (see :func:`compile_decision`); whether it did."""
        if self.compile_blocker is not None and self.cfg.model.compile is True:
            log_main(f"model.compile: {self.compile_blocker}; training uncompiled")
        if not self.compile_wanted:
            return False
        failing = faults.at("compile", self.topo.rank, 0) == "fail"
        for engine in (self.engine, *self.frozen.values()):
            engine.compile(**({"backend": _failing_backend} if failing else {}))
        log_main(f"model.compile: the model and its loss compile during the first steps (the first step takes longer; "
                 f"{self.cfg.model.attn_implementation} attention)")
        return True

    def _forward(self, fn, batch: dict) -> LossOut:
        """``fn(engine, batch)``; a compiled model that fails to compile falls back to eager, saying so in one line.

        Compilation happens at the first forward passes (training, then evaluation), so that is where it can fail;
        after the fallback the run trains uncompiled, as with ``model.compile=false``.
        """
        try:
            return fn(self.engine, batch)
        except Exception as e:
            if not self.compiled or not _is_compile_error(e):
                raise
            cause = getattr(e, "inner_exception", None) or e  # a backend's own error, inside dynamo's wrapper
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            log_main(f"model.compile: compiling failed ({type(cause).__name__}: {first}); training uncompiled")
            for engine in (self.engine, *self.frozen.values()):
                # DeepSpeed has no "uncompile": drop what Module.compile() installed and the engine's flag.
                engine.module._compiled_call_impl = None
                engine._is_compiled = False
            self.compiled = False
            return fn(self.engine, batch)

    def _check_same_data(self) -> None:
        """Every rank must train on the same data: compare what each prepared before the first step.

        Caches are per node (``data.cache_dir``), and a node whose inputs differ (another corpus version,
        another tokenizer file) would silently train on other blocks. The ranks compare the cache key,
        the tokenizer's vocabulary, the block counts and a digest of the first and last blocks.

        Raises:
            TrainingError: on every rank, naming the first rank that differs from rank 0 and how.
        """
        mine = data_identity(self.data)
        if faults.at("data", self.topo.rank, 0) == "differ":
            mine["train_blocks"] += 1
        ranks = [None] * self.topo.world_size
        dist.all_gather_object(ranks, mine)
        for r, theirs in enumerate(ranks):
            diff = [k for k in mine if theirs[k] != ranks[0][k]]
            if diff:
                k = diff[0]
                raise TrainingError(
                    f"rank {r} prepared other data than rank 0 ({k}: {theirs[k]} vs. {ranks[0][k]}); every rank must "
                    "train on the same data: give every node the same inputs and tokenizer, or put data.cache_dir on "
                    "a file system all nodes share"
                )

    def _under_zero_init(self, ds_config: dict, build):
        """``build()``, under ZeRO-3 with transformers building (and loading) models partitioned."""
        if self.cfg.parallel.zero_stage != 3:
            return build()
        # While an HfDeepSpeedConfig is registered, transformers builds (and loads) models under
        # deepspeed.zero.Init, so no rank ever holds the full model. Only for this build: later
        # models (the export's) must be plain.
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # zero.Init validates batch sizes against the whole world; with tp > 1 the engine counts the
        # dp axis only, so leave the global batch for DeepSpeed to derive here.
        init_cfg = {k: v for k, v in ds_config.items() if k != "train_batch_size"}
        hf_ds = HfDeepSpeedConfig(init_cfg)  # noqa: F841 (registered through a weak reference)
        try:
            return build()
        finally:
            unset_hf_deepspeed_config()

    def _write_layout(self, after_step: bool = False) -> None:
        """``<output_dir>/layout.json``: what every rank holds (parameters by name, trainable elements and, once
        the optimizer has stepped, its state bytes, measured from the engine)."""
        import torch.distributed as dist

        def held(engine) -> tuple[dict, dict[str, torch.Tensor]]:
            """What this rank holds of ``engine``: sizes (its ZeRO-3 shard, not the whole) and optimizer state."""
            params = dict(engine.module.named_parameters())
            local = {n: p.ds_tensor if hasattr(p, "ds_tensor") else p for n, p in params.items()}
            return {"param_numel": sum(t.numel() for t in local.values()),
                    "param_bytes": sum(t.numel() * t.element_size() for t in local.values()),
                    "trainable_numel": sum(t.numel() for n, t in local.items() if params[n].requires_grad),
                    "optimizer_state_bytes": optimizer_state_bytes(engine.optimizer)}, local

        sizes, local = held(self.engine)
        opt_bytes = sizes["optimizer_state_bytes"]
        mine = {"rank": self.topo.rank, "dp_rank": self.topo.dp_rank, "tp_rank": self.topo.tp_rank, **sizes,
                "peak_rss_bytes": peak_rss_bytes(),
                "params": {n: t.numel() for n, t in local.items()}}
        for name, engine in self.frozen.items():
            mine[name] = held(engine)[0]
        ranks = [None] * self.topo.world_size
        dist.all_gather_object(ranks, mine)
        with self._writing("layout.json"):
            if self.topo.is_main:
                layout = {"world_size": self.topo.world_size, "dp": self.topo.dp, "tp": self.topo.tp,
                          "zero_stage": self.cfg.parallel.zero_stage, "total_params": self.n_params,
                          "trainable_params": self.trainable["trainable"], "ranks": ranks}
                (self.out / "layout.json").write_text(json.dumps(layout, indent=1))
        if self.topo.is_main:
            if after_step:
                log_main(f"optimizer state per rank: {opt_bytes / 2**20:.2f} MiB (measured after the first step)")
            else:
                log_main(f"parameters per rank: {mine['param_numel'] / 1e6:.2f}M elements, "
                         f"{mine['param_bytes'] / 2**20:.1f} MiB; trainable {mine['trainable_numel'] / 1e6:.3f}M")
                for name in self.frozen:
                    log_main(f"{name} (frozen: no gradients, no optimizer state) per rank: "
                             f"{mine[name]['param_numel'] / 1e6:.2f}M elements, {mine[name]['param_bytes'] / 2**20:.1f} MiB")

    # -- pieces of the loop -------------------------------------------------------------------------
    def _batch(self, dataset, indices) -> dict:
        batch = collate(dataset, indices)
        batch.setdefault("labels", batch["input_ids"])  # packed text: every next token is a target
        return {k: v.to(self.device) for k, v in batch.items()}

    def _global(self, local: list[torch.Tensor]) -> list[float]:
        """Sums over the data-parallel ranks, in one collective."""
        t = torch.stack([x.detach().float().reshape(()) for x in local]).to(self.device)
        return self.topo.all_reduce_sum_dp(t).tolist()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss over the first ``eval.max_samples`` blocks (all of them when fewer), at any dp size.

        Blocks go to the dp ranks a micro-batch at a time; the last micro-batch may be short, and a rank
        with no block left runs an all-ignored batch, because under ZeRO-3 every forward is a collective
        that every rank must join. The loss is the sum over every target token divided by their number.
        """
        m, dp = self.cfg.train.micro_batch_size, self.topo.dp
        n = min(self.cfg.eval.max_samples, len(self.data.validation))
        rounds = math.ceil(n / (m * dp))
        self.engine.eval()
        eval_loss = getattr(self.stage, "eval_loss", self.stage.loss)
        total = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        parts: dict[str, torch.Tensor] = {}
        for r in range(rounds):
            start = (r * dp + self.topo.dp_rank) * m
            indices = range(min(start, n - 1), min(start + m, n)) if start < n else range(0, 1)
            batch = self._batch(self.data.validation, indices)
            if start >= n:  # nothing left for this rank: join the collectives, count nothing
                batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
            out = self._forward(eval_loss, batch)
            total += out.total.float()
            tokens += out.tokens
            for k, v in out.parts.items():
                parts[k] = parts.get(k, 0) + v.float()
        self.engine.train()
        names = sorted(parts)
        sums = self._global([total, tokens, *(parts[k] for k in names)])
        count = max(sums[1], 1.0)
        record = {"eval_loss": sums[0] / count, "eval_ppl": _ppl(sums[0] / count)}
        record.update({f"eval_loss/{k}": v / count for k, v in zip(names, sums[2:])})
        return record

    def _should_stop(self, steps_this_run: int) -> bool:
        """Whether the run stops after this step, agreed by every rank (or the collectives of the save would hang).

        Raises:
            TrainingError: on every rank, when a write of this step failed on any rank (rank 0's metrics, a
                rank's trace): the ranks learn of it here, where they all meet.
        """
        t = self.cfg.train
        local = self.stop.requested
        local |= t.exit_after_steps is not None and steps_this_run >= t.exit_after_steps
        local |= t.exit_after_minutes is not None and (time.monotonic() - self.started) / 60 >= t.exit_after_minutes
        failed = self.metrics.failure or self.trace_failure
        verdict = self.topo.max(2.0 if failed is not None else float(local))  # one collective per step, as before
        if verdict > 1:
            with self._writing("metrics.jsonl" if self.metrics.failure is not None else "trace/"):
                if failed is not None:
                    raise failed
        return verdict > 0

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics.

        The loss of the step is the sum of the per-token losses over every target token of the global
        batch (all micro-batches, all dp ranks) divided by their number, so micro-batches holding
        different numbers of target tokens weigh by their tokens. DeepSpeed divides each micro-batch's
        loss by the accumulation steps and averages gradients over dp; scaling by ``dp * accum / N``
        undoes both, leaving d(sum / N).
        """
        start = time.perf_counter()
        lr = self.engine.get_lr()[0] if self.trains else 0.0
        micro = self.sampler.micro_batches(self.state.step)
        batches = [self._batch(self.data.train, indices) for indices in micro]
        data_s = time.perf_counter() - start  # the data pipeline's share of the step: sample, read, collate
        local_tokens = sum(target_tokens(b["labels"]) for b in batches)
        global_tokens = max(self._global([local_tokens])[0], 1.0)
        scale = self.topo.dp * len(batches) / global_tokens
        total = torch.zeros((), device=self.device)
        parts: dict[str, torch.Tensor] = {}
        skipped, grad_norm = 0, None
        step = self.state.step + 1
        for i, batch in enumerate(batches):
            left_out, norm = self._micro_step(step, i, batch, scale, total, parts, last=i == len(batches) - 1)
            skipped += left_out
            grad_norm = norm if norm is not None else grad_norm
        if self.trace is not None and self.trace_failure is None:
            try:
                self.trace.write(json.dumps({"step": self.state.step, "rank": self.topo.rank,
                                             "indices": [int(i) for ix in micro for i in ix]}) + "\n")
            except OSError as e:  # a full disk: every rank stops on it at the end of the step (_should_stop)
                self.trace_failure = e
        names = sorted(parts)
        sums = self._global([total, *(parts[k] for k in names)])
        if not math.isfinite(sums[0]):
            self._stop_nonfinite(step)
        self.state.step += 1
        self.state.samples_seen += self.cfg.train.global_batch_size
        self.state.tokens_seen += self.tokens_per_step
        elapsed = time.perf_counter() - start
        if not self.own_grad_norm:
            grad_norm = self.engine.get_global_grad_norm()
        tps = self.tokens_per_step / elapsed
        record = {
            "step": self.state.step,
            "loss": sums[0] / global_tokens,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tps,
            "data_s": data_s,
            "step_s": elapsed,
            "mfu": tps * self.flops_per_token / self.peak_flops,
            "tokens_seen": self.state.tokens_seen,
            "samples_seen": self.state.samples_seen,
            "target_tokens": int(global_tokens),
        }
        record.update({f"loss/{k}": v / global_tokens for k, v in zip(names, sums[1:])})
        if skipped:
            record["skipped_micro_batches"] = skipped
        return record

    def _micro_step(self, step: int, i: int, batch: dict, scale: float, total: torch.Tensor,
                    parts: dict[str, torch.Tensor], last: bool) -> tuple[bool, float | None]:
        """Forward, backward and (at the accumulation boundary) the optimizer step of one micro-batch.

        Adds its loss to ``total`` and its components to ``parts``; returns whether it was left out
        (``train.nonfinite=skip``) and the gradient norm when the loop measures it itself.
        """
        self.topo.mark(step, i, "forward")
        if not self.trains:  # nothing trainable (a frozen control run): measure the loss, change nothing
            with torch.no_grad():
                total += self._forward(self.stage.loss, batch).total.float()
            return False, None
        out = self._forward(self.stage.loss, batch)
        if faults.at("step", self.topo.rank, step) == "nan":
            out.total = out.total * float("nan")
        # Under train.nonfinite=skip every micro-batch is checked (a sync per micro-batch); under
        # stop the step's summed loss is checked once in train_step, before anything is saved.
        left_out = self.skip_nonfinite and self.topo.any(not bool(torch.isfinite(out.total)))
        if left_out:
            log_main(f"step {step}: a micro-batch's loss is not finite; left out of the step (train.nonfinite=skip)")
            # Every rank redoes the micro-step with no target (zero gradient), so the collectives
            # of ZeRO-3 and of the gradient reduction stay matched across ranks.
            ignored = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
            loss = self.stage.loss(self.engine, ignored).total * 0.0
        else:
            loss = out.total * scale
            total += out.total.detach().float()
            for k, v in out.parts.items():
                parts[k] = parts.get(k, 0) + v.detach().float()
        self.topo.mark(step, i, "backward")
        self.engine.backward(loss)
        grad_norm = _grad_norm(self.engine) if last and self.own_grad_norm else None  # before the step consumes them
        self.topo.mark(step, i, "step")
        self.engine.step()
        return left_out, grad_norm

    def _stop_nonfinite(self, step: int) -> None:
        last = latest_checkpoint(self.ckpt.root)
        kept = f"the last checkpoint ({last.name}) is intact" if last else "no checkpoint was written yet"
        raise TrainingError(
            f"the loss is not finite at step {step}; stopped before saving, {kept}; lower train.lr or check "
            "the data, or set train.nonfinite=skip to leave such micro-batches out"
        )

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train to ``train.max_steps`` (or until asked to stop), checkpoint, export.

        Raises:
            TrainingError: a non-finite loss under ``train.nonfinite=stop``, a collective that timed out
                (naming the ranks that did not arrive), or a write that failed on any rank (a full disk).
        """
        try:
            return self._fit()
        except TrainingError:
            raise  # said already
        except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors too
            if not collective_timed_out(e):
                raise
            raise TrainingError(self.topo.who_is_late(), from_this_rank=True) from None

    def _fit(self) -> TrainState:
        cfg, state = self.cfg, self.state
        if state.step == 0 and cfg.eval.at_start:
            self.metrics.log({"step": 0, **self.evaluate()})
        steps_this_run, saved_at = 0, state.step
        while state.step < cfg.train.max_steps:
            record = self.train_step()
            steps_this_run += 1
            if steps_this_run == 1:
                self._write_layout(after_step=True)  # with the state Adam allocated in its first step
            last = state.step == cfg.train.max_steps
            if state.step % cfg.eval.every_steps == 0 or last:
                record.update(self.evaluate())
            if state.step % cfg.train.log_every_steps == 0 or last or "eval_loss" in record:
                self.metrics.log(record)
            stop = self._should_stop(steps_this_run) and not last
            if state.step % cfg.checkpoint.every_steps == 0 or last or stop:
                self.topo.mark(state.step, 0, "save")
                self.ckpt.save(self.engine, state)
                saved_at = state.step
            if stop:
                log_main(f"stopping early at step {state.step}; the same command resumes from here")
                break
        if state.step == cfg.train.max_steps and saved_at != state.step:
            self.ckpt.save(self.engine, state)
        with self._writing("metrics.jsonl"):  # closing writes what TensorBoard still holds
            self.metrics.close()
            if self.trace is not None:
                self.trace.close()
        if state.step == cfg.train.max_steps and cfg.export.at_end:
            self.export()
        return state

    def export(self) -> None:
        from distrib.checkpoint.export import export_checkpoint

        path = latest_checkpoint(self.ckpt.root)
        # Every rank takes part: in a tp>1 run's universal conversion, and in writing the weight files.
        export_checkpoint(path, self.out / "hf", adapter_dir=self.out / "adapter", topo=self.topo)
        if self.topo.is_main:
            extra = f" (LoRA adapter in peft's format: {self.out / 'adapter'})" if self.cfg.finetune.lora.enabled else ""
            log_main(f"exported {path.name} to {self.out / 'hf'}{extra}")
        self.topo.barrier()


def compile_decision(cfg: Config, tp: int, accelerator: str | None = None) -> tuple[bool, str | None]:
    """Whether to compile the model under ``cfg.model.compile``, and what stands in the way, if anything.

    ``auto`` compiles runs of at least :data:`~distrib.config.COMPILE_MIN_STEPS` steps where nothing stands in
    the way, and stays silent otherwise; ``true`` compiles unless something does, which the caller says.
    The decision depends on the config only, so that a resumed run computes as the interrupted one did.
    """
    from distrib.config import COMPILE_MIN_STEPS

    mode = cfg.model.compile
    if mode is False:
        return False, None
    blocker = compile_blocker(cfg, tp, accelerator)
    if mode == "auto" and cfg.train.max_steps < COMPILE_MIN_STEPS:
        return False, blocker
    return blocker is None, blocker


def attention_for(compiled: bool, device_type: str) -> str:
    """``model.attn_implementation=auto``: ``eager`` for a compiled model on the CPU, else ``sdpa``.

    Compiled, the eager attention's matmuls and softmax fuse with their neighbours, and on the CPU that beats
    PyTorch's sdpa kernel, which the compiler calls as it is (about 10% of a step of the benchmark workload,
    ``BENCHMARKS.md``). On GPUs sdpa (flash or memory-efficient attention) wins, compiled or not.
    """
    return "eager" if compiled and device_type == "cpu" else "sdpa"


def compile_blocker(cfg: Config, tp: int, accelerator: str | None = None) -> str | None:
    """Why ``torch.compile`` cannot serve this run (None when it can)."""
    if tp > 1:
        return "tensor-parallel layers (parallel.tp > 1) are not compiled"
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
    if accelerator == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            return f"no C++ compiler ({compiler}) for the CPU code torch.compile generates; install g++ or set CXX"
    elif accelerator == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "triton, which torch.compile generates GPU kernels with, is not installed"
    return None


def _failing_backend(graph, inputs):
    """A torch.compile backend that fails, as a broken toolchain does (fault ``compile:fail``)."""
    raise RuntimeError("injected compiler failure")


def _is_compile_error(e: BaseException) -> bool:
    """Whether ``e`` came from torch.compile (dynamo or the backend), not from the model or the data."""
    import torch._dynamo.exc as dynamo_exc

    kinds: tuple[type, ...] = (dynamo_exc.TorchDynamoException,)
    try:
        from torch._inductor.exc import InductorError

        kinds += (InductorError,)
    except ImportError:
        pass
    return isinstance(e, kinds)


def data_identity(data) -> dict:
    """What identifies prepared data across ranks: cache key, tokenizer, block counts, a digest of edge blocks."""
    import hashlib

    import numpy as np

    vocab = hashlib.sha256(json.dumps(sorted(data.tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for split in (data.train, data.validation):
        digest.update(str(len(split)).encode())
        for i in sorted({0, len(split) - 1}) if len(split) else ():
            digest.update(np.asarray(split[i]["input_ids"]).tobytes())
    return {"fingerprint": data.fingerprint, "tokenizer": vocab, "train_blocks": len(data.train),
            "validation_blocks": len(data.validation), "blocks": digest.hexdigest()[:16]}


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this rank holds: Adam moments and fp32 master copies, each tensor once.

    Walks DeepSpeed's wrappers (ZeRO, bf16) down to the base optimizer; 0 before the first step (Adam
    allocates its state lazily) and for an engine without optimizer.
    """
    seen: dict[tuple[int, int], int] = {}

    def add(t) -> None:
        if torch.is_tensor(t) and t.numel():
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()

    opt = optimizer
    while opt is not None:
        for st in getattr(opt, "state", {}).values():
            for v in (st.values() if isinstance(st, dict) else ()):
                add(v)
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                     "fp32_groups_flat"):  # ZeRO-1/2, ZeRO-3, bf16, and ZeRO-0 in bf16/fp16 (whole fp32 masters)
            for t in getattr(opt, name, None) or ():
                add(t)
        opt = getattr(opt, "optimizer", None)
    return sum(seen.values())


def _grad_norm(engine) -> float:
    """L2 norm of the reduced gradients of the trainable parameters (tensor-parallel slices counted once)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    params = [p for p in engine.module.parameters() if p.grad is not None]
    return float(clip_grad_norm_(params, max_norm=float("inf"), mpu=engine.mpu))


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))
