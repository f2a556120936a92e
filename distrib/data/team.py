"""Tokenizing a split as a team: the processes that want one cache while it is built share the work.

The documents are cut into contiguous tasks, each tokenized into its own Arrow file; a process claims a
task by creating its claim file and holding a lock on it (:class:`_Job`). The builder posts a split's
tasks on a board beside the cache (:class:`_Board`), and the processes waiting for that cache claim
tasks too (:func:`_help`); the output read back in task order is the same however many did the work.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value, concatenate_datasets, load_from_disk
from transformers import PreTrainedTokenizerFast

from distrib import faults, fs
from distrib.data import packing
from distrib.data.pages import _mapped_files, _release_pages
from distrib.data.tokenizer import _token_ids
from distrib.launch.local import die_with_parent

logger = logging.getLogger("distrib.data")  # one logger for the data package, whatever the module

#: Documents per tokenizing batch (:func:`_tokenize`). The pages of the text a batch reads are
#: released after it; when the split was shuffled (validation held out of the train files) its rows
#: lie all over the file, and each maps some 64 KiB around it, so this bounds the resident text to
#: about 16 MB.
_TOKENIZE_BATCH = 256

#: Below this many documents per worker, starting tokenizing processes costs more than it saves.
_MIN_DOCS_PER_PROC = 1000

#: The tokenized prompt/response examples: the ids of prompt, response and eos, and the prompt's length.
_PAIR_FEATURES = Features({"input_ids": List(Value("int32")), "prompt_len": Value("int32")})


def _num_proc(num_docs: int, num_proc: int) -> int | None:
    return num_proc if num_proc > 1 and num_docs >= num_proc * _MIN_DOCS_PER_PROC else None


def _tokenize(docs: Dataset, tokenizer: PreTrainedTokenizerFast, pairs: bool, scratch: Path, split: str,
              workers: int, board: _Board | None = None) -> tuple[Dataset, dict[str, int]]:
    """Tokenize ``docs`` into Arrow files under ``scratch`` (one per task), memory-mapped back in order.

    What ``docs.map(encode, batched=True, num_proc=n)`` does, in bounded memory and shareable.
    The documents are cut into contiguous tasks, each tokenized into its own file, and the files
    are read back in task order: the concatenation, and the blocks packed from it, are the same for
    any number of tasks and of processes doing them. ``workers`` processes here claim tasks in
    turn (:func:`_work`); with a ``board``, the documents are saved where the processes waiting for
    this cache can read them, the tasks are posted, and those processes claim tasks too
    (:func:`_help`): a job's ranks, on one node or on several sharing the cache, tokenize together.
    Unlike ``map``, which writes one record batch per batch read, the ids are written in record
    batches of about ``_STREAM_CHUNK_TOKENS`` tokens: memory-mapping a file reads every batch's
    header, and the kernel maps some 64 KiB around each, so small batches would make the whole
    file resident. The text is read ``_TOKENIZE_BATCH`` documents at a time, its pages released
    after each.

    Returns:
        the tokenized documents, and how many tasks each process (``host:pid``) did.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    count = min(_MAX_TASKS, max(1, len(docs) // _MIN_DOCS_PER_PROC)) if board is not None else workers
    bounds = [len(docs) * i // count for i in range(count + 1)]
    job = _Job(str(scratch), split, list(zip(bounds[:-1], bounds[1:])), pairs)
    if board is not None:
        docs.save_to_disk(job.docs_dir)  # what the helpers read: the rows in this order, indices applied
        board.post(job, str(scratch.parent / "tokenizer"))
    try:
        _run_workers(job, docs, tokenizer, workers)
        _collect(job, docs, tokenizer)
    finally:
        if board is not None:
            board.withdraw()
    parts = [Dataset.from_file(job.output(i)) for i in range(len(job.tasks))]
    return (parts[0] if len(parts) == 1 else concatenate_datasets(parts)), _tokenized_by(job)


#: At most this many tokenizing tasks when other processes help (each of at least
#: ``_MIN_DOCS_PER_PROC`` documents): enough to share among the ranks of a job, few enough files.
_MAX_TASKS = 256

#: A process waiting for another's build looks for tokenizing tasks this often.
_HELP_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class _Job:
    """A split's tokenizing tasks: contiguous ``[start, end)`` document ranges, files under ``scratch``.

    A task is claimed by creating its ``.claim`` file (``O_EXCL``: one process wins) and holding an
    exclusive ``flock`` on it while working; its output appears, complete, by a rename. A claim whose
    lock is free but whose output is missing belongs to a process that died: the builder redoes it.
    """

    scratch: str
    split: str
    tasks: list[tuple[int, int]]
    pairs: bool

    def output(self, i: int) -> str:
        return os.path.join(self.scratch, f"{self.split}-{i:05d}-of-{len(self.tasks):05d}.arrow")

    def claim(self, i: int) -> str:
        return self.output(i)[: -len(".arrow")] + ".claim"

    @property
    def docs_dir(self) -> str:
        return os.path.join(self.scratch, f"{self.split}-docs")


def _launched_processes() -> int:
    """How many processes the launcher of this one started (torchrun, srun, mpirun), 1 if none did.

    Each of them prepares the data too (every rank of a job calls :func:`prepare_data`), so a build
    in one of them posts its tasks even before the others register as waiting: they are on their way.
    """
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _run_workers(job: _Job, docs: Dataset, tokenizer: PreTrainedTokenizerFast, workers: int, helping: bool = False) -> None:
    """Claim and tokenize ``job``'s tasks in ``workers`` processes (this one alone if 1) until none is left."""
    workers = min(workers, len(job.tasks))
    if workers <= 1:
        _work(job, docs, tokenizer, helping)
        return
    import multiprocess  # datasets' own dependency (its map uses it): pickles what multiprocessing cannot

    # the pool's processes end with this one (a kill -9 of the launcher would leave them tokenizing)
    with multiprocess.Pool(workers, initializer=die_with_parent) as pool:
        pool.starmap(_work, [(job, docs, tokenizer, helping)] * workers)


def _work(job: _Job, docs: Dataset, tokenizer: PreTrainedTokenizerFast, helping: bool = False) -> int:
    """Tokenize every task of ``job`` this process can claim; returns how many it did.

    ``helping``: this process helps another's build (the fault point ``tokenize`` tells them apart).
    """
    done = 0
    for i in range(len(job.tasks)):
        try:
            fd = os.open(job.claim(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, _worker_id().encode())
            faults.at("tokenize", int(helping), done)
            _do_task(job, i, docs, tokenizer)
        finally:
            os.close(fd)  # releases the claim's lock, after the output is in place
        done += 1
    return done


def _do_task(job: _Job, i: int, docs: Dataset, tokenizer: PreTrainedTokenizerFast) -> None:
    start, end = job.tasks[i]
    tmp = f"{job.output(i)}.tmp-{socket.gethostname()}-{os.getpid()}"
    _tokenize_shard(docs.select(range(start, end)), tokenizer, job.pairs, tmp)
    fs.replace(Path(tmp), Path(job.output(i)))


def _collect(job: _Job, docs: Dataset, tokenizer: PreTrainedTokenizerFast) -> None:
    """Wait for every task's output; redo the tasks of claimers that died (their claim lock is free)."""
    for i in range(len(job.tasks)):
        while not os.path.exists(job.output(i)):
            fd = os.open(job.claim(i), os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its claimer is at work
                    time.sleep(0.1)
                    continue
                if not os.path.exists(job.output(i)):
                    logger.info("tokenizing task %d of the %s split again: the process that claimed it is gone",
                                i, job.split)
                    os.ftruncate(fd, 0)
                    os.write(fd, _worker_id().encode())
                    _do_task(job, i, docs, tokenizer)
            finally:
                os.close(fd)


def _tokenized_by(job: _Job) -> dict[str, int]:
    """How many of ``job``'s tasks each process (``host:pid``) tokenized, read from the claims."""
    counts: dict[str, int] = {}
    for i in range(len(job.tasks)):
        who = Path(job.claim(i)).read_text()
        counts[who] = counts.get(who, 0) + 1
    return counts


@dataclass(frozen=True)
class _Board:
    """Where the process building a cache offers its tokenizing to the processes waiting for that cache.

    A waiting process registers a file in ``waiting`` (``root/KEY.waiting/``); the builder, finding one
    there when it starts a split, posts the split's :class:`_Job` as ``root/KEY.tasks.json`` and takes
    it down when the split is tokenized. Everything lives beside the cache, so the processes that
    help are those that share its file system: the ranks of a node with a node-local cache, every
    rank of a job with a shared one.
    """

    root: Path
    key: str

    @property
    def waiting(self) -> Path:
        return self.root / f"{self.key}.waiting"

    @property
    def posted(self) -> Path:
        return self.root / f"{self.key}.tasks.json"

    def has_helpers(self) -> bool:
        try:
            return any(self.waiting.iterdir())
        except OSError:
            return False

    def register(self) -> Path:
        me = self.waiting / f"{socket.gethostname()}-{os.getpid()}"
        for _ in range(10):  # the last one out may remove the directory between the two calls
            try:
                self.waiting.mkdir(exist_ok=True)
                me.touch()
                return me
            except FileNotFoundError:
                continue
        return me

    def unregister(self, me: Path) -> None:
        me.unlink(missing_ok=True)
        try:
            self.waiting.rmdir()
        except OSError:  # others still waiting
            pass

    def post(self, job: _Job, tokenizer_dir: str) -> None:
        fs.atomic_write_text(self.posted, json.dumps({"job": dataclasses.asdict(job), "tokenizer": tokenizer_dir}),
                             durable=False)

    def withdraw(self) -> None:
        self.posted.unlink(missing_ok=True)

    def read(self) -> tuple[_Job, str] | None:
        try:
            posted = json.loads(self.posted.read_text())
        except (OSError, ValueError):
            return None
        job = posted["job"]
        return _Job(job["scratch"], job["split"], [tuple(t) for t in job["tasks"]], job["pairs"]), posted["tokenizer"]


def _help(board: _Board, workers: int, helped: set) -> None:
    """Do tasks of the job posted on ``board``, if there is one this process has not helped with yet.

    Best effort: whatever goes wrong (the build failed and was removed meanwhile) is left to the
    builder, which redoes the tasks whose claimer is gone.
    """
    posted = board.read()
    if posted is None or (posted[0].scratch, posted[0].split) in helped:
        return
    job, tokenizer_dir = posted
    helped.add((job.scratch, job.split))
    try:
        docs = load_from_disk(job.docs_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        _run_workers(job, docs, tokenizer, workers, helping=True)
    except Exception:  # noqa: BLE001 (see the docstring)
        logger.debug("could not help tokenizing %s", job.scratch, exc_info=True)


def _tokenize_shard(docs: Dataset, tokenizer: PreTrainedTokenizerFast, pairs: bool, path: str) -> None:
    """Tokenize ``docs`` into an Arrow stream file at ``path``, in large record batches (see :func:`_tokenize`)."""
    schema = _PAIR_FEATURES.arrow_schema if pairs else pa.schema([("input_ids", pa.list_(pa.int32()))])
    encode = _encode_pairs if pairs else _encode
    files = _mapped_files(docs)
    pending: list[pa.Table] = []
    pending_tokens = 0
    with pa.ipc.new_stream(path, schema) as sink:
        for batch in docs.iter(batch_size=_TOKENIZE_BATCH):
            _release_pages(files)  # the text this batch was read from
            table = pa.Table.from_pydict(encode(batch, tokenizer), schema=schema)
            pending.append(table)
            pending_tokens += sum(len(chunk.values) for chunk in table.column("input_ids").chunks)
            if pending_tokens >= packing._STREAM_CHUNK_TOKENS:
                sink.write_table(pa.concat_tables(pending).combine_chunks())
                pending, pending_tokens = [], 0
        if pending:
            sink.write_table(pa.concat_tables(pending).combine_chunks())



def _encode(batch: dict, tokenizer: PreTrainedTokenizerFast) -> dict:
    return {"input_ids": _token_ids(batch["text"], tokenizer)}


def _encode_pairs(batch: dict, tokenizer: PreTrainedTokenizerFast) -> dict:
    # Prompt and response are tokenized apart, so the boundary between them (where the labels
    # start) falls between tokens; joint tokenization could merge its two sides into one token.
    prompts, responses = _token_ids(batch["prompt"], tokenizer), _token_ids(batch["response"], tokenizer)
    p, r = prompts.offsets.to_numpy(), responses.offsets.to_numpy()
    p_ids, r_ids = prompts.values.to_numpy(), responses.values.to_numpy()
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    examples = [np.concatenate([p_ids[p[i] : p[i + 1]], r_ids[r[i] : r[i + 1]], eos]) for i in range(len(prompts))]
    offsets = np.zeros(len(examples) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(e) for e in examples])
    flat = np.concatenate(examples) if examples else np.zeros(0, dtype=np.int32)
    return {
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        "prompt_len": pa.array(np.diff(p), type=pa.int32()),
    }


