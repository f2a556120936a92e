"""train.keep_host_memory: on the CPU a step's freed buffers are reused, not faulted in afresh each step."""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from distrib.utils import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(8192, 256), torch.nn.Linear(256, 1024), torch.nn.GELU(),
                            torch.nn.Linear(1024, 8192))
ids = torch.randint(0, 8192, (8, 256))
def step():  # a training step: its activations, logits and gradients are allocated, then freed
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_steps_freed_buffers_are_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    assert default > 100_000  # glibc unmaps the large blocks a step frees: the next step faults them in again
    assert kept < default / 4, (default, kept)
