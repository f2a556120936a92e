"""Checkpoints are published atomically: a crash mid-save never leaves `latest` on a partial one."""

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import torch.distributed

from distrib.checkpoint import Checkpointer, TrainState, latest_checkpoint
from distrib.config import ConfigError, load_config
from distrib.errors import TrainingError
from distrib.fs import file_system
from tests.helpers import TINY


class _Topo:
    rank, is_main, tp, dp, world_size = 0, True, 1, 1, 1

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


# -- a save that fails on one rank: the ranks stay in step and all stop with one line ---------------------

class _Ranks:
    """Ranks as threads whose collectives must pair up as gloo's do: every rank calls the same collective at
    the same point, or the test fails (where gloo would hang or pair a barrier with an all-reduce)."""

    def __init__(self, world: int):
        self.world = world
        self.gate = threading.Barrier(world, timeout=30)
        self.calls: dict[int, list] = {r: [] for r in range(world)}

    def collective(self, rank: int, op: str, value=None) -> list:
        i = len(self.calls[rank])
        self.calls[rank].append((op, value))
        self.gate.wait()
        ops = {self.calls[r][i][0] for r in range(self.world)}
        if len(ops) > 1:
            self.gate.abort()
            raise AssertionError(f"collective {i}: the ranks called {sorted(ops)}")
        values = [self.calls[r][i][1] for r in range(self.world)]
        self.gate.wait()
        return values


class _RankTopo:
    def __init__(self, ranks: _Ranks, rank: int):
        self.ranks, self.rank, self.is_main = ranks, rank, rank == 0
        self.world_size, self.dp, self.tp = ranks.world, ranks.world, 1

    def barrier(self):
        self.ranks.collective(self.rank, "barrier")

    def any(self, flag):
        return any(self.ranks.collective(self.rank, "all_reduce", bool(flag)))


class _DeepSpeed:
    """DeepSpeed's save_checkpoint as far as collectives go: a barrier, the tag check (an all-reduce), each
    rank's writes, a closing barrier. ``fail``: the rank whose write raises, and what."""

    module = object()

    def __init__(self, topo: _RankTopo, fail: tuple[int, BaseException] | None = None):
        self.topo, self.fail = topo, fail

    def save_checkpoint(self, root, tag, client_state, save_latest, exclude_frozen_parameters=False):
        self.topo.barrier()
        self.topo.any(False)
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / f"zero_pp_rank_{self.topo.rank}_mp_rank_00_optim_states.pt").write_bytes(b"shard")
        if self.fail is not None and self.fail[0] == self.topo.rank:
            raise self.fail[1]
        self.topo.barrier()


def _save_on_ranks(tmp_path, monkeypatch, step: int, fail=None, world: int = 2) -> dict:
    """Every rank's save of ``step`` in threads; what each raised (None when it returned)."""
    ranks, local = _Ranks(world), threading.local()

    def all_gather_object(out, obj):
        out[:] = ranks.collective(local.rank, "all_gather_object", obj)

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    cfg = load_config(TINY, [f"output_dir={tmp_path}"])
    raised = {}

    def rank_main(rank):
        local.rank = rank
        topo = _RankTopo(ranks, rank)
        try:
            Checkpointer(tmp_path / "checkpoints", topo, cfg, _Tokenizer()).save(_DeepSpeed(topo, fail),
                                                                                 TrainState(step=step, run_id=RUN))
            raised[rank] = None
        except BaseException as e:  # noqa: BLE001 - checked by the caller
            raised[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank is stuck in a collective"
    return raised


@pytest.mark.parametrize("where", ["deepspeed-rank0", "deepspeed-rank1", "rng-rank1", "latest-rank0"])
def test_a_full_disk_in_a_save_on_one_rank_stops_every_rank_in_step_with_one_line(tmp_path, monkeypatch, where):
    assert all(e is None for e in _save_on_ranks(tmp_path, monkeypatch, 10).values())
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    fail = None
    if where.startswith("deepspeed"):  # a shard write fails inside DeepSpeed's save, before its closing barrier
        fail = (int(where[-1]), full)
    elif where == "rng-rank1":  # our own file, after DeepSpeed's save
        monkeypatch.setenv("DISTRIB_FAULT", "save:enospc:1:20")
    else:  # rank 0 alone, publishing: the checkpoint is renamed into place, then writing `latest` fails
        def no_room(path, text, durable=True):
            raise full
        monkeypatch.setattr("distrib.fs.atomic_write_text", no_room)
    raised = _save_on_ranks(tmp_path, monkeypatch, 20, fail)
    assert all(isinstance(e, TrainingError) for e in raised.values()), raised
    messages = {str(e) for e in raised.values()}
    assert len(messages) == 1  # every rank knows what failed, wherever it did (rank 0 says it)
    root = tmp_path / "checkpoints"
    assert messages.pop() == (
        f"saving checkpoint step_00000020 of {tmp_path} failed: {file_system(root)} is full; the partial save was "
        "removed and step_00000010 is intact; free space on it and run the same command to resume")
    assert latest_checkpoint(root).name == "step_00000010"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010"]


def test_a_bug_in_a_save_on_one_rank_is_its_traceback_there_and_one_line_on_rank_0(tmp_path, monkeypatch):
    raised = _save_on_ranks(tmp_path, monkeypatch, 20, fail=(1, KeyError("optimizer")))
    assert isinstance(raised[1], KeyError)
    assert str(raised[0]) == (
        f"saving checkpoint step_00000020 of {tmp_path} failed: KeyError: 'optimizer' on rank 1; the partial save was "
        "removed and there is no earlier checkpoint; see that rank's traceback")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []
