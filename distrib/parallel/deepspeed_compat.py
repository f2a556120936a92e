"""Every private name of DeepSpeed that distrib uses, each behind a function of this module.

DeepSpeed has no public API for five things distrib needs: handing it our process groups, acting between
AutoTP's split of a model and the engine's first use of its parameters, reading which part of a parameter an
AutoTP layer kept, running the steps of its universal-checkpoint converter on several ranks, and naming the
types its checkpoint files hold (for weights-only loads). Nothing
else in the package names a private DeepSpeed attribute; ``tests/unit/parallel/test_deepspeed_compat.py`` checks that
each one used here still exists with the parameters it is called with, so that a DeepSpeed release that
changes one fails that test, naming it, instead of a run. DeepSpeed is imported only when a function is
called: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import importlib
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distrib.model import Part

# -- process groups ----------------------------------------------------------------------------


def share_process_groups(tp: int, tp_group, dp_group) -> None:
    """Make ``tp_group`` and ``dp_group`` the groups DeepSpeed communicates over, instead of its own.

    With tp = 1 ZeRO reduces over a clone of the world group that DeepSpeed makes on first use
    (``groups._clone_world_group`` returns ``groups._WORLD_GROUP`` once set): our dp group is that clone. With
    tp > 1, ``groups._init_tp_mesh_device`` returns early once the tp group is set; the layout it would build,
    a (dp, tp) mesh with tp fastest, is the same as ours.
    """
    from deepspeed.utils import groups

    if tp == 1:
        groups._WORLD_GROUP = dp_group
        return
    groups._TENSOR_MODEL_PARALLEL_GROUP = tp_group
    groups._MODEL_PARALLEL_GROUP = tp_group
    groups._DATA_PARALLEL_GROUP = dp_group


# -- AutoTP ------------------------------------------------------------------------------------


@contextlib.contextmanager
def after_autotp_split(model: torch.nn.Module, then: Callable[[], None]):
    """Within, an engine built over ``model`` calls ``then()`` right after AutoTP splits ``model``.

    DeepSpeed offers no hook between AutoTP's split and the engine's first use of the parameters (moving
    them to the device, flattening them for ZeRO, the optimizer's fp32 copies). The split runs inside the
    engine's constructor, which ``deepspeed.initialize`` calls itself: there is no engine instance to patch
    beforehand, and having it build a subclass would mean replacing ``deepspeed.DeepSpeedEngine``, the same
    process-wide change. So ``DeepSpeedEngine._apply_autotp_partitioning`` is wrapped at class level for the
    duration of the block only, and the wrapper acts on ``model`` alone: another engine built meanwhile is
    split as usual.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    split = DeepSpeedEngine._apply_autotp_partitioning

    def split_then(engine, module, tp_config):
        out = split(engine, module, tp_config)
        if module is model:
            then()
        return out

    DeepSpeedEngine._apply_autotp_partitioning = split_then
    try:
        yield
    finally:
        DeepSpeedEngine._apply_autotp_partitioning = split


def autotp_partition(param: torch.nn.Parameter) -> None:
    """Cut the whole value ``param`` holds as its AutoTP layer cuts it (the layer's own partition function,
    ``_tp_partition``); a parameter AutoTP did not split keeps its whole value."""
    if hasattr(param, "_tp_partition"):
        param._tp_partition([param])


def shard_part(param: torch.nn.Parameter, whole: tuple[int, ...]) -> Part | None:
    """The ranges of its whole value (of shape ``whole``) that AutoTP leaves of meta ``param`` on this rank.

    Known for the layers AutoTP trains Llama and GPT-2 with, read off the sizes each layer froze when it
    was built (uneven splits included): ``LinearLayer`` keeps one range of rows of its weight and bias
    (``_partition_sizes``), ``LinearAllreduce`` one range of columns of its weight (its bias is not split),
    ``SubParamLinearLayer``/``SubParamLinearAllreduce`` one range of each sub-parameter along their
    partition dimension (``_subparam_shard_widths``: GPT-2's ``c_attn`` as ``[q; k; v]``). A subclass that
    partitions differently (its own ``_tp_partition``), a layout with more dimensions, or a description
    that does not give the shape AutoTP left the parameter in gives ``None``: the whole value is then cut
    by the layer's own partition function (:func:`autotp_partition`).
    """
    from deepspeed.module_inject.layers import (LinearAllreduce, LinearLayer, SubParamLinearAllreduce,
                                                SubParamLinearLayer)

    layer = getattr(getattr(param, "_tp_partition", None), "__self__", None)
    if layer is None or len(whole) not in (1, 2):
        return None
    cls, rank = type(layer), layer.tp_index
    is_weight, is_bias = param is layer.weight, param is getattr(layer, "bias", None)

    def partitions_as(base: type, *methods: str) -> bool:
        return isinstance(layer, base) and all(getattr(cls, m) is getattr(base, m) for m in methods)

    part = None
    if partitions_as(LinearLayer, "_tp_partition", "uneven_partition") and (is_weight or is_bias):
        part = (0, _ranges((whole[0],), [layer._partition_sizes], rank))
    elif partitions_as(LinearAllreduce, "_tp_partition", "uneven_partition") and is_weight and len(whole) == 2:
        part = (1, _ranges((whole[1],), [layer._partition_sizes], rank))
    elif any(partitions_as(base, "_tp_partition") for base in (SubParamLinearLayer, SubParamLinearAllreduce)):
        if is_weight and tuple(layer._logical_shape) == tuple(whole):
            dim = layer.partition_dim
        elif is_bias and isinstance(layer, SubParamLinearLayer) and layer._bias_partition_dim == 0 \
                and tuple(layer._output_shape) == tuple(whole):
            dim = 0
        else:
            return None
        sizes = layer._subparam_sizes or (whole[dim],)
        part = (dim, _ranges(sizes, layer._subparam_shard_widths, rank))
    if part is None or part[0] >= len(whole) or not part[1]:
        return None
    dim, ranges = part
    shape = list(whole)
    shape[dim] = sum(stop - start for start, stop in ranges)
    return part if tuple(shape) == tuple(param.shape) else None


def _ranges(sizes, widths, rank: int) -> tuple[tuple[int, int], ...]:
    """Rank ``rank``'s range of each consecutive block of ``sizes`` (block ``i`` split per rank into ``widths[i]``),
    empty ones left out; none if the widths do not tile the blocks."""
    if len(sizes) != len(widths):
        return ()
    out, offset = [], 0
    for size, per_rank in zip(sizes, widths):
        if sum(per_rank) != size:
            return ()
        start = offset + sum(per_rank[:rank])
        if per_rank[rank]:
            out.append((start, start + per_rank[rank]))
        offset += size
    return tuple(out)


# -- the universal-checkpoint converter (deepspeed.checkpoint.ds_to_universal) ------------------

#: The converter's steps that :func:`distrib.checkpoint._convert_spread` runs one by one; its own ``main``
#: runs the same steps in one process.
CONVERTER_STEPS = ("_check_for_required_state", "_create_checkpoint_paths", "extract_zero_shards",
                   "_aggregate_autoep_zero12_metadata", "_group_per_tp_shapes", "merge_tp_slices",
                   "_save_optimizer_state", "_get_optim_files", "_get_zero_stage")


def _converter():
    from deepspeed.checkpoint import ds_to_universal

    return ds_to_universal


def converter_steps_available() -> bool:
    """Whether this DeepSpeed's converter has every step of :data:`CONVERTER_STEPS` (else run its ``main``)."""
    dsu = _converter()
    return all(hasattr(dsu, step) for step in CONVERTER_STEPS)


def zero_stage(path: Path) -> int | None:
    """The ZeRO stage of checkpoint directory ``path``, as the converter reads it; ``None`` without optimizer files."""
    dsu = _converter()
    optim_files = dsu._get_optim_files(str(path))
    return dsu._get_zero_stage(optim_files) if optim_files else None


def check_required_state(ds) -> None:
    """The converter's check that the checkpoint ``ds`` (a ``DeepSpeedCheckpoint``) can be converted."""
    _converter()._check_for_required_state(ds)


def create_checkpoint_paths(out: Path, ds) -> None:
    """Make the converter's output folders under ``out`` for checkpoint ``ds``."""
    _converter()._create_checkpoint_paths(str(out), ds.get_iteration(), ds.tp_degree, ds.pp_degree)


def extract_zero_shards(temp_dir: Path, ds, shard: tuple[int, int, int]) -> None:
    """Write the fragments of every parameter held by ZeRO shard ``shard`` (pp, tp, dp indices) of ``ds``."""
    _converter().extract_zero_shards(str(temp_dir), ds, shard)


def tp_slice_shapes(ds) -> list:
    """``(name, shapes)`` of every parameter of ``ds`` to merge, sorted: the converter's merge work items."""
    dsu = _converter()
    slice_shapes_by_tp, _, _ = dsu._aggregate_autoep_zero12_metadata(ds.model_state_metadata)
    return sorted(dsu._group_per_tp_shapes(slice_shapes_by_tp, ds.pp_degree, ds.tp_degree).items())


def merge_tp_slices(info: dict, zero_dir: Path, temp_dir: Path, ds, item) -> set:
    """Join one parameter's fragments and slices (work item ``item``) into whole tensors under ``zero_dir``.

    Returns the merge patterns of ``info`` (the checkpoint's universal-checkpoint info) that matched nothing.
    """
    return _converter().merge_tp_slices(info, str(zero_dir), str(temp_dir), ds.tp_degree, item)


def save_optimizer_state(out: Path, ds) -> None:
    """Write the optimizer's common state of ``ds`` to the converter's output folder ``out``."""
    _converter()._save_optimizer_state(Namespace(output_folder=str(out)), ds)


#: What DeepSpeed's checkpoint files hold besides tensors, containers and builtins, as (module, name): plain data
#: of its own, which a weights-only load must be told it may build. Its optimizer shards (``*optim_states.pt``)
#: and a universal checkpoint's ``optimizer_state.pt`` keep the loss scaler (fp16's dynamic one on GPUs), the
#: ZeRO stage as an enum and, for ZeRO-1/2, the address of each parameter's fragment in the flat partitions; the
#: model-states files hold tensors and builtins only. Found by listing the globals in the pickles
#: (``torch.serialization.get_unsafe_globals_in_checkpoint``) of real checkpoints of ZeRO-0 to 3 in bf16 and
#: fp32, and of their universal conversion.
CHECKPOINT_TYPES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def checkpoint_types() -> list[type]:
    """The classes of :data:`CHECKPOINT_TYPES`, for ``torch.serialization.safe_globals``."""
    return [getattr(importlib.import_module(module), name) for module, name in CHECKPOINT_TYPES]
