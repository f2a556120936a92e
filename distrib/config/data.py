"""``data.*``: where text comes from, how it is tokenized and packed, and the files a run reads."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distrib.config.fields import Float, Int, PathStr, _Section
from distrib.errors import ConfigError


#: The files ``data.train_files`` and ``data.validation_files`` may name (read by :mod:`distrib.data.readers`).
DATA_FILE_TYPES = ".txt/.jsonl/.json/.csv/.parquet (the first four also compressed as .gz/.bz2/.xz)"


class DataConfig(_Section):
    """Where text comes from, how it is tokenized and packed.

    ``source``: ``builtin`` (an offline corpus built from this Python's standard library; ``name`` picks
    the domain, ``code``, ``prose`` or ``instruct``), ``files`` (local files, ``train_files`` and optional
    ``validation_files``, each a list of paths and globs of :data:`DATA_FILE_TYPES`) or ``hub`` (``name`` is a
    Hugging Face dataset id, for clusters with network).

    ``format``: ``text`` (documents in ``text_field``, packed back to back for pretraining) or
    ``prompt_response`` (rows with ``prompt_field`` and ``response_field``; the loss is on the responses
    only). The built-in ``instruct`` corpus (documented standard-library functions: docstring -> code) is
    always ``prompt_response``, whatever ``format`` says.
    """

    source: Literal["builtin", "files", "hub"] = "builtin"
    name: str | None = "code"
    hub_config: str | None = None
    train_files: list[PathStr] = Field(default_factory=list)
    validation_files: list[PathStr] = Field(default_factory=list)
    text_field: str = "text"
    format: Literal["text", "prompt_response"] = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    validation_fraction: Float = Field(0.02, gt=0.0, lt=0.5)
    max_documents: Int | None = Field(None, gt=0)
    seq_len: Int = Field(256, gt=1)
    tokenizer: PathStr | None = None
    vocab_size: Int = Field(4096, ge=300)
    num_proc: Int = Field(2, gt=0)
    cache_dir: PathStr | None = None
    trace_samples: bool = False

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "builtin" and self.name not in ("code", "prose", "instruct"):
            raise ConfigError(
                f"data.name={self.name!r} is not a built-in corpus; use data.name=code, data.name=prose or data.name=instruct"
            )
        if self.source == "builtin" and self.name != "instruct" and self.format == "prompt_response":
            raise ConfigError(
                f"data.format=prompt_response needs prompt/response rows, but the built-in corpus data.name={self.name!r} "
                "is plain text; use data.name=instruct or data.format=text"
            )
        if self.format == "prompt_response" and self.prompt_field == self.response_field:
            raise ConfigError(
                f"data.prompt_field and data.response_field are both {self.prompt_field!r}; name two different fields"
            )
        if self.source == "files" and not self.train_files:
            raise ConfigError(f"data.source=files needs data.train_files, a list of paths or globs of data files: {DATA_FILE_TYPES}")
        if self.source == "hub" and not self.name:
            raise ConfigError("data.source=hub needs data.name, a Hugging Face dataset id such as 'HuggingFaceFW/fineweb'")
        return self

    def check_paths(self) -> None:
        """Checks that the tokenizer and data files the run reads exist (part of :meth:`Config.check_paths`)."""
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"data.tokenizer={self.tokenizer!r} is not a directory; point it at a saved tokenizer")
        if self.source == "files":
            for key in ("train_files", "validation_files"):
                for pattern in getattr(self, key):
                    pattern = os.path.expanduser(pattern)
                    # A "**" matches no directory too, which glob.glob does only with recursive=True, and
                    # that follows a link loop around; distrib.data.readers expands it, loop-safe, when the
                    # data is prepared (still before any worker starts).
                    if "**" not in pattern and not glob.glob(pattern):
                        raise ConfigError(f"data.{key}: {pattern!r} matches no file; fix the path or glob")
