"""When model.compile compiles, what stops it (in one line), and that it never blocks a resume."""

import pytest

from distrib.config import COMPILE_MIN_STEPS, ConfigError, load_config
from distrib.train.trainer import attention_for, compile_blocker, compile_decision
from tests.helpers import TINY


def _cfg(*overrides):
    return load_config(TINY, list(overrides))


@pytest.mark.parametrize(("mode", "steps", "compiles"), [
    ("auto", COMPILE_MIN_STEPS - 1, False),  # a short run does not win back the compile time
    ("auto", COMPILE_MIN_STEPS, True),
    ("true", 30, True),                      # asked for: compiled however short
    ("false", 10**6, False),
])
def test_auto_compiles_long_runs_and_true_false_are_obeyed(mode, steps, compiles):
    cfg = _cfg(f"model.compile={mode}", f"train.max_steps={steps}")
    assert compile_decision(cfg, tp=1, accelerator="cpu") == (compiles, None)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_every_zero_stage_compiles(zero):
    assert compile_decision(_cfg("model.compile=true", f"parallel.zero_stage={zero}"), tp=1, accelerator="cpu")[0]


def test_tensor_parallel_is_not_compiled_and_says_why():
    compiles, why = compile_decision(_cfg("model.compile=true"), tp=2, accelerator="cpu")
    assert not compiles and "parallel.tp > 1" in why
    assert compile_decision(_cfg("train.max_steps=1000"), tp=2, accelerator="cpu")[0] is False  # auto: silently


def test_a_missing_cpu_compiler_is_named_with_the_fix(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    why = compile_blocker(_cfg(), tp=1, accelerator="cpu")
    assert "no C++ compiler (no-such-compiler)" in why and "install g++ or set CXX" in why


def test_compile_and_attention_may_change_on_resume():
    base = _cfg().identity_hash()
    assert _cfg("model.compile=true").identity_hash() == base
    assert _cfg("model.attn_implementation=eager").identity_hash() == base


@pytest.mark.parametrize(("override", "key"), [("model.compile=sometimes", "compile"),
                                               ("model.attn_implementation=flash", "attn_implementation")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key) as e:
        _cfg(override)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("compiled", "device", "kernel"), [
    (True, "cpu", "eager"),    # compiled on the CPU: inductor's fused matmuls and softmax beat the CPU sdpa kernel
    (False, "cpu", "sdpa"),
    (True, "cuda", "sdpa"),    # flash / memory-efficient attention on GPUs, compiled or not
    (False, "cuda", "sdpa"),
])
def test_auto_attention_is_eager_only_for_a_compiled_model_on_the_cpu(compiled, device, kernel):
    assert attention_for(compiled, device) == kernel
