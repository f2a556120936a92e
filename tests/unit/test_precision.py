"""``precision: auto``: bf16 where the device multiplies it natively, fp32 where bf16 would be emulated."""

import pytest

from distrib import utils
from distrib.config import load_config
from tests.helpers import ROOT

X86_AVX2 = "flags\t\t: fpu vme sse sse2 ssse3 fma avx avx2 bmi2\n"
X86_AVX512 = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq\n"  # oneDNN emulates bf16 here


@pytest.mark.parametrize("cpuinfo, native", [
    (X86_AVX2, False),
    (X86_AVX512, False),
    ("flags\t\t: avx2 avx512f avx512_bf16\n", True),  # Cooper Lake, Zen 4
    ("flags\t\t: avx2 avx512f amx_tile amx_bf16\n", True),  # Sapphire Rapids
    ("Features\t: fp asimd sve bf16 i8mm\n", True),  # Arm with the BF16 extension (Graviton 3, Grace)
    ("Features\t: fp asimd evtstrm crc32\n", False),
])
def test_bf16_is_native_only_where_the_cpu_multiplies_it(tmp_path, cpuinfo, native):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n" + cpuinfo + "\nprocessor\t: 1\n" + cpuinfo)
    assert utils.native_bf16(str(path)) is native


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_resolved_when_the_config_loads(monkeypatch, native, expected):
    monkeypatch.setattr(utils, "native_bf16", lambda: native)
    assert load_config(str(ROOT / "configs/pretrain/tiny.yaml"), []).precision == expected  # the shipped tiny says auto
    assert load_config(str(ROOT / "configs/pretrain/tiny.yaml"), ["precision=bf16"]).precision == "bf16"  # as asked
    assert load_config(str(ROOT / "configs/pretrain/tiny.yaml"), ["precision=fp16"]).precision == "fp16"


def test_this_machine_resolves_auto_from_its_own_cpu():
    flags = open("/proc/cpuinfo").read().split()
    native = bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))
    assert load_config(str(ROOT / "configs/pretrain/tiny.yaml"), []).precision == ("bf16" if native else "fp32")
