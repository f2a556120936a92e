"""Per-rank memory of the reference workload at ZeRO 0, 1, 2 and 3 on 2 processes, measured from the engines.

    python benchmarks/memory.py [--steps 3] [--nproc 2]

Trains ``configs/bench/reference.yaml`` a few steps at each stage and reads ``layout.json``, which every
rank fills in after the first optimizer step from what its engine holds: parameter bytes (its ZeRO-3
shard, or the whole model below ZeRO-3), optimizer-state bytes (Adam's moments and the fp32 master
weights, each tensor counted once) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "configs" / "bench" / "reference.yaml"
MIB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-memory"))
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    figures = {}
    print(f"{'ZeRO':>4} {'rank':>4} {'params MiB':>11} {'optimizer MiB':>14} {'sum MiB':>8} {'peak RSS MiB':>13}")
    for stage in (0, 1, 2, 3):
        out = Path(args.work) / f"zero{stage}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, "-m", "distrib", "pretrain", str(REFERENCE), f"output_dir={out}",
               f"parallel.zero_stage={stage}", f"train.max_steps={args.steps}", "train.warmup_steps=0", "--nproc-per-node", str(args.nproc)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        layout = json.loads((out / "layout.json").read_text())
        ranks = []
        for r in layout["ranks"]:
            held = r["param_bytes"] + r["optimizer_state_bytes"]
            ranks.append({"rank": r["rank"], "param_bytes": r["param_bytes"],
                          "optimizer_state_bytes": r["optimizer_state_bytes"], "model_and_optimizer_bytes": held,
                          "peak_rss_bytes": r["peak_rss_bytes"]})
            print(f"{stage:>4} {r['rank']:>4} {r['param_bytes'] / MIB:>11.1f} {r['optimizer_state_bytes'] / MIB:>14.1f} "
                  f"{held / MIB:>8.1f} {r['peak_rss_bytes'] / MIB:>13.0f}")
        figures[stage] = ranks
    worst = {s: max(r["model_and_optimizer_bytes"] for r in ranks) for s, ranks in figures.items()}
    ratio = worst[3] / worst[0]
    print(f"\nZeRO-3 / ZeRO-0 model + optimizer bytes per rank: {ratio:.3f} (target <= 0.55 on 2 processes)")
    if args.out:
        Path(args.out).write_text(json.dumps({"stages": figures, "zero3_over_zero0": ratio}, indent=1))


if __name__ == "__main__":
    main()
