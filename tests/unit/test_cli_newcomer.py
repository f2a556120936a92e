"""The command line as a newcomer meets it, and the figures a user reads: help text, a mistyped command,
library warnings, and the peak memory each rank reports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

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
