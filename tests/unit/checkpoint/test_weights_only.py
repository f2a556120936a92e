"""Every ``torch.load`` of ours is weights-only, and a checkpoint file that would run code when loaded is refused
in one line before anything (DeepSpeed's own loaders included) unpickles it."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distrib.checkpoint import check_resumable, check_weights_only, load_weights
from distrib.config import ConfigError, load_config
from tests.helpers import ROOT, TINY


def _torch_loads_without_weights_only(source: Path, root: Path = ROOT) -> list[str]:
    """``file:line`` (relative to ``root``) of every call of ``torch.load`` (however imported) in ``source`` whose
    ``weights_only`` is not the constant True."""
    tree = ast.parse(source.read_text(), filename=str(source))
    aliases = {"torch.load", "torch.serialization.load"}
    for node in ast.walk(tree):  # from torch import load as x; from torch.serialization import load
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in aliases:
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{source.relative_to(root)}:{node.lineno}")
    return found


def test_every_torch_load_in_the_package_is_weights_only():
    sources = sorted(p for d in ("distrib", "launch") for p in (ROOT / d).rglob("*.py"))
    assert len(sources) > 20
    assert not [hit for p in sources for hit in _torch_loads_without_weights_only(p)]


def test_the_scan_finds_a_torch_load_that_is_not_weights_only(tmp_path):
    code = tmp_path / "probe.py"
    code.write_text("import torch\nfrom torch import load as L\n\n"
                    "a = torch.load('x', weights_only=True)\n"
                    "b = torch.load('x')\n"
                    "c = torch.load('x', weights_only=False)\n"
                    "d = L('x', weights_only=flag)\n")
    assert _torch_loads_without_weights_only(code, tmp_path) == ["probe.py:5", "probe.py:6", "probe.py:7"]


class _RunsCode:
    """What a tampered checkpoint file may hold: an object whose unpickling runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_deepspeeds_own_types_load_weights_only_and_code_is_refused(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # what a ZeRO-1/2 optimizer shard holds besides tensors (tests/distributed cover real ones of every layout)
    shard = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                      "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                      "fp32": torch.arange(4.0)}}
    torch.save(shard, tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    loaded = load_weights(tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", mmap=True)
    assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["optimizer_state_dict"]["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)

    marker = tmp_path / "ran"
    torch.save({"module": _RunsCode(marker)}, tmp_path / "rng.pt")
    with pytest.raises(ConfigError, match=r"rng\.pt is not a weights-only checkpoint file \(it refers to posix\."):
        load_weights(tmp_path / "rng.pt")
    assert not marker.exists()


def _checkpoint(root: Path, marker: Path) -> Path:
    """A checkpoint directory as a run leaves it, its model-states file replaced by one that runs code."""
    ckpt = root / "checkpoints" / "step_00000010"
    (ckpt / "rng").mkdir(parents=True)
    cfg = load_config(TINY, [f"output_dir={root}"])
    (ckpt / "config.yaml").write_text(cfg.to_yaml())
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 10}))
    torch.save({"torch": torch.get_rng_state()}, ckpt / "rng" / "rank_00000.pt")
    torch.save({"module": _RunsCode(marker)}, ckpt / "mp_rank_00_model_states.pt")
    (root / "checkpoints" / "latest").write_text("step_00000010")
    return ckpt


def test_distrib_export_refuses_a_checkpoint_file_that_would_run_code_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    ckpt = _checkpoint(tmp_path / "run", marker)
    with pytest.raises(ConfigError):
        check_weights_only(ckpt)
    proc = subprocess.run([sys.executable, "-m", "distrib", "export", str(tmp_path / "run"), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == (
        f"distrib: error: {ckpt / 'mp_rank_00_model_states.pt'} is not a weights-only checkpoint file (it refers to "
        "posix.system, which loading it would call: it may run code); refusing to load it; restore the file the run "
        "wrote, or use another checkpoint"), proc.stderr[-3000:]
    assert sum("distrib: error:" in line for line in lines) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_resuming_from_a_checkpoint_file_that_would_run_code_is_refused_before_any_worker_starts(tmp_path):
    # check_resumable runs in the process the user started, before workers, process groups or DeepSpeed's loaders
    marker = tmp_path / "ran"
    ckpt = _checkpoint(tmp_path / "run", marker)
    with pytest.raises(ConfigError) as info:
        check_resumable(load_config(TINY, [f"output_dir={tmp_path / 'run'}"]))
    assert str(info.value) == (
        f"{ckpt / 'mp_rank_00_model_states.pt'} is not a weights-only checkpoint file (it refers to posix.system, "
        "which loading it would call: it may run code); refusing to load it; restore the file the run wrote, or use "
        "another checkpoint")
    assert not marker.exists()
