"""Checkpoints are published atomically: a crash mid-save never leaves `latest` on a partial one."""

import json
from pathlib import Path

import pytest

from distrib.checkpoint import Checkpointer, TrainState, latest_checkpoint
from distrib.config import ConfigError, load_config
from tests.helpers import TINY


class _Topo:
    rank, is_main, tp, dp = 0, True, 1, 1

    def barrier(self):
        pass

    def any(self, flag):
        return flag


class _Tokenizer:
    def save_pretrained(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "tokenizer.json").write_text("{}")


class _Engine:
    """Writes a shard file the way DeepSpeed does (under root/tag), optionally dying half-way."""

    module = object()

    def __init__(self, crash=False):
        self.crash = crash

    def save_checkpoint(self, root, tag, client_state, save_latest, exclude_frozen_parameters=False):
        assert save_latest is False and "universal_checkpoint_info" in client_state
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"partial" if self.crash else b"whole")
        if self.crash:
            raise KeyboardInterrupt("killed mid-save")


@pytest.fixture
def ckpt(tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "checkpoint.keep_last=2"])
    return Checkpointer(tmp_path / "checkpoints", _Topo(), cfg, _Tokenizer())


RUN = "a" * 32  # one lineage


def test_crash_mid_save_keeps_latest_on_the_previous_complete_checkpoint(ckpt):
    ckpt.save(_Engine(), TrainState(step=10, run_id=RUN))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(_Engine(crash=True), TrainState(step=20, run_id=RUN))
    assert latest_checkpoint(ckpt.root).name == "step_00000010"
    assert not (ckpt.root / "step_00000020").exists()
    assert (ckpt.root / "step_00000020.tmp").exists()  # the debris, never named by latest
    # the next start removes the debris; the save then publishes
    Checkpointer.clean_partial_in(ckpt.root)
    assert not list(ckpt.root.glob("*.tmp"))
    ckpt.save(_Engine(), TrainState(step=20, run_id=RUN))
    assert latest_checkpoint(ckpt.root).name == "step_00000020"
    state = json.loads((ckpt.root / "step_00000020" / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["run_id"] == RUN


def test_keep_last_prunes_the_oldest_checkpoints_of_this_run_by_step(ckpt):
    for step in (5, 10, 15, 20):
        ckpt.save(_Engine(), TrainState(step=step, run_id=RUN))
    assert sorted(p.name for p in ckpt.root.glob("step_*")) == ["step_00000015", "step_00000020"]
    assert (ckpt.root / "latest").read_text() == "step_00000020"
    # another lineage's older checkpoints with higher numbers are neither pruned nor prune ours
    for step in (1, 2, 3):
        ckpt.save(_Engine(), TrainState(step=step, run_id="b" * 32))
    assert sorted(p.name for p in ckpt.root.glob("step_*")) == [
        "step_00000002", "step_00000003", "step_00000015", "step_00000020"]
    assert latest_checkpoint(ckpt.root).name == "step_00000003"


def test_latest_naming_a_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("step_00000099")
    with pytest.raises(ConfigError) as e:
        latest_checkpoint(root)
    assert str(e.value) == (f"{root / 'latest'} names 'step_00000099', which is missing or incomplete; no complete "
                            "checkpoint is left to resume from, or set checkpoint.resume=false to start over")
