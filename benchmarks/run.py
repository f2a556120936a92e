"""Tokens/s and MFU of distrib against the frameworks users would pick instead, on one workload.

    python benchmarks/run.py [--steps 30] [--warmup 10] [--repeats 3] [--systems distrib,hf_trainer,deepspeed,...]

Trains the reference workload (``configs/bench/reference.yaml``: Llama 6x384, 6 heads, FFN 1024, vocab
8192, sequence 256, micro-batch 8, bf16, ZeRO-2, AdamW with weight decay 0.1, clipping 1.0) on 2
processes under each system, the same number of steps, interleaved (round r runs every system, in an
order rotated by r) and repeated. Every system trains the same model on the same packed blocks with
the same DeepSpeed config (distrib's, generated from the reference config).

What is timed: the wall clock between consecutive optimizer-step ends on rank 0, after ``--warmup``
steps (start-up, data preparation, compilation and the first steps' allocations are excluded); a run's
tokens/s is the global tokens of a step over the median of those intervals. Per system the figure is
the median over repeats, with the min-max over repeats as its spread; a ratio is taken within each
round (the systems of a round ran back to back) and reported as median [min, max] over rounds.

MFU = tokens/s x training FLOPs per token (6N + attention, :func:`distrib.model.flops_per_token`) /
(peak x processes). On the CPU the peak is measured: the best bf16 matmul rate of one thread (one per
process, as the runs use) on the shapes of the model's largest matmuls (tokens of a micro-batch x
hidden x FFN width). Pass ``--peak-tflops`` on GPUs (the datasheet's dense bf16 figure per device).

The first system is compared with each of the others. Systems: ``distrib``, ``hf_trainer``, ``deepspeed`` (a bare engine loop), ``deepspeed_compiled``
(the same with ``engine.compile()``), and ``distrib:key=value[:key=value]`` for distrib with overrides
(``distrib:model.compile=false`` measures what compilation brings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "configs" / "bench" / "reference.yaml"
PEERS = {
    "hf_trainer": [str(ROOT / "benchmarks" / "peer_hf_trainer.py")],
    "deepspeed": [str(ROOT / "benchmarks" / "peer_deepspeed.py")],
    "deepspeed_compiled": [str(ROOT / "benchmarks" / "peer_deepspeed.py"), "--compile"],
}


def prepare(work: Path, nproc: int) -> dict:
    """The shared inputs: data (distrib's cache, as every system's blocks), model config, DeepSpeed config."""
    import numpy as np

    from distrib.config import load_config
    from distrib.data import prepare_data
    from distrib.model import count_parameters, flops_per_token, hf_config, matmul_shape
    from distrib.parallel.engine import deepspeed_config

    cfg = load_config(str(REFERENCE), batch_overrides(nproc))
    data = prepare_data(cfg.data, cfg.seed)
    hf = hf_config(cfg.model, vocab_size=len(data.tokenizer), seq_len=cfg.data.seq_len)
    work.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(work / "model")
    (work / "ds_config.json").write_text(json.dumps(deepspeed_config(cfg, nproc), indent=1))  # for this accelerator
    blocks = work / "blocks.npy"
    if not blocks.is_file():
        np.save(blocks, np.asarray(data.train[:]["input_ids"], dtype=np.int32))
    n_params = count_parameters(hf)
    return {"tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len,
            "flops_per_token": flops_per_token(hf, n_params, cfg.data.seq_len), "params": n_params,
            "matmul": matmul_shape(hf, cfg.train.micro_batch_size * cfg.data.seq_len)}


def batch_overrides(nproc: int) -> list[str]:
    """One micro-batch per process a step, whatever the process count (16 sequences on 2 processes)."""
    from distrib.config import load_config

    micro = load_config(str(REFERENCE), []).train.micro_batch_size
    return [f"train.global_batch_size={micro * nproc}"]


def peak_tflops(shape: tuple[int, int, int]) -> float:
    """The best bf16 matmul rate of one thread on ``shape`` (m, k, n), in a fresh process."""
    code = ("import torch; torch.set_num_threads(1); from distrib.train.metrics import measure_peak_tflops; "
            f"print(measure_peak_tflops(torch.bfloat16, shape={tuple(shape)}, trials=10, seconds=0.3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def run_one(system: str, work: Path, steps: int, nproc: int, tag: str) -> tuple[list[float], list[float] | None]:
    """Train ``steps`` steps under ``system``: the step-end wall clocks of rank 0, and for distrib each step's
    share spent in the data pipeline (sampling, reading and collating its blocks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = work / "logs" / f"{tag}.log"
    log.parent.mkdir(exist_ok=True)
    if system.split(":")[0] == "distrib":
        out_dir = work / "runs" / tag
        overrides = system.split(":")[1:]
        cmd = [sys.executable, "-m", "distrib", "pretrain", str(REFERENCE), f"output_dir={out_dir}",
               f"train.max_steps={steps}", *batch_overrides(nproc), *overrides, "--nproc-per-node", str(nproc)]
        subprocess.run(["rm", "-rf", str(out_dir)], check=True)
        _run(cmd, env, log)
        rows = [r for r in map(json.loads, open(out_dir / "metrics.jsonl")) if "tokens_per_s" in r]
        return [r["time"] for r in rows], [r["data_s"] / r["step_s"] for r in rows]
    result = work / "runs" / f"{tag}.json"
    result.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *PEERS[system],
           "--workdir", str(work), "--steps", str(steps), "--out", str(result)]
    _run(cmd, env, log)
    return json.loads(result.read_text())["step_end"], None


def _run(cmd: list[str], env: dict, log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")


def tokens_per_s(ends: list[float], warmup: int, tokens_per_step: int) -> float:
    intervals = [b - a for a, b in zip(ends, ends[1:])][warmup:]
    return tokens_per_step / statistics.median(intervals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default="distrib,hf_trainer,deepspeed,deepspeed_compiled")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the timing at the start of each run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak (datasheet on GPUs)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.steps <= args.warmup + 2:
        sys.exit(f"--steps {args.steps} leaves too few timed steps after --warmup {args.warmup}; raise --steps")

    work = Path(args.work)
    info = prepare(work, args.nproc)
    peak = args.peak_tflops or peak_tflops(info["matmul"])
    systems = args.systems.split(",")
    print(f"reference workload: {info['params'] / 1e6:.1f}M params, {info['tokens_per_step']} tokens a step, "
          f"{args.nproc} processes; peak {peak:.3f} TFLOP/s per process "
          f"({'given' if args.peak_tflops else 'measured, bf16 matmul %dx%dx%d, one thread' % info['matmul']})")
    rounds: list[dict[str, float]] = []
    data_share: dict[str, list[float]] = {}
    for r in range(args.repeats):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        figures = {}
        for system in order:
            started = time.monotonic()
            ends, share = run_one(system, work, args.steps, args.nproc,
                                  f"r{r}-{system.replace(':', '_').replace('=', '-')}")
            figures[system] = tokens_per_s(ends, args.warmup, info["tokens_per_step"])
            if share is not None:
                data_share.setdefault(system, []).extend(share[args.warmup + 1:])
            print(f"round {r + 1}/{args.repeats} {system:<40} {figures[system]:8.0f} tokens/s "
                  f"({time.monotonic() - started:.0f} s with start-up)", flush=True)
        rounds.append(figures)

    def mfu(tps: float) -> float:
        return tps * info["flops_per_token"] / (peak * 1e12 * args.nproc)

    summary = {"workload": info, "peak_tflops_per_process": peak, "steps": args.steps, "warmup": args.warmup,
               "repeats": args.repeats, "rounds": rounds, "systems": {}, "ratios": {}}
    print(f"\n{'system':<40} {'tokens/s (median [min, max])':>30} {'MFU':>7}")
    for s in systems:
        vals = [f[s] for f in rounds]
        med = statistics.median(vals)
        summary["systems"][s] = {"tokens_per_s": med, "min": min(vals), "max": max(vals), "mfu": mfu(med)}
        print(f"{s:<40} {med:>12.0f} [{min(vals):.0f}, {max(vals):.0f}] {100 * mfu(med):>6.1f}%")
    for s, shares in data_share.items():
        summary["systems"][s]["data_share"] = statistics.median(shares)
        print(f"{s}: data pipeline {100 * statistics.median(shares):.2f}% of step time (median of timed steps)")
    a = systems[0]  # the first system against each of the others
    for b in systems[1:]:
        ratios = [f[a] / f[b] for f in rounds]
        summary["ratios"][f"{a} / {b}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        print(f"{a} / {b}: {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
