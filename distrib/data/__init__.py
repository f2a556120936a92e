"""Text in, fixed-length token blocks out: corpora, tokenizer, packing, disk cache, and the sampler.

The pipeline is ``load_text`` (:mod:`~distrib.data.text`) -> ``load_or_train_tokenizer``
(:mod:`~distrib.data.tokenizer`) -> tokenize (:mod:`~distrib.data.team`) -> pack into blocks of exactly
``seq_len`` tokens (:mod:`~distrib.data.packing`). :func:`prepare_data` (:mod:`~distrib.data.cache`) runs
it once per data-defining configuration and caches the result on disk, so repeated runs and the ranks
of one run share the work; the processes that want the same cache while it is built tokenize it together.

Preparation runs in memory bounded by constants, not by the corpus: text files are parsed in 1 MB
chunks, tokenized a batch of documents at a time into an Arrow file (a long document in pieces),
packed as a stream, and the pages of every memory-mapped file a pass reads are released behind it
(:mod:`~distrib.data.pages`); ``distrib prepare-data`` runs it alone, e.g. on a login node before a job.

Two formats (``data.format``): ``text`` packs documents back to back into ``input_ids`` blocks, every
token a target (pretraining); ``prompt_response`` packs whole prompt/response examples into padded
blocks with ``input_ids`` and ``labels``, where ``labels`` is ``-100`` on prompt and padding positions
so that only the responses (and their eos) are learned (fine-tuning).

Data files are checked before ``datasets`` reads them (:mod:`distrib.data.readers`), so bad data (an empty,
binary, non-UTF-8, malformed or corrupt compressed file, a ``null`` text, a directory, a wrong
``data.tokenizer``) is refused with a one-line :class:`~distrib.config.ConfigError` naming the key, the
file and line, and the fix.

Training reads the blocks through :class:`GlobalBatchSampler` (:mod:`~distrib.data.sampler`), whose
position in the data is a single *global sample index*: a run resumed with a different data-parallel
size continues exactly where it stopped, seeing every sample of an epoch once.
"""

from distrib.data.builtin import builtin_corpus
from distrib.data.cache import PreparedData, prepare_data
from distrib.data.packing import IGNORE_INDEX
from distrib.data.sampler import GlobalBatchSampler, collate
from distrib.data.text import load_text
from distrib.data.tokenizer import EOT, load_or_train_tokenizer

__all__ = [
    "EOT",
    "IGNORE_INDEX",
    "GlobalBatchSampler",
    "PreparedData",
    "builtin_corpus",
    "collate",
    "load_or_train_tokenizer",
    "load_text",
    "prepare_data",
]
