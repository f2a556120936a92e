"""distrib.model.adapters: freezing, LoRA through peft, optimizer groups, adapter export (tiny CPU models)."""

from __future__ import annotations

import fnmatch

import peft
import pytest
import torch
from pydantic import ValidationError
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from distrib.model.adapters import (
    FinetuneConfig,
    adapter_state_dict,
    apply_freeze,
    apply_lora,
    format_summary,
    merged_model,
    param_groups,
    save_adapter,
    trainable_summary,
)
from distrib.config import ConfigError
from distrib.config.load import _describe

hf_logging.set_verbosity_error()  # GPT-2's default bos/eos ids lie outside the tiny vocabulary
pytestmark = [
    # peft reading an attribute transformers 5 deprecates, and PeftModel.from_pretrained of a tied adapter
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:You have requested `ensure_weight_tying`:UserWarning"),
]

LLAMA_BLOCK = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]


def llama(layers: int = 4, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def gpt2(layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=layers, n_head=4, n_positions=64, use_cache=False)
    return GPT2LMHeadModel(cfg).eval()


def ft(**data) -> FinetuneConfig:
    return FinetuneConfig.model_validate(data)


def config_error(data: dict) -> str:
    """The one line ``load_config`` prints for a bad ``finetune`` section."""
    with pytest.raises(ValidationError) as e:
        FinetuneConfig.model_validate(data)
    err = e.value.errors()[0]
    assert isinstance(err.get("ctx", {}).get("error"), ConfigError), err
    return _describe(err, {"finetune": data})


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def names(model: torch.nn.Module, *patterns: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def block(i: int) -> set[str]:
    return {f"model.layers.{i}.{n}" for n in LLAMA_BLOCK}


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def perturb_trainable(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor (LoRA B included) away from its initial value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


# -- config ----------------------------------------------------------------------------------


def test_defaults_are_off_and_everything_trains():
    cfg = FinetuneConfig()
    assert (cfg.freeze.embeddings, cfg.freeze.head, cfg.freeze.bottom_layers, cfg.freeze.patterns) == (False, False, 0, [])
    assert cfg.train_top_layers is None and cfg.trainable == []
    assert not cfg.lora.enabled and cfg.lora.alpha == 16 and cfg.lora.dropout == 0.0
    assert cfg.lora.target_modules is None and not cfg.lora.train_norms and not cfg.lora.train_biases
    model = llama()
    apply_freeze(model, cfg)
    assert trainable(model) == names(model, "*")
    assert apply_lora(model, cfg) is model


def test_config_errors_are_one_line():
    assert config_error({"lora": {"rank": 0}}) == (
        "finetune.lora.rank=0 must be at least 1; set a rank such as 8, or remove finetune.lora.rank to fine-tune without LoRA"
    )
    assert config_error({"lora": {"alpha": 32}}) == (
        "finetune.lora.alpha is set but finetune.lora.rank is not; set finetune.lora.rank (e.g. 8) to fine-tune with "
        "LoRA, or remove finetune.lora.alpha"
    )
    dumped = FinetuneConfig().model_dump(mode="json")  # what config.yaml holds: every key, LoRA off
    assert FinetuneConfig.model_validate(dumped) == FinetuneConfig()
    assert config_error({"lora": {"rank": 8, "target_modules": []}}) == (
        "finetune.lora.target_modules is empty; list module names such as [q_proj, v_proj], or remove it for the "
        "architecture's default"
    )
    assert config_error({"train_top_layers": 2, "freeze": {"bottom_layers": 1}}) == (
        "finetune.train_top_layers=2 and finetune.freeze.bottom_layers=1 both choose the frozen layers; set only one of them"
    )
    with pytest.raises(ValidationError):
        ft(freeze={"bottom_layers": -1})
    with pytest.raises(ValidationError):
        ft(lora={"rank": 8, "dropout": 1.0})
    with pytest.raises(ValidationError):
        ft(freez={"embeddings": True})  # unknown keys are refused like everywhere else


# -- freezing --------------------------------------------------------------------------------


def test_freeze_embeddings_and_bottom_layers_llama():
    model = llama()
    apply_freeze(model, ft(freeze={"embeddings": True, "bottom_layers": 2}))
    assert trainable(model) == block(2) | block(3) | {"model.norm.weight", "lm_head.weight"}


def test_freeze_head_untied_llama_keeps_embeddings():
    model = llama()
    apply_freeze(model, ft(freeze={"head": True}))
    assert trainable(model) == names(model, "*") - {"lm_head.weight"}


def test_freeze_embeddings_gpt2_freezes_position_embeddings_and_the_tied_head():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    apply_freeze(model, ft(freeze={"embeddings": True}))
    assert trainable(model) == names(model, "*") - {"transformer.wte.weight", "transformer.wpe.weight"}
    assert not model.lm_head.weight.requires_grad


def test_train_top_layers_trains_top_blocks_and_final_norm_only():
    model = llama()
    apply_freeze(model, ft(train_top_layers=1))
    assert trainable(model) == block(3) | {"model.norm.weight"}
    model = gpt2(layers=3)
    apply_freeze(model, ft(train_top_layers=2))
    assert trainable(model) == names(model, "transformer.h.1.*", "transformer.h.2.*", "transformer.ln_f.*")


def test_trainable_patterns_win_over_every_freeze():
    model = llama()
    cfg = ft(freeze={"embeddings": True, "bottom_layers": 3, "patterns": ["*.mlp.*"]},
             trainable=["lm_head.weight", "model.layers.0.*norm*"])
    apply_freeze(model, cfg)
    expected = (block(3) - names(model, "*.mlp.*")) | {"model.norm.weight", "lm_head.weight",
                                                      "model.layers.0.input_layernorm.weight",
                                                      "model.layers.0.post_attention_layernorm.weight"}
    assert trainable(model) == expected


def test_trainable_pattern_on_a_tied_head_trains_the_shared_embeddings():
    model = llama(tie=True)
    apply_freeze(model, ft(train_top_layers=1, trainable=["lm_head.weight"]))
    assert model.model.embed_tokens.weight.requires_grad  # one tensor
    assert trainable(model) == block(3) | {"model.norm.weight", "model.embed_tokens.weight"}


def test_unknown_pattern_is_one_line_listing_real_names():
    with pytest.raises(ConfigError) as e:
        apply_freeze(llama(), ft(trainable=["model.layer.*"]))
    assert str(e.value) == (
        "finetune.trainable: 'model.layer.*' matches no parameter of this llama model; parameter names look like "
        "model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, model.layers.0.self_attn.k_proj.weight, "
        "model.layers.0.self_attn.v_proj.weight, model.layers.0.self_attn.o_proj.weight, "
        "model.layers.0.mlp.gate_proj.weight, ... (fnmatch patterns: * also matches dots)"
    )
    with pytest.raises(ConfigError, match=r"^finetune\.freeze\.patterns: 'wte' matches no parameter of this gpt2 model;"):
        apply_freeze(gpt2(), ft(freeze={"patterns": ["wte"]}))


def test_layer_counts_beyond_the_model_and_nothing_trainable_are_refused():
    with pytest.raises(ConfigError) as e:
        apply_freeze(llama(), ft(freeze={"bottom_layers": 5}))
    assert str(e.value) == "finetune.freeze.bottom_layers=5 exceeds the 4 layers of this llama model; set at most 4"
    with pytest.raises(ConfigError) as e:
        apply_freeze(gpt2(), ft(train_top_layers=3))
    assert str(e.value) == "finetune.train_top_layers=3 exceeds the 2 layers of this gpt2 model; set at most 2"
    with pytest.raises(ConfigError) as e:
        apply_freeze(llama(), ft(freeze={"patterns": ["*"]}))
    assert str(e.value) == (
        "finetune: this configuration freezes every parameter of the model; train some with finetune.trainable, "
        "finetune.train_top_layers or finetune.lora.rank (or set finetune.freeze.all=true for a run that only "
        "measures the loss)"
    )
    model = llama()
    apply_freeze(model, ft(freeze={"all": True}))  # on purpose: allowed, nothing trains
    assert not any(p.requires_grad for p in model.parameters())


# -- LoRA ------------------------------------------------------------------------------------


def test_lora_on_q_v_trains_only_the_adapters_and_runs():
    model = llama()
    cfg = ft(lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    apply_freeze(model, cfg)
    pm = apply_lora(model, cfg)
    assert isinstance(pm, peft.PeftModel)
    expected = {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.default.weight"
                for i in range(4) for m in ("q_proj", "v_proj") for ab in "AB"}
    assert trainable(pm) == expected
    pm.train()
    x = tokens()
    out = pm(input_ids=x, labels=x)
    assert out.logits.shape == (2, 9, 128) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if n in expected)
    assert sorted(pm.peft_config["default"].target_modules) == ["q_proj", "v_proj"]  # short names: every module adapted


def test_lora_defaults_per_architecture():
    pm = apply_lora(llama(layers=2), ft(lora={"rank": 2}))
    assert {n.split(".")[-4] for n in trainable(pm)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    pm = apply_lora(gpt2(), ft(lora={"rank": 2}))
    assert {".".join(n.split(".")[-5:-3]) for n in trainable(pm)} == {"attn.c_attn", "attn.c_proj"}


def test_lora_goes_only_into_layers_the_freeze_left_trainable():
    model = llama()
    cfg = ft(freeze={"bottom_layers": 2}, lora={"rank": 4, "target_modules": ["q_proj"]})
    apply_freeze(model, cfg)
    pm = apply_lora(model, cfg)
    assert trainable(pm) == {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight"
                             for i in (2, 3) for ab in "AB"}
    with pytest.raises(ConfigError) as e:
        apply_lora(llama(), ft(train_top_layers=1, lora={"rank": 4, "target_modules": ["lm_head"]}))
    assert str(e.value) == (
        "finetune.lora.target_modules: every module it names is frozen by finetune.freeze or "
        "finetune.train_top_layers; unfreeze those layers or target other modules"
    )


def test_lora_with_norms_and_biases_gpt2():
    model = gpt2()
    cfg = ft(freeze={"bottom_layers": 1},
             lora={"rank": 4, "target_modules": ["c_attn"], "train_norms": True, "train_biases": True})
    apply_freeze(model, cfg)
    pm = apply_lora(model, cfg)
    p = "base_model.model.transformer."
    lora = {f"{p}h.1.attn.c_attn.lora_{ab}.default.weight" for ab in "AB"}
    norms = {f"{p}{m}.modules_to_save.default.{w}" for m in ("h.1.ln_1", "h.1.ln_2", "ln_f") for w in ("weight", "bias")}
    biases = {f"{p}h.1.{m}.bias" for m in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")} | {f"{p}h.1.attn.c_attn.base_layer.bias"}
    assert trainable(pm) == lora | norms | biases
    x = tokens()
    pm(input_ids=x, labels=x).loss.backward()


def test_lora_train_norms_llama_and_biases_refused_without_biases():
    model = llama(layers=2)
    pm = apply_lora(model, ft(lora={"rank": 2, "target_modules": ["v_proj"], "train_norms": True}))
    assert {n for n in trainable(pm) if "lora_" not in n} == {
        f"base_model.model.{m}.modules_to_save.default.weight"
        for m in ("model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                  "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm")
    }
    with pytest.raises(ConfigError) as e:
        apply_lora(llama(), ft(lora={"rank": 2, "train_biases": True}))
    assert str(e.value) == (
        "finetune.lora.train_biases: this llama model has no bias parameters; remove finetune.lora.train_biases"
    )


def test_unknown_lora_target_lists_the_linear_modules():
    with pytest.raises(ConfigError) as e:
        apply_lora(llama(), ft(lora={"rank": 4, "target_modules": ["q_proj", "qproj"]}))
    assert str(e.value) == (
        "finetune.lora.target_modules: 'qproj' matches no linear module of this llama model; its linear modules are: "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"
    )
    with pytest.raises(ConfigError) as e:
        apply_lora(gpt2(), ft(lora={"rank": 4, "target_modules": ["attn"]}))
    assert str(e.value) == (
        "finetune.lora.target_modules: 'attn' matches no linear module of this gpt2 model; its linear modules are: "
        "c_attn, c_proj, c_fc, lm_head"
    )


def test_trainable_pattern_on_a_lora_target_is_refused():
    with pytest.raises(ConfigError) as e:
        apply_lora(llama(), ft(trainable=["model.layers.1.self_attn.q_proj.weight"], lora={"rank": 4}))
    assert str(e.value) == (
        "finetune.trainable: 'model.layers.1.self_attn.q_proj.weight' trains model.layers.1.self_attn.q_proj.weight "
        "in full, but finetune.lora.target_modules adapts model.layers.1.self_attn.q_proj; remove the pattern or "
        "that target"
    )


def test_lora_init_is_deterministic_given_the_seed():
    cfg = ft(lora={"rank": 4})

    def lora_a(seed=None, global_seed=0):
        model = llama(layers=2)
        torch.manual_seed(global_seed)
        pm = apply_lora(model, cfg, seed=seed)
        return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}

    a, b = lora_a(global_seed=5), lora_a(global_seed=5)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(*(lora_a(global_seed=s)[next(iter(a))] for s in (5, 6)))
    c, d = lora_a(seed=3, global_seed=5), lora_a(seed=3, global_seed=6)  # seed= ignores the global generator
    assert all(torch.equal(c[n], d[n]) for n in c)
    for n, t in c.items():
        if ".lora_B." in n:
            assert not t.any()  # B starts at zero: the adapted model starts equal to the base
        else:
            assert t.abs().max() <= 1 / t.shape[1] ** 0.5 and t.std() > 0


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_lora_trains_under_activation_checkpointing_with_frozen_embeddings():
    model = llama(layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as build_model does
    cfg = ft(freeze={"embeddings": True}, lora={"rank": 4, "target_modules": ["q_proj"]})
    apply_freeze(model, cfg)
    pm = apply_lora(model, cfg).train()
    x = tokens()
    pm(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    # B starts at zero, so only B gets a gradient on the first step; it must reach layer 0 through the checkpoints
    assert len(grads) == 4 and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)


def test_adapted_model_starts_equal_to_the_base():
    x = tokens()
    with torch.no_grad():
        ref = llama(layers=2)(input_ids=x).logits
        pm = apply_lora(llama(layers=2), ft(lora={"rank": 4, "train_norms": True}), seed=0)
        assert torch.equal(pm(input_ids=x).logits, ref)


# -- summaries and optimizer groups ----------------------------------------------------------


def test_trainable_summary_and_its_line():
    model = llama()
    cfg = ft(lora={"rank": 4, "target_modules": ["q_proj", "v_proj"]}, freeze={"bottom_layers": 2},
             trainable=["model.norm.weight"])
    apply_freeze(model, cfg)
    full = trainable_summary(model)
    assert full["trainable"] == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert full["total"] == sum(p.numel() for p in model.parameters())
    pm = apply_lora(model, cfg)
    s = trainable_summary(pm)
    assert set(s["trainable_names"]) == trainable(pm)
    assert (s["lora_modules"], s["lora_layers"], s["other_names"]) == (4, 2, ["model.norm.weight"])
    lora_numel = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert s["trainable"] == lora_numel + 32
    assert abs(s["share"] - s["trainable"] / s["total"]) < 1e-12
    line = format_summary(s)
    assert "\n" not in line
    assert line.startswith(f"trainable: {s['trainable'] / 1e3:.3g}K of {s['total'] / 1e3:.3g}K parameters (")
    assert line.endswith("%): LoRA in 4 modules of 2 layers; model.norm.weight")
    assert format_summary(trainable_summary(llama(layers=2))) == (
        "trainable: 26.8K of 26.8K parameters (100.0%): 18 tensors of layers 0-1; "
        "model.embed_tokens.weight, model.norm.weight, lm_head.weight"
    )


def test_format_summary_units():
    s = {"trainable": 410_000, "total": 6_800_000, "share": 410_000 / 6_800_000, "lora_modules": 8, "lora_layers": 4,
         "layers": [], "block_tensors": 0, "other_names": [], "trainable_names": []}
    assert format_summary(s) == "trainable: 0.41M of 6.8M parameters (6.0%): LoRA in 8 modules of 4 layers"
    s.update(trainable=4_200_000, total=6_700_000_000, share=4_200_000 / 6_700_000_000, lora_modules=0,
             layers=[0, 1, 2, 5], block_tensors=12, other_names=["a", "b", "c", "d", "e"])
    assert format_summary(s) == (
        "trainable: 4.2M of 6.7B parameters (0.063%): 12 tensors of layers 0-2, 5; 5 tensors outside the layers"
    )


def test_param_groups_split_decay_and_hold_only_trainable_parameters():
    model = gpt2()
    cfg = ft(freeze={"bottom_layers": 1}, trainable=["transformer.wte.weight"])
    apply_freeze(model, cfg)
    groups = param_groups(model, 0.1)
    by_name = {id(p): n for n, p in model.named_parameters()}
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.1), ("no_decay", 0.0)]
    decay = {by_name[id(p)] for p in groups[0]["params"]}
    no_decay = {by_name[id(p)] for p in groups[1]["params"]}
    assert decay == {f"transformer.h.1.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert no_decay == trainable(model) - decay
    assert "transformer.wte.weight" in no_decay and "transformer.h.1.ln_1.weight" in no_decay
    assert "transformer.h.1.mlp.c_fc.bias" in no_decay
    groups = param_groups(model, 0.1, decay_embeddings=True)
    assert "transformer.wte.weight" in {by_name[id(p)] for p in groups[0]["params"]}
    # LoRA: A and B decay, modules_to_save norm copies do not, frozen base weights are absent
    pm = apply_lora(llama(layers=2), ft(lora={"rank": 4, "train_norms": True}))
    by_name = {id(p): n for n, p in pm.named_parameters()}
    groups = param_groups(pm, 0.05)
    assert {by_name[id(p)] for p in groups[0]["params"]} == {n for n in trainable(pm) if "lora_" in n}
    assert {by_name[id(p)] for p in groups[1]["params"]} == {n for n in trainable(pm) if "modules_to_save" in n}
    frozen_only = llama(layers=2)
    frozen_only.requires_grad_(False)
    frozen_only.model.norm.weight.requires_grad_(True)
    assert [(g["name"], len(g["params"])) for g in param_groups(frozen_only, 0.1)] == [("no_decay", 1)]


# -- export ----------------------------------------------------------------------------------


def test_save_adapter_round_trip_and_merge_llama(tmp_path):
    cfg = ft(freeze={"bottom_layers": 1}, trainable=["lm_head.weight"],
             lora={"rank": 4, "target_modules": ["q_proj", "v_proj"], "train_norms": True})
    model = llama(layers=3)
    apply_freeze(model, cfg)
    pm = apply_lora(model, cfg, seed=7)
    perturb_trainable(pm)
    x = tokens()
    with torch.no_grad():
        adapted = pm(input_ids=x).logits
        base = llama(layers=3)(input_ids=x).logits
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter changes the output

    state = adapter_state_dict(pm)
    assert {k for k in state if "lora_" not in k} == {  # peft's own names: no adapter name, no wrapper
        f"base_model.model.{m}.weight" for m in ("model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                                                 "model.layers.2.input_layernorm", "model.layers.2.post_attention_layernorm",
                                                 "model.norm", "lm_head")
    }
    assert len([k for k in state if ".lora_B." in k]) == 4
    out = save_adapter(pm, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    loaded = peft.PeftModel.from_pretrained(llama(layers=3), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, adapted, atol=0, rtol=0)

    merged = merged_model(pm)
    assert isinstance(merged, LlamaForCausalLM)
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted, atol=1e-5, rtol=0)


def test_gpt2_lora_on_c_attn_round_trip_and_merge(tmp_path):
    cfg = ft(trainable=["transformer.wte.weight"],
             lora={"rank": 4, "target_modules": ["c_attn"], "train_biases": True, "train_norms": True})
    model = gpt2()
    pm = apply_lora(model, cfg, seed=1)
    inner = pm.base_model.model
    # the trained copy of the tied embedding is still the head's weight
    assert inner.lm_head.weight is inner.transformer.wte.modules_to_save["default"].weight
    pm.train()
    opt = torch.optim.AdamW(param_groups(pm, 0.01), lr=1e-2)
    x = tokens()
    for _ in range(3):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    with torch.no_grad():
        adapted = pm(input_ids=x).logits
        assert not torch.allclose(adapted, gpt2()(input_ids=x).logits, atol=1e-3)
    save_adapter(pm, tmp_path)
    loaded = peft.PeftModel.from_pretrained(gpt2(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, adapted, atol=0, rtol=0)
        merged = merged_model(pm)
        torch.testing.assert_close(merged(input_ids=x).logits, adapted, atol=1e-5, rtol=0)
    assert merged.lm_head.weight is merged.transformer.wte.weight
