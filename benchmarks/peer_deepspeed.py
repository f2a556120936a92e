"""The reference workload as a bare DeepSpeed engine loop: what a user writes from DeepSpeed's tutorial.

    torchrun --nproc-per-node 2 benchmarks/peer_deepspeed.py --workdir DIR [--compile] --steps N

Reads the model config (``DIR/model/config.json``), the DeepSpeed config (``DIR/ds_config.json``) and
the packed blocks (``DIR/blocks.npy``) the driver (``benchmarks/run.py``) wrote, so that every
system trains the same model on the same tokens with the same DeepSpeed settings. Writes the wall
clock at the end of each optimizer step (rank 0) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import deepspeed
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compile", action="store_true", help="engine.compile() before the first step")
    args = ap.parse_args()

    deepspeed.init_distributed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ds_config = json.load(open(os.path.join(args.workdir, "ds_config.json")))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(args.workdir, "model")),
                                             dtype=torch.bfloat16)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    if args.compile:
        engine.compile()
    blocks = np.load(os.path.join(args.workdir, "blocks.npy"), mmap_mode="r")
    micro = ds_config["train_micro_batch_size_per_gpu"]
    device = engine.device
    rng = np.random.default_rng(rank)
    ends = []
    for _ in range(args.steps):
        idx = np.sort(rng.choice(len(blocks), micro, replace=False))
        ids = torch.as_tensor(np.asarray(blocks[idx]), dtype=torch.long, device=device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        ends.append(time.time())
    if rank == 0:
        json.dump({"step_end": ends, "loss": float(loss), "world": world}, open(args.out, "w"))


if __name__ == "__main__":
    main()
