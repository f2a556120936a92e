"""distrib.parallel.deepspeed_compat: every private DeepSpeed name distrib uses is still in the installed DeepSpeed,
with the parameters distrib calls it with, and still behaves as distrib relies on. A DeepSpeed release that
renames, removes or re-signs one fails here with a message naming it and what changed."""

from __future__ import annotations

import importlib
import inspect
import pickle

import pytest
import torch
from deepspeed import comm as dist
from deepspeed.module_inject.layers import (LinearAllreduce, LinearLayer, SubParamLinearAllreduce,
                                            SubParamLinearLayer)
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import groups

from distrib.parallel import deepspeed_compat

#: Private functions distrib calls (module, qualified name) -> the parameter names it calls them with.
CALLED = {
    ("deepspeed.runtime.engine", "DeepSpeedEngine._apply_autotp_partitioning"): ("self", "model", "tp_config"),
    ("deepspeed.module_inject.layers", "LinearLayer._tp_partition"): ("self", "params_list"),
    ("deepspeed.module_inject.layers", "LinearAllreduce._tp_partition"): ("self", "params_list"),
    ("deepspeed.module_inject.layers", "SubParamLinearLayer._tp_partition"): ("self", "params_list"),
    ("deepspeed.module_inject.layers", "SubParamLinearAllreduce._tp_partition"): ("self", "params_list"),
    ("deepspeed.checkpoint.ds_to_universal", "_check_for_required_state"): ("ds_checkpoint",),
    ("deepspeed.checkpoint.ds_to_universal", "_create_checkpoint_paths"):
        ("base_folder", "iteration", "tp_degree", "pp_degree"),
    ("deepspeed.checkpoint.ds_to_universal", "extract_zero_shards"): ("dir", "ds_checkpoint", "indices_3D"),
    ("deepspeed.checkpoint.ds_to_universal", "_aggregate_autoep_zero12_metadata"): ("model_state_metadata",),
    ("deepspeed.checkpoint.ds_to_universal", "_group_per_tp_shapes"): ("slice_shapes_by_tp", "pp_degree", "tp_degree"),
    ("deepspeed.checkpoint.ds_to_universal", "merge_tp_slices"):
        ("uc_info", "dir", "slice_dir", "tp_degree", "name_and_shapes"),
    ("deepspeed.checkpoint.ds_to_universal", "_save_optimizer_state"): ("args", "ds_checkpoint"),
    ("deepspeed.checkpoint.ds_to_universal", "_get_optim_files"): ("checkpoint_dir",),
    ("deepspeed.checkpoint.ds_to_universal", "_get_zero_stage"): ("optim_files",),
}
#: Private module globals distrib sets: DeepSpeed's process groups.
GROUP_GLOBALS = ("_WORLD_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP")
#: Private attributes of AutoTP's layers that :func:`deepspeed_compat.shard_part` reads, per layer class.
LAYER_ATTRIBUTES = {
    LinearLayer: ("tp_index", "_partition_sizes"),
    LinearAllreduce: ("tp_index", "_partition_sizes"),
    SubParamLinearLayer: ("tp_index", "partition_dim", "_subparam_sizes", "_subparam_shard_widths", "_logical_shape",
                          "_output_shape", "_bias_partition_dim"),
    SubParamLinearAllreduce: ("tp_index", "partition_dim", "_subparam_sizes", "_subparam_shard_widths",
                              "_logical_shape"),
}
TP = 2


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        if not hasattr(obj, part):
            pytest.fail(f"{module}.{qualname} is gone from DeepSpeed: distrib.parallel.deepspeed_compat uses it")
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("where", list(CALLED), ids=lambda w: f"{w[0]}.{w[1]}")
def test_each_private_function_keeps_the_parameters_we_call_it_with(where):
    module, qualname = where
    found = tuple(inspect.signature(_resolve(module, qualname)).parameters)
    assert found == CALLED[where], (f"{module}.{qualname} now takes {found}; distrib.parallel.deepspeed_compat calls "
                                    f"it with {CALLED[where]}")


def test_the_spread_converter_finds_every_step_it_runs():
    assert set(deepspeed_compat.CONVERTER_STEPS) == {name for module, name in CALLED
                                                     if module == "deepspeed.checkpoint.ds_to_universal"}
    assert deepspeed_compat.converter_steps_available()


# -- the types of DeepSpeed's checkpoint files ---------------------------------------------------------


@pytest.mark.parametrize("where", deepspeed_compat.CHECKPOINT_TYPES, ids=lambda w: f"{w[0]}.{w[1]}")
def test_each_type_allowed_in_weights_only_loads_is_still_where_we_import_it(where):
    module, name = where
    found = getattr(importlib.import_module(module), name, None)
    if not isinstance(found, type):
        pytest.fail(f"{module}.{name} is gone from DeepSpeed: distrib.parallel.deepspeed_compat.CHECKPOINT_TYPES "
                    "allows it in weights-only loads of checkpoints; find where it moved and name it there")


def test_the_types_deepspeed_pickles_into_its_checkpoints_load_weights_only(tmp_path):
    """A ZeRO-1/2 optimizer shard holds DeepSpeed's loss scaler, ZeRO stage and fragment addresses: a weights-only
    load builds them once told they are allowed, and refuses them otherwise."""
    loss_scaler, dynamic, stage, fragment = deepspeed_compat.checkpoint_types()
    state = {"loss_scaler": loss_scaler(1.0), "zero_stage": stage(2),
             "dynamic": dynamic(init_scale=8.0, scale_window=1000, min_scale=1, delayed_shift=2,
                                consecutive_hysteresis=False),
             "param_slice_mappings": {"w": fragment(numel=4, start=0)}}
    torch.save(state, tmp_path / "optim_states.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "optim_states.pt", weights_only=True)
    with torch.serialization.safe_globals(deepspeed_compat.checkpoint_types()):
        loaded = torch.load(tmp_path / "optim_states.pt", weights_only=True)
    assert loaded["zero_stage"] == stage(2) and loaded["param_slice_mappings"]["w"] == fragment(numel=4, start=0)
    assert loaded["dynamic"].cur_scale == 8.0


# -- process groups ------------------------------------------------------------------------------


@pytest.fixture
def _own_groups(monkeypatch):
    """DeepSpeed's group globals, restored after the test."""
    for name in GROUP_GLOBALS:
        assert hasattr(groups, name), (f"deepspeed.utils.groups.{name} is gone: "
                                       "distrib.parallel.deepspeed_compat.share_process_groups sets it")
        monkeypatch.setattr(groups, name, getattr(groups, name))


def test_with_tp_1_our_dp_group_is_the_world_clone_zero_reduces_over(_own_groups, monkeypatch):
    ours = object()
    deepspeed_compat.share_process_groups(1, None, ours)
    monkeypatch.setattr(groups.dist, "is_initialized", lambda: True)
    assert groups._clone_world_group() is ours, "deepspeed.utils.groups._clone_world_group no longer returns _WORLD_GROUP"


def test_with_tp_2_deepspeed_keeps_our_groups_instead_of_building_its_mesh(_own_groups, monkeypatch):
    tp_group, dp_group = object(), object()
    deepspeed_compat.share_process_groups(TP, tp_group, dp_group)
    monkeypatch.setattr(groups.dist, "get_world_size", lambda *a, **k: pytest.fail("built a mesh of its own"))
    groups._init_tp_mesh_device(tensor_model_parallel_size=TP)
    assert (groups._TENSOR_MODEL_PARALLEL_GROUP, groups._MODEL_PARALLEL_GROUP, groups._DATA_PARALLEL_GROUP) == \
        (tp_group, tp_group, dp_group), "deepspeed.utils.groups._init_tp_mesh_device replaced the groups we set"


# -- AutoTP --------------------------------------------------------------------------------------


def test_the_split_hook_acts_on_its_model_alone_and_is_removed_after(monkeypatch):
    calls = []
    monkeypatch.setattr(DeepSpeedEngine, "_apply_autotp_partitioning",
                        lambda engine, model, tp_config: calls.append(("split", model)) or "sources")
    stub = DeepSpeedEngine._apply_autotp_partitioning
    ours, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with deepspeed_compat.after_autotp_split(ours, lambda: calls.append(("then", ours))):
        assert DeepSpeedEngine._apply_autotp_partitioning(None, other, None) == "sources"
        assert DeepSpeedEngine._apply_autotp_partitioning(None, ours, None) == "sources"
    assert calls == [("split", other), ("split", ours), ("then", ours)]
    assert DeepSpeedEngine._apply_autotp_partitioning is stub


class _Rank:
    """Stands for rank ``index`` of a tensor-parallel group of ``TP`` (no process group needed)."""

    def __init__(self, index: int):
        self.index = index


@pytest.fixture
def _tp_groups(monkeypatch):
    size, rank = dist.get_world_size, dist.get_rank
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: TP if isinstance(group, _Rank) else size(group))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: group.index if isinstance(group, _Rank) else rank(group))


#: Each AutoTP layer class, built over an ``nn.Linear(n_in, n_out)`` with these arguments.
LAYERS = {
    LinearLayer: ((8, 4), {}),
    LinearAllreduce: ((8, 4), {}),
    SubParamLinearLayer: ((4, 12), {"shape": (3, -1), "partition_dim": 0}),
    SubParamLinearAllreduce: ((12, 4), {"shape": (-1, (4, 4, 4)), "partition_dim": 1}),
}


@pytest.mark.parametrize("cls", list(LAYERS), ids=lambda c: c.__name__)
def test_the_part_read_off_each_autotp_layer_is_the_slice_it_keeps(cls, _tp_groups):
    (n_in, n_out), kwargs = LAYERS[cls]
    for rank in range(TP):
        torch.manual_seed(0)
        linear = torch.nn.Linear(n_in, n_out)
        whole = linear.weight.detach().clone()
        layer = cls(linear, _Rank(rank), name="proj", **kwargs)
        missing = [a for a in LAYER_ATTRIBUTES[cls] if not hasattr(layer, a)]
        assert not missing, f"deepspeed.module_inject.layers.{cls.__name__} no longer has {missing}"
        assert getattr(layer.weight._tp_partition, "__self__", None) is layer, \
            f"{cls.__name__}: a weight's _tp_partition is no longer its layer's bound method"
        part = deepspeed_compat.shard_part(layer.weight, tuple(whole.shape))
        assert part is not None, f"{cls.__name__}: shard_part no longer reads this rank's part of its weight"
        dim, ranges = part
        assert torch.equal(torch.cat([whole.narrow(dim, a, b - a) for a, b in ranges], dim), layer.weight), cls


def test_a_parameter_autotp_did_not_split_keeps_its_value():
    param = torch.nn.Parameter(torch.arange(4.0))
    deepspeed_compat.autotp_partition(param)
    assert torch.equal(param, torch.arange(4.0))
