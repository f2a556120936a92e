"""The tokenizer: loaded from ``data.tokenizer`` or trained (byte-level BPE), and fed text in bounded pieces.

A long document is given to the tokenizer in pieces of at most ``_TOKENIZE_CHARS`` characters, cut where
byte-level BPE gives the same tokens as for the whole text (:func:`_pieces`), so that neither training
nor tokenizing holds memory that grows with a document.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distrib.config import ConfigError, DataConfig
from distrib.data.pages import _mapped_files, _release_pages

logger = logging.getLogger("distrib.data")  # one logger for the data package, whatever the module

#: The one special token of a trained tokenizer; it separates documents and doubles as bos/pad/unk.
EOT = "<|endoftext|>"

#: Characters of text the tokenizer is given at once (:func:`_token_ids`): a longer document is cut
#: into pieces (:func:`_pieces`), shorter ones go together. A fast tokenizer holds some 200 bytes per
#: token while it works (offsets, alignments, token strings), and BPE training as much per word, so
#: this keeps both to some tens of MB however long a document is (a 30 MB one-line corpus took 6 GB).
_TOKENIZE_CHARS = 1 << 16

#: Where a long text may be cut between two tokenizer calls: a space, tab or newline after a
#: non-space character. Byte-level BPE's pre-tokenizer (GPT-2's pattern) splits every text there: no
#: pre-token holds a whitespace character after a non-space one, and the pre-tokens from there on
#: do not depend on what came before; so the pieces' tokens are the whole text's.
_CUT = re.compile(r"(?<=\S)[ \t\n]")

#: The tokenizer is trained on at most this many characters of the train split: BPE statistics
#: settle long before a hub-sized corpus is exhausted, and training time grows with the text.
_TOKENIZER_TRAIN_CHARS = 100_000_000

#: Files of which a ``save_pretrained`` tokenizer directory holds at least one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_or_train_tokenizer(cfg: DataConfig, train_texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """``cfg.tokenizer`` if set, else a byte-level BPE of ``cfg.vocab_size`` trained on ``train_texts``.

    The trained tokenizer has one special token, ``<|endoftext|>``, used as eos, bos, pad and
    unk; byte-level BPE never needs unk, and eos is what packing puts between documents. Training
    is deterministic for the same texts (at most the first ``_TOKENIZER_TRAIN_CHARS`` characters).

    Raises:
        ConfigError: ``cfg.tokenizer`` is not a tokenizer directory, fails to load, or has no eos token.
    """
    if cfg.tokenizer:
        path = _check_tokenizer_dir(cfg.tokenizer)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # tokenizers raises bare Exception; the directory is the only input here
            logger.debug("loading the tokenizer %s failed", path, exc_info=True)
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"data.tokenizer={cfg.tokenizer!r} cannot be loaded ({type(e).__name__}: {detail}); "
                "point it at a directory written by save_pretrained, or unset it to train one"
            ) from None
        if tok.eos_token_id is None:
            raise ConfigError(
                f"data.tokenizer={cfg.tokenizer!r} has no eos token, which packing puts between documents; use another"
            )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    bpe = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x, which matters for code.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, so no unk
        show_progress=False,
    )
    # In pieces, as they are tokenized: the same words to count, and bounded memory for a long document.
    texts = _first_chars(train_texts, _TOKENIZER_TRAIN_CHARS)
    bpe.train_from_iterator((piece for text in texts for piece in _pieces(text, _TOKENIZE_CHARS)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        clean_up_tokenization_spaces=False,  # the cleanup rewrites " ." and friends, breaking code
    )


def _check_tokenizer_dir(tokenizer: str) -> Path:
    """``data.tokenizer`` as a path, refused unless it is a directory holding tokenizer files.

    A cheap look at the names only, so :func:`prepare_data` can refuse a wrong directory (say a
    model directory with only ``config.json``) before it reads any data.

    Raises:
        ConfigError: not a directory, or none of the files ``save_pretrained`` writes.
    """
    path = Path(tokenizer).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"data.tokenizer={tokenizer!r} is not a directory; "
            "point it at a save_pretrained directory or unset it to train one"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(
            f"data.tokenizer={tokenizer!r} holds no tokenizer "
            "(no tokenizer.json, tokenizer_config.json or vocabulary file); "
            "point it at a directory written by save_pretrained, or unset it to train one"
        )
    return path


def _first_chars(texts: Iterable[str], budget: int) -> Iterator[str]:
    for text in texts:
        if budget <= 0:
            return
        budget -= len(text)
        yield text


def _iter_text(ds: Dataset) -> Iterator[str]:
    """The texts of ``ds`` to train a tokenizer on: the ``text`` column, or each prompt and response."""
    # Batched iteration: never materialises a hub-sized split as one Python list.
    columns = ["prompt", "response"] if "prompt" in ds.column_names else ["text"]
    files = _mapped_files(ds)
    for batch in ds.iter(batch_size=1000):
        for row in zip(*(batch[c] for c in columns)):
            yield from row
        _release_pages(files)


def _token_ids(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> pa.ListArray:
    """The ids of each of ``texts`` as a ``list<int32>`` array, the tokenizer given ``_TOKENIZE_CHARS`` at a time.

    A text longer than that is tokenized in pieces (:func:`_pieces`), cut where the trained byte-level
    BPE gives the same ids as for the whole text; another tokenizer (``data.tokenizer``) does too
    unless it treats the start of a text specially (a prefix space), and then at most the tokens
    next to a cut differ. The ids go to numpy as each call returns, not into lists of Python ints.
    """
    counts = np.zeros(len(texts), dtype=np.int64)
    values = [np.zeros(0, dtype=np.int32)]
    for owners, group in _piece_groups(texts, _TOKENIZE_CHARS):
        # No special tokens: packing adds the single eos after each document itself. verbose=False
        # silences the "longer than model_max_length" warning, which is meaningless before packing.
        ids = tokenizer(group, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        np.add.at(counts, owners, lengths)
        values.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())))
    offsets = np.zeros(len(texts) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(counts)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(values)))


def _piece_groups(texts: list[str], limit: int) -> Iterator[tuple[list[int], list[str]]]:
    """``(owners, pieces)``: the pieces of ``texts`` in order, gathered up to ``limit`` characters, each with its text's index."""
    owners: list[int] = []
    group: list[str] = []
    size = 0
    for i, text in enumerate(texts):
        for piece in _pieces(text, limit):
            if group and size + len(piece) > limit:
                yield owners, group
                owners, group, size = [], [], 0
            owners.append(i)
            group.append(piece)
            size += len(piece)
    if group:
        yield owners, group


def _pieces(text: str, limit: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``limit`` characters (at least half that, but the last).

    Each cut is the last place of the piece's second half where ``_CUT`` matches; a piece without
    one (a run of ``limit / 2`` characters without a space, tab or newline) is cut at ``limit``.
    """
    start = 0
    while len(text) - start > limit:
        lo, hi = start + limit // 2 + 1, start + limit + 1  # the cut, the next piece's first character, in [lo, hi)
        cut, end, span = hi - 1, hi, 256  # a hard cut, unless a match is found searching back from hi
        while end > lo:
            begin = max(lo, end - span)
            found = [m.start() for m in _CUT.finditer(text, begin, end)]
            if found:
                cut = found[-1]
                break
            end, span = begin, span * 4
        yield text[start:cut]
        start = cut
    yield text[start:]


