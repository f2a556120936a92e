"""The one object that owns the process topology: world, rank, and the data x tensor parallel grid.

Ranks are laid out tensor-parallel-fastest: ranks ``[k*tp, (k+1)*tp)`` form tensor-parallel group
``k`` (they share a node when ``tp`` divides the GPUs per node), and ranks with the same position
inside their tp group form a data-parallel group. Every process group of a run is made here.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from distrib.launch.env import nccl_env
from distrib.parallel.deepspeed_compat import share_process_groups

T = TypeVar("T")


#: Where a rank can be inside an optimizer step, in order.
PHASES = ("forward", "backward", "step", "save")


def device_index(local_rank: int, visible_devices: int) -> int:
    """The device this rank uses among those it sees.

    One device per process on a node is the usual layout: ``LOCAL_RANK`` indexes the node's devices.
    Under Slurm's ``--gpus-per-task=1`` (or any binding that shows each task only its own devices) a
    task sees fewer devices than the node has ranks, and its device is ``LOCAL_RANK`` modulo what it
    sees (index 0 when it sees one).
    """
    if visible_devices <= 0:
        return local_rank
    return local_rank % visible_devices


@dataclass
class Topology:
    """World layout and process groups.

    Also implements the small "mpu" interface DeepSpeed asks of Megatron-style models
    (``get_data_parallel_group`` and friends), so the engine reduces gradients over the
    data-parallel axis only.
    """

    world_size: int
    rank: int
    local_rank: int
    tp: int
    dp_group: object = field(default=None, repr=False)
    tp_group: object = field(default=None, repr=False)
    timeout_s: float = 1800.0
    _position: tuple = field(default=(0, 0, 0), repr=False)
    _shared: int = field(default=0, repr=False)  # calls of from_main so far
    _beat: object = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device(get_accelerator().device_name(device_index(self.local_rank, get_accelerator().device_count())))

    @classmethod
    def init(cls, tp: int = 1, timeout_minutes: float = 30.0, run_dir: str | os.PathLike | None = None) -> "Topology":
        """Start (or join) the default process group from the environment and build the grid.

        The environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) was normalised beforehand by
        :mod:`launch.env`, whatever started the process. On NCCL the variables of
        :func:`launch.env.nccl_env` are set first (those the user has not), with the flight recorder's
        dumps in ``<run_dir>/flight_recorder/``.
        """
        accel = get_accelerator()
        if not dist.is_initialized():
            if accel.communication_backend_name() == "nccl":
                use_nccl_env(run_dir)
            deepspeed.init_distributed(
                dist_backend=accel.communication_backend_name(),
                auto_mpi_discovery=False,
                timeout=timedelta(minutes=timeout_minutes),
                verbose=False,
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        accel.set_device(device_index(local_rank, accel.device_count()))
        topo = cls(world_size=world, rank=rank, local_rank=local_rank, tp=tp)
        topo.timeout_s = timeout_minutes * 60
        # new_group is collective: every rank creates every group, in the same order. Groups do not
        # inherit the default group's timeout: pass it, or a hung collective waits 30 minutes.
        timeout = timedelta(minutes=timeout_minutes)
        for k in range(topo.dp):
            ranks = list(range(k * tp, (k + 1) * tp))
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                topo.tp_group = group
        for j in range(tp):
            ranks = list(range(j, world, tp))
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                topo.dp_group = group
        topo._share_with_deepspeed()
        return topo

    def _share_with_deepspeed(self) -> None:
        """Hand our groups to DeepSpeed, which would otherwise make its own without our timeout."""
        share_process_groups(self.tp, self.tp_group, self.dp_group)

    def barrier(self) -> None:
        dist.barrier()

    def from_main(self, compute: Callable[[], T], wait: timedelta = timedelta(hours=6)) -> T:
        """``compute()`` run on rank 0 alone, its value given to every rank through the rendezvous store.

        For what every rank needs and one rank can find alone at a cost (the hash of a model's files). The
        others wait on the store rather than in a collective, which would end at the process group's timeout
        (``parallel.timeout_minutes``): reading a large model can take longer. An exception on rank 0 is sent
        instead and raised on every rank, so no rank waits for a value that never comes.

        Args:
            compute: what rank 0 runs; every rank calls ``from_main`` at the same point of the program.
            wait: how long the other ranks wait for rank 0 (6 hours: a terabyte read at 50 MB/s).
        """
        if self.world_size == 1:
            return compute()
        store, key = _store(), f"distrib/from-main/{self._shared}"
        self._shared += 1  # every rank counts its calls alike: the n-th call of each meets at the n-th key
        if self.is_main:
            try:
                value = compute()
            except Exception as e:
                sent = e if _picklable(e) else RuntimeError(f"on rank 0: {type(e).__name__}: {e}")
                store.set(key, pickle.dumps((False, sent)))
                raise
            store.set(key, pickle.dumps((True, value)))
            return value
        store.wait([key], wait)
        ok, value = pickle.loads(store.get(key))
        if not ok:
            raise value
        return value

    def all_reduce_sum_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (float64, so that token counts and loss sums stay exact)."""
        value = value.detach().to(self.device, torch.float64, copy=True)
        dist.all_reduce(value, group=self.dp_group)
        return value

    # -- who is late: where each rank is, in the rendezvous store ---------------------------------
    def mark(self, step: int, micro: int, phase: str) -> None:
        """Record where this rank is (``phase``: forward, backward, step or save).

        Only a local assignment: a daemon thread copies it to the rendezvous store once a second when
        it changed, so the hot loop never waits on the network, and after a collective timeout (many
        seconds) every waiting rank's entry is current while a hung rank's shows where it stopped.
        """
        self._position = (step, micro, PHASES.index(phase))
        if self._beat is None:
            self._beat = threading.Thread(target=self._publish, name="distrib-heartbeat", daemon=True)
            self._beat.start()

    def _publish(self) -> None:
        store, sent = _store(), None
        while store is not None and not self._stopping.wait(1.0):
            pos = self._position
            if pos != sent:
                try:
                    store.set(f"distrib/position/{self.rank}", json.dumps(pos))
                    sent = pos
                except Exception:  # the store's host is gone: nothing left to report to
                    return

    def who_is_late(self) -> str:
        """One line naming the ranks that were behind this one when a collective timed out here."""
        store, mine, late = _store(), self._position, []
        if store is not None:
            store.set_timeout(timedelta(seconds=10))
            for r in range(self.world_size):
                try:
                    pos = tuple(json.loads(store.get(f"distrib/position/{r}").decode()))
                except Exception:  # the store went down with its host rank, or r never reported
                    pos = None
                if r != self.rank and (pos is None or pos < mine):
                    late.append(f"rank {r} ({_where(pos)})")
        who = ", ".join(late) if late else "another rank"
        return (f"a collective timed out after {self.timeout_s / 60:g} min on rank {self.rank} at {_where(mine)}: "
                f"{who} did not arrive; see that rank's log (parallel.timeout_minutes sets the wait)")

    def max(self, value: float) -> float:
        """The largest ``value`` over all ranks, on every rank."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (used for stop requests)."""
        return self.max(1.0 if flag else 0.0) > 0

    # -- DeepSpeed "mpu" interface ---------------------------------------------------------------
    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def shutdown(self) -> None:
        # The heartbeat thread talks to the store: it must be gone before the process group (and the
        # store with it) is torn down, or its C++ client dies mid-call and aborts the process.
        self._stopping.set()
        if self._beat is not None:
            self._beat.join(timeout=30)
        if dist.is_initialized():
            dist.destroy_process_group()


def use_nccl_env(run_dir: str | os.PathLike | None) -> None:
    """Set :func:`launch.env.nccl_env` (what the user has not set) and make the flight recorder's directory."""
    env = nccl_env(run_dir, os.environ)
    if "TORCH_FR_DUMP_TEMP_FILE" in env:  # torch writes the files but does not make their directory
        Path(env["TORCH_FR_DUMP_TEMP_FILE"]).parent.mkdir(parents=True, exist_ok=True)
    os.environ.update(env)


#: What a collective that waited past the group's timeout raises, lower-cased, read in torch 2.13. gloo: a
#: RuntimeError "Timed out waiting 15000ms for recv operation to complete" (or send; later operations on the
#: same pair: "Application timeout caused pair closure"). NCCL (ProcessGroupNCCL.cpp): the watchdog marks the
#: work with a DistBackendError "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=..,
#: OpType=ALLREDUCE, ..) ran for 1800000 milliseconds before timing out.", which ``wait()`` raises; under
#: TORCH_NCCL_ASYNC_ERROR_HANDLING=2 it then aborts the communicators, and the next collective raises
#: "NCCL communicator was aborted on rank 0." (with the original reason when known). Older torch raised
#: these as plain RuntimeErrors.
_TIMED_OUT = ("timed out waiting", "operation timed out", "application timeout caused pair closure",
              "watchdog caught collective operation timeout", "communicator was aborted")


def collective_timed_out(error: BaseException) -> bool:
    """Whether ``error`` is a collective that waited past the process group's timeout (gloo or NCCL).

    torch's distributed errors (``torch.distributed.DistError`` and its subclasses) qualify when they say
    they timed out or were aborted; any other RuntimeError only with the words gloo or NCCL use.
    """
    text = str(error).lower()
    if isinstance(error, dist.DistError):
        return any(word in text for word in ("timed out", "timeout", "aborted"))
    return isinstance(error, RuntimeError) and any(words in text for words in _TIMED_OUT)


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def _store():
    """The default process group's key-value store (the rendezvous store), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _where(pos) -> str:
    if pos is None:
        return "no report"
    step, micro, phase = pos
    return f"step {step}, micro-batch {micro}, {PHASES[phase]}"
