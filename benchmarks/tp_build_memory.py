"""Per-rank peak resident memory of building a tensor-parallel model and its engine, at tp=1 and tp=2.

    python benchmarks/tp_build_memory.py [--no-optimizer | --teacher] [--whole]
        [--layers 22] [--hidden 2048] [--ffn 5632] [--vocab 32000]

Builds a Llama (by default the TinyLlama shape, 1.1 B parameters, bf16) the way a training run does —
model, tensor-parallel plan, DeepSpeed engine with its AdamW (ZeRO-1; ``--no-optimizer``: an engine
without optimizer) — once in 1 process at tp=1 and once in 2 processes at tp=2, without data or
training steps, and prints each rank's peak resident memory (its own ``VmHWM``) once its weights are all
there, once its engine exists, and once every weight has been read (as the first forward pass reads them:
a model loaded from a memory-mapped file is resident only then). A model split by tensor parallelism is
built empty and each rank fills only its own shards, so a tp=2 rank should peak at little more than half a
tp=1 rank. ``--whole``: built whole at tp=2 too and split by AutoTP, as before (for comparison).

``--teacher``: the model is instead a distillation teacher, loaded from a pretrained directory (written once, in
bf16, to ``runs/bench-tp-build-teacher/``) frozen, in an engine without optimizer, as the distill stage builds it:
at tp=1 from its files whole, at tp=2 each rank reading only its own shards' bytes from the safetensors file.

On the CPU the engine's optimizer state is host memory too, allocated by DeepSpeed in many blocks that
glibc's adaptive ``mmap`` threshold places in its heap; ``MALLOC_MMAP_THRESHOLD_=1000000`` in the
environment fixes the threshold and shows what the engine itself holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def worker(args) -> None:
    """One rank: build as ``Trainer.__init__`` does, then report the peak to ``args.out``."""
    sys.path.insert(0, str(ROOT))
    from distrib.parallel import tensor_parallel
    from distrib.model import build_model, count_parameters, deferred_weights, hf_config
    from distrib.parallel.engine import build_engine, deepspeed_config, torch_dtype
    from distrib.parallel.tensor_parallel import apply_plan, materialize_shards
    from distrib.parallel.topology import Topology
    from distrib.utils import peak_rss_bytes
    import torch

    topo = Topology.init(tp=args.tp)
    cfg = _config(args, topo.dp)
    hf_cfg = hf_config(cfg.model, seq_len=2048)
    ds_config = deepspeed_config(cfg, topo.world_size)
    dtype = torch_dtype(cfg.precision)
    marks = {"before_build": peak_rss_bytes()}
    fill = tensor_parallel.fill_shards

    def fill_and_mark(*a, **kw):  # the model's weights are all there once this returns
        fill(*a, **kw)
        marks["weights"] = peak_rss_bytes()

    tensor_parallel.fill_shards = fill_and_mark
    with deferred_weights(topo.tp > 1 and not args.whole):
        if args.teacher:
            from distrib.stages.distill import DistillStage

            model = DistillStage().build_frozen(cfg, dtype)["teacher"]
        else:
            model = build_model(cfg.model, hf_cfg, seed=cfg.seed, dtype=dtype)
    marks.setdefault("weights", peak_rss_bytes())
    if args.no_optimizer:
        model.requires_grad_(False)  # an engine without optimizer: what the model itself costs
    if topo.tp > 1:
        ds_config = apply_plan(model, cfg, ds_config)
    with materialize_shards(model):
        engine = build_engine(model, cfg, topo, ds_config)
    peak = peak_rss_bytes()
    with torch.no_grad():
        for p in engine.module.parameters():
            p.sum()  # every byte read, as by the first forward pass
    param_bytes = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    row = {"tp": args.tp, "rank": topo.rank, "peak_rss_bytes": peak, "rss_before_build_bytes": marks["before_build"],
           "peak_rss_weights_bytes": marks["weights"], "peak_rss_read_bytes": peak_rss_bytes(),
           "param_bytes": param_bytes, "n_params": count_parameters(hf_cfg)}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    topo.shutdown()


def _config(args, dp: int = 1):
    """The run's config: the Llama of ``args`` (and, with ``--teacher``, its pretrained directory as the teacher)."""
    from distrib.config import Config

    return Config.model_validate({
        "precision": "bf16",
        "model": {"arch": "llama", "hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
                  "num_kv_heads": args.kv_heads, "intermediate_size": args.ffn, "vocab_size": args.vocab},
        "train": {"micro_batch_size": 1, "global_batch_size": dp},
        "parallel": {"tp": args.tp, "zero_stage": 1},
        **({"teacher": str(args.teacher_dir)} if args.teacher else {}),
    })


def _write_teacher(args) -> None:
    """The pretrained directory the ``--teacher`` case loads, written once per shape (its initial weights, bf16)."""
    import torch

    from distrib.model import build_model, hf_config

    shape = {k: getattr(args, k) for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab")}
    marker = args.teacher_dir / "bench-shape.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return
    cfg = _config(args)
    model = build_model(cfg.model, hf_config(cfg.model, seq_len=2048), seed=cfg.seed, dtype=torch.bfloat16)
    model.save_pretrained(args.teacher_dir, safe_serialization=True)
    marker.write_text(json.dumps(shape))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--no-optimizer", action="store_true", help="an engine without optimizer (the model alone)")
    ap.add_argument("--teacher", action="store_true",
                    help="a distillation teacher loaded from a pretrained directory (an engine without optimizer)")
    ap.add_argument("--whole", action="store_true",
                    help="build the model whole at tp=2 too (AutoTP then splits it): how it was built before")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.teacher_dir = ROOT / "runs" / "bench-tp-build-teacher"
    if args.worker:
        return worker(args)
    if args.teacher:
        sys.path.insert(0, str(ROOT))
        _write_teacher(args)

    out = ROOT / "runs" / "bench-tp-build.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    shape = ["--layers", args.layers, "--hidden", args.hidden, "--ffn", args.ffn, "--heads", args.heads,
             "--kv-heads", args.kv_heads, "--vocab", args.vocab] + (["--no-optimizer"] if args.no_optimizer else []) \
        + (["--teacher"] if args.teacher else []) + (["--whole"] if args.whole else [])
    for tp in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
               __file__, "--worker", "--tp", str(tp), "--out", str(out), *map(str, shape)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: (r["tp"], r["rank"]))
    engine = "engine without optimizer" if args.no_optimizer or args.teacher else "engine with AdamW"
    what = "a distillation teacher read from safetensors" if args.teacher else "initial weights"
    how = ", built whole at tp=2 too" if args.whole else ""
    print(f"Llama {rows[0]['n_params'] / 1e9:.2f} B parameters, bf16, ZeRO-1, {what}, {engine}{how}; "
          "peak resident MiB per rank")
    print(f"{'tp':>3} {'rank':>4} {'param MiB':>10} {'before build':>13} {'weights built':>14} {'engine built':>13} "
          f"{'weights read':>13}")
    for r in rows:
        print(f"{r['tp']:>3} {r['rank']:>4} {r['param_bytes'] / MIB:>10.0f} {r['rss_before_build_bytes'] / MIB:>13.0f} "
              f"{r['peak_rss_weights_bytes'] / MIB:>14.0f} {r['peak_rss_bytes'] / MIB:>13.0f} "
              f"{r['peak_rss_read_bytes'] / MIB:>13.0f}")
    ratios = {}
    for key, what in (("peak_rss_weights_bytes", "weights built"), ("peak_rss_bytes", "engine built"),
                      ("peak_rss_read_bytes", "weights read")):
        tp1 = max(r[key] for r in rows if r["tp"] == 1)
        tp2 = max(r[key] for r in rows if r["tp"] == 2)
        ratios[key] = tp2 / tp1
        print(f"tp=2 / tp=1 peak resident memory per rank, {what}: {tp2 / tp1:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ranks": rows, "tp2_over_tp1": ratios}, indent=1))


if __name__ == "__main__":
    main()
