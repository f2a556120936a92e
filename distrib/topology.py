"""The one object that owns the process topology: world, rank, and the data x tensor parallel grid.

Ranks are laid out tensor-parallel-fastest: ranks ``[k*tp, (k+1)*tp)`` form tensor-parallel group
``k`` (they share a node when ``tp`` divides the GPUs per node), and ranks with the same position
inside their tp group form a data-parallel group. Every process group of a run is made here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


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
        return torch.device(get_accelerator().device_name(self.local_rank))

    @classmethod
    def init(cls, tp: int = 1, timeout_minutes: float = 30.0) -> "Topology":
        """Start (or join) the default process group from the environment and build the grid.

        The environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) was normalised beforehand by
        :mod:`launch.env`, whatever started the process.
        """
        accel = get_accelerator()
        if not dist.is_initialized():
            deepspeed.init_distributed(
                dist_backend=accel.communication_backend_name(),
                auto_mpi_discovery=False,
                timeout=timedelta(minutes=timeout_minutes),
                verbose=False,
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        accel.set_device(local_rank)
        topo = cls(world_size=world, rank=rank, local_rank=local_rank, tp=tp)
        # new_group is collective: every rank creates every group, in the same order.
        for k in range(topo.dp):
            ranks = list(range(k * tp, (k + 1) * tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                topo.tp_group = group
        for j in range(tp):
            ranks = list(range(j, world, tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                topo.dp_group = group
        if tp > 1:
            topo._share_with_deepspeed()
        return topo

    def _share_with_deepspeed(self) -> None:
        """Hand our groups to DeepSpeed, whose AutoTP would otherwise make its own mesh.

        ``deepspeed.utils.groups._init_tp_mesh_device`` returns early when these are set; the
        layout it would build, a (dp, tp) mesh with tp fastest, is the same as ours.
        """
        from deepspeed.utils import groups

        groups._TENSOR_MODEL_PARALLEL_GROUP = self.tp_group
        groups._MODEL_PARALLEL_GROUP = self.tp_group
        groups._DATA_PARALLEL_GROUP = self.dp_group

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_mean_dp(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone().float()
        dist.all_reduce(value, group=self.dp_group)
        return value / self.dp

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
        if dist.is_initialized():
            dist.destroy_process_group()
