"""The base a fine-tune starts from is hashed by one rank for the whole job, not by every rank.

The hash reads every weight file (a 70B base is 140 GB per reading); 2 gloo processes under torchrun, the
reads counted in each (``hash_probe.py``).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, run_distrib, small

pytestmark = pytest.mark.slow

PROBE = str(Path(__file__).with_name("hash_probe.py"))
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
LORA = ("data.name=prose", "train.max_steps=8", "eval.every_steps=4", "checkpoint.every_steps=4",
        "parallel.zero_stage=1", "finetune.lora.rank=4")


def _reads(tmp_path, data_cache, model_dir) -> dict[int, int]:
    """How often each of 2 ranks opened the weights of ``model_dir`` while a fine-tune from it started."""
    report = tmp_path / "reads"
    report.mkdir()
    args = small(tmp_path / "run", data_cache, f"init_from={model_dir}", *LORA)
    proc = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--standalone", PROBE, str(report), TINY, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in report.glob("reads-*.json")}


@pytest.fixture
def read_only_base(tmp_path, base):
    """A copy of the base on a tmpfs mounted read-only: no stamp cache can be written beside it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    mnt = tmp_path / "read-only-base"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)], check=True)
    try:
        shutil.copytree(base / "hf", mnt, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".distrib-hash.json"))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(OSError):
            (mnt / "probe").write_text("")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_fresh_base_is_read_for_its_hash_once_for_both_ranks(tmp_path, data_cache, base):
    fresh = tmp_path / "fresh-base"
    shutil.copytree(base / "hf", fresh, ignore=shutil.ignore_patterns(".distrib-hash.json"))
    # Weights that take a second to hash, as a large model's take minutes: ranks that start hashing together
    # all miss the stamp cache the first of them writes (the loader reads model.safetensors alone).
    with open(fresh / "padding.bin", "wb") as f:
        f.truncate(512 << 20)
    assert _reads(tmp_path, data_cache, fresh) == {0: 1, 1: 0}
    assert (fresh / ".distrib-hash.json").is_file()  # and the next start reads none


def test_a_read_only_base_is_read_for_its_hash_once_for_both_ranks(tmp_path, data_cache, read_only_base):
    assert _reads(tmp_path, data_cache, read_only_base) == {0: 1, 1: 0}


def test_a_resume_under_torchrun_onto_a_changed_base_is_refused_in_one_line(tmp_path, data_cache, base):
    """The ranks of a launcher's job (here torchrun's, as srun's) compare the base in the Trainer, with rank 0's hash."""
    mine = tmp_path / "base-copy"
    shutil.copytree(base / "hf", mine)
    out = tmp_path / "run"
    args = small(out, data_cache, f"init_from={mine}", *LORA, "train.exit_after_steps=4")
    run_distrib(*args, nproc=2, stage="finetune")
    weights = mine / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(raw))
    before = sorted(p.name for p in out.rglob("*"))
    proc = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--standalone", "-m", "distrib", "finetune", TINY, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.startswith("distrib: error:")]
    assert len(err) == 1 and err[0].startswith(f"distrib: error: the base model {mine} has changed since step_00000004")
    assert "exitcode  : 2" in proc.stderr  # both ranks refused (the agent's report), neither hung
    assert sorted(p.name for p in out.rglob("*")) == before


FROM_MAIN = """
import sys
import time
sys.path.insert(0, {root!r})
from distrib.config import ConfigError
from distrib.parallel.topology import Topology
from distrib.launch.env import detect

def slow():
    time.sleep(20)  # longer than the process group's timeout: a large model's hash
    return {{"sha256": "abc"}}

def fail():
    raise ConfigError("the base is gone")

detect().export()
topo = Topology.init(timeout_minutes=0.25)  # 15 s: a loaded machine may start one rank seconds late
print(f"rank {{topo.rank}}: got {{topo.from_main(slow)}}")
try:
    topo.from_main(fail)
except ConfigError as e:
    print(f"rank {{topo.rank}}: ConfigError: {{e}}")
topo.barrier()
topo.shutdown()
"""


def test_rank_0s_value_or_failure_reaches_every_rank_however_long_rank_0_takes(tmp_path):
    script = tmp_path / "from_main.py"
    script.write_text(FROM_MAIN.format(root=str(ROOT)))
    proc = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--standalone", str(script)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("rank ")) == [
        "rank 0: ConfigError: the base is gone", "rank 0: got {'sha256': 'abc'}",
        "rank 1: ConfigError: the base is gone", "rank 1: got {'sha256': 'abc'}"]
