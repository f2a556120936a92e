"""Checkpoints that are never half-written and resume exactly.

Layout under ``<output_dir>/checkpoints/``::

    latest                     text file naming the newest complete checkpoint (moved last)
    step_00000200/             one checkpoint, published by an atomic rename of step_00000200.tmp/
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed engine state (each rank its ZeRO shard)
        trainer_state.json     step, samples/tokens seen, world layout, config hash
        rng/rank_00000.pt      RNG state of every rank
        config.yaml            the resolved run config
        tokenizer/             so that the checkpoint exports on its own
        universal/             made on demand when resuming at another data-parallel size

A crash at any point leaves either the previous ``latest`` or the new one, never a partial
checkpoint behind ``latest``: before the rename every rank fsyncs the files it wrote, and rank 0 the
shared ones and the directories; stale ``*.tmp`` directories are removed when the next run starts.
Every checkpoint records its run's lineage (``run_id``, kept across resumes); ``keep_last`` prunes
only this lineage's checkpoints, by step number, so a run never deletes another run's checkpoints
nor the one it just wrote.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import torch
import yaml

from distrib import faults, fs
from distrib.config import Config, ConfigError, config_diff
from distrib.parallel import deepspeed_compat
from distrib.parallel.failures import settle
from distrib.utils import log_main

if TYPE_CHECKING:
    from distrib.parallel.topology import Topology

UNIVERSAL_KEY = "universal_checkpoint_info"


@dataclass
class TrainState:
    """What the loop needs, besides engine state, to continue exactly."""

    step: int = 0
    samples_seen: int = 0  # the global sample index: the data cursor
    tokens_seen: int = 0
    world_size: int = 1
    dp: int = 1
    tp: int = 1
    zero_stage: int = 0
    config_hash: str = ""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the lineage: same across resumes
    max_steps: int = 0  # the schedule's length when saved (a resume may extend it)
    base: dict | None = None  # the frozen base a fine-tune starts from: {"path", "sha256"}
    teacher: dict | None = None  # a distillation's frozen teacher: {"path", "sha256"}


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when the run has none.

    Raises:
        ConfigError: ``latest`` names a checkpoint that is missing or incomplete. Starting from step 0
            instead would silently throw the run away.
    """
    marker = root / "latest"
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    path = root / name
    if not is_complete(path):
        others = sorted(p.name for p in root.glob("step_*") if is_complete(p))
        hint = (f"write the name of a complete one ({', '.join(others[-3:])}) into it to resume from there"
                if others else "no complete checkpoint is left to resume from")
        raise ConfigError(
            f"{marker} names {name!r}, which is missing or incomplete; {hint}, or set checkpoint.resume=false "
            "to start over"
        )
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint from what users pass: ``step_N``, ``checkpoints/latest``, ``checkpoints/`` or the run directory.

    Raises:
        ConfigError: nothing there is a complete checkpoint.
    """
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path.parent if path.name == "latest" else None, path, path / "checkpoints"):
        if root is not None and (root / "latest").is_file():
            return latest_checkpoint(root)
    raise ConfigError(
        f"{path} is not a distrib checkpoint; pass <output_dir>, <output_dir>/checkpoints/latest or "
        "<output_dir>/checkpoints/step_N"
    )


def read_state(path: Path) -> TrainState:
    known = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in json.loads((path / "trainer_state.json").read_text()).items() if k in known})


def check_resumable(cfg: Config) -> Path | None:
    """Before anything starts: the checkpoint to resume from, refusing one made by another config.

    Raises:
        ConfigError: when the run-defining config differs from the checkpoint's, or one of its files holds
            more than weights (:func:`check_weights_only`).
    """
    if not cfg.checkpoint.resume:
        return None
    path = latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
    if path is None:
        return None
    saved = yaml.safe_load((path / "config.yaml").read_text())
    old_steps, new_steps = saved.get("train", {}).get("max_steps"), cfg.train.max_steps
    if isinstance(old_steps, int) and new_steps != old_steps:
        step = read_state(path).step
        if new_steps < max(old_steps, step):
            raise ConfigError(
                f"train.max_steps={new_steps} is below this run's {old_steps} (checkpoint at step {step}); "
                f"a run can be extended, not shortened: set train.max_steps>={old_steps}, or use a new output_dir"
            )
        saved["train"]["max_steps"] = new_steps  # extending: the schedule is recomputed (logged at start)
    diffs = config_diff(saved, cfg.model_dump(mode="json"))
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise ConfigError(
            f"{cfg.output_dir} holds a checkpoint of a different run ({shown}); restore those values, "
            "or use a new output_dir, or set checkpoint.resume=false to start over"
        )
    check_weights_only(path)  # DeepSpeed's loaders would run what its pickles hold
    return path


def load_weights(path: Path, mmap: bool = False):
    """``torch.load(path)`` weights-only, DeepSpeed's own plain types allowed: a file cannot run code when read.

    Raises:
        ConfigError: ``path`` holds anything else (a pickle that would call a function, say), in one line.
    """
    with torch.serialization.safe_globals(deepspeed_compat.checkpoint_types()):
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as e:
            what = re.search(r"GLOBAL ([\w.]+)", str(e))
            held = (f"it refers to {what.group(1)}, which loading it would call" if what
                    else str(e).strip().splitlines()[0][:200])
            raise ConfigError(
                f"{path} is not a weights-only checkpoint file ({held}: it may run code); refusing to load it; "
                "restore the file the run wrote, or use another checkpoint"
            ) from None


def check_weights_only(ckpt: Path) -> None:
    """Every ``.pt`` file of checkpoint ``ckpt`` loads weights-only; before any DeepSpeed loader reads one.

    DeepSpeed's own loaders (resuming the engine, its universal converter, ``zero_to_fp32``) unpickle with
    ``weights_only=False``. Only the pickles are read here: the tensors are mapped, not loaded.

    Raises:
        ConfigError: naming the first file that holds anything but weights.
    """
    for file in sorted(ckpt.rglob("*.pt")):
        try:
            load_weights(file, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            load_weights(file)  # a file in torch's legacy format cannot be mapped


def _rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "accelerator": get_accelerator().get_rng_state(),
    }


def _set_rng_state(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["accelerator"])


class Checkpointer:
    """Saves and restores engine + trainer state under ``root``."""

    def __init__(self, root: Path, topo: "Topology", cfg: Config, tokenizer):
        self.root, self.topo, self.cfg, self.tokenizer = root, topo, cfg, tokenizer
        #: Leave frozen parameters out (they come from the base at every start): a LoRA checkpoint is small.
        self.exclude_frozen = False
        #: False when nothing trains (a frozen control run): there is no engine state to save or load.
        self.engine_state = True

    @staticmethod
    def clean_partial_in(root: Path) -> None:
        """Remove what a save killed half-way left behind (run at start, on rank 0, under the run lock)."""
        for stale in [*root.glob("*.tmp"), *root.glob("latest.tmp-*")]:
            log_main(f"removing {stale.name}, a checkpoint whose save did not complete")
            shutil.rmtree(stale, ignore_errors=True)

    def save(self, engine, state: TrainState) -> Path:
        """Write a checkpoint of ``state`` and publish it; every rank takes part.

        Raises:
            TrainingError: on every rank, when the save failed on any (a full disk, say); the partial
                checkpoint is removed and ``latest`` still names the previous one.
        """
        name = f"step_{state.step:08d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        if self.topo.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.topo.barrier()
        error = None
        try:
            # ds_to_universal needs this key; AutoTP writes a richer one of its own (its TP merge patterns).
            client = ({} if getattr(engine.module, UNIVERSAL_KEY, None)
                      else {UNIVERSAL_KEY: {"universal_checkpoint_version": 0.4}})
            if self.engine_state:
                engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=client, save_latest=False,
                                       exclude_frozen_parameters=self.exclude_frozen)
        except Exception as e:  # noqa: BLE001 (every rank learns of it below)
            error = e
            # DeepSpeed's save ends in a barrier, after its writes: the ranks whose writes succeeded wait
            # there, so this one joins them, or every later collective would pair with the wrong one.
            self.topo.barrier()
        if error is None:
            try:
                self._write_own(tmp, state)
            except Exception as e:  # noqa: BLE001
                error = e
        self.topo.barrier()  # every rank's files are written and synced
        if self.topo.is_main and error is None:
            try:
                fs.fsync_files(main_files(tmp, self.topo.dp, self.topo.tp))
                fs.fsync_tree(tmp)
            except Exception as e:  # noqa: BLE001
                error = e
        self._stop_if_failed(error, tmp, name)
        error = None
        if self.topo.is_main:
            try:
                self._publish(tmp, final, name, state.run_id)
            except Exception as e:  # noqa: BLE001
                error = e
        self._stop_if_failed(error, final, name)  # also the barrier that ends the save
        return final

    def _write_own(self, tmp: Path, state: TrainState) -> None:
        """What distrib adds to DeepSpeed's files: every rank its RNG state, rank 0 the run's metadata."""
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{self.topo.rank:05d}.pt")
        faults.at("save", self.topo.rank, state.step)
        if self.topo.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
            (tmp / "config.yaml").write_text(self.cfg.to_yaml())
            self.tokenizer.save_pretrained(tmp / "tokenizer")
        # Each rank makes the files it wrote durable: on a shared file system an fsync on rank 0's
        # node does not flush what other nodes wrote and still hold in their caches.
        dp_rank, tp_rank = divmod(self.topo.rank, self.topo.tp)
        fs.fsync_files(rank_files(tmp, self.topo.rank, dp_rank, tp_rank))

    def _stop_if_failed(self, error: BaseException | None, written: Path, name: str) -> None:
        """Every rank learns whether any rank's part of the save failed; if one did, the checkpoint being
        written is removed (unless ``latest`` already names it) and every rank raises."""
        def undo() -> None:
            if _latest_name(self.root) != written.name:
                shutil.rmtree(written, ignore_errors=True)

        def kept() -> str:
            last = latest_checkpoint(self.root)
            return "the partial save was removed and " + (f"{last.name} is intact" if last else
                                                           "there is no earlier checkpoint")

        settle(self.topo, error, written, f"saving checkpoint {name} of {self.root.parent}", kept, undo=undo,
               then="run the same command to resume")

    def _publish(self, tmp: Path, final: Path, name: str, run_id: str) -> None:
        """Rank 0: rename the written checkpoint into place, then point ``latest`` at it, then prune."""
        other = read_state(final).run_id if is_complete(final) else None
        if other is not None and other != run_id:
            # another run's checkpoint of the same step (this run started over): set it aside, keep it
            os.replace(final, final.with_name(f"{final.name}-{other[:8]}"))
        elif final.exists():  # a re-save of the same step (e.g. exit right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fs.fsync_dir(self.root)
        fs.atomic_write_text(self.root / "latest", name)  # synced, renamed into place, its directory synced
        self._prune(run_id)

    def _prune(self, run_id: str) -> None:
        """Keep this lineage's ``keep_last`` newest checkpoints (by step); never touch another run's."""
        states = {p: read_state(p) for p in self.root.glob("step_*") if is_complete(p)}
        ours = sorted((s.step, p) for p, s in states.items() if s.run_id == run_id)
        for _, old in ours[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def needs_universal(self, path: Path) -> bool:
        """DeepSpeed cannot load ZeRO optimizer shards written at another data-parallel size."""
        saved = read_state(path)
        return saved.dp != self.topo.dp and any(path.glob("*optim_states.pt"))

    def make_universal(self, path: Path) -> Path:
        """Convert ``path`` to DeepSpeed's universal format, every rank doing its share (see :func:`convert_to_universal`)."""
        return convert_to_universal(path, self.topo)

    def load(self, engine, path: Path, universal: bool) -> TrainState:
        """Restore engine state (from ``path/universal`` when ``universal``), then RNG and trainer state."""
        load_dir, tag = (path, "universal") if universal else (self.root, path.name)
        loaded, _ = (str(path), None) if not self.engine_state else engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=not self.exclude_frozen,
                                           load_optimizer_states=engine.lr_scheduler is not None,
                                           load_lr_scheduler_states=engine.lr_scheduler is not None)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
        replay_adam_step_counter(engine.optimizer)
        state = read_state(path)
        rng = path / "rng" / f"rank_{self.topo.rank:05d}.pt"
        if rng.is_file() and not universal:
            _set_rng_state(load_weights(rng))
        return state


def replay_adam_step_counter(optimizer) -> None:
    """Bring DeepSpeed's C++ CPU Adam to the state an uninterrupted run has after the loaded steps.

    The CPU kernels behind DeepSpeed's ``FusedAdam`` and ``DeepSpeedCPUAdam`` keep the bias-correction
    powers beta1^t and beta2^t inside the C++ optimizer object, as float32 running products
    (``_betta1_t *= beta1`` each step), and none of it is in any state dict. A fresh process that
    loads a checkpoint at step t recomputes them with ``pow(beta, t+1)`` instead, which differs from the
    running product by an ulp or so: enough for a resumed run to drift from the uninterrupted one a few
    steps later. Calling the kernel on empty tensors for steps 1..t reproduces the running product
    exactly and touches no weight. CUDA kernels compute the powers from the step each call: nothing
    to replay there.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    opt = optimizer
    while opt is not None and not isinstance(opt, (FusedAdam, DeepSpeedCPUAdam)):
        opt = getattr(opt, "optimizer", None)
    if opt is None or (isinstance(opt, FusedAdam) and get_accelerator().device_name() != "cpu"):
        return
    steps = [int(s["step"]) for s in opt.state.values() if "step" in s]
    if not steps:
        return
    group = opt.param_groups[0]  # one C++ object per optimizer (per AdamW mode): one replay suffices
    beta1, beta2 = group["betas"]
    bias_correction = 1 if group.get("bias_correction", True) else 0
    empty = torch.empty(0, dtype=torch.float32)
    for step in range(1, max(steps) + 1):
        if isinstance(opt, FusedAdam):
            opt.multi_tensor_adam(2048 * 32, opt._dummy_overflow_buf, [[empty], [empty], [empty], [empty]],
                                  group["lr"], beta1, beta2, group["eps"], step, opt.adam_w_mode, bias_correction,
                                  group["weight_decay"])
        else:
            opt.ds_opt_adam.adam_update(opt.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                                        group["weight_decay"], bias_correction == 1, empty, empty, empty, empty)


def convert_to_universal(path: Path, topo: Topology | None = None) -> Path:
    """DeepSpeed's universal checkpoint of ``path`` in ``path/universal`` (made once, atomically).

    It holds every parameter whole (ZeRO shards and tensor-parallel slices merged) with its optimizer
    state, so it loads at any data-parallel size and exports without the original layout.

    With ``topo`` every rank of the job calls this, and a ZeRO-1/2 checkpoint is converted by all of
    them (:func:`_convert_spread`): each extracts the fragments of the ZeRO shard files it is given
    (its own share when the world is the one that saved) and merges its share of the parameters, so
    no process reads more than a shard file or a parameter at a time, and the time is divided by the
    world size instead of ranks idling in a barrier. Without ``topo``, or for ZeRO-3, DeepSpeed's
    converter runs in a subprocess of rank 0 (one shard file or parameter at a time too).
    """
    out = path / "universal"
    if (out / ".complete").exists():
        return out
    if topo is not None and topo.world_size > 1 and _spreadable(path):
        log_main(f"converting {path.name} to a universal checkpoint on {topo.world_size} ranks")
        _convert_spread(path, topo)
        return out

    def convert() -> None:
        if topo is not None and not topo.is_main:
            return
        log_main(f"converting {path.name} to a universal checkpoint")
        tmp = path / "universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"universal checkpoint conversion of {path} failed:\n{proc.stderr[-4000:]}")
        _publish_universal(tmp, out)

    _converting(path, topo, convert)
    return out


def _converting(path: Path, topo: Topology | None, work) -> None:
    """``work()``, a step of converting ``path`` to a universal checkpoint; then every rank of ``topo`` learns
    whether it failed on any rank, and if so the partial conversion is removed and every rank raises.

    Raises:
        TrainingError: the step failed for a full disk (or another OS error) on some rank.
        Exception: what ``work`` raised on this rank, when that is a bug (its traceback matters).
    """
    tmp, error = path / "universal.tmp", None
    try:
        work()
    except Exception as e:  # noqa: BLE001 (every rank learns of it below)
        error = e
    settle(topo, error, tmp, f"converting checkpoint {path} to a universal checkpoint",
           f"the partial conversion was removed and {path.name} is intact",
           undo=lambda: shutil.rmtree(tmp, ignore_errors=True))



def _spreadable(path: Path) -> bool:
    """Whether ``path`` is a ZeRO-1/2 checkpoint without expert layers that this DeepSpeed can convert spread."""
    if not deepspeed_compat.converter_steps_available() or any(path.glob("layer_*_expert_*")):
        return False
    return deepspeed_compat.zero_stage(path) in (1, 2)


def _convert_spread(path: Path, topo: Topology) -> None:
    """``ds_to_universal``'s ZeRO-1/2 conversion, its two heavy steps divided among the ranks of ``topo``.

    1. Extract: the ZeRO shard files (one per data-parallel x tensor-parallel rank that saved) are dealt
       out round-robin; each rank writes the fragments of every parameter its files hold.
    2. Merge: the parameters are dealt out; each rank joins its parameters' fragments and slices into
       whole tensors (fp32, exp_avg, exp_avg_sq).
    Rank 0 then writes what is small (the optimizer's common state, the model-states files) and
    publishes. The output is file for file what DeepSpeed's converter writes.
    """
    import itertools

    import torch.distributed as dist
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
    from deepspeed.checkpoint.deepspeed_checkpoint import DeepSpeedCheckpoint

    tmp = path / "universal.tmp"
    temp_dir, zero_dir = tmp / "tmp", tmp / "zero"
    if topo.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    topo.barrier()
    ds = DeepSpeedCheckpoint(str(path))
    deepspeed_compat.check_required_state(ds)

    def extract() -> None:
        if topo.is_main:
            deepspeed_compat.create_checkpoint_paths(tmp, ds)
        shards = list(itertools.product(range(ds.pp_degree), range(ds.tp_degree), range(ds.dp_degree)))
        for shard in shards[topo.rank::topo.world_size]:
            deepspeed_compat.extract_zero_shards(temp_dir, ds, shard)

    _converting(path, topo, extract)  # also the barrier: every fragment is written before any merge reads it

    slice_shapes = deepspeed_compat.tp_slice_shapes(ds)
    info = ds.get_checkpoint_info(UNIVERSAL_CHECKPOINT_INFO)
    unmatched = []

    def merge() -> None:
        unmatched.extend(set(deepspeed_compat.merge_tp_slices(info, zero_dir, temp_dir, ds, item))
                         for item in slice_shapes[topo.rank::topo.world_size])

    _converting(path, topo, merge)
    gathered: list = [None] * topo.world_size
    dist.all_gather_object(gathered, unmatched)
    every = [patterns for rank in gathered for patterns in rank]
    if every and set.intersection(*every):  # as the converter's strict mode: each merge pattern must match
        raise RuntimeError(f"universal checkpoint conversion of {path}: merge patterns matched no parameter: "
                           f"{sorted(set.intersection(*every))}")
    _converting(path, topo, lambda: _finish_spread(path, ds, tmp) if topo.is_main else None)


def _finish_spread(path: Path, ds, tmp: Path) -> None:
    """Rank 0's part of :func:`_convert_spread` after the merge: what is small, then the publish."""
    from deepspeed.checkpoint.constants import PARAM

    zero_dir = tmp / "zero"
    # Parameters without optimizer fragments (never given a gradient) still need their values.
    for model_file in ds.mp_rank_files:
        module = load_weights(model_file).get("module") or {}
        for name, tensor in module.items():
            target = zero_dir / name / "fp32.pt"
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.save({PARAM: tensor.float()}, target)
        del module
    deepspeed_compat.save_optimizer_state(tmp, ds)
    shutil.rmtree(tmp / "tmp", ignore_errors=True)
    for model_file in ds.mp_rank_files:
        shutil.copy2(model_file, tmp)
    _publish_universal(tmp, path / "universal")


def _publish_universal(tmp: Path, out: Path) -> None:
    """Put the finished conversion ``tmp`` in place as ``out``, marked complete so it is made only once."""
    (tmp / ".complete").touch()
    fs.replace(tmp, out)



def _latest_name(root: Path) -> str | None:
    """The name ``latest`` holds, or None."""
    marker = root / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def rank_files(ckpt: Path, rank: int, dp_rank: int, tp_rank: int) -> list[Path]:
    """The files of checkpoint directory ``ckpt`` that the rank at (``dp_rank``, ``tp_rank``) writes.

    DeepSpeed's names: every rank writes its optimizer shard
    (``[bf16_]zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt``) and, under ZeRO-3, its model shard
    (``zero_pp_rank_{dp}_mp_rank_{tp:02d}_model_states.pt``); below ZeRO-3 the first data-parallel rank
    of each tensor-parallel group writes ``mp_rank_{tp:02d}_model_states.pt``. Our own: ``rng/rank_N.pt``.
    """
    mine = [ckpt / f"{bf16}zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_{kind}_states.pt"
            for bf16 in ("", "bf16_") for kind in ("model", "optim")]
    if dp_rank == 0:
        mine.append(ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt")
    mine.append(ckpt / "rng" / f"rank_{rank:05d}.pt")
    return sorted(p for p in mine if p.is_file())


def main_files(ckpt: Path, dp: int, tp: int) -> list[Path]:
    """What rank 0 makes durable besides its own shard: every file no rank of the ``dp`` x ``tp`` world claims.

    That is the shared metadata (trainer state, config, tokenizer), and whatever else DeepSpeed may
    write that ``rank_files`` does not know of: better synced twice than not at all.
    """
    claimed = {p for r in range(dp * tp) for p in rank_files(ckpt, r, r // tp, r % tp)}
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p not in claimed)

