"""``distrib export``: a Hugging Face directory (and a fine-tune's ``adapter/``) from a checkpoint."""

from __future__ import annotations

import argparse

from distrib.checkpoint import resolve_checkpoint
from distrib.checkpoint.export import export_checkpoint
from distrib.config import file_size


def command(args: argparse.Namespace, cfg: None = None) -> int:
    if args.max_shard_size is not None:
        file_size(args.max_shard_size, "--max-shard-size")
    print(export_checkpoint(resolve_checkpoint(args.checkpoint), args.out_dir, max_shard_size=args.max_shard_size))
    return 0
