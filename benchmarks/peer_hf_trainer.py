"""The reference workload under Hugging Face Trainer with the same DeepSpeed config (as its docs show).

    torchrun --nproc-per-node 2 benchmarks/peer_hf_trainer.py --workdir DIR --steps N --out FILE

Reads what ``benchmarks/run.py`` wrote in DIR (model config, DeepSpeed config, packed blocks) and
writes the wall clock at the end of each optimizer step (rank 0) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments


class Blocks(torch.utils.data.Dataset):
    def __init__(self, path: str):
        self.blocks = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        ids = torch.as_tensor(np.asarray(self.blocks[i]), dtype=torch.long)
        return {"input_ids": ids, "labels": ids}


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.time())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    ds_path = os.path.join(args.workdir, "ds_config.json")
    ds = json.load(open(ds_path))
    opt = ds["optimizer"]["params"]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=ds["train_micro_batch_size_per_gpu"],
            gradient_accumulation_steps=ds["gradient_accumulation_steps"], learning_rate=opt["lr"],
            adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1], adam_epsilon=opt["eps"],
            weight_decay=opt["weight_decay"], max_grad_norm=ds["gradient_clipping"], warmup_steps=4,
            lr_scheduler_type="cosine", bf16=True, deepspeed=ds_path, save_strategy="no", report_to=[],
            logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available())
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(args.workdir, "model")))
        clock = StepClock()
        trainer = Trainer(model=model, args=targs, train_dataset=Blocks(os.path.join(args.workdir, "blocks.npy")),
                          callbacks=[clock])
        result = trainer.train()
        if trainer.is_world_process_zero():
            json.dump({"step_end": clock.ends, "loss": result.training_loss}, open(args.out, "w"))


if __name__ == "__main__":
    main()
