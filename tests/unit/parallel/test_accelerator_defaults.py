"""Settings chosen from the accelerator: DeepSpeed's GPU-only switches, and which device a rank uses."""

import pytest

from distrib.config import load_config
from distrib.parallel.engine import deepspeed_config
from distrib.parallel.topology import device_index
from tests.helpers import TINY


@pytest.mark.parametrize(("local_rank", "visible", "index"), [
    (0, 8, 0), (5, 8, 5),      # one process per device, every device visible
    (5, 1, 0), (3, 1, 0),      # srun --gpus-per-task=1: each task sees its own device as 0
    (3, 2, 1),                 # two devices per task-group
    (2, 0, 2),                 # an accelerator that counts nothing: the local rank as before
])
def test_device_index(local_rank, visible, index):
    assert device_index(local_rank, visible) == index


def _zero(accelerator, *overrides):
    cfg = load_config(TINY, ["parallel.zero_stage=3", "parallel.offload_optimizer=true",
                             "parallel.offload_params=true", *overrides])
    return deepspeed_config(cfg, 2, accelerator=accelerator)["zero_optimization"]


def test_on_a_gpu_communication_overlaps_offload_is_pinned_and_small_parameters_persist():
    zero = _zero("cuda")
    assert zero["overlap_comm"] is True
    assert zero["offload_optimizer"]["pin_memory"] is True and zero["offload_param"]["pin_memory"] is True
    assert "stage3_param_persistence_threshold" not in zero  # DeepSpeed's own default


def test_on_the_cpu_all_three_are_off():
    zero = _zero("cpu")
    assert zero["overlap_comm"] is False
    assert zero["offload_optimizer"]["pin_memory"] is False and zero["offload_param"]["pin_memory"] is False
    assert zero["stage3_param_persistence_threshold"] == 0


def test_the_users_deepspeed_section_wins():
    zero = _zero("cuda", "deepspeed.zero_optimization.overlap_comm=false",
                 "deepspeed.zero_optimization.stage3_param_persistence_threshold=1000")
    assert zero["overlap_comm"] is False and zero["stage3_param_persistence_threshold"] == 1000
