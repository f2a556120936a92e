"""Run one distillation in-process (under torchrun, or as one process) and report on the teacher.

    torchrun --nproc-per-node 2 tests/distributed/distill_probe.py REPORT.json CONFIG key=value ...

Rank 0 writes REPORT.json with: the teacher's parameters that differ, after training, from the files it
was loaded from (gathered from every ZeRO-3 shard, compared bitwise in the training precision), whether
any teacher parameter requires a gradient or holds one, and what optimizer (and optimizer state) the teacher's engine holds.
"""

import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from distrib.checkpoint.base import resolve_base, with_base  # noqa: E402
from distrib.config import load_config  # noqa: E402
from distrib.parallel.engine import torch_dtype  # noqa: E402
from distrib.stages import stage_class  # noqa: E402
from distrib.parallel.topology import Topology  # noqa: E402
from distrib.train.trainer import Trainer, optimizer_state_bytes  # noqa: E402
from distrib.launch.env import detect  # noqa: E402


def gathered(module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.named_parameters():
        ctx = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext()
        with ctx:
            out[name] = p.detach().clone()
    return out


def main() -> None:
    report_path, config, *overrides = sys.argv[1:]
    stage = stage_class("distill")
    cfg = load_config(config, overrides)
    cfg = stage.prepare(with_base(cfg, resolve_base(cfg)))
    stage.materialize(cfg)
    detect().export()
    topo = Topology.init()
    trainer = Trainer(cfg, topo, stage())
    teacher = trainer.frozen["teacher"]
    trainer.fit()
    after = gathered(teacher.module)
    files = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=torch_dtype(cfg.precision)).state_dict()
    report = {
        "n_teacher": len(after),
        "teacher_changed": sorted(n for n, t in after.items() if not torch.equal(t.cpu(), files[n])),
        "teacher_requires_grad": sorted(n for n, p in teacher.module.named_parameters() if p.requires_grad),
        "teacher_grads": sorted(n for n, p in teacher.module.named_parameters() if p.grad is not None),
        # ZeRO-3 wraps even an engine without optimizer in its partitioning "optimizer": look inside it
        "teacher_optimizer": type(getattr(teacher.optimizer, "optimizer", teacher.optimizer)).__name__,
        "teacher_optimizer_state_bytes": optimizer_state_bytes(teacher.optimizer),
        "teacher_training_mode": teacher.module.training,
    }
    if topo.is_main:
        Path(report_path).write_text(json.dumps(report))
    topo.shutdown()


if __name__ == "__main__":
    main()
