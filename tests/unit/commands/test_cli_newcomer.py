"""The command line as a newcomer meets it, and the figures a user reads: help text, a mistyped command,
library warnings, and the peak memory each rank reports."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import pytest

from distrib.commands.cli import _parser
from tests.helpers import ROOT

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}
GIB = 2**30

# A process that makes itself 1 GiB resident, then becomes (exec) or starts (spawn, as torch's elastic
# agent starts workers) a small Python that reports its peak the way layout.json's peak_rss_bytes does.
BIG_THEN_EXEC = textwrap.dedent("""
    import os, subprocess, sys
    big = b"x" * (1 << 30)  # written, so resident
    report = "from distrib.utils import peak_rss_bytes; print(peak_rss_bytes())"
    if sys.argv[1] == "exec":
        os.execv(sys.executable, [sys.executable, "-c", report])
    subprocess.run([sys.executable, "-c", report], check=True)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fallback elsewhere is ru_maxrss")
@pytest.mark.parametrize("how", ["exec", "spawn"])
def test_peak_rss_is_the_processs_own_not_the_peak_of_what_started_it(how):
    out = subprocess.run([sys.executable, "-c", BIG_THEN_EXEC, how], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.split()[-1])
    # a bare Python importing distrib.utils peaks at a few tens of MiB; ru_maxrss would say more than 1 GiB
    assert 0 < peak < GIB / 4, peak


DEPRECATIONS_PROBE = textwrap.dedent("""
    import warnings
    import torch
    import torch.distributed as dist
    from distrib.utils import hide_deepspeed_deprecations
    warnings.simplefilter("always")  # each warning every time, as a registry reset each step makes them
    hide_deepspeed_deprecations()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    for _ in range(3):  # what DeepSpeed's ZeRO-2 and ZeRO-3 call on every step
        dist.all_gather_into_tensor(torch.zeros(4), torch.ones(4))
        dist.reduce_scatter_tensor(torch.zeros(4), torch.ones(4))
    warnings.warn("`torch.distributed.something_else` is deprecated. Please use another.", FutureWarning)
    warnings.warn("all_gather_into_tensor is deprecated, but as a UserWarning")
    dist.destroy_process_group()
""")


def test_only_deepspeeds_deprecated_collectives_are_hidden():
    out = subprocess.run([sys.executable, "-c", DEPRECATIONS_PROBE], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "all_gather_into_tensor` is deprecated" not in out.stderr
    assert "reduce_scatter_tensor` is deprecated" not in out.stderr
    assert "FutureWarning: `torch.distributed.something_else` is deprecated" in out.stderr  # others still show
    assert "UserWarning: all_gather_into_tensor is deprecated, but as a UserWarning" in out.stderr


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_command_and_every_option_has_a_help_text():
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"distrib {c.dest}" for c in sub._choices_actions if not (c.help or "").strip()]
    for name, command in _commands(parser).items():
        if not (command.description or "").strip():
            missing.append(f"distrib {name} (description)")
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                missing.append(f"distrib {name} {'/'.join(action.option_strings) or action.dest}")
    assert sorted(_commands(parser)) == sorted(c.dest for c in sub._choices_actions)
    assert not missing, missing


def test_help_is_plain_text():
    out = subprocess.run([sys.executable, "-m", "distrib", "--help"], capture_output=True, text=True, env=ENV,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: distrib"), out.stderr
    for text in (out.stdout, *(command.format_help() for command in _commands(_parser()).values())):
        assert "`" not in text, text
    assert "\nPretrain, fine-tune and distil" in out.stdout  # what distrib is, first after the usage


@pytest.mark.parametrize("argv, suggestion", [
    (["pretrian", "configs/pretrain/tiny.yaml"], "; did you mean 'pretrain'?"),
    (["fine-tune", "configs/finetune/tiny-lora.yaml", "output_dir=out"], "; did you mean 'finetune'?"),
    (["xyzzy"], ""),
])
def test_a_mistyped_command_is_one_line_naming_the_closest_and_creates_nothing(tmp_path, argv, suggestion):
    out = subprocess.run([sys.executable, "-m", "distrib", *argv], capture_output=True, text=True, env=ENV,
                         cwd=tmp_path, timeout=60)
    commands = ", ".join(_commands(_parser()))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"distrib: error: unknown command {argv[0]!r}{suggestion} (commands: {commands})\n"
    assert list(tmp_path.iterdir()) == []
