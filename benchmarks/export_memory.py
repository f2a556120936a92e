"""Peak memory of ``distrib export`` against model size: it must not grow with the model.

Makes two real DeepSpeed checkpoints (ZeRO-2, bf16, one process, one optimizer step, saved by
distrib's own ``Checkpointer``) of Llama models with the same width and ``--small-layers`` /
``--large-layers`` blocks, then exports each in a fresh process and reports the peak resident memory
above that process's baseline (its RSS once everything the export uses is imported). The in-memory
export (the whole fp32 state consolidated, then ``save_pretrained``) is measured the same way for
comparison. Finally the larger model is exported with a small ``--shard-mb`` (several shards and an
index) and must give logits identical to the in-memory export.

    python benchmarks/export_memory.py [--work DIR] [--small-layers 4] [--large-layers 32] [--finetune]

``--finetune`` measures a fine-tune's export instead: each model's streamed export becomes the base of a
LoRA fine-tune (one optimizer step, ZeRO-2, bf16, frozen weights left out of its checkpoint), exported
streamed (the base read one tensor at a time) and as before (the base loaded whole by ``_on_base``);
both exports must be the same bytes, adapter included.

A few minutes on 2 CPU cores; about 3 GB of disk and 3 GB of memory (the training step of the larger).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8192
WIDTH = ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=4", "model.intermediate_size=1408"]


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _tokenizer(vocab: int):
    """A word-level tokenizer with exactly ``vocab`` entries: the export only saves and counts it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def _topology():
    """A one-process job: its rendezvous on a free local port."""
    from distrib.parallel.topology import Topology

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return Topology.init()


def _step_and_save(engine, cfg, topo, tokenizer, out: Path, state, exclude_frozen: bool = False) -> None:
    """One optimizer step on random tokens, the engine saved as a run's checkpoint, its size printed."""
    import torch

    from distrib.checkpoint import Checkpointer

    ids = torch.randint(0, VOCAB, (1, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    ckpt = Checkpointer(out / "checkpoints", topo, cfg, tokenizer)
    ckpt.exclude_frozen = exclude_frozen
    ckpt.save(engine, state)
    print("RESULT", json.dumps({"parameters": sum(p.numel() for p in engine.module.parameters())}))


def make_checkpoint(out: Path, layers: int) -> None:
    """One optimizer step of a fresh model on random tokens, saved as a run's checkpoint."""
    from distrib.checkpoint import TrainState
    from distrib.config import load_config
    from distrib.model import build_model, hf_config
    from distrib.parallel.engine import build_engine, deepspeed_config

    cfg = load_config(str(ROOT / "configs/pretrain/tiny.yaml"), [
        f"output_dir={out}", *WIDTH, f"model.num_layers={layers}", "precision=bf16", "parallel.zero_stage=2",
        "train.micro_batch_size=1", "train.global_batch_size=1", "train.max_steps=1", "train.warmup_steps=0"])
    topo = _topology()
    tokenizer = _tokenizer(VOCAB)
    hf_cfg = hf_config(cfg.model, vocab_size=len(tokenizer), seq_len=cfg.data.seq_len)
    engine = build_engine(build_model(cfg.model, hf_cfg, seed=cfg.seed), cfg, topo, deepspeed_config(cfg, 1))
    _step_and_save(engine, cfg, topo, tokenizer, out, TrainState(step=1, world_size=1, dp=1, tp=1, zero_stage=2,
                                                                   max_steps=1))


def make_finetune_checkpoint(out: Path, base: Path) -> None:
    """One optimizer step of a LoRA fine-tune of ``base`` on random tokens, saved as the trainer saves it."""
    from distrib.model.adapters import apply_freeze, apply_lora
    from distrib.checkpoint.base import model_ref
    from distrib.checkpoint import TrainState
    from distrib.config import load_config
    from distrib.model import build_model, hf_config
    from distrib.parallel.engine import build_engine, deepspeed_config

    cfg = load_config(str(ROOT / "configs/finetune/tiny-lora.yaml"), [
        f"output_dir={out}", f"init_from={base}", f"model.pretrained={base}", f"data.tokenizer={base}",
        "precision=bf16", "parallel.zero_stage=2", "finetune.lora.train_norms=true", "train.micro_batch_size=1",
        "train.global_batch_size=1", "train.max_steps=1", "train.warmup_steps=0"])
    topo = _topology()
    tokenizer = _tokenizer(VOCAB)
    model = build_model(cfg.model, hf_config(cfg.model), seed=cfg.seed)
    apply_freeze(model, cfg.finetune)
    model = apply_lora(model, cfg.finetune, seed=cfg.seed)
    engine = build_engine(model, cfg, topo, deepspeed_config(cfg, 1))
    _step_and_save(engine, cfg, topo, tokenizer, out, TrainState(step=1, world_size=1, dp=1, tp=1, zero_stage=2,
                                                                   max_steps=1, base=model_ref(base)),
                   exclude_frozen=True)


def export(ckpt: Path, out: Path, how: str, shard_mb: int | None) -> None:
    """Export ``ckpt`` and print the peak RSS above the baseline measured once the imports are done."""
    import torch  # noqa: F401 - everything the export uses, imported before the baseline
    import yaml
    from deepspeed.utils import zero_to_fp32  # noqa: F401
    from huggingface_hub import split_state_dict_into_shards_factory  # noqa: F401
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401
    from transformers.modeling_utils import remove_tied_weights_from_state_dict  # noqa: F401

    from distrib.config import Config
    from distrib.checkpoint.export import consolidated_state_dict, export_checkpoint
    from distrib.model import empty_model, hf_config
    from distrib.parallel.engine import torch_dtype

    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    start = time.perf_counter()
    if how == "streamed":
        export_checkpoint(ckpt, out, **({"max_shard_size": shard_mb * 2**20} if shard_mb else {}))
    elif how == "finetune_in_memory":  # a fine-tune's export as it was: the base loaded whole (_on_base)
        from distrib.checkpoint import export as ex

        cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
        dtype = torch_dtype(cfg.precision)
        out.mkdir(parents=True)
        model, adapter = ex._on_base(cfg, consolidated_state_dict(ckpt), ckpt, dtype, staging=out.parent)
        model = model.to(dtype)
        state = model.state_dict()
        model.config.use_cache = True
        ex._save_config(model, out, dtype)
        ex.save_weights(out, model, {k: (lambda t=t: t) for k, t in state.items()}, dtype, cfg.export.max_shard_size)
        AutoTokenizer.from_pretrained(ckpt / "tokenizer").save_pretrained(out)
        os.replace(adapter, out / "adapter")
    else:  # the export as it was: the whole fp32 state in memory, a model assembled from it, save_pretrained
        cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
        tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
        model = empty_model(hf_config(cfg.model, vocab_size=len(tokenizer), seq_len=cfg.data.seq_len))
        model.load_state_dict(consolidated_state_dict(ckpt), strict=False, assign=True)
        model.tie_weights()
        dtype = torch_dtype(cfg.precision)
        model = model.to(dtype)
        model.config.dtype, model.config.use_cache = dtype, True
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    print("RESULT", json.dumps({"baseline": baseline, "peak_above": _status("VmHWM") - baseline,
                      "seconds": time.perf_counter() - start}))


def same_logits(a: Path, b: Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(AutoModelForCausalLM.from_pretrained(a)(input_ids=ids).logits,
                           AutoModelForCausalLM.from_pretrained(b)(input_ids=ids).logits)


def _run(*args: str) -> dict:
    # PYTHONHASHSEED: peft writes adapter_config.json's target_modules from a set of strings, in an order
    # that differs between processes otherwise; the two fine-tune exports are compared byte for byte.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--small-layers", type=int, default=4)
    parser.add_argument("--large-layers", type=int, default=32)
    parser.add_argument("--shard-mb", type=int, default=64, help="max_shard_size of the sharded export")
    parser.add_argument("--finetune", action="store_true", help="measure a LoRA fine-tune's export of each model")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="export-memory-"))
    if args.finetune:
        finetune(work, args.small_layers, args.large_layers)
        return
    mb = 2**20
    rows = {}
    for name, layers in (("small", args.small_layers), ("large", args.large_layers)):
        run = work / name
        params = _run("_make", str(run), str(layers))["parameters"]
        ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        rows[name] = {"layers": layers, "parameters": params,
                      "streamed": _run("_export", str(ckpt), str(run / "streamed"), "streamed"),
                      "in_memory": _run("_export", str(ckpt), str(run / "in_memory"), "in_memory")}
    large = work / "large"
    sharded = _run("_export", str(large / "checkpoints" / "step_00000001"), str(large / "sharded"), "streamed",
                   str(args.shard_mb))
    shards = sorted(p.name for p in (large / "sharded").glob("model-*.safetensors"))
    identical = same_logits(large / "sharded", large / "in_memory") and same_logits(large / "streamed", large / "in_memory")

    print(f"{'model':6} {'layers':>6} {'params':>8} {'streamed peak':>14} {'in-memory peak':>15}   (MiB above the baseline RSS)")
    for name, r in rows.items():
        print(f"{name:6} {r['layers']:6d} {r['parameters'] / 1e6:7.1f}M {r['streamed']['peak_above'] / mb:14.1f} "
              f"{r['in_memory']['peak_above'] / mb:15.1f}")
    ratio = rows["large"]["parameters"] / rows["small"]["parameters"]
    streamed = rows["large"]["streamed"]["peak_above"] / rows["small"]["streamed"]["peak_above"]
    in_memory = rows["large"]["in_memory"]["peak_above"] / rows["small"]["in_memory"]["peak_above"]
    print(f"large/small: parameters {ratio:.2f}x, streamed peak {streamed:.2f}x, in-memory peak {in_memory:.2f}x")
    print(f"sharded export of the large model ({args.shard_mb} MiB shards): {len(shards)} shards, "
          f"peak {sharded['peak_above'] / mb:.1f} MiB above the baseline; logits identical to the in-memory export: {identical}")
    ok = ratio >= 4 and streamed <= 1.5 and identical and len(shards) > 1
    print("PASS" if ok else "FAIL", f"(checkpoints in {work})")
    sys.exit(0 if ok else 1)


def _same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def finetune(work: Path, small_layers: int, large_layers: int) -> None:
    """The ``--finetune`` case: a LoRA fine-tune of each model exported streamed and as before."""
    mb = 2**20
    rows = {}
    for name, layers in (("small", small_layers), ("large", large_layers)):
        run = work / name
        params = _run("_make", str(run), str(layers))["parameters"]
        ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
        _run("_export", str(ckpt), str(run / "base"), "streamed")
        ft = work / f"{name}-lora"
        _run("_make_ft", str(ft), str(run / "base"))
        ft_ckpt = ft / "checkpoints" / (ft / "checkpoints" / "latest").read_text().strip()
        rows[name] = {"layers": layers, "parameters": params,
                      "streamed": _run("_export", str(ft_ckpt), str(ft / "streamed"), "streamed"),
                      "in_memory": _run("_export", str(ft_ckpt), str(ft / "in_memory"), "finetune_in_memory"),
                      "identical": _same_bytes(ft / "streamed", ft / "in_memory")}
    print(f"{'base':6} {'layers':>6} {'params':>8} {'streamed peak':>14} {'in-memory peak':>15}   (MiB above the "
          "baseline RSS; LoRA fine-tune export)")
    for name, r in rows.items():
        print(f"{name:6} {r['layers']:6d} {r['parameters'] / 1e6:7.1f}M {r['streamed']['peak_above'] / mb:14.1f} "
              f"{r['in_memory']['peak_above'] / mb:15.1f}   same bytes: {r['identical']}")
    ratio = rows["large"]["parameters"] / rows["small"]["parameters"]
    streamed = rows["large"]["streamed"]["peak_above"] / rows["small"]["streamed"]["peak_above"]
    in_memory = rows["large"]["in_memory"]["peak_above"] / rows["small"]["in_memory"]["peak_above"]
    print(f"large/small: parameters {ratio:.2f}x, streamed peak {streamed:.2f}x, in-memory peak {in_memory:.2f}x")
    ok = ratio >= 4 and streamed <= 1.5 and all(r["identical"] for r in rows.values())
    print("PASS" if ok else "FAIL", f"(checkpoints in {work})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_make":
        make_checkpoint(Path(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_make_ft":
        make_finetune_checkpoint(Path(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_export":
        export(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else None)
    else:
        main()
