"""Run one fine-tune in-process (under torchrun, or as one process) and report what the tests check.

    torchrun --nproc-per-node 2 tests/distributed/finetune_probe.py REPORT.json CONFIG key=value ...

Rank 0 writes REPORT.json with: the names of frozen parameters that changed and of trainable ones that
did not (gathered from every ZeRO-3 shard), the step-1 gradients (``grads=true``, ZeRO-0 only, before the
optimizer consumes them) and, with LoRA, whether peft's loading of the exported adapter onto the base and
the merged ``hf/`` reproduce the trained engine's logits.
"""

import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from distrib.checkpoint.base import resolve_base, with_base  # noqa: E402
from distrib.config import load_config  # noqa: E402
from distrib.stages import stage_class  # noqa: E402
from distrib.parallel.topology import Topology  # noqa: E402
from distrib.train.trainer import Trainer  # noqa: E402
from distrib.launch.env import detect  # noqa: E402


def gathered(module):
    """{name: (fp32 copy of the whole tensor, requires_grad)}; collective under ZeRO-3."""
    out = {}
    for name, p in module.named_parameters():
        ctx = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext()
        with ctx:
            out[name] = (p.detach().clone().float(), p.requires_grad)
    return out


def main() -> None:
    report_path, config, *overrides = sys.argv[1:]
    want_grads = "grads=true" in overrides
    overrides = [o for o in overrides if o != "grads=true"]
    cfg = load_config(config, overrides)
    cfg = with_base(cfg, resolve_base(cfg))
    detect().export()
    topo = Topology.init()
    trainer = Trainer(cfg, topo, stage_class("finetune")())
    engine = trainer.engine
    report: dict = {}

    if want_grads:  # the reduced gradients of step 1, as the optimizer is about to see them
        step = engine.step

        def capture():
            if engine.is_gradient_accumulation_boundary() and "grads" not in report:
                report["grads"] = {n: p.grad.tolist() for n, p in engine.module.named_parameters()
                                   if p.grad is not None}
                report["micro_batch_targets"] = [
                    int((b["labels"][:, 1:] != -100).sum())
                    for b in (trainer._batch(trainer.data.train, ix) for ix in trainer.sampler.micro_batches(0))]
            step()

        engine.step = capture

    before = gathered(engine.module)
    trainer.fit()
    after = gathered(engine.module)
    report["frozen_changed"] = [n for n, (t, rg) in before.items() if not rg and not torch.equal(t, after[n][0])]
    report["trainable_unchanged"] = [n for n, (t, rg) in before.items() if rg and torch.equal(t, after[n][0])]
    report["n_frozen"] = sum(not rg for _, rg in before.values())
    report["n_trainable"] = sum(rg for _, rg in before.values())

    batch = trainer._batch(trainer.data.validation, range(2))["input_ids"]
    engine.eval()
    with torch.no_grad():
        trained = engine(input_ids=batch).logits.float()
    if topo.is_main and cfg.finetune.lora.enabled:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        out = Path(cfg.output_dir)
        dtype = trained.dtype if cfg.precision == "fp32" else torch.bfloat16
        base = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, dtype=dtype)
        with torch.no_grad():
            adapted = PeftModel.from_pretrained(base, out / "adapter")(input_ids=batch.cpu()).logits.float()
            merged = AutoModelForCausalLM.from_pretrained(out / "hf")(input_ids=batch.cpu()).logits.float()
        report["adapter_max_diff"] = float((adapted - trained.cpu()).abs().max())
        report["merged_max_diff"] = float((merged - trained.cpu()).abs().max())
        report["logit_scale"] = float(trained.abs().max())
    if topo.is_main:
        Path(report_path).write_text(json.dumps(report))
    topo.shutdown()


if __name__ == "__main__":
    main()
