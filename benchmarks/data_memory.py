"""Peak memory of data preparation and of the training-side reader, on a corpus and on 8 times it.

    nice -n 15 .venv/bin/python benchmarks/data_memory.py --workdir DIR [--copies 8] [--batches 200]

Builds two corpora of ``.txt`` files under ``DIR``: ``1x``, this Python's standard-library sources
(about 12 MB, test suites and installed packages left out), and ``8x``, the same text eight times,
each copy's paragraphs prefixed with a line naming the copy, so that no two documents are equal.
A byte-level BPE tokenizer is trained once on ``1x`` (that run's peak is reported too, apart: BPE
training holds its statistics of up to ``_TOKENIZER_TRAIN_CHARS`` characters, a bounded cost), and
both corpora are then prepared with it (``data.tokenizer=``), each in a fresh process with its own
cache directory, by ``distrib prepare-data``'s function (:func:`distrib.data.prepare_data`).

Reported per run: the peak resident set of the process (its ``VmHWM``, read from ``/proc`` every
20 ms: a child's ``ru_maxrss`` would carry this process's peak across ``exec``; the last 20 ms before
it exits are not seen), the peaks of its anonymous and file-backed parts sampled from ``/proc`` as often
(memory-mapped Arrow files count as resident while their pages are, but the kernel can drop them),
the tokens, and the tokenize-and-pack throughput (tokens over the seconds ``prepare_data`` took).
Then, for each cache, a fresh process reads ``--batches`` micro-batches through what training
uses (:class:`~distrib.data.GlobalBatchSampler` and :func:`~distrib.data.collate`) and its peak
is reported the same way. Acceptance: the 8x preparation peak is at most 1.25 times the 1x peak.

``--pythonpath`` runs the children on another checkout of the code (to compare with an older one).
Writes ``DIR/data_memory.json``. About a minute and a half on one core; the read figures are the
training-side check that memory stays flat (within 10%), kept here because building an 8x cache
takes longer than a unit test may.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Standard-library directories left out of the corpus, as the built-in ``code`` corpus leaves them out.
_EXCLUDED = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}

_PREPARE = """
import json, sys, time
from distrib.config import DataConfig
from distrib.data import prepare_data
cfg = DataConfig(**json.loads(sys.argv[1]))
start = time.perf_counter()
prepared = prepare_data(cfg, seed=0)
seconds = time.perf_counter() - start
meta = json.loads((prepared.cache_path / "meta.json").read_text())
print(json.dumps({"seconds": seconds, "tokens": sum(meta["tokens"].values()), "blocks": meta["blocks"],
                  "documents": meta["documents"], "cache": str(prepared.cache_path)}))
"""

_READ = """
import json, sys
from distrib.config import DataConfig
from distrib.data import GlobalBatchSampler, collate, prepare_data
cfg = DataConfig(**json.loads(sys.argv[1]))
batches = int(sys.argv[2])
prepared = prepare_data(cfg, seed=0)  # a cache hit
sampler = GlobalBatchSampler(len(prepared.train), 64, 8, 2, 0, seed=0)  # micro-batch 8, 4 per step, dp=2
read = 0
for step in range(batches // sampler.accum_steps):
    for indices in sampler.micro_batches(step):
        read += int(collate(prepared.train, indices)["input_ids"].sum() >= 0)
print(json.dumps({"batches": read, "blocks": len(prepared.train)}))
"""


def write_corpus(directory: Path, copies: int) -> int:
    """``copies`` text files of the library's sources (paragraphs prefixed per copy after the first); bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    root = sysconfig.get_paths()["stdlib"]
    sources = []
    for path, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED and not d.startswith("config-"))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                try:
                    sources.append(Path(path, name).read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    continue
    text = "\n\n".join(sources)
    total = 0
    for copy in range(copies):
        body = text if copy == 0 else "\n\n".join(f"# copy {copy}\n{p}" for p in text.split("\n\n"))
        path = directory / f"part-{copy:02d}.txt"
        path.write_text(body, encoding="utf-8")
        total += path.stat().st_size
    return total


def measure(code: str, args: list[str], pythonpath: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh Python; its JSON result plus its peak RSS (MiB) and sampled anon/file peaks."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=cwd, env=env, text=True)
    # VmHWM, not wait4's ru_maxrss: that is kept across exec, so it would be this process's own peak
    # whenever that is the higher. The child reports nothing itself: it may run another checkout.
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]))
            except (OSError, ValueError):
                pass
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.stdout.read(), proc.stderr.read()  # small, so reading both in turn cannot block
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_rss_mib=peaks["VmHWM"] / 1024, peak_anon_mib=peaks["RssAnon"] / 1024,
                  peak_file_mib=peaks["RssFile"] / 1024)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--num-proc", type=int, default=1, help="data.num_proc of the preparing runs")
    ap.add_argument("--pythonpath", default=str(ROOT), help="the checkout whose distrib the children import")
    args = ap.parse_args()
    work = args.workdir.resolve()
    sizes = {}
    for name, copies in (("1x", 1), (f"{args.copies}x", args.copies)):
        if not (work / name).is_dir():
            sizes[name] = write_corpus(work / name, copies)
        else:
            sizes[name] = sum(p.stat().st_size for p in (work / name).glob("*.txt"))
    common = {"source": "files", "seq_len": args.seq_len, "vocab_size": args.vocab_size, "num_proc": args.num_proc}

    def cfg(corpus: str, cache: str, **extra) -> str:
        files = sorted(str(p) for p in (work / corpus).glob("*.txt"))
        return json.dumps({**common, "train_files": files, "cache_dir": str(work / "caches" / cache), **extra})

    report = {"corpus_mb": {k: v / 1e6 for k, v in sizes.items()}, "pythonpath": args.pythonpath, "runs": {}}
    tokenizer = work / "tokenizer"
    if not tokenizer.is_dir():
        trained = measure(_PREPARE, [cfg("1x", "train-tokenizer")], args.pythonpath, work)
        report["runs"]["1x, training the tokenizer"] = trained
        os.symlink(Path(trained["cache"]) / "tokenizer", tokenizer)
    for corpus in sizes:
        run = f"prepare {corpus}"
        cache = f"{corpus}-{time.time_ns()}"  # fresh every time: a cache hit would measure nothing
        report["runs"][run] = measure(_PREPARE, [cfg(corpus, cache, tokenizer=str(tokenizer))], args.pythonpath, work)
        report["runs"][run]["tokens_per_s"] = report["runs"][run]["tokens"] / report["runs"][run]["seconds"]
        report["runs"][f"read {corpus}"] = measure(
            _READ, [cfg(corpus, cache, tokenizer=str(tokenizer)), str(args.batches)], args.pythonpath, work
        )
    big = f"{args.copies}x"
    for kind in ("prepare", "read"):
        report[f"{kind}_ratio"] = report["runs"][f"{kind} {big}"]["peak_rss_mib"] / report["runs"][f"{kind} 1x"]["peak_rss_mib"]
    report["accepted"] = report["prepare_ratio"] <= 1.25
    (work / "data_memory.json").write_text(json.dumps(report, indent=1))
    print(f"corpus: " + ", ".join(f"{k} {v:.1f} MB" for k, v in report["corpus_mb"].items()))
    print(f"{'run':28} {'peak RSS':>10} {'anon':>8} {'file':>8} {'tokens':>12} {'tokens/s':>10}")
    for name, r in report["runs"].items():
        tokens = f"{r['tokens']:12d}" if "tokens" in r else f"{r['batches']:5d} batches"
        speed = f"{r['tokens_per_s']:10.0f}" if "tokens_per_s" in r else ""
        print(f"{name:28} {r['peak_rss_mib']:7.0f} MiB {r['peak_anon_mib']:8.0f} {r['peak_file_mib']:8.0f} "
              f"{tokens} {speed}")
    print(f"{big}/1x peak RSS: prepare {report['prepare_ratio']:.3f}, read {report['read_ratio']:.3f} "
          f"(acceptance: prepare <= 1.25: {'yes' if report['accepted'] else 'no'})")


if __name__ == "__main__":
    main()
