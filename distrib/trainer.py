"""The one training loop every stage runs.

A stage (pretraining, fine-tuning, distillation) differs only in which models it builds, which
parameters train and what the loss is; it hands the Trainer a :class:`Stage` and the loop does the
rest: data, engine, resume, evaluation, metrics, checkpoints, export.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Protocol

import torch

from distrib.checkpoint import Checkpointer, TrainState, latest_checkpoint
from distrib.config import Config
from distrib.data import GlobalBatchSampler, collate, prepare_data
from distrib.metrics import MetricsLogger, measure_peak_tflops
from distrib.model import count_parameters, flops_per_token, hf_config
from distrib.parallelize import build_engine, deepspeed_config, torch_dtype
from distrib.tensor_parallel import apply_plan
from distrib.topology import Topology
from distrib.utils import StopRequest, log_main

#: loss = objective(engine, batch); the engine's forward is the (wrapped) trainable model.
Objective = Callable[[torch.nn.Module, dict], torch.Tensor]


class Stage(Protocol):
    """What a stage supplies to the loop."""

    name: str

    def build_model(self, cfg: Config, hf_cfg, dtype: torch.dtype) -> torch.nn.Module:
        """The model to train, with frozen parts already frozen."""

    def objective(self) -> Objective:
        """The training (and evaluation) loss."""


def causal_lm_loss(engine: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch (every position of a packed block counts)."""
    return engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


class Trainer:
    """Runs ``stage`` to ``train.max_steps`` under ``cfg`` on ``topo``, resuming where a run stopped."""

    def __init__(self, cfg: Config, topo: Topology, stage: Stage, resume_from: Path | None = None,
                 stop: StopRequest | None = None):
        self.cfg, self.topo, self.stage = cfg, topo, stage
        self.out = Path(cfg.output_dir)
        self.started = time.monotonic()
        self.stop = stop or StopRequest()

        if topo.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml())
        self.data = prepare_data(cfg.data, cfg.seed)
        if topo.is_main:
            self.data.tokenizer.save_pretrained(self.out / "tokenizer")

        self.hf_cfg = hf_config(cfg.model, vocab_size=len(self.data.tokenizer), seq_len=cfg.data.seq_len)
        self.ckpt = Checkpointer(self.out / "checkpoints", topo, cfg, self.data.tokenizer)
        universal = resume_from is not None and self.ckpt.needs_universal(resume_from)
        if universal:
            self.ckpt.make_universal(resume_from)
        ds_config = deepspeed_config(cfg, topo.world_size, load_universal=universal)

        self.n_params = count_parameters(self.hf_cfg)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and world size
        dtype = torch_dtype(cfg.precision)
        model = self._build_model(ds_config, dtype)
        if topo.tp > 1:
            ds_config = apply_plan(model, cfg, ds_config)
        self.engine = build_engine(model, cfg, topo, ds_config)
        self.objective = stage.objective()

        self.state = TrainState(world_size=topo.world_size, dp=topo.dp, tp=topo.tp,
                                zero_stage=cfg.parallel.zero_stage, config_hash=cfg.identity_hash())
        if resume_from is not None:
            prev = self.ckpt.load(self.engine, resume_from, universal)
            self.state.step, self.state.samples_seen, self.state.tokens_seen = prev.step, prev.samples_seen, prev.tokens_seen
            log_main(f"resumed from {resume_from} at step {prev.step} (saved with dp={prev.dp}, now dp={topo.dp})")
            if universal:  # the saved per-rank RNG streams belong to another layout: start fresh ones
                torch.manual_seed(cfg.seed + topo.rank + 1_000_003 * prev.step)
        else:
            torch.manual_seed(cfg.seed + topo.rank)  # per-rank streams (dropout) from here on

        self.sampler = GlobalBatchSampler(len(self.data.train), cfg.train.global_batch_size,
                                          cfg.train.micro_batch_size, topo.dp, topo.dp_rank, cfg.seed)
        self.device = topo.device
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(self.hf_cfg, self.n_params, cfg.data.seq_len)
        peak = cfg.metrics.peak_tflops or topo.max(measure_peak_tflops(dtype))  # the devices are alike: take the best
        self.peak_flops = peak * 1e12 * topo.world_size
        self._write_layout()  # before the progress bar starts drawing
        log_main(
            f"{stage.name}: {self.n_params / 1e6:.2f}M params, world={topo.world_size} (dp={topo.dp} x tp={topo.tp}), "
            f"ZeRO-{cfg.parallel.zero_stage}, {cfg.precision}, grad accum {cfg.grad_accum_steps(topo.world_size)}, "
            f"{len(self.data.train)} train blocks of {cfg.data.seq_len} tokens"
        )
        self.metrics = MetricsLogger(self.out, topo.is_main, tensorboard=cfg.metrics.tensorboard,
                                     progress_bar=cfg.metrics.progress_bar, total_steps=cfg.train.max_steps,
                                     start_step=self.state.step)
        self.trace = None
        if cfg.data.trace_samples:
            (self.out / "trace").mkdir(parents=True, exist_ok=True)
            self.trace = open(self.out / "trace" / f"samples-rank{topo.rank:05d}.jsonl", "a", buffering=1)

    def _build_model(self, ds_config: dict, dtype: torch.dtype) -> torch.nn.Module:
        if self.cfg.parallel.zero_stage != 3:
            return self.stage.build_model(self.cfg, self.hf_cfg, dtype)
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
            return self.stage.build_model(self.cfg, self.hf_cfg, dtype)
        finally:
            unset_hf_deepspeed_config()

    def _write_layout(self) -> None:
        """``<output_dir>/layout.json``: what every rank holds (parameter elements and bytes, by name)."""
        import torch.distributed as dist

        local = {n: p.ds_tensor if hasattr(p, "ds_tensor") else p for n, p in self.engine.module.named_parameters()}
        mine = {"rank": self.topo.rank, "dp_rank": self.topo.dp_rank, "tp_rank": self.topo.tp_rank,
                "param_numel": sum(t.numel() for t in local.values()),
                "param_bytes": sum(t.numel() * t.element_size() for t in local.values()),
                "params": {n: t.numel() for n, t in local.items()}}
        ranks = [None] * self.topo.world_size
        dist.all_gather_object(ranks, mine)
        if self.topo.is_main:
            layout = {"world_size": self.topo.world_size, "dp": self.topo.dp, "tp": self.topo.tp,
                      "zero_stage": self.cfg.parallel.zero_stage, "total_params": self.n_params, "ranks": ranks}
            (self.out / "layout.json").write_text(json.dumps(layout, indent=1))
            log_main(f"parameters per rank: {mine['param_numel'] / 1e6:.2f}M elements, {mine['param_bytes'] / 2**20:.1f} MiB")

    # -- pieces of the loop -------------------------------------------------------------------------
    def _batch(self, indices) -> dict:
        return {k: v.to(self.device) for k, v in collate(self.data.train, indices).items()}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the first ``eval.max_samples`` blocks, whatever the dp size.

        Every dp rank runs the same number of batches: under ZeRO-3 a forward is a collective.
        """
        m, dp = self.cfg.train.micro_batch_size, self.topo.dp
        n_batches = min(self.cfg.eval.max_samples, len(self.data.validation)) // (m * dp)
        self.engine.eval()
        total = torch.zeros((), device=self.device)
        for b in range(n_batches):
            start = (b * dp + self.topo.dp_rank) * m
            batch = {k: v.to(self.device) for k, v in collate(self.data.validation, range(start, start + m)).items()}
            total += self.objective(self.engine, batch).float()
        self.engine.train()
        return float(self.topo.all_reduce_mean_dp(total / max(1, n_batches)).item())

    def _should_stop(self, steps_this_run: int) -> bool:
        t = self.cfg.train
        local = self.stop.requested
        local |= t.exit_after_steps is not None and steps_this_run >= t.exit_after_steps
        local |= t.exit_after_minutes is not None and (time.monotonic() - self.started) / 60 >= t.exit_after_minutes
        return self.topo.any(local)  # every rank must agree, or the collectives of the save would hang

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics."""
        start = time.perf_counter()
        lr = self.engine.get_lr()[0]
        losses = []
        micro = self.sampler.micro_batches(self.state.step)
        for indices in micro:
            loss = self.objective(self.engine, self._batch(indices))
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        if self.trace is not None:
            self.trace.write(json.dumps({"step": self.state.step, "rank": self.topo.rank,
                                         "indices": [int(i) for ix in micro for i in ix]}) + "\n")
        loss = float(self.topo.all_reduce_mean_dp(torch.stack(losses).mean()).item())
        self.state.step += 1
        self.state.samples_seen += self.cfg.train.global_batch_size
        self.state.tokens_seen += self.tokens_per_step
        elapsed = time.perf_counter() - start
        grad_norm = self.engine.get_global_grad_norm()
        tps = self.tokens_per_step / elapsed
        return {
            "step": self.state.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / self.peak_flops,
            "tokens_seen": self.state.tokens_seen,
            "samples_seen": self.state.samples_seen,
        }

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        cfg, state = self.cfg, self.state
        if state.step == 0 and cfg.eval.at_start:
            eval_loss = self.evaluate()
            self.metrics.log({"step": 0, "eval_loss": eval_loss, "eval_ppl": _ppl(eval_loss)})
        steps_this_run, saved_at = 0, state.step
        while state.step < cfg.train.max_steps:
            record = self.train_step()
            steps_this_run += 1
            last = state.step == cfg.train.max_steps
            if state.step % cfg.eval.every_steps == 0 or last:
                record["eval_loss"] = self.evaluate()
                record["eval_ppl"] = _ppl(record["eval_loss"])
            if state.step % cfg.train.log_every_steps == 0 or last or "eval_loss" in record:
                self.metrics.log(record)
            stop = not last and self._should_stop(steps_this_run)
            if state.step % cfg.checkpoint.every_steps == 0 or last or stop:
                self.ckpt.save(self.engine, state)
                saved_at = state.step
            if stop:
                log_main(f"stopping early at step {state.step}; the same command resumes from here")
                break
        if state.step == cfg.train.max_steps and saved_at != state.step:
            self.ckpt.save(self.engine, state)
        self.metrics.close()
        if self.trace is not None:
            self.trace.close()
        if state.step == cfg.train.max_steps and cfg.export.at_end:
            self.export()
        return state

    def export(self) -> None:
        from distrib.export import export_checkpoint

        if self.topo.is_main:
            path = latest_checkpoint(self.ckpt.root)
            export_checkpoint(path, self.out / "hf")
            log_main(f"exported {path.name} to {self.out / 'hf'}")
        self.topo.barrier()


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))
