"""What a 2-process run prints: the start-up lines, a plain line per few steps and the export, each once.

Library warnings that would come back every step (torch's deprecation of the collectives DeepSpeed's
ZeRO calls) are not shown; a library's start-up warning is shown by rank 0 alone.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY, run_distrib, small

pytestmark = pytest.mark.slow

#: Every line a run may print on stderr: rank 0's log lines, the progress lines, nothing from rank 1.
INTENDED = re.compile(r"\[distrib rank0\] |step \d+/\d+ ")


@pytest.mark.parametrize("zero", [2, 3])  # ZeRO-2 all-gathers the updated weights, ZeRO-3 reduce-scatters gradients
def test_a_two_process_run_prints_its_progress_and_no_warning_per_step(tmp_path, data_cache, zero):
    args = small(tmp_path / "out", data_cache, f"parallel.zero_stage={zero}", "metrics.progress_bar=true")
    # the data prepared first (a cache hit in the run), so that what is printed is the run's alone
    subprocess.run([sys.executable, "-m", "distrib", "prepare-data", TINY, *args],
                   check=True, capture_output=True, cwd=ROOT, timeout=600)
    proc = run_distrib(*args, nproc=2)
    lines = proc.stderr.splitlines()
    assert not [line for line in lines if "Warning" in line or "deprecated" in line], proc.stderr
    assert [line for line in lines if not INTENDED.match(line)] == [], proc.stderr
    assert len(lines) < 25, proc.stderr
    assert any(line.startswith("step 6/6 ") for line in lines), proc.stderr
    assert proc.stdout.count("Setting accelerator to CPU") <= 1, proc.stdout  # DeepSpeed's, at import: rank 0's only
