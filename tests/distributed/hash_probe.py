"""Start a fine-tune's Trainer (no step) and report how often this rank opened the base's weights.

    torchrun --nproc-per-node 2 tests/distributed/hash_probe.py REPORT_DIR CONFIG key=value ...

Each rank writes REPORT_DIR/reads-<rank>.json: how many times Python opened one of the base's
``*.safetensors`` files for reading while the Trainer started. Hashing reads them with ``open``; loading the
weights maps them through safetensors' own reader, which ``open`` does not see.
"""

import builtins
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distrib.checkpoint.base import resolve_base, with_base  # noqa: E402
from distrib.config import load_config  # noqa: E402
from distrib.stages import stage_class  # noqa: E402
from distrib.parallel.topology import Topology  # noqa: E402
from distrib.train.trainer import Trainer  # noqa: E402
from distrib.launch.env import detect  # noqa: E402


def count_reads(paths: set[str]) -> list[int]:
    """Count the opens for reading of ``paths`` from now on, in this process; returns the (live) counter."""
    count, real_open = [0], builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        if "w" not in mode and "a" not in mode and isinstance(file, (str, Path)) and str(Path(file).resolve()) in paths:
            count[0] += 1
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = counting_open  # io.open is what Path.open calls
    return count


def main() -> None:
    report_dir, config, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    cfg = with_base(cfg, resolve_base(cfg))
    reads = count_reads({str(p.resolve()) for p in Path(cfg.model.pretrained).glob("*.safetensors")})
    detect().export()
    topo = Topology.init()
    Trainer(cfg, topo, stage_class("finetune")())
    (Path(report_dir) / f"reads-{topo.rank}.json").write_text(json.dumps(reads[0]))
    topo.shutdown()


if __name__ == "__main__":
    main()
