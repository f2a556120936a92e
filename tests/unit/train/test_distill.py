"""distrib.train.distill and distrib.model.student: the distillation loss against hand-computed values, its
config, layer maps, projections and students cut from the teacher (tiny CPU models)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging

from distrib.config import ConfigError, DistillConfig, DistillLossConfig, StudentConfig
from distrib.config.load import _describe
from distrib.model.student import (
    check_layer_map,
    default_layer_map,
    make_projections,
    projection_key,
    resolve_layer_map,
    student_from_teacher_layers,
)
from distrib.train.distill import distill_loss
from distrib.train.trainer import IGNORE_INDEX, target_tokens

hf_logging.set_verbosity_error()  # GPT-2's default bos/eos ids lie outside the tiny vocabulary

VOCAB, SEQ, BATCH = 64, 8, 2


# -- helpers ---------------------------------------------------------------------------------


def llama(layers: int = 4, hidden: int = 32, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def gpt2(layers: int = 4, seed: int = 0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, use_cache=False, **kw)
    return GPT2LMHeadModel(cfg).eval()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) with some labels -100 (a prompt-like prefix in row 0, a padded tail in row 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    labels[1, -2:] = IGNORE_INDEX
    return ids, labels


def out(logits, hidden_states=None) -> CausalLMOutputWithPast:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    states = None if hidden_states is None else tuple(torch.as_tensor(h, dtype=torch.float32) for h in hidden_states)
    return CausalLMOutputWithPast(logits=logits, hidden_states=states)


def loss_cfg(**weights) -> DistillLossConfig:
    data = {"kl": 0.0, **weights}
    return DistillLossConfig.model_validate(data)


def config_error(model: type, data: dict, section: str) -> str:
    """The one line ``load_config`` prints for a bad section (``section`` is where it will live)."""
    with pytest.raises(ValidationError) as e:
        model.model_validate(data)
    err = e.value.errors()[0]
    assert isinstance(err.get("ctx", {}).get("error"), ConfigError), err
    line = _describe(err, {section: data})
    assert "\n" not in line
    return line


# plain-Python reference math


def softmax(xs: list[float], temp: float = 1.0) -> list[float]:
    top = max(x / temp for x in xs)
    exps = [math.exp(x / temp - top) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


# Hand-made logits: batch 2, seq 3, vocab 3. Target positions (label of the NEXT position != -100):
# row 0: labels [0, 2, -100] -> position 0 (predicts 2); row 1: labels [-100, 1, 0] -> positions 0 and 1.
LABELS = torch.tensor([[0, 2, IGNORE_INDEX], [IGNORE_INDEX, 1, 0]])
TARGETS = [(0, 0, 2), (1, 0, 1), (1, 1, 0)]  # (row, position, next token)
STUDENT = [[[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [9.0, 9.0, 9.0]],
           [[-0.5, 0.0, 1.5], [2.0, 1.0, -2.0], [4.0, -4.0, 0.0]]]
TEACHER = [[[0.2, 0.1, 1.5], [1.0, 1.0, 1.0], [-3.0, 0.0, 3.0]],
           [[1.0, -1.0, 0.0], [0.5, 2.5, -0.5], [0.0, 0.0, 7.0]]]


def scramble_non_targets(logits: list) -> list:
    """``logits`` with every position that is not a target changed."""
    changed = [[list(row) for row in seq] for seq in logits]
    targets = {(b, t) for b, t, _ in TARGETS}
    for b in range(2):
        for t in range(3):
            if (b, t) not in targets:
                changed[b][t] = [50.0, -50.0, 3.0]
    return changed


# -- the loss, by hand -----------------------------------------------------------------------


def test_forward_kl_matches_hand_computation_with_temperature_squared():
    got = distill_loss(out(STUDENT), out(TEACHER), LABELS, loss_cfg(kl=1, temperature=2))
    want = sum(4 * kl(softmax(TEACHER[b][t], 2), softmax(STUDENT[b][t], 2)) for b, t, _ in TARGETS)
    assert got.parts["kl"].item() == pytest.approx(want, rel=1e-6)
    assert got.total.item() == pytest.approx(want, rel=1e-6)
    assert got.tokens.item() == 3 == target_tokens(LABELS).item()
    assert got.total.dtype == torch.float32


def test_reverse_kl_matches_hand_computation():
    got = distill_loss(out(STUDENT), out(TEACHER), LABELS, loss_cfg(reverse_kl=1, temperature=2))
    want = sum(4 * kl(softmax(STUDENT[b][t], 2), softmax(TEACHER[b][t], 2)) for b, t, _ in TARGETS)
    assert got.parts["reverse_kl"].item() == pytest.approx(want, rel=1e-6)
    assert set(got.parts) == {"reverse_kl"}


def test_ce_matches_hand_computation_at_temperature_one():
    got = distill_loss(out(STUDENT), out(TEACHER), LABELS, loss_cfg(ce=1, temperature=2))  # T does not apply to ce
    want = sum(-math.log(softmax(STUDENT[b][t])[y]) for b, t, y in TARGETS)
    assert got.parts["ce"].item() == pytest.approx(want, rel=1e-6)
    ref = torch.nn.functional.cross_entropy(torch.tensor(STUDENT)[:, :-1].flatten(0, 1), LABELS[:, 1:].flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    assert got.parts["ce"].item() == pytest.approx(ref.item(), rel=1e-6)


def hidden_example():
    """Student width 2 (states 0..1), teacher width 3 (states 0..2), batch 1, seq 3; only position 0 is a target."""
    labels = torch.tensor([[0, 1, IGNORE_INDEX]])
    s_states = [[[[1.0, 2.0], [5.0, 5.0], [7.0, -7.0]]],
                [[[0.5, -1.0], [3.0, 1.0], [0.0, 9.0]]]]
    t_states = [[[[0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]],
                [[[4.0, 4.0, 4.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]],
                [[[1.0, 1.0, 0.0], [6.0, 0.0, 6.0], [3.0, 3.0, 3.0]]]]
    weights = {"s0_t0": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],   # [1, 2] -> [1, 2, 3]; teacher [0, 2, 1]
               "s1_t2": [[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]]}  # [0.5, -1] -> [1, 0, 1.5]; teacher [1, 1, 0]
    return labels, s_states, t_states, weights


def test_hidden_mse_with_hand_set_projections():
    labels, s_states, t_states, weights = hidden_example()
    layer_map = [[0, 0], [1, 2]]
    cfg = DistillConfig.model_validate({"loss": {"kl": 0, "hidden": 1}, "layer_map": layer_map})
    projections = make_projections(2, 3, layer_map, cfg)
    assert set(projections) == {"s0_t0", "s1_t2"}
    with torch.no_grad():
        for key, w in weights.items():
            projections[key].weight.copy_(torch.tensor(w))
    logits = torch.zeros(1, 3, 4)
    got = distill_loss(out(logits, s_states), out(logits, t_states), labels, cfg.loss, projections, layer_map)

    def mse(key, h_s, h_t):
        proj = [sum(w_ij * x for w_ij, x in zip(row, h_s)) for row in weights[key]]
        return sum((a - b) ** 2 for a, b in zip(proj, h_t)) / len(h_t)

    want = (mse("s0_t0", s_states[0][0][0], t_states[0][0][0]) + mse("s1_t2", s_states[1][0][0], t_states[2][0][0])) / 2
    assert want == pytest.approx((5 / 3 + 3.25 / 3) / 2)
    assert got.parts["hidden"].item() == pytest.approx(want, rel=1e-6)
    assert got.total.item() == pytest.approx(want, rel=1e-6)
    assert got.tokens.item() == 1


def test_hidden_mse_without_projection_when_widths_are_equal():
    labels = torch.tensor([[0, 1, 1], [0, IGNORE_INDEX, IGNORE_INDEX]])  # targets: row 0 positions 0 and 1
    s = [[[1.0, 2.0], [0.0, -1.0], [8.0, 8.0]], [[3.0, 3.0], [9.0, 9.0], [9.0, 9.0]]]
    t = [[[0.0, 0.0], [2.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]
    cfg = DistillConfig.model_validate({"loss": {"kl": 0, "hidden": 1}})
    assert make_projections(2, 2, [[1, 1]], cfg) is None
    got = distill_loss(out(torch.zeros(2, 3, 4), [s, s]), out(torch.zeros(2, 3, 4), [t, t]), labels, cfg.loss,
                       None, [[1, 1]])
    want = ((1 + 4) / 2) + ((4 + 4) / 2)
    assert got.parts["hidden"].item() == pytest.approx(want)


def test_positions_without_a_target_contribute_nothing():
    cfg = loss_cfg(kl=1, reverse_kl=0.5, ce=0.25, temperature=2)
    base = distill_loss(out(STUDENT), out(TEACHER), LABELS, cfg)
    changed = distill_loss(out(scramble_non_targets(STUDENT)), out(scramble_non_targets(TEACHER)), LABELS, cfg)
    assert torch.equal(base.total, changed.total)
    assert all(torch.equal(base.parts[k], changed.parts[k]) for k in base.parts)
    # a target position's logits do count
    moved = [[list(row) for row in seq] for seq in STUDENT]
    moved[1][1] = [0.0, 0.0, 5.0]
    assert not torch.equal(distill_loss(out(moved), out(TEACHER), LABELS, cfg).total, base.total)

    labels, s_states, t_states, _ = hidden_example()
    hcfg = DistillConfig.model_validate({"loss": {"kl": 0, "hidden": 1}})
    projections = make_projections(2, 3, [[1, 2]], hcfg)
    a = distill_loss(out(torch.zeros(1, 3, 4), s_states), out(torch.zeros(1, 3, 4), t_states), labels, hcfg.loss,
                     projections, [[1, 2]])
    s_states[1][0][1], s_states[1][0][2] = [100.0, 100.0], [-3.0, 4.0]
    t_states[2][0][1] = [0.0, 50.0, 0.0]
    b = distill_loss(out(torch.zeros(1, 3, 4), s_states), out(torch.zeros(1, 3, 4), t_states), labels, hcfg.loss,
                     projections, [[1, 2]])
    assert torch.equal(a.total, b.total)


def test_no_target_tokens_gives_zero_that_still_backpropagates():
    student = torch.tensor(STUDENT, requires_grad=True)
    labels = torch.full_like(LABELS, IGNORE_INDEX)
    got = distill_loss(out(student), out(TEACHER), labels, loss_cfg(kl=1, reverse_kl=1, ce=1))
    assert got.total.item() == 0.0 and got.tokens.item() == 0
    got.total.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_total_is_the_weighted_sum_and_parts_only_for_positive_weights():
    cfg = loss_cfg(kl=0.5, reverse_kl=0.25, ce=2.0, temperature=1.5)
    got = distill_loss(out(STUDENT), out(TEACHER), LABELS, cfg)
    assert list(got.parts) == ["kl", "reverse_kl", "ce"]
    want = 0.5 * got.parts["kl"] + 0.25 * got.parts["reverse_kl"] + 2.0 * got.parts["ce"]
    torch.testing.assert_close(got.total, want, rtol=1e-6, atol=0)
    assert set(distill_loss(out(STUDENT), out(TEACHER), LABELS, loss_cfg(ce=1)).parts) == {"ce"}
    assert set(distill_loss(out(STUDENT), out(TEACHER), LABELS, DistillLossConfig()).parts) == {"kl"}


def test_kl_of_identical_distributions_is_zero():
    got = distill_loss(out(STUDENT), out(STUDENT), LABELS, loss_cfg(kl=1, reverse_kl=1, temperature=3))
    assert got.parts["kl"].item() == 0.0 and got.parts["reverse_kl"].item() == 0.0
    assert got.total.item() == 0.0


def test_gradients_reach_the_student_only():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    got = distill_loss(out(student), out(teacher), LABELS, loss_cfg(kl=1, reverse_kl=1, ce=1))
    got.total.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert torch.equal(student.grad[0, 1:], torch.zeros(2, 3))  # row 0: only position 0 is a target


def test_full_loss_on_tiny_models_trains_student_and_projections_not_teacher():
    teacher = llama(layers=4, hidden=32, seed=0)
    for p in teacher.parameters():
        p.requires_grad_(True)  # detached inside the loss even when the teacher is not frozen
    student = llama(layers=2, hidden=16, seed=1).train()
    cfg = DistillConfig.model_validate({"loss": {"kl": 1, "reverse_kl": 0.5, "ce": 0.5, "hidden": 2,
                                                 "temperature": 2}})
    layer_map = resolve_layer_map(cfg, 2, 4)
    assert layer_map == [[1, 2], [2, 4]]
    projections = make_projections(16, 32, layer_map, cfg, seed=7)
    ids, labels = batch()
    t_out = teacher(input_ids=ids, output_hidden_states=True)
    s_out = student(input_ids=ids, output_hidden_states=True)
    got = distill_loss(s_out, t_out, labels, cfg.loss, projections, layer_map)
    assert list(got.parts) == ["kl", "reverse_kl", "ce", "hidden"]
    assert got.tokens.item() == target_tokens(labels).item() == 2 * (SEQ - 1) - 2 - 2  # label 0 is never predicted
    assert all(torch.isfinite(v) and v > 0 for v in got.parts.values())
    got.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections.parameters())


def test_hidden_loss_needs_hidden_states_and_projections():
    cfg = loss_cfg(hidden=1)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        distill_loss(out(STUDENT), out(TEACHER), LABELS, cfg, None, [[1, 1]])
    s = out(torch.zeros(1, 3, 4), [torch.zeros(1, 3, 2)] * 2)
    t = out(torch.zeros(1, 3, 4), [torch.zeros(1, 3, 3)] * 2)
    with pytest.raises(ValueError, match="no projection 's1_t1'"):
        distill_loss(s, t, torch.zeros(1, 3, dtype=torch.long), cfg, None, [[1, 1]])


def test_kl_refuses_different_vocabularies():
    with pytest.raises(ValueError, match="same batch and vocabulary"):
        distill_loss(out(torch.zeros(1, 3, 4)), out(torch.zeros(1, 3, 5)), torch.zeros(1, 3, dtype=torch.long),
                     loss_cfg(kl=1))


# -- config ----------------------------------------------------------------------------------


def test_defaults():
    cfg = DistillConfig()
    assert (cfg.loss.kl, cfg.loss.reverse_kl, cfg.loss.ce, cfg.loss.hidden, cfg.loss.temperature) == (1, 0, 0, 0, 1)
    assert cfg.layer_map is None and cfg.projection is None
    assert StudentConfig().init_from_teacher_layers is None
    assert DistillConfig.model_validate({"loss": {"kl": 1e3}}).loss.kl == 1000.0


@pytest.mark.parametrize("data, line", [
    ({"loss": {"kl": -1}},
     "distill.loss.kl=-1 must be >= 0; set it to 0 to leave the forward KL term out, or to a positive weight"),
    ({"loss": {"reverse_kl": -0.5}},
     "distill.loss.reverse_kl=-0.5 must be >= 0; set it to 0 to leave the reverse KL term out, or to a positive weight"),
    ({"loss": {"ce": -2}},
     "distill.loss.ce=-2 must be >= 0; set it to 0 to leave the cross-entropy term out, or to a positive weight"),
    ({"loss": {"hidden": -1e-3}},
     "distill.loss.hidden=-0.001 must be >= 0; set it to 0 to leave the hidden-state term out, or to a positive weight"),
    ({"loss": {"kl": 0}},
     "distill.loss: every weight is 0, so nothing would be learned; set distill.loss.kl=1 (or ce, reverse_kl, hidden)"),
    ({"loss": {"kl": 0, "ce": 0, "reverse_kl": 0, "hidden": 0}},
     "distill.loss: every weight is 0, so nothing would be learned; set distill.loss.kl=1 (or ce, reverse_kl, hidden)"),
    ({"loss": {"temperature": 0}},
     "distill.loss.temperature=0 must be > 0; set distill.loss.temperature=1 (or above 1 to soften both distributions)"),
    ({"loss": {"temperature": -2}},
     "distill.loss.temperature=-2 must be > 0; set distill.loss.temperature=1 (or above 1 to soften both distributions)"),
    ({"layer_map": [[1, 2]]},
     "distill.layer_map is set but distill.loss.hidden is 0, so no hidden states are compared; set "
     "distill.loss.hidden (e.g. 1), or remove distill.layer_map"),
    ({"projection": True},
     "distill.projection is set but distill.loss.hidden is 0, so no hidden states are compared; set "
     "distill.loss.hidden (e.g. 1), or remove distill.projection"),
    ({"loss": {"hidden": 1}, "layer_map": []},
     "distill.layer_map is empty; list [student_layer, teacher_layer] pairs, or remove it for the default evenly "
     "spaced map"),
    ({"loss": {"hidden": 1}, "layer_map": [[1, 2], [3]]},
     "distill.layer_map: [3] is not a pair of layer indices; write [student_layer, teacher_layer] pairs such as "
     "[[2, 4], [4, 8]]"),
    ({"loss": {"hidden": 1}, "layer_map": [[1, -2]]},
     "distill.layer_map: [1, -2] holds a negative layer; hidden-state indices start at 0 (the embeddings output)"),
    ({"loss": {"hidden": 1}, "layer_map": [[1, 2], [1, 2]]},
     "distill.layer_map: [1, 2] is listed twice; list each pair once"),
])
def test_distill_config_errors(data, line):
    assert config_error(DistillConfig, data, "distill") == line


@pytest.mark.parametrize("layers, line", [
    ([], "student.init_from_teacher_layers is empty; list which of the teacher's layers to copy, e.g. [0, 2], "
         "or remove it to initialise the student randomly"),
    ([0, -1], "student.init_from_teacher_layers: -1 is negative; use teacher layer indices from 0"),
    ([0, 2, 2], "student.init_from_teacher_layers: layer 2 is listed twice; list each of the teacher's layers "
                "at most once"),
    ([2, 0], "student.init_from_teacher_layers=[2, 0] is not increasing (0 after 2); list the teacher layers "
             "bottom to top, e.g. [0, 2]"),
])
def test_student_config_errors(layers, line):
    assert config_error(StudentConfig, {"init_from_teacher_layers": layers}, "student") == line


# -- layer maps and projections --------------------------------------------------------------


def test_default_layer_map_is_evenly_spaced_hidden_state_indices():
    assert default_layer_map(2, 4) == [[1, 2], [2, 4]]
    assert default_layer_map(4, 4) == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert default_layer_map(3, 4) == [[1, 1], [2, 3], [3, 4]]
    assert default_layer_map(2, 5) == [[1, 3], [2, 5]]  # 2.5 rounds up
    assert default_layer_map(6, 32)[-1] == [6, 32]


def test_resolve_layer_map():
    assert resolve_layer_map(DistillConfig(), 2, 4) is None  # no hidden loss
    cfg = DistillConfig.model_validate({"loss": {"hidden": 1}, "layer_map": [[0, 0], [2, 4]]})
    assert resolve_layer_map(cfg, 2, 4) == [[0, 0], [2, 4]]
    with pytest.raises(ConfigError, match=r"\[2, 4\] names teacher layer 4, but the teacher has 3 layers"):
        resolve_layer_map(cfg, 2, 3)


@pytest.mark.parametrize("layer_map, line", [
    ([[5, 2]], "distill.layer_map: [5, 2] names student layer 5, but the student has 4 layers (hidden states 0..4); "
               "use student layers 0..4 (0 is the embeddings output)"),
    ([[1, 1], [2, 9]], "distill.layer_map: [2, 9] names teacher layer 9, but the teacher has 8 layers "
                       "(hidden states 0..8); use teacher layers 0..8 (0 is the embeddings output)"),
    ([[1, -1]], "distill.layer_map: [1, -1] holds a negative layer; hidden-state indices start at 0 "
                "(the embeddings output)"),
    ([], "distill.layer_map is empty; list [student_layer, teacher_layer] pairs, or remove it for the default "
         "evenly spaced map"),
])
def test_check_layer_map_errors(layer_map, line):
    with pytest.raises(ConfigError) as e:
        check_layer_map(layer_map, 4, 8)
    assert str(e.value) == line
    check_layer_map([[0, 0], [4, 8]], 4, 8)  # the last hidden states exist


def test_projections_are_deterministic_and_leave_the_global_generator_alone():
    cfg = DistillConfig.model_validate({"loss": {"hidden": 1}})
    state = torch.get_rng_state()
    a = make_projections(16, 32, [[1, 2], [2, 4]], cfg, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = make_projections(16, 32, [[1, 2], [2, 4]], cfg, seed=3)
    c = make_projections(16, 32, [[1, 2], [2, 4]], cfg, seed=4)
    assert list(a) == [projection_key(1, 2), projection_key(2, 4)] == ["s1_t2", "s2_t4"]
    for key in a:
        assert a[key].bias is None and a[key].weight.shape == (32, 16) and a[key].weight.dtype == torch.float32
        assert torch.equal(a[key].weight, b[key].weight) and not torch.equal(a[key].weight, c[key].weight)
        assert a[key].weight.abs().max() <= 1 / math.sqrt(16)
    assert not torch.equal(a["s1_t2"].weight, a["s2_t4"].weight)


def test_projection_setting():
    auto = DistillConfig.model_validate({"loss": {"hidden": 1}})
    always = DistillConfig.model_validate({"loss": {"hidden": 1}, "projection": True})
    never = DistillConfig.model_validate({"loss": {"hidden": 1}, "projection": False})
    assert make_projections(32, 32, [[1, 1]], auto) is None
    assert make_projections(32, 32, [[1, 1]], never) is None
    assert make_projections(16, 32, [[1, 1]], DistillConfig(), seed=0) is None  # no hidden loss
    assert make_projections(16, 32, None, auto) is None
    same = make_projections(32, 32, [[1, 1]], always)
    assert torch.equal(same["s1_t1"].weight, torch.eye(32))
    with pytest.raises(ConfigError) as e:
        make_projections(16, 32, [[1, 1]], never)
    assert str(e.value) == ("distill.projection=false, but the student's hidden size 16 differs from the teacher's "
                            "32, so their hidden states cannot be compared; set distill.projection=true or remove it")


# -- students cut from the teacher -----------------------------------------------------------


def blocks_of(model):
    return model.model.layers if isinstance(model, LlamaForCausalLM) else model.transformer.h


def assert_same_module(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
        assert sa[k].data_ptr() != sb[k].data_ptr() or sa[k].numel() == 0, f"{k} is shared, not copied"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_student_from_teacher_layers_copies_the_chosen_blocks(arch):
    teacher = llama(layers=4) if arch == "llama" else gpt2(layers=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher_layers(teacher, [0, 2])
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2 and len(blocks_of(student)) == 2
    assert_same_module(blocks_of(student)[0], blocks_of(teacher)[0])
    assert_same_module(blocks_of(student)[1], blocks_of(teacher)[2])
    if arch == "llama":
        assert_same_module(student.model.embed_tokens, teacher.model.embed_tokens)
        assert_same_module(student.model.norm, teacher.model.norm)
        assert_same_module(student.lm_head, teacher.lm_head)
        assert [b.self_attn.layer_idx for b in blocks_of(student)] == [0, 1]
    else:
        assert student.config.n_layer == 2
        for name in ("wte", "wpe", "ln_f"):
            assert_same_module(getattr(student.transformer, name), getattr(teacher.transformer, name))
        assert [b.attn.layer_idx for b in blocks_of(student)] == [0, 1]
    assert all(p.requires_grad for p in student.parameters())
    # the teacher is untouched
    assert teacher.config.num_hidden_layers == 4 and len(blocks_of(teacher)) == 4
    idx = [b.self_attn.layer_idx if arch == "llama" else b.attn.layer_idx for b in blocks_of(teacher)]
    assert idx == [0, 1, 2, 3]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_student_forward_and_kv_cache_generation(arch):
    teacher = llama(layers=4) if arch == "llama" else gpt2(layers=4)
    student = student_from_teacher_layers(teacher, [1, 3])
    ids, _ = batch()
    logits = student(input_ids=ids).logits
    assert logits.shape == (BATCH, SEQ, VOCAB) and torch.isfinite(logits).all()
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = student.generate(ids[:, :4], use_cache=True, **kw)
        uncached = student.generate(ids[:, :4], use_cache=False, **kw)
    assert cached.shape == (BATCH, 7)
    assert torch.equal(cached, uncached)


def test_tied_embeddings_stay_tied():
    teacher = gpt2(layers=4)
    assert teacher.lm_head.weight is teacher.transformer.wte.weight
    student = student_from_teacher_layers(teacher, [0, 3])
    assert student.lm_head.weight is student.transformer.wte.weight
    assert student.transformer.wte.weight is not teacher.transformer.wte.weight
    tied_llama = student_from_teacher_layers(llama(layers=4, tie=True), [1, 2])
    assert tied_llama.lm_head.weight is tied_llama.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_student_from_all_teacher_layers_gives_the_teachers_logits(arch):
    teacher = llama(layers=4) if arch == "llama" else gpt2(layers=4)
    student = student_from_teacher_layers(teacher, [0, 1, 2, 3])
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("layers, line", [
    ([0, 4], "student.init_from_teacher_layers: 4 names no layer of the teacher, which has 4 layers; "
             "use indices 0..3"),
    ([-1], "student.init_from_teacher_layers: -1 is negative; use teacher layer indices from 0 to 3"),
    ([1, 1], "student.init_from_teacher_layers: layer 1 is listed twice; list each of the teacher's 4 layers "
             "(0..3) at most once"),
    ([], "student.init_from_teacher_layers is empty; list which of the teacher's 4 layers (0..3) to copy, "
         "e.g. [0, 2], or remove it to initialise the student randomly"),
    ([3, 1], "student.init_from_teacher_layers=[3, 1] is not increasing (1 after 3); list the teacher layers "
             "bottom to top, e.g. [1, 3]"),
])
def test_student_from_teacher_layers_errors(layers, line):
    with pytest.raises(ConfigError) as e:
        student_from_teacher_layers(gpt2(layers=4), layers)
    assert str(e.value) == line


def test_gpt2_blocks_scaled_by_their_index_cannot_move():
    teacher = gpt2(layers=4, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ConfigError) as e:
        student_from_teacher_layers(teacher, [0, 2])
    assert str(e.value) == (
        "student.init_from_teacher_layers=[0, 2] moves blocks whose attention is scaled by 1/(layer index + 1) "
        "(the teacher's scale_attn_by_inverse_layer_idx), so the saved student would not reload as trained; "
        "copy the teacher's first layers, e.g. [0, 1]")
    student_from_teacher_layers(teacher, [0, 1])  # blocks that keep their index are fine


def test_partitioned_teacher_is_refused():
    teacher = gpt2(layers=2)
    p = teacher.transformer.h[0].attn.c_attn.weight
    p.data = torch.empty(0)
    p.ds_id = 0  # what a ZeRO-3 partitioned parameter looks like on a rank
    with pytest.raises(RuntimeError, match="partitioned by ZeRO-3"):
        student_from_teacher_layers(teacher, [0])
