"""The streamed fine-tune export: byte for byte what the export wrote when it rebuilt the fine-tune whole
on its base (``_on_base``), without ever loading the base whole.

Checkpoints are made here without a process group: a base saved by ``save_pretrained``, the fine-tune's
trainable tensors perturbed and saved as a ZeRO-0 fp32 checkpoint holds them (``mp_rank_00_model_states.pt``);
the real 2-rank ZeRO-2 LoRA run of the session (``tiny_finetuned``) covers the partitioned layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

import distrib.checkpoint.export as export
from distrib.model.adapters import apply_freeze, apply_lora
from distrib.checkpoint import resolve_checkpoint
from distrib.config import Config, load_config
from distrib.parallel.engine import torch_dtype
from tests.helpers import TINY

VOCAB = 128


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def _base(path: Path, arch: str = "llama", layers: int = 3, hidden: int = 32, base_dtype=torch.bfloat16,
          shard: str | None = None) -> Path:
    if arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(base_dtype)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    _tokenizer().save_pretrained(path)
    return path


def _checkpoint(root: Path, base: Path, overrides: list[str], seed: int = 3) -> Path:
    """A fine-tune checkpoint as a ZeRO-0 fp32 run saves it: only what trains, in fp32, under peft's names."""
    cfg = load_config(TINY, [f"output_dir={root}", f"init_from={base}", f"model.pretrained={base}",
                             "data.tokenizer=" + str(base), *overrides])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    apply_freeze(model, cfg.finetune)
    pm = apply_lora(model, cfg.finetune, seed=cfg.seed)
    gen = torch.Generator().manual_seed(seed)
    module = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:  # moved by "training": LoRA B away from zero, the rest perturbed
            module[name] = p.detach() + 0.05 * torch.randn(p.shape, generator=gen)
    ckpt = root / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    torch.save({"module": module}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "config.yaml").write_text(cfg.to_yaml())
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 1, "dp": 1, "tp": 1, "zero_stage": 0}))
    _tokenizer().save_pretrained(ckpt / "tokenizer")
    return ckpt


def _old_export(ckpt: Path, out: Path, max_shard_size=None) -> Path:
    """The fine-tune export as it was: ``_on_base`` on the consolidated state, the result written whole."""
    cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    dtype = torch_dtype(cfg.precision)
    out.mkdir(parents=True)
    model, adapter = export._on_base(cfg, export._student(cfg, export.consolidated_state_dict(ckpt)), ckpt, dtype,
                                     staging=out.parent)
    model = model.to(dtype)
    state = model.state_dict()
    model.config.use_cache = True
    export._save_config(model, out, dtype)
    export.save_weights(out, model, {k: (lambda t=t: t) for k, t in state.items()}, dtype,
                        max_shard_size or cfg.export.max_shard_size)
    AutoTokenizer.from_pretrained(ckpt / "tokenizer").save_pretrained(out)
    if adapter is not None:
        os.replace(adapter, out / "adapter")
    return out


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _check(ckpt: Path, tmp_path: Path, max_shard_size=None) -> Path:
    """The streamed export equals the old one, file for file and byte for byte, and loads to the same logits."""
    def no_whole_base(*a, **k):
        raise AssertionError("the streamed export loaded the base whole")

    old = _old_export(ckpt, tmp_path / "old" / "hf", max_shard_size)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", no_whole_base)
        mp.setattr(export, "consolidated_state_dict", no_whole_base)
        new = export.export_checkpoint(ckpt, tmp_path / "new" / "hf", max_shard_size=max_shard_size)
    _same_files(old, new)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    expected = _logits(AutoModelForCausalLM.from_pretrained(old), ids)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(new), ids), expected)
    if (new / "adapter").is_dir():
        import peft

        cfg = Config.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
        got = [_logits(peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.pretrained), d), ids)
               for d in (old / "adapter", new / "adapter")]
        assert torch.equal(got[0], got[1])
    return new


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_lora_llama_streams_to_the_same_bytes(tmp_path, precision):
    base = _base(tmp_path / "base")
    ckpt = _checkpoint(tmp_path / "run", base, [f"precision={precision}", "finetune.lora.rank=4",
                                                "finetune.lora.alpha=8", "finetune.lora.train_norms=true",
                                                "finetune.freeze.bottom_layers=1"])
    new = _check(ckpt, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (new / "adapter").iterdir()}


def test_lora_gpt2_conv1d_with_biases_and_a_tied_trained_embedding(tmp_path):
    base = _base(tmp_path / "base", arch="gpt2", base_dtype=torch.float32)
    from transformers import GenerationConfig

    GenerationConfig(do_sample=True, temperature=0.7, eos_token_id=3).save_pretrained(base)  # the base's own
    ckpt = _checkpoint(tmp_path / "run", base, ["precision=bf16", "finetune.lora.rank=4", "finetune.lora.train_biases=true",
                                                "finetune.lora.train_norms=true", "finetune.lora.target_modules=[c_attn]",
                                                "finetune.trainable=[transformer.wte.weight]"])
    _check(ckpt, tmp_path)


def test_freeze_only_finetune_sharded_base_and_sharded_export(tmp_path):
    base = _base(tmp_path / "base", shard="20KB")
    assert (base / "model.safetensors.index.json").is_file()
    ckpt = _checkpoint(tmp_path / "run", base, ["precision=bf16", "finetune.train_top_layers=1",
                                                "finetune.trainable=[lm_head.weight]"])
    new = _check(ckpt, tmp_path, max_shard_size="16KB")
    assert len(list(new.glob("model-*.safetensors"))) > 2
    assert not (new / "adapter").exists()


def test_a_base_without_safetensors_falls_back_to_loading_it_whole(tmp_path):
    base = _base(tmp_path / "base")
    ckpt = _checkpoint(tmp_path / "run", base, ["precision=bf16", "finetune.lora.rank=4"])
    state = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for f in base.glob("model*.safetensors"):
        f.unlink()
    torch.save(state, base / "pytorch_model.bin")  # what transformers 4 wrote without safetensors
    old = _old_export(ckpt, tmp_path / "old" / "hf")
    _same_files(old, export.export_checkpoint(ckpt, tmp_path / "new" / "hf"))


@pytest.mark.slow
def test_the_tiny_lora_run_streams_to_the_same_bytes(tiny_finetuned, tmp_path):
    ckpt = resolve_checkpoint(tiny_finetuned)  # ZeRO-2 on 2 ranks, bf16, frozen parameters left out
    lazy, whole = export.checkpoint_tensors(ckpt), export.consolidated_state_dict(ckpt)
    assert set(lazy) == set(whole) and all(torch.equal(lazy[k](), v) for k, v in whole.items())
    _check(ckpt, tmp_path)


# -- memory: a base five times larger must not raise the peak ----------------------------------------

_MEASURE = """
import sys, time
from pathlib import Path
import torch, transformers, peft, safetensors, yaml  # noqa: F401 - imported before the baseline
import distrib.checkpoint.export, distrib.model.adapters  # noqa: F401


def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


baseline = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
distrib.checkpoint.export.export_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]))
print("PEAK", status("VmHWM") - baseline)
"""


def _peak(ckpt: Path, out: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(ckpt), str(out)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[3], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("PEAK")[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_does_not_grow_with_the_base(tmp_path):
    peaks, sizes = {}, {}
    for name, layers in (("small", 1), ("large", 6)):
        base = _base(tmp_path / name / "base", layers=layers, hidden=512, base_dtype=torch.float32)
        sizes[name] = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        ckpt = _checkpoint(tmp_path / name / "run", base, ["precision=bf16", "finetune.lora.rank=4",
                                                           "finetune.train_top_layers=1"])
        peaks[name] = _peak(ckpt, tmp_path / name / "hf")
    assert sizes["large"] > 4 * sizes["small"]
    # loaded whole, the larger base alone (fp32, 45 MB more) would add far more than this margin
    assert peaks["large"] < peaks["small"] + 0.25 * (sizes["large"] - sizes["small"]), (peaks, sizes)


# -- the export at the end of a run: the weight files dealt out among the ranks ----------------------

class _ThreadTopo:
    """Two ranks as threads of this process: barrier and any() as the job's collectives give them."""

    def __init__(self, rank: int, gate, flags: list):
        self.rank, self.world_size, self.is_main, self.gate, self.flags = rank, 2, rank == 0, gate, flags

    def barrier(self) -> None:
        self.gate.wait()

    def any(self, flag: bool) -> bool:
        self.flags[self.rank] = flag
        self.gate.wait()
        result = any(self.flags)
        self.gate.wait()
        return result


def test_a_finetune_export_spread_over_ranks_writes_the_same_bytes(tmp_path, monkeypatch):
    import threading

    base = _base(tmp_path / "base", shard="20KB")
    ckpt = _checkpoint(tmp_path / "run", base, ["precision=bf16", "finetune.lora.rank=4", "finetune.lora.train_norms=true"])
    alone = export.export_checkpoint(ckpt, tmp_path / "alone" / "hf", max_shard_size="16KB")
    lock, real, writers = threading.Lock(), export._stream_on_base, []
    real_save = export.save_weights

    def one_at_a_time(*a, **k):  # building models on the meta device patches torch globally
        with lock:
            return real(*a, **k)

    def save_weights(*a, part=(0, 1), **k):
        writers.append(part)
        return real_save(*a, part=part, **k)

    monkeypatch.setattr(export, "save_weights", save_weights)

    monkeypatch.setattr(export, "_stream_on_base", one_at_a_time)
    gate, flags, errors = threading.Barrier(2), [False, False], []

    def rank(r: int) -> None:
        try:
            export.export_checkpoint(ckpt, tmp_path / "spread" / "hf", max_shard_size="16KB",
                                     topo=_ThreadTopo(r, gate, flags))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            gate.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(writers) == [(0, 2), (1, 2)]  # both ranks wrote their share, none loaded the base whole
    spread = tmp_path / "spread" / "hf"
    assert len(list(spread.glob("model-*.safetensors"))) > 2 and (spread / "adapter" / "adapter_config.json").is_file()
    _same_files(alone, spread)
    assert not list((tmp_path / "spread").glob(".adapter-*"))  # the other rank staged none
