"""Where a parameter's value comes from, one tensor (or one part of a tensor) at a time.

A model built on the meta device (:func:`distrib.model.deferred_weights`) carries a :class:`WeightSource`: each
parameter's initial value (:func:`initial_value`, seeded by its name alone) or its tensor in the pretrained
safetensors files. Whoever fills the model asks for a whole value or for a :data:`Part` of it, so that a
process holding only slices of the model never reads or draws more than it needs at once.
"""

from __future__ import annotations

import json
import math
import mmap
import zlib
from pathlib import Path

import torch

from distrib.config import ModelConfig

#: Attribute of a model built on the meta device: its :class:`WeightSource`.
WEIGHT_SOURCE_ATTR = "distrib_weight_source"

#: A part of a weight's whole value: ``(dim, ((start, stop), ...))``, the ranges of dimension ``dim`` (in the
#: model's layout) it is made of, concatenated in that order.
Part = tuple[int, tuple[tuple[int, int], ...]]


def safetensors_keys(path: Path, names: list[str], prefix: str,
                     partial: bool = False) -> dict[str, tuple[Path, str]] | None:
    """Where each parameter of ``names`` is stored: ``{name: (file, key)}``, or ``None`` if one is missing
    (with ``partial``, the missing ones are left out instead) or there are no safetensors files.

    Keys are the parameter names, or (older checkpoints of a bare base model) the names without
    ``<prefix>.``.
    """
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = {key: path / f for key, f in json.loads(index.read_text())["weight_map"].items()}
    elif (path / "model.safetensors").is_file():
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            files = dict.fromkeys(f.keys(), path / "model.safetensors")
    else:
        return None
    found = {}
    for name in names:
        bare = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None
        key = name if name in files else bare if bare in files else None
        if key is not None:
            found[name] = (files[key], key)
        elif not partial:
            return None
    return found


class WeightSource:
    """The value of each parameter of a model built on the meta device, one tensor (or one part) at a time.

    Bitwise what :func:`distrib.model.build_model` gives the parameter when it builds the model whole: the
    name-seeded initial value (:func:`initial_value`) cast to the model's dtype, or the tensor read from the
    pretrained safetensors file cast to it.
    """

    def __init__(self, cfg: ModelConfig, seed: int, dtype: torch.dtype,
                 files: dict[str, tuple[Path, str]] | None = None):
        self.cfg, self.seed, self.dtype, self.files = cfg, seed, dtype, files

    def __contains__(self, name: str) -> bool:
        return self.files is None or name in self.files

    def tensor(self, name: str, shape: tuple[int, ...], transposed: bool = False,
               part: Part | None = None) -> torch.Tensor:
        """The whole value of parameter ``name`` (of ``shape``, in the Hugging Face layout; its transpose, of
        the reversed shape, with ``transposed``: GPT-2's ``Conv1D`` weights trained as ``nn.Linear``), or with
        ``part`` only that part of it (:data:`Part`: ranges of one dimension, in the model's layout,
        concatenated).

        A whole value is in memory of its own (:func:`_unpooled_empty`): it lives only until it is split, and
        freed it goes back to the system instead of leaving a hole between the shards that stay. A part is
        read alone from a pretrained file (:meth:`_read_part`); an initial value is drawn whole (its
        generator's sequence covers the whole tensor) and cut.
        """
        if part is not None:
            if self.files is None:
                dim, ranges = part
                value = self.tensor(name, shape, transposed)
                return torch.cat([value.narrow(dim, start, stop - start) for start, stop in ranges], dim)
            return self._read_part(name, shape, transposed, part)
        if self.files is None:
            value = initial_value(name, shape, self.cfg, self.seed, out=_unpooled_empty(shape, torch.float32))
        else:
            from safetensors import safe_open

            file, key = self.files[name]
            with safe_open(str(file), framework="pt") as f:
                value = f.get_tensor(key)
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{file}: {key} has shape {tuple(value.shape)}, the model expects {tuple(shape)}")
        if transposed:
            value = value.t()
        if value.dtype == self.dtype and self.files is None and not transposed:
            return value
        return _unpooled_empty(tuple(value.shape), self.dtype).copy_(value)

    def _read_part(self, name: str, shape: tuple[int, ...], transposed: bool, part: Part) -> torch.Tensor:
        """``part`` of the pretrained tensor ``name``, reading from its file only the ranges it is made of.

        ``safetensors``' ``pread`` backend (0.8 and later) reads exactly a slice's bytes into a tensor of
        its own; the default backend maps the file, and a slice is then a view of the mapping, copied
        out here (only the pages it spans are read). Slicing and casting commute, and so do slicing and
        transposing with the dimension mapped, so the part is bitwise the whole value's.
        """
        from safetensors import safe_open

        file, key = self.files[name]
        dim, ranges = part
        file_dim = len(shape) - 1 - dim if transposed else dim
        try:
            opened, owned = safe_open(str(file), framework="pt", backend="pread"), True
        except TypeError:  # a safetensors without backends
            opened, owned = safe_open(str(file), framework="pt"), False
        with opened as f:
            sliced = f.get_slice(key)
            if tuple(sliced.get_shape()) != tuple(shape):
                raise ValueError(f"{file}: {key} has shape {tuple(sliced.get_shape())}, the model expects "
                                 f"{tuple(shape)}")
            pieces = [sliced[(slice(None),) * file_dim + (slice(start, stop),)] for start, stop in ranges]
        value = pieces[0] if len(pieces) == 1 else torch.cat(pieces, file_dim)
        owned = owned or len(pieces) > 1
        del pieces
        if transposed:
            value = value.t()
        if owned and value.dtype == self.dtype and value.is_contiguous():
            return value
        return torch.empty(tuple(value.shape), dtype=self.dtype).copy_(value)


def _unpooled_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in an anonymous memory mapping of its own, unmapped when the tensor is freed.

    glibc's ``malloc`` puts blocks below an adaptive threshold (up to 32 MiB) in its heap; a short-lived
    whole tensor placed there between shards that stay leaves a hole the system never gets back. Filling
    a 1.1 B-parameter model split in two that way peaked 300-900 MB above its shards.
    """
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, n), dtype=dtype).view(shape)


def initial_value(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 initial value of parameter ``name``, from a generator seeded by ``seed`` and the name alone.

    Same distributions as transformers' ``_init_weights``: matrices N(0, init_std) (GPT-2's residual
    projections scaled by 1/sqrt(2 layers)), biases 0, norm weights 1. Written into ``out`` (contiguous
    fp32 of ``shape``) when given.
    """
    out = torch.empty(shape, dtype=torch.float32) if out is None else out
    if len(shape) == 1:
        return out.fill_(0.0 if name.endswith("bias") else 1.0)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std = cfg.init_std
    if cfg.arch == "gpt2" and name.endswith("c_proj.weight"):
        std /= math.sqrt(2 * cfg.num_layers)
    return out.normal_(0.0, std, generator=gen)
